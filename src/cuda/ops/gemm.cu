// Tensor-core matrix products for the chunks of long prompts (more than BATCH_ROWS tokens;
// shorter forwards stay on the row-per-token mat-vecs, bit-identical to decode). y = x Wᵀ over a tile of TC_BM
// token rows × TC_BN output rows per 128-thread block, k in stages of TC_BK through shared
// memory, mma.sync m16n8k16 (f32 accumulate; sm_80+).
//
// Each kernel has two twins (bench/RESULTS.md sessions 14–15). The `*_f16` twins, the default,
// give the tensor cores each weight whole, made with one fma a pair as it is staged, so the
// mma accumulates straight into the sums: MLX affine weights as f16(sc·q + bi) (scaled by
// 2^TC_F16_WSHIFT) against x in fp16 (scaled by 2^-TC_F16_XSHIFT; both scales exact and undone
// on the f32 sums), MXFP4 as bf16(v·2^s) (exact), bf16 as they are. The plain twins
// (ZMOE_TC_CODES=1, the A/B baseline) take affine weights as their integer codes, which bf16
// holds exactly, and apply a group's scale and bias once its k-range is done: acc += sc·Σq·x +
// bi·Σx, the mat-vecs' formula (chunk_acc) in another order; MXFP4 likewise with a scale per
// 32 (bias 0). That per-group epilogue holds them at 127 registers against 80: the `_f16`
// twins prefill a qwen3 prompt 12.6 % faster (measured on the H100). Either way the products agree with the row kernels to
// f32 rounding — an fp16 weight rounds at 2^-11 relative at most, and MLX's scale and bias
// leave few bits to round (≈ 5e-6 measured against 1e-5 for the codes) — not bit for bit
// (tests/gpu.rs checks the tolerance).
//
// Warp w of a block owns output rows w·32 .. w·32+31 of the tile and all TC_BM tokens:
// 2 (m16) × 4 (n8) accumulator fragments. Inside every run of 8 k positions both tiles hold k
// in the order 0,4,1,5,2,6,3,7 (pairs (j, j+4)), so a 4-bit word splits into bf16 pairs with
// one shift and one mask; a dot product does not depend on the order of its terms' k.

#define TC_BN 128
#define TC_MXFP4 (-4)  // tc_tile's BITS for MXFP4 (4-bit E2M1 codes, an E8M0 scale per 32)
static_assert(TC_BM == 32 && TC_BN == 128, "the staging below assumes 32 x 128 tiles and 128 threads");
#define TC_BK 32
#define TC_LD (TC_BK + 8)  // shared row stride (bf16): fragment loads hit 32 distinct banks

// How a tile feeds quantized weights to the tensor cores (tc_tile's MODE).
#define TC_CODES 0     // integer codes in bf16, scale and bias after each group
#define TC_DEQ_BF16 1  // bf16(sc·q + bi): MXFP4's v·2^s in the `_f16` twins (exact)
#define TC_DEQ_F16 2   // affine: f16(sc·q + bi)·2^8 against x·2^-6 in fp16; MXFP4 as TC_DEQ_BF16
// The fp16 scales. x·2^-6: bf16 values from 2^-11 up to 65504·2^6 ≈ 4.2e6 are exact in fp16,
// smaller ones keep an absolute error below 2^-19, and larger ones (far beyond what a norm, an
// attention or a SwiGLU produces) would overflow to inf, which the non-finite-logits check
// reports. Weights·2^8: scales and biases down to 2^-22 stay normal in fp16; a weight must be
// below 256 in magnitude (a trained projection's are below 10).
#define TC_F16_XSHIFT 6
#define TC_F16_WSHIFT 8
// The `_f16` twins need no more than 80 registers (none spill under NVRTC sm_90, or 8 bytes),
// so six blocks of 128 threads share an SM; ldmatrix's addresses would otherwise take 88–92.
#define TC_DEQ_BOUNDS __launch_bounds__(128, 6)

