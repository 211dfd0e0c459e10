/*
 * rt.h - a tiny freestanding runtime for emu's guest workloads.
 *
 * Raw Linux syscalls through inline asm for x86-64, arm64, s390x and ppc64
 * (big-endian, ELFv2), plus a few output and memory helpers.  No libc.
 *
 * Every sys_* wrapper follows the Linux kernel convention on every arch:
 * a result in [-4095, -1] is -errno.  ppc64 reports errors as a positive
 * errno with CR0.SO set; rt_syscall6 negates it so C code never sees that.
 *
 * Output is line-buffered (one write(2) per line, flushed on '\n' and at
 * exit) and must be byte-identical across arches: print values, never
 * pointers, type sizes or memory bytes whose order depends on endianness.
 */
#ifndef EMU_RT_H
#define EMU_RT_H

typedef unsigned long      u64;   /* all four targets are LP64 */
typedef long               s64;
typedef unsigned int       u32;
typedef unsigned char      u8;
typedef unsigned long      size_t;

/* ---- syscall numbers (see /work/shared/spec/syscalls.md) ----------------
 * close, ftruncate, madvise and memfd_create were read from the kernel 6.1
 * uapi headers: linux-libc-dev (x86_64 asm/unistd_64.h) and Debian's
 * linux-libc-dev-{arm64,s390x,ppc64}-cross (/usr/<triple>/include/asm/unistd_64.h;
 * arm64 uses asm-generic/unistd.h, where ftruncate is __NR3264_ftruncate = 46);
 * close, madvise and memfd_create agree with syscalls.md.
 * clone and sched_yield (absent from syscalls.md) come from the same headers;
 * exit, futex and gettid agree with syscalls.md. */
#if defined(__x86_64__)
#define NR_write        1
#define NR_close        3
#define NR_mmap         9
#define NR_mprotect    10
#define NR_munmap      11
#define NR_brk         12
#define NR_sched_yield 24
#define NR_madvise     28
#define NR_getpid      39
#define NR_clone       56
#define NR_exit        60
#define NR_uname       63
#define NR_ftruncate   77
#define NR_gettid     186
#define NR_futex      202
#define NR_exit_group 231
#define NR_memfd_create 319
#define NR_wait4       61
#define NR_read         0
#define NR_lseek        8
#define NR_pread64     17
#define NR_mremap      25
#define NR_mincore     27
#define NR_mlock      149
#define NR_munlock    150
#define NR_openat     257
#define NR_ioctl       16
#define NR_userfaultfd 323
#elif defined(__aarch64__)
#define NR_ftruncate   46
#define NR_close       57
#define NR_write       64
#define NR_exit        93
#define NR_exit_group  94
#define NR_futex       98
#define NR_sched_yield 124
#define NR_uname      160
#define NR_getpid     172
#define NR_gettid     178
#define NR_brk        214
#define NR_munmap     215
#define NR_clone      220
#define NR_mmap       222
#define NR_mprotect   226
#define NR_madvise    233
#define NR_memfd_create 279
#define NR_wait4      260
#define NR_openat      56
#define NR_lseek       62
#define NR_read        63
#define NR_pread64     67
#define NR_mremap     216
#define NR_mlock      228
#define NR_munlock    229
#define NR_mincore    232
#define NR_ioctl       29
#define NR_userfaultfd 282
#elif defined(__s390x__)
#define NR_exit         1
#define NR_write        4
#define NR_close        6
#define NR_getpid      20
#define NR_brk         45
#define NR_mmap        90   /* old_mmap: one argument, a pointer to six longs */
#define NR_munmap      91
#define NR_ftruncate   93
#define NR_clone      120
#define NR_uname      122
#define NR_mprotect   125
#define NR_sched_yield 158
#define NR_madvise    219
#define NR_gettid     236
#define NR_futex      238
#define NR_exit_group 248
#define NR_memfd_create 350
#define NR_wait4      114
#define NR_read         3
#define NR_lseek       19
#define NR_mlock      150
#define NR_munlock    151
#define NR_mremap     163
#define NR_pread64    180
#define NR_mincore    218
#define NR_openat     288
#define NR_ioctl       54
#define NR_userfaultfd 355
#elif defined(__powerpc64__)
#define NR_exit         1
#define NR_write        4
#define NR_close        6
#define NR_getpid      20
#define NR_brk         45
#define NR_mmap        90
#define NR_munmap      91
#define NR_ftruncate   93
#define NR_clone      120
#define NR_uname      122
#define NR_mprotect   125
#define NR_sched_yield 158
#define NR_madvise    205
#define NR_gettid     207
#define NR_futex      221
#define NR_exit_group 234
#define NR_memfd_create 360
#define NR_wait4      114
#define NR_read         3
#define NR_lseek       19
#define NR_mlock      150
#define NR_munlock    151
#define NR_mremap     163
#define NR_pread64    179
#define NR_mincore    206
#define NR_openat     286
#define NR_ioctl       54
#define NR_userfaultfd 364
#else
#error "emu workloads: unsupported architecture"
#endif

