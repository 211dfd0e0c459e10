/*
 * collapse_race - three threads race MADV_COLLAPSE and MADV_DONTNEED against
 * readers and writers of the same shared memory.
 *
 * One 4 MiB memfd is mapped MAP_SHARED twice, each mapping at a 2 MiB aligned
 * address with file offset 0 (the layout of shmem_collapse).  Every page i has
 * two 64-bit words at i-dependent 8-byte aligned offsets: a pattern word,
 * page_value(i), which never changes, and an "own" word 2 KiB away, which
 * only the thread owning page i writes.
 *
 * Threads (rt_clone, joined through their CLONE_CHILD_CLEARTID words):
 *   checker 0 and 1  round after round, read the pattern word of every page
 *                    through mapping 1 or 2 (alternately, in opposite phase)
 *                    and the own words of the pages nobody owns; write a
 *                    per-round value into the own words of the pages they own
 *                    (checker 0: pages 0..7, checker 1: pages 8..15) and read
 *                    it back through both mappings.  They stop when the
 *                    collapser is done and write a final value into their own
 *                    words.
 *   collapser        waits until each checker has done a round, then for N
 *                    rounds (default 20, argv[1]): MADV_COLLAPSE of the first
 *                    2 MiB of mapping 1, sched_yield, MADV_DONTNEED of a
 *                    64 KiB piece of mapping 2 (a different piece each round;
 *                    round 0 takes the owned pages), which must keep the data
 *                    (shared file memory), sched_yield.
 * main then checks every word through both mappings once more.
 *
 * stdout is the same on every arch and under any interleaving: the thread
 * count, N, the number of failed verifications (0) and a checksum of the
 * final memory contents.  How many rounds the checkers made and what
 * MADV_HUGEPAGE / MADV_COLLAPSE returned (0 under qemu-user 7.2, which ignores
 * both; -EINVAL without shmem THP; 0 with a collapse under Linux and emu) go
 * to stderr only.
 */
#include "rt.h"
#include "page_pattern.h"
#include "shmem_map.h"

#define FILE_SIZE  (4UL << 20)
#define HUGE_SIZE  (2UL << 20)
#define NPAGES     (FILE_SIZE / PAGE_SIZE)
#define DONTNEED_LEN    (64UL << 10)
#define DONTNEED_PIECES (FILE_SIZE / DONTNEED_LEN)
#define OWN_PAGES  8                   /* pages per checker */
#define NCHECKERS  2
#define OWNED      (OWN_PAGES * NCHECKERS)
#define NTHREADS   (NCHECKERS + 1)
#define STACK_SIZE (32UL << 10)
#define FINAL      (~0UL)              /* the own-word tag after the checkers stop */
#define DEFAULT_ROUNDS 20

/* The own word of page i with tag r: 0 before the threads start, the round
 * number while a checker runs, FINAL after it stops. */
static u64 own_value(u64 i, u64 r)
{
    return mix(page_value(i) ^ 0xa5a5a5a5a5a5a5a5UL, r);
}

static volatile u64 *word(u8 *base, u64 i)
{
    return (volatile u64 *)(base + i * PAGE_SIZE + page_offset(i));
}

static volatile u64 *own_word(u8 *base, u64 i)
{
    return (volatile u64 *)(base + i * PAGE_SIZE + (page_offset(i) ^ 2048));
}

