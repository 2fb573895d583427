// zmoe device building blocks. Every kernel — primitive or fused — is built from these
// functions, so two kernels that call them in the same order produce bit-identical results
// (the numerics contract in DESIGN.md). No CUDA headers are needed: bf16 is handled as raw
// 16-bit storage, so NVRTC compiles this without include paths.

typedef unsigned short bf16;
typedef unsigned int u32;

#define WARP 32
#define INFINITY __int_as_float(0x7f800000)
#define FMT_BF16 0
#define FMT_AFFINE 1

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round-to-nearest-even f32 -> bf16 (NaN stays NaN).
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (MAX false) or max (MAX true) over a block of up to 1024 threads; every thread gets
// the result. Fixed order: warps reduce, then warp 0's lanes reduce the warp results.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v) {
    __shared__ float red[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : (MAX ? -INFINITY : 0.f);
    return MAX ? warp_max(t) : warp_sum(t);
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// Unpack 8 bf16 from a 16-byte vector into floats.
__device__ __forceinline__ void unpack8(uint4 v, float* o) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// A weight matrix [rows, K] in one of the supported formats.
struct QMat {
    const void* w;     // bf16 [rows, K]  or  u32 packed [rows, K*bits/32]
    const bf16* s;     // affine: scales [rows, K/group]
    const bf16* b;     // affine: biases [rows, K/group]
    int fmt, bits, group;
};

// Chunk iterations per lane whose weight loads are issued together before any is used:
// single-token mat-vecs are latency-bound (a row is a few chunks per lane), so one round
// trip to memory instead of several. Multi-token tiles keep their registers for the tokens
// (PF 1). The accumulation order is the same either way: chunks ascending per lane.
template <int MT>
struct Prefetch {
    static constexpr int PF = MT == 1 ? 4 : 1;
};

// Affine rows, BITS in {4, 8}: lane l takes the 16-byte chunks l, l+32, ... of the packed
// row; a chunk holds 128/BITS codes, all inside one group (the group size is a multiple of
// 32). Per chunk and token: sc·Σ q·x + bi·Σ x, added to acc[m]. The codes of a chunk are
// converted to float once and reused for every token.
// (float)q for a code q < 2^23, exactly, without the quarter-rate int-to-float convert:
// the bits of 2^23 + q as a float, minus 2^23.
__device__ __forceinline__ float code_to_float(u32 q) { return __uint_as_float(q | 0x4B000000u) - 8388608.f; }

// acc + (sc·Σqx + bi·Σx) for one chunk, with every rounding spelled out (no contraction
// left to the compiler), so all kernels that call it round identically.
__device__ __forceinline__ float chunk_acc(float acc, float sc, float qx, float bi, float sx) {
    return __fadd_rn(acc, __fmaf_rn(sc, qx, __fmul_rn(bi, sx)));
}

template <int MT, int BITS>
__device__ __forceinline__ void affine_partial(const QMat& W, long r, int K, const bf16* const* xs, int M, int lane,
                                               float* acc) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    const uint4* wr = (const uint4*)((const u32*)W.w + r * (long)(K / PER_WORD));
    constexpr int PF = Prefetch<MT>::PF;
    const int gpr = K / W.group, nch = K / CODES;
    for (int c0 = lane; c0 < nch; c0 += WARP * PF) {
        uint4 wv[PF];
        float sc[PF], bi[PF];
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c < nch) {
                int g = (c * CODES) / W.group;
                wv[p] = wr[c];
                sc[p] = bf2f(W.s[r * gpr + g]);
                bi[p] = bf2f(W.b[r * gpr + g]);
            }
        }
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c >= nch) continue;
            u32 wd[4] = {wv[p].x, wv[p].y, wv[p].z, wv[p].w};
            float qf[CODES];