/* mmap and madvise constants: the same values on all four arches
 * (linux/mman.h, asm-generic/mman-common.h) */
#define PROT_NONE      0
#define PROT_READ      1
#define PROT_WRITE     2
#define MAP_SHARED     0x01
#define MAP_PRIVATE    0x02
#define MAP_FIXED      0x10
#define MAP_ANONYMOUS  0x20
#define MADV_DONTNEED  4
#define MADV_FREE      8
#define MADV_PAGEOUT   21
#define MADV_COLD      20
#define MREMAP_MAYMOVE 1
#define AT_FDCWD       (-100)
#define O_RDONLY       0
#define O_WRONLY       1
#define MADV_HUGEPAGE  14
#define MADV_COLLAPSE  25

/* clone flags and futex operations: the same values on all four arches
 * (linux/sched.h, linux/futex.h) */
#define CLONE_VM             0x00000100
#define CLONE_FS             0x00000200
#define CLONE_FILES          0x00000400
#define CLONE_SIGHAND        0x00000800
#define CLONE_THREAD         0x00010000
#define CLONE_SYSVSEM        0x00040000
#define CLONE_PARENT_SETTID  0x00100000
#define CLONE_CHILD_CLEARTID 0x00200000
/* A thread as glibc makes one, minus CLONE_SETTLS (no TLS here) and with
 * exit signal 0: 0x350f00. */
#define CLONE_THREAD_FLAGS (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | \
                            CLONE_SYSVSEM | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID)
#define FUTEX_WAIT           0
#define FUTEX_WAKE           1
#define FUTEX_PRIVATE_FLAG   128

#define PAGE_SIZE      4096UL

