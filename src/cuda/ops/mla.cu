// Multi-head latent attention (GLM-4.7-Flash, DeepSeek-V3): per-head absorbed projections,
// RoPE of the rope slices, the latent cache, attention over it, and the fused latent norm +
// RoPE + append (qk_norm_rope for MLA).

// Per-head mat-vecs with the heads' matrices stacked like experts (MLA's W_UKᵀ and W_UV):
// row q = m·nh + h of y [M·nh, N] = W[h] · x_q[0:K], where x_q = x + q·x_ld (the first K
// elements of a row wider than K: q_nope of a query head). Grid (ceil(N/4), nh); block h
// takes the tokens MT at a time, so prefill reads each head's matrix once per MT tokens.
// Both instantiations give each row the same arithmetic (row_dot_partial), bit for bit.
#define HEAD_MATVEC_KERNEL(NAME, MT)                                                                                \
    extern "C" __global__ void NAME(const HeadMatvecArgs p) {                                                       \
        pdl_entry();                                                                                                \
        const bf16* x = p.x;                                                                                        \
        const long x_ld = p.x_ld;                                                                                   \
        const int nh = p.nh, N = p.n, K = p.k, M = p.m;                                                             \
        bf16* y = p.y;                                                                                              \
        int h = blockIdx.y, lane = threadIdx.x & 31;                                                                \
        long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);                                       \
        if (r >= N) return;                                                                                         \
        QMat W = expert_slice(p.w.w, h, p.w.w_stride, p.w.sb_stride);                                               \
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

extern "C" __global__ void mla_rope(const MlaRopeArgs p) {
    pdl_entry();
    const MlaDims& d = p.dims;
    int m = blockIdx.x / (d.nh + 1), h = blockIdx.x % (d.nh + 1);
    bf16* v = h < d.nh ? p.q + ((long)m * d.nh + h) * d.dqk + d.nope : p.kva + (long)m * d.row + d.lat;
    rope_slice(v, d.d_rot, p.pos[m], p.inv_freq, d.scaling, d.interleaved);
}

// Append M rows x[M, W] to MLA's latent cache, row m at cache row base[m] + pos[m].
extern "C" __global__ void cache_append(const CacheAppendArgs p) {
    pdl_entry();
    long dst = ((long)p.base[blockIdx.x] + p.pos[blockIdx.x]) * p.w, src = (long)blockIdx.x * p.w;
    for (int i = threadIdx.x; i < p.w; i += blockDim.x) p.cache[dst + i] = p.x[src + i];
}

// Split-KV causal attention over the latent cache (one KV row per position, shared by all
// heads): for query (m, h), score_s = (qlat[m,h]·c_s + q_pe[m,h]·k_pe_s) · scale with
// cache row s = [c_s (L) | k_pe_s (R)], and out[m,h] = Σ_s p_s c_s (L wide). Same scheme as
// `attention`: grid (M·nh, nsplit), thread t scores key t of a pass, the last split block
// to finish merges. L ≤ MLA_MAXL, L and R multiples of 8.
// MLA_MAXL and MLA_MAXR come from the prelude (src/cuda/ops/mod.rs).
extern "C" __global__ void mla_attention(const MlaAttentionArgs a) {
    pdl_entry();
    const int nh = a.nh, dqk = a.dqk, nope = a.nope, L = a.l, R = a.r, nsplit = a.nsplit;
    const float scale = a.scale;
    __shared__ float qs[MLA_MAXL + MLA_MAXR];
    __shared__ float p[ATTN_THREADS];
    int mh = blockIdx.x, split = blockIdx.y, m = mh / nh, tid = threadIdx.x;
    int row = L + R;
    // Row m's own sequence: its cache rows start at base[m].
    const bf16 *qlat = a.qlat, *q = a.q, *cache = a.cache + (long)a.base[m] * row;
    int n_keys = a.pos[m] + 1, chunk = (n_keys + nsplit - 1) / nsplit;
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
        float f = softmax_pass(sc, cnt, p, mx, l);
#pragma unroll
        for (int i = 0; i < MLA_MAXL / ATTN_THREADS; i++) {
            int d = tid + i * ATTN_THREADS;
            if (d < L) {
                const bf16* vr = cache + (long)base * row + d;
                float o = 0.f;
#pragma unroll 8
                for (int j = 0; j < cnt; j++) o += p[j] * bf2f(vr[(long)j * row]);
                acc[i] = acc[i] * f + o;
            }
        }
        __syncthreads();
    }
    finish_split(acc, L, mx, l, a.part_o, a.part_ml, a.tickets, mh, split, nsplit, a.out);
}

// qk_norm_rope for MLA: per (token, head) block of 256 threads (as the rmsnorm launch):
// query heads get RoPE on their rope slice; block nh normalises the latent of the Kva row in
// place, ropes k_pe and appends the row to the latent cache (= rmsnorm + mla_rope +
// cache_append). Grid M·(nh + 1).
extern "C" __global__ void latent_norm_rope_append(const LatentNormRopeAppendArgs a) {
    pdl_entry();
    const MlaDims& d = a.dims;
    int m = blockIdx.x / (d.nh + 1), h = blockIdx.x % (d.nh + 1), p = a.pos[m];
    if (h < d.nh) {
        rope_slice(a.q + ((long)m * d.nh + h) * d.dqk + d.nope, d.d_rot, p, a.inv_freq, d.scaling, d.interleaved);
        return;
    }
    bf16* v = a.kva + (long)m * d.row;
    rmsnorm_row(v, a.nw, v, d.lat, a.eps);
    __syncthreads();
    rope_slice(v + d.lat, d.d_rot, p, a.inv_freq, d.scaling, d.interleaved);
    __syncthreads();
    for (int i = threadIdx.x; i < d.row; i += blockDim.x) a.cache[((long)a.base[m] + p) * d.row + i] = v[i];
}
