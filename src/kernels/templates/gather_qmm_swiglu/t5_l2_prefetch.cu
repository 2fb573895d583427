// gather_qmm_swiglu t5_l2_prefetch — the production kernel's rows (gate_up_swiglu_row, so
// bit-identical) RPW a warp, consecutive, with the gate and up rows up to AHEAD rows on
// (codes, scales and biases) prefetched into L2 before each row is computed: their DRAM reads
// overlap the arithmetic, and the row's own loads then find L2. sm_90: one bulk prefetch a
// range (cp.async.bulk.prefetch.L2); before: prefetch.global.L2 a 128-byte line.
// Grid (ceil(I / (WPB·RPW)), M·K).
constexpr int RPW = {{RPW}}, WPB = {{WPB}}, AHEAD = {{AHEAD}};

// Brings bytes [p, p + n) into L2 (widened to 16-byte boundaries, as the bulk prefetch
// needs), work split over the warp's lanes.
__device__ __forceinline__ void prefetch_l2(const void* p, int n, int lane) {
    const unsigned long long g = (unsigned long long)__cvta_generic_to_global(p);
    const unsigned long long a = g & ~15ull, e = (g + n + 15) & ~15ull;
#if __CUDA_ARCH__ >= 900
    if (lane == 0) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((u32)(e - a)) : "memory");
#else
    for (unsigned long long o = a + lane * 128; o < e; o += 32 * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(o) : "memory");
#endif
}

// Row r of an affine matrix W with K columns: its codes, scales and biases into L2.
__device__ __forceinline__ void prefetch_row(const QMat& W, long r, int K, int lane) {
    const int row_bytes = K * W.bits / 8, gpr = K / W.group;
    prefetch_l2((const char*)W.w + r * row_bytes, row_bytes, lane);
    prefetch_l2(W.s + r * gpr, gpr * 2, lane);
    prefetch_l2(W.b + r * gpr, gpr * 2, lane);
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    const int q = blockIdx.y, lane = threadIdx.x & 31;
    if (q >= M * K) return;
    const long r0 = ((long)blockIdx.x * WPB + (threadIdx.x >> 5)) * RPW;
    if (r0 >= I) return;
    QMat G = expert_slice(QMat{gw, gs, gb, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    QMat U = expert_slice(QMat{uw, us, ub, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    const bf16* xq = x + (long)(q / K) * H;
    const int n = (int)min((long)RPW, I - r0);
    for (int j = 1; j <= AHEAD && j < n; j++) {
        prefetch_row(G, r0 + j, H, lane);
        prefetch_row(U, r0 + j, H, lane);
    }
    for (int i = 0; i < n; i++) {
        if (i + AHEAD + 1 < n) {
            prefetch_row(G, r0 + i + AHEAD + 1, H, lane);
            prefetch_row(U, r0 + i + AHEAD + 1, H, lane);
        }
        bf16 a = gate_up_swiglu_row(G, U, r0 + i, H, xq, lane);
        if (lane == 0) act[(long)q * I + r0 + i] = a;
    }
}
