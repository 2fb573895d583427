// LFM2's gated short convolution (model-spec §4.4, §4.6): the mixer of a conv layer between
// its in_proj and out_proj, and the fused conv_mixer (in_proj + the mixer, one token). Both
// kernels run a channel's tokens through the same three device functions below, so the
// fused one is bit-identical to matvec1 + short_conv.

// Channel c's kernel taps w[c, 0..L) and its window of gated inputs before the next token:
// win[0..L-1) = the layer's state (oldest first), zeros when fresh (position 0).
__device__ __forceinline__ void conv_load(const float* kernel, const bf16* state, bool fresh, long c, int H, int L,
                                          float (&w)[CONV_MAXL], bf16 (&win)[CONV_MAXL]) {
#pragma unroll
    for (int k = 0; k < CONV_MAXL; k++) {
        w[k] = k < L ? kernel[c * L + k] : 0.f;
        win[k] = (k < L - 1 && !fresh) ? state[(long)k * H + c] : (bf16)0;
    }
}

// One token of one channel: u = bf16(B·X) enters the window as its newest value,
// y = bf16(Σ_k w[k]·win[k] + b) (f32, k in order; w[L-1] multiplies the current token),
// returns bf16(C·y) and shifts the window by one.
__device__ __forceinline__ bf16 conv_token(const float (&w)[CONV_MAXL], bf16 (&win)[CONV_MAXL], int L, float b,
                                           bf16 B, bf16 C, bf16 X) {
    bf16 u = f2bf(bf2f(B) * bf2f(X));
#pragma unroll
    for (int k = 0; k < CONV_MAXL; k++) if (k == L - 1) win[k] = u;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < CONV_MAXL; k++) if (k < L) acc = __fmaf_rn(w[k], bf2f(win[k]), acc);
    float y = bf2f(f2bf(acc + b));
#pragma unroll
    for (int k = 0; k + 1 < CONV_MAXL; k++) if (k + 1 < L) win[k] = win[k + 1];
    return f2bf(bf2f(C) * y);
}

// The window's L-1 values back to the layer's state.
__device__ __forceinline__ void conv_store(bf16* state, long c, int H, int L, const bf16 (&win)[CONV_MAXL]) {
#pragma unroll
    for (int k = 0; k < CONV_MAXL; k++) if (k < L - 1) state[(long)k * H + c] = win[k];
}

// M tokens of bcx [M, 3H] (B | C | X) → out [M, H], channel c by thread c: row t (position
// pos[t] of slot slot[t]) gives out_t = bf16(C_t · conv(bf16(B·X))_t) over its slot's state
// [L-1, H] (the slot's part of state [slots, L-1, H]; read as zeros at pos == 0: a new
// sequence needs no reset launch), left holding the last L-1 gated inputs. Rows run in order
// within the thread that owns the channel; the window is stored back and the next slot's
// loaded where the slot changes, so rows of several sequences may share a launch, and the
// state moves on in place (the kernel replays in a graph). L ≤ CONV_MAXL.
extern "C" __global__ void short_conv(const ShortConvArgs p) {
    pdl_entry();
    const int H = p.h, L = p.l;
    const long per = (long)max(L - 1, 1) * H;
    long c = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H) return;
    float w[CONV_MAXL];
    bf16 win[CONV_MAXL];
    float b = p.bias ? p.bias[c] : 0.f;
    for (int t = 0; t < p.m; t++) {
        int s = p.slot[t];
        if (t == 0 || s != p.slot[t - 1]) {
            if (t > 0) conv_store(p.state + p.slot[t - 1] * per, c, H, L, win);
            conv_load(p.w, p.state + s * per, p.pos[t] == 0, c, H, L, w, win);
        }
        const bf16* row = p.bcx + (long)t * 3 * H;
        p.out[(long)t * H + c] = conv_token(w, win, L, b, row[c], row[H + c], row[2 * H + c]);
    }
    if (p.m > 0) conv_store(p.state + p.slot[p.m - 1] * per, c, H, L, win);
}

// conv_mixer (decode, one token at position pos[0] of slot slot[0]): channel c by one warp =
// rows c, H + c and 2H + c of in_proj (B, C and X of that channel: matvec_row<1>'s dot
// product, reduction, bias and bf16 rounding) and then short_conv's step in lane 0 (=
// matvec1 + short_conv). Grid (ceil(H/4)), 128 threads.
extern "C" __global__ void conv_mixer(const ConvMixerArgs p) {
    pdl_entry();
    const int H = p.h, L = p.l;
    int lane = threadIdx.x & 31;
    long c = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (c >= H) return;
    const bf16* xs[1] = {p.x};
    bf16 bcx[3];
#pragma unroll
    for (int j = 0; j < 3; j++) {
        long r = j * (long)H + c;
        float acc[1];
        row_dot_partial<1>(p.in_proj, r, H, xs, 1, lane, acc);
        float v = warp_sum(acc[0]);
        if (p.in_bias) v += p.in_bias[r];
        bcx[j] = f2bf(v);
    }
    if (lane != 0) return;
    float w[CONV_MAXL];
    bf16 win[CONV_MAXL];
    bf16* state = p.state + *p.slot * (long)max(L - 1, 1) * H;
    conv_load(p.w, state, *p.pos == 0, c, H, L, w, win);
    p.out[c] = conv_token(w, win, L, p.bias ? p.bias[c] : 0.f, bcx[0], bcx[1], bcx[2]);
    conv_store(state, c, H, L, win);
}
