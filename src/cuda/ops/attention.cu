// Causal GQA attention over the KV cache, split over the keys (flash-decoding style).

// Split-KV causal attention. Grid (M·nh, nsplit), ATTN_THREADS threads. Query m
// (position pos[m] of the sequence whose cache rows start at base[m]) of head h attends to
// keys [0, n) of that sequence, KV head h / (nh/nkv), n = pos[m] + 1; split s takes the
// s-th of nsplit equal runs of them (the run length follows the position at run time, so a
// captured graph stays right as the context grows).
// Per pass of ATTN_THREADS keys: thread t scores key t (a whole 16-byte-vectorised dot
// product, so the key loads of a pass are independent), the block takes max and sum of
// the pass, then thread t accumulates dimensions t, t + ATTN_THREADS of Σ p·V in key order.
// Writes part_o[(mh·nsplit + s)·D + d] (unnormalised) and part_ml[..·2] = (max, sum); the
// last split block of a (token, head) to finish (tickets[mh], reset after use) merges the
// splits into bf16 out[M, nh·D].
// MAXD and ATTN_THREADS come from the prelude (src/cuda/ops/mod.rs).

// Merges the nsplit partial results of one (token, head) — po[nsplit, D] unnormalised
// sums, ml[nsplit, 2] = (max, sum) — into bf16 out[D]: each split is rescaled to the common
// maximum; empty splits (sum 0) drop out. Called by the whole block that finished last.
__device__ void merge_splits(const float* po, const float* pml, int nsplit, int D, bf16* out) {
    __shared__ float ml[2 * ATTN_THREADS];
    int tid = threadIdx.x;
    for (int i = tid; i < 2 * nsplit; i += ATTN_THREADS) ml[i] = __ldcg(pml + i);
    __syncthreads();
    float M2 = -INFINITY;
    for (int s = 0; s < nsplit; s++) if (ml[2 * s + 1] > 0.f) M2 = fmaxf(M2, ml[2 * s]);
    for (int d = tid; d < D; d += ATTN_THREADS) {
        float num = 0.f, den = 0.f;
#pragma unroll 4
        for (int s = 0; s < nsplit; s++) {
            float L = ml[2 * s + 1];
            if (L > 0.f) {
                float f = expf(ml[2 * s] - M2);
                num += __ldcg(po + (long)s * D + d) * f;
                den += L * f;
            }
        }
        out[d] = f2bf(num / den);
    }
}
// One pass of the online softmax over cnt ≤ ATTN_THREADS keys, thread t holding key t's
// scaled score sc (-INF past cnt): updates the running max mx and sum l, leaves p[t] =
// e^(sc - max) for the value pass, and returns the factor the value sums are rescaled by.
// Shared by GQA and MLA attention, so both reduce in the same order.
__device__ __forceinline__ float softmax_pass(float sc, int cnt, float* p, float& mx, float& l) {
    int tid = threadIdx.x;
    float mn = fmaxf(mx, block_max(sc));
    float pe = tid < cnt ? expf(sc - mn) : 0.f;
    float ps = block_sum(pe), f = expf(mx - mn);
    p[tid] = pe;
    __syncthreads();
    l = l * f + ps;
    mx = mn;
    return f;
}

// The end of split `split` of (token, head) mh: its unnormalised value sums acc (thread t
// holds columns t, t + ATTN_THREADS, ... of W) and (max, sum) go to the partials; the block
// that finishes last for mh merges every split into bf16 out[mh, W].
template <int NACC>
__device__ __forceinline__ void finish_split(const float (&acc)[NACC], int W, float mx, float l, float* part_o,
                                             float* part_ml, int* tickets, int mh, int split, int nsplit, bf16* out) {
    int tid = threadIdx.x;
    long slot = (long)mh * nsplit + split;
#pragma unroll
    for (int i = 0; i < NACC; i++) {
        int d = tid + i * ATTN_THREADS;
        if (d < W) part_o[slot * W + d] = acc[i];
    }
    if (tid == 0) { part_ml[slot * 2] = mx; part_ml[slot * 2 + 1] = l; }
    if (!last_to_finish(tickets + mh, nsplit)) return;
    merge_splits(part_o + (long)mh * nsplit * W, part_ml + (long)mh * nsplit * 2, nsplit, W, out + (long)mh * W);
}

