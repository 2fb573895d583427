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
    extern "C" __global__ void NAME(QMAT_ARGS, const bf16* x, void* y, const float* bias, int N, int K, int M,      \
                                    int out_f32) {                                                                  \
        long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);                                       \
        int m0 = blockIdx.z * MT, mt = min(MT, M - m0);                                                             \
        if (r < N && mt > 0) matvec_row<MT>(QMAT_MAKE, r, x, y, bias, N, K, m0, mt, out_f32);                       \
    }
MATVEC_KERNEL(matvec, 8)
MATVEC_KERNEL(matvec1, 1)

#define EXPERT_ARGS QMAT_ARGS, long w_stride, long sb_stride

// Selected-expert rows (decode): row q of y [R, N] = W[idx[q]] · x[q / per]  (R = M·K rows,
// per = K for gate/up reading the token's input, 1 for down reading the slot's activation).
extern "C" __global__ void expert_matvec(EXPERT_ARGS, const int* idx, int per, const bf16* x, bf16* y, int N, int K) {
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= N) return;
    QMat W = expert_slice(QMAT_MAKE, idx[q], w_stride, sb_stride);
    const bf16* xs[1] = {x + (long)(q / per) * K};
    float acc[1];
    row_dot_partial<1>(W, r, K, xs, 1, lane, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) y[(long)q * N + r] = f2bf(v);
}

// Groups the R = M·K (token, slot) rows by expert for prefill: off[E + 1] is the exclusive
// prefix sum of rows per expert, rows[off[e] .. off[e+1]) the rows routed to e in
// ascending order. One block; thread e owns expert e (E ≤ 1024).
extern "C" __global__ void moe_group(const int* idx, int R, int E, int* off, int* rows) {
    __shared__ int cnt[1024];
    int e = threadIdx.x;
    int c = 0;
    if (e < E) for (int q = 0; q < R; q++) c += idx[q] == e;
    cnt[e] = c;
    __syncthreads();
    if (e == 0) {
        int acc = 0;
        for (int i = 0; i < E; i++) { int n = cnt[i]; off[i] = acc; cnt[i] = acc; acc += n; }
        off[E] = acc;
    }
    __syncthreads();
    if (e < E) {
        int o = cnt[e];
        for (int q = 0; q < R; q++) if (idx[q] == e) rows[o++] = q;
    }
}

// Selected-expert rows (prefill), grouped: block (x, e) computes rows blockIdx.x·4.. of
// expert e for every (token, slot) row routed to e, 8 at a time, so each expert's weights
// are read once per 8 routed rows instead of once per row. Same per-row arithmetic as
// expert_matvec, hence bit-identical outputs.
extern "C" __global__ void expert_matvec_grouped(EXPERT_ARGS, const int* off, const int* rows, int per, const bf16* x,
                                                 bf16* y, int N, int K) {
    int e = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int q0 = off[e], q1 = off[e + 1];
    if (r >= N || q0 == q1) return;
    QMat W = expert_slice(QMAT_MAKE, e, w_stride, sb_stride);
    for (int j = q0; j < q1; j += 8) {
        int mt = min(8, q1 - j);
        const bf16* xs[8];
#pragma unroll
        for (int m = 0; m < 8; m++) xs[m] = x + (long)(rows[j + min(m, mt - 1)] / per) * K;
        float acc[8];
        row_dot_partial<8>(W, r, K, xs, mt, lane, acc);
#pragma unroll
        for (int m = 0; m < 8; m++) {
            if (m < mt) {
                float v = warp_sum(acc[m]);
                if (lane == 0) y[(long)rows[j + m] * N + r] = f2bf(v);
            }
        }
    }
}

// y[rows, :n] = rmsnorm(x[rows, :n]) * w, one block per row; rows are ld elements apart in
// x and y (x == y allowed: per-head q/k norms, MLA's latent norm inside the Kva row).
extern "C" __global__ void rmsnorm(const bf16* x, const float* w, bf16* y, int n, int ld, float eps) {
    rmsnorm_row(x + (long)blockIdx.x * ld, w, y + (long)blockIdx.x * ld, n, eps);
}

