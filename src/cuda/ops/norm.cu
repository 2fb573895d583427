// Norms and the residual stream: rmsnorm, the residual add, and their fused forms
// (add_rmsnorm; o_proj_add_rmsnorm, which also does the o projection). Activations bf16.

// y[rows, :n] = rmsnorm(x[rows, :n]) * w, one block per row; rows are ld elements apart in
// x and y (x == y allowed: per-head q/k norms, MLA's latent norm inside the Kva row).
extern "C" __global__ void rmsnorm(const RmsnormArgs p) {
    pdl_entry();
    rmsnorm_row(p.x + (long)blockIdx.x * p.ld, p.w, p.y + (long)blockIdx.x * p.ld, p.n, p.eps);
}

// x = bf16(x + y) over n elements (residual add).
extern "C" __global__ void add_inplace(const AddArgs p) {
    pdl_entry();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (long)gridDim.x * blockDim.x)
        p.x[i] = add_bf16(p.x[i], p.y[i]);
}

// residual_norm: x = bf16(x + src) row-wise, then y = rmsnorm(x) ⊙ w (= add_inplace +
// rmsnorm). One block of 256 threads per row, as the rmsnorm launch.
extern "C" __global__ void add_rmsnorm(const AddRmsnormArgs p) {
    pdl_entry();
    long off = (long)blockIdx.x * p.n;
    add_rmsnorm_row(p.x + off, p.src + off, p.w, p.y + off, p.n, p.eps);
}

// residual_norm with o_proj (decode): x[r] = bf16(x[r] + bf16(o[r]·attn + b)) per row, then
// the last block to finish writes h = rmsnorm(x) ⊙ nw (= matvec + add_inplace + rmsnorm).
// 256 threads (8 rows) per block, as the rmsnorm launch, so the norm reduces identically.
extern "C" __global__ void o_proj_add_rmsnorm(const OProjAddRmsnormArgs p) {
    pdl_entry();
    int lane = threadIdx.x & 31;
    long r = (long)blockIdx.x * (blockDim.x / WARP) + (threadIdx.x >> 5);
    if (r < p.hidden) {
        const bf16* xs[1] = {p.attn};
        float acc[1];
        row_dot_partial<1>(p.o, r, p.k, xs, 1, lane, acc);
        float v = warp_sum(acc[0]);
        if (lane == 0) {
            if (p.bias) v += p.bias[r];
            p.x[r] = add_bf16(p.x[r], f2bf(v));
        }
    }
    if (last_to_finish(p.ticket, gridDim.x)) rmsnorm_row(p.x, p.nw, p.h, p.hidden, p.eps);
}
