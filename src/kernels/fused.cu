// Fused kernels of the patterns (src/plan/patterns.rs). Each computes exactly what its
// primitive components compute, with the same device functions from common.cuh in the same
// order, so its outputs are bit-identical to the reference plan's; what it saves is the
// launches and the round trips of intermediates through memory. The MoE kernels and
// o_proj_add_rmsnorm are decode kernels (prefill runs their components, whose expert path
// is grouped); qkv_proj, dense_gate_up_swiglu, add_rmsnorm and qk_norm_rope_kv take any M.

// The router logits rows of this block (one warp per expert row) of token m: the f32
// result of matvec1 for those rows.
__device__ __forceinline__ void router_logits_rows(const QMat& W, const bf16* x, float* logits, const float* bias,
                                                   int E, int H, int m) {
    int lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= E) return;
    const bf16* xs[1] = {x + (long)m * H};
    float acc[1];
    row_dot_partial<1>(W, r, H, xs, 1, lane, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) {
        if (bias) v += bias[r];
        logits[(long)m * E + r] = v;
    }
}

// moe_mlp 1/3: router logits (= matvec, f32 out) and, in the last block to finish, the
// softmax-top-k of router_topk. Grid (ceil(E/4), 1, M), 128 threads. tickets[m] counts
// finished blocks and is reset by the last one, so the kernel can be replayed in a graph.
extern "C" __global__ void moe_router(QMAT_ARGS, const bf16* x, float* logits, const float* bias, int E, int H, int K,
                                      int norm, int* tickets, int* idx, float* wout) {
    int m = blockIdx.z;
    router_logits_rows(QMAT_MAKE, x, logits, bias, E, H, m);
    if (!last_to_finish(tickets + m, gridDim.x)) return;
    if (threadIdx.x < WARP) router_topk_warp(logits + (long)m * E, E, K, norm, idx + m * K, wout + m * K);
}

// moe_mlp 1/3 for sigmoid routers (GLM / DeepSeek): the same logits, then in the last block
// to finish the grouped sigmoid top-k of router_sigmoid.
extern "C" __global__ void moe_router_sigmoid(QMAT_ARGS, const bf16* x, float* logits, const float* ebias, int E,
                                              int H, int K, int n_group, int topk_group, int norm, float scale,
                                              int* tickets, int* idx, float* wout) {
    int m = blockIdx.z;
    router_logits_rows(QMAT_MAKE, x, logits, nullptr, E, H, m);
    if (!last_to_finish(tickets + m, gridDim.x)) return;
    if (threadIdx.x < WARP)
        router_sigmoid_warp(logits + (long)m * E, ebias, E, K, n_group, topk_group, norm, scale, idx + m * K,
                            wout + m * K);
}

// moe_mlp 2/3: act[q, r] = swiglu(bf16(gate_e[r]·x), bf16(up_e[r]·x)) for slot q's expert
// e = idx[q] and token q / K (= expert_matvec twice + swiglu). Grid (ceil(I/4), M·K).
extern "C" __global__ void moe_gate_up_swiglu(QMAT_ARGS, const void* uw, const bf16* us, const bf16* ub, long w_stride,
                                              long sb_stride, const int* idx, int K, const bf16* x, bf16* act, int I,
                                              int H) {
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= I) return;
    QMat G = expert_slice(QMAT_MAKE, idx[q], w_stride, sb_stride);
    QMat U = expert_slice(QMat{uw, us, ub, fmt, bits, group}, idx[q], w_stride, sb_stride);
    const bf16* xs[1] = {x + (long)(q / K) * H};
    float ag[1], au[1];
    if (fmt == FMT_AFFINE && bits == 4) {
        affine_partial_pair<4>(G, U, r, H, xs[0], lane, ag, au);
    } else if (fmt == FMT_AFFINE && bits == 8) {
        affine_partial_pair<8>(G, U, r, H, xs[0], lane, ag, au);
    } else {
        row_dot_partial<1>(G, r, H, xs, 1, lane, ag);
        row_dot_partial<1>(U, r, H, xs, 1, lane, au);
    }
    bf16 g = f2bf(warp_sum(ag[0])), u = f2bf(warp_sum(au[0]));
    if (lane == 0) act[(long)q * I + r] = swiglu_elem(g, u);
}