// Half-split RoPE in place on q[M, nh, D] and k[M, nkv, D] at positions *pos + m.
// Block = one (token, head) of q then k; thread i rotates the pair (i, i + d_rot/2).
extern "C" __global__ void rope(bf16* q, bf16* k, const float* inv_freq, const int* pos, int nh, int nkv, int D, int d_rot) {
    int m = blockIdx.x / (nh + nkv), h = blockIdx.x % (nh + nkv);
    bf16* v = h < nh ? q + ((long)m * nh + h) * D : k + ((long)m * nkv + (h - nh)) * D;
    for (int i = threadIdx.x; i < d_rot / 2; i += blockDim.x) rope_pair(v, i, d_rot / 2, *pos + m, inv_freq[i]);
}

// Append M rows of K and V ([M, W] each) to the caches at rows *pos .. *pos+M-1.
extern "C" __global__ void kv_append(const bf16* k, const bf16* v, bf16* kc, bf16* vc, const int* pos, int W) {
    long dst = (long)(*pos + blockIdx.x) * W, src = (long)blockIdx.x * W;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}

// Split-KV causal attention. Grid (M·nh, nsplit), ATTN_THREADS threads. Query m
// (absolute position *pos + m) of head h attends to keys [0, n) of KV head h / (nh/nkv),
// n = *pos + m + 1; split s takes the s-th of nsplit equal runs of them (the run length
// follows the position at run time, so a captured graph stays right as the context grows).
// Per pass of ATTN_THREADS keys: thread t scores key t (a whole 16-byte-vectorised dot
// product, so the key loads of a pass are independent), the block takes max and sum of
// the pass, then thread t accumulates dimensions t, t + ATTN_THREADS of Σ p·V in key order.
// Writes part_o[(mh·nsplit + s)·D + d] (unnormalised) and part_ml[..·2] = (max, sum); the
// last split block of a (token, head) to finish (tickets[mh], reset after use) merges the
// splits into bf16 out[M, nh·D].
#define MAXD 256
#define ATTN_THREADS 128

// Merges the nsplit partial results of one (token, head) — po[nsplit, D] unnormalised
// sums, ml[nsplit, 2] = (max, sum) — into bf16 out[D]: each split is rescaled to the common
// maximum; empty splits (sum 0) drop out. Called by the whole block that finished last.
__device__ void merge_splits(const float* po, const float* pml, int nsplit, int D, bf16* out) {
    __shared__ float ml[2 * ATTN_THREADS];
    int tid = threadIdx.x;
    for (int i = tid; i < 2 * nsplit; i += ATTN_THREADS) ml[i] = __ldcg(pml + i);
    __syncthreads();
    float M2 = -INFINITY;
    for (int s = 0; s < nsplit; s++) if (ml[2 * s + 1] > 0.f) M2 = fmaxf(M2, ml[2 * s]);
    for (int d = tid; d < D; d += ATTN_THREADS) {
        float num = 0.f, den = 0.f;
#pragma unroll 4
        for (int s = 0; s < nsplit; s++) {
            float L = ml[2 * s + 1];
            if (L > 0.f) {
                float f = expf(ml[2 * s] - M2);
                num += __ldcg(po + (long)s * D + d) * f;
                den += L * f;
            }
        }
        out[d] = f2bf(num / den);
    }
}
extern "C" __global__ void attention(const bf16* q, const bf16* kc, const bf16* vc, const int* pos, float* part_o,
                                     float* part_ml, int* tickets, bf16* out, int nh, int nkv, int D, float scale,
                                     int nsplit) {
    __shared__ float qs[MAXD];
    __shared__ float p[ATTN_THREADS];
    int mh = blockIdx.x, split = blockIdx.y, m = mh / nh, h = mh % nh;
    int kvh = h / (nh / nkv), tid = threadIdx.x;
    int n_keys = *pos + m + 1, chunk = (n_keys + nsplit - 1) / nsplit;
    int s0 = split * chunk, s1 = min(s0 + chunk, n_keys);
    for (int d = tid; d < D; d += ATTN_THREADS) qs[d] = bf2f(q[(long)mh * D + d]);
    __syncthreads();
    float mx = -INFINITY, l = 0.f, acc[MAXD / ATTN_THREADS] = {0.f, 0.f};
    for (int base = s0; base < s1; base += ATTN_THREADS) {
        int s = base + tid, cnt = min(ATTN_THREADS, s1 - base);
        float sc = -INFINITY;
        if (tid < cnt) {
            const uint4* kr = (const uint4*)(kc + ((long)s * nkv + kvh) * D);
            float dot = 0.f;
#pragma unroll 8
            for (int c = 0; c < D / 8; c++) {
                float kf[8];
                unpack8(kr[c], kf);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += qs[c * 8 + i] * kf[i];
            }
            sc = dot * scale;
        }
        float mn = fmaxf(mx, block_max(sc));
        float pe = tid < cnt ? expf(sc - mn) : 0.f;
        float ps = block_sum(pe), a = expf(mx - mn);
        p[tid] = pe;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < MAXD / ATTN_THREADS; i++) {
            int d = tid + i * ATTN_THREADS;
            if (d < D) {
                const bf16* vr = vc + ((long)base * nkv + kvh) * D + d;
                float o = 0.f;
#pragma unroll 8
                for (int j = 0; j < cnt; j++) o += p[j] * bf2f(vr[(long)j * nkv * D]);
                acc[i] = acc[i] * a + o;
            }
        }
        l = l * a + ps;
        mx = mn;
        __syncthreads();
    }
    long slot = (long)mh * nsplit + split;