// One block's shared tiles. xrow: the TC_BM token rows' x pointers (gathered rows for
// experts), yrow: where each row's output goes (its row index in y).
struct __align__(16) TcSmem {
    bf16 x[TC_BM][TC_LD];
    bf16 w[TC_BN][TC_LD];
    float sx[TC_BM];  // Σx over the current group's k so far, per token row (affine)
    float sc[TC_BN], bi[TC_BN];  // the current group's scale and bias per output row (affine)
    const bf16* xrow[TC_BM];
    int yrow[TC_BM];
};

// (e0,e1)(e2,e3)(e4,e5)(e6,e7) -> (e0,e4)(e1,e5)(e2,e6)(e3,e7): the tile order of 8 bf16.
__device__ __forceinline__ uint4 perm8(uint4 v) {
    uint4 o;
    o.x = __byte_perm(v.x, v.z, 0x5410);
    o.y = __byte_perm(v.x, v.z, 0x7632);
    o.z = __byte_perm(v.y, v.w, 0x5410);
    o.w = __byte_perm(v.y, v.w, 0x7632);
    return o;
}

// A bf16 pair (a·b + c per half, one rounding to bf16).
__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    u32 d = 0;
#if __CUDA_ARCH__ >= 800
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#endif
    return d;
}

// A shared-memory pointer as the 32-bit address ldmatrix takes.
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Four 8 × 8 b16 matrices from shared memory (ldmatrix .x4): lanes 8j .. 8j + 7 give the row
// addresses of matrix j (16 bytes a row, 16-byte aligned); r[j] of lane t = matrix j's row
// t / 4, columns 2·(t % 4) and 2·(t % 4) + 1 — the layout of the mma fragments.
__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// c += a·b on tensor cores, fp16 inputs (the fragments of mma_bf16_16816), f32 sums.
__device__ __forceinline__ void mma_f16_16816(float* c, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// An fp16 pair (a·b + c per half, one rounding to fp16).
__device__ __forceinline__ u32 fma_f16x2(u32 a, u32 b, u32 c) {
    u32 d = 0;
#if __CUDA_ARCH__ >= 800
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#endif
    return d;
}

// Two floats as an fp16 pair (lo in the low half), each rounded to nearest.
__device__ __forceinline__ u32 f16x2(float lo, float hi) {
    u32 d = 0;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
    return d;
}

// Two 4-bit codes (low and high halves of v, each < 16) as a bf16 pair, exactly:
// bf16 0x4300 | q is 128 + q, and (128 + q)·1 − 128 is exact in bf16.
__device__ __forceinline__ u32 codes4_bf16x2(u32 v) {
    return fma_bf16x2(v | 0x43004300u, 0x3F803F80u, 0xC300C300u);
}

// Two codes < 1024 (bits 0..9 and 16..25 of v) as an fp16 pair, exactly: fp16 0x6400 | q
// is 1024 + q, and (1024 + q)·1 − 1024 is exact in fp16.
__device__ __forceinline__ u32 codes_f16x2(u32 v) {
    return fma_f16x2(v | 0x64006400u, 0x3C003C00u, 0xE400E400u);
}

// Two codes < 256 as a bf16 pair, exactly (via f32).
__device__ __forceinline__ u32 codes8_bf16x2(u32 lo, u32 hi) {
    return (__float_as_uint(code_to_float(lo)) >> 16) | (__float_as_uint(code_to_float(hi)) & 0xffff0000u);
}

// Stage c (k = c·TC_BK ..) of weight row `row` as stored (bf16: 4 uint4; 4-bit: 1; 8-bit:
// 2), zeros past row N. Loaded one stage ahead; converted when stored (tc_convert_w), so the
// loads stay in flight during the stage's mma.
template <int BITS>
__device__ __forceinline__ void tc_load_w(const QMat& W, long row, bool valid, int K, int c, uint4* raw) {
    constexpr int NV = BITS == 16 ? 4 : BITS == 8 ? 2 : 1;  // 4-bit affine, MXFP4: 1
    const uint4* wr = (const uint4*)((const u32*)W.w + row * (long)(K * (BITS < 0 ? -BITS : BITS) / 32)) + c * NV;
#pragma unroll
    for (int i = 0; i < NV; i++) raw[i] = valid ? wr[i] : make_uint4(0, 0, 0, 0);
}

// A stage of one weight row as tile-ordered bf16 (codes for affine; fp16 codes when F16):
// 4 uint4 = 32 k.
template <int BITS, bool F16>
__device__ __forceinline__ void tc_convert_w(const uint4* raw, uint4* o) {
    if (BITS == 16) {
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = perm8(raw[i]);
    } else if (BITS == TC_MXFP4) {
        // 32 E2M1 codes = one uint4, laid out as the 4-bit affine codes (element j of a word
        // at bits 4j); each value is exact in bf16 (the high half of its f32).
        u32 wd[4] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w};
        auto pair = [](u32 v) {  // codes at bits 0..3 and 16..19 -> a bf16 pair
            return (__float_as_uint(fp4_to_float(v & 15u)) >> 16) |
                   (__float_as_uint(fp4_to_float((v >> 16) & 15u)) & 0xffff0000u);
        };
#pragma unroll
        for (int i = 0; i < 4; i++)
            o[i] = make_uint4(pair(wd[i]), pair(wd[i] >> 4), pair(wd[i] >> 8), pair(wd[i] >> 12));
    } else if (BITS == 4) {
        // 32 codes = one uint4; word i holds k 8i..8i+7, code j at bits 4j.
        u32 wd[4] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w};
        auto pair = [](u32 v) { return F16 ? codes_f16x2(v) : codes4_bf16x2(v); };
#pragma unroll
        for (int i = 0; i < 4; i++)
            o[i] = make_uint4(pair(wd[i] & 0x000F000Fu), pair((wd[i] >> 4) & 0x000F000Fu),
                              pair((wd[i] >> 8) & 0x000F000Fu), pair((wd[i] >> 12) & 0x000F000Fu));
    } else if (F16) {
        // 8-bit codes as fp16 pairs: the byte of word 2i and the byte of word 2i + 1.
        u32 wd[8] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w, raw[1].x, raw[1].y, raw[1].z, raw[1].w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 a = wd[2 * i], b = wd[2 * i + 1];
            o[i] = make_uint4(codes_f16x2(__byte_perm(a, b, 0x7470) & 0x00FF00FFu),
                              codes_f16x2(__byte_perm(a, b, 0x7571) & 0x00FF00FFu),
                              codes_f16x2(__byte_perm(a, b, 0x7672) & 0x00FF00FFu),
                              codes_f16x2(__byte_perm(a, b, 0x7773) & 0x00FF00FFu));
        }
    } else {
        // 32 codes = two uint4; words 2i, 2i+1 hold k 8i..8i+3 and 8i+4..8i+7, a code a byte.
        u32 wd[8] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w, raw[1].x, raw[1].y, raw[1].z, raw[1].w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 a = wd[2 * i], b = wd[2 * i + 1];
            o[i] = make_uint4(codes8_bf16x2(a & 0xff, b & 0xff), codes8_bf16x2((a >> 8) & 0xff, (b >> 8) & 0xff),
                              codes8_bf16x2((a >> 16) & 0xff, (b >> 16) & 0xff), codes8_bf16x2(a >> 24, b >> 24));
        }
    }
}

