// Mixture of experts: routers (softmax top-k; grouped sigmoid with a selection bias),
// selected-expert mat-vecs (decode: one block column per slot; prefill: grouped by expert),
// SwiGLU, the weighted combine, and the fused moe_mlp kernels (router + top-k; gate + up +
// SwiGLU; down + combine + residual).

// Selected-expert rows (decode): row q of y [R, N] = W[idx[q]] · x[q / per]  (R = M·K rows,
// per = K for gate/up reading the token's input, 1 for down reading the slot's activation).
extern "C" __global__ void expert_matvec(const ExpertMatvecArgs p) {
    pdl_entry();
    const int per = p.per, N = p.n, K = p.k;
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= N) return;
    QMat W = expert_slice(p.w.w, p.idx[q], p.w.w_stride, p.w.sb_stride);
    const bf16* xs[1] = {p.x + (long)(q / per) * K};
    float acc[1];
    row_dot_partial<1>(W, r, K, xs, 1, lane, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) p.y[(long)q * N + r] = f2bf(v);
}

// Groups the R = M·K (token, slot) rows by expert for prefill: off[E + 1] is the exclusive
// prefix sum of rows per expert, rows[off[e] .. off[e+1]) the rows routed to e in
// ascending order, and (tiles non-null) the tile table of expert_gemm_tc. One block;
// thread e owns expert e (E ≤ 1024) and scans every routed row twice (count, then place).
// The rows' experts are staged in shared memory GROUP_SEG at a time, so the scans read
// shared memory (a broadcast: every thread reads the same word) instead of taking a
// global-memory round trip per row, which cost an estimated 250–300 µs a layer for
// 4,096 rows (bench/RESULTS.md session 15). The outputs are the same.
#define GROUP_SEG 4096
extern "C" __global__ void moe_group(const MoeGroupArgs p) {
    pdl_entry();
    const int R = p.r, E = p.e;
    int *off = p.off, *rows = p.rows;
    __shared__ int cnt[1024];
    __shared__ int seg[GROUP_SEG];  // idx[s0 .. s0 + n) of the segment being scanned
    const int e = threadIdx.x;
    // Stages segment s0 (all threads; the barrier before keeps the last scan's reads safe).
    auto stage = [&](int s0, int n) {
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) seg[i] = p.idx[s0 + i];
        __syncthreads();
    };
    int c = 0;
    for (int s0 = 0; s0 < R; s0 += GROUP_SEG) {
        const int n = min(GROUP_SEG, R - s0);
        stage(s0, n);
        if (e < E) for (int i = 0; i < n; i++) c += seg[i] == e;
    }
    cnt[e] = c;
    __syncthreads();
    if (e == 0) {
        int acc = 0;
        for (int i = 0; i < E; i++) { int n = cnt[i]; off[i] = acc; cnt[i] = acc; acc += n; }
        off[E] = acc;
        // Tensor-core tiles: TC_BM rows of one expert each (expert, first row index).
        if (p.tiles) {
            int nt = 0;
            for (int i = 0; i < E; i++)
                for (int j = off[i]; j < off[i + 1]; j += TC_BM) p.tiles[1 + 2 * nt] = i, p.tiles[2 + 2 * nt] = j, nt++;
            p.tiles[0] = nt;
        }
    }
    __syncthreads();
    int o = cnt[e];
    for (int s0 = 0; s0 < R; s0 += GROUP_SEG) {
        const int n = min(GROUP_SEG, R - s0);
        if (R > GROUP_SEG) stage(s0, n);  // one segment: still staged from the count
        if (e < E) for (int i = 0; i < n; i++) if (seg[i] == e) rows[o++] = s0 + i;
    }
}