#pragma unroll
    for (int i = 0; i < MAXD / ATTN_THREADS; i++) {
        int d = tid + i * ATTN_THREADS;
        if (d < D) part_o[slot * D + d] = acc[i];
    }
    if (tid == 0) { part_ml[slot * 2] = mx; part_ml[slot * 2 + 1] = l; }
    if (!last_to_finish(tickets + mh, nsplit)) return;
    merge_splits(part_o + (long)mh * nsplit * D, part_ml + (long)mh * nsplit * 2, nsplit, D, out + (long)mh * D);
}

// ---- Multi-head latent attention (GLM-4.7-Flash, DeepSeek-V3) -------------------------

// Per-head mat-vecs with the heads' matrices stacked like experts (MLA's W_UKᵀ and W_UV):
// row q = m·nh + h of y [M·nh, N] = W[h] · x_q[0:K], where x_q = x + q·x_ld (the first K
// elements of a row wider than K: q_nope of a query head). Grid (ceil(N/4), nh); block h
// takes the tokens MT at a time, so prefill reads each head's matrix once per MT tokens.
// Both instantiations give each row the same arithmetic (row_dot_partial), bit for bit.
#define HEAD_MATVEC_KERNEL(NAME, MT)                                                                                \
    extern "C" __global__ void NAME(EXPERT_ARGS, const bf16* x, long x_ld, int nh, bf16* y, int N, int K, int M) {  \
        int h = blockIdx.y, lane = threadIdx.x & 31;                                                                \
        long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);                                       \
        if (r >= N) return;                                                                                         \
        QMat W = expert_slice(QMAT_MAKE, h, w_stride, sb_stride);                                                   \
        for (int m0 = 0; m0 < M; m0 += MT) {                                                                        \
            int mt = min(MT, M - m0);                                                                               \
            const bf16* xs[MT];                                                                                     \
            _Pragma("unroll") for (int m = 0; m < MT; m++) xs[m] = x + ((long)(m0 + min(m, mt - 1)) * nh + h) * x_ld; \
            float acc[MT];                                                                                          \
            row_dot_partial<MT>(W, r, K, xs, mt, lane, acc);                                                        \
            _Pragma("unroll") for (int m = 0; m < MT; m++) {                                                        \
                if (m < mt) {                                                                                       \
                    float v = warp_sum(acc[m]);                                                                     \
                    if (lane == 0) y[((long)(m0 + m) * nh + h) * N + r] = f2bf(v);                                  \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }
HEAD_MATVEC_KERNEL(head_matvec, 8)
HEAD_MATVEC_KERNEL(head_matvec1, 1)

// RoPE in place (interleaved pairs (2i, 2i+1), or half-split (i, i + d_rot/2), rotated by
// inv_freq[i], cos/sin times `scaling`) on the rope slice of every query head —
// q[M, nh, dqk] at offset `nope` — and on the shared k_pe — kva[M, row] at offset `lat`.
// Grid M·(nh + 1), one pair per thread.
__device__ __forceinline__ void rope_slice(bf16* v, int d_rot, int p, const float* inv_freq, float scaling,
                                           int interleaved) {
    for (int i = threadIdx.x; i < d_rot / 2; i += blockDim.x) {
        float sn, cs;
        sincosf((float)p * inv_freq[i], &sn, &cs);
        cs *= scaling;
        sn *= scaling;
        int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + d_rot / 2;
        float a = bf2f(v[ia]), b = bf2f(v[ib]);
        v[ia] = f2bf(a * cs - b * sn);
        v[ib] = f2bf(b * cs + a * sn);
    }
}

extern "C" __global__ void mla_rope(bf16* q, bf16* kva, const float* inv_freq, const int* pos, int nh, int dqk,
                                    int nope, int row, int lat, int d_rot, float scaling, int interleaved) {
    int m = blockIdx.x / (nh + 1), h = blockIdx.x % (nh + 1);
    bf16* v = h < nh ? q + ((long)m * nh + h) * dqk + nope : kva + (long)m * row + lat;
    rope_slice(v, d_rot, *pos + m, inv_freq, scaling, interleaved);
}

// Append M rows x[M, W] to cache rows *pos .. *pos+M-1 (MLA's latent cache).
extern "C" __global__ void cache_append(const bf16* x, bf16* cache, const int* pos, int W) {
    long dst = (long)(*pos + blockIdx.x) * W, src = (long)blockIdx.x * W;
    for (int i = threadIdx.x; i < W; i += blockDim.x) cache[dst + i] = x[src + i];
}

// Split-KV causal attention over the latent cache (one KV row per position, shared by all
// heads): for query (m, h), score_s = (qlat[m,h]·c_s + q_pe[m,h]·k_pe_s) · scale with
// cache row s = [c_s (L) | k_pe_s (R)], and out[m,h] = Σ_s p_s c_s (L wide). Same scheme as
// `attention`: grid (M·nh, nsplit), thread t scores key t of a pass, the last split block
// to finish merges. L ≤ MLA_MAXL, L and R multiples of 8.
#define MLA_MAXL 512
#define MLA_MAXR 64
extern "C" __global__ void mla_attention(const bf16* qlat, const bf16* q, const bf16* cache, const int* pos,
                                         float* part_o, float* part_ml, int* tickets, bf16* out, int nh, int dqk,
                                         int nope, int L, int R, float scale, int nsplit) {
    __shared__ float qs[MLA_MAXL + MLA_MAXR];
    __shared__ float p[ATTN_THREADS];
    int mh = blockIdx.x, split = blockIdx.y, m = mh / nh, tid = threadIdx.x;
    int row = L + R;
    int n_keys = *pos + m + 1, chunk = (n_keys + nsplit - 1) / nsplit;
    int s0 = split * chunk, s1 = min(s0 + chunk, n_keys);
    for (int d = tid; d < L; d += ATTN_THREADS) qs[d] = bf2f(qlat[(long)mh * L + d]);
    for (int d = tid; d < R; d += ATTN_THREADS) qs[L + d] = bf2f(q[(long)mh * dqk + nope + d]);
    __syncthreads();
    float mx = -INFINITY, l = 0.f, acc[MLA_MAXL / ATTN_THREADS] = {0.f, 0.f, 0.f, 0.f};
    const int warp = tid >> 5, lane = tid & 31, nwarps = ATTN_THREADS / 32;
    for (int base = s0; base < s1; base += ATTN_THREADS) {
        int cnt = min(ATTN_THREADS, s1 - base);
        // Scores: a warp per key (the row is long: 72 16-byte chunks at GLM's 512 + 64),
        // lanes split its chunks, then a warp sum; p[j] holds key j's scaled score.
        for (int j = warp; j < cnt; j += nwarps) {
            const uint4* kr = (const uint4*)(cache + (long)(base + j) * row);
            float dot = 0.f;
            for (int c = lane; c < row / 8; c += 32) {
                float kf[8];
                unpack8(kr[c], kf);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += qs[c * 8 + i] * kf[i];
            }
            dot = warp_sum(dot);
            if (lane == 0) p[j] = dot * scale;
        }
        __syncthreads();
        float sc = tid < cnt ? p[tid] : -INFINITY;
        float mn = fmaxf(mx, block_max(sc));
        float pe = tid < cnt ? expf(sc - mn) : 0.f;
        float ps = block_sum(pe), a = expf(mx - mn);
        p[tid] = pe;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < MLA_MAXL / ATTN_THREADS; i++) {
            int d = tid + i * ATTN_THREADS;
            if (d < L) {
                const bf16* vr = cache + (long)base * row + d;
                float o = 0.f;
#pragma unroll 8
                for (int j = 0; j < cnt; j++) o += p[j] * bf2f(vr[(long)j * row]);
                acc[i] = acc[i] * a + o;
            }
        }
        l = l * a + ps;
        mx = mn;
        __syncthreads();
    }
    long slot = (long)mh * nsplit + split;
#pragma unroll
    for (int i = 0; i < MLA_MAXL / ATTN_THREADS; i++) {
        int d = tid + i * ATTN_THREADS;
        if (d < L) part_o[slot * L + d] = acc[i];
    }
    if (tid == 0) { part_ml[slot * 2] = mx; part_ml[slot * 2 + 1] = l; }
    if (!last_to_finish(tickets + mh, nsplit)) return;
    merge_splits(part_o + (long)mh * nsplit * L, part_ml + (long)mh * nsplit * 2, nsplit, L, out + (long)mh * L);
}

// GLM / DeepSeek router of one token by one warp (model-spec §3.6): s = sigmoid(logit);
// selection on s + bias among the topk_group groups (of n_group ≤ 32) with the largest
// sum of their two best biased scores (lowest group wins ties), top-K with the lowest
// index winning ties; weights = s of the chosen experts, / (Σ + 1e-20) when norm, × scale.
// E ≤ 1024.
// Logits are read through L2 (__ldcg): the fused router reads what other blocks just wrote.
__device__ void router_sigmoid_warp(const float* lg, const float* bias, int E, int K, int n_group, int topk_group,
                                    int norm, float scale, int* idx, float* wout) {
    __shared__ float gs[32];
    __shared__ int keep[32];
    int lane = threadIdx.x & 31;
    float sg[32], c[32];
#pragma unroll
    for (int i = 0; i < 32; i++) {
        int e = lane + 32 * i;
        sg[i] = e < E ? 1.f / (1.f + expf(-__ldcg(lg + e))) : 0.f;
        c[i] = e < E ? sg[i] + bias[e] : -INFINITY;
    }
    if (n_group > 1) {
        // Group scores: top-2 sum of each group, lane g owning group g.
        int per = E / n_group;
        __shared__ float cs[1024];
#pragma unroll
        for (int i = 0; i < 32; i++) { int e = lane + 32 * i; if (e < E) cs[e] = c[i]; }
        __syncwarp();
        if (lane < n_group) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = lane * per; e < (lane + 1) * per; e++) {
                float v = cs[e];
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
            }
            gs[lane] = b1 + b2;
            keep[lane] = 0;
        }
        __syncwarp();
        if (lane == 0) {
            for (int j = 0; j < topk_group; j++) {
                int bi = -1;
                for (int g = 0; g < n_group; g++) if (!keep[g] && (bi < 0 || gs[g] > gs[bi])) bi = g;
                keep[bi] = 1;
            }
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 32; i++) { int e = lane + 32 * i; if (e < E && !keep[e / per]) c[i] = -INFINITY; }
    }
    float tot = 0.f, sel[16];
    unsigned taken = 0;  // bit i: expert lane + 32·i already chosen
    for (int j = 0; j < K; j++) {
        float bv = -INFINITY, bs = 0.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            int e = lane + 32 * i;
            if (e < E && !(taken >> i & 1u) && c[i] > bv) { bv = c[i]; bs = sg[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o), os = __shfl_xor_sync(0xffffffffu, bs, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bs = os; bi = oi; }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        sel[j] = bs;
        tot += bs;
        if (lane == 0) idx[j] = bi;
    }
    if (lane == 0) {
        float den = tot + 1e-20f;
        for (int j = 0; j < K; j++) wout[j] = (norm ? sel[j] / den : sel[j]) * scale;
    }
}

