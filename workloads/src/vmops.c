/*
 * vmops - the memory-management syscalls whose page-table walkers emu models, each
 * checked by the program itself through mincore, /proc/self/pagemap and
 * /proc/self/smaps:
 *
 *   mmap, stores, mincore, pagemap (pread64), smaps (openat + read)
 *   madvise(MADV_DONTNEED) -> zero pages, no longer resident
 *   mprotect read-only and back: the pages stay mapped, the data stays
 *   mremap(MREMAP_MAYMOVE) growing the mapping: the data moves with it
 *   mlock / munlock: smaps "Locked:"
 *   madvise(MADV_COLD), write "1" to /proc/self/clear_refs
 *   madvise(MADV_FREE) then MADV_PAGEOUT: a clean lazyfree page is dropped (reads 0),
 *   a page written again after MADV_FREE keeps its data
 *
 * It prints only counts and values (the same on every arch) and "FAIL ..." lines on
 * a mismatch; the exit status is the number of failures. It reads emu's /proc
 * (no CAP_SYS_ADMIN: pagemap without pfns), so it is not compared with qemu-user.
 */
#include "rt.h"

#define NPAGES 16
#define PM_PRESENT (1UL << 63)

static char text[1 << 16];
static int failures;

static void check(const char *what, u64 got, u64 want)
{
    put_str(what);
    put_char(' ');
    put_udec(got);
    if (got != want) {
        put_str(" FAIL want ");
        put_udec(want);
        failures++;
    }
    put_char('\n');
}

static u64 resident(void *addr, u64 pages)
{
    u8 vec[64];
    long r = sys_mincore(addr, pages * PAGE_SIZE, vec);
    if (r) {
        fail("mincore", r);
        failures++;
        return 0;
    }
    u64 n = 0;
    for (u64 i = 0; i < pages; i++)
        n += vec[i] & 1;
    return n;
}

static u64 present(void *addr, u64 pages)
{
    u64 e[64];
    long fd = sys_openat(AT_FDCWD, "/proc/self/pagemap", O_RDONLY);
    if (rt_is_err(fd)) {
        fail("open pagemap", fd);
        failures++;
        return 0;
    }
    long r = sys_pread64((int)fd, e, pages * 8, (long)((u64)addr / PAGE_SIZE * 8));
    sys_close((int)fd);
    if (r != (long)(pages * 8)) {
        fail("pread pagemap", r);
        failures++;
        return 0;
    }
    u64 n = 0;
    for (u64 i = 0; i < pages; i++)
        n += (e[i] & PM_PRESENT) != 0;
    return n;
}