// moe_mlp 3/3: x[m, r] += bf16(Σ_j w[m,j] · bf16(down_{idx[m,j]}[r] · act[m·K + j])), slots
// in order (= expert_matvec + combine + add_inplace). Grid (H, 1, M), one warp per slot
// (blockDim = 32·K), so the K expert rows are read in parallel; thread 0 then combines the
// slots in order. Measured slower on the H200 (bench/RESULTS.md): four rows per block with
// each warp looping over them (23.7 vs 16.2 µs per step), and the next layer's input norm
// folded in by the last block to finish (27.7 µs: a fence and an atomic in all H blocks).
// With shared experts (shared != null) the combined output first takes the shared experts'
// output: x += bf16(bf16(Σ) + shared) (= ... + add_inplace(Out, SharedOut) + add_inplace).
extern "C" __global__ void moe_down_combine_add(EXPERT_ARGS, const int* idx, const float* wts, int K, const bf16* act,
                                                bf16* x, int H, int I, const bf16* shared) {
    __shared__ bf16 ys[32];
    int m = blockIdx.z, r = blockIdx.x, j = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int q = m * K + j;
    QMat D = expert_slice(QMAT_MAKE, idx[q], w_stride, sb_stride);
    const bf16* xs[1] = {act + (long)q * I};
    float acc[1];
    row_dot_partial<1>(D, r, I, xs, 1, lane, acc);
    bf16 y = f2bf(warp_sum(acc[0]));
    if (lane == 0) ys[j] = y;
    __syncthreads();
    if (threadIdx.x != 0) return;
    float a = 0.f;
    for (int s = 0; s < K; s++) a = combine_step(a, wts[m * K + s], ys[s]);
    bf16 out = f2bf(a);
    if (shared) out = add_bf16(out, shared[(long)m * H + r]);
    x[(long)m * H + r] = add_bf16(x[(long)m * H + r], out);
}

// residual_norm with o_proj (decode): x[r] = bf16(x[r] + bf16(o[r]·attn + b)) per row, then
// the last block to finish writes h = rmsnorm(x) ⊙ nw (= matvec + add_inplace + rmsnorm).
// 256 threads (8 rows) per block, as the rmsnorm launch, so the norm reduces identically.
extern "C" __global__ void o_proj_add_rmsnorm(QMAT_ARGS, const bf16* attn, const float* bias, bf16* x, const float* nw,
                                              bf16* h, int H, int K, float eps, int* ticket) {
    int lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r < H) {
        const bf16* xs[1] = {attn};
        float acc[1];
        row_dot_partial<1>(QMAT_MAKE, r, K, xs, 1, lane, acc);
        float v = warp_sum(acc[0]);
        if (lane == 0) {
            if (bias) v += bias[r];
            x[r] = add_bf16(x[r], f2bf(v));
        }
    }
    if (last_to_finish(ticket, gridDim.x)) rmsnorm_row(x, nw, h, H, eps);
}

// swiglu_mlp: act[m, r] = swiglu(bf16(gate[r]·x_m + bg), bf16(up[r]·x_m + bu)) (= matvec
// twice + swiglu). Grid (ceil(F/4), 1, ceil(M/8)), 8 tokens per block like matvec.
extern "C" __global__ void dense_gate_up_swiglu(QMAT_ARGS, const void* uw, const bf16* us, const bf16* ub,
                                                const float* gbias, const float* ubias, const bf16* x, bf16* act, int F,
                                                int H, int M) {
    QMat G = QMAT_MAKE, U = {uw, us, ub, fmt, bits, group};
    int lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int m0 = blockIdx.z * 8, mt = min(8, M - m0);
    if (r >= F || mt <= 0) return;
    const bf16* xs[8];
#pragma unroll
    for (int m = 0; m < 8; m++) xs[m] = x + (long)(m0 + min(m, mt - 1)) * H;
    float ag[8], au[8];
    row_dot_partial<8>(G, r, H, xs, mt, lane, ag);
    row_dot_partial<8>(U, r, H, xs, mt, lane, au);
#pragma unroll
    for (int m = 0; m < 8; m++) {
        if (m < mt) {
            float g = warp_sum(ag[m]), u = warp_sum(au[m]);
            if (lane == 0) {
                if (gbias) g += gbias[r];
                if (ubias) u += ubias[r];
                act[(long)(m0 + m) * F + r] = swiglu_elem(f2bf(g), f2bf(u));
            }
        }
    }
}

