// Primitive kernels of the reference plan: one kernel per step (DESIGN.md). Shapes in
// comments: M = tokens in this call, H = hidden, D = head dim, E = experts, K = top-k.
// Activations are bf16, accumulation f32, router and logits f32.

#define QMAT_ARGS const void* w, const bf16* s, const bf16* b, int fmt, int bits, int group
#define QMAT_MAKE {w, s, b, fmt, bits, group}

// x[M, H] = dequant(table[tokens[m]])
extern "C" __global__ void embed(QMAT_ARGS, const int* tokens, bf16* out, int H) {
    QMat W = QMAT_MAKE;
    long r = tokens[blockIdx.x];
    for (int k = threadIdx.x; k < H; k += blockDim.x) out[(long)blockIdx.x * H + k] = f2bf(qmat_elem(W, r, H, k));
}

// y[M, N] = x[M, K] W^T (+ bias): one warp per output row, blockIdx.z = group of 8 tokens.
// y is bf16, or f32 when out_f32 (router logits, lm_head).
extern "C" __global__ void matvec(QMAT_ARGS, const bf16* x, void* y, const float* bias, int N, int K, int M, int out_f32) {
    QMat W = QMAT_MAKE;
    int lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int m0 = blockIdx.z * 8, mt = min(8, M - m0);
    if (r >= N || mt <= 0) return;
    float acc[8];
    row_dot_partial<8>(W, r, K, x + (long)m0 * K, K, mt, lane, acc);
#pragma unroll
    for (int m = 0; m < 8; m++) {
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

// Selected-expert rows: row q of y [R, N] = W[idx[q]] · x[q / per]  (R = M·K rows).
// Expert e's weights start at w + e·w_stride (elements of the storage type) etc.
extern "C" __global__ void expert_matvec(QMAT_ARGS, long w_stride, long sb_stride, const int* idx, int per, const bf16* x,
                                         bf16* y, int N, int K) {
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= N) return;
    long e = idx[q];
    QMat W = QMAT_MAKE;
    W.w = fmt == FMT_BF16 ? (const void*)((const bf16*)w + e * w_stride) : (const void*)((const u32*)w + e * w_stride);
    W.s = s + e * sb_stride;
    W.b = b + e * sb_stride;
    float acc[1];
    row_dot_partial<1>(W, r, K, x + (long)(q / per) * K, K, 1, lane, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) y[(long)q * N + r] = f2bf(v);
}

// y[rows, n] = rmsnorm(x) * w, one block per row (x == y allowed: per-head q/k norm).
extern "C" __global__ void rmsnorm(const bf16* x, const float* w, bf16* y, int n, float eps) {
    rmsnorm_row(x + (long)blockIdx.x * n, w, y + (long)blockIdx.x * n, n, eps);
}

// Half-split RoPE in place on q[M, nh, D] and k[M, nkv, D] at positions *pos + m.
// Block = one (token, head) of q then k; thread i rotates the pair (i, i + d_rot/2).
extern "C" __global__ void rope(bf16* q, bf16* k, const float* inv_freq, const int* pos, int nh, int nkv, int D, int d_rot) {
    int m = blockIdx.x / (nh + nkv), h = blockIdx.x % (nh + nkv);
    bf16* v = h < nh ? q + ((long)m * nh + h) * D : k + ((long)m * nkv + (h - nh)) * D;
    int half = d_rot / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float sn, cs;
        sincosf((float)(*pos + m) * inv_freq[i], &sn, &cs);
        float a = bf2f(v[i]), b2 = bf2f(v[i + half]);
        v[i] = f2bf(a * cs - b2 * sn);
        v[i + half] = f2bf(b2 * cs + a * sn);
    }
}

// Append M rows of K and V ([M, W] each) to the caches at rows *pos .. *pos+M-1.
extern "C" __global__ void kv_append(const bf16* k, const bf16* v, bf16* kc, bf16* vc, const int* pos, int W) {
    long dst = (long)(*pos + blockIdx.x) * W, src = (long)blockIdx.x * W;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}

// Split-KV causal attention, pass 1. Grid (M·nh, nsplit), 4 warps. Query m (absolute position
// *pos + m) of head h reads keys [split·chunk, min((split+1)·chunk, pos+m+1)) of KV head
// h / (nh/nkv); each warp takes every 4th key with an online softmax, then the warps merge.
// Writes part_o[(mh·nsplit + split)·D + d] (unnormalised) and part_ml[..·2] = (max, sum).
#define MAXD 256
extern "C" __global__ void attn_partial(const bf16* q, const bf16* kc, const bf16* vc, const int* pos, float* part_o,
                                        float* part_ml, int nh, int nkv, int D, float scale, int chunk, int nsplit) {
    int mh = blockIdx.x, split = blockIdx.y, m = mh / nh, h = mh % nh;
    int kvh = h / (nh / nkv), lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int n_keys = *pos + m + 1;
    int s0 = split * chunk, s1 = min(s0 + chunk, n_keys);
    long out = (long)mh * nsplit + split;
    // Lane l holds elements l, l+32, ... of the head (D ≤ MAXD).
    float qv[MAXD / 32], acc[MAXD / 32];
    const bf16* qr = q + (long)mh * D;
#pragma unroll
    for (int i = 0; i < MAXD / 32; i++) {
        qv[i] = lane + 32 * i < D ? bf2f(qr[lane + 32 * i]) : 0.f;
        acc[i] = 0.f;
    }
    float mx = -INFINITY, l = 0.f;
    for (int s = s0 + wid; s < s1; s += nw) {
        const bf16* kr = kc + ((long)s * nkv + kvh) * D + lane;
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < MAXD / 32; i++) if (lane + 32 * i < D) d += qv[i] * bf2f(kr[32 * i]);
        d = warp_sum(d) * scale;
        float mn = fmaxf(mx, d), a = expf(mx - mn), p = expf(d - mn);
        const bf16* vr = vc + ((long)s * nkv + kvh) * D + lane;
#pragma unroll
        for (int i = 0; i < MAXD / 32; i++) if (lane + 32 * i < D) acc[i] = acc[i] * a + p * bf2f(vr[32 * i]);
        l = l * a + p;
        mx = mn;
    }
    __shared__ float sm_ml[8][2];
    __shared__ float sm_o[8][MAXD];
    if (lane == 0) { sm_ml[wid][0] = mx; sm_ml[wid][1] = l; }