// Selected-expert rows (prefill), grouped: block (x, e) computes rows blockIdx.x·4.. of
// expert e for every (token, slot) row routed to e, 8 at a time, so each expert's weights
// are read once per 8 routed rows instead of once per row. Same per-row arithmetic as
// expert_matvec, hence bit-identical outputs.
extern "C" __global__ void expert_matvec_grouped(const ExpertMatvecGroupedArgs p) {
    pdl_entry();
    const int *off = p.off, *rows = p.rows;
    const int per = p.per, N = p.n, K = p.k;
    const bf16* x = p.x;
    bf16* y = p.y;
    int e = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    int q0 = off[e], q1 = off[e + 1];
    if (r >= N || q0 == q1) return;
    QMat W = expert_slice(p.w.w, e, p.w.w_stride, p.w.sb_stride);
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

// LFM2 router of one token by one warp (model-spec §4.5), rounded where transformers' bf16
// model rounds: r = bf16(logit), s = bf16(sigmoid(r)); selection on s + bias (f32; on s
// without a bias), top-K with the lowest index winning ties; weights = s of the chosen,
// when norm renormalised in bf16 (den = bf16(bf16(Σ) + 1e-6), w = bf16(w / den)), then
// w = bf16(w · scale). E ≤ 32·PER.
template <int PER>
__device__ void router_sigmoid_bias_lanes(const float* lg, const float* bias, int E, int K, int norm, float scale,
                                          int* idx, float* wout) {
    int lane = threadIdx.x & 31;
    float sg[PER], c[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = lane + 32 * i;
        float r = e < E ? bf2f(f2bf(__ldcg(lg + e))) : 0.f;
        sg[i] = e < E ? bf2f(f2bf(1.f / (1.f + expf(-r)))) : 0.f;
        c[i] = e < E ? sg[i] + (bias ? bias[e] : 0.f) : -INFINITY;
    }
    float sel[16];
    float tot = select_topk_warp<PER>(sg, c, E, K, idx, sel);
    if (lane == 0) {
        float den = bf2f(f2bf(bf2f(f2bf(tot)) + 1e-6f));
        for (int j = 0; j < K; j++) {
            float w = norm ? bf2f(f2bf(sel[j] / den)) : sel[j];
            wout[j] = bf2f(f2bf(w * scale));
        }
    }
}

// router_sigmoid_bias_lanes with the fewest registers that hold E ≤ 1024 (with_lanes).
__device__ __forceinline__ void router_sigmoid_bias_warp(const float* lg, const float* bias, int E, int K, int norm,
                                                         float scale, int* idx, float* wout) {
    with_lanes(E, [&](auto L) { router_sigmoid_bias_lanes<decltype(L)::PER>(lg, bias, E, K, norm, scale, idx, wout); });
}

extern "C" __global__ void router_sigmoid_bias(const RouterSigmoidBiasArgs p) {
    pdl_entry();
    int m = blockIdx.x, E = p.e, K = p.k;
    router_sigmoid_bias_warp(p.logits + (long)m * E, p.bias, E, K, p.norm, p.scale, p.idx + m * K, p.wout + m * K);
}

extern "C" __global__ void router_sigmoid(const RouterSigmoidArgs p) {
    pdl_entry();
    int m = blockIdx.x, E = p.e, K = p.k;
    router_sigmoid_warp(p.logits + (long)m * E, p.bias, E, K, p.n_group, p.topk_group, p.norm, p.scale, p.idx + m * K,
                        p.wout + m * K);
}

// Router: softmax over E f32 logits, top-K (largest first, lowest index wins ties),
// optional renormalisation. One warp per token; E ≤ 1024.
extern "C" __global__ void router_topk(const RouterTopkArgs p) {
    pdl_entry();
    int m = blockIdx.x, E = p.e, K = p.k;
    router_topk_warp(p.logits + (long)m * E, E, K, p.norm, p.idx + m * K, p.wout + m * K);
}

// act = bf16(bf16(silu(g)) * u), elementwise over n.
extern "C" __global__ void swiglu(const SwigluArgs p) {
    pdl_entry();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (long)gridDim.x * blockDim.x)
        p.act[i] = swiglu_elem(p.g[i], p.u[i]);
}

// out[m, :] = bf16(sum_j w[m, j] * y[m·K + j, :]), f32 accumulation in slot order.
// Grid (M, ceil(H / blockDim)).
extern "C" __global__ void combine(const CombineArgs p) {
    pdl_entry();
    const int K = p.k, H = p.h;
    int m = blockIdx.x, h = blockIdx.y * blockDim.x + threadIdx.x;
    if (h >= H) return;
    p.out[(long)m * H + h] = f2bf(combine_slots(p.w + m * K, p.y + (long)m * K * H + h, K, H));
}

