/*
 * uffdtest - userfaultfd(2) with a handler thread.
 *
 * A userfaultfd (UFFD_USER_MODE_ONLY: the only kind an unprivileged process
 * may create while vm.unprivileged_userfaultfd is 0) is set up with
 * UFFDIO_API, then four anonymous pages are registered for missing faults.
 * A handler thread read()s the fault messages and answers each one with
 * UFFDIO_COPY of a page whose words derive from the page's index; the main
 * thread reads pages 0 and 1 and writes one word of pages 2 and 3 (each
 * access sleeps in the kernel until the handler has copied the page in),
 * then checks every word.  Then UFFDIO_ZEROPAGE fills two registered pages
 * with the zero page (again: -EEXIST), and the error cases: a second
 * UFFDIO_API, an unknown ioctl, read() of an O_NONBLOCK fd with nothing
 * pending, read() before UFFDIO_API, userfaultfd() without
 * UFFD_USER_MODE_ONLY.
 *
 * stdout: counts, values and -errno results only (the same on every arch).
 */
#include "rt.h"

#define NPAGES     4
#define STACK_SIZE (32UL << 10)

static u8 stack[STACK_SIZE] __attribute__((aligned(16)));
static volatile int tid;
static u8 srcpage[PAGE_SIZE] __attribute__((aligned(4096)));

static int uffd;
static u8 *area;
static u64 handled, write_faults, wp_faults, bad_msgs, copy_errors;
static u64 seen_mask;

static u64 page_word(u64 i, u64 w)
{
    return (i + 1) * 0x9e3779b97f4a7c15UL ^ (w << 20) ^ 0x5a5a;
}

