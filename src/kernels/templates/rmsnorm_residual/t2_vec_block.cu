// rmsnorm_residual t2_vec_block — NUMERICS-CHANGING: one block of TPB threads per row like
// production, but 16-byte loads (8 bf16 per thread per step, up to REGC steps kept in
// registers) and the sum of squares in another order. n must be a multiple of 8. Grid (M).
constexpr int TPB = {{TPB}}, REGC = 4;

__device__ __forceinline__ void store8(bf16* p, const float* v) {
    uint4 o;
    o.x = (u32)f2bf(v[0]) | ((u32)f2bf(v[1]) << 16);
    o.y = (u32)f2bf(v[2]) | ((u32)f2bf(v[3]) << 16);
    o.z = (u32)f2bf(v[4]) | ((u32)f2bf(v[5]) << 16);
    o.w = (u32)f2bf(v[6]) | ((u32)f2bf(v[7]) << 16);
    *(uint4*)p = o;
}

extern "C" __global__ void __launch_bounds__(TPB)
    foundry_rmsnorm_residual(bf16* x, const bf16* src, const float* w, bf16* y, int M, int n, float eps) {
    if ((int)blockIdx.x >= M) return;
    bf16* xr = x + (long)blockIdx.x * n;
    const bf16* sr = src + (long)blockIdx.x * n;
    bf16* yr = y + (long)blockIdx.x * n;
    const int t = threadIdx.x, nch = n / 8;
    float v[REGC][8];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < REGC; k++) {
        const int c = t + TPB * k;
        if (c < nch) {
            float a[8], b[8];
            unpack8(((const uint4*)xr)[c], a);
            unpack8(((const uint4*)sr)[c], b);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[k][i] = bf2f(f2bf(a[i] + b[i]));
                ss += v[k][i] * v[k][i];
            }
            store8(xr + c * 8, v[k]);
        }
    }
    for (int c = t + TPB * REGC; c < nch; c += TPB) {
        float a[8], b[8], s8[8];
        unpack8(((const uint4*)xr)[c], a);
        unpack8(((const uint4*)sr)[c], b);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            s8[i] = bf2f(f2bf(a[i] + b[i]));
            ss += s8[i] * s8[i];
        }
        store8(xr + c * 8, s8);
    }
    const float inv = rsqrtf(block_sum(ss) / (float)n + eps);
#pragma unroll
    for (int k = 0; k < REGC; k++) {
        const int c = t + TPB * k;
        if (c < nch) {
            const float4 w0 = ((const float4*)w)[2 * c], w1 = ((const float4*)w)[2 * c + 1];
            const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
            float o[8];
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = wv[i] * (v[k][i] * inv);
            store8(yr + c * 8, o);
        }
    }
    for (int c = t + TPB * REGC; c < nch; c += TPB) {
        float s8[8], o[8];
        unpack8(((const uint4*)xr)[c], s8);
        const float4 w0 = ((const float4*)w)[2 * c], w1 = ((const float4*)w)[2 * c + 1];
        const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = wv[i] * (s8[i] * inv);
        store8(yr + c * 8, o);
    }
}