#pragma unroll
    for (int i = 0; i < MAXD / 32; i++) if (lane + 32 * i < D) sm_o[wid][lane + 32 * i] = acc[i];
    __syncthreads();
    if (wid == 0) {
        float M2 = -INFINITY;
        for (int w2 = 0; w2 < nw; w2++) M2 = fmaxf(M2, sm_ml[w2][0]);
        float L = 0.f;
        float o[MAXD / 32];
#pragma unroll
        for (int i = 0; i < MAXD / 32; i++) o[i] = 0.f;
        for (int w2 = 0; w2 < nw; w2++) {
            float f = sm_ml[w2][1] > 0.f ? expf(sm_ml[w2][0] - M2) : 0.f;
            L += sm_ml[w2][1] * f;
#pragma unroll
            for (int i = 0; i < MAXD / 32; i++) if (lane + 32 * i < D) o[i] += sm_o[w2][lane + 32 * i] * f;
        }
#pragma unroll
        for (int i = 0; i < MAXD / 32; i++) if (lane + 32 * i < D) part_o[out * D + lane + 32 * i] = o[i];
        if (lane == 0) { part_ml[out * 2] = M2; part_ml[out * 2 + 1] = L; }
    }
}

// Pass 2: merge the splits of each (token, head) and write bf16 out[M, nh·D].
extern "C" __global__ void attn_combine(const float* part_o, const float* part_ml, bf16* out, int D, int nsplit) {
    int mh = blockIdx.x;
    float M2 = -INFINITY;
    for (int s = 0; s < nsplit; s++) if (part_ml[((long)mh * nsplit + s) * 2 + 1] > 0.f) M2 = fmaxf(M2, part_ml[((long)mh * nsplit + s) * 2]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int s = 0; s < nsplit; s++) {
            long o = (long)mh * nsplit + s;
            float L = part_ml[o * 2 + 1];
            if (L > 0.f) {
                float f = expf(part_ml[o * 2] - M2);
                num += part_o[o * D + d] * f;
                den += L * f;
            }
        }
        out[(long)mh * D + d] = f2bf(num / den);
    }
}

// Router: softmax over E f32 logits, top-K (largest first, lowest index wins ties),
// optional renormalisation. One warp per token; E ≤ 1024.
extern "C" __global__ void router_topk(const float* logits, int E, int K, int norm, int* idx, float* wout) {
    int m = blockIdx.x, lane = threadIdx.x;
    const float* l = logits + (long)m * E;
    float v[32];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < 32; i++) { int e = lane + 32 * i; v[i] = e < E ? l[e] : -INFINITY; mx = fmaxf(mx, v[i]); }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 32; i++) { int e = lane + 32 * i; v[i] = e < E ? expf(v[i] - mx) : -1.f; sum += e < E ? v[i] : 0.f; }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < 32; i++) if (lane + 32 * i < E) v[i] = v[i] / sum;
    float tot = 0.f, sel[16];
    for (int j = 0; j < K; j++) {
        float bv = -2.f; int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < 32; i++) { int e = lane + 32 * i; if (v[i] > bv) { bv = v[i]; bi = e; } }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o); int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if ((bi & 31) == lane) {
#pragma unroll
            for (int i = 0; i < 32; i++) if (lane + 32 * i == bi) v[i] = -2.f;
        }
        sel[j] = bv; tot += bv;
        if (lane == 0) idx[m * K + j] = bi;
    }
    if (lane == 0) for (int j = 0; j < K; j++) wout[m * K + j] = norm ? sel[j] / tot : sel[j];
}

// act = bf16(bf16(silu(g)) * u), elementwise over n.
extern "C" __global__ void swiglu(const bf16* g, const bf16* u, bf16* act, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        act[i] = f2bf(bf2f(f2bf(silu(bf2f(g[i])))) * bf2f(u[i]));
}

// out[m, :] = bf16(sum_j w[m, j] * y[m·K + j, :]), f32 accumulation in slot order.
extern "C" __global__ void combine(const bf16* y, const float* w, bf16* out, int K, int H) {
    int m = blockIdx.x;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        float a = 0.f;
        for (int j = 0; j < K; j++) a += w[m * K + j] * bf2f(y[((long)m * K + j) * H + h]);
        out[(long)m * H + h] = f2bf(a);
    }
}

// x = bf16(x + y) over n elements (residual add).
extern "C" __global__ void add_inplace(bf16* x, const bf16* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

// Copies row `row` of x[rows, n] to the front (keep only the last token's hidden state).
extern "C" __global__ void take_row(const bf16* x, bf16* y, int row, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[(long)row * n + i];
}
