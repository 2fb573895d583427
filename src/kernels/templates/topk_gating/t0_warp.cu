// topk_gating t0_warp — one warp per token; WPB tokens per block. Softmax mode is the
// production router (router_topk_warp in common.cuh, launched one warp per block by
// `router_topk`), bit-identical for every WPB. Sigmoid mode (GLM-4.7-Flash, model-spec §3.6)
// has the same structure: s = sigmoid(l), top-K of s + bias (largest first, lowest index
// wins ties), weights = the chosen s, / (Σ + 1e-20) when norm, × scale.
// Grid (ceil(M / WPB)); E ≤ 1024, K ≤ 16.
constexpr int WPB = {{WPB}};

__device__ __forceinline__ void sigmoid_topk_warp(const float* l, const float* bias, int E, int K, int norm,
                                                  float scale, int* idx, float* wout) {
    int lane = threadIdx.x & 31;
    float s[32], key[32];
#pragma unroll
    for (int i = 0; i < 32; i++) {
        int e = lane + 32 * i;
        s[i] = e < E ? 1.f / (1.f + expf(-l[e])) : 0.f;
        key[i] = e < E ? s[i] + bias[e] : -INFINITY;
    }
    float tot = 0.f, sel[16];
    for (int j = 0; j < K; j++) {
        float bv = -INFINITY, bs = 0.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            int e = lane + 32 * i;
            if (key[i] > bv) { bv = key[i]; bi = e; bs = s[i]; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o), os = __shfl_xor_sync(0xffffffffu, bs, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; bs = os; }
        }
        if ((bi & 31) == lane) {
#pragma unroll
            for (int i = 0; i < 32; i++) if (lane + 32 * i == bi) key[i] = -INFINITY, s[i] = 0.f;
        }
        sel[j] = bs;
        tot += bs;
        if (lane == 0) idx[j] = bi;
    }
    if (lane == 0) for (int j = 0; j < K; j++) wout[j] = (norm ? sel[j] / (tot + 1e-20f) : sel[j]) * scale;
}

extern "C" __global__ void __launch_bounds__(32 * WPB)
    foundry_topk_gating(const float* logits, const float* bias, int M, int E, int K, int mode, int norm, float scale,
                        int* idx, float* wout) {
    int m = blockIdx.x * WPB + (threadIdx.x >> 5);
    if (m >= M) return;
    if (mode == 0) router_topk_warp(logits + (long)m * E, E, K, norm, idx + m * K, wout + m * K);
    else sigmoid_topk_warp(logits + (long)m * E, bias, E, K, norm, scale, idx + m * K, wout + m * K);
}
