// GQA positions and the KV cache: RoPE, the cache append, and their fused form with the
// per-head q/k norms (qk_norm_rope_kv). Row m of a batch is at position pos[m] of the
// sequence whose cache rows start at base[m] (its slot · rows per slot); both come from the
// device, so a captured decode graph stays right as the context grows.

// Half-split RoPE in place on q[M, nh, D] and k[M, nkv, D], row m at position pos[m].
// Block = one (token, head) of q then k; thread i rotates the pair (i, i + d_rot/2).
extern "C" __global__ void rope(const RopeArgs p) {
    pdl_entry();
    int m = blockIdx.x / (p.nh + p.nkv), h = blockIdx.x % (p.nh + p.nkv);
    bf16* v = h < p.nh ? p.q + ((long)m * p.nh + h) * p.d : p.k + ((long)m * p.nkv + (h - p.nh)) * p.d;
    for (int i = threadIdx.x; i < p.d_rot / 2; i += blockDim.x) rope_pair(v, i, p.d_rot / 2, p.pos[m], p.inv_freq[i]);
}

// Append M rows of K and V ([M, W] each) to the caches, row m at cache row base[m] + pos[m].
extern "C" __global__ void kv_append(const KvAppendArgs p) {
    pdl_entry();
    long dst = ((long)p.base[blockIdx.x] + p.pos[blockIdx.x]) * p.w, src = (long)blockIdx.x * p.w;
    for (int i = threadIdx.x; i < p.w; i += blockDim.x) {
        p.kc[dst + i] = p.k[src + i];
        p.vc[dst + i] = p.v[src + i];
    }
}

// qk_norm_rope: per (token, head) block of 128 threads (as the head-norm launch): q heads
// get q_norm then RoPE; k heads k_norm, RoPE, then the cache row; v heads are copied to the
// cache (= rmsnorm ×2 + rope + kv_append). Grid (M·(nh + 2·nkv)).
extern "C" __global__ void qk_norm_rope_kv(const QkNormRopeKvArgs a) {
    pdl_entry();
    const int nh = a.nh, nkv = a.nkv, D = a.d, d_rot = a.d_rot;
    int per = nh + 2 * nkv, m = blockIdx.x / per, h = blockIdx.x % per;
    int p = a.pos[m];
    long W = (long)nkv * D, r = (long)a.base[m] + p;
    if (h >= nh + nkv) {
        int vh = h - nh - nkv;
        for (int i = threadIdx.x; i < D; i += blockDim.x) a.vc[r * W + vh * D + i] = a.v[m * W + vh * D + i];
        return;
    }
    bool is_q = h < nh;
    bf16* hp = is_q ? a.q + ((long)m * nh + h) * D : a.k + (m * W + (long)(h - nh) * D);
    rmsnorm_row(hp, is_q ? a.qw : a.kw, hp, D, a.eps);
    __syncthreads();
    for (int i = threadIdx.x; i < d_rot / 2; i += blockDim.x) rope_pair(hp, i, d_rot / 2, p, a.inv_freq[i]);
    if (is_q) return;
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) a.kc[r * W + (long)(h - nh) * D + i] = hp[i];
}
