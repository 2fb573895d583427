// moe_combine t2_row_tile — the seeds' winning tile (lab notebook, t2_row_tile): a block
// takes ROWS tokens × TPB·VEC columns and stages the tokens' routing weights in shared memory
// once, instead of every thread re-reading them from global memory. Per element the
// arithmetic is combine_step's (one FMA per slot, slots in order): bit-identical to production.
// Grid (ceil(M / ROWS), ceil(H / (TPB·VEC))); K ≤ 16; H a multiple of VEC.
constexpr int TPB = {{TPB}}, VEC = {{VEC}}, ROWS = {{ROWS}};

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
    __shared__ float ws[ROWS * 16];
    int m0 = blockIdx.x * ROWS, mt = min(ROWS, M - m0);
    for (int i = threadIdx.x; i < mt * K; i += TPB) ws[i] = w[(long)m0 * K + i];
    __syncthreads();
    long h = ((long)blockIdx.y * TPB + threadIdx.x) * VEC;
    if (h >= H) return;
    for (int r = 0; r < mt; r++) {
        const bf16* ym = y + (long)(m0 + r) * K * H + h;
        float a[VEC];
#pragma unroll
        for (int i = 0; i < VEC; i++) a[i] = 0.f;
        for (int j = 0; j < K; j++) {
            float f[VEC];
            load_vec<VEC>(ym + (long)j * H, f);
            float wj = ws[r * K + j];
#pragma unroll
            for (int i = 0; i < VEC; i++) a[i] = __fmaf_rn(wj, f[i], a[i]);
        }
        store_vec<VEC>(out + (long)(m0 + r) * H + h, a);
    }
}
