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
        // One uint4 = 32 codes, all inside one group (group is a multiple of 32).
        const uint4* wr = (const uint4*)((const u32*)W.w + r * (long)(K / 8));
        int gpr = K / W.group;
        for (int c = lane; c < K / 32; c += WARP) {
            uint4 v = wr[c];
            u32 wd[4] = {v.x, v.y, v.z, v.w};
            int g = (c * 32) / W.group;
            float sc = bf2f(W.s[r * gpr + g]), bi = bf2f(W.b[r * gpr + g]);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < M) {
                    const uint4* xr = (const uint4*)(x + (long)m * ldx) + c * 4;
                    float qx = 0.f, sx = 0.f;
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        float xf[8];
                        unpack8(xr[j], xf);
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            qx += (float)((wd[j] >> (4 * i)) & 0xfu) * xf[i];
                            sx += xf[i];
                        }
                    }
                    acc[m] += sc * qx + bi * sx;
                }
            }
        }
    } else {  // 8-bit: one uint4 = 16 codes
        const uint4* wr = (const uint4*)((const u32*)W.w + r * (long)(K / 4));
        int gpr = K / W.group;
        for (int c = lane; c < K / 16; c += WARP) {
            uint4 v = wr[c];
            u32 wd[4] = {v.x, v.y, v.z, v.w};
            int g = (c * 16) / W.group;
            float sc = bf2f(W.s[r * gpr + g]), bi = bf2f(W.b[r * gpr + g]);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < M) {
                    const uint4* xr = (const uint4*)(x + (long)m * ldx) + c * 2;
                    float qx = 0.f, sx = 0.f;
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        float xf[8];
                        unpack8(xr[j], xf);
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            qx += (float)((wd[2 * j + i / 4] >> (8 * (i % 4))) & 0xffu) * xf[i];
                            sx += xf[i];
                        }
                    }
                    acc[m] += sc * qx + bi * sx;
                }
            }
        }
    }
}

// Dequantized element (r, k) — for embedding lookups.
__device__ __forceinline__ float qmat_elem(const QMat& W, long r, int K, int k) {
    if (W.fmt == FMT_BF16) return bf2f(((const bf16*)W.w)[r * (long)K + k]);
    int gpr = K / W.group, g = k / W.group;
    float sc = bf2f(W.s[r * gpr + g]), bi = bf2f(W.b[r * gpr + g]);
    const u32* row = (const u32*)W.w + r * (long)(K * W.bits / 32);
    u32 q = W.bits == 4 ? (row[k / 8] >> (4 * (k % 8))) & 0xfu : (row[k / 4] >> (8 * (k % 4))) & 0xffu;
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