// The fused routers (moe_router*, and GPT-OSS's moe_router_topk_softmax) run ROUTER_BLOCKS
// blocks a token, grid (ROUTER_BLOCKS, 1, M): a warp a logit row, looping when the rows
// outnumber the warps, then one block picks the experts once every row is written. On sm_90
// a token's blocks are one thread-block cluster and meet at its barrier; before sm_90 at a
// ticket (last_to_finish). The meeting point is not what costs: the cluster measured the
// same ~11 µs a call as the ticket on the H100 (bench/RESULTS.md, session 12).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ROUTER_CLUSTER __cluster_dims__(ROUTER_BLOCKS, 1, 1)
#else
#define ROUTER_CLUSTER
#endif
// Kernel attributes of the routers: ROUTER_THREADS for the softmax routers (Qwen3's 128 rows
// in one pass), ROUTER_SIGMOID_THREADS for the others (E ≤ 64 rows in one pass; moe.rs).
#define SOFTMAX_ROUTER __launch_bounds__(ROUTER_THREADS) ROUTER_CLUSTER
#define SIGMOID_ROUTER __launch_bounds__(ROUTER_SIGMOID_THREADS) ROUTER_CLUSTER

// The router logits rows of this block of token m (warp w of block b: rows b·warps + w, then
// every ROUTER_BLOCKS·warps on): the f32 result of matvec1 for those rows (+ bias).
__device__ __forceinline__ void router_logits_rows(const QMat& W, const bf16* x, float* logits, const float* bias,
                                                   int E, int H, int m) {
    const int lane = threadIdx.x & 31, warps = blockDim.x / WARP;
    const bf16* xs[1] = {x + (long)m * H};
    for (long r = (long)blockIdx.x * warps + (threadIdx.x >> 5); r < E; r += (long)gridDim.x * warps) {
        float acc[1];
        row_dot_partial<1>(W, r, H, xs, 1, lane, acc);
        float v = warp_sum(acc[0]);
        if (lane == 0) {
            if (bias) v += bias[r];
            logits[(long)m * E + r] = v;
        }
    }
}

// True in the one block of a token that picks its experts, once every block's logits are
// visible to it. sm_90: every thread of the cluster arrives (release: its logits stores are
// ordered before), block 0 waits (acquire) and goes on, the others leave. Before sm_90: the
// last block to take the ticket, which it resets (graph replay).
__device__ __forceinline__ bool router_meet(int* ticket) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release;" ::: "memory");
    if (blockIdx.x != 0) return false;
    asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
    return true;
#else
    return last_to_finish(ticket, gridDim.x);
#endif
}

// The softmax probabilities of router_topk_lanes<PER> (common.cuh), by one warp, into p[E]
// and q[E]: the same max, expf, per-lane sum in slot order, warp_sum and division, so the
// same bits.
template <int PER>
__device__ __forceinline__ void softmax_probs_lanes(const float* l, int E, float* p, float* q) {
    int lane = threadIdx.x & 31;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; i++) { int e = lane + 32 * i; v[i] = e < E ? __ldcg(l + e) : -INFINITY; mx = fmaxf(mx, v[i]); }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < PER; i++) { int e = lane + 32 * i; v[i] = e < E ? expf(v[i] - mx) : -1.f; sum += e < E ? v[i] : 0.f; }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < PER; i++) if (lane + 32 * i < E) p[lane + 32 * i] = q[lane + 32 * i] = v[i] / sum;
}

// The fused routers pick their experts with the whole block (block 0 of the token's
// cluster, after router_meet): the one-warp routers' K serial rounds of butterflies were
// about half of a fused router's ~11 µs on the H100 (~1,000 dependent instructions, ncu).
// Shared memory of a block pick: each expert's selection key and weight, the group scores
// of the grouped sigmoid router, and the K slots.
struct RouterPick {
    float key[1024];  // selection key (block_select_topk says which are never chosen)
    float val[1024];  // the weight the expert brings if chosen
    float gs[32];     // group scores (router_sigmoid_block, n_group > 1)
    int keep[32];     // group kept
    float sel[16];    // val of the chosen experts, in slot order
    int sid[16];      // the chosen experts, in slot order
};

// Slots start at expert 0, weight 0: a NaN key ranks nowhere and leaves its slot as is, so an
// index is always a real expert. Before the block's first barrier.
__device__ __forceinline__ void pick_reset(RouterPick& sh) {
    if (threadIdx.x < 16) sh.sid[threadIdx.x] = 0, sh.sel[threadIdx.x] = 0.f;
}

