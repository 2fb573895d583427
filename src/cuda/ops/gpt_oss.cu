// GPT-OSS (model-spec §5): YaRN RoPE (cos/sin times the attention factor), the KV append
// into a ring for sliding layers, attention with per-head sinks over a sliding window, the
// top-k-then-softmax router, expert mat-vecs with biases over MXFP4 / bf16 / affine experts,
// and the clamped SwiGLU. MXFP4 weights are read as stored (QMat fmt FMT_MXFP4): a row is
// K/32 blocks of 16 code bytes (low nibble = even element), its E8M0 scales a separate byte
// array — 16-byte aligned loads, one scale byte per block, so no repacking is needed.

#define FMT_MXFP4 2

// E8M0 exponent byte -> 2^(s-127) (s = 0 is the f32 subnormal 2^-127; 255 is refused at load).
__device__ __forceinline__ float e8m0_to_float(u32 s) { return s == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(s << 23); }

// E2M1 code (bit 3 = sign) -> value, without a table: magnitudes 0, 0.5, then
// (1 + m/2)·2^(e-1) for the 3-bit code em = m + 2e ≥ 2 (model-spec §5.8).
__device__ __forceinline__ float fp4_to_float(u32 c) {
    u32 m = c & 7u;
    float v = m < 2u ? 0.5f * (float)m : __uint_as_float(((126u + (m >> 1)) << 23) | ((m & 1u) << 22));
    return (c & 8u) ? -v : v;
}

// Matrix e of a stack. MXFP4: codes in u32 words (w_stride words per matrix), scales in bytes
// (sb_stride bytes per matrix); other formats as expert_slice.
__device__ __forceinline__ QMat stack_slice(QMat W, long e, long w_stride, long sb_stride) {
    if (W.fmt != FMT_MXFP4) return expert_slice(W, e, w_stride, sb_stride);
    W.w = (const void*)((const u32*)W.w + e * w_stride);
    W.s = (const bf16*)((const unsigned char*)W.s + e * sb_stride);
    return W;
}

// One lane's partial dot product of MXFP4 row r ([rows, K]) with x[K]: lane l takes the
// 32-element blocks l, l+32, ...; per block Σ code·x in f32 (ascending), times the block's
// scale, added to the lane's sum (blocks ascending). The caller reduces with warp_sum.
__device__ __forceinline__ float mxfp4_partial(const QMat& W, long r, int K, const bf16* x, int lane) {
    const int nb = K / 32;
    const uint4* codes = (const uint4*)W.w + r * nb;
    const unsigned char* sc = (const unsigned char*)W.s + r * nb;
    const uint4* xv = (const uint4*)x;
    float acc = 0.f;
    for (int b = lane; b < nb; b += WARP) {
        uint4 cv = codes[b];
        u32 cw[4] = {cv.x, cv.y, cv.z, cv.w};
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float xf[8];
            unpack8(xv[b * 4 + j], xf);
#pragma unroll
            for (int i = 0; i < 8; i++) s = __fmaf_rn(fp4_to_float((cw[j] >> (4 * i)) & 15u), xf[i], s);
        }
        acc = __fmaf_rn(e8m0_to_float(sc[b]), s, acc);
    }
    return acc;
}

// The lane partial of row r of any expert format.
__device__ __forceinline__ float any_row_partial(const QMat& W, long r, int K, const bf16* x, int lane) {
    if (W.fmt == FMT_MXFP4) return mxfp4_partial(W, r, K, x, lane);
    const bf16* xs[1] = {x};
    float acc[1];
    row_dot_partial<1>(W, r, K, xs, 1, lane, acc);
    return acc[0];
}

// Selected-expert rows with the expert's bias: row q of y [R, N] =
// bf16(W[idx[q]] · x[q / per] + bias[idx[q], :]) (R = M·K rows; per = K for gate/up, 1 for
// down). A warp per output row, a block column per (token, slot) row.
extern "C" __global__ void expert_bias_matvec(const ExpertBiasMatvecArgs p) {
    const int N = p.n, K = p.k;
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= N) return;
    int e = p.idx[q];
    QMat W = stack_slice(p.w.w, e, p.w.w_stride, p.w.sb_stride);
    float v = warp_sum(any_row_partial(W, r, K, p.x + (long)(q / p.per) * K, lane));
    if (lane == 0) p.y[(long)q * N + r] = f2bf(v + p.bias[(long)e * N + r]);
}

// act = bf16((clamp(u, ±L) + 1) · g·σ(α·g)) with g = min(g, L), over n elements.
extern "C" __global__ void clamp_swiglu(const ClampSwigluArgs p) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (long)gridDim.x * blockDim.x) {
        float g = fminf(bf2f(p.g[i]), p.limit), u = fminf(fmaxf(bf2f(p.u[i]), -p.limit), p.limit);
        p.act[i] = f2bf((u + 1.f) * (g / (1.f + expf(-p.alpha * g))));
    }
}

