// GPT-OSS (model-spec §5): YaRN RoPE (cos/sin times the attention factor), the KV append
// into a ring for sliding layers (read back by the split attention of attention.cu), the
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

// One lane's partial dot products of MXFP4 row r ([rows, K]) with up to MT token rows
// xs[0..M): lane l takes the 32-element blocks l, l+32, ...; a block's codes are decoded to
// floats once (in registers) and reused for every token; per token Σ code·x in f32
// (ascending), times the block's scale, added to the lane's sum (blocks ascending). A
// token's sum never depends on MT or on the other tokens (decode == prefill, bit for bit).
// The caller reduces with warp_sum.
template <int MT>
__device__ __forceinline__ void mxfp4_partial(const QMat& W, long r, int K, const bf16* const* xs, int M, int lane,
                                              float* acc) {
    const int nb = K / 32;
    const uint4* codes = (const uint4*)W.w + r * nb;
    const unsigned char* sc = (const unsigned char*)W.s + r * nb;
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.f;
    for (int b = lane; b < nb; b += WARP) {
        uint4 cv = codes[b];
        float scale = e8m0_to_float(sc[b]);
        u32 cw[4] = {cv.x, cv.y, cv.z, cv.w};
        float cf[32];
#pragma unroll
        for (int i = 0; i < 32; i++) cf[i] = fp4_to_float((cw[i / 8] >> (4 * (i % 8))) & 15u);
#pragma unroll
        for (int m = 0; m < MT; m++) {
            if (m >= M) continue;
            const uint4* xv = (const uint4*)xs[m] + b * 4;
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float xf[8];
                unpack8(xv[j], xf);
#pragma unroll
                for (int i = 0; i < 8; i++) s = __fmaf_rn(cf[j * 8 + i], xf[i], s);
            }
            acc[m] = __fmaf_rn(scale, s, acc[m]);
        }
    }
}

// The lane partials of row r of any expert format for up to MT tokens.
template <int MT>
__device__ __forceinline__ void any_row_partial(const QMat& W, long r, int K, const bf16* const* xs, int M, int lane,
                                                float* acc) {
    if (W.fmt == FMT_MXFP4) mxfp4_partial<MT>(W, r, K, xs, M, lane, acc);
    else row_dot_partial<MT>(W, r, K, xs, M, lane, acc);
}

// Selected-expert rows with the expert's bias (decode): row q of y [R, N] =
// bf16(W[idx[q]] · x[q / per] + bias[idx[q], :]) (R = M·K rows; per = K for gate/up, 1 for
// down). A warp per output row, a block column per (token, slot) row.
extern "C" __global__ void expert_bias_matvec(const ExpertBiasMatvecArgs p) {
    pdl_entry();
    const int N = p.n, K = p.k;
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= N) return;
    int e = p.idx[q];
    QMat W = stack_slice(p.w.w, e, p.w.w_stride, p.w.sb_stride);
    const bf16* xs[1] = {p.x + (long)(q / p.per) * K};
    float acc[1];
    any_row_partial<1>(W, r, K, xs, 1, lane, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) p.y[(long)q * N + r] = f2bf(v + p.bias[(long)e * N + r]);
}

// The same rows for prefill, grouped by expert (moe_group's off/rows): block (x, e) computes
// rows blockIdx.x·4.. of expert e for every (token, slot) row routed to e, 8 at a time, so
// an expert's weights are read once per 8 routed rows. Same per-row arithmetic as
// expert_bias_matvec, hence bit-identical outputs.
extern "C" __global__ void expert_bias_matvec_grouped(const ExpertBiasMatvecGroupedArgs p) {
    pdl_entry();
    const int N = p.n, K = p.k;
    int e = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int q0 = p.off[e], q1 = p.off[e + 1];
    if (r >= N || q0 == q1) return;
    QMat W = stack_slice(p.w.w, e, p.w.w_stride, p.w.sb_stride);
    float bias = p.bias[(long)e * N + r];
    for (int j = q0; j < q1; j += 8) {
        int mt = min(8, q1 - j);
        const bf16* xs[8];
#pragma unroll
        for (int m = 0; m < 8; m++) xs[m] = p.x + (long)(p.rows[j + min(m, mt - 1)] / p.per) * K;
        float acc[8];
        any_row_partial<8>(W, r, K, xs, mt, lane, acc);
#pragma unroll
        for (int m = 0; m < 8; m++) {
            if (m < mt) {
                float v = warp_sum(acc[m]);
                if (lane == 0) p.y[(long)p.rows[j + m] * N + r] = f2bf(v + bias);
            }
        }
    }
}