// residual_norm: x = bf16(x + src) row-wise, then y = rmsnorm(x) ⊙ w (= add_inplace +
// rmsnorm). One block of 256 threads per row, as the rmsnorm launch.
extern "C" __global__ void add_rmsnorm(bf16* x, const bf16* src, const float* w, bf16* y, int n, float eps) {
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

// qkv_proj: q, k and v = x W^T (+ bias) for the three matrices in one launch (= matvec ×3).
// Rows 0..nq of the grid are q's, then k's, then v's; the three share one storage format.
// Grid (ceil((nq + nk + nv) / 4), 1, ceil(M / MT)); qkv_proj1 is the M = 1 instance.
#define QKV_KERNEL(NAME, MT)                                                                                        \
    extern "C" __global__ void NAME(QMAT_ARGS, const void* kw, const bf16* ks, const bf16* kb, const void* vw,     \
                                    const bf16* vs, const bf16* vb, const float* qbias, const float* kbias,         \
                                    const float* vbias, const bf16* x, bf16* q, bf16* k, bf16* v, int nq, int nk,  \
                                    int nv, int K, int M) {                                                         \
        long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);                                       \
        int m0 = blockIdx.z * MT, mt = min(MT, M - m0);                                                             \
        if (r >= nq + nk + nv || mt <= 0) return;                                                                   \
        QMat W = QMAT_MAKE;                                                                                         \
        bf16* y = q;                                                                                                \
        const float* bias = qbias;                                                                                  \
        int n = nq;                                                                                                 \
        if (r >= nq + nk) {                                                                                         \
            W = QMat{vw, vs, vb, fmt, bits, group}, y = v, bias = vbias, n = nv, r -= nq + nk;                      \
        } else if (r >= nq) {                                                                                       \
            W = QMat{kw, ks, kb, fmt, bits, group}, y = k, bias = kbias, n = nk, r -= nq;                           \
        }                                                                                                           \
        matvec_row<MT>(W, r, x, y, bias, n, K, m0, mt, 0);                                                          \
    }
QKV_KERNEL(qkv_proj, 8)
QKV_KERNEL(qkv_proj1, 1)

// qk_norm_rope: per (token, head) block of 128 threads (as the head-norm launch): q heads
// get q_norm then RoPE; k heads k_norm, RoPE, then the cache row; v heads are copied to the
// cache (= rmsnorm ×2 + rope + kv_append). Grid (M·(nh + 2·nkv)).
extern "C" __global__ void qk_norm_rope_kv(bf16* q, bf16* k, const bf16* v, const float* qw, const float* kw,
                                           const float* inv_freq, const int* pos, bf16* kc, bf16* vc, int nh, int nkv,
                                           int D, int d_rot, float eps) {
    int per = nh + 2 * nkv, m = blockIdx.x / per, h = blockIdx.x % per;
    int p = *pos + m;
    long W = (long)nkv * D;
    if (h >= nh + nkv) {
        int vh = h - nh - nkv;
        for (int i = threadIdx.x; i < D; i += blockDim.x) vc[p * W + vh * D + i] = v[m * W + vh * D + i];
        return;
    }
    bool is_q = h < nh;
    bf16* hp = is_q ? q + ((long)m * nh + h) * D : k + (m * W + (long)(h - nh) * D);
    rmsnorm_row(hp, is_q ? qw : kw, hp, D, eps);
    __syncthreads();
    for (int i = threadIdx.x; i < d_rot / 2; i += blockDim.x) rope_pair(hp, i, d_rot / 2, p, inv_freq[i]);
    if (is_q) return;
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) kc[p * W + (long)(h - nh) * D + i] = hp[i];
}

// qk_norm_rope for MLA: per (token, head) block of 256 threads (as the rmsnorm launch):
// query heads get RoPE on their rope slice; block nh normalises the latent of the Kva row in
// place, ropes k_pe and appends the row to the latent cache (= rmsnorm + mla_rope +
// cache_append). Grid M·(nh + 1).
extern "C" __global__ void latent_norm_rope_append(bf16* q, bf16* kva, const float* nw, const float* inv_freq,
                                                   const int* pos, bf16* cache, int nh, int dqk, int nope, int row,
                                                   int lat, int d_rot, float scaling, int interleaved, float eps) {
    int m = blockIdx.x / (nh + 1), h = blockIdx.x % (nh + 1), p = *pos + m;
    if (h < nh) {
        rope_slice(q + ((long)m * nh + h) * dqk + nope, d_rot, p, inv_freq, scaling, interleaved);
        return;
    }
    bf16* v = kva + (long)m * row;
    rmsnorm_row(v, nw, v, lat, eps);
    __syncthreads();
    rope_slice(v + lat, d_rot, p, inv_freq, scaling, interleaved);
    __syncthreads();
    for (int i = threadIdx.x; i < row; i += blockDim.x) cache[(long)p * row + i] = v[i];
}
