// gather_qmm_swiglu t1_split_k — NUMERICS-CHANGING: SPLIT warps share one (slot, row); warp
// s takes the 16-byte chunks s·32 + lane, s·32 + lane + 32·SPLIT, ... and the SPLIT partial
// sums are added in shared memory (more warps in flight per row, a different summation
// order). RPB rows per block. Grid (ceil(I / RPB), M·K).
constexpr int RPB = {{RPB}}, SPLIT = {{SPLIT}};

// affine_partial_pair (common.cuh) with the chunk stride as a parameter: thread t of nt
// takes chunks t, t + nt, ...
template <int BITS>
__device__ __forceinline__ void pair_partial_strided(const QMat& A, const QMat& B, long r, int K, const bf16* x, int t,
                                                     int nt, float* acc_a, float* acc_b) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    constexpr int PF = 4;
    const uint4* wa = (const uint4*)((const u32*)A.w + r * (long)(K / PER_WORD));
    const uint4* wb = (const uint4*)((const u32*)B.w + r * (long)(K / PER_WORD));
    const int gpr = K / A.group, nch = K / CODES;
    float sa = 0.f, sb = 0.f;
    for (int c0 = t; c0 < nch; c0 += nt * PF) {
        uint4 va[PF], vb[PF];
        float sca[PF], bia[PF], scb[PF], bib[PF];
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * nt;
            if (c < nch) {
                long gi = r * gpr + (c * CODES) / A.group;
                va[p] = wa[c];
                vb[p] = wb[c];
                sca[p] = bf2f(A.s[gi]);
                bia[p] = bf2f(A.b[gi]);
                scb[p] = bf2f(B.s[gi]);
                bib[p] = bf2f(B.b[gi]);
            }
        }
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * nt;
            if (c >= nch) continue;
            u32 da[4] = {va[p].x, va[p].y, va[p].z, va[p].w}, db[4] = {vb[p].x, vb[p].y, vb[p].z, vb[p].w};
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
            sa = chunk_acc(sa, sca[p], qa, bia[p], sx);
            sb = chunk_acc(sb, scb[p], qb, bib[p], sx);
        }
    }
    *acc_a = sa;
    *acc_b = sb;
}

extern "C" __global__ void __launch_bounds__(32 * RPB * SPLIT)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    __shared__ float part[RPB][SPLIT][2];
    int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int ri = wid / SPLIT, s = wid % SPLIT, q = blockIdx.y;
    long r = (long)blockIdx.x * RPB + ri;
    bool live = q < M * K && r < I;
    float ag = 0.f, au = 0.f;
    if (live) {
        QMat G = expert_slice(QMat{gw, gs, gb, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
        QMat U = expert_slice(QMat{uw, us, ub, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
        const bf16* xq = x + (long)(q / K) * H;
        if (bits == 4) pair_partial_strided<4>(G, U, r, H, xq, s * 32 + lane, 32 * SPLIT, &ag, &au);
        else pair_partial_strided<8>(G, U, r, H, xq, s * 32 + lane, 32 * SPLIT, &ag, &au);
    }
    ag = warp_sum(ag);
    au = warp_sum(au);
    if (lane == 0) {
        part[ri][s][0] = ag;
        part[ri][s][1] = au;
    }
    __syncthreads();
    if (live && s == 0 && lane == 0) {
        float g = 0.f, u = 0.f;
#pragma unroll
        for (int p = 0; p < SPLIT; p++) {
            g += part[ri][p][0];
            u += part[ri][p][1];
        }
        act[(long)q * I + r] = swiglu_elem(f2bf(g), f2bf(u));
    }
}