extern "C" __global__ void attention(const AttentionArgs a) {
    pdl_entry();
    const int nh = a.nh, nkv = a.nkv, D = a.d, nsplit = a.nsplit;
    const float scale = a.scale;
    __shared__ float qs[MAXD];
    __shared__ float p[ATTN_THREADS];
    int mh = blockIdx.x, split = blockIdx.y, m = mh / nh, h = mh % nh;
    int kvh = h / (nh / nkv), tid = threadIdx.x;
    // Row m's own sequence: its cache rows start at base[m].
    const long seq = (long)a.base[m] * nkv * D;
    const bf16 *q = a.q, *kc = a.kc + seq, *vc = a.vc + seq;
    int n_keys = a.pos[m] + 1, chunk = (n_keys + nsplit - 1) / nsplit;
    int s0 = split * chunk, s1 = min(s0 + chunk, n_keys);
    for (int d = tid; d < D; d += ATTN_THREADS) qs[d] = bf2f(q[(long)mh * D + d]);
    __syncthreads();
    float mx = -INFINITY, l = 0.f, acc[MAXD / ATTN_THREADS] = {0.f, 0.f};
    for (int base = s0; base < s1; base += ATTN_THREADS) {
        int s = base + tid, cnt = min(ATTN_THREADS, s1 - base);
        float sc = -INFINITY;
        if (tid < cnt) {
            const uint4* kr = (const uint4*)(kc + ((long)s * nkv + kvh) * D);
            float dot = 0.f;
#pragma unroll 8
            for (int c = 0; c < D / 8; c++) {
                float kf[8];
                unpack8(kr[c], kf);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += qs[c * 8 + i] * kf[i];
            }
            sc = dot * scale;
        }
        float f = softmax_pass(sc, cnt, p, mx, l);
#pragma unroll
        for (int i = 0; i < MAXD / ATTN_THREADS; i++) {
            int d = tid + i * ATTN_THREADS;
            if (d < D) {
                const bf16* vr = vc + ((long)base * nkv + kvh) * D + d;
                float o = 0.f;
#pragma unroll 8
                for (int j = 0; j < cnt; j++) o += p[j] * bf2f(vr[(long)j * nkv * D]);
                acc[i] = acc[i] * f + o;
            }
        }
        __syncthreads();
    }
    finish_split(acc, D, mx, l, a.part_o, a.part_ml, a.tickets, mh, split, nsplit, a.out);
}


// Causal GQA attention of a prompt chunk on tensor cores (flash-attention style; prompt
// chunks of long prompts, see gemm.cu): the chunk's M rows are one
// sequence's consecutive positions pos[0] .. pos[0] + M − 1 (cache rows from base[0]). Block
// (x, h) takes queries x·64 .. of head h, a warp 16 of them; keys stream through shared
// memory 32 at a time (K row-major, V transposed), S = q·kᵀ and O += P·V by mma.sync
// m16n8k16 (bf16 in, f32 accumulate; P rounded to bf16), online softmax per query in f32.
// Sums run in another order than the split-KV kernel's: within bf16 tolerance of decode,
// not bit-identical (tests/gpu.rs). D ∈ {64, 128}.
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
    const int p0 = a.pos[0];
    const long seq = (long)a.base[0] * nkv * D;
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
    for (int k0 = 0; k0 < nkeys; k0 += FA_BK) {
        __syncthreads();
        // K row-major: a warp stores consecutive 16-byte pieces of a few key rows.
        for (int i = tid; i < FA_BK * D / 8; i += blockDim.x) {
            int r = i / (D / 8), c = i % (D / 8);
            uint4 kv = make_uint4(0, 0, 0, 0);
            if (k0 + r < nkeys) kv = ((const uint4*)(a.kc + seq + ((long)(k0 + r) * nkv + kvh) * D))[c];
            *(uint4*)&ks[r][c * 8] = kv;
        }
        // V transposed: a warp takes one 8-dimension piece of all 32 keys, so each of its 8
        // element stores writes 32 consecutive keys of one vt row (no bank conflicts).
        for (int i = tid; i < FA_BK * D / 8; i += blockDim.x) {
            int r = i % FA_BK, c = i / FA_BK;
            uint4 vv = make_uint4(0, 0, 0, 0);
            if (k0 + r < nkeys) vv = ((const uint4*)(a.vc + seq + ((long)(k0 + r) * nkv + kvh) * D))[c];
            const bf16* ve = (const bf16*)&vv;
#pragma unroll
            for (int j = 0; j < 8; j++) vt[c * 8 + j][r] = ve[j];
        }
        __syncthreads();
        if (k0 >= wkeys) continue;  // every query of this warp is before this tile
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
        // Scale and causal mask: query row qw + g (+8) sits at position p0 + row.
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int qpos = p0 + qw + g + r * 8;
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < FA_BK / 8; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    int key = k0 + n * 8 + 2 * t4 + c;
                    float v = key <= qpos ? s[n][2 * r + c] * a.scale : -INFINITY;
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
        const float inv = 1.f / lrow[r];
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
