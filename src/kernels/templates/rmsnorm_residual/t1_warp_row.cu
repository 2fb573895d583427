// rmsnorm_residual t1_warp_row — NUMERICS-CHANGING: one WARP per row (RPB rows per block),
// 16-byte loads (8 bf16 per lane per step), the row kept in registers between the two
// passes, the sum of squares reduced by the warp alone (no block barrier). COMP = 1 sums the
// squares with Kahan compensation. n must be a multiple of 8. Grid (ceil(M / RPB)).
constexpr int RPB = {{RPB}}, COMP = {{COMP}}, REGC = 8;

__device__ __forceinline__ void store8(bf16* p, const float* v) {
    uint4 o;
    o.x = (u32)f2bf(v[0]) | ((u32)f2bf(v[1]) << 16);
    o.y = (u32)f2bf(v[2]) | ((u32)f2bf(v[3]) << 16);
    o.z = (u32)f2bf(v[4]) | ((u32)f2bf(v[5]) << 16);
    o.w = (u32)f2bf(v[6]) | ((u32)f2bf(v[7]) << 16);
    *(uint4*)p = o;
}

extern "C" __global__ void __launch_bounds__(32 * RPB)
    foundry_rmsnorm_residual(bf16* x, const bf16* src, const float* w, bf16* y, int M, int n, float eps) {
    const int row = blockIdx.x * RPB + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= M) return;
    bf16* xr = x + (long)row * n;
    const bf16* sr = src + (long)row * n;
    bf16* yr = y + (long)row * n;
    const int nch = n / 8;
    float v[REGC][8];
    float ss = 0.f, comp = 0.f;
    for (int k = 0; lane + 32 * k < nch; k++) {
        const int c = lane + 32 * k;
        float a[8], b[8], s8[8];
        unpack8(((const uint4*)xr)[c], a);
        unpack8(((const uint4*)sr)[c], b);
#pragma unroll
        for (int i = 0; i < 8; i++) s8[i] = bf2f(f2bf(a[i] + b[i]));
        store8(xr + c * 8, s8);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float sq = __fmul_rn(s8[i], s8[i]);
            if (COMP) {
                float yk = __fsub_rn(sq, comp), tk = __fadd_rn(ss, yk);
                comp = __fsub_rn(__fsub_rn(tk, ss), yk);
                ss = tk;
            } else {
                ss = __fadd_rn(ss, sq);
            }
        }
#pragma unroll
        for (int kk = 0; kk < REGC; kk++) {
            if (kk == k) {
#pragma unroll
                for (int i = 0; i < 8; i++) v[kk][i] = s8[i];
            }
        }
    }
    ss = warp_sum(COMP ? __fsub_rn(ss, comp) : ss);
    const float inv = rsqrtf(ss / (float)n + eps);
    for (int k = 0; lane + 32 * k < nch; k++) {
        const int c = lane + 32 * k;
        float s8[8], o[8];
        if (k < REGC) {
#pragma unroll
            for (int kk = 0; kk < REGC; kk++) {
                if (kk == k) {
#pragma unroll
                    for (int i = 0; i < 8; i++) s8[i] = v[kk][i];
                }
            }
        } else {
            unpack8(((const uint4*)xr)[c], s8);
        }
        const float4 w0 = ((const float4*)w)[2 * c], w1 = ((const float4*)w)[2 * c + 1];
        const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = wv[i] * (s8[i] * inv);
        store8(yr + c * 8, o);
    }
}
