// The last row of a prompt chunk, and sampling the next token on the device.

// Copies row `row` of x[rows, n] to the front (keep only the last token's hidden state).
extern "C" __global__ void take_row(const TakeRowArgs p) {
    pdl_entry();
    for (int i = threadIdx.x; i < p.n; i += blockDim.x) p.y[i] = p.x[(long)p.row * p.n + i];
}

// SplitMix64 output function (src/rng.rs `mix64`).
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// (value, id) order of the sampler: larger value first, lower id among equal values.
__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

#define SAMPLE_CAP 2048
#define SAMPLE_NATS 24.f
#define SAMPLE_BINS 2048
// Picks the next token from logits[V] like the host Sampler (src/sample.rs), one block of
// 1024 threads. temp ≤ 0: argmax, lowest id among equal maxima (exactly the host's pick).
// Otherwise, with x = l/temp − max: Z = Σ e^x over the whole vocabulary; a histogram of x
// over [−SAMPLE_NATS, 0] picks the largest top slice of at most SAMPLE_CAP candidates, which
// are sorted like the host sorts (value descending, id ascending). Then top_k, softmax,
// top_p and the draw u = (mix64(seed ^ mix64(step + 1)) >> 40) / 2^24 follow the host's
// steps (the same u; sums in another order, so a pick may differ by one rank where rounding
// moves a cumulative boundary). Tokens beyond SAMPLE_NATS carry < V·e^-24 of the top
// token's probability and are left out. out = [token, 0], or [-, 1] when the answer may lie outside the candidates
// (top_k larger than the slice, or the nucleus / the draw reaching past it): the host then
// samples the logits itself; or [0, 2] when a logit is NaN or infinite (the forward is broken:
// the host reports an error instead of a token).
extern "C" __global__ void sample_token(const SampleArgs a) {
    pdl_entry();
    const float* logits = a.logits;
    const int V = a.v, top_k = a.top_k;
    const float temp = a.temp, top_p = a.top_p;
    const unsigned long long seed = a.seed, step = a.step;
    int* out = a.out;
    __shared__ float sv[SAMPLE_CAP];
    __shared__ int si[SAMPLE_CAP];
    __shared__ int hist[SAMPLE_BINS];
    __shared__ float wv[32];
    __shared__ int wi[32];
    __shared__ int count, cut;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nt = blockDim.x;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    int bad = 0;
    for (int i = tid; i < V; i += nt) {
        float v = logits[i];
        bad |= (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;  // NaN or ±inf: exponent all ones
        if (bi == 0x7fffffff || v > bv) { bv = v; bi = i; }
    }
    // Block-uniform: every thread leaves together.
    if (__syncthreads_or(bad)) {
        if (tid == 0) { out[0] = 0; out[1] = 2; }
        return;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ranks_before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { wv[wid] = bv; wi[wid] = bi; }
    for (int b = tid; b < SAMPLE_BINS; b += nt) hist[b] = 0;
    if (tid == 0) count = 0;
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < nt / 32; w++) if (ranks_before(wv[w], wi[w], wv[0], wi[0])) { wv[0] = wv[w]; wi[0] = wi[w]; }
        if (temp <= 0.f) { out[0] = wi[0]; out[1] = 0; }
    }
    __syncthreads();
    if (temp <= 0.f) return;
    const float mx = wv[0] / temp, per_bin = SAMPLE_BINS / SAMPLE_NATS;
    float z = 0.f;
    for (int i = tid; i < V; i += nt) {
        float x = logits[i] / temp - mx;
        z += expf(x);
        if (x >= -SAMPLE_NATS) atomicAdd(&hist[min(SAMPLE_BINS - 1, (int)(-x * per_bin))], 1);
    }
    float z_all = block_sum(z);
    if (tid == 0) {
        int acc = 0, b = 0;
        while (b < SAMPLE_BINS && acc + hist[b] <= SAMPLE_CAP) acc += hist[b++];
        cut = b;
    }
    __syncthreads();
    const int nbins = cut;
    for (int i = tid; i < V; i += nt) {
        float x = logits[i] / temp - mx;
        if (x >= -SAMPLE_NATS && (int)(-x * per_bin) < nbins) {
            int k = atomicAdd(&count, 1);
            sv[k] = logits[i];
            si[k] = i;
        }
    }
    __syncthreads();
    int n = count;
    // Whether tokens within SAMPLE_NATS were left out for lack of room.
    bool sliced = nbins < SAMPLE_BINS;
    for (int j = n + tid; j < SAMPLE_CAP; j += nt) { sv[j] = -INFINITY; si[j] = 0x7fffffff; }
    // Bitonic sort of SAMPLE_CAP (value, id) pairs into sampler order.
    for (int size = 2; size <= SAMPLE_CAP; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = tid; i < SAMPLE_CAP; i += nt) {
                int j = i ^ stride;
                if (j > i) {
                    bool fwd = (i & size) == 0;
                    bool swap = fwd ? ranks_before(sv[j], si[j], sv[i], si[i]) : ranks_before(sv[i], si[i], sv[j], si[j]);
                    if (swap) {
                        float tv = sv[i]; sv[i] = sv[j]; sv[j] = tv;
                        int ti = si[i]; si[i] = si[j]; si[j] = ti;
                    }
                }
            }
        }
    }
    __syncthreads();
    if (tid != 0) return;
    out[1] = 1;  // until a pick is certain
    // The host keeps the top_k (or all V) tokens: `whole` = the candidates are exactly that set.
    bool whole;
    if (top_k > 0 && top_k <= n) { n = top_k; whole = true; }
    else whole = !sliced && n == V;
    if (top_k > 0 && !whole && sliced) return;
    // softmax(l / temp): over the top_k when given, else over the whole vocabulary (z_all).
    float sum = 0.f;
    for (int j = 0; j < n; j++) { sv[j] = expf(sv[j] / temp - mx); sum += sv[j]; }
    if (top_k <= 0) sum = z_all;
    for (int j = 0; j < n; j++) sv[j] /= sum;
    bool closed = whole;  // whether the kept set ends inside the candidates
    if (top_p < 1.f) {
        float cum = 0.f;
        int keep = -1;
        for (int j = 0; j < n; j++) { cum += sv[j]; if (cum >= top_p) { keep = j + 1; break; } }
        if (keep < 0 && !whole) return;
        if (keep > 0) { n = keep; closed = true; }
        float s = 0.f;
        for (int j = 0; j < n; j++) s += sv[j];
        for (int j = 0; j < n; j++) sv[j] /= s;
    }
    float u = (float)(mix64(seed ^ mix64(step + 1ull)) >> 40) / (float)(1 << 24);
    float cum = 0.f;
    int pick = -1;
    for (int j = 0; j < n; j++) { cum += sv[j]; if (u < cum) { pick = j; break; } }
    if (pick < 0) {
        if (!closed) return;
        pick = n - 1;
    }
    out[0] = si[pick];
    out[1] = 0;
}
