// Causal GQA attention over the KV cache, split over the keys (flash-decoding style).

// Split-KV causal attention. Query m (position pos[m] of the sequence whose cache rows
// start at base[m]) of head h attends to keys [first, n) of that sequence, KV head h / (nh/nkv),
// n = pos[m] + 1, first = max(0, n − window) for a sliding window (window > 0; else 0);
// split s takes the s-th of nsplit equal runs of them (the run length follows the position at
// run time, so a captured graph stays right as the context grows). Key j lives in cache row
// base[m] + j, or slot[m]·ring + j mod ring when the layer's cache is a ring of `ring` rows a
// slot (ring > 0: GPT-OSS's sliding layers). sinks (null: none) adds head h's sink logit
// sinks[h] to the softmax denominator in the merge (its probability dropped).
// The query heads of one KV head read the same K and V rows, so a block serves up to ATTN_HB
// of them (ATTN_HPW a warp) for one token and split: grid (M·nkv·ceil(G / ATTN_HB), nsplit)
// with G = nh / nkv, ATTN_THREADS threads. Keys stream through shared memory ATTN_KC rows at
// a time, each K and V row read from memory once per block. Per tile, lane j of a warp scores
// key j for the warp's heads (a D-wide dot product out of shared memory), the warp takes max
// and sum (online softmax, f32), then lane c accumulates value dims 8c .. 8c + 8 of Σ p·V in
// key order. Writes part_o[(mh·nsplit + s)·D + d] (unnormalised) and part_ml[..·2] =
// (max, sum); the block that finishes a (token, head chunk) last (tickets[m·nh + first head],
// reset after use) merges the splits of its heads into bf16 out[M, nh·D]. D ≤ MAXD, a
// multiple of 8; nsplit ≤ 32.
// MAXD, ATTN_HB and ATTN_THREADS come from the prelude (src/cuda/ops/mod.rs).
#define ATTN_KC 32                                    // keys per shared-memory tile (a lane each)
#define ATTN_WARPS (ATTN_THREADS / 32)
#define ATTN_HPW (ATTN_HB / ATTN_WARPS)               // query heads per warp: warp w takes w, w + ATTN_WARPS, ...
#define ATTN_KROWP (MAXD + 8)                         // K tile row stride: conflict-free 16-byte reads
#define ATTN_LPT ((2 * ATTN_KC * MAXD / 8 + ATTN_THREADS - 1) / ATTN_THREADS)

// Merges the nsplit partial results of one (token, head) — po[nsplit, W] unnormalised sums,
// pml[nsplit, 2] = (max, sum) — into bf16 out[W], by one warp: each split is rescaled to the
// common maximum; empty splits (sum 0) drop out. A sink logit (−inf: none) joins the maximum
// and the denominator only (with −inf both are unchanged, bit for bit). nsplit ≤ 32, W a
// multiple of 4. The partials are read through L2 (other blocks wrote them). Shared by GQA
// and MLA attention.
__device__ void merge_splits_warp(const float* po, const float* pml, int nsplit, int W, float sink, bf16* out) {
    int lane = threadIdx.x & 31;
    float ms = lane < nsplit ? __ldcg(pml + 2 * lane) : -INFINITY;
    float ls = lane < nsplit ? __ldcg(pml + 2 * lane + 1) : 0.f;
    float M2 = fmaxf(warp_max(ls > 0.f ? ms : -INFINITY), sink);
    float fs = ls > 0.f ? expf(ms - M2) : 0.f, den = warp_sum(ls * fs);
    if (sink > -INFINITY) den += expf(sink - M2);
    float f[32];
#pragma unroll
    for (int s = 0; s < 32; s++) f[s] = __shfl_sync(0xffffffffu, fs, s);
    for (int c = lane; c < W / 4; c += 32) {
        float4 n = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int s = 0; s < 32; s++) {
            if (s < nsplit && f[s] > 0.f) {
                float4 x = __ldcg((const float4*)(po + (long)s * W) + c);
                n.x += x.x * f[s]; n.y += x.y * f[s]; n.z += x.z * f[s]; n.w += x.w * f[s];
            }
        }
        *(uint2*)(out + 4 * c) = make_uint2(pack_bf16x2(n.x / den, n.y / den), pack_bf16x2(n.z / den, n.w / den));
    }
}

