// Multi-head latent attention (GLM-4.7-Flash, DeepSeek-V3): per-head absorbed projections,
// RoPE of the rope slices, the latent cache, attention over it, and the fused latent norm +
// RoPE + append (qk_norm_rope for MLA).

// Per-head mat-vecs with the heads' matrices stacked like experts (MLA's W_UKᵀ and W_UV):
// row q = m·nh + h of y [M·nh, N] = W[h] · x_q[0:K], where x_q = x + q·x_ld (the first K
// elements of a row wider than K: q_nope of a query head). Grid (ceil(N/4), nh); block h
// takes the tokens MT at a time, so prefill reads each head's matrix once per MT tokens.
// Both kernels give each row the same arithmetic (row_dot_partial), bit for bit.
extern "C" __global__ void head_matvec(const HeadMatvecArgs p) {
    pdl_entry();
    const int nh = p.nh, N = p.n, K = p.k, M = p.m;
    int h = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= N) return;
    QMat W = expert_slice(p.w.w, h, p.w.w_stride, p.w.sb_stride);
    for (int m0 = 0; m0 < M; m0 += 8) {
        int mt = min(8, M - m0);
        const bf16* xs[8];
#pragma unroll
        for (int m = 0; m < 8; m++) xs[m] = p.x + ((long)(m0 + min(m, mt - 1)) * nh + h) * p.x_ld;
        float acc[8];
        row_dot_partial<8>(W, r, K, xs, mt, lane, acc);
#pragma unroll
        for (int m = 0; m < 8; m++) {
            if (m < mt) {
                float v = warp_sum(acc[m]);
                if (lane == 0) p.y[((long)(m0 + m) * nh + h) * N + r] = f2bf(v);
            }
        }
    }
}

// The M = 1 (decode) instance: a row of G = p.lanes lanes (the power of two ≥ its 16-byte
// chunks), 32 / G rows a warp. Lane s of a group computes chunk s's partial
// (row_dot_partial<1> as lane s: one chunk a lane, as in the 32-lane kernel), and the group
// reduces in warp_sum's order: the levels it skips only added the +0.0 of lanes with no
// chunk, which the one + 0.0 reproduces (it turns a −0.0 into +0.0, as they did). So every
// row has the bits of head_matvec's.
extern "C" __global__ void head_matvec1(const HeadMatvecArgs p) {
    pdl_entry();
    const int G = p.lanes, N = p.n;
    int h = blockIdx.y, lane = threadIdx.x & 31, s = lane % G;
    long r = ((long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5)) * (WARP / G) + lane / G;
    QMat W = expert_slice(p.w.w, h, p.w.w_stride, p.w.sb_stride);
    const bf16* xs[1] = {p.x + (long)h * p.x_ld};
    float acc[1] = {0.f};
    if (r < N) row_dot_partial<1>(W, r, p.k, xs, 1, s, acc);
    float v = G < WARP ? __fadd_rn(acc[0], 0.f) : acc[0];
    for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (s == 0 && r < N) p.y[(long)h * N + r] = f2bf(v);
}

// RoPE in place (interleaved pairs (2i, 2i+1), or half-split (i, i + d_rot/2), rotated by
// inv_freq[i], cos/sin times `scaling`) on the rope slice of every query head —
// q[M, nh, dqk] at offset `nope` — and on the shared k_pe — kva[M, row] at offset `lat`.
// Grid M·(nh + 1), one pair per thread.
__device__ __forceinline__ void rope_slice(bf16* v, int d_rot, int p, const float* inv_freq, float scaling,
                                           int interleaved) {
    for (int i = threadIdx.x; i < d_rot / 2; i += blockDim.x) {
        float sn, cs;
        sincosf((float)p * inv_freq[i], &sn, &cs);
        cs *= scaling;
        sn *= scaling;
        int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + d_rot / 2;
        float a = bf2f(v[ia]), b = bf2f(v[ib]);
        v[ia] = f2bf(a * cs - b * sn);
        v[ib] = f2bf(b * cs + a * sn);
    }
}

extern "C" __global__ void mla_rope(const MlaRopeArgs p) {
    pdl_entry();
    const MlaDims& d = p.dims;
    int m = blockIdx.x / (d.nh + 1), h = blockIdx.x % (d.nh + 1);
    bf16* v = h < d.nh ? p.q + ((long)m * d.nh + h) * d.dqk + d.nope : p.kva + (long)m * d.row + d.lat;
    rope_slice(v, d.d_rot, p.pos[m], p.inv_freq, d.scaling, d.interleaved);
}

