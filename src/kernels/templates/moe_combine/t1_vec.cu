// moe_combine t1_vec — VEC consecutive columns per thread through 4/8/16-byte loads and
// stores, the slot loop unrolled UNROLL times. Per element the arithmetic is combine_step's
// (one explicit FMA per slot, slots in order), so it is bit-identical to production.
// Grid (M, ceil(H / (TPB·VEC))); H must be a multiple of VEC.
constexpr int TPB = {{TPB}}, VEC = {{VEC}};

// V bf16 at p (aligned to 2·V bytes) as floats.
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

// V floats rounded to bf16 and stored at p (aligned to 2·V bytes).
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
    float a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; i++) a[i] = 0.f;
#pragma unroll {{UNROLL}}
    for (int j = 0; j < K; j++) {
        float f[VEC];
        load_vec<VEC>(ym + (long)j * H, f);
        float wj = wm[j];
#pragma unroll
        for (int i = 0; i < VEC; i++) a[i] = __fmaf_rn(wj, f[i], a[i]);
    }
    store_vec<VEC>(out + (long)m * H + h, a);
}