/* ---- the raw syscall instruction ---------------------------------------- */
static inline long rt_syscall6(long n, long a, long b, long c, long d, long e, long f)
{
#if defined(__x86_64__)
    register long r10 __asm__("r10") = d;
    register long r8  __asm__("r8")  = e;
    register long r9  __asm__("r9")  = f;
    long ret;
    __asm__ __volatile__("syscall"
                         : "=a"(ret)
                         : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                         : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ __volatile__("svc #0"
                         : "+r"(x0)
                         : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                         : "memory");
    return x0;
#elif defined(__s390x__)
    /* svc 0: the number is taken from r1; arguments r2..r7, result r2 */
    register long r1 __asm__("r1") = n;
    register long r2 __asm__("r2") = a;
    register long r3 __asm__("r3") = b;
    register long r4 __asm__("r4") = c;
    register long r5 __asm__("r5") = d;
    register long r6 __asm__("r6") = e;
    register long r7 __asm__("r7") = f;
    __asm__ __volatile__("svc 0"
                         : "+r"(r2)
                         : "r"(r1), "r"(r3), "r"(r4), "r"(r5), "r"(r6), "r"(r7)
                         : "memory");
    return r2;
#elif defined(__powerpc64__)
    /* sc: number in r0, arguments r3..r8, result r3; on error CR0.SO is set
     * and r3 holds a positive errno, which we negate.  The kernel may clobber
     * r0, r4..r12, cr0, ctr and xer. */
    register long r0 __asm__("r0") = n;
    register long r3 __asm__("r3") = a;
    register long r4 __asm__("r4") = b;
    register long r5 __asm__("r5") = c;
    register long r6 __asm__("r6") = d;
    register long r7 __asm__("r7") = e;
    register long r8 __asm__("r8") = f;
    __asm__ __volatile__("sc\n\t"
                         "bns+ 1f\n\t"
                         "neg %1, %1\n"
                         "1:"
                         : "+r"(r0), "+r"(r3), "+r"(r4), "+r"(r5), "+r"(r6), "+r"(r7), "+r"(r8)
                         :
                         : "r9", "r10", "r11", "r12", "cr0", "ctr", "xer", "memory");
    return r3;
#endif
}

#define rt_syscall0(n)             rt_syscall6((n), 0, 0, 0, 0, 0, 0)
#define rt_syscall1(n, a)          rt_syscall6((n), (long)(a), 0, 0, 0, 0, 0)
#define rt_syscall2(n, a, b)       rt_syscall6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define rt_syscall3(n, a, b, c)    rt_syscall6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)

/* true for a raw result that encodes -errno */
static inline int rt_is_err(long r) { return (unsigned long)r >= (unsigned long)-4095; }

/* ---- syscall wrappers (Linux kernel return convention) ------------------ */
static inline long sys_write(int fd, const void *buf, size_t len)
{
    return rt_syscall3(NR_write, fd, buf, len);
}

static inline __attribute__((noreturn)) void sys_exit_group(int status)
{
    for (;;)
        rt_syscall1(NR_exit_group, status);
}

/* Returns the mapping address, or -errno. */
static inline long sys_mmap(void *addr, size_t len, int prot, int flags, int fd, long off)
{
#if defined(__s390x__)
    /* old_mmap(struct mmap_arg_struct *): addr, len, prot, flags, fd, offset (bytes) */
    volatile long args[6] = { (long)addr, (long)len, prot, flags, fd, off };
    return rt_syscall1(NR_mmap, args);
#else
    return rt_syscall6(NR_mmap, (long)addr, (long)len, prot, flags, fd, off);
#endif
}

static inline long sys_munmap(void *addr, size_t len)
{
    return rt_syscall2(NR_munmap, addr, len);
}

static inline long sys_mprotect(void *addr, size_t len, int prot)
{
    return rt_syscall3(NR_mprotect, addr, len, prot);
}

static inline long sys_madvise(void *addr, size_t len, int advice)
{
    return rt_syscall3(NR_madvise, addr, len, advice);
}

/* Returns a file descriptor, or -errno. */
static inline long sys_memfd_create(const char *name, u32 flags)
{
    return rt_syscall2(NR_memfd_create, name, flags);
}

static inline long sys_ftruncate(int fd, long len)
{
    return rt_syscall2(NR_ftruncate, fd, len);
}

static inline long sys_openat(int dirfd, const char *path, int flags)
{
    return rt_syscall6(NR_openat, dirfd, (long)path, flags, 0, 0, 0);
}

static inline long sys_read(int fd, void *buf, size_t len)
{
    return rt_syscall3(NR_read, fd, buf, len);
}

static inline long sys_pread64(int fd, void *buf, size_t len, long off)
{
    return rt_syscall6(NR_pread64, fd, (long)buf, (long)len, off, 0, 0);
}

static inline long sys_mremap(void *old, size_t old_len, size_t new_len, int flags)
{
    return rt_syscall6(NR_mremap, (long)old, (long)old_len, (long)new_len, flags, 0, 0);
}

static inline long sys_mincore(void *addr, size_t len, u8 *vec)
{
    return rt_syscall3(NR_mincore, addr, len, vec);
}

static inline long sys_mlock(void *addr, size_t len)
{
    return rt_syscall2(NR_mlock, addr, len);
}

static inline long sys_munlock(void *addr, size_t len)
{
    return rt_syscall2(NR_munlock, addr, len);
}

/* ---- userfaultfd (include/uapi/linux/userfaultfd.h) ---------------------
 * ioctl numbers are _IOR / _IOWR(0xAA, nr, size) in asm/ioctl.h's encoding:
 * the generic one (2 direction bits at 30, _IOC_WRITE 1, _IOC_READ 2) on
 * x86_64, arm64 and s390x; powerpc has 3 direction bits at 29 (_IOC_WRITE 4). */
#if defined(__powerpc64__)
#define RT_IOC_DIRSHIFT 29
#define RT_IOC_WRITE    4UL
#else
#define RT_IOC_DIRSHIFT 30
#define RT_IOC_WRITE    1UL
#endif
#define RT_IOC_READ     2UL
#define RT_IOC(dir, type, nr, size) \
    (((dir) << RT_IOC_DIRSHIFT) | ((unsigned long)(size) << 16) | ((type) << 8) | (nr))
#define RT_IOR(type, nr, size)  RT_IOC(RT_IOC_READ, type, nr, size)
#define RT_IOWR(type, nr, size) RT_IOC(RT_IOC_READ | RT_IOC_WRITE, type, nr, size)

#define UFFD_USER_MODE_ONLY 1
#define O_NONBLOCK      04000
#define O_CLOEXEC       02000000
#define UFFD_API        0xAAUL
#define UFFD_EVENT_PAGEFAULT      0x12
#define UFFD_PAGEFAULT_FLAG_WRITE (1UL << 0)
#define UFFD_PAGEFAULT_FLAG_WP    (1UL << 1)
#define UFFDIO_REGISTER_MODE_MISSING (1UL << 0)
#define UFFDIO_REGISTER_MODE_WP      (1UL << 1)
#define _UFFDIO_REGISTER   0x00
#define _UFFDIO_UNREGISTER 0x01
#define _UFFDIO_WAKE       0x02
#define _UFFDIO_COPY       0x03
#define _UFFDIO_ZEROPAGE   0x04
#define _UFFDIO_API        0x3F

struct uffd_msg {                      /* __packed in the uapi; no padding here */
    u8 event, reserved1;
    unsigned short reserved2;
    u32 reserved3;
    u64 flags, address, ptid;          /* arg.pagefault (+ feat.ptid, padded) */
};
struct uffdio_api      { u64 api, features, ioctls; };
struct uffdio_range    { u64 start, len; };
struct uffdio_register { struct uffdio_range range; u64 mode, ioctls; };
struct uffdio_copy     { u64 dst, src, len, mode; s64 copy; };
struct uffdio_zeropage { struct uffdio_range range; u64 mode; s64 zeropage; };

#define UFFDIO_API        RT_IOWR(0xAAUL, _UFFDIO_API, sizeof(struct uffdio_api))
#define UFFDIO_REGISTER   RT_IOWR(0xAAUL, _UFFDIO_REGISTER, sizeof(struct uffdio_register))
#define UFFDIO_UNREGISTER RT_IOR(0xAAUL, _UFFDIO_UNREGISTER, sizeof(struct uffdio_range))
#define UFFDIO_WAKE       RT_IOR(0xAAUL, _UFFDIO_WAKE, sizeof(struct uffdio_range))
#define UFFDIO_COPY       RT_IOWR(0xAAUL, _UFFDIO_COPY, sizeof(struct uffdio_copy))
#define UFFDIO_ZEROPAGE   RT_IOWR(0xAAUL, _UFFDIO_ZEROPAGE, sizeof(struct uffdio_zeropage))

static inline long sys_userfaultfd(int flags)
{
    return rt_syscall1(NR_userfaultfd, flags);
}

static inline long sys_ioctl(int fd, unsigned long cmd, void *arg)
{
    return rt_syscall3(NR_ioctl, fd, cmd, arg);
}

#define SIGCHLD 17

/* fork() as clone(SIGCHLD, newsp 0): the child goes on on a copy of this stack */
static inline long sys_fork(void)
{
#if defined(__s390x__)
    return rt_syscall2(NR_clone, 0, SIGCHLD);          /* CLONE_BACKWARDS2: newsp first */
#else
    return rt_syscall2(NR_clone, SIGCHLD, 0);
#endif
}

static inline long sys_wait4(long pid, int *status, int options)
{
    return rt_syscall6(NR_wait4, pid, (long)status, options, 0, 0, 0);
}

static inline long sys_close(int fd)
{
    return rt_syscall1(NR_close, fd);
}

/* The raw brk: returns the new break, or the unchanged one on failure. */
static inline u64 sys_brk(u64 addr)
{
    return (u64)rt_syscall1(NR_brk, addr);
}

static inline long sys_getpid(void)
{
    return rt_syscall0(NR_getpid);
}

/* The thread exits alone (exit, not exit_group); the other threads go on. */
static inline __attribute__((noreturn)) void sys_exit(int status)
{
    for (;;)
        rt_syscall1(NR_exit, status);
}

static inline long sys_gettid(void)
{
    return rt_syscall0(NR_gettid);
}

static inline long sys_sched_yield(void)
{
    return rt_syscall0(NR_sched_yield);
}

/* futex(uaddr, op, val, timeout): FUTEX_WAIT sleeps while *uaddr == val
 * (returns 0, or -EAGAIN if the value differs, -EINTR, -ETIMEDOUT);
 * FUTEX_WAKE wakes up to val waiters and returns how many it woke. */
static inline long sys_futex(volatile int *uaddr, int op, int val, const void *timeout)
{
    return rt_syscall6(NR_futex, (long)uaddr, op, val, (long)timeout, 0, 0);
}

struct utsname {
    char sysname[65], nodename[65], release[65], version[65], machine[65], domainname[65];
};

static inline long sys_uname(struct utsname *u)
{
    return rt_syscall1(NR_uname, u);
}

/* ---- threads (rt.c) ------------------------------------------------------ */
/*
 * rt_clone: the raw clone syscall with a child side in asm.  The child runs
 * on stack_top (rounded down to 16 bytes; the stack grows down from it) and
 * calls fn(arg), then exit(fn's result): only that thread ends.  fn and arg
 * travel on the child's stack, so the child never touches the parent's
 * registers or stack frame.  tid is passed as both parent_tid and child_tid.
 * Returns the child's thread id in the parent, or -errno.
 *
 * The raw argument order differs per arch (kernel/fork.c, chosen by each
 * arch's Kconfig; qemu's linux-user/<arch>/target_syscall.h agrees):
 *   x86_64        flags, newsp, parent_tid, child_tid, tls  (the default)
 *   arm64, ppc64  flags, newsp, parent_tid, tls, child_tid  (CLONE_BACKWARDS)
 *   s390x         newsp, flags, parent_tid, child_tid, tls  (CLONE_BACKWARDS2)
 * tls is 0 (no CLONE_SETTLS).
 */
long rt_clone(unsigned long flags, void *stack_top, volatile int *tid,
              int (*fn)(void *arg), void *arg);

/*
 * A thread with CLONE_THREAD_FLAGS.  The kernel stores the new thread id in
 * *tid before clone returns in the parent (CLONE_PARENT_SETTID, so a thread
 * that exits at once cannot race with the parent's store), and at thread exit
 * sets *tid = 0 and futex-wakes it (CLONE_CHILD_CLEARTID); thread_join waits
 * for that.  tid must stay valid until the join.  Returns the thread id or
 * -errno.
 */
long thread_start(int (*fn)(void *arg), void *arg, void *stack, size_t stack_size,
                  volatile int *tid);
void thread_join(volatile int *tid);

/* ---- helpers (rt.c) ------------------------------------------------------ */
void put_char(char c);
void put_str(const char *s);
void put_udec(u64 v);          /* unsigned decimal */
void put_hex(u64 v);           /* "0x" + 16 lower-case hex digits */
void put_flush(void);          /* also done on '\n' and at exit */
void put_kv_dec(const char *key, u64 v);   /* "key v\n" */
void put_kv_hex(const char *key, u64 v);   /* "key 0x...\n" */

/* "what failed: -ERRNO\n" for a syscall that returned -ERRNO; returns 1 (the
 * exit status) so callers can write `return fail("mmap", r);`. */
static inline int fail(const char *what, long r)
{
    put_str(what);
    put_str(" failed: -");
    put_udec((u64)-r);
    put_char('\n');
    return 1;
}

size_t strlen(const char *s);
u64 parse_udec(const char *s, u64 dflt);   /* dflt if s is empty or not all digits */

/* The compiler may emit calls to these even with -ffreestanding -fno-builtin. */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);

int main(int argc, char **argv);

#endif /* EMU_RT_H */