// Calls f(mf, nf, i, m, n) for each of this lane's accumulators acc[mf][nf][i], with its tile
// coordinates: token row m (0 .. TC_BM) and output row n (0 .. TC_BN) — the m16n8 C-fragment
// layout, warp w owning output rows w·32 ...
template <typename F>
__device__ __forceinline__ void tc_for_each_acc(F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int mf = 0; mf < 2; mf++)
#pragma unroll
        for (int nf = 0; nf < 4; nf++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                f(mf, nf, i, mf * 16 + (lane >> 2) + (i >> 1) * 8, warp * 32 + nf * 8 + 2 * (lane & 3) + (i & 1));
}

// f (a bf16 value, or a power of two in bf16's range) in both halves of a bf16 pair.
__device__ __forceinline__ u32 bf16x2_splat(float f) {
    const u32 h = __float_as_uint(f) >> 16;
    return h | (h << 16);
}

// acc[mf][nf][i] of this warp = Σ_k x[row m]·W[n0 + warp·32 + n] over all K, m = mf·16 +
// lane/4 (+8 for i ≥ 2), n = nf·8 + 2·(lane%4) + (i&1). sm.xrow must be set (and synced).
// K % TC_BK == 0; affine: group % TC_BK == 0.
//
// MODE: TC_CODES multiplies integer codes and applies scale and bias per group (Σx of each
// token row, a second accumulator set, the epilogue). The dequantising modes give the
// tensor cores each weight whole, so the mma accumulates straight into acc: TC_DEQ_BF16
// (MXFP4: bf16(v·2^s), exact) and TC_DEQ_F16 (affine: f16((sc·q + bi)·2^8) against
// f16(x·2^-6), then acc·2^-2, exact).
template <int BITS, int MODE>
__device__ __forceinline__ void tc_tile(const QMat& W, TcSmem& sm, int n0, int N, int K, float acc[2][4][4]) {
    constexpr bool AFF = BITS != 16;
    constexpr bool DEQ = MODE != TC_CODES;
    constexpr bool EPI = AFF && !DEQ;  // codes in the mma, scale and bias after each group
    constexpr bool F16 = MODE == TC_DEQ_F16 && BITS > 0 && BITS != 16;  // fp16 tiles (affine)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int xr = tid >> 2, xp = tid & 3;  // the x row and quarter this thread stages
    const bf16* xsrc = sm.xrow[xr] + xp * 8;
    const long wrow = (long)n0 + tid;
    const bool wvalid = wrow < N;
    const int nch = K / TC_BK;
    // Stages per scale group and groups per row (MXFP4: a scale per 32 = one stage).
    const int gc = BITS == TC_MXFP4 ? 1 : AFF ? W.group / TC_BK : 1;
    const int gpr = BITS == TC_MXFP4 ? K / 32 : AFF ? K / W.group : 0;
    float tacc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[a][b][i] = 0.f, tacc[a][b][i] = 0.f;

    uint4 xv, wv[4];
    float scv = 0.f, biv = 0.f;
    auto fetch = [&](int c) {
        xv = ((const uint4*)xsrc)[c * (TC_BK / 8)];
        tc_load_w<BITS>(W, wrow, wvalid, K, c, wv);
        if (BITS == TC_MXFP4 && wvalid) {
            scv = e8m0_to_float(((const unsigned char*)W.s)[wrow * gpr + c]);
            biv = 0.f;
        } else if (AFF && c % gc == 0 && wvalid) {
            scv = bf2f(W.s[wrow * gpr + c / gc]);
            biv = bf2f(W.b[wrow * gpr + c / gc]);
        }
    };
    auto store = [&](int c) {
        uint4 xt = perm8(xv);
        if (F16) {
            // bf16 pairs -> fp16 pairs of x·2^-TC_F16_XSHIFT (exact in fp16's range).
            constexpr float xs = 1.f / (1 << TC_F16_XSHIFT);
            auto h = [&](u32 v) { return f16x2(__uint_as_float(v << 16) * xs, __uint_as_float(v & 0xffff0000u) * xs); };
            xt = make_uint4(h(xt.x), h(xt.y), h(xt.z), h(xt.w));
        }
        *(uint4*)&sm.x[xr][xp * 8] = xt;
        uint4 wt[4];
        tc_convert_w<BITS, F16>(wv, wt);
        if (F16) {
            // This thread's row: its group's scale and bias in fp16 (0 past row N) on every pair.
            constexpr float ws = (float)(1 << TC_F16_WSHIFT);
            const u32 s2 = f16x2(scv * ws, scv * ws), b2 = f16x2(biv * ws, biv * ws);
#pragma unroll
            for (int i = 0; i < 4; i++)
                wt[i] = make_uint4(fma_f16x2(wt[i].x, s2, b2), fma_f16x2(wt[i].y, s2, b2),
                                   fma_f16x2(wt[i].z, s2, b2), fma_f16x2(wt[i].w, s2, b2));
        } else if (AFF && DEQ) {
            // This thread's row: its group's scale and bias (0 past row N) on every pair.
            const u32 s2 = bf16x2_splat(scv), b2 = bf16x2_splat(biv);
#pragma unroll
            for (int i = 0; i < 4; i++)
                wt[i] = make_uint4(fma_bf16x2(wt[i].x, s2, b2), fma_bf16x2(wt[i].y, s2, b2),
                                   fma_bf16x2(wt[i].z, s2, b2), fma_bf16x2(wt[i].w, s2, b2));
        }
#pragma unroll
        for (int i = 0; i < 4; i++) *(uint4*)&sm.w[tid][i * 8] = wt[i];
        if (EPI) {
            float xf[8], s = 0.f;
            unpack8(xv, xf);
#pragma unroll
            for (int i = 0; i < 8; i++) s += xf[i];
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            if (xp == 0) sm.sx[xr] = c % gc == 0 ? s : sm.sx[xr] + s;
            if (c % gc == 0) sm.sc[tid] = scv, sm.bi[tid] = biv;
        }
    };

    // This lane's row addresses for ldmatrix (shared space, bytes): A fragments (x) — matrix
    // j = lane / 8 is rows +8·(j & 1), k +8·(j / 2) of a 16 × 16 block; B fragments (W) —
    // matrix j is output rows +8·(j / 2), k +8·(j & 1) of two n8 × k16 blocks. The registers
    // are those of the m16n8k16 fragments: a[i] = x[g (+8)][ks + 2·t4 (+8)], b[i] = w[g][ks +
    // 2·t4 (+8)].
    const u32 xfrag = smem_addr(&sm.x[(lane & 7) + ((lane >> 3) & 1) * 8][(lane >> 4) * 8]);
    const u32 wfrag = smem_addr(&sm.w[warp * 32 + (lane >> 4) * 8 + (lane & 7)][((lane >> 3) & 1) * 8]);
    fetch(0);
    store(0);
    __syncthreads();
    for (int c = 0; c < nch; c++) {
        if (c + 1 < nch) fetch(c + 1);  // global loads in flight during the mma
#pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 16) {
            u32 a[2][4], b[4][2];
#pragma unroll
            for (int mf = 0; mf < 2; mf++) ldmatrix_x4(a[mf], xfrag + (mf * 16 * TC_LD + ks) * 2);
#pragma unroll
            for (int nf = 0; nf < 4; nf += 2) {
                u32 r[4];
                ldmatrix_x4(r, wfrag + (nf * 8 * TC_LD + ks) * 2);
                b[nf][0] = r[0], b[nf][1] = r[1], b[nf + 1][0] = r[2], b[nf + 1][1] = r[3];
            }
#pragma unroll
            for (int mf = 0; mf < 2; mf++)
#pragma unroll
                for (int nf = 0; nf < 4; nf++) {
                    if (F16) mma_f16_16816(acc[mf][nf], a[mf], b[nf]);
                    else mma_bf16_16816(EPI ? tacc[mf][nf] : acc[mf][nf], a[mf], b[nf]);
                }
        }
        if (EPI && (c + 1) % gc == 0) {
            // The group is done: acc += sc·Σq·x + bi·Σx per (token, output row).
            tc_for_each_acc([&](int mf, int nf, int i, int m, int n) {
                acc[mf][nf][i] = chunk_acc(acc[mf][nf][i], sm.sc[n], tacc[mf][nf][i], sm.bi[n], sm.sx[m]);
                tacc[mf][nf][i] = 0.f;
            });
        }
        __syncthreads();
        if (c + 1 < nch) {
            store(c + 1);
            __syncthreads();
        }
    }
    if (F16) {
        constexpr float undo = (float)(1 << TC_F16_XSHIFT) / (float)(1 << TC_F16_WSHIFT);
        tc_for_each_acc([&](int mf, int nf, int i, int, int) { acc[mf][nf][i] *= undo; });
    }
}