/* "what N\n" on stderr, in one write. */
static void err_line(const char *what, long r)
{
    char buf[80];
    char tmp[20];
    size_t n = 0, k = 0;
    u64 v = r < 0 ? (u64)-r : (u64)r;
    while (*what && n < 50)
        buf[n++] = *what++;
    buf[n++] = ' ';
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

/* ---- shared state: set up before the threads start ----------------------- */
static u8 *m1, *m2;
static u64 nrounds;
static int collapse_done;              /* __atomic_* (inline on all four arches) */

struct checker {
    u64 id;
    u64 rounds;                        /* __atomic_*: the collapser waits for 1 */
    u64 bad;                           /* read by main after the join */
};
static struct checker checkers[NCHECKERS];

static struct {
    u64 bad;
    u64 collapse_ok;                   /* MADV_COLLAPSE results, for stderr */
    long collapse_last;
} collapser_res;

static u8 stacks[NTHREADS][STACK_SIZE] __attribute__((aligned(16)));
static volatile int tids[NTHREADS];

static int checker_main(void *arg)
{
    struct checker *c = arg;
    u64 first = c->id * OWN_PAGES, bad = 0, r = 0;

    while (!__atomic_load_n(&collapse_done, __ATOMIC_ACQUIRE)) {
        r++;
        u8 *m = (r + c->id) & 1 ? m2 : m1, *other = m == m1 ? m2 : m1;
        for (u64 i = 0; i < NPAGES; i++) {
            bad += *word(m, i) != page_value(i);
            if (i >= OWNED)
                bad += *own_word(m, i) != own_value(i, 0);
        }
        for (u64 i = first; i < first + OWN_PAGES; i++)
            *own_word(m, i) = own_value(i, r);
        for (u64 i = first; i < first + OWN_PAGES; i++) {
            bad += *own_word(other, i) != own_value(i, r);
            bad += *own_word(m, i) != own_value(i, r);
        }
        __atomic_store_n(&c->rounds, r, __ATOMIC_RELEASE);
        sys_sched_yield();
    }

    /* The final value, written through one mapping, read through the other. */
    u8 *m = c->id ? m2 : m1, *other = c->id ? m1 : m2;
    for (u64 i = first; i < first + OWN_PAGES; i++)
        *own_word(m, i) = own_value(i, FINAL);
    for (u64 i = first; i < first + OWN_PAGES; i++)
        bad += *own_word(other, i) != own_value(i, FINAL);
    c->bad = bad;
    return bad ? 1 : 0;
}

static int collapser_main(void *arg)
{
    (void)arg;
    u64 bad = 0, ok = 0;
    long last = 0;

    /* Start racing only once both checkers are running. */
    for (int k = 0; k < NCHECKERS; k++)
        while (!__atomic_load_n(&checkers[k].rounds, __ATOMIC_ACQUIRE))
            sys_sched_yield();

    for (u64 r = 0; r < nrounds; r++) {
        long res = sys_madvise(m1, HUGE_SIZE, MADV_COLLAPSE);
        if (res == 0)
            ok++;
        else
            last = res;
        sys_sched_yield();

        /* 7 is odd, so 64 rounds visit all 64 pieces; round 0 is piece 0,
         * the pages the checkers own. */
        u64 off = (r * 7 % DONTNEED_PIECES) * DONTNEED_LEN;
        bad += sys_madvise(m2 + off, DONTNEED_LEN, MADV_DONTNEED) != 0;
        for (u64 i = off / PAGE_SIZE; i < (off + DONTNEED_LEN) / PAGE_SIZE; i++)
            bad += *word(m2, i) != page_value(i);
        sys_sched_yield();
    }

    collapser_res.bad = bad;
    collapser_res.collapse_ok = ok;
    collapser_res.collapse_last = last;
    __atomic_store_n(&collapse_done, 1, __ATOMIC_RELEASE);
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    nrounds = parse_udec(argc > 1 ? argv[1] : 0, DEFAULT_ROUNDS);

    long r = sys_memfd_create("emu-collapse-race", 0);
    if (rt_is_err(r))
        return fail("memfd_create", r);
    int fd = (int)r;
    r = sys_ftruncate(fd, FILE_SIZE);
    if (r)
        return fail("ftruncate", r);
    r = map_shared_aligned(fd, FILE_SIZE, HUGE_SIZE);
    if (rt_is_err(r))
        return fail("mmap 1", r);
    m1 = (u8 *)r;
    r = map_shared_aligned(fd, FILE_SIZE, HUGE_SIZE);
    if (rt_is_err(r))
        return fail("mmap 2", r);
    m2 = (u8 *)r;

    /* Write through mapping 1, read through mapping 2. */
    u64 bad = 0;
    for (u64 i = 0; i < NPAGES; i++) {
        *word(m1, i) = page_value(i);
        *own_word(m1, i) = own_value(i, 0);
    }
    for (u64 i = 0; i < NPAGES; i++) {
        bad += *word(m2, i) != page_value(i);
        bad += *own_word(m2, i) != own_value(i, 0);
    }

    r = sys_madvise(m1, HUGE_SIZE, MADV_HUGEPAGE);
    err_line("hugepage returned", r);

    for (int k = 0; k < NCHECKERS; k++) {
        checkers[k].id = (u64)k;
        r = thread_start(checker_main, &checkers[k], stacks[k], STACK_SIZE, &tids[k]);
        if (rt_is_err(r))
            return fail("clone checker", r);
    }
    r = thread_start(collapser_main, 0, stacks[NCHECKERS], STACK_SIZE, &tids[NCHECKERS]);
    if (rt_is_err(r))
        return fail("clone collapser", r);

    for (int k = 0; k < NTHREADS; k++)
        thread_join(&tids[k]);

    err_line("collapse ok rounds", (long)collapser_res.collapse_ok);
    err_line("collapse last error", collapser_res.collapse_last);
    for (int k = 0; k < NCHECKERS; k++)
        err_line(k ? "checker 1 rounds" : "checker 0 rounds", (long)checkers[k].rounds);

    bad += collapser_res.bad;
    for (int k = 0; k < NCHECKERS; k++)
        bad += checkers[k].bad;

    /* Everything once more, through both mappings. */
    u64 sum = 0;
    for (u64 i = 0; i < NPAGES; i++) {
        u64 want_own = own_value(i, i < OWNED ? FINAL : 0);
        u64 p = *word(m1, i), o = *own_word(m1, i);
        bad += p != page_value(i);
        bad += o != want_own;
        bad += *word(m2, i) != page_value(i);
        bad += *own_word(m2, i) != want_own;
        sum = mix(mix(sum, p), o);
    }

    put_kv_dec("threads", NTHREADS);
    put_kv_dec("rounds", nrounds);
    put_kv_dec("mismatches", bad);
    put_kv_hex("final checksum", sum);

    r = sys_munmap(m1, FILE_SIZE);
    if (r)
        return fail("munmap 1", r);
    r = sys_munmap(m2, FILE_SIZE);
    if (r)
        return fail("munmap 2", r);
    r = sys_close(fd);
    if (r)
        return fail("close", r);
    return bad ? 1 : 0;
}
