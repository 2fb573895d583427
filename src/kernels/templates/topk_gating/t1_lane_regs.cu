// topk_gating t1_lane_regs — t0_warp with each lane's register array sized to the experts
// it owns (PER = experts per lane, 32·PER ≥ E) instead of 32: every top-k round scans PER
// values, not 32. Same keys, same sums in the same order, same tie rule: bit-identical to
// t0_warp (softmax: to production). Grid (ceil(M / WPB)); K ≤ 16.
constexpr int WPB = {{WPB}}, PER = {{PER}};

__device__ __forceinline__ void softmax_topk_lanes(const float* l, int E, int K, int norm, int* idx, float* wout) {
    int lane = threadIdx.x & 31;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = lane + 32 * i;
        v[i] = e < E ? __ldcg(l + e) : -INFINITY;
        mx = fmaxf(mx, v[i]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = lane + 32 * i;
        v[i] = e < E ? expf(v[i] - mx) : -1.f;
        sum += e < E ? v[i] : 0.f;
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < PER; i++) if (lane + 32 * i < E) v[i] = v[i] / sum;
    float tot = 0.f, sel[16];
    for (int j = 0; j < K; j++) {
        float bv = -2.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = lane + 32 * i;
            if (v[i] > bv) { bv = v[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if ((bi & 31) == lane) {
#pragma unroll
            for (int i = 0; i < PER; i++) if (lane + 32 * i == bi) v[i] = -2.f;
        }
        sel[j] = bv;
        tot += bv;
        if (lane == 0) idx[j] = bi;
    }
    if (lane == 0) for (int j = 0; j < K; j++) wout[j] = norm ? sel[j] / tot : sel[j];
}

__device__ __forceinline__ void sigmoid_topk_lanes(const float* l, const float* bias, int E, int K, int norm,
                                                   float scale, int* idx, float* wout) {
    int lane = threadIdx.x & 31;
    float s[PER], key[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = lane + 32 * i;
        s[i] = e < E ? 1.f / (1.f + expf(-l[e])) : 0.f;
        key[i] = e < E ? s[i] + bias[e] : -INFINITY;
    }
    float tot = 0.f, sel[16];
    for (int j = 0; j < K; j++) {
        float bv = -INFINITY, bs = 0.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER; i++) {
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
            for (int i = 0; i < PER; i++) if (lane + 32 * i == bi) key[i] = -INFINITY, s[i] = 0.f;
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
    if (mode == 0) softmax_topk_lanes(logits + (long)m * E, E, K, norm, idx + m * K, wout + m * K);
    else sigmoid_topk_lanes(logits + (long)m * E, bias, E, K, norm, scale, idx + m * K, wout + m * K);
}