// tc_tile for W's format (bf16, affine 4- or 8-bit, MXFP4).
template <int MODE>
__device__ __forceinline__ void tc_tile_any(const QMat& W, TcSmem& sm, int n0, int N, int K, float acc[2][4][4]) {
    if (W.fmt == FMT_BF16) tc_tile<16, TC_CODES>(W, sm, n0, N, K, acc);
    else if (W.fmt == FMT_MXFP4) tc_tile<TC_MXFP4, MODE == TC_CODES ? TC_CODES : TC_DEQ_BF16>(W, sm, n0, N, K, acc);
    else if (W.bits == 4) tc_tile<4, MODE>(W, sm, n0, N, K, acc);
    else tc_tile<8, MODE>(W, sm, n0, N, K, acc);
}

// Writes a tile's accumulators: y[yrow[m], n] = acc (+ bias[n]), bf16 or f32 (out_f32), for
// the tile's first mt rows and n < N.
__device__ __forceinline__ void tc_store(const TcSmem& sm, const float acc[2][4][4], int n0, int N, int mt,
                                         const float* bias, void* y, int out_f32) {
    tc_for_each_acc([&](int mf, int nf, int i, int m, int n) {
        n += n0;
        if (m < mt && n < N) {
            float v = acc[mf][nf][i];
            if (bias) v += bias[n];
            long o = (long)sm.yrow[m] * N + n;
            if (out_f32) ((float*)y)[o] = v; else ((bf16*)y)[o] = f2bf(v);
        }
    });
}