static size_t read_file(const char *path)
{
    long fd = sys_openat(AT_FDCWD, path, O_RDONLY);
    if (rt_is_err(fd)) {
        fail(path, fd);
        failures++;
        return 0;
    }
    size_t len = 0;
    for (;;) {
        long r = sys_read((int)fd, text + len, sizeof(text) - 1 - len);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    sys_close((int)fd);
    text[len] = 0;
    return len;
}

static int starts_with(const char *s, const char *p)
{
    while (*p)
        if (*s++ != *p++)
            return 0;
    return 1;
}

/* smaps: the value of "key:" (kB) in the entry whose range starts at addr */
static u64 smaps_kb(void *addr, const char *key)
{
    char head[24];
    u64 a = (u64)addr;
    int n = 0;
    char digits[16];
    do {
        digits[n++] = "0123456789abcdef"[a & 15];
        a >>= 4;
    } while (a);
    int i = 0;
    while (n)
        head[i++] = digits[--n];
    head[i++] = '-';
    head[i] = 0;
    read_file("/proc/self/smaps");
    for (char *line = text; *line;) {
        if (starts_with(line, head)) {
            for (char *l = line; *l;) {
                while (*l && *l != '\n')
                    l++;
                if (*l)
                    l++;
                if (starts_with(l, key)) {
                    l += strlen(key);
                    while (*l == ' ')
                        l++;
                    u64 v = 0;
                    while (*l >= '0' && *l <= '9')
                        v = v * 10 + (u64)(*l++ - '0');
                    return v;
                }
            }
            break;
        }
        while (*line && *line != '\n')
            line++;
        if (*line)
            line++;
    }
    put_str("FAIL no smaps entry for the mapping\n");
    failures++;
    return 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    long r = sys_mmap(0, NPAGES * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return fail("mmap", r);
    volatile u64 *a = (volatile u64 *)r;
    for (u64 i = 0; i < 8; i++)
        a[i * PAGE_SIZE / 8] = i + 1;
    check("mincore resident", resident((void *)a, NPAGES), 8);
    check("pagemap present", present((void *)a, NPAGES), 8);
    check("smaps Rss kB", smaps_kb((void *)a, "Rss:"), 32);

    r = sys_madvise((void *)(a + 4 * PAGE_SIZE / 8), 4 * PAGE_SIZE, MADV_DONTNEED);
    check("madvise DONTNEED", (u64)-r, 0);
    check("after DONTNEED resident", resident((void *)a, NPAGES), 4);
    check("after DONTNEED page 5 reads", a[5 * PAGE_SIZE / 8], 0);
    check("after DONTNEED pagemap present", present((void *)a, NPAGES), 5);   /* + the zero page read */

    r = sys_mprotect((void *)a, 2 * PAGE_SIZE, PROT_READ);
    check("mprotect read-only", (u64)-r, 0);
    check("read-only still present", present((void *)a, 2), 2);
    check("read-only page 1 reads", a[PAGE_SIZE / 8], 2);
    r = sys_mprotect((void *)a, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE);
    check("mprotect read-write", (u64)-r, 0);
    a[0] = 100;

    r = sys_mremap((void *)a, NPAGES * PAGE_SIZE, 2 * NPAGES * PAGE_SIZE, MREMAP_MAYMOVE);
    if (rt_is_err(r))
        return fail("mremap", r);
    volatile u64 *b = (volatile u64 *)r;
    check("mremap page 0", b[0], 100);
    check("mremap page 3", b[3 * PAGE_SIZE / 8], 4);
    check("mremap present", present((void *)b, 2 * NPAGES), 5);
    check("mremap smaps Rss kB", smaps_kb((void *)b, "Rss:"), 16);

    r = sys_mlock((void *)b, 4 * PAGE_SIZE);
    check("mlock", (u64)-r, 0);
    check("smaps Locked kB", smaps_kb((void *)b, "Locked:"), 16);
    r = sys_munlock((void *)b, 4 * PAGE_SIZE);
    check("munlock", (u64)-r, 0);

    r = sys_madvise((void *)b, 4 * PAGE_SIZE, MADV_COLD);
    check("madvise COLD", (u64)-r, 0);
    long fd = sys_openat(AT_FDCWD, "/proc/self/clear_refs", O_WRONLY);
    if (rt_is_err(fd))
        return fail("open clear_refs", fd);
    check("clear_refs write", (u64)sys_write((int)fd, "1\n", 2), 2);
    sys_close((int)fd);
    check("after clear_refs present", present((void *)b, 4), 4);

    r = sys_madvise((void *)(b + 2 * PAGE_SIZE / 8), 2 * PAGE_SIZE, MADV_FREE);
    check("madvise FREE", (u64)-r, 0);
    b[3 * PAGE_SIZE / 8] = 33;                       /* redirtied: must survive */
    r = sys_madvise((void *)(b + 2 * PAGE_SIZE / 8), 2 * PAGE_SIZE, MADV_PAGEOUT);
    check("madvise PAGEOUT", (u64)-r, 0);
    check("lazyfree page 2 reads", b[2 * PAGE_SIZE / 8], 0);
    check("redirtied page 3 reads", b[3 * PAGE_SIZE / 8], 33);

    r = sys_munmap((void *)b, 2 * NPAGES * PAGE_SIZE);
    check("munmap", (u64)-r, 0);
    put_str(failures ? "vmops: FAILED\n" : "vmops: ok\n");
    return failures;
}