// Router of one token by one warp: top-K of E ≤ 1024 f32 logits (largest first, lowest index
// wins ties), then softmax over the K selected logits.
extern "C" __global__ void router_topk_softmax(const TopkSoftmaxArgs p) {
    const int E = p.e, K = p.k;
    const float* lg = p.logits + (long)blockIdx.x * E;
    int lane = threadIdx.x & 31;
    float v[32];
#pragma unroll
    for (int i = 0; i < 32; i++) { int e = lane + 32 * i; v[i] = e < E ? lg[e] : -INFINITY; }
    float sel[16];
    int sid[16];
    unsigned taken = 0;
    for (int j = 0; j < K; j++) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            int e = lane + 32 * i;
            if (e < E && !(taken >> i & 1u) && (v[i] > bv || bi == 0x7fffffff)) { bv = v[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        sel[j] = bv;
        sid[j] = bi;
    }
    if (lane == 0) {
        float sum = 0.f;
        for (int j = 0; j < K; j++) { sel[j] = expf(sel[j] - sel[0]); sum += sel[j]; }
        for (int j = 0; j < K; j++) {
            p.idx[(long)blockIdx.x * K + j] = sid[j];
            p.wout[(long)blockIdx.x * K + j] = sel[j] / sum;
        }
    }
}

// Half-split RoPE with YaRN's attention factor on cos and sin, in place on q[M, nh, D] and
// k[M, nkv, D] at positions *pos + m: one block per (token, head).
extern "C" __global__ void rope_scaled(const RopeScaledArgs p) {
    int m = blockIdx.x / (p.nh + p.nkv), h = blockIdx.x % (p.nh + p.nkv);
    bf16* v = h < p.nh ? p.q + ((long)m * p.nh + h) * p.d : p.k + ((long)m * p.nkv + (h - p.nh)) * p.d;
    rope_slice(v, p.d_rot, *p.pos + m, p.inv_freq, p.scaling, 0);
}

// Append M rows of K and V ([M, W] each) at positions *pos .. *pos+M-1: cache row p, or
// p mod ring for a sliding layer's ring of `ring` rows.
extern "C" __global__ void kv_append_ring(const KvAppendRingArgs p) {
    long pos = *p.pos + blockIdx.x;
    long dst = (p.ring > 0 ? pos % p.ring : pos) * p.w, src = (long)blockIdx.x * p.w;
    for (int i = threadIdx.x; i < p.w; i += blockDim.x) {
        p.kc[dst + i] = p.k[src + i];
        p.vc[dst + i] = p.v[src + i];
    }
}

// Attention of query (token m, head h) at position t = *pos + m over keys
// max(0, t − window + 1) ..= t (all keys when window = 0), with the head's sink logit in the
// softmax denominator (its probability dropped). Keys are split over the block's warps
// (online softmax per warp, lanes splitting the head dim), then merged with the sink by
// warp 0. Cache rows: s, or s mod ring.
extern "C" __global__ void sink_attention(const SinkAttentionArgs p) {
    const int nh = p.nh, D = p.d, rep = p.nh / p.nkv;
    int m = blockIdx.x / nh, h = blockIdx.x % nh, kvh = h / rep;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    int t = *p.pos + m;
    int first = p.window > 0 ? max(0, t - p.window + 1) : 0;
    long W = (long)p.nkv * D;
    const bf16* q = p.q + ((long)m * nh + h) * D;
    constexpr int PER = MAXD / 32;
    float qf[PER], o[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int j = lane + 32 * i;
        qf[i] = j < D ? bf2f(q[j]) : 0.f;
        o[i] = 0.f;
    }
    float mx = -INFINITY, l = 0.f;
    for (int s = first + warp; s <= t; s += nw) {
        long row = (p.ring > 0 ? s % p.ring : s) * W + (long)kvh * D;
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int j = lane + 32 * i;
            if (j < D) d = __fmaf_rn(qf[i], bf2f(p.kc[row + j]), d);
        }
        d = warp_sum(d) * p.scale;
        float nm = fmaxf(mx, d), c = expf(mx - nm), e = expf(d - nm);
        l = l * c + e;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int j = lane + 32 * i;
            if (j < D) o[i] = o[i] * c + e * bf2f(p.vc[row + j]);
        }
        mx = nm;
    }
    __shared__ float wm[ATTN_THREADS / 32], wl[ATTN_THREADS / 32], wo[ATTN_THREADS / 32][MAXD];
    if (lane == 0) { wm[warp] = mx; wl[warp] = l; }
#pragma unroll
    for (int i = 0; i < PER; i++) { int j = lane + 32 * i; if (j < D) wo[warp][j] = o[i]; }
    __syncthreads();
    if (warp != 0) return;
    float sink = p.sinks[h], M = sink;
    for (int w = 0; w < nw; w++) M = fmaxf(M, wm[w]);
    float L = expf(sink - M);
    for (int w = 0; w < nw; w++) L += wl[w] * expf(wm[w] - M);
    bf16* out = p.out + ((long)m * nh + h) * D;
    for (int j = lane; j < D; j += 32) {
        float acc = 0.f;
        for (int w = 0; w < nw; w++) acc += wo[w][j] * expf(wm[w] - M);
        out[j] = f2bf(acc / L);
    }
}