// The top-K experts by key, largest first, the lowest index winning ties, keys not > -inf
// never chosen (any_key: only NaN keys never chosen, -inf ones after every finite one) —
// select_topk_warp's, router_topk_lanes' (and with any_key topk_softmax_warp's) choice — by
// every warp of the block: expert e's rank is #{j : key[j] > key[e] or (key[j] == key[e] and
// j < e)}, counted 32 at a time with a ballot, and the expert of rank j < K takes slot j with
// its val. Between two barriers: keys written before, slots read after. Returns Σ sel in slot
// order (the warp routers' tot), valid in thread 0.
__device__ __forceinline__ float block_select_topk(RouterPick& sh, int E, int K, bool any_key = false) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x / WARP;
    __syncthreads();
    for (int e = warp; e < E; e += warps) {
        const float v = sh.key[e];
        int rank = 0;
        for (int j0 = 0; j0 < E; j0 += WARP) {
            int j = j0 + lane;
            float u = j < E ? sh.key[j] : -INFINITY;
            rank += __popc(__ballot_sync(0xffffffffu, u > v || (u == v && j < e)));
            if (rank >= K) break;  // out of the slots (warp-uniform: every lane counts the same)
        }
        bool eligible = any_key ? !isnan(v) : v > -INFINITY;
        if (lane == 0 && eligible && rank < K) sh.sid[rank] = e, sh.sel[rank] = sh.val[e];
    }
    __syncthreads();
    float tot = 0.f;
    if (threadIdx.x == 0) for (int j = 0; j < K; j++) tot += sh.sel[j];
    return tot;
}

// router_topk_warp's experts and weights, bit for bit, by the block: warp 0 computes the
// probabilities as router_topk_lanes does (softmax_probs_lanes), every warp ranks them.
// E ≤ 1024, K ≤ 16.
__device__ __forceinline__ void router_topk_block(const float* l, int E, int K, int norm, int* idx, float* wout) {
    __shared__ RouterPick sh;
    pick_reset(sh);
    if (threadIdx.x < WARP)
        with_lanes(E, [&](auto L) { softmax_probs_lanes<decltype(L)::PER>(l, E, sh.key, sh.val); });
    float tot = block_select_topk(sh, E, K);
    if (threadIdx.x == 0)
        for (int j = 0; j < K; j++) idx[j] = sh.sid[j], wout[j] = norm ? sh.sel[j] / tot : sh.sel[j];
}

// router_sigmoid_warp's experts and weights (GLM / DeepSeek, common.cuh's
// router_sigmoid_lanes), bit for bit, by the block: s = sigmoid(logit) and key s + bias per
// expert; with groups, warp 0 scores and keeps them exactly as router_sigmoid_lanes; every
// warp ranks. E ≤ 1024, K ≤ 16, n_group ≤ 32.
__device__ __forceinline__ void router_sigmoid_block(const float* lg, const float* bias, int E, int K, int n_group,
                                                     int topk_group, int norm, float scale, int* idx, float* wout) {
    __shared__ RouterPick sh;
    pick_reset(sh);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float sg = 1.f / (1.f + expf(-__ldcg(lg + e)));
        sh.val[e] = sg;
        sh.key[e] = sg + bias[e];
    }
    if (n_group > 1) {
        const int lane = threadIdx.x & 31, per = E / n_group;
        __syncthreads();
        if (threadIdx.x < WARP) {
            if (lane < n_group) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int e = lane * per; e < (lane + 1) * per; e++) {
                    float v = sh.key[e];
                    if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
                }
                sh.gs[lane] = b1 + b2;
                sh.keep[lane] = 0;
            }
            __syncwarp();
            if (lane == 0) {
                for (int j = 0; j < topk_group; j++) {
                    int bi = -1;
                    for (int g = 0; g < n_group; g++) if (!sh.keep[g] && (bi < 0 || sh.gs[g] > sh.gs[bi])) bi = g;
                    sh.keep[bi] = 1;
                }
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) if (!sh.keep[e / per]) sh.key[e] = -INFINITY;
    }
    float tot = block_select_topk(sh, E, K);
    if (threadIdx.x == 0) {
        float den = tot + 1e-20f;
        for (int j = 0; j < K; j++) idx[j] = sh.sid[j], wout[j] = (norm ? sh.sel[j] / den : sh.sel[j]) * scale;
    }
}

// router_sigmoid_bias_warp's experts and weights (LFM2), bit for bit, by the block: the same
// bf16 roundings per expert, every warp ranks, thread 0 renormalises as the warp router.
__device__ __forceinline__ void router_sigmoid_bias_block(const float* lg, const float* bias, int E, int K, int norm,
                                                          float scale, int* idx, float* wout) {
    __shared__ RouterPick sh;
    pick_reset(sh);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float r = bf2f(f2bf(__ldcg(lg + e)));
        float sg = bf2f(f2bf(1.f / (1.f + expf(-r))));
        sh.val[e] = sg;
        sh.key[e] = sg + (bias ? bias[e] : 0.f);
    }
    float tot = block_select_topk(sh, E, K);
    if (threadIdx.x == 0) {
        float den = bf2f(f2bf(bf2f(f2bf(tot)) + 1e-6f));
        for (int j = 0; j < K; j++) {
            float w = norm ? bf2f(f2bf(sh.sel[j] / den)) : sh.sel[j];
            idx[j] = sh.sid[j];
            wout[j] = bf2f(f2bf(w * scale));
        }
    }
}

