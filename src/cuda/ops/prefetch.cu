// L2 prefetch of weights a later step will read (cuda/prefetch.rs): launched on a side
// branch of the captured decode graph (grid: a few blocks of PF_THREADS), so the bytes stream into L2 while the main chain
// runs the steps before their reader. A prefetch is only a hint: it changes no value.

// Entry e of the prefetch table (`PfEntry` in prefetch.rs): `bytes` at `p`, both multiples
// of 16; with `stride` ≠ 0 the same span in each selected expert's matrix instead,
// p + idx[j]·stride for the launch's nidx selections (idx outside [0, nexp) is skipped).
struct PfEntry {
    unsigned long long p, bytes, stride, pad;
};

// Span [a, a + n) of global memory into L2, n a multiple of 16. sm_90: one bulk prefetch
// (the SM's TMA unit walks it); before: one prefetch.global.L2 a 128-byte line.
__device__ __forceinline__ void l2_span(unsigned long long a, unsigned long long n) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((u32)n) : "memory");
#else
    for (unsigned long long o = 0; o < n; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(a + o) : "memory");
#endif
}

// Table entries first .. first+n-1, cut into PF_PIECE-byte spans spread over every thread
// of the grid. A few blocks, not one: an SM's bulk prefetches all go through its one TMA
// unit, so a single block might fetch megabytes too slowly to be ahead of the reader.
extern "C" __global__ void l2_prefetch(const PrefetchArgs a) {
    pdl_entry();
    const PfEntry* t = (const PfEntry*)a.table;
    const long tid = (long)blockIdx.x * blockDim.x + threadIdx.x, nt = (long)gridDim.x * blockDim.x;
    for (int e = a.first; e < a.first + a.n; e++) {
        const PfEntry en = t[e];
        const int reps = en.stride ? a.nidx : 1;
        const long pieces = (long)((en.bytes + PF_PIECE - 1) / PF_PIECE);
        for (long w = tid; w < reps * pieces; w += nt) {
            const int j = (int)(w / pieces);
            const unsigned long long off = (unsigned long long)(w % pieces) * PF_PIECE;
            unsigned long long base = en.p;
            if (en.stride) {
                const int x = a.idx[j];
                if (x < 0 || x >= a.nexp) continue;
                base += (unsigned long long)x * en.stride;
            }
            const unsigned long long n = en.bytes - off < PF_PIECE ? en.bytes - off : PF_PIECE;
            l2_span(base + off, n);
        }
    }
}