extern "C" __global__ void attention(const AttentionArgs a) {
    pdl_entry();
    const int nh = a.nh, nkv = a.nkv, D = a.d, nsplit = a.nsplit, G = nh / nkv, rc = D / 8;
    const int chunks = (G + ATTN_HB - 1) / ATTN_HB, per_m = nkv * chunks;
    const int m = blockIdx.x / per_m, kvh = blockIdx.x % per_m / chunks, hc = blockIdx.x % chunks;
    const int split = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h0 = kvh * G + hc * ATTN_HB, nb = min(ATTN_HB, G - hc * ATTN_HB);  // this block's heads
    __shared__ __align__(16) bf16 ks[ATTN_KC * ATTN_KROWP];  // [key][dim] of this tile
    __shared__ __align__(16) bf16 vs[ATTN_KC * MAXD];        // [key][dim]
    __shared__ __align__(16) float qs[ATTN_HB][MAXD];        // [head of the block][dim]
    // Row m's own sequence: key j in cache row base[m] + j (a ring: slot[m]·ring + j mod
    // ring); KV head kvh of cache row r at r·nkv·D + kvh·D.
    const int ring = a.ring;
    const long seq = (ring > 0 ? (long)a.slot[m] * ring : (long)a.base[m]) * nkv * D + (long)kvh * D;
    const long stride = (long)nkv * D;
    const bf16 *kc = a.kc + seq, *vc = a.vc + seq;
    const int n_keys = a.pos[m] + 1, first = a.window > 0 ? max(0, n_keys - a.window) : 0;
    const int chunk = (n_keys - first + nsplit - 1) / nsplit;
    int s0 = min(first + split * chunk, n_keys), s1 = min(s0 + chunk, n_keys);
    for (int i = threadIdx.x; i < nb * D; i += ATTN_THREADS)
        qs[i / D][i % D] = bf2f(a.q[((long)m * nh + h0) * D + i]);
    float mx[ATTN_HPW], l[ATTN_HPW], acc[ATTN_HPW][8];
#pragma unroll
    for (int i = 0; i < ATTN_HPW; i++) {
        mx[i] = -INFINITY, l[i] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] = 0.f;
    }
    for (int k0 = s0; k0 < s1; k0 += ATTN_KC) {
        const int cnt = min(ATTN_KC, s1 - k0), n16 = cnt * rc;
        // The tile's cache rows: from row0, wrapping to row 0 of a ring (at most once: a
        // split spans at most `window` ≤ ring keys) after `wrap` keys.
        const int row0 = ring > 0 ? k0 % ring : k0, wrap = ring > 0 ? ring - row0 : ATTN_KC;
        // The tile's K then V rows, 16 bytes a load, every load of a thread in flight first.
        uint4 r[ATTN_LPT];
#pragma unroll
        for (int t = 0; t < ATTN_LPT; t++) {
            int i = threadIdx.x + t * ATTN_THREADS, v = i >= n16, ii = i - v * n16;
            if (i < 2 * n16) {  // the row arithmetic inside the guard: 124 registers, not 161
                int kk = ii / rc, row = row0 + kk - (kk >= wrap ? ring : 0);
                r[t] = __ldg((const uint4*)((v ? vc : kc) + row * stride) + ii % rc);
            }
        }
        __syncthreads();  // the previous tile is consumed (and qs written, on the first)
#pragma unroll
        for (int t = 0; t < ATTN_LPT; t++) {
            int i = threadIdx.x + t * ATTN_THREADS, v = i >= n16, ii = i - v * n16;
            if (i < 2 * n16) *(uint4*)((v ? vs + ii / rc * MAXD : ks + ii / rc * ATTN_KROWP) + ii % rc * 8) = r[t];
        }
        __syncthreads();
        float pe[ATTN_HPW] = {};
        if (lane < cnt) {
            float dot[ATTN_HPW] = {};
            const uint4* kr = (const uint4*)(ks + lane * ATTN_KROWP);
            for (int c = 0; c < rc; c++) {
                float kf[8];
                unpack8(kr[c], kf);
#pragma unroll
                for (int i = 0; i < ATTN_HPW; i++) {
                    if (warp + ATTN_WARPS * i < nb) {
                        const float4* qv = (const float4*)qs[warp + ATTN_WARPS * i] + 2 * c;
                        float4 qa = qv[0], qb = qv[1];
                        dot[i] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                                  qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < ATTN_HPW; i++) pe[i] = dot[i] * a.scale;
        }
#pragma unroll
        for (int i = 0; i < ATTN_HPW; i++) {
            if (warp + ATTN_WARPS * i >= nb) continue;  // the whole warp skips a head it lacks
            float sc = lane < cnt ? pe[i] : -INFINITY;
            float mn = fmaxf(mx[i], warp_max(sc)), f = expf(mx[i] - mn);
            pe[i] = lane < cnt ? expf(sc - mn) : 0.f;
            l[i] = l[i] * f + warp_sum(pe[i]);
            mx[i] = mn;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[i][e] *= f;
        }
        for (int j = 0; j < cnt; j++) {
            float pj[ATTN_HPW];
#pragma unroll
            for (int i = 0; i < ATTN_HPW; i++) pj[i] = __shfl_sync(0xffffffffu, pe[i], j);
            if (lane < rc) {
                float vf[8];
                unpack8(*((const uint4*)(vs + j * MAXD) + lane), vf);
#pragma unroll
                for (int i = 0; i < ATTN_HPW; i++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[i][e] += pj[i] * vf[e];
            }
        }
    }
    // This split's unnormalised sums and (max, sum) to the partials of each of the warp's heads.
#pragma unroll
    for (int i = 0; i < ATTN_HPW; i++) {
        if (warp + ATTN_WARPS * i >= nb) continue;
        long slot = ((long)m * nh + h0 + warp + ATTN_WARPS * i) * nsplit + split;
        if (lane < rc) {
            float4* po = (float4*)(a.part_o + slot * D) + 2 * lane;
            po[0] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            po[1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
        }
        if (lane == 0) a.part_ml[slot * 2] = mx[i], a.part_ml[slot * 2 + 1] = l[i];
    }
    if (!last_to_finish(a.tickets + (long)m * nh + h0, nsplit)) return;
    for (int hh = warp; hh < nb; hh += ATTN_WARPS) {
        long mh = (long)m * nh + h0 + hh;
        float sink = a.sinks ? a.sinks[h0 + hh] : -INFINITY;
        merge_splits_warp(a.part_o + mh * nsplit * D, a.part_ml + mh * nsplit * 2, nsplit, D, sink, a.out + mh * D);
    }
}

// Causal GQA attention of a prompt chunk on tensor cores (flash-attention style; prompt
// chunks of long prompts, see gemm.cu): the chunk's M rows are one
// sequence's consecutive positions pos[0] .. pos[0] + M − 1 (cache rows from base[0]). Block
// (x, h) takes queries x·64 .. of head h, a warp 16 of them; keys stream through shared
// memory 32 at a time (K row-major, V transposed), S = q·kᵀ and O += P·V by mma.sync
// m16n8k16 (bf16 in, f32 accumulate; P rounded to bf16), online softmax per query in f32.
// Sums run in another order than the split-KV kernel's: within bf16 tolerance of decode,
// not bit-identical (tests/gpu.rs). D ∈ {64, 128}. GPT-OSS: a sliding window (window > 0:
// query p sees keys p − window + 1 ..= p), a ring cache (ring > 0: key j in row
// slot[0]·ring + j mod ring; the chunk's keys then span at most window + m − 1 ≤ ring rows)
// and sink logits (sinks[h] joins each row's denominator at the end), as in `attention`.
#define FA_BQ 64
#define FA_BK 32

template <int D>
__device__ __forceinline__ void attention_tc_tile(const FlashArgs& a) {
    __shared__ __align__(16) bf16 ks[FA_BK][D + 8];
    __shared__ __align__(16) bf16 vt[D][FA_BK + 8];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int nh = a.nh, nkv = a.nkv, M = a.m, h = blockIdx.y, kvh = h / (nh / nkv);
    // The last queries (the most keys) first, so the longest blocks are not the last wave.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ, qw = q0 + warp * 16;
    const int p0 = a.pos[0], window = a.window, ring = a.ring;
    // Key j of the sequence in cache row seq_row + j (a ring: seq_row + j mod ring).
    const long seq_row = ring > 0 ? (long)a.slot[0] * ring : (long)a.base[0];
    auto key_off = [&](int j) { return (seq_row + (ring > 0 ? j % ring : j)) * nkv * D + (long)kvh * D; };
    // This warp's q rows qw + g and qw + g + 8 (clamped: rows past M are computed, not stored)
    // as A fragments, k = the head dimension.
    u32 qf[D / 16][4];
    const bf16* qr0 = a.q + ((long)min(qw + g, M - 1) * nh + h) * D;
    const bf16* qr1 = a.q + ((long)min(qw + g + 8, M - 1) * nh + h) * D;
#pragma unroll
    for (int k = 0; k < D / 16; k++) {
        qf[k][0] = *(const u32*)(qr0 + k * 16 + 2 * t4);
        qf[k][1] = *(const u32*)(qr1 + k * 16 + 2 * t4);
        qf[k][2] = *(const u32*)(qr0 + k * 16 + 2 * t4 + 8);
        qf[k][3] = *(const u32*)(qr1 + k * 16 + 2 * t4 + 8);
    }
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
    const int nkeys = p0 + min(q0 + FA_BQ, M);           // keys any query of the block sees
    const int wkeys = p0 + min(qw + 16, M);               // ... of this warp
    // The first key the block's first query sees (its window), and the warp's.
    const int kfirst = window > 0 ? max(0, p0 + q0 - window + 1) : 0;
    const int wfirst = window > 0 ? max(0, p0 + qw - window + 1) : 0;
    for (int k0 = kfirst; k0 < nkeys; k0 += FA_BK) {
        __syncthreads();
        // K row-major: a warp stores consecutive 16-byte pieces of a few key rows.
        for (int i = tid; i < FA_BK * D / 8; i += blockDim.x) {
            int r = i / (D / 8), c = i % (D / 8);
            uint4 kv = make_uint4(0, 0, 0, 0);
            if (k0 + r < nkeys) kv = ((const uint4*)(a.kc + key_off(k0 + r)))[c];
            *(uint4*)&ks[r][c * 8] = kv;
        }
        // V transposed: a warp takes one 8-dimension piece of all 32 keys, so each of its 8
        // element stores writes 32 consecutive keys of one vt row (no bank conflicts).
        for (int i = tid; i < FA_BK * D / 8; i += blockDim.x) {
            int r = i % FA_BK, c = i / FA_BK;
            uint4 vv = make_uint4(0, 0, 0, 0);
            if (k0 + r < nkeys) vv = ((const uint4*)(a.vc + key_off(k0 + r)))[c];
            const bf16* ve = (const bf16*)&vv;
#pragma unroll
            for (int j = 0; j < 8; j++) vt[c * 8 + j][r] = ve[j];
        }
        __syncthreads();
        // Every query of this warp is before this tile, or (window) past it.
        if (k0 >= wkeys || k0 + FA_BK <= wfirst) continue;
        float s[FA_BK / 8][4];
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int k = 0; k < D / 16; k++) {
                u32 b[2] = {*(const u32*)&ks[n * 8 + g][k * 16 + 2 * t4], *(const u32*)&ks[n * 8 + g][k * 16 + 2 * t4 + 8]};
                mma_bf16_16816(s[n], qf[k], b);
            }
        }
        // Scale and causal mask (and the window's): query row qw + g (+8) sits at position
        // p0 + row.
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int qpos = p0 + qw + g + r * 8, qfirst = window > 0 ? qpos - window + 1 : 0;
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < FA_BK / 8; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    int key = k0 + n * 8 + 2 * t4 + c;
                    float v = key <= qpos && key >= qfirst ? s[n][2 * r + c] * a.scale : -INFINITY;
                    s[n][2 * r + c] = v;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(mrow[r], mx);
            // No key seen yet for this row (mnew = -inf): nothing to rescale, p = 0.
            const float f = mnew == -INFINITY ? 1.f : expf(mrow[r] - mnew);
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < FA_BK / 8; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    float p = mnew == -INFINITY ? 0.f : expf(s[n][2 * r + c] - mnew);
                    s[n][2 * r + c] = p;
                    sum += p;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            lrow[r] = lrow[r] * f + sum;
            mrow[r] = mnew;
#pragma unroll
            for (int n = 0; n < D / 8; n++) o[n][2 * r] *= f, o[n][2 * r + 1] *= f;
        }
        // O += P·V: P (16 queries × 32 keys) as two A fragments of 16 keys, from S's registers.
#pragma unroll
        for (int j = 0; j < FA_BK / 16; j++) {
            u32 pa[4] = {pack_bf16x2(s[2 * j][0], s[2 * j][1]), pack_bf16x2(s[2 * j][2], s[2 * j][3]),
                         pack_bf16x2(s[2 * j + 1][0], s[2 * j + 1][1]), pack_bf16x2(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                u32 b[2] = {*(const u32*)&vt[n * 8 + g][j * 16 + 2 * t4], *(const u32*)&vt[n * 8 + g][j * 16 + 2 * t4 + 8]};
                mma_bf16_16816(o[n], pa, b);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = qw + g + r * 8;
        if (row >= M) continue;
        bf16* out = a.out + ((long)row * nh + h) * D;
        // A sink logit joins the denominator (its probability is dropped).
        const float sink = a.sinks ? a.sinks[h] : -INFINITY, mf = fmaxf(mrow[r], sink);
        const float fo = sink == -INFINITY ? 1.f : expf(mrow[r] - mf);
        const float inv = fo / (sink == -INFINITY ? lrow[r] : lrow[r] * fo + expf(sink - mf));
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(u32*)(out + n * 8 + 2 * t4) = pack_bf16x2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
}

extern "C" __global__ void attention_tc(const FlashArgs a) {
    pdl_entry();
    if (a.d == 128) attention_tc_tile<128>(a);
    else attention_tc_tile<64>(a);
}
