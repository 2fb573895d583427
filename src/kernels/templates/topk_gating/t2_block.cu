// topk_gating t2_block — one BLOCK per token (TPB threads, thread t owns experts t, t + TPB,
// ...): the max and the softmax sum are block reductions, each top-k round is a block
// argmax (warp shuffles, then warp 0 over the warp winners). With TPB = 32 it reduces in
// t0_warp's order (bit-identical); wider blocks sum the softmax denominator in another order
// (numerics-changing). Grid (M); E ≤ 1024, K ≤ 16.
constexpr int TPB = {{TPB}}, PER = (1024 + TPB - 1) / TPB;

extern "C" __global__ void __launch_bounds__(TPB)
    foundry_topk_gating(const float* logits, const float* bias, int M, int E, int K, int mode, int norm, float scale,
                        int* idx, float* wout) {
    __shared__ float wv[32], sel[16];
    __shared__ int wi[32], seli[16];
    const int m = blockIdx.x, t = threadIdx.x, lane = t & 31, wid = t >> 5, nw = TPB / 32;
    const float* l = logits + (long)m * E;
    // key: what is ranked; wt: the weight a chosen expert contributes. Padding and removed
    // experts rank below every real one (softmax keys are ≥ 0; sigmoid keys are finite).
    const float pad = mode == 0 ? -1.f : -INFINITY, gone = mode == 0 ? -2.f : -INFINITY;
    float key[PER], wt[PER];
    if (mode == 0) {
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = t + TPB * i;
            key[i] = e < E ? l[e] : -INFINITY;
            mx = fmaxf(mx, key[i]);
        }
        mx = block_max(mx);
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = t + TPB * i;
            key[i] = e < E ? expf(key[i] - mx) : pad;
            sum += e < E ? key[i] : 0.f;
        }
        sum = block_sum(sum);
#pragma unroll
        for (int i = 0; i < PER; i++) {
            if (t + TPB * i < E) key[i] = key[i] / sum;
            wt[i] = key[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = t + TPB * i;
            wt[i] = e < E ? 1.f / (1.f + expf(-l[e])) : 0.f;
            key[i] = e < E ? wt[i] + bias[e] : pad;
        }
    }
    for (int j = 0; j < K; j++) {
        float bv = gone;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = t + TPB * i;
            if (key[i] > bv) { bv = key[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) { wv[wid] = bv; wi[wid] = bi; }
        __syncthreads();
        if (wid == 0) {
            float v = lane < nw ? wv[lane] : -INFINITY;
            int i = lane < nw ? wi[lane] : 0x7fffffff;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, v, o);
                int oi = __shfl_xor_sync(0xffffffffu, i, o);
                if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
            }
            if (lane == 0) seli[j] = i;
        }
        __syncthreads();
        int w = seli[j];
        if (w % TPB == t) {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                if (t + TPB * i == w) {
                    sel[j] = wt[i];
                    key[i] = gone;
                }
            }
        }
        __syncthreads();
    }
    if (t == 0) {
        float tot = 0.f;
        for (int j = 0; j < K; j++) tot += sel[j];
        for (int j = 0; j < K; j++) {
            idx[(long)m * K + j] = seli[j];
            if (mode == 0) wout[(long)m * K + j] = norm ? sel[j] / tot : sel[j];
            else wout[(long)m * K + j] = (norm ? sel[j] / (tot + 1e-20f) : sel[j]) * scale;
        }
    }
}