// y[M, N] = x[M, K] Wᵀ (+ bias) on tensor cores, output rows n0.. and tokens m0.. of one
// block (bf16 y, or f32 when out_f32).
template <int MODE>
__device__ __forceinline__ void gemm_tc_tile(const QMat& W, const bf16* x, void* y, const float* bias, int N, int K,
                                             int M, int n0, int m0, int out_f32) {
    __shared__ TcSmem sm;
    const int mt = min(TC_BM, M - m0);
    if (threadIdx.x < TC_BM) {
        int m = m0 + min((int)threadIdx.x, mt - 1);
        sm.xrow[threadIdx.x] = x + (long)m * K;
        sm.yrow[threadIdx.x] = m;
    }
    __syncthreads();
    float acc[2][4][4];
    tc_tile_any<MODE>(W, sm, n0, N, K, acc);
    tc_store(sm, acc, n0, N, mt, bias, y, out_f32);
}

// y[M, N] = x[M, K] Wᵀ (+ bias) on tensor cores: block (x, y) = output rows x·TC_BN..,
// tokens y·TC_BM.. (the mat-vec's arguments).
template <int MODE>
__device__ __forceinline__ void gemm_tc_body(const MatvecArgs& p) {
    gemm_tc_tile<MODE>(p.w, p.x, p.y, p.bias, p.n, p.k, p.m, blockIdx.x * TC_BN, blockIdx.y * TC_BM, p.out_f32);
}
extern "C" __global__ void gemm_tc(const MatvecArgs p) {
    pdl_entry();
    gemm_tc_body<TC_CODES>(p);
}
extern "C" __global__ void TC_DEQ_BOUNDS gemm_tc_f16(const MatvecArgs p) {
    pdl_entry();
    gemm_tc_body<TC_DEQ_F16>(p);
}