// Append M rows x[M, W] to MLA's latent cache, row m at cache row base[m] + pos[m].
extern "C" __global__ void cache_append(const CacheAppendArgs p) {
    pdl_entry();
    long dst = ((long)p.base[blockIdx.x] + p.pos[blockIdx.x]) * p.w, src = (long)blockIdx.x * p.w;
    for (int i = threadIdx.x; i < p.w; i += blockDim.x) p.cache[dst + i] = p.x[src + i];
}

// Split-KV causal attention over the latent cache (one KV row per position, shared by all
// heads): for query (m, h), score_s = (qlat[m,h]·c_s + q_pe[m,h]·k_pe_s) · scale with
// cache row s = [c_s (L) | k_pe_s (R)], and out[m,h] = Σ_s p_s c_s (L wide).
// Every head reads the same cache rows, so a block serves MLA_HG heads (a warp each) of one
// token: grid (M·ceil(nh / MLA_HG), nsplit), ATTN_THREADS threads. Split s takes the s-th of
// nsplit equal runs of the token's keys (the run length follows the position at run time,
// so a captured graph stays right as the context grows) and streams them through shared
// memory MLA_KC rows at a time — each row is read from memory once per block, not once per
// head. Per tile, lane j of a warp scores key j (a 576-wide dot product out of shared
// memory), the warp takes max and sum (online softmax, f32), then lane l accumulates latent
// dims 8·(l + 32·i) .. +8 of Σ p·c in key order. The block that finishes a (token, head
// group) last merges the splits of its heads (a warp per head, merge_splits_warp).
// L ≤ MLA_MAXL, R ≤ MLA_MAXR, both multiples of 8; nsplit ≤ 32.
// MLA_MAXL, MLA_MAXR, MLA_HG and ATTN_THREADS come from the prelude (src/cuda/ops/mod.rs).
#define MLA_KC 32                            // keys per shared-memory tile (a lane each)
#define MLA_ROWP (MLA_MAXL + MLA_MAXR + 8)   // tile row stride: 1168 B, conflict-free 16-byte reads
#define MLA_NV (MLA_MAXL / 8 / 32)           // 8-dim value chunks per lane
#define MLA_LPT ((MLA_KC * (MLA_MAXL + MLA_MAXR) / 8 + ATTN_THREADS - 1) / ATTN_THREADS)
extern "C" __global__ void mla_attention(const MlaAttentionArgs a) {
    pdl_entry();
    const int nh = a.nh, L = a.l, R = a.r, row = L + R, rc = row / 8, nsplit = a.nsplit;
    const int groups = (nh + MLA_HG - 1) / MLA_HG, m = blockIdx.x / groups, g = blockIdx.x % groups;
    const int split = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, h = g * MLA_HG + warp;
    const bool live = h < nh;  // the last group's spare warps load tiles and wait at barriers
    const long mh = (long)m * nh + h;
    __shared__ __align__(16) bf16 ks[MLA_KC * MLA_ROWP];        // [key][dim] of this tile
    __shared__ __align__(16) float qs[MLA_HG][MLA_MAXL + MLA_MAXR];  // [head][qlat | q_pe]
    // Token m's own sequence: its cache rows start at base[m].
    const bf16* cache = a.cache + (long)a.base[m] * row;
    int n_keys = a.pos[m] + 1, chunk = (n_keys + nsplit - 1) / nsplit;
    int s0 = min(split * chunk, n_keys), s1 = min(s0 + chunk, n_keys);
    if (live) {
        for (int d = lane; d < L; d += 32) qs[warp][d] = bf2f(a.qlat[mh * L + d]);
        for (int d = lane; d < R; d += 32) qs[warp][L + d] = bf2f(a.q[mh * a.dqk + a.nope + d]);
    }
    float mx = -INFINITY, l = 0.f, acc[MLA_NV][8];
#pragma unroll
    for (int i = 0; i < MLA_NV; i++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] = 0.f;
    for (int k0 = s0; k0 < s1; k0 += MLA_KC) {
        const int cnt = min(MLA_KC, s1 - k0), n16 = cnt * rc;
        // The tile's rows, 16 bytes a load, every load of a thread in flight before any store.
        uint4 r[MLA_LPT];
#pragma unroll
        for (int t = 0; t < MLA_LPT; t++) {
            int i = threadIdx.x + t * ATTN_THREADS;
            if (i < n16) r[t] = __ldg((const uint4*)(cache + (long)(k0 + i / rc) * row) + i % rc);
        }
        __syncthreads();  // the previous tile is consumed (and qs written, on the first)
#pragma unroll
        for (int t = 0; t < MLA_LPT; t++) {
            int i = threadIdx.x + t * ATTN_THREADS;
            if (i < n16) *(uint4*)(ks + (i / rc) * MLA_ROWP + (i % rc) * 8) = r[t];
        }
        __syncthreads();
        if (live) {
            float sc = -INFINITY;
            if (lane < cnt) {
                const uint4* kr = (const uint4*)(ks + lane * MLA_ROWP);
                const float4* qv = (const float4*)qs[warp];
                float dot = 0.f;
                for (int c = 0; c < rc; c++) {
                    float kf[8];
                    unpack8(kr[c], kf);
                    float4 qa = qv[2 * c], qb = qv[2 * c + 1];
                    dot += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                           qb.z * kf[6] + qb.w * kf[7];
                }
                sc = dot * a.scale;
            }
            float mn = fmaxf(mx, warp_max(sc));
            float pe = lane < cnt ? expf(sc - mn) : 0.f, f = expf(mx - mn);
            l = l * f + warp_sum(pe);
            mx = mn;
#pragma unroll
            for (int i = 0; i < MLA_NV; i++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][e] *= f;
            for (int j = 0; j < cnt; j++) {
                float pj = __shfl_sync(0xffffffffu, pe, j);  // every lane: no shuffle in a branch
#pragma unroll
                for (int i = 0; i < MLA_NV; i++) {
                    int c = lane + 32 * i;
                    if (c * 8 < L) {
                        float vf[8];
                        unpack8(*(const uint4*)(ks + j * MLA_ROWP + c * 8), vf);
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[i][e] += pj * vf[e];
                    }
                }
            }
        }
    }
    // This split's unnormalised sums and (max, sum) to the partials of (m, h).
    if (live) {
        long slot = mh * nsplit + split;
#pragma unroll
        for (int i = 0; i < MLA_NV; i++) {
            int c = lane + 32 * i;
            if (c * 8 < L) {
                float4* po = (float4*)(a.part_o + slot * L + c * 8);
                po[0] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
                po[1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
            }
        }
        if (lane == 0) { a.part_ml[slot * 2] = mx; a.part_ml[slot * 2 + 1] = l; }
    }
    if (!last_to_finish(a.tickets + (long)m * nh + g * MLA_HG, nsplit) || !live) return;
    merge_splits_warp(a.part_o + mh * nsplit * L, a.part_ml + mh * nsplit * 2, nsplit, L, -INFINITY, a.out + mh * L);
}

// MLA attention on tensor cores (absorbed form). Every head reads the same latent cache rows,
// so heads are rows of one query matrix: query row [qlat (512) | q_pe (64)] against key rows
// [c (512) | k_pe (64)], values c — MQA with 576-wide keys. A block takes 32 query rows, 8
// warps; keys stream through shared memory 16 at a time and serve all 32 rows.
//   S = Q·Kᵀ: warp (kg = w % 4, kn = w / 4) computes the 32 rows × keys kn·8 .. +8 over the
//   k-steps kg·9 .. +9 of 36 (its Q fragments stay in registers, 72 of them); the four k-group
//   partials are added in a fixed order (0 + 1 + 2 + 3).
//   Online softmax in f32, a row per 8 lanes; P rounded to bf16 for the product.
//   O += P·V: warp w owns latent dims w·64 .. +64 of all 32 rows (64 f32 registers).
// Used for a long prompt's chunks (mla_attention_tc); decode and batches keep the split
// CUDA-core kernel mla_attention (a tensor-core split version measured 2× slower at batch 1:
// bench/RESULTS.md, session 7). Sums run in another order than mla_attention's: within bf16
// tolerance of decode, not bit-identical (tests/gpu.rs). L = 512 and R = 64 only
// (mla::tc_supports).
#define MT_BQ 32
#define MT_BK 16
#define MT_L 512
#define MT_ROW 576
struct MlaTcSmem {
    __align__(16) bf16 ks[MT_BK][MT_ROW + 8];
    __align__(16) float sp[4][MT_BQ][MT_BK];
    __align__(16) bf16 ps[MT_BQ][MT_BK + 8];
    float mrow[MT_BQ], lrow[MT_BQ], frow[MT_BQ];
};

// The tile's 32 query rows (tile row i is query row qrow(i), clamped to a real row) against the
// keys [k0, k1) of `cache` (the sequence's first cache row), row i seeing keys ≤ vis(i). Key
// tiles start at k0 and every row visits the same tiles, so a row's numbers do not depend on
// the other rows of its tile (a tile past a row's last key rescales by exactly 1 and adds 0).
// Leaves this warp's unnormalised O in o and each row's running max and sum in sm.mrow/lrow.
template <typename QRow, typename Vis>
__device__ __forceinline__ void mla_tc_rows(const bf16* qlat, const bf16* q, int dqk, int nope, const bf16* cache,
                                            float scale, int k0, int k1, QRow qrow, Vis vis, MlaTcSmem& sm,
                                            float o[2][8][4]) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int kg = warp & 3, kn = warp >> 2;
    // Q fragments of k-group kg: rows mt·16 + g (+8); k-steps below 512 read qlat, the rest
    // q's rope slice.
    u32 qf[2][9][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        const long r0 = qrow(mt * 16 + g), r1 = qrow(mt * 16 + g + 8);
#pragma unroll
        for (int j = 0; j < 9; j++) {
            const int k = (kg * 9 + j) * 16;
            const bf16* s0 = k < MT_L ? qlat + r0 * MT_L + k : q + r0 * dqk + nope + (k - MT_L);
            const bf16* s1 = k < MT_L ? qlat + r1 * MT_L + k : q + r1 * dqk + nope + (k - MT_L);
            qf[mt][j][0] = *(const u32*)(s0 + 2 * t4);
            qf[mt][j][1] = *(const u32*)(s1 + 2 * t4);
            qf[mt][j][2] = *(const u32*)(s0 + 2 * t4 + 8);
            qf[mt][j][3] = *(const u32*)(s1 + 2 * t4 + 8);
        }
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n = 0; n < 8; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    if (tid < MT_BQ) { sm.mrow[tid] = -INFINITY; sm.lrow[tid] = 0.f; }
    // The softmax thread's row and key pair.
    const int srow = tid >> 3, sj = (tid & 7) * 2;
    const int svis = vis(srow);
    for (int kt = k0; kt < k1; kt += MT_BK) {
        __syncthreads();  // the previous tile's P·V is done with ks and ps
        for (int i = tid; i < MT_BK * (MT_ROW / 8); i += blockDim.x) {
            const int r = i / (MT_ROW / 8), c = i % (MT_ROW / 8);
            uint4 kv = make_uint4(0, 0, 0, 0);
            if (kt + r < k1) kv = ((const uint4*)(cache + (long)(kt + r) * MT_ROW))[c];
            *(uint4*)&sm.ks[r][c * 8] = kv;
        }
        __syncthreads();
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int j = 0; j < 9; j++) {
            const int k = (kg * 9 + j) * 16;
            const u32 b[2] = {*(const u32*)&sm.ks[kn * 8 + g][k + 2 * t4],
                              *(const u32*)&sm.ks[kn * 8 + g][k + 2 * t4 + 8]};
            mma_bf16_16816(s[0], qf[0][j], b);
            mma_bf16_16816(s[1], qf[1][j], b);
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            *(float2*)&sm.sp[kg][mt * 16 + g][kn * 8 + 2 * t4] = make_float2(s[mt][0], s[mt][1]);
            *(float2*)&sm.sp[kg][mt * 16 + g + 8][kn * 8 + 2 * t4] = make_float2(s[mt][2], s[mt][3]);
        }
        __syncthreads();
        {
            float v[2];
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const float x = ((sm.sp[0][srow][sj + c] + sm.sp[1][srow][sj + c]) + sm.sp[2][srow][sj + c]) +
                                sm.sp[3][srow][sj + c];
                const int key = kt + sj + c;
                v[c] = key <= svis && key < k1 ? x * scale : -INFINITY;
            }
            float mx = fmaxf(v[0], v[1]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            const float mold = sm.mrow[srow], mnew = fmaxf(mold, mx);
            // No key seen yet for this row (mnew = -inf): nothing to rescale, p = 0.
            const float f = mnew == -INFINITY ? 1.f : expf(mold - mnew);
            const float pa = mnew == -INFINITY ? 0.f : expf(v[0] - mnew);
            const float pb = mnew == -INFINITY ? 0.f : expf(v[1] - mnew);
            float sum = pa + pb;
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            *(u32*)&sm.ps[srow][sj] = pack_bf16x2(pa, pb);
            __syncwarp();
            if ((tid & 7) == 0) {
                sm.mrow[srow] = mnew;
                sm.lrow[srow] = sm.lrow[srow] * f + sum;
                sm.frow[srow] = f;
            }
        }
        __syncthreads();
        u32 pf[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            const int ra = mt * 16 + g, rb = ra + 8;
            const float fa = sm.frow[ra], fb = sm.frow[rb];
#pragma unroll
            for (int n = 0; n < 8; n++) o[mt][n][0] *= fa, o[mt][n][1] *= fa, o[mt][n][2] *= fb, o[mt][n][3] *= fb;
            pf[mt][0] = *(const u32*)&sm.ps[ra][2 * t4];
            pf[mt][1] = *(const u32*)&sm.ps[rb][2 * t4];
            pf[mt][2] = *(const u32*)&sm.ps[ra][2 * t4 + 8];
            pf[mt][3] = *(const u32*)&sm.ps[rb][2 * t4 + 8];
        }
        // V = the latent part of the key rows; B[k = key][n = dim] pairs of consecutive keys.
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const int dim = warp * 64 + n * 8 + g;
            const u32 b[2] = {(u32)sm.ks[2 * t4][dim] | ((u32)sm.ks[2 * t4 + 1][dim] << 16),
                              (u32)sm.ks[2 * t4 + 8][dim] | ((u32)sm.ks[2 * t4 + 9][dim] << 16)};
            mma_bf16_16816(o[0][n], pf[0], b);
            mma_bf16_16816(o[1][n], pf[1], b);
        }
    }
    __syncthreads();  // mrow / lrow of the last tile are visible to every thread
}

