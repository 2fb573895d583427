// Causal GQA attention over the KV cache, split over the keys (flash-decoding style).

// Split-KV causal attention. Grid (M·nh, nsplit), ATTN_THREADS threads. Query m
// (position pos[m] of the sequence whose cache rows start at base[m]) of head h attends to
// keys [0, n) of that sequence, KV head h / (nh/nkv), n = pos[m] + 1; split s takes the
// s-th of nsplit equal runs of them (the run length follows the position at run time, so a
// captured graph stays right as the context grows).
// Per pass of ATTN_THREADS keys: thread t scores key t (a whole 16-byte-vectorised dot
// product, so the key loads of a pass are independent), the block takes max and sum of
// the pass, then thread t accumulates dimensions t, t + ATTN_THREADS of Σ p·V in key order.
// Writes part_o[(mh·nsplit + s)·D + d] (unnormalised) and part_ml[..·2] = (max, sum); the
// last split block of a (token, head) to finish (tickets[mh], reset after use) merges the
// splits into bf16 out[M, nh·D].
// MAXD and ATTN_THREADS come from the prelude (src/cuda/ops/mod.rs).

// Merges the nsplit partial results of one (token, head) — po[nsplit, D] unnormalised
// sums, ml[nsplit, 2] = (max, sum) — into bf16 out[D]: each split is rescaled to the common
// maximum; empty splits (sum 0) drop out. Called by the whole block that finished last.
__device__ void merge_splits(const float* po, const float* pml, int nsplit, int D, bf16* out) {
    __shared__ float ml[2 * ATTN_THREADS];
    int tid = threadIdx.x;
    for (int i = tid; i < 2 * nsplit; i += ATTN_THREADS) ml[i] = __ldcg(pml + i);
    __syncthreads();
    float M2 = -INFINITY;
    for (int s = 0; s < nsplit; s++) if (ml[2 * s + 1] > 0.f) M2 = fmaxf(M2, ml[2 * s]);
    for (int d = tid; d < D; d += ATTN_THREADS) {
        float num = 0.f, den = 0.f;
#pragma unroll 4
        for (int s = 0; s < nsplit; s++) {
            float L = ml[2 * s + 1];
            if (L > 0.f) {
                float f = expf(ml[2 * s] - M2);
                num += __ldcg(po + (long)s * D + d) * f;
                den += L * f;
            }
        }
        out[d] = f2bf(num / den);
    }
}
// One pass of the online softmax over cnt ≤ ATTN_THREADS keys, thread t holding key t's
// scaled score sc (-INF past cnt): updates the running max mx and sum l, leaves p[t] =
// e^(sc - max) for the value pass, and returns the factor the value sums are rescaled by.
// Shared by GQA and MLA attention, so both reduce in the same order.
__device__ __forceinline__ float softmax_pass(float sc, int cnt, float* p, float& mx, float& l) {
    int tid = threadIdx.x;
    float mn = fmaxf(mx, block_max(sc));
    float pe = tid < cnt ? expf(sc - mn) : 0.f;
    float ps = block_sum(pe), f = expf(mx - mn);
    p[tid] = pe;
    __syncthreads();
    l = l * f + ps;
    mx = mn;
    return f;
}

// The end of split `split` of (token, head) mh: its unnormalised value sums acc (thread t
// holds columns t, t + ATTN_THREADS, ... of W) and (max, sum) go to the partials; the block
// that finishes last for mh merges every split into bf16 out[mh, W].
template <int NACC>
__device__ __forceinline__ void finish_split(const float (&acc)[NACC], int W, float mx, float l, float* part_o,
                                             float* part_ml, int* tickets, int mh, int split, int nsplit, bf16* out) {
    int tid = threadIdx.x;
    long slot = (long)mh * nsplit + split;
#pragma unroll
    for (int i = 0; i < NACC; i++) {
        int d = tid + i * ATTN_THREADS;
        if (d < W) part_o[slot * W + d] = acc[i];
    }
    if (tid == 0) { part_ml[slot * 2] = mx; part_ml[slot * 2 + 1] = l; }
    if (!last_to_finish(tickets + mh, nsplit)) return;
    merge_splits(part_o + (long)mh * nsplit * W, part_ml + (long)mh * nsplit * 2, nsplit, W, out + (long)mh * W);
}

extern "C" __global__ void attention(const AttentionArgs a) {
    pdl_entry();
    const int nh = a.nh, nkv = a.nkv, D = a.d, nsplit = a.nsplit;
    const float scale = a.scale;
    __shared__ float qs[MAXD];
    __shared__ float p[ATTN_THREADS];
    int mh = blockIdx.x, split = blockIdx.y, m = mh / nh, h = mh % nh;
    int kvh = h / (nh / nkv), tid = threadIdx.x;
    // Row m's own sequence: its cache rows start at base[m].
    const long seq = (long)a.base[m] * nkv * D;
    const bf16 *q = a.q, *kc = a.kc + seq, *vc = a.vc + seq;
    int n_keys = a.pos[m] + 1, chunk = (n_keys + nsplit - 1) / nsplit;
    int s0 = split * chunk, s1 = min(s0 + chunk, n_keys);
    for (int d = tid; d < D; d += ATTN_THREADS) qs[d] = bf2f(q[(long)mh * D + d]);
    __syncthreads();
    float mx = -INFINITY, l = 0.f, acc[MAXD / ATTN_THREADS] = {0.f, 0.f};
    for (int base = s0; base < s1; base += ATTN_THREADS) {
        int s = base + tid, cnt = min(ATTN_THREADS, s1 - base);
        float sc = -INFINITY;
        if (tid < cnt) {
            const uint4* kr = (const uint4*)(kc + ((long)s * nkv + kvh) * D);
            float dot = 0.f;
#pragma unroll 8
            for (int c = 0; c < D / 8; c++) {
                float kf[8];
                unpack8(kr[c], kf);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += qs[c * 8 + i] * kf[i];
            }
            sc = dot * scale;
        }
        float f = softmax_pass(sc, cnt, p, mx, l);
#pragma unroll
        for (int i = 0; i < MAXD / ATTN_THREADS; i++) {
            int d = tid + i * ATTN_THREADS;
            if (d < D) {
                const bf16* vr = vc + ((long)base * nkv + kvh) * D + d;
                float o = 0.f;
#pragma unroll 8
                for (int j = 0; j < cnt; j++) o += p[j] * bf2f(vr[(long)j * nkv * D]);
                acc[i] = acc[i] * f + o;
            }
        }
        __syncthreads();
    }
    finish_split(acc, D, mx, l, a.part_o, a.part_ml, a.tickets, mh, split, nsplit, a.out);
}