// qkv_proj's (MLA: two) products on tensor cores in one launch: blocks x over q's output-row
// tiles, then k's, then v's (whole tiles each), tokens y·TC_BM.. — the tiles of three gemm_tc
// launches, so the same bits, with k's and v's few tiles beside q's instead of alone on a
// mostly idle GPU.
template <int MODE>
__device__ __forceinline__ void gemm_tc_qkv_body(const QkvArgs& p) {
    const int bq = (p.nq + TC_BN - 1) / TC_BN, bk = (p.nk + TC_BN - 1) / TC_BN;
    const int b = blockIdx.x, part = b < bq ? 0 : b < bq + bk ? 1 : 2;  // q, k or v
    const QMat W = part == 0 ? p.wq : part == 1 ? p.wk : p.wv;
    const float* bias = part == 0 ? p.qbias : part == 1 ? p.kbias : p.vbias;
    bf16* y = part == 0 ? p.q : part == 1 ? p.k : p.v;
    const int n = part == 0 ? p.nq : part == 1 ? p.nk : p.nv, n0 = (b - (part == 0 ? 0 : part == 1 ? bq : bq + bk)) * TC_BN;
    gemm_tc_tile<MODE>(W, p.x, y, bias, n, p.kdim, p.m, n0, blockIdx.y * TC_BM, 0);
}
extern "C" __global__ void gemm_tc_qkv(const QkvArgs p) {
    pdl_entry();
    gemm_tc_qkv_body<TC_CODES>(p);
}
extern "C" __global__ void TC_DEQ_BOUNDS gemm_tc_qkv_f16(const QkvArgs p) {
    pdl_entry();
    gemm_tc_qkv_body<TC_DEQ_F16>(p);
}