#pragma unroll
            for (int e = 0; e < CODES; e++) qf[e] = code_to_float((wd[e / PER_WORD] >> (BITS * (e % PER_WORD))) & MASK);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < M) {
                    const uint4* xr = (const uint4*)xs[m] + c * XV;
                    float qx = 0.f, sx = 0.f;
#pragma unroll
                    for (int j = 0; j < XV; j++) {
                        float xf[8];
                        unpack8(xr[j], xf);
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            qx = __fmaf_rn(qf[j * 8 + i], xf[i], qx);
                            sx += xf[i];
                        }
                    }
                    acc[m] = chunk_acc(acc[m], sc[p], qx, bi[p], sx);
                }
            }
        }
    }
}

// Partial dot products of weight row `r` with up to MT token rows xs[0..M) (each K long),
// one partial per lane; the caller reduces across the warp with warp_sum. Lane l handles
// the 16-byte chunks l, l+32, l+64, ... of the row. K must be a multiple of 32 (affine: and
// of the group size, itself a multiple of 32). Token m's sum never depends on the other
// tokens, so any grouping of tokens into calls gives bit-identical results.
template <int MT>
__device__ __forceinline__ void row_dot_partial(const QMat& W, long r, int K, const bf16* const* xs, int M, int lane,
                                                float* acc) {
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.f;
    if (W.fmt == FMT_BF16) {
        const uint4* wr = (const uint4*)((const bf16*)W.w + r * (long)K);
        // A bf16 row is 4× the chunks of a 4-bit one (K = 2048: 8 a lane): all of them in
        // flight at once for one token (the GLM router, GPT-OSS's attention projections).
        constexpr int PF = MT == 1 ? 8 : Prefetch<MT>::PF;
        const int nch = K / 8;
        for (int c0 = lane; c0 < nch; c0 += WARP * PF) {
            uint4 wv[PF];
#pragma unroll
            for (int p = 0; p < PF; p++) if (c0 + p * WARP < nch) wv[p] = wr[c0 + p * WARP];
#pragma unroll
            for (int p = 0; p < PF; p++) {
                int c = c0 + p * WARP;
                if (c >= nch) continue;
                float wf[8];
                unpack8(wv[p], wf);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    if (m < M) {
                        float xf[8];
                        unpack8(((const uint4*)xs[m])[c], xf);
                        float s = 0.f;
#pragma unroll
                        for (int i = 0; i < 8; i++) s = __fmaf_rn(wf[i], xf[i], s);
                        acc[m] += s;
                    }
                }
            }
        }
    } else if (W.bits == 4) {
        affine_partial<MT, 4>(W, r, K, xs, M, lane, acc);
    } else {
        affine_partial<MT, 8>(W, r, K, xs, M, lane, acc);
    }
}

// Two rows that read the same token (a gate row and an up row): the partials of
// row_dot_partial<1> for each, with the shared work done once — each chunk of x is
// unpacked once and its Σx computed once for both rows. Every sum runs in the same order
// as in row_dot_partial<1>, so the two partials are bit-identical to two separate calls.
template <int BITS>
__device__ __forceinline__ void affine_partial_pair(const QMat& A, const QMat& B, long r, int K, const bf16* x, int lane,
                                                    float* acc_a, float* acc_b) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    constexpr int PF = Prefetch<1>::PF;
    const uint4* wa = (const uint4*)((const u32*)A.w + r * (long)(K / PER_WORD));
    const uint4* wb = (const uint4*)((const u32*)B.w + r * (long)(K / PER_WORD));
    const int gpr = K / A.group, nch = K / CODES;
    float sa = 0.f, sb = 0.f;
    for (int c0 = lane; c0 < nch; c0 += WARP * PF) {
        uint4 va[PF], vb[PF];
        float sca[PF], bia[PF], scb[PF], bib[PF];
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c < nch) {
                long gi = r * gpr + (c * CODES) / A.group;
                va[p] = wa[c];
                vb[p] = wb[c];
                sca[p] = bf2f(A.s[gi]);
                bia[p] = bf2f(A.b[gi]);
                scb[p] = bf2f(B.s[gi]);
                bib[p] = bf2f(B.b[gi]);
            }
        }
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c >= nch) continue;
            u32 da[4] = {va[p].x, va[p].y, va[p].z, va[p].w}, db[4] = {vb[p].x, vb[p].y, vb[p].z, vb[p].w};
            const uint4* xr = (const uint4*)x + c * XV;
            float qa = 0.f, qb = 0.f, sx = 0.f;
