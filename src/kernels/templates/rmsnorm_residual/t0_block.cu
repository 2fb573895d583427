// rmsnorm_residual t0_block — the production `add_rmsnorm` (src/kernels/fused.cu) with the
// block size as a knob: x = bf16(x + src) row-wise, then y = bf16(w ⊙ (x · rsqrt(mean(x²) +
// eps))) by rmsnorm_row. One block per row. The sum of squares is reduced in an order that
// depends on the block size: bit-identical to production only at TPB = 256 (the production
// launch). Grid (M).
constexpr int TPB = {{TPB}};

extern "C" __global__ void __launch_bounds__(TPB)
    foundry_rmsnorm_residual(bf16* x, const bf16* src, const float* w, bf16* y, int M, int n, float eps) {
    if ((int)blockIdx.x >= M) return;
    bf16* xr = x + (long)blockIdx.x * n;
    const bf16* sr = src + (long)blockIdx.x * n;
    const int t = threadIdx.x, nt = blockDim.x;
    bf16 xv[RMS_REG], sv[RMS_REG];
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) {
        if (t + j * nt < n) {
            xv[j] = xr[t + j * nt];
            sv[j] = sr[t + j * nt];
        }
    }
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) if (t + j * nt < n) xr[t + j * nt] = add_bf16(xv[j], sv[j]);
    for (int i = t + RMS_REG * nt; i < n; i += nt) xr[i] = add_bf16(xr[i], sr[i]);
    __syncthreads();
    rmsnorm_row(xr, w, y + (long)blockIdx.x * n, n, eps);
}
