// moe_combine t3_dual_acc — NUMERICS-CHANGING: even and odd slots accumulate into two
// independent FMA chains that are added at the end (half the dependent-latency chain of the
// in-order sum, a different rounding). VEC columns per thread as in t1_vec.
// Grid (M, ceil(H / (TPB·VEC))); H a multiple of VEC.
constexpr int TPB = {{TPB}}, VEC = {{VEC}};

template <int V>
__device__ __forceinline__ void load_vec(const bf16* p, float* f) {
    if constexpr (V == 8) {
        unpack8(*(const uint4*)p, f);
    } else if constexpr (V == 4) {
        uint2 v = *(const uint2*)p;
        f[0] = __uint_as_float(v.x << 16);
        f[1] = __uint_as_float(v.x & 0xffff0000u);
        f[2] = __uint_as_float(v.y << 16);
        f[3] = __uint_as_float(v.y & 0xffff0000u);
    } else {
        u32 v = *(const u32*)p;
        f[0] = __uint_as_float(v << 16);
        f[1] = __uint_as_float(v & 0xffff0000u);
    }
}

template <int V>
__device__ __forceinline__ void store_vec(bf16* p, const float* a) {
    u32 wd[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; i++) wd[i] = (u32)f2bf(a[2 * i]) | ((u32)f2bf(a[2 * i + 1]) << 16);
    if constexpr (V == 8) {
        uint4 v;
        v.x = wd[0], v.y = wd[1], v.z = wd[2], v.w = wd[3];
        *(uint4*)p = v;
    } else if constexpr (V == 4) {
        uint2 v;
        v.x = wd[0], v.y = wd[1];
        *(uint2*)p = v;
    } else {
        *(u32*)p = wd[0];
    }
}

extern "C" __global__ void __launch_bounds__(TPB)
    foundry_moe_combine(const bf16* y, const float* w, bf16* out, int M, int K, int H) {
    int m = blockIdx.x;
    long h = ((long)blockIdx.y * TPB + threadIdx.x) * VEC;
    if (m >= M || h >= H) return;
    const float* wm = w + (long)m * K;
    const bf16* ym = y + (long)m * K * H + h;
    float a0[VEC], a1[VEC];
#pragma unroll
    for (int i = 0; i < VEC; i++) a0[i] = a1[i] = 0.f;
    int j = 0;
    for (; j + 1 < K; j += 2) {
        float f0[VEC], f1[VEC];
        load_vec<VEC>(ym + (long)j * H, f0);
        load_vec<VEC>(ym + (long)(j + 1) * H, f1);
        float w0 = wm[j], w1 = wm[j + 1];
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            a0[i] = __fmaf_rn(w0, f0[i], a0[i]);
            a1[i] = __fmaf_rn(w1, f1[i], a1[i]);
        }
    }
    if (j < K) {
        float f0[VEC];
        load_vec<VEC>(ym + (long)j * H, f0);
#pragma unroll
        for (int i = 0; i < VEC; i++) a0[i] = __fmaf_rn(wm[j], f0[i], a0[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; i++) a0[i] = __fadd_rn(a0[i], a1[i]);
    store_vec<VEC>(out + (long)m * H + h, a0);
}
