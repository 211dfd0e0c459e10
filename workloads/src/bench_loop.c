/*
 * bench_loop - guest loops for benchmarks/speed.py.
 *
 *   bench_loop stream PAGES PASSES STRIDE
 *       anonymous mmap of PAGES pages (one write per page faults them in),
 *       then PASSES passes over them: every STRIDE bytes, one 64-bit
 *       load, add and store.  STRIDE 8 with <= 128 pages keeps the working
 *       set resident in Unicorn's 256-entry TLB; STRIDE 4096 over thousands
 *       of pages touches one word per page and misses that TLB on every
 *       access (defaults: 64 pages, 100 passes, stride 8).
 *   bench_loop alu ITERS
 *       a register-only xorshift/add chain: no memory traffic at all
 *       (default 10000000 iterations).
 *
 * Prints the mode, the sizes and a checksum of 64-bit values, so the output
 * is the same on every arch.  The loops are built without vectorisation or
 * unrolling so every arch runs the same simple load/add/store loop.
 */
#include "rt.h"

static int stream(u64 npages, u64 passes, u64 stride)
{
    if (npages == 0)
        npages = 1;
    stride &= ~7UL;
    if (stride == 0)
        stride = 8;
    size_t len = npages * PAGE_SIZE;
    long r = sys_mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return fail("mmap", r);
    u64 *v = (u64 *)r;
    u64 nwords = len / 8, step = stride / 8;

    for (u64 i = 0; i < nwords; i += PAGE_SIZE / 8)     /* fault every page in */
        v[i] = i;

    for (u64 p = 0; p < passes; p++) {
#pragma clang loop vectorize(disable) interleave(disable) unroll(disable)
        for (u64 i = 0; i < nwords; i += step)
            v[i] += i ^ p;
    }

    u64 sum = 0;
#pragma clang loop vectorize(disable) interleave(disable) unroll(disable)
    for (u64 i = 0; i < nwords; i += step)
        sum = sum * 0x100000001b3UL ^ v[i];

    put_str("stream\n");
    put_kv_dec("pages", npages);
    put_kv_dec("passes", passes);
    put_kv_dec("stride", stride);
    put_kv_hex("checksum", sum);
    return 0;
}

static int alu(u64 iters)
{
    u64 x = 0x2545f4914f6cdd1dUL, y = 0;
#pragma clang loop vectorize(disable) interleave(disable) unroll(disable)
    for (u64 i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        y += x ^ i;
    }
    put_str("alu\n");
    put_kv_dec("iters", iters);
    put_kv_hex("checksum", x ^ y);
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "stream";
    if (mode[0] == 'a')
        return alu(parse_udec(argc > 2 ? argv[2] : 0, 10000000));
    return stream(parse_udec(argc > 2 ? argv[2] : 0, 64),
                  parse_udec(argc > 3 ? argv[3] : 0, 100),
                  parse_udec(argc > 4 ? argv[4] : 0, 8));
}