#pragma unroll
            for (int j = 0; j < XV; j++) {
                float xf[8];
                unpack8(xr[j], xf);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    int e = j * 8 + i;
                    u32 sh = BITS * (e % PER_WORD);
                    qa = __fmaf_rn(code_to_float((da[e / PER_WORD] >> sh) & MASK), xf[i], qa);
                    qb = __fmaf_rn(code_to_float((db[e / PER_WORD] >> sh) & MASK), xf[i], qb);
                    sx += xf[i];
                }
            }
            sa = chunk_acc(sa, sca[p], qa, bia[p], sx);
            sb = chunk_acc(sb, scb[p], qb, bib[p], sx);
        }
    }
    *acc_a = sa;
    *acc_b = sb;
}

// Rows r0 .. r0+R-1 of one affine matrix against one token x: the partials of
// row_dot_partial<1> for each row, with each chunk of x unpacked and its Σx computed once
// for all R rows, and the loads of PF chunks of all R rows in flight together (R·PF a lane) —
// a single-token mat-vec is a round trip to memory per pass, so R rows a warp take one
// pass where R warps took R. Every row's sum runs in the order of row_dot_partial<1>
// (chunks ascending per lane), so the partials are bit-identical to R separate calls.
// Rows past r0 + nr - 1 repeat the last valid row (the caller drops them).
template <int R, int PF, int BITS>
__device__ __forceinline__ void affine_partial_rows(const QMat& W, long r0, int nr, int K, const bf16* x, int lane,
                                                    float* acc) {
    constexpr int CODES = 128 / BITS, XV = CODES / 8, PER_WORD = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    const int gpr = K / W.group, nch = K / CODES;
    const long row_u4 = K / PER_WORD / 4;  // uint4 chunks a row
    const uint4* w0 = (const uint4*)((const u32*)W.w + r0 * (long)(K / PER_WORD));
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    for (int c0 = lane; c0 < nch; c0 += WARP * PF) {
        uint4 wv[PF][R];
        float sc[PF][R], bi[PF][R];
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c < nch) {
                int g = (c * CODES) / W.group;
#pragma unroll
                for (int i = 0; i < R; i++) {
                    long ri = min(i, nr - 1);
                    wv[p][i] = w0[ri * row_u4 + c];
                    sc[p][i] = bf2f(W.s[(r0 + ri) * gpr + g]);
                    bi[p][i] = bf2f(W.b[(r0 + ri) * gpr + g]);
                }
            }
        }
#pragma unroll
        for (int p = 0; p < PF; p++) {
            int c = c0 + p * WARP;
            if (c >= nch) continue;
            const uint4* xr = (const uint4*)x + c * XV;
            float qx[R], sx = 0.f;
#pragma unroll
            for (int i = 0; i < R; i++) qx[i] = 0.f;
#pragma unroll
            for (int j = 0; j < XV; j++) {
                float xf[8];
                unpack8(xr[j], xf);
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    int e = j * 8 + t;
                    u32 sh = BITS * (e % PER_WORD);
#pragma unroll
                    for (int i = 0; i < R; i++) {
                        u32 wd[4] = {wv[p][i].x, wv[p][i].y, wv[p][i].z, wv[p][i].w};
                        qx[i] = __fmaf_rn(code_to_float((wd[e / PER_WORD] >> sh) & MASK), xf[t], qx[i]);
                    }
                    sx += xf[t];
                }
            }
#pragma unroll
            for (int i = 0; i < R; i++) acc[i] = chunk_acc(acc[i], sc[p][i], qx[i], bi[p][i], sx);
        }
    }
}

