// zmoe device building blocks. Every kernel — primitive or fused — is built from these
// functions, so two kernels that call them in the same order produce bit-identical results
// (the numerics contract in DESIGN.md). No CUDA headers are needed: bf16 is handled as raw
// 16-bit storage, so NVRTC compiles this without include paths.

typedef unsigned short bf16;
typedef unsigned int u32;

#define WARP 32
#define INFINITY __int_as_float(0x7f800000)
#define FMT_BF16 0
#define FMT_AFFINE 1

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round-to-nearest-even f32 -> bf16 (NaN stays NaN).
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the total. Fixed order.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float red[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.f;
    return warp_sum(t);
}

// Unpack 8 bf16 from a 16-byte vector into floats.
__device__ __forceinline__ void unpack8(uint4 v, float* o) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// A weight matrix [rows, K] in one of the supported formats.
struct QMat {
    const void* w;     // bf16 [rows, K]  or  u32 packed [rows, K*bits/32]
    const bf16* s;     // affine: scales [rows, K/group]
    const bf16* b;     // affine: biases [rows, K/group]
    int fmt, bits, group;
};

// Affine rows, BITS in {4, 8}: lane l takes the 16-byte chunks l, l+32, ... of the packed
// row; a chunk holds 128/BITS codes, all inside one group (the group size is a multiple of
// 32). Per chunk and token: sc·Σ q·x + bi·Σ x, added to acc[m].
template <int MT, int BITS>
__device__ __forceinline__ void affine_partial(const QMat& W, long r, int K, const bf16* x, int ldx, int M, int lane,
                                               float* acc) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    const uint4* wr = (const uint4*)((const u32*)W.w + r * (long)(K / PER_WORD));
    int gpr = K / W.group;
    for (int c = lane; c < K / CODES; c += WARP) {
        uint4 v = wr[c];
        u32 wd[4] = {v.x, v.y, v.z, v.w};
        int g = (c * CODES) / W.group;
        float sc = bf2f(W.s[r * gpr + g]), bi = bf2f(W.b[r * gpr + g]);
#pragma unroll
        for (int m = 0; m < MT; m++) {
            if (m < M) {
                const uint4* xr = (const uint4*)(x + (long)m * ldx) + c * XV;
                float qx = 0.f, sx = 0.f;
#pragma unroll
                for (int j = 0; j < XV; j++) {
                    float xf[8];
                    unpack8(xr[j], xf);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        int e = j * 8 + i;
                        qx += (float)((wd[e / PER_WORD] >> (BITS * (e % PER_WORD))) & MASK) * xf[i];
                        sx += xf[i];
                    }
                }
                acc[m] += sc * qx + bi * sx;
            }
        }
    }
}

// Partial dot products of weight row `r` with up to 8 token rows of x (x + m*ldx), one
// partial per lane; the caller reduces across the warp with warp_sum. Lane l handles the
// 16-byte chunks l, l+32, l+64, ... of the row. K must be a multiple of 32 (affine: and of
// the group size, itself a multiple of 32).
template <int MT>
__device__ __forceinline__ void row_dot_partial(const QMat& W, long r, int K, const bf16* x, int ldx, int M, int lane,
                                                float* acc) {
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.f;
    if (W.fmt == FMT_BF16) {
        const uint4* wr = (const uint4*)((const bf16*)W.w + r * (long)K);
        for (int c = lane; c < K / 8; c += WARP) {
            float wf[8];
            unpack8(wr[c], wf);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < M) {
                    float xf[8];
                    unpack8(((const uint4*)(x + (long)m * ldx))[c], xf);
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; i++) s += wf[i] * xf[i];
                    acc[m] += s;
                }
            }
        }
    } else if (W.bits == 4) {
        affine_partial<MT, 4>(W, r, K, x, ldx, M, lane, acc);
    } else {
        affine_partial<MT, 8>(W, r, K, x, ldx, M, lane, acc);
    }
}

// Dequantized element (r, k) — for embedding lookups.
__device__ __forceinline__ float qmat_elem(const QMat& W, long r, int K, int k) {
    if (W.fmt == FMT_BF16) return bf2f(((const bf16*)W.w)[r * (long)K + k]);
    int gpr = K / W.group, g = k / W.group;
    float sc = bf2f(W.s[r * gpr + g]), bi = bf2f(W.b[r * gpr + g]);
    const u32* row = (const u32*)W.w + r * (long)(K * W.bits / 32);
    int per_word = 32 / W.bits;
    u32 q = (row[k / per_word] >> (W.bits * (k % per_word))) & ((1u << W.bits) - 1u);
    return sc * (float)q + bi;
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// Row RMSNorm of n elements by one block: y = bf16(w * (x * rsqrt(mean(x^2) + eps))).
__device__ __forceinline__ void rmsnorm_row(const bf16* x, const float* w, bf16* y, int n, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = bf2f(x[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = f2bf(w[i] * (bf2f(x[i]) * inv));
}
