// gather_qmm_swiglu t3_mma — NUMERICS-CHANGING: the gate and up sums Σ q·x of each 64-code
// block on tensor cores (mma m16n8k16, bf16 in, f32 out), MLX affine 4-bit weights in their
// stored layout. A warp owns 16 rows of one slot's expert: lane (g, t) = (lane / 4, lane % 4)
// loads codes 16t .. 16t+15 of rows g and g+8 of each 64-code block (8 bytes a row), turns
// nibble pairs into exact bf16 integers in registers (OR into the exponent of 128, minus 128),
// and x is permuted the same way into the B fragment (every column = the slot's token, so
// column order is irrelevant). Per block: acc = acc + (sc·Σqx + bi·Σx) as chunk_acc, Σx in a
// fixed order. SPLIT warps share a tile (the blocks b ≡ s mod SPLIT each), their partials
// added in order in shared memory; a ring of PF blocks of loads in flight a warp (each slot
// refilled as soon as its block is computed). TILES tiles a block.
// Needs 4-bit codes, group % 64 == 0, I % 16 == 0. Grid (ceil(I / (16·TILES)), M·K).
constexpr int TILES = {{TILES}}, SPLIT = {{SPLIT}}, PF = {{PF}};

// Nibbles s and s + 4 of w as a bf16 pair of exact integers 0..15 (low half: nibble s).
__device__ __forceinline__ u32 q4_pair(u32 w, int s) {
    u32 v = ((w >> (4 * s)) & 0x000F000Fu) | 0x43004300u, r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(0xC300C300u));
    return r;
}

extern "C" __global__ void __launch_bounds__(32 * TILES * SPLIT)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    __shared__ float part[TILES][SPLIT][4][8];
    const int wid = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int tile = wid / SPLIT, s = wid % SPLIT, q = blockIdx.y;
    const long r0 = ((long)blockIdx.x * TILES + tile) * 16;
    const bool live = q < M * K && r0 < I;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // gate row g, gate row g+8, up row g, up row g+8
    if (live) {
        const long e = idx[q];
        const long wpr = H / 8, gpr = H / group;
        const u32* G0 = gw + e * w_stride + (r0 + g) * wpr;
        const u32* U0 = uw + e * w_stride + (r0 + g) * wpr;
        const long so = e * sb_stride + (r0 + g) * gpr;
        const bf16* xs = x + (long)(q / K) * H;
        const int nb = H / 64;
        // A ring of PF blocks in flight: block b's weights, x and scales land while the
        // blocks before it are computed; a slot is refilled with block b + SPLIT·PF as soon
        // as block b is done.
        uint2 wv[PF][4];
        uint4 xv[PF][2];
        bf16 sc[PF][8];
        auto load = [&](int p, int b) {
            wv[p][0] = ((const uint2*)(G0 + b * 8))[t];
            wv[p][1] = ((const uint2*)(G0 + 8 * wpr + b * 8))[t];
            wv[p][2] = ((const uint2*)(U0 + b * 8))[t];
            wv[p][3] = ((const uint2*)(U0 + 8 * wpr + b * 8))[t];
            xv[p][0] = ((const uint4*)(xs + b * 64 + 16 * t))[0];
            xv[p][1] = ((const uint4*)(xs + b * 64 + 16 * t))[1];
            const long gi = so + (long)b * 64 / group;
            sc[p][0] = gs[gi], sc[p][1] = gb[gi], sc[p][2] = gs[gi + 8 * gpr], sc[p][3] = gb[gi + 8 * gpr];
            sc[p][4] = us[gi], sc[p][5] = ub[gi], sc[p][6] = us[gi + 8 * gpr], sc[p][7] = ub[gi + 8 * gpr];
        };
#pragma unroll
        for (int p = 0; p < PF; p++)
            if (s + p * SPLIT < nb) load(p, s + p * SPLIT);
        for (int b0 = s; b0 < nb; b0 += SPLIT * PF) {
#pragma unroll
            for (int p = 0; p < PF; p++) {
                int b = b0 + p * SPLIT;
                if (b >= nb) continue;
                float cg[4] = {0.f, 0.f, 0.f, 0.f}, cu[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int wi = j >> 1, s0 = 2 * (j & 1);
                    const uint4 X = xv[p][wi];
                    const u32 xa = (j & 1) ? X.y : X.x, xb = (j & 1) ? X.w : X.z;
                    const u32 bf[2] = {__byte_perm(xa, xb, 0x5410), __byte_perm(xa, xb, 0x7632)};
                    const u32 g0 = wi ? wv[p][0].y : wv[p][0].x, g8 = wi ? wv[p][1].y : wv[p][1].x;
                    const u32 u0 = wi ? wv[p][2].y : wv[p][2].x, u8 = wi ? wv[p][3].y : wv[p][3].x;
                    const u32 ag[4] = {q4_pair(g0, s0), q4_pair(g8, s0), q4_pair(g0, s0 + 1), q4_pair(g8, s0 + 1)};
                    const u32 au[4] = {q4_pair(u0, s0), q4_pair(u8, s0), q4_pair(u0, s0 + 1), q4_pair(u8, s0 + 1)};
                    mma_bf16_16816(cg, ag, bf);
                    mma_bf16_16816(cu, au, bf);
                }
                float xf[16], sx = 0.f;
                unpack8(xv[p][0], xf);
                unpack8(xv[p][1], xf + 8);
#pragma unroll
                for (int i = 0; i < 16; i++) sx += xf[i];
                sx += __shfl_xor_sync(0xffffffffu, sx, 1);
                sx += __shfl_xor_sync(0xffffffffu, sx, 2);
                acc[0] = chunk_acc(acc[0], bf2f(sc[p][0]), cg[0], bf2f(sc[p][1]), sx);
                acc[1] = chunk_acc(acc[1], bf2f(sc[p][2]), cg[2], bf2f(sc[p][3]), sx);
                acc[2] = chunk_acc(acc[2], bf2f(sc[p][4]), cu[0], bf2f(sc[p][5]), sx);
                acc[3] = chunk_acc(acc[3], bf2f(sc[p][6]), cu[2], bf2f(sc[p][7]), sx);
                if (b + SPLIT * PF < nb) load(p, b + SPLIT * PF);
            }
        }
    }
    if (SPLIT > 1) {
        if (t == 0) {
#pragma unroll
            for (int i = 0; i < 4; i++) part[tile][s][i][g] = acc[i];
        }
        __syncthreads();
        if (s != 0) return;
        if (t == 0) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] = part[tile][0][i][g];
                for (int p = 1; p < SPLIT; p++) acc[i] += part[tile][p][i][g];
            }
        }
    }
    if (live && t == 0) {
        act[(long)q * I + r0 + g] = swiglu_elem(f2bf(acc[0]), f2bf(acc[2]));
        act[(long)q * I + r0 + g + 8] = swiglu_elem(f2bf(acc[1]), f2bf(acc[3]));
    }
}