// bf16((clamp(u, ±L) + 1) · g·σ(α·g)) with g = min(g, L): one element of the clamped SwiGLU.
__device__ __forceinline__ bf16 clamp_swiglu_elem(bf16 gb, bf16 ub, float limit, float alpha) {
    float g = fminf(bf2f(gb), limit), u = fminf(fmaxf(bf2f(ub), -limit), limit);
    return f2bf((u + 1.f) * (g / (1.f + expf(-alpha * g))));
}

// act = clamp_swiglu(g, u) over n elements.
extern "C" __global__ void clamp_swiglu(const ClampSwigluArgs p) {
    pdl_entry();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (long)gridDim.x * blockDim.x)
        p.act[i] = clamp_swiglu_elem(p.g[i], p.u[i], p.limit, p.alpha);
}

// Router of one token by one warp: top-K of E ≤ 1024 f32 logits (largest first, lowest index
// wins ties), then softmax over the K selected logits. Logits are read through L2 (__ldcg):
// the fused router reads what other blocks just wrote.
__device__ void topk_softmax_warp(const float* lg, int E, int K, int* idx, float* wout) {
    int lane = threadIdx.x & 31;
    float v[32];
#pragma unroll
    for (int i = 0; i < 32; i++) { int e = lane + 32 * i; v[i] = e < E ? __ldcg(lg + e) : -INFINITY; }
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
        // sel[0] is the largest: the softmax's max (read before the loop overwrites it).
        const float mx = sel[0];
        float sum = 0.f;
        for (int j = 0; j < K; j++) { sel[j] = expf(sel[j] - mx); sum += sel[j]; }
        for (int j = 0; j < K; j++) {
            idx[j] = sid[j];
            wout[j] = sel[j] / sum;
        }
    }
}

extern "C" __global__ void router_topk_softmax(const TopkSoftmaxArgs p) {
    pdl_entry();
    long m = blockIdx.x;
    topk_softmax_warp(p.logits + m * p.e, p.e, p.k, p.idx + m * p.k, p.wout + m * p.k);
}

// topk_softmax_warp's experts and weights by the block (moe.cu's block_select_topk): every
// warp ranks the logits (with any_key: −inf logits after every finite one, by index, as the
// warp's rounds take them), then thread 0 takes the softmax over the K chosen in slot order
// exactly as topk_softmax_warp's lane 0. Bit for bit for any logits but NaN.
__device__ __forceinline__ void topk_softmax_block(const float* lg, int E, int K, int* idx, float* wout) {
    __shared__ RouterPick sh;
    pick_reset(sh);
    for (int e = threadIdx.x; e < E; e += blockDim.x) sh.key[e] = sh.val[e] = __ldcg(lg + e);
    block_select_topk(sh, E, K, true);
    if (threadIdx.x == 0) {
        const float mx = sh.sel[0];
        float ex[16], sum = 0.f;
        for (int j = 0; j < K; j++) { ex[j] = expf(sh.sel[j] - mx); sum += ex[j]; }
        for (int j = 0; j < K; j++) idx[j] = sh.sid[j], wout[j] = ex[j] / sum;
    }
}

// moe_mlp 1/3 for GPT-OSS (decode): router logits with the router bias (= matvec, f32 out),
// then the top-k-then-softmax of router_topk_softmax, picked by the block (the shape of
// moe.cu's routers, the sigmoid routers' block size).
extern "C" __global__ void SIGMOID_ROUTER moe_router_topk_softmax(const MoeRouterTopkSoftmaxArgs p) {
    pdl_entry();
    int m = blockIdx.z, E = p.e, K = p.k;
    router_logits_rows(p.w, p.x, p.logits, p.bias, E, p.h, m);
    if (!router_meet(p.tickets + m)) return;
    topk_softmax_block(p.logits + (long)m * E, E, K, p.idx + m * K, p.wout + m * K);
}