// R rows from r0 (nr of them valid) of any format against one token: affine 4/8-bit share
// the x work (affine_partial_rows, PF chunks of each row in flight), other formats take R
// row_dot_partial<1> calls.
template <int R, int PF>
__device__ __forceinline__ void row_dot_rows(const QMat& W, long r0, int nr, int K, const bf16* x, int lane,
                                             float* acc) {
    if (W.fmt == FMT_AFFINE && W.bits == 4) {
        affine_partial_rows<R, PF, 4>(W, r0, nr, K, x, lane, acc);
    } else if (W.fmt == FMT_AFFINE && W.bits == 8) {
        affine_partial_rows<R, PF, 8>(W, r0, nr, K, x, lane, acc);
    } else {
        const bf16* xs[1] = {x};
#pragma unroll
        for (int i = 0; i < R; i++) row_dot_partial<1>(W, r0 + min(i, nr - 1), K, xs, 1, lane, acc + i);
    }
}

// Expert e's slice of a stacked [E, rows, ...] matrix (strides in storage elements).
__device__ __forceinline__ QMat expert_slice(QMat W, long e, long w_stride, long sb_stride) {
    W.w = W.fmt == FMT_BF16 ? (const void*)((const bf16*)W.w + e * w_stride) : (const void*)((const u32*)W.w + e * w_stride);
    W.s = W.s + e * sb_stride;
    W.b = W.b + e * sb_stride;
    return W;
}

// Dequantized element (r, k) — for embedding lookups.
__device__ __forceinline__ float qmat_elem(const QMat& W, long r, int K, int k) {
    if (W.fmt == FMT_BF16) return bf2f(((const bf16*)W.w)[r * (long)K + k]);
    int gpr = K / W.group, g = k / W.group;
    float sc = bf2f(W.s[r * gpr + g]), bi = bf2f(W.b[r * gpr + g]);
    const u32* row = (const u32*)W.w + r * (long)(K * W.bits / 32);
    int per_word = 32 / W.bits;
    u32 q = (row[k / per_word] >> (W.bits * (k % per_word))) & ((1u << W.bits) - 1u);
    return sc * (float)q + bi;
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// Whether this block is the last of `expected` blocks to pass this point for *ticket (an
// atomic counter, left at zero again by that last block). Every block's global writes
// before the call are visible to the last block (read them through L2: __ldcg). All
// threads of the block must call it.
__device__ __forceinline__ bool last_to_finish(int* ticket, int expected) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1) == expected - 1;
    __syncthreads();
    if (!last) return false;
    __threadfence();
    if (threadIdx.x == 0) *ticket = 0;
    return true;
}

// bf16(a + b): the residual add.
__device__ __forceinline__ bf16 add_bf16(bf16 a, bf16 b) { return f2bf(bf2f(a) + bf2f(b)); }

// bf16(bf16(silu(g)) * u): SwiGLU of bf16 gate and up values.
__device__ __forceinline__ bf16 swiglu_elem(bf16 g, bf16 u) { return f2bf(bf2f(f2bf(silu(bf2f(g)))) * bf2f(u)); }

// swiglu(bf16(G[r]·x), bf16(U[r]·x)) for one warp (every lane gets the result): MLX affine
// rows share each chunk of x (affine_partial_pair), other formats take two row_dot_partial.
// The production moe_gate_up_swiglu and the foundry's gather_qmm_swiglu baseline call this.
__device__ __forceinline__ bf16 gate_up_swiglu_row(const QMat& G, const QMat& U, long r, int K, const bf16* x,
                                                   int lane) {
    float ag[1], au[1];
    if (G.fmt == FMT_AFFINE && G.bits == 4) {
        affine_partial_pair<4>(G, U, r, K, x, lane, ag, au);
    } else if (G.fmt == FMT_AFFINE && G.bits == 8) {
        affine_partial_pair<8>(G, U, r, K, x, lane, ag, au);
    } else {
        const bf16* xs[1] = {x};
        row_dot_partial<1>(G, r, K, xs, 1, lane, ag);
        row_dot_partial<1>(U, r, K, xs, 1, lane, au);
    }
    return swiglu_elem(f2bf(warp_sum(ag[0])), f2bf(warp_sum(au[0])));
}