// moe_mlp 1/3: router logits (= matvec, f32 out), then the softmax-top-k of router_topk
// (router_topk_block: the same bits).
extern "C" __global__ void SOFTMAX_ROUTER moe_router(const MoeRouterArgs p) {
    pdl_entry();
    int m = blockIdx.z, E = p.e, K = p.k;
    router_logits_rows(p.w, p.x, p.logits, p.bias, E, p.h, m);
    if (!router_meet(p.tickets + m)) return;
    router_topk_block(p.logits + (long)m * E, E, K, p.norm, p.idx + m * K, p.wout + m * K);
}

// moe_mlp 1/3 for sigmoid routers (GLM / DeepSeek): the same logits, then the grouped
// sigmoid top-k of router_sigmoid.
extern "C" __global__ void SIGMOID_ROUTER moe_router_sigmoid(const MoeRouterSigmoidArgs p) {
    pdl_entry();
    int m = blockIdx.z, E = p.e, K = p.k;
    router_logits_rows(p.w, p.x, p.logits, nullptr, E, p.h, m);
    if (!router_meet(p.tickets + m)) return;
    router_sigmoid_block(p.logits + (long)m * E, p.ebias, E, K, p.n_group, p.topk_group, p.norm, p.scale,
                         p.idx + m * K, p.wout + m * K);
}

// moe_mlp 1/3 for LFM2's router: the same logits, then the bf16-rounded sigmoid top-k with
// the expert bias of router_sigmoid_bias.
extern "C" __global__ void SIGMOID_ROUTER moe_router_sigmoid_bias(const MoeRouterSigmoidBiasArgs p) {
    pdl_entry();
    int m = blockIdx.z, E = p.e, K = p.k;
    router_logits_rows(p.w, p.x, p.logits, nullptr, E, p.h, m);
    if (!router_meet(p.tickets + m)) return;
    router_sigmoid_bias_block(p.logits + (long)m * E, p.ebias, E, K, p.norm, p.scale, p.idx + m * K, p.wout + m * K);
}

// moe_mlp 2/3: act[q, r] = swiglu(bf16(gate_e[r]·x), bf16(up_e[r]·x)) for slot q's expert
// e = idx[q] and token q / K (= expert_matvec twice + swiglu). With the shared experts
// (moe_shared_gate_up_swiglu) block column M·K + t computes token t's:
// sact[t, r] = swiglu(bf16(sgate[r]·x_t), bf16(sup[r]·x_t)) (= the shared gate/up/SwiGLU,
// the same row sums). Grid (ceil(max(I, si)/4), M·K (+ M)). Two kernels with their own
// arguments, the routed-only one as it was before shared experts joined (one kernel for
// both, or a template of the two, cost Qwen3 1.2–1.8 % of its decode on the H100:
// bench/RESULTS.md); the routed part of the shared one is the same code. GATE_UP_BOUNDS holds
// the routed kernel to 78 registers (90 without; no spills under NVRTC sm_90): six blocks of
// 128 threads an SM instead of five, so qwen3's 1,536 blocks take 1.94 waves instead of 2.33
// (−1.3 µs a call, decode +2.6 % on the H100, bench/RESULTS.md session 15; the same bits).
// The shared twin (GLM) takes 80 with it instead of 91 (not measured yet).
#define GATE_UP_BOUNDS __launch_bounds__(128, 6)
extern "C" __global__ void GATE_UP_BOUNDS moe_gate_up_swiglu(const MoeGateUpArgs p) {
    pdl_entry();
    const int K = p.k, I = p.i, H = p.h;
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r >= I) return;
    QMat G = expert_slice(p.gate, p.idx[q], p.w_stride, p.sb_stride);
    QMat U = expert_slice(p.up, p.idx[q], p.w_stride, p.sb_stride);
    bf16 a = gate_up_swiglu_row(G, U, r, H, p.x + (long)(q / K) * H, lane);
    if (lane == 0) p.act[(long)q * I + r] = a;
}
extern "C" __global__ void GATE_UP_BOUNDS moe_shared_gate_up_swiglu(const MoeSharedGateUpArgs s) {
    pdl_entry();
    const MoeGateUpArgs& p = s.routed;
    const int K = p.k, I = p.i, H = p.h;
    int q = blockIdx.y, lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (q >= s.m * K) {
        int t = q - s.m * K;
        if (r >= s.si) return;
        bf16 a = gate_up_swiglu_row(s.sgate, s.sup, r, H, p.x + (long)t * H, lane);
        if (lane == 0) s.sact[(long)t * s.si + r] = a;
        return;
    }
    if (r >= I) return;
    QMat G = expert_slice(p.gate, p.idx[q], p.w_stride, p.sb_stride);
    QMat U = expert_slice(p.up, p.idx[q], p.w_stride, p.sb_stride);
    bf16 a = gate_up_swiglu_row(G, U, r, H, p.x + (long)(q / K) * H, lane);
    if (lane == 0) p.act[(long)q * I + r] = a;
}

