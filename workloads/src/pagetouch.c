/*
 * pagetouch - anonymous mmap, one store per page, read back, mprotect,
 * munmap, then grow the heap with brk and touch it.
 *
 *   pagetouch [N]     N pages (default 256)
 *
 * Each page i gets a 64-bit value derived from i at an i-dependent 8-byte
 * aligned offset, so every page is touched at a different cache-line offset.
 * Checksums are computed from the 64-bit values (never from bytes), so the
 * output is the same on little- and big-endian arches.
 */
#include "rt.h"
#include "page_pattern.h"

#define DEFAULT_PAGES 256
#define HEAP_PAGES    16

int main(int argc, char **argv)
{
    u64 npages = parse_udec(argc > 1 ? argv[1] : 0, DEFAULT_PAGES);
    if (npages == 0)
        npages = 1;
    size_t len = npages * PAGE_SIZE;

    long r = sys_mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return fail("mmap", r);
    u8 *base = (u8 *)r;

    for (u64 i = 0; i < npages; i++)
        *(volatile u64 *)(base + i * PAGE_SIZE + page_offset(i)) = page_value(i);

    u64 sum = 0, bad = 0;
    for (u64 i = 0; i < npages; i++) {
        u64 v = *(volatile u64 *)(base + i * PAGE_SIZE + page_offset(i));
        bad += v != page_value(i);
        sum = mix(sum, v);
    }
    put_kv_dec("pages", npages);
    put_kv_hex("checksum", sum);
    put_kv_dec("mismatches", bad);

    /* The first half becomes read-only; reading it must still work. */
    u64 ro_pages = npages / 2;
    if (ro_pages) {
        r = sys_mprotect(base, ro_pages * PAGE_SIZE, PROT_READ);
        if (r)
            return fail("mprotect", r);
        u64 ro_sum = 0;
        for (u64 i = 0; i < ro_pages; i++)
            ro_sum = mix(ro_sum, *(volatile u64 *)(base + i * PAGE_SIZE + page_offset(i)));
        put_kv_dec("read-only pages", ro_pages);
        put_kv_hex("read-only checksum", ro_sum);
    }

    r = sys_munmap(base, len);
    if (r)
        return fail("munmap", r);
    put_str("munmap ok\n");

    /* Heap: brk(0) reports the break; grow it by HEAP_PAGES pages and touch
     * every page of the new part. */
    u64 cur = sys_brk(0);
    u64 want = cur + HEAP_PAGES * PAGE_SIZE;
    u64 got = sys_brk(want);
    if (got != want) {
        put_str("brk did not grow\n");
        return 1;
    }
    u64 heap = (cur + 7) & ~7UL;   /* the initial break need not be aligned */
    u64 heap_sum = 0;
    for (u64 i = 0; i < HEAP_PAGES; i++)
        *(volatile u64 *)(heap + i * PAGE_SIZE) = page_value(i + 1000);
    for (u64 i = 0; i < HEAP_PAGES; i++)
        heap_sum = mix(heap_sum, *(volatile u64 *)(heap + i * PAGE_SIZE));
    put_kv_dec("heap pages", HEAP_PAGES);
    put_kv_hex("heap checksum", heap_sum);
    if (sys_brk(cur) != cur) {
        put_str("brk did not shrink\n");
        return 1;
    }
    put_str("brk shrink ok\n");
    return bad ? 1 : 0;
}
