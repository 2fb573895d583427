// gather_qmm_swiglu t3_row_pairs — RPW (gate, up) row pairs per warp: each 16-byte chunk
// of x is loaded, unpacked and summed (Σx) once for 2·RPW rows (production: once for 2),
// and every weight, scale and bias load of a pass (2 chunks a lane for each row) is in
// flight before the first is used. Per row the sums run exactly as in affine_partial_pair
// (chunks ascending per lane, elements ascending, the same fmaf chain and chunk_acc), so it
// is bit-identical to production. Grid (ceil(I / (RPW·WPB)), M·K), 32·WPB threads.
constexpr int RPW = {{RPW}}, WPB = {{WPB}};

template <int BITS>
__device__ __forceinline__ void row_pairs_partial(const QMat& A, const QMat& B, long r0, int nr, int K, const bf16* x,
                                                  int lane, float* sa, float* sb) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS, PF = 2;
    constexpr u32 MASK = (1u << BITS) - 1u;
    const long row_u32 = K / PER_WORD;
    const int gpr = K / A.group, nch = K / CODES;
#pragma unroll
    for (int j = 0; j < RPW; j++) sa[j] = sb[j] = 0.f;
    for (int c0 = lane; c0 < nch; c0 += WARP * PF) {
        uint4 va[PF][RPW], vb[PF][RPW];
        float sca[PF][RPW], bia[PF][RPW], scb[PF][RPW], bib[PF][RPW];
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
#pragma unroll
            for (int j = 0; j < RPW; j++) {
                if (c < nch && j < nr) {
                    long r = r0 + j, gi = r * gpr + (c * CODES) / A.group;
                    va[p][j] = ((const uint4*)((const u32*)A.w + r * row_u32))[c];
                    vb[p][j] = ((const uint4*)((const u32*)B.w + r * row_u32))[c];
                    sca[p][j] = bf2f(A.s[gi]);
                    bia[p][j] = bf2f(A.b[gi]);
                    scb[p][j] = bf2f(B.s[gi]);
                    bib[p][j] = bf2f(B.b[gi]);
                }
            }
        }
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c >= nch) continue;
            const uint4* xr = (const uint4*)x + c * XV;
            float qa[RPW], qb[RPW], sx = 0.f;
#pragma unroll
            for (int j = 0; j < RPW; j++) qa[j] = qb[j] = 0.f;
#pragma unroll
            for (int jx = 0; jx < XV; jx++) {
                float xf[8];
                unpack8(xr[jx], xf);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    int e = jx * 8 + i;
                    u32 sh = BITS * (e % PER_WORD);
#pragma unroll
                    for (int j = 0; j < RPW; j++) {
                        u32 wa = e / PER_WORD == 0 ? va[p][j].x : e / PER_WORD == 1 ? va[p][j].y : e / PER_WORD == 2 ? va[p][j].z : va[p][j].w;
                        u32 wb = e / PER_WORD == 0 ? vb[p][j].x : e / PER_WORD == 1 ? vb[p][j].y : e / PER_WORD == 2 ? vb[p][j].z : vb[p][j].w;
                        qa[j] = __fmaf_rn(code_to_float((wa >> sh) & MASK), xf[i], qa[j]);
                        qb[j] = __fmaf_rn(code_to_float((wb >> sh) & MASK), xf[i], qb[j]);
                    }
                    sx += xf[i];
                }
            }
#pragma unroll
            for (int j = 0; j < RPW; j++) {
                if (j < nr) {
                    sa[j] = chunk_acc(sa[j], sca[p][j], qa[j], bia[p][j], sx);
                    sb[j] = chunk_acc(sb[j], scb[p][j], qb[j], bib[p][j], sx);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r0 = ((long)blockIdx.x * WPB + (threadIdx.x >> 5)) * RPW;
    if (q >= M * K || r0 >= I) return;
    int nr = (int)min((long)RPW, (long)I - r0);
    QMat G = expert_slice(QMat{gw, gs, gb, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    QMat U = expert_slice(QMat{uw, us, ub, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    const bf16* xt = x + (long)(q / K) * H;
    float sg[RPW], su[RPW];
    if (bits == 4) row_pairs_partial<4>(G, U, r0, nr, H, xt, lane, sg, su);
    else row_pairs_partial<8>(G, U, r0, nr, H, xt, lane, sg, su);
#pragma unroll
    for (int j = 0; j < RPW; j++) {
        if (j < nr) {
            bf16 a = swiglu_elem(f2bf(warp_sum(sg[j])), f2bf(warp_sum(su[j])));
            if (lane == 0) act[(long)q * I + r0 + j] = a;
        }
    }
}