// moe_mlp 3/3: x[m, r] += bf16(Σ_j w[m,j] · bf16(down_{idx[m,j]}[r] · act[m·K + j])), slots
// in order (= expert_matvec + combine + add_inplace). Grid (ceil(H / DOWN_ROWS), 1, M), one
// warp per slot (blockDim = 32·K, + 32 for the shared experts' warp): warp j computes rows
// r0 .. r0+DOWN_ROWS-1 of slot j's expert with every row's loads in flight at once
// (row_dot_rows), then thread t < DOWN_ROWS combines row r0+t's slots in order. One row a
// block (the first version) was 3.9 waves deep on the H100; 2, 4 and 8 rows measured alike
// on the H200. Rows serially per warp were slower (bench/RESULTS.md), and so was the next
// layer's input norm folded in by the last block to finish (a fence and an atomic in every
// block).
// With shared experts the combined output first takes the shared experts' output: x +=
// bf16(bf16(Σ) + shared) (= ... + add_inplace(Out, SharedOut) + add_inplace), shared read
// from p.shared, or (SHARED: moe_shared_down_combine_add, fields in s) computed by warp K of
// the block: bf16(sdown[r] · sact[m]) (= the shared down's matvec, the same row sums).
template <bool SHARED>
__device__ __forceinline__ void moe_down_combine_add_body(const MoeDownCombineAddArgs& p,
                                                          const MoeSharedDownCombineAddArgs* s) {
    __shared__ bf16 ys[DOWN_ROWS][SHARED ? 33 : 32];
    const int K = p.k, H = p.h, I = p.i;
    int m = blockIdx.z, j = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long r0 = (long)blockIdx.x * DOWN_ROWS;
    int nr = min(DOWN_ROWS, H - (int)r0);
    float acc[DOWN_ROWS];
    if (!SHARED || j < K) {
        int q = m * K + j;
        QMat D = expert_slice(p.down.w, p.idx[q], p.down.w_stride, p.down.sb_stride);
        row_dot_rows<DOWN_ROWS, 1>(D, r0, nr, I, p.act + (long)q * I, lane, acc);
    } else {
        row_dot_rows<DOWN_ROWS, 1>(s->sdown, r0, nr, s->si, s->sact + (long)m * s->si, lane, acc);
    }
#pragma unroll
    for (int i = 0; i < DOWN_ROWS; i++) {
        bf16 y = f2bf(warp_sum(acc[i]));
        if (lane == 0) ys[i][j] = y;
    }
    __syncthreads();
    int t = threadIdx.x;
    if (t >= nr) return;
    long r = r0 + t;
    float a = 0.f;
    for (int s = 0; s < K; s++) a = combine_step(a, p.wts[m * K + s], ys[t][s]);
    bf16 out = f2bf(a);
    if (SHARED) out = add_bf16(out, ys[t][K]);
    else if (p.shared) out = add_bf16(out, p.shared[(long)m * H + r]);
    p.x[(long)m * H + r] = add_bf16(p.x[(long)m * H + r], out);
}
extern "C" __global__ void moe_down_combine_add(const MoeDownCombineAddArgs p) {
    pdl_entry();
    moe_down_combine_add_body<false>(p, nullptr);
}
extern "C" __global__ void moe_shared_down_combine_add(const MoeSharedDownCombineAddArgs p) {
    pdl_entry();
    moe_down_combine_add_body<true>(p.routed, &p);
}

