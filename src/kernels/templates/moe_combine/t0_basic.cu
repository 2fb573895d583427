// moe_combine t0_basic — the production `combine` kernel (src/cuda/ops/moe.cu) with its
// block size as a knob: one thread per output element; both call combine_slots
// (common.cuh), so the result is bit-identical to production for every TPB.
// out[m, h] = bf16(Σ_j w[m, j] · y[m·K + j, h]); grid (M, ceil(H / TPB)).
constexpr int TPB = {{TPB}};

extern "C" __global__ void __launch_bounds__(TPB)
    foundry_moe_combine(const bf16* y, const float* w, bf16* out, int M, int K, int H) {
    int m = blockIdx.x, h = blockIdx.y * TPB + threadIdx.x;
    if (m >= M || h >= H) return;
    out[(long)m * H + h] = f2bf(combine_slots(w + m * K, y + (long)m * K * H + h, K, H));
}
