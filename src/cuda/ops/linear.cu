// Linear layers: the embedding gather, mat-vecs (y = x W^T + b) and their fused forms
// (qkv_proj: three matrices in one launch; dense_gate_up_swiglu: gate, up and SwiGLU).
// Shapes: M = tokens in this call, H = hidden. Activations bf16, accumulation f32.

// x[M, H] = dequant(table[tokens[m]])
extern "C" __global__ void embed(const EmbedArgs p) {
    pdl_entry();
    long r = p.tokens[blockIdx.x];
    for (int k = threadIdx.x; k < p.h; k += blockDim.x)
        p.out[(long)blockIdx.x * p.h + k] = f2bf(qmat_elem(p.table, r, p.h, k));
}

// One warp's output row r of y = x W^T (+ bias) for tokens m0 .. m0+mt-1 (mt ≤ MT): the
// dot products, the warp reduction, the bias and the store (bf16, or f32 when out_f32).
// MT only sizes registers: a token's result does not depend on it.
template <int MT>
__device__ __forceinline__ void matvec_row(const QMat& W, long r, const bf16* x, void* y, const float* bias, int N, int K,
                                           int m0, int mt, int out_f32) {
    int lane = threadIdx.x & 31;
    const bf16* xs[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) xs[m] = x + (long)(m0 + min(m, mt - 1)) * K;
    float acc[MT];
    row_dot_partial<MT>(W, r, K, xs, mt, lane, acc);
#pragma unroll
    for (int m = 0; m < MT; m++) {
        if (m < mt) {
            float v = warp_sum(acc[m]);
            if (lane == 0) {
                if (bias) v += bias[r];
                long o = (long)(m0 + m) * N + r;
                if (out_f32) ((float*)y)[o] = v; else ((bf16*)y)[o] = f2bf(v);
            }
        }
    }
}

// y[M, N] = x[M, K] W^T (+ bias): one warp per output row, blockIdx.z = group of 8 tokens.
// y is bf16, or f32 when out_f32 (router logits, lm_head). matvec1 is the M = 1 (decode)
// instance: same arithmetic, a fraction of the registers.
#define MATVEC_KERNEL(NAME, MT)                                                                                     \
    extern "C" __global__ void NAME(const MatvecArgs p) {                                                           \
        pdl_entry();                                                                                                \
        long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);                                       \
        int m0 = blockIdx.z * MT, mt = min(MT, p.m - m0);                                                           \
        if (r < p.n && mt > 0) matvec_row<MT>(p.w, r, p.x, p.y, p.bias, p.n, p.k, m0, mt, p.out_f32);               \
    }
MATVEC_KERNEL(matvec, 8)
MATVEC_KERNEL(matvec1, 1)

// qkv_proj: q, k and v = x W^T (+ bias) for the three matrices in one launch (= matvec ×3).
// Rows 0..nq of the grid are q's, then k's, then v's. Grid (ceil((nq + nk + nv) / 4), 1,
// ceil(M / MT)); qkv_proj1 is the M = 1 instance. MLA's in-projection uses two (nv = 0).
#define QKV_KERNEL(NAME, MT)                                                                                        \
    extern "C" __global__ void NAME(const QkvArgs p) {                                                              \
        pdl_entry();                                                                                                \
        long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);                                       \
        int m0 = blockIdx.z * MT, mt = min(MT, p.m - m0);                                                           \
        if (r >= p.nq + p.nk + p.nv || mt <= 0) return;                                                             \
        QMat W = p.wq;                                                                                              \
        bf16* y = p.q;                                                                                              \
        const float* bias = p.qbias;                                                                                \
        int n = p.nq;                                                                                               \
        if (r >= p.nq + p.nk) {                                                                                     \
            W = p.wv, y = p.v, bias = p.vbias, n = p.nv, r -= p.nq + p.nk;                                          \
        } else if (r >= p.nq) {                                                                                     \
            W = p.wk, y = p.k, bias = p.kbias, n = p.nk, r -= p.nq;                                                 \
        }                                                                                                           \
        matvec_row<MT>(W, r, p.x, y, bias, n, p.kdim, m0, mt, 0);                                                   \
    }
QKV_KERNEL(qkv_proj, 8)
QKV_KERNEL(qkv_proj1, 1)

// swiglu_mlp: act[m, r] = swiglu(bf16(gate[r]·x_m + bg), bf16(up[r]·x_m + bu)) (= matvec
// twice + swiglu). Grid (ceil(F/4), 1, ceil(M/8)), 8 tokens per block like matvec.
extern "C" __global__ void dense_gate_up_swiglu(const DenseGateUpArgs p) {
    pdl_entry();
    int lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int m0 = blockIdx.z * 8, mt = min(8, p.m - m0);
    if (r >= p.f || mt <= 0) return;
    const bf16* xs[8];
#pragma unroll
    for (int m = 0; m < 8; m++) xs[m] = p.x + (long)(m0 + min(m, mt - 1)) * p.h;
    float ag[8], au[8];
    row_dot_partial<8>(p.gate, r, p.h, xs, mt, lane, ag);
    row_dot_partial<8>(p.up, r, p.h, xs, mt, lane, au);
#pragma unroll
    for (int m = 0; m < 8; m++) {
        if (m < mt) {
            float g = warp_sum(ag[m]), u = warp_sum(au[m]);
            if (lane == 0) {
                if (p.gbias) g += p.gbias[r];
                if (p.ubias) u += p.ubias[r];
                p.act[(long)(m0 + m) * p.f + r] = swiglu_elem(f2bf(g), f2bf(u));
            }
        }
    }
}
