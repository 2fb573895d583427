// gather_qmm_swiglu t2_grouped — grouped by expert (like the production prefill path,
// expert_matvec_grouped): block (x, e) finds the slots routed to expert e and computes their
// rows MT slots at a time, so each weight row is read once per MT slots instead of once per
// slot. Each slot's sums run exactly as in t0 (row_dot_partial<MT> is bit-identical to
// affine_partial_pair per token), so it is bit-identical to production; the cost is E block
// columns, most of them idle when few tokens are routed. Grid (ceil(I / RPB), E); M ≤ 1024.
constexpr int RPB = {{RPB}}, MT = {{MT}};
#define MAX_SLOTS 1024

extern "C" __global__ void __launch_bounds__(32 * RPB)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    __shared__ int slots[MAX_SLOTS];
    __shared__ int count;
    const int e = blockIdx.y, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    for (int q = threadIdx.x; q < M * K; q += blockDim.x) {
        if (idx[q] == e) {
            int c = atomicAdd(&count, 1);
            if (c < MAX_SLOTS) slots[c] = q;
        }
    }
    __syncthreads();
    const int n = min(count, MAX_SLOTS);
    long r = (long)blockIdx.x * RPB + (threadIdx.x >> 5);
    if (n == 0 || r >= I) return;
    QMat G = expert_slice(QMat{gw, gs, gb, FMT_AFFINE, bits, group}, e, w_stride, sb_stride);
    QMat U = expert_slice(QMat{uw, us, ub, FMT_AFFINE, bits, group}, e, w_stride, sb_stride);
    for (int j = 0; j < n; j += MT) {
        int mt = min(MT, n - j);
        const bf16* xs[MT];
#pragma unroll
        for (int m = 0; m < MT; m++) xs[m] = x + (long)(slots[j + min(m, mt - 1)] / K) * H;
        float ag[MT], au[MT];
        row_dot_partial<MT>(G, r, H, xs, mt, lane, ag);
        row_dot_partial<MT>(U, r, H, xs, mt, lane, au);
#pragma unroll
        for (int m = 0; m < MT; m++) {
            if (m < mt) {
                bf16 g = f2bf(warp_sum(ag[m])), u = f2bf(warp_sum(au[m]));
                if (lane == 0) act[(long)slots[j + m] * I + r] = swiglu_elem(g, u);
            }
        }
    }
}