// Rotates the pair (i, i + half) of a bf16 head in place by angle pos·inv_freq (half-split RoPE).
__device__ __forceinline__ void rope_pair(bf16* v, int i, int half, int pos, float inv_freq) {
    float sn, cs;
    sincosf((float)pos * inv_freq, &sn, &cs);
    float a = bf2f(v[i]), b = bf2f(v[i + half]);
    v[i] = f2bf(a * cs - b * sn);
    v[i + half] = f2bf(b * cs + a * sn);
}

// Router of one token by one warp: softmax over E ≤ 32·PER f32 logits (lane l holds experts
// l, l + 32, ...: PER registers), top-K (largest first, lowest index wins ties), optional
// renormalisation; writes idx[K], w[K]. Logits are read through L2 (__ldcg): the fused
// router reads what other blocks just wrote. PER only sizes the lanes' arrays (slots past
// E hold −inf / 0, which change no max and no sum), so every PER gives the same bits.
template <int PER>
__device__ __forceinline__ void router_topk_lanes(const float* l, int E, int K, int norm, int* idx, float* wout) {
    int lane = threadIdx.x & 31;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; i++) { int e = lane + 32 * i; v[i] = e < E ? __ldcg(l + e) : -INFINITY; mx = fmaxf(mx, v[i]); }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < PER; i++) { int e = lane + 32 * i; v[i] = e < E ? expf(v[i] - mx) : -1.f; sum += e < E ? v[i] : 0.f; }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < PER; i++) if (lane + 32 * i < E) v[i] = v[i] / sum;
    float tot = 0.f, sel[16];
    for (int j = 0; j < K; j++) {
        float bv = -2.f; int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER; i++) { int e = lane + 32 * i; if (v[i] > bv) { bv = v[i]; bi = e; } }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o); int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if ((bi & 31) == lane) {
#pragma unroll
            for (int i = 0; i < PER; i++) if (lane + 32 * i == bi) v[i] = -2.f;
        }
        sel[j] = bv; tot += bv;
        if (lane == 0) idx[j] = bi;
    }
    if (lane == 0) for (int j = 0; j < K; j++) wout[j] = norm ? sel[j] / tot : sel[j];
}

// Experts a lane holds in a one-warp router: f(Lanes<PER>{}) with the fewest of 1, 2, 4, 8, 32
// registers that hold E ≤ 1024 experts (lane l: experts l, l + 32, ...). Each top-k round
// then scans PER values a lane instead of 32 (the foundry's topk_gating t1_lane_regs,
// measured 1.26× faster at 1..8 tokens on the H100, bit-identical).
template <int N>
struct Lanes {
    static constexpr int PER = N;
};
template <typename F>
__device__ __forceinline__ void with_lanes(int E, F f) {
    if (E <= 32) f(Lanes<1>{});
    else if (E <= 64) f(Lanes<2>{});
    else if (E <= 128) f(Lanes<4>{});
    else if (E <= 256) f(Lanes<8>{});
    else f(Lanes<32>{});
}

// router_topk_lanes with the fewest registers that hold E (with_lanes).
__device__ __forceinline__ void router_topk_warp(const float* l, int E, int K, int norm, int* idx, float* wout) {
    with_lanes(E, [&](auto L) { router_topk_lanes<decltype(L)::PER>(l, E, K, norm, idx, wout); });
}

