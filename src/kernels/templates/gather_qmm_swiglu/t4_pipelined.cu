// gather_qmm_swiglu t4_pipelined — the production arithmetic (affine_partial_pair's chunks,
// order and roundings, so bit-identical) with the loads of a warp's next row in flight while
// it computes the current one. A production warp loads one gate/up row pair, waits a full
// memory round trip, computes, and leaves: inside a warp nothing overlaps. Here a warp owns
// RPW row pairs of one slot (rows w, w + W, ..., W = warps in the grid's x dimension) and
// double-buffers them in registers. NCH = chunks a lane holds per row (K·bits/128 ≤ 32·NCH).
// Grid (ceil(I / (WPB·RPW)), M·K).
constexpr int RPW = {{RPW}}, WPB = {{WPB}}, NCH = {{NCH}};

// One row pair's loads for one lane: chunks lane, lane + 32, ... (< 32·NCH) and their scales.
struct PairRow {
    uint4 a[NCH], b[NCH];
    float sa[NCH], ba[NCH], sb[NCH], bb[NCH];
};

template <int BITS>
__device__ __forceinline__ void pair_load(const QMat& A, const QMat& B, long r, int K, int lane, PairRow& f) {
    constexpr int CODES = 128 / BITS, PER_WORD = 32 / BITS;
    const uint4* wa = (const uint4*)((const u32*)A.w + r * (long)(K / PER_WORD));
    const uint4* wb = (const uint4*)((const u32*)B.w + r * (long)(K / PER_WORD));
    const int gpr = K / A.group, nch = K / CODES;
#pragma unroll
    for (int p = 0; p < NCH; p++) {
        int c = lane + p * WARP;
        if (c < nch) {
            long gi = r * gpr + (c * CODES) / A.group;
            f.a[p] = wa[c];
            f.b[p] = wb[c];
            f.sa[p] = bf2f(A.s[gi]);
            f.ba[p] = bf2f(A.b[gi]);
            f.sb[p] = bf2f(B.s[gi]);
            f.bb[p] = bf2f(B.b[gi]);
        }
    }
}

// affine_partial_pair's arithmetic on loaded chunks (the same products, sums and order).
template <int BITS>
__device__ __forceinline__ void pair_compute(const PairRow& f, int K, const bf16* x, int lane, float* acc_a,
                                             float* acc_b) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    const int nch = K / CODES;
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int p = 0; p < NCH; p++) {
        int c = lane + p * WARP;
        if (c >= nch) continue;
        u32 da[4] = {f.a[p].x, f.a[p].y, f.a[p].z, f.a[p].w}, db[4] = {f.b[p].x, f.b[p].y, f.b[p].z, f.b[p].w};
        const uint4* xr = (const uint4*)x + c * XV;
        float qa = 0.f, qb = 0.f, sx = 0.f;
#pragma unroll
        for (int j = 0; j < XV; j++) {
            float xf[8];
            unpack8(xr[j], xf);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int e = j * 8 + i;
                u32 sh = BITS * (e % PER_WORD);
                qa = __fmaf_rn(code_to_float((da[e / PER_WORD] >> sh) & MASK), xf[i], qa);
                qb = __fmaf_rn(code_to_float((db[e / PER_WORD] >> sh) & MASK), xf[i], qb);
                sx += xf[i];
            }
        }
        sa = chunk_acc(sa, f.sa[p], qa, f.ba[p], sx);
        sb = chunk_acc(sb, f.sb[p], qb, f.bb[p], sx);
    }
    *acc_a = sa;
    *acc_b = sb;
}

template <int BITS>
__device__ __forceinline__ void pipelined_rows(const QMat& G, const QMat& U, long r0, long stride, int I, int H,
                                               const bf16* x, bf16* act, int lane) {
    PairRow buf[2];
    if (r0 < I) pair_load<BITS>(G, U, r0, H, lane, buf[0]);
#pragma unroll
    for (int i = 0; i < RPW; i++) {
        long r = r0 + i * stride, rn = r + stride;
        if (r >= I) break;
        if (i + 1 < RPW && rn < I) pair_load<BITS>(G, U, rn, H, lane, buf[(i + 1) & 1]);
        float ag, au;
        pair_compute<BITS>(buf[i & 1], H, x, lane, &ag, &au);
        bf16 a = swiglu_elem(f2bf(warp_sum(ag)), f2bf(warp_sum(au)));
        if (lane == 0) act[r] = a;
    }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    const int q = blockIdx.y, lane = threadIdx.x & 31;
    if (q >= M * K) return;
    const long stride = (long)gridDim.x * WPB, r0 = (long)blockIdx.x * WPB + (threadIdx.x >> 5);
    QMat G = expert_slice(QMat{gw, gs, gb, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    QMat U = expert_slice(QMat{uw, us, ub, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    const bf16* xq = x + (long)(q / K) * H;
    bf16* aq = act + (long)q * I;
    if (bits == 4) pipelined_rows<4>(G, U, r0, stride, I, H, xq, aq, lane);
    else pipelined_rows<8>(G, U, r0, stride, I, H, xq, aq, lane);
}