// Calls f(i, dim, lo, hi) for this lane's accumulator pairs of mla_tc_rows: tile row i,
// latent dims dim and dim + 1.
template <typename F>
__device__ __forceinline__ void mla_tc_for_each_pair(const float o[2][8][4], F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++)
#pragma unroll
            for (int n = 0; n < 8; n++) f(mt * 16 + g + r * 8, warp * 64 + n * 8 + 2 * t4, o[mt][n][2 * r], o[mt][n][2 * r + 1]);
}

// A long prompt's chunk: its M tokens are one sequence's consecutive positions pos[0] ..
// (cache rows from base[0]); tile rows are the flattened (token, head) rows r = m·nh + h, 32
// a block (about two tokens × GLM's 20 heads), causal per token.
extern "C" __global__ void mla_attention_tc(const MlaFlashArgs a) {
    pdl_entry();
    __shared__ MlaTcSmem sm;
    // The last rows (the most keys) first, so the longest blocks are not the last wave.
    const int nh = a.nh, total = a.m * nh, q0 = (gridDim.x - 1 - blockIdx.x) * MT_BQ;
    const int p0 = a.pos[0];
    // Keys any row of the block sees: through the position of its last row's token.
    const int nkeys = p0 + (min(q0 + MT_BQ, total) - 1) / nh + 1;
    auto qrow = [&](int i) { return min(q0 + i, total - 1); };
    auto vis = [&](int i) { return p0 + qrow(i) / nh; };
    float o[2][8][4];
    mla_tc_rows(a.qlat, a.q, a.dqk, a.nope, a.cache + (long)a.base[0] * MT_ROW, a.scale, 0, nkeys, qrow, vis, sm, o);
    mla_tc_for_each_pair(o, [&](int i, int dim, float lo, float hi) {
        if (q0 + i < total) {
            const float inv = 1.f / sm.lrow[i];
            *(u32*)(a.out + (long)(q0 + i) * MT_L + dim) = pack_bf16x2(lo * inv, hi * inv);
        }
    });
}

// qk_norm_rope for MLA: per (token, head) block of 256 threads (as the rmsnorm launch):
// query heads get RoPE on their rope slice; block nh normalises the latent of the Kva row in
// place, ropes k_pe and appends the row to the latent cache (= rmsnorm + mla_rope +
// cache_append). Grid M·(nh + 1).
extern "C" __global__ void latent_norm_rope_append(const LatentNormRopeAppendArgs a) {
    pdl_entry();
    const MlaDims& d = a.dims;
    int m = blockIdx.x / (d.nh + 1), h = blockIdx.x % (d.nh + 1), p = a.pos[m];
    if (h < d.nh) {
        rope_slice(a.q + ((long)m * d.nh + h) * d.dqk + d.nope, d.d_rot, p, a.inv_freq, d.scaling, d.interleaved);
        return;
    }
    bf16* v = a.kva + (long)m * d.row;
    rmsnorm_row(v, a.nw, v, d.lat, a.eps);
    __syncthreads();
    rope_slice(v + d.lat, d.d_rot, p, a.inv_freq, d.scaling, d.interleaved);
    __syncthreads();
    for (int i = threadIdx.x; i < d.row; i += blockDim.x) a.cache[((long)a.base[m] + p) * d.row + i] = v[i];
}