// Selected-expert rows on tensor cores, grouped by expert: tile t (blockIdx.y) of the table
// moe_group wrote — expert tiles[1 + 2t], routed rows rows[tiles[2 + 2t] ..] (≤ TC_BM of
// them) — times output rows blockIdx.x·TC_BN..; row q reads x row q / per and writes y row q
// (+ the expert's bias row bias[e, :] when bias is set: GPT-OSS).
template <int MODE>
__device__ __forceinline__ void expert_gemm_tc_body(const ExpertGemmArgs& p) {
    __shared__ TcSmem sm;
    const int t = blockIdx.y;
    if (t >= p.tiles[0]) return;
    const int e = p.tiles[1 + 2 * t], j0 = p.tiles[2 + 2 * t], mt = min(TC_BM, p.off[e + 1] - j0);
    if (threadIdx.x < TC_BM) {
        int q = p.rows[j0 + min((int)threadIdx.x, mt - 1)];
        sm.xrow[threadIdx.x] = p.x + (long)(q / p.per) * p.k;
        sm.yrow[threadIdx.x] = q;
    }
    __syncthreads();
    const QMat W = stack_slice(p.w.w, e, p.w.w_stride, p.w.sb_stride);
    float acc[2][4][4];
    tc_tile_any<MODE>(W, sm, blockIdx.x * TC_BN, p.n, p.k, acc);
    tc_store(sm, acc, blockIdx.x * TC_BN, p.n, mt, p.bias ? p.bias + (long)e * p.n : nullptr, p.y, 0);
}
extern "C" __global__ void expert_gemm_tc(const ExpertGemmArgs p) {
    pdl_entry();
    expert_gemm_tc_body<TC_CODES>(p);
}
extern "C" __global__ void TC_DEQ_BOUNDS expert_gemm_tc_f16(const ExpertGemmArgs p) {
    pdl_entry();
    expert_gemm_tc_body<TC_DEQ_F16>(p);
}

// MLA's per-head products on tensor cores (head_matvec's arguments): block (x, y, h) = output
// rows x·TC_BN.. of head h's matrix W[h], tokens y·TC_BM..; row q = m·nh + h of y [M·nh, N]
// = W[h] · x_q[0:K], x_q = x + q·x_ld (the first K elements of a wider row: q_nope).
template <int MODE>
__device__ __forceinline__ void head_gemm_tc_body(const HeadMatvecArgs& p) {
    __shared__ TcSmem sm;
    const int h = blockIdx.z, n0 = blockIdx.x * TC_BN, m0 = blockIdx.y * TC_BM, mt = min(TC_BM, p.m - m0);
    if (threadIdx.x < TC_BM) {
        long q = (long)(m0 + min((int)threadIdx.x, mt - 1)) * p.nh + h;
        sm.xrow[threadIdx.x] = p.x + q * p.x_ld;
        sm.yrow[threadIdx.x] = (int)q;
    }
    __syncthreads();
    const QMat W = stack_slice(p.w.w, h, p.w.w_stride, p.w.sb_stride);
    float acc[2][4][4];
    tc_tile_any<MODE>(W, sm, n0, p.n, p.k, acc);
    tc_store(sm, acc, n0, p.n, mt, nullptr, p.y, 0);
}
extern "C" __global__ void head_gemm_tc(const HeadMatvecArgs p) {
    pdl_entry();
    head_gemm_tc_body<TC_CODES>(p);
}
extern "C" __global__ void TC_DEQ_BOUNDS head_gemm_tc_f16(const HeadMatvecArgs p) {
    pdl_entry();
    head_gemm_tc_body<TC_DEQ_F16>(p);
}