// Programmatic dependent launch (sm_90+): the first statement of every built-in kernel.
// griddepcontrol.wait returns once the kernel before this one in the stream has finished and
// its writes are visible — so nothing after it reads a stale input or overwrites an input
// still being read, and the arithmetic is untouched — and launch_dependents then lets the
// next kernel's blocks be scheduled while this grid's last wave runs (they wait in their own
// pdl_entry). Launched without the PDL attribute (ZMOE_PDL=0, GPUs before sm_90, foundry
// and pack kernels) both instructions return at once.
__device__ __forceinline__ void pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Top-K of one token's selection scores c (expert lane + 32·i in slot i of each lane's
// PER-long arrays; -inf never chosen), largest first, the lowest index winning ties: writes
// the chosen experts to idx (lane 0) and their weights sg to sel; returns Σ sel in slot
// order. PER only sizes the arrays (slots past E are never chosen): every PER, same bits.
template <int PER>
__device__ __forceinline__ float select_topk_warp(const float (&sg)[PER], const float (&c)[PER], int E, int K,
                                                  int* idx, float* sel) {
    int lane = threadIdx.x & 31;
    float tot = 0.f;
    unsigned taken = 0;  // bit i: expert lane + 32·i already chosen
    for (int j = 0; j < K; j++) {
        float bv = -INFINITY, bs = 0.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = lane + 32 * i;
            if (e < E && !(taken >> i & 1u) && c[i] > bv) { bv = c[i]; bs = sg[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o), os = __shfl_xor_sync(0xffffffffu, bs, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bs = os; bi = oi; }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        sel[j] = bs;
        tot += bs;
        if (lane == 0) idx[j] = bi;
    }
    return tot;
}

// GLM / DeepSeek router of one token by one warp (model-spec §3.6): s = sigmoid(logit);
// selection on s + bias among the topk_group groups (of n_group ≤ 32) with the largest
// sum of their two best biased scores (lowest group wins ties), top-K with the lowest
// index winning ties; weights = s of the chosen experts, / (Σ + 1e-20) when norm, × scale.
// E ≤ 32·PER. Logits are read through L2 (__ldcg): the fused router reads what other
// blocks just wrote.
// Shared memory of router_sigmoid_lanes' group selection (declared once by the dispatcher,
// not once per PER instance).
struct SigmoidGroups {
    float gs[32];    // group scores
    int keep[32];    // group chosen
    float cs[1024];  // every expert's selection score
};

template <int PER>
__device__ __forceinline__ void router_sigmoid_lanes(SigmoidGroups& sh, const float* lg, const float* bias, int E,
                                                     int K, int n_group, int topk_group, int norm, float scale,
                                                     int* idx, float* wout) {
    float* gs = sh.gs;
    int* keep = sh.keep;
    int lane = threadIdx.x & 31;
    float sg[PER], c[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = lane + 32 * i;
        sg[i] = e < E ? 1.f / (1.f + expf(-__ldcg(lg + e))) : 0.f;
        c[i] = e < E ? sg[i] + bias[e] : -INFINITY;
    }
    if (n_group > 1) {
        // Group scores: top-2 sum of each group, lane g owning group g.
        int per = E / n_group;
        float* cs = sh.cs;
#pragma unroll
        for (int i = 0; i < PER; i++) { int e = lane + 32 * i; if (e < E) cs[e] = c[i]; }
        __syncwarp();
        if (lane < n_group) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = lane * per; e < (lane + 1) * per; e++) {
                float v = cs[e];
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
            }
            gs[lane] = b1 + b2;
            keep[lane] = 0;
        }
        __syncwarp();
        if (lane == 0) {
            for (int j = 0; j < topk_group; j++) {
                int bi = -1;
                for (int g = 0; g < n_group; g++) if (!keep[g] && (bi < 0 || gs[g] > gs[bi])) bi = g;
                keep[bi] = 1;
            }
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < PER; i++) { int e = lane + 32 * i; if (e < E && !keep[e / per]) c[i] = -INFINITY; }
    }
    float sel[16];
    float tot = select_topk_warp<PER>(sg, c, E, K, idx, sel);
    if (lane == 0) {
        float den = tot + 1e-20f;
        for (int j = 0; j < K; j++) wout[j] = (norm ? sel[j] / den : sel[j]) * scale;
    }
}