extern "C" __global__ void router_sigmoid(const float* logits, const float* bias, int E, int K, int n_group,
                                          int topk_group, int norm, float scale, int* idx, float* wout) {
    int m = blockIdx.x;
    router_sigmoid_warp(logits + (long)m * E, bias, E, K, n_group, topk_group, norm, scale, idx + m * K, wout + m * K);
}

// Router: softmax over E f32 logits, top-K (largest first, lowest index wins ties),
// optional renormalisation. One warp per token; E ≤ 1024.
extern "C" __global__ void router_topk(const float* logits, int E, int K, int norm, int* idx, float* wout) {
    int m = blockIdx.x;
    router_topk_warp(logits + (long)m * E, E, K, norm, idx + m * K, wout + m * K);
}

// act = bf16(bf16(silu(g)) * u), elementwise over n.
extern "C" __global__ void swiglu(const bf16* g, const bf16* u, bf16* act, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        act[i] = swiglu_elem(g[i], u[i]);
}

// out[m, :] = bf16(sum_j w[m, j] * y[m·K + j, :]), f32 accumulation in slot order.
// Grid (M, ceil(H / blockDim)).
extern "C" __global__ void combine(const bf16* y, const float* w, bf16* out, int K, int H) {
    int m = blockIdx.x, h = blockIdx.y * blockDim.x + threadIdx.x;
    if (h >= H) return;
    float a = 0.f;
    for (int j = 0; j < K; j++) a = combine_step(a, w[m * K + j], y[((long)m * K + j) * H + h]);
    out[(long)m * H + h] = f2bf(a);
}

