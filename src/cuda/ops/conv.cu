// LFM2's gated short convolution (model-spec §4.4, §4.6): the mixer of a conv layer between
// its in_proj and out_proj (both ordinary linear launches).

// M tokens at positions pos..pos+M-1 of bcx [M, 3H] (B | C | X), channel c by thread c:
//   u_t = bf16(B_t · X_t)
//   y_t = bf16(Σ_k w[c,k] · u_{t-(L-1)+k} + bias[c])   (f32, k in order; w[c,L-1] is the current token)
//   out_t = bf16(C_t · y_t)
// u before the chunk comes from the layer's state [L-1, H] (oldest first), read as zeros when
// pos == 0 (a new sequence: no reset launch needed); the state is left holding the last L-1
// values of u. Tokens run in order within the thread that owns the channel, so the state
// moves on in place and the kernel replays in a graph. L ≤ CONV_MAXL.
extern "C" __global__ void short_conv(const ShortConvArgs p) {
    const int H = p.h, L = p.l, M = p.m;
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H) return;
    bool fresh = *p.pos == 0;
    float w[CONV_MAXL];
    bf16 win[CONV_MAXL];  // u_{t-(L-1)} .. u_t
#pragma unroll
    for (int k = 0; k < CONV_MAXL; k++) {
        w[k] = k < L ? p.w[(long)c * L + k] : 0.f;
        win[k] = (k < L - 1 && !fresh) ? p.state[(long)k * H + c] : (bf16)0;
    }
    float b = p.bias ? p.bias[c] : 0.f;
    for (int t = 0; t < M; t++) {
        const bf16* row = p.bcx + (long)t * 3 * H;
        bf16 u = f2bf(bf2f(row[c]) * bf2f(row[2 * H + c]));
#pragma unroll
        for (int k = 0; k < CONV_MAXL; k++) if (k == L - 1) win[k] = u;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < CONV_MAXL; k++) if (k < L) acc = __fmaf_rn(w[k], bf2f(win[k]), acc);
        float y = bf2f(f2bf(acc + b));
        p.out[(long)t * H + c] = f2bf(bf2f(row[H + c]) * y);
#pragma unroll
        for (int k = 0; k + 1 < CONV_MAXL; k++) if (k + 1 < L) win[k] = win[k + 1];
    }
#pragma unroll
    for (int k = 0; k < CONV_MAXL; k++) if (k < L - 1) p.state[(long)k * H + c] = win[k];
}
