/*
 * shmem_collapse - one 4 MiB memfd mapped MAP_SHARED twice; MADV_COLLAPSE of
 * a 2 MiB range of the first mapping; the data must be the same through both
 * mappings before and after, and MADV_DONTNEED must not lose shared file data.
 *
 * Layout: each mapping is placed at a 2 MiB aligned address.  A 6 MiB
 * PROT_NONE anonymous reservation always contains a 2 MiB aligned 4 MiB
 * window; the file is mapped over that window with MAP_FIXED at file offset
 * 0, and the unused head and tail of the reservation are unmapped.  So in
 * both mappings the first 2 MiB have a 2 MiB aligned virtual address AND
 * file offset, which is what a PMD mapping of a huge shmem page needs.
 *
 * Each page i holds one 64-bit value derived from i at an i-dependent 8-byte
 * aligned offset; checksums are computed from the values, never from bytes.
 *
 * The results of MADV_HUGEPAGE and MADV_COLLAPSE depend on where the program
 * runs (qemu-user 7.2 drops both and answers 0 without collapsing; a kernel
 * without shmem THP answers -EINVAL; Linux 6.18 and emu collapse), so they go
 * to stderr only: stdout is the same whether the collapse happened or not.
 */
#include "rt.h"
#include "page_pattern.h"
#include "shmem_map.h"

#define FILE_SIZE  (4UL << 20)
#define HUGE_SIZE  (2UL << 20)
#define NPAGES     (FILE_SIZE / PAGE_SIZE)
#define HUGE_PAGES (HUGE_SIZE / PAGE_SIZE)
#define DONTNEED_OFF  (3UL << 20)      /* 64 KiB at 3 MiB: outside the collapsed range */
#define DONTNEED_LEN  (64UL << 10)

static volatile u64 *word(u8 *base, u64 i)
{
    return (volatile u64 *)(base + i * PAGE_SIZE + page_offset(i));
}

/* "what returned N\n" on stderr, in one write. */
static void err_result(const char *what, long r)
{
    char buf[80];
    char tmp[20];
    size_t n = 0, k = 0;
    u64 v = r < 0 ? (u64)-r : (u64)r;
    while (*what && n < 40)
        buf[n++] = *what++;
    const char *s = " returned ";
    while (*s)
        buf[n++] = *s++;
    if (r < 0)
        buf[n++] = '-';
    do {
        tmp[k++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (k)
        buf[n++] = tmp[--k];
    buf[n++] = '\n';
    sys_write(2, buf, n);
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;

    long r = sys_memfd_create("emu-shmem", 0);
    if (rt_is_err(r))
        return fail("memfd_create", r);
    int fd = (int)r;
    r = sys_ftruncate(fd, FILE_SIZE);
    if (r)
        return fail("ftruncate", r);

    r = map_shared_aligned(fd, FILE_SIZE, HUGE_SIZE);
    if (rt_is_err(r))
        return fail("mmap 1", r);
    u8 *m1 = (u8 *)r;
    r = map_shared_aligned(fd, FILE_SIZE, HUGE_SIZE);
    if (rt_is_err(r))
        return fail("mmap 2", r);
    u8 *m2 = (u8 *)r;

    /* Write through mapping 1, read through mapping 2. */
    for (u64 i = 0; i < NPAGES; i++)
        *word(m1, i) = page_value(i);
    u64 before = 0, bad = 0;
    for (u64 i = 0; i < NPAGES; i++) {
        u64 v = *word(m2, i);
        bad += v != page_value(i);
        before = mix(before, v);
    }

    /* The first 2 MiB of mapping 1: aligned in address and in file offset. */
    r = sys_madvise(m1, HUGE_SIZE, MADV_HUGEPAGE);
    err_result("hugepage", r);
    r = sys_madvise(m1, HUGE_SIZE, MADV_COLLAPSE);
    err_result("collapse", r);

    /* Everything must still be there, through both mappings. */
    for (u64 i = 0; i < NPAGES; i++) {
        bad += *word(m1, i) != page_value(i);
        bad += *word(m2, i) != page_value(i);
    }

    /* New values into the collapsed range through mapping 2, read through 1. */
    for (u64 i = 0; i < HUGE_PAGES; i++)
        *word(m2, i) = page_value(i + NPAGES);
    u64 after = 0;
    for (u64 i = 0; i < NPAGES; i++) {
        u64 want = i < HUGE_PAGES ? page_value(i + NPAGES) : page_value(i);
        u64 v = *word(m1, i);
        bad += v != want;
        after = mix(after, v);
    }

    put_kv_dec("pages", NPAGES);
    put_kv_hex("checksum before", before);
    put_kv_hex("checksum after", after);
    put_kv_dec("mismatches", bad);

    /* MADV_DONTNEED on shared file memory drops only the page table entries:
     * the next access faults the same page cache pages back in. */
    r = sys_madvise(m1 + DONTNEED_OFF, DONTNEED_LEN, MADV_DONTNEED);
    if (r)
        return fail("madvise dontneed", r);
    u64 lost = 0;
    for (u64 i = DONTNEED_OFF / PAGE_SIZE; i < (DONTNEED_OFF + DONTNEED_LEN) / PAGE_SIZE; i++) {
        lost += *word(m1, i) != page_value(i);
        lost += *word(m2, i) != page_value(i);
    }
    put_str(lost ? "dontneed keeps shmem data: no\n" : "dontneed keeps shmem data: yes\n");

    r = sys_munmap(m1, FILE_SIZE);
    if (r)
        return fail("munmap 1", r);
    r = sys_munmap(m2, FILE_SIZE);
    if (r)
        return fail("munmap 2", r);
    r = sys_close(fd);
    if (r)
        return fail("close", r);
    put_str("munmap and close ok\n");
    return bad || lost ? 1 : 0;
}