// moe_mlp 2/3 for GPT-OSS (decode): gate and up rows r of slot q's expert with their biases,
// each rounded to bf16 as expert_bias_matvec stores them, then the clamped SwiGLU
// (= expert_bias_matvec ×2 + clamp_swiglu). Grid (ceil(I/4), slots), 128 threads.
extern "C" __global__ void moe_gate_up_clamp(const MoeGateUpClampArgs p) {
    pdl_entry();
    const int I = p.i, H = p.h;
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= I) return;
    int e = p.idx[q];
    const bf16* xs[1] = {p.x + (long)(q / p.k) * H};
    QMat G = stack_slice(p.gate.w, e, p.gate.w_stride, p.gate.sb_stride);
    QMat U = stack_slice(p.up.w, e, p.up.w_stride, p.up.sb_stride);
    float ag[1], au[1];
    any_row_partial<1>(G, r, H, xs, 1, lane, ag);
    any_row_partial<1>(U, r, H, xs, 1, lane, au);
    float g = warp_sum(ag[0]), u = warp_sum(au[0]);
    if (lane == 0) {
        bf16 gb = f2bf(g + p.gbias[(long)e * I + r]), ub = f2bf(u + p.ubias[(long)e * I + r]);
        p.act[(long)q * I + r] = clamp_swiglu_elem(gb, ub, p.limit, p.alpha);
    }
}

// moe_mlp 3/3 for GPT-OSS (decode): down row r of each slot's expert plus its bias (bf16, as
// expert_bias_matvec), the weighted combine in slot order (as combine), and x += out (as
// add_inplace). Grid (H, 1, M), a warp per slot.
extern "C" __global__ void moe_down_bias_combine_add(const MoeDownBiasCombineAddArgs p) {
    pdl_entry();
    __shared__ bf16 ys[32];
    const int K = p.k, H = p.h, I = p.i;
    int m = blockIdx.z, r = blockIdx.x, j = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int q = m * K + j, e = p.idx[q];
    QMat D = stack_slice(p.down.w, e, p.down.w_stride, p.down.sb_stride);
    const bf16* xs[1] = {p.act + (long)q * I};
    float acc[1];
    any_row_partial<1>(D, r, I, xs, 1, lane, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) ys[j] = f2bf(v + p.bias[(long)e * H + r]);
    __syncthreads();
    if (threadIdx.x != 0) return;
    float a = 0.f;
    for (int s = 0; s < K; s++) a = combine_step(a, p.wts[m * K + s], ys[s]);
    p.x[(long)m * H + r] = add_bf16(p.x[(long)m * H + r], f2bf(a));
}

// Half-split RoPE with YaRN's attention factor on cos and sin, in place on q[M, nh, D] and
// k[M, nkv, D], row m at position pos[m]: one block per (token, head).
extern "C" __global__ void rope_scaled(const RopeScaledArgs p) {
    pdl_entry();
    int m = blockIdx.x / (p.nh + p.nkv), h = blockIdx.x % (p.nh + p.nkv);
    bf16* v = h < p.nh ? p.q + ((long)m * p.nh + h) * p.d : p.k + ((long)m * p.nkv + (h - p.nh)) * p.d;
    rope_slice(v, p.d_rot, p.pos[m], p.inv_freq, p.scaling, 0);
}

// The cache row of position s of slot `slot`: each slot owns `slot_rows` rows (its ring of
// `ring` rows for a sliding layer, position s in row s mod ring; else its slot_ctx rows).
__device__ __forceinline__ long ring_row(int slot, int slot_rows, int ring, long s) {
    return (long)slot * slot_rows + (ring > 0 ? s % ring : s);
}

// Append M rows of K and V ([M, W] each), row m at position pos[m] of slot slot[m]:
// the slot's cache row pos[m], or pos[m] mod ring for a sliding layer.
extern "C" __global__ void kv_append_ring(const KvAppendRingArgs p) {
    pdl_entry();
    long dst = ring_row(p.slot[blockIdx.x], p.slot_rows, p.ring, p.pos[blockIdx.x]) * p.w;
    long src = (long)blockIdx.x * p.w;
    for (int i = threadIdx.x; i < p.w; i += blockDim.x) {
        p.kc[dst + i] = p.k[src + i];
        p.vc[dst + i] = p.v[src + i];
    }
}