static int handler(void *arg)
{
    (void)arg;
    while (seen_mask != (1UL << NPAGES) - 1) {
        struct uffd_msg msg;
        long r = sys_read(uffd, &msg, sizeof(msg));
        if (r != (long)sizeof(msg)) {
            bad_msgs++;
            break;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT) {
            bad_msgs++;
            continue;
        }
        u64 addr = msg.address & ~(PAGE_SIZE - 1);
        u64 i = (addr - (u64)area) / PAGE_SIZE;
        if (addr < (u64)area || i >= NPAGES) {
            bad_msgs++;
            continue;
        }
        write_faults += !!(msg.flags & UFFD_PAGEFAULT_FLAG_WRITE);
        wp_faults += !!(msg.flags & UFFD_PAGEFAULT_FLAG_WP);
        u64 *src = (u64 *)srcpage;
        for (u64 w = 0; w < PAGE_SIZE / 8; w++)
            src[w] = page_word(i, w);
        struct uffdio_copy copy = { addr, (u64)srcpage, PAGE_SIZE, 0, 0 };
        r = sys_ioctl(uffd, UFFDIO_COPY, &copy);
        if (r != 0 || copy.copy != (s64)PAGE_SIZE)
            copy_errors++;
        seen_mask |= 1UL << i;
        handled++;
    }
    return 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    long r = sys_userfaultfd(O_CLOEXEC);
    put_kv_dec("userfaultfd_without_user_mode_only", (u64)-r);

    r = sys_userfaultfd(O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (rt_is_err(r))
        return fail("userfaultfd", r);
    uffd = (int)r;

    struct uffdio_api api = { UFFD_API, 0, 0 };
    r = sys_ioctl(uffd, UFFDIO_API, &api);
    if (r)
        return fail("UFFDIO_API", r);
    u64 want = 1UL << _UFFDIO_REGISTER | 1UL << _UFFDIO_UNREGISTER | 1UL << _UFFDIO_API;
    put_kv_dec("api_ioctls_ok", (api.ioctls & want) == want);
    struct uffdio_api api2 = { UFFD_API, 0, 0 };
    put_kv_dec("api_again", (u64)-sys_ioctl(uffd, UFFDIO_API, &api2));
    put_kv_dec("unknown_ioctl", (u64)-sys_ioctl(uffd, RT_IOWR(0xAAUL, 0x3E, 24), &api2));

    r = sys_mmap(0, NPAGES * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return fail("mmap", r);
    area = (u8 *)r;
    struct uffdio_register reg = { { (u64)area, NPAGES * PAGE_SIZE }, UFFDIO_REGISTER_MODE_MISSING, 0 };
    r = sys_ioctl(uffd, UFFDIO_REGISTER, &reg);
    if (r)
        return fail("UFFDIO_REGISTER", r);
    want = 1UL << _UFFDIO_WAKE | 1UL << _UFFDIO_COPY | 1UL << _UFFDIO_ZEROPAGE;
    put_kv_dec("register_ioctls_ok", (reg.ioctls & want) == want);

    r = thread_start(handler, 0, stack, STACK_SIZE, &tid);
    if (rt_is_err(r))
        return fail("thread_start", r);

    u64 bad = 0, sum = 0;
    for (u64 i = 0; i < 2; i++)                            /* read faults */
        sum += *(volatile u64 *)(area + i * PAGE_SIZE + 8 * i);
    for (u64 i = 2; i < NPAGES; i++)                       /* write faults */
        *(volatile u64 *)(area + i * PAGE_SIZE) = ~0UL - i;
    thread_join(&tid);
    for (u64 i = 0; i < NPAGES; i++) {
        volatile u64 *p = (volatile u64 *)(area + i * PAGE_SIZE);
        for (u64 w = 0; w < PAGE_SIZE / 8; w++) {
            u64 expect = (i >= 2 && w == 0) ? ~0UL - i : page_word(i, w);
            bad += p[w] != expect;
        }
    }
    put_kv_dec("faults_handled", handled);
    put_kv_dec("write_faults", write_faults);
    put_kv_dec("wp_faults", wp_faults);
    put_kv_dec("bad_msgs", bad_msgs);
    put_kv_dec("copy_errors", copy_errors);
    put_kv_dec("bad_words", bad);
    put_kv_hex("sum", sum);

    /* UFFDIO_ZEROPAGE: two more registered pages, filled without a fault */
    r = sys_mmap(0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return fail("mmap", r);
    u8 *z = (u8 *)r;
    struct uffdio_register reg2 = { { (u64)z, 2 * PAGE_SIZE }, UFFDIO_REGISTER_MODE_MISSING, 0 };
    r = sys_ioctl(uffd, UFFDIO_REGISTER, &reg2);
    if (r)
        return fail("UFFDIO_REGISTER", r);
    struct uffdio_zeropage zp = { { (u64)z, 2 * PAGE_SIZE }, 0, 0 };
    r = sys_ioctl(uffd, UFFDIO_ZEROPAGE, &zp);
    put_kv_dec("zeropage_ret", (u64)-r);
    put_kv_dec("zeropage_bytes", (u64)zp.zeropage);
    u64 nonzero = 0;
    for (u64 w = 0; w < 2 * PAGE_SIZE / 8; w++)
        nonzero += ((volatile u64 *)z)[w] != 0;
    put_kv_dec("zeropage_nonzero_words", nonzero);
    struct uffdio_zeropage zp2 = { { (u64)z, PAGE_SIZE }, 0, 0 };
    r = sys_ioctl(uffd, UFFDIO_ZEROPAGE, &zp2);
    put_kv_dec("zeropage_again", (u64)-r);
    put_kv_dec("zeropage_again_field", (u64)-zp2.zeropage);
    struct uffdio_range range = { (u64)z, 2 * PAGE_SIZE };
    put_kv_dec("unregister", (u64)-sys_ioctl(uffd, UFFDIO_UNREGISTER, &range));
    put_kv_dec("close", (u64)-sys_close(uffd));

    /* read(): nothing pending with O_NONBLOCK, and before UFFDIO_API */
    r = sys_userfaultfd(O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (rt_is_err(r))
        return fail("userfaultfd", r);
    int nb = (int)r;
    struct uffd_msg msg;
    put_kv_dec("read_before_api", (u64)-sys_read(nb, &msg, sizeof(msg)));
    struct uffdio_api api3 = { UFFD_API, 0, 0 };
    r = sys_ioctl(nb, UFFDIO_API, &api3);
    if (r)
        return fail("UFFDIO_API", r);
    put_kv_dec("read_nonblock", (u64)-sys_read(nb, &msg, sizeof(msg)));
    put_kv_dec("read_short", (u64)-sys_read(nb, &msg, sizeof(msg) - 1));
    sys_close(nb);
    return 0;
}