// x = bf16(x + y) over n elements (residual add).
extern "C" __global__ void add_inplace(bf16* x, const bf16* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = add_bf16(x[i], y[i]);
}

// Copies row `row` of x[rows, n] to the front (keep only the last token's hidden state).
extern "C" __global__ void take_row(const bf16* x, bf16* y, int row, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[(long)row * n + i];
}

// SplitMix64 output function (src/rng.rs `mix64`).
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// (value, id) order of the sampler: larger value first, lower id among equal values.
__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

#define SAMPLE_CAP 2048
#define SAMPLE_NATS 24.f
#define SAMPLE_BINS 2048
// Picks the next token from logits[V] like the host Sampler (src/sample.rs), one block of
// 1024 threads. temp ≤ 0: argmax, lowest id among equal maxima (exactly the host's pick).
// Otherwise, with x = l/temp − max: Z = Σ e^x over the whole vocabulary; a histogram of x
// over [−SAMPLE_NATS, 0] picks the largest top slice of at most SAMPLE_CAP candidates, which
// are sorted like the host sorts (value descending, id ascending). Then top_k, softmax,
// top_p and the draw u = (mix64(seed ^ mix64(step + 1)) >> 40) / 2^24 follow the host's
// steps (the same u; sums in another order, so a pick may differ by one rank where rounding
// moves a cumulative boundary). Tokens beyond SAMPLE_NATS carry < V·e^-24 of the top
// token's probability and are left out. out = [token, 0], or [-, 1] when the answer may lie outside the candidates
// (top_k larger than the slice, or the nucleus / the draw reaching past it): the host then
// samples the logits itself; or [0, 2] when a logit is NaN or infinite (the forward is broken:
// the host reports an error instead of a token).
extern "C" __global__ void sample_token(const float* logits, int V, float temp, float top_p, int top_k,
                                        unsigned long long seed, unsigned long long step, int* out) {
    __shared__ float sv[SAMPLE_CAP];
    __shared__ int si[SAMPLE_CAP];
    __shared__ int hist[SAMPLE_BINS];
    __shared__ float wv[32];
    __shared__ int wi[32];
    __shared__ int count, cut;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nt = blockDim.x;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    int bad = 0;
    for (int i = tid; i < V; i += nt) {
        float v = logits[i];
        bad |= (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;  // NaN or ±inf: exponent all ones
        if (bi == 0x7fffffff || v > bv) { bv = v; bi = i; }
    }
    // Block-uniform: every thread leaves together.
    if (__syncthreads_or(bad)) {
        if (tid == 0) { out[0] = 0; out[1] = 2; }
        return;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ranks_before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { wv[wid] = bv; wi[wid] = bi; }
    for (int b = tid; b < SAMPLE_BINS; b += nt) hist[b] = 0;
    if (tid == 0) count = 0;
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < nt / 32; w++) if (ranks_before(wv[w], wi[w], wv[0], wi[0])) { wv[0] = wv[w]; wi[0] = wi[w]; }
        if (temp <= 0.f) { out[0] = wi[0]; out[1] = 0; }
    }
    __syncthreads();
    if (temp <= 0.f) return;
    const float mx = wv[0] / temp, per_bin = SAMPLE_BINS / SAMPLE_NATS;
    float z = 0.f;
    for (int i = tid; i < V; i += nt) {
        float x = logits[i] / temp - mx;
        z += expf(x);
        if (x >= -SAMPLE_NATS) atomicAdd(&hist[min(SAMPLE_BINS - 1, (int)(-x * per_bin))], 1);
    }
    float z_all = block_sum(z);
    if (tid == 0) {
        int acc = 0, b = 0;
        while (b < SAMPLE_BINS && acc + hist[b] <= SAMPLE_CAP) acc += hist[b++];
        cut = b;
    }
    __syncthreads();
    const int nbins = cut;
    for (int i = tid; i < V; i += nt) {
        float x = logits[i] / temp - mx;
        if (x >= -SAMPLE_NATS && (int)(-x * per_bin) < nbins) {
            int k = atomicAdd(&count, 1);
            sv[k] = logits[i];
            si[k] = i;
        }
    }
    __syncthreads();
    int n = count;
    // Whether tokens within SAMPLE_NATS were left out for lack of room.
    bool sliced = nbins < SAMPLE_BINS;
    for (int j = n + tid; j < SAMPLE_CAP; j += nt) { sv[j] = -INFINITY; si[j] = 0x7fffffff; }
    // Bitonic sort of SAMPLE_CAP (value, id) pairs into sampler order.
    for (int size = 2; size <= SAMPLE_CAP; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = tid; i < SAMPLE_CAP; i += nt) {
                int j = i ^ stride;
                if (j > i) {
                    bool fwd = (i & size) == 0;
                    bool swap = fwd ? ranks_before(sv[j], si[j], sv[i], si[i]) : ranks_before(sv[i], si[i], sv[j], si[j]);
                    if (swap) {
                        float tv = sv[i]; sv[i] = sv[j]; sv[j] = tv;
                        int ti = si[i]; si[i] = si[j]; si[j] = ti;
                    }
                }
            }
        }
    }
    __syncthreads();
    if (tid != 0) return;
    out[1] = 1;  // until a pick is certain
    // The host keeps the top_k (or all V) tokens: `whole` = the candidates are exactly that set.
    bool whole;
    if (top_k > 0 && top_k <= n) { n = top_k; whole = true; }
    else whole = !sliced && n == V;
    if (top_k > 0 && !whole && sliced) return;
    // softmax(l / temp): over the top_k when given, else over the whole vocabulary (z_all).
    float sum = 0.f;
    for (int j = 0; j < n; j++) { sv[j] = expf(sv[j] / temp - mx); sum += sv[j]; }
    if (top_k <= 0) sum = z_all;
    for (int j = 0; j < n; j++) sv[j] /= sum;
    bool closed = whole;  // whether the kept set ends inside the candidates
    if (top_p < 1.f) {
        float cum = 0.f;
        int keep = -1;
        for (int j = 0; j < n; j++) { cum += sv[j]; if (cum >= top_p) { keep = j + 1; break; } }
        if (keep < 0 && !whole) return;
        if (keep > 0) { n = keep; closed = true; }
        float s = 0.f;
        for (int j = 0; j < n; j++) s += sv[j];
        for (int j = 0; j < n; j++) sv[j] /= s;
    }
    float u = (float)(mix64(seed ^ mix64(step + 1ull)) >> 40) / (float)(1 << 24);
    float cum = 0.f;
    int pick = -1;
    for (int j = 0; j < n; j++) { cum += sv[j]; if (u < cum) { pick = j; break; } }
    if (pick < 0) {
        if (!closed) return;
        pick = n - 1;
    }
    out[0] = si[pick];
    out[1] = 0;
}
