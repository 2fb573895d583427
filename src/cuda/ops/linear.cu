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

// Rows r0 .. r0+nr-1 (nr ≤ R) of a bf16 matrix against one token x: the partial of
// row_dot_partial<1> for each row — the same chunks per lane (lane, lane + 32, ..., 8 of
// them a pass), the same products in the same order, the same additions — so bit-identical,
// with every row's loads of a pass in flight together and each x chunk unpacked once (the
// generic fallback of row_dot_rows took R round trips, one a row). Rows past nr repeat the
// last valid one (the caller drops them).
template <int R>
__device__ __forceinline__ void bf16_rows1(const QMat& W, long r0, int nr, int K, const bf16* x, int lane, float* acc) {
    constexpr int PF = 8;
    const int nch = K / 8;
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    for (int c0 = lane; c0 < nch; c0 += WARP * PF) {
        uint4 wv[PF][R];
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c < nch) {
#pragma unroll
                for (int i = 0; i < R; i++) wv[p][i] = ((const uint4*)((const bf16*)W.w + (r0 + min(i, nr - 1)) * (long)K))[c];
            }
        }
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c >= nch) continue;
            float xf[8];
            unpack8(((const uint4*)x)[c], xf);
#pragma unroll
            for (int i = 0; i < R; i++) {
                float wf[8];
                unpack8(wv[p][i], wf);
                float s = 0.f;
#pragma unroll
                for (int t = 0; t < 8; t++) s = __fmaf_rn(wf[t], xf[t], s);
                acc[i] += s;
            }
        }
    }
}

// Rows r0 .. r0+nr-1 (nr ≤ R) of y = x W^T (+ bias) for one token by one warp: the
// results of matvec_row<1> for each row (row_dot_rows: the same sums in the same order),
// with the loads of both rows in flight together and x unpacked once for them. A
// single-token mat-vec is latency-bound: a warp per row issues one or two loads a lane and
// waits a full round trip for them.
template <int R>
__device__ __forceinline__ void matvec_rows1(const QMat& W, long r0, int nr, const bf16* x, void* y, const float* bias,
                                             int K, int out_f32) {
    int lane = threadIdx.x & 31;
    float acc[R];
    if (R > 1 && W.fmt == FMT_BF16) bf16_rows1<R>(W, r0, nr, K, x, lane, acc);
    else row_dot_rows<R, 4>(W, r0, nr, K, x, lane, acc);
#pragma unroll
    for (int i = 0; i < R; i++) {
        float v = warp_sum(acc[i]);
        if (lane == 0 && i < nr) {
            long r = r0 + i;
            if (bias) v += bias[r];
            if (out_f32) ((float*)y)[r] = v; else ((bf16*)y)[r] = f2bf(v);
        }
    }
}

// y[M, N] = x[M, K] W^T (+ bias): one warp per output row, blockIdx.z = group of 8 tokens.
// y is bf16, or f32 when out_f32 (router logits, lm_head).
extern "C" __global__ void matvec(const MatvecArgs p) {
    pdl_entry();
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int m0 = blockIdx.z * 8, mt = min(8, p.m - m0);
    if (r < p.n && mt > 0) matvec_row<8>(p.w, r, p.x, p.y, p.bias, p.n, p.k, m0, mt, p.out_f32);
}

// The M = 1 (decode) instances of matvec, R rows a warp (matvec_rows1): the same results.
// matvec1_r2 for matrices tall enough to keep a full grid at two rows a warp.
template <int R>
__device__ __forceinline__ void matvec1_rows(const MatvecArgs& p) {
    long r0 = ((long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5)) * R;
    if (r0 < p.n) matvec_rows1<R>(p.w, r0, (int)min((long)R, p.n - r0), p.x, p.y, p.bias, p.k, p.out_f32);
}
extern "C" __global__ void matvec1(const MatvecArgs p) {
    pdl_entry();
    matvec1_rows<1>(p);
}
extern "C" __global__ void matvec1_r2(const MatvecArgs p) {
    pdl_entry();
    matvec1_rows<2>(p);
}

// One of qkv_proj's matrices as a warp of its grid sees it: rows r0 .. r0+R-1 of w (n rows)
// go to y with bias.
struct QkvPart {
    QMat w;
    bf16* y;
    const float* bias;
    int n;
    long r0;
};

// Warp g of a grid over q's rows, then k's, then v's in groups of R (each matrix rounded up
// to whole groups, so a group never straddles two): its matrix and first row; n = 0 past
// the end.
template <int R>
__device__ __forceinline__ QkvPart qkv_part(const QkvArgs& p, long g) {
    long gq = (p.nq + R - 1) / R, gk = (p.nk + R - 1) / R, gv = (p.nv + R - 1) / R;
    if (g >= gq + gk + gv) return {p.wq, p.q, p.qbias, 0, 0};
    if (g >= gq + gk) return {p.wv, p.v, p.vbias, p.nv, (g - gq - gk) * R};
    if (g >= gq) return {p.wk, p.k, p.kbias, p.nk, (g - gq) * R};
    return {p.wq, p.q, p.qbias, p.nq, g * R};
}

