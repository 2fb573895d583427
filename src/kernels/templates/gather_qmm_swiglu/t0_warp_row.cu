// gather_qmm_swiglu t0_warp_row — the production `moe_gate_up_swiglu` (src/cuda/ops/moe.cu)
// for MLX affine weights, with rows per block as a knob: one warp per (slot, intermediate
// row); both call gate_up_swiglu_row (common.cuh). act[q, r] = swiglu(bf16(gate_e[r]·x_t),
// bf16(up_e[r]·x_t)) with e = idx[q], t = q / K. Bit-identical to production for every RPB.
// Grid (ceil(I / RPB), M·K).
constexpr int RPB = {{RPB}};

extern "C" __global__ void __launch_bounds__(32 * RPB)
    foundry_gather_qmm_swiglu(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us,
                              const bf16* ub, long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act,
                              int M, int K, int E, int I, int H, int bits, int group) {
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * RPB + (threadIdx.x >> 5);
    if (q >= M * K || r >= I) return;
    QMat G = expert_slice(QMat{gw, gs, gb, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    QMat U = expert_slice(QMat{uw, us, ub, FMT_AFFINE, bits, group}, idx[q], w_stride, sb_stride);
    bf16 a = gate_up_swiglu_row(G, U, r, H, x + (long)(q / K) * H, lane);
    if (lane == 0) act[(long)q * I + r] = a;
}
