// topk_gating t0_warp — the production routers, one warp per token, WPB tokens per block:
// softmax mode is router_topk_warp (the `router_topk` kernel), sigmoid mode (GLM-4.7-Flash,
// model-spec §3.6) is router_sigmoid_warp (the `router_sigmoid` kernel) with one group, both
// from common.cuh, so the result is bit-identical to production for every WPB.
// Grid (ceil(M / WPB)); E ≤ 1024, K ≤ 16.
constexpr int WPB = {{WPB}};

extern "C" __global__ void __launch_bounds__(32 * WPB)
    foundry_topk_gating(const float* logits, const float* bias, int M, int E, int K, int mode, int norm, float scale,
                        int* idx, float* wout) {
    int m = blockIdx.x * WPB + (threadIdx.x >> 5);
    if (m >= M) return;
    if (mode == 0) router_topk_warp(logits + (long)m * E, E, K, norm, idx + m * K, wout + m * K);
    else router_sigmoid_warp(logits + (long)m * E, bias, E, K, 1, 1, norm, scale, idx + m * K, wout + m * K);
}