// qkv_proj: q, k and v = x W^T (+ bias) for the three matrices in one launch (= matvec ×3).
// Rows 0..nq of the grid are q's, then k's, then v's. Grid (ceil((nq + nk + nv) / 4), 1,
// ceil(M / 8)). MLA's in-projection uses two (nv = 0).
extern "C" __global__ void qkv_proj(const QkvArgs p) {
    pdl_entry();
    QkvPart t = qkv_part<1>(p, (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5));
    int m0 = blockIdx.z * 8, mt = min(8, p.m - m0);
    if (t.n > 0 && mt > 0) matvec_row<8>(t.w, t.r0, p.x, t.y, t.bias, t.n, p.kdim, m0, mt, 0);
}

// The M = 1 (decode) instances of qkv_proj, R rows a warp (qkv_part's groups). Grid
// ceil((⌈nq/R⌉ + ⌈nk/R⌉ + ⌈nv/R⌉) / 4).
template <int R>
__device__ __forceinline__ void qkv_proj1_rows(const QkvArgs& p) {
    QkvPart t = qkv_part<R>(p, (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5));
    if (t.n > 0) matvec_rows1<R>(t.w, t.r0, (int)min((long)R, t.n - t.r0), p.x, t.y, t.bias, p.kdim, 0);
}
extern "C" __global__ void qkv_proj1(const QkvArgs p) {
    pdl_entry();
    qkv_proj1_rows<1>(p);
}
extern "C" __global__ void qkv_proj1_r2(const QkvArgs p) {
    pdl_entry();
    qkv_proj1_rows<2>(p);
}

// rmsnorm_row(x, w, y, n, eps) as a block of NORM_THREADS threads computes it, by a block of
// NORM_THREADS / V threads: thread τ plays threads τ + i·blockDim (i < V), summing its
// squares in that thread's order (elements t, t + NORM_THREADS, ...), one warp_sum per
// played warp, the partials in played-warp order, then block_reduce's final warp_sum — the
// same sums in the same order, so y is bit-identical to the rmsnorm kernel's.
template <int V>
__device__ __forceinline__ void rmsnorm_row_played(const bf16* x, const float* w, bf16* y, int n, float eps) {
    __shared__ float red[32];
    const int nt = NORM_THREADS, lane = threadIdx.x & 31, wid = threadIdx.x >> 5, pw = blockDim.x / 32;
    float ss[V];
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int t = threadIdx.x + i * blockDim.x;
        float acc = 0.f;
        for (int e = t; e < n; e += nt) {
            float v = bf2f(__ldcg(x + e));
            acc += v * v;
        }
        ss[i] = acc;
    }
#pragma unroll
    for (int i = 0; i < V; i++) {
        float s = warp_sum(ss[i]);
        if (lane == 0) red[i * pw + wid] = s;
    }
    __syncthreads();
    float tot = lane < nt / 32 ? red[lane] : 0.f;
    const float inv = rsqrtf(warp_sum(tot) / (float)n + eps);
    for (int e = threadIdx.x; e < n; e += blockDim.x) y[e] = f2bf(w[e] * (bf2f(__ldcg(x + e)) * inv));
}

// norm_qkv (decode): H = rmsnorm(xin) ⊙ nw, normalised by every block into shared memory
// (bit-identical to the rmsnorm kernel: rmsnorm_row_played), block 0 also writing it to h;
// then the block's rows of qkv_proj1 (R rows a warp) read x from shared memory. One kernel
// where the layer's input norm was a launch of its own.
template <int R>
__device__ __forceinline__ void norm_qkv_proj1_rows(const NormQkvArgs& a) {
    __shared__ __align__(16) bf16 hs[NORM_QKV_MAXH];
    const int n = a.p.kdim;
    rmsnorm_row_played<NORM_THREADS / 128>(a.xin, a.nw, hs, n, a.eps);
    __syncthreads();
    if (blockIdx.x == 0)
        for (int e = threadIdx.x; e < n; e += blockDim.x) a.h[e] = hs[e];
    QkvArgs p = a.p;
    p.x = hs;
    qkv_proj1_rows<R>(p);
}
extern "C" __global__ void norm_qkv_proj1(const NormQkvArgs a) {
    pdl_entry();
    norm_qkv_proj1_rows<1>(a);
}
extern "C" __global__ void norm_qkv_proj1_r2(const NormQkvArgs a) {
    pdl_entry();
    norm_qkv_proj1_rows<2>(a);
}

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