// router_sigmoid_lanes with the fewest registers that hold E (with_lanes; the foundry's
// topk_gating t1_lane_regs in sigmoid mode: 5.6–6.8 against 8.2–8.4 µs at 1..8 tokens of
// GLM-4.7-Flash on the H200, bit-identical). E ≤ 1024.
__device__ __forceinline__ void router_sigmoid_warp(const float* lg, const float* bias, int E, int K, int n_group,
                                                    int topk_group, int norm, float scale, int* idx, float* wout) {
    __shared__ SigmoidGroups sh;
    with_lanes(E, [&](auto L) {
        router_sigmoid_lanes<decltype(L)::PER>(sh, lg, bias, E, K, n_group, topk_group, norm, scale, idx, wout);
    });
}

// One slot of the expert combine: a + w·y with an explicit FMA (no contraction choice left
// to the compiler, so every kernel that combines experts rounds identically).
__device__ __forceinline__ float combine_step(float a, float w, bf16 y) { return __fmaf_rn(w, bf2f(y), a); }

// One output element of the expert combine: Σ_j w[j] · y[j·stride] in slot order (f32,
// combine_step), for K slots. Every combine kernel and the foundry's moe_combine baseline
// call this.
__device__ __forceinline__ float combine_slots(const float* w, const bf16* y, int K, long stride) {
    float a = 0.f;
    for (int j = 0; j < K; j++) a = combine_step(a, w[j], y[(long)j * stride]);
    return a;
}

// Row RMSNorm of n elements by one block: y = bf16(w * (x * rsqrt(mean(x^2) + eps))).
// x is read through L2, so a last-to-finish block may normalise rows other blocks wrote.
// Each thread's first RMS_REG elements (i = tid, tid + blockDim, ...) and their weights are
// loaded together up front (no load waits behind a store) and kept in registers for the
// second pass; the sum runs in i order per thread.
#define RMS_REG 8
__device__ __forceinline__ void rmsnorm_row(const bf16* x, const float* w, bf16* y, int n, float eps) {
    const int t = threadIdx.x, nt = blockDim.x;
    float v[RMS_REG], wv[RMS_REG];
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) {
        bool in = t + j * nt < n;
        v[j] = in ? bf2f(__ldcg(x + t + j * nt)) : 0.f;
        wv[j] = in ? w[t + j * nt] : 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) if (t + j * nt < n) ss += v[j] * v[j];
    for (int i = t + RMS_REG * nt; i < n; i += nt) {
        float a = bf2f(__ldcg(x + i));
        ss += a * a;
    }
    float inv = rsqrtf(block_sum(ss) / (float)n + eps);
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) if (t + j * nt < n) y[t + j * nt] = f2bf(wv[j] * (v[j] * inv));
    for (int i = t + RMS_REG * nt; i < n; i += nt) y[i] = f2bf(w[i] * (bf2f(__ldcg(x + i)) * inv));
}

// residual_norm of one row by one block: x = bf16(x + src), then y = rmsnorm_row(x) ⊙ w.
// Each thread loads its first RMS_REG elements of x and src together before any store.
__device__ __forceinline__ void add_rmsnorm_row(bf16* x, const bf16* src, const float* w, bf16* y, int n, float eps) {
    const int t = threadIdx.x, nt = blockDim.x;
    bf16 xv[RMS_REG], sv[RMS_REG];
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) {
        if (t + j * nt < n) {
            xv[j] = x[t + j * nt];
            sv[j] = src[t + j * nt];
        }
    }
#pragma unroll
    for (int j = 0; j < RMS_REG; j++) if (t + j * nt < n) x[t + j * nt] = add_bf16(xv[j], sv[j]);
    for (int i = t + RMS_REG * nt; i < n; i += nt) x[i] = add_bf16(x[i], src[i]);
    __syncthreads();
    rmsnorm_row(x, w, y, n, eps);
}

// Two f32 as a bf16 pair (lo in the low half): an mma fragment register or a 4-byte store.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) { return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16); }

// D (+)= A·B on tensor cores, one warp: A 16×16 bf16 (4 regs: rows lane/4 and +8, k pairs
// 2·(lane%4) and +8), B 16×8 bf16 (2 regs: k pairs, column lane/4), C/D 16×8 f32 (rows
// lane/4 and +8, columns 2·(lane%4) and +1) — the PTX m16n8k16 fragment layout. sm_80+.
__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
