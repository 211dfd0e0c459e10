/*
 * rt.c - program entry and helpers for emu's guest workloads.
 *
 * _start is a few instructions of asm per arch: it passes the initial stack
 * pointer (which points at argc, as Linux sets it up) to _start_c, after
 * making the stack frame the ABI expects.  rt_clone's child side is asm too
 * (it starts on a new stack).  Everything else is C.
 */
#include "rt.h"

#define RT_STR(x)  #x
#define RT_XSTR(x) RT_STR(x)             /* a syscall number as an asm operand */

__attribute__((noreturn, used)) void _start_c(long *sp);

#if defined(__x86_64__)
__asm__(".text\n"
        ".global _start\n"
        ".type _start, @function\n"
        "_start:\n"
        "    xor  %ebp, %ebp\n"          /* outermost frame */
        "    mov  %rsp, %rdi\n"          /* arg0 = &argc */
        "    and  $-16, %rsp\n"          /* 16-byte aligned before the call */
        "    call _start_c\n"
        "    hlt\n"
        ".size _start, . - _start\n");
#elif defined(__aarch64__)
__asm__(".text\n"
        ".global _start\n"
        ".type _start, %function\n"
        "_start:\n"
        "    mov  x29, #0\n"
        "    mov  x30, #0\n"
        "    mov  x0, sp\n"              /* arg0 = &argc */
        "    and  x9, x0, #-16\n"
        "    mov  sp, x9\n"
        "    bl   _start_c\n"
        "    brk  #0\n"
        ".size _start, . - _start\n");
#elif defined(__s390x__)
__asm__(".text\n"
        ".global _start\n"
        ".type _start, @function\n"
        "_start:\n"
        "    lgr   %r2, %r15\n"          /* arg0 = &argc */
        "    nill  %r15, 0xfff0\n"       /* 16-byte align */
        "    aghi  %r15, -160\n"         /* the callee's register save area */
        "    lghi  %r0, 0\n"
        "    stg   %r0, 0(%r15)\n"       /* back chain = 0 */
        "    brasl %r14, _start_c\n"
        "    .long 0\n"                  /* never reached: illegal op */
        ".size _start, . - _start\n");
#elif defined(__powerpc64__)
/* ELFv2: r2 must hold the TOC pointer before any C code runs.  Derive it
 * from our own address (bl/mflr) so it does not matter whether the loader
 * set r12 to the entry point. */
__asm__(".text\n"
        ".global _start\n"
        ".type _start, @function\n"
        "_start:\n"
        "    bl    1f\n"
        "1:  mflr  12\n"
        "    addis 2, 12, (.TOC. - 1b)@ha\n"
        "    addi  2, 2, (.TOC. - 1b)@l\n"
        "    mr    3, 1\n"               /* arg0 = &argc */
        "    clrrdi 1, 1, 4\n"           /* 16-byte align */
        "    li    0, 0\n"
        "    stdu  0, -32(1)\n"          /* minimal frame, back chain = 0 */
        "    mtlr  0\n"
        "    bl    _start_c\n"
        "    nop\n"
        "    trap\n"
        ".size _start, . - _start\n");
#endif

/* ---- rt_clone ------------------------------------------------------------
 * rt_clone(flags, stack_top, tid, fn, arg): see rt.h.  Each version puts fn
 * and arg on the child's stack below stack_top and points the syscall's newsp
 * at them, so the child only needs its own stack pointer: it loads fn and
 * arg from there, calls fn(arg) with the frame the ABI wants, and calls exit
 * (not exit_group) with the result.  The parent returns the clone result.
 * Own section, so --gc-sections drops it from programs without threads. */
#if defined(__x86_64__)
/* rdi flags, rsi stack_top, rdx tid, rcx fn, r8 arg.
 * clone: rdi flags, rsi newsp, rdx parent_tid, r10 child_tid, r8 tls. */
__asm__(".pushsection .text.rt_clone, \"ax\", @progbits\n"
        ".global rt_clone\n"
        ".type rt_clone, @function\n"
        "rt_clone:\n"
        "    and  $-16, %rsi\n"
        "    sub  $16, %rsi\n"
        "    mov  %rcx, 0(%rsi)\n"       /* fn */
        "    mov  %r8, 8(%rsi)\n"        /* arg */
        "    mov  %rdx, %r10\n"          /* child_tid = parent_tid = tid */
        "    xor  %r8d, %r8d\n"          /* tls */
        "    mov  $" RT_XSTR(NR_clone) ", %eax\n"
        "    syscall\n"
        "    test %rax, %rax\n"
        "    jz   1f\n"
        "    ret\n"                      /* parent: thread id or -errno */
        "1:  xor  %ebp, %ebp\n"          /* child: rsp = newsp */
        "    pop  %rax\n"                /* fn */
        "    pop  %rdi\n"                /* arg; rsp is 16-aligned again */
        "    call *%rax\n"
        "    mov  %eax, %edi\n"
        "    mov  $" RT_XSTR(NR_exit) ", %eax\n"
        "    syscall\n"
        "    hlt\n"
        ".size rt_clone, . - rt_clone\n"
        ".popsection\n");
#elif defined(__aarch64__)
/* x0 flags, x1 stack_top, x2 tid, x3 fn, x4 arg.
 * clone (CLONE_BACKWARDS): x0 flags, x1 newsp, x2 parent_tid, x3 tls, x4 child_tid. */
__asm__(".pushsection .text.rt_clone, \"ax\", %progbits\n"
        ".global rt_clone\n"
        ".type rt_clone, %function\n"
        "rt_clone:\n"
        "    and  x1, x1, #-16\n"
        "    stp  x3, x4, [x1, #-16]!\n" /* fn, arg */
        "    mov  x4, x2\n"              /* child_tid = parent_tid = tid */
        "    mov  x3, #0\n"              /* tls */
        "    mov  x8, #" RT_XSTR(NR_clone) "\n"
        "    svc  #0\n"
        "    cbz  x0, 1f\n"
        "    ret\n"                      /* parent: thread id or -errno */
        "1:  mov  x29, #0\n"             /* child: sp = newsp */
        "    mov  x30, #0\n"
        "    ldp  x9, x0, [sp], #16\n"   /* fn, arg; sp 16-aligned */
        "    blr  x9\n"
        "    mov  x8, #" RT_XSTR(NR_exit) "\n"
        "    svc  #0\n"
        "    brk  #0\n"
        ".size rt_clone, . - rt_clone\n"
        ".popsection\n");
#elif defined(__s390x__)
/* r2 flags, r3 stack_top, r4 tid, r5 fn, r6 arg.
 * clone (CLONE_BACKWARDS2): r2 newsp, r3 flags, r4 parent_tid, r5 child_tid, r6 tls.
 * r6 is callee-saved: it is kept in its slot of our caller's register save
 * area (48(r15)) and reloaded in the parent.  The child's stack: fn and arg
 * at stack_top-16, below them the 160-byte save area of a first frame with a
 * zero back chain, which is where newsp points. */
__asm__(".pushsection .text.rt_clone, \"ax\", @progbits\n"
        ".global rt_clone\n"
        ".type rt_clone, @function\n"
        "rt_clone:\n"
        "    stg   %r6, 48(%r15)\n"
        "    nill  %r3, 0xfff0\n"        /* 16-byte align */
        "    aghi  %r3, -16\n"
        "    stg   %r5, 0(%r3)\n"        /* fn */
        "    stg   %r6, 8(%r3)\n"        /* arg */
        "    aghi  %r3, -160\n"
        "    lghi  %r0, 0\n"
        "    stg   %r0, 0(%r3)\n"        /* back chain = 0 */
        "    lgr   %r0, %r2\n"
        "    lgr   %r2, %r3\n"           /* newsp */
        "    lgr   %r3, %r0\n"           /* flags */
        "    lgr   %r5, %r4\n"           /* child_tid = parent_tid = tid */
        "    lghi  %r6, 0\n"             /* tls */
        "    lghi  %r1, " RT_XSTR(NR_clone) "\n"
        "    svc   0\n"
        "    ltgr  %r2, %r2\n"
        "    jz    1f\n"
        "    lg    %r6, 48(%r15)\n"
        "    br    %r14\n"               /* parent: thread id or -errno */
        "1:  lg    %r1, 160(%r15)\n"     /* child: r15 = newsp; fn */
        "    lg    %r2, 168(%r15)\n"     /* arg */
        "    basr  %r14, %r1\n"
        "    lghi  %r1, " RT_XSTR(NR_exit) "\n"
        "    svc   0\n"
        "    .long 0\n"                  /* never reached: illegal op */
        ".size rt_clone, . - rt_clone\n"
        ".popsection\n");
#elif defined(__powerpc64__)
/* r3 flags, r4 stack_top, r5 tid, r6 fn, r7 arg.
 * clone (CLONE_BACKWARDS): r3 flags, r4 newsp, r5 parent_tid, r6 tls, r7 child_tid.
 * The child's stack: fn and arg at stack_top-16, below them the 32-byte
 * minimal ELFv2 frame (zero back chain) where newsp points.  The child keeps
 * the parent's r2 (TOC: same module) and calls fn through ctr with r12 = fn,
 * as ELFv2 wants for a global entry point.  A failed sc sets CR0.SO and
 * leaves a positive errno in r3. */
__asm__(".pushsection .text.rt_clone, \"ax\", @progbits\n"
        ".global rt_clone\n"
        ".type rt_clone, @function\n"
        "rt_clone:\n"
        "    clrrdi 4, 4, 4\n"           /* 16-byte align */
        "    std   6, -16(4)\n"          /* fn */
        "    std   7, -8(4)\n"           /* arg */
        "    addi  4, 4, -48\n"
        "    li    0, 0\n"
        "    std   0, 0(4)\n"            /* back chain = 0 */
        "    mr    7, 5\n"               /* child_tid = parent_tid = tid */
        "    li    6, 0\n"               /* tls */
        "    li    0, " RT_XSTR(NR_clone) "\n"
        "    sc\n"
        "    bns+  1f\n"
        "    neg   3, 3\n"               /* parent: -errno */
        "    blr\n"
        "1:  cmpdi 3, 0\n"
        "    bnelr\n"                    /* parent: thread id */
        "    ld    12, 32(1)\n"          /* child: r1 = newsp; fn */
        "    ld    3, 40(1)\n"           /* arg */
        "    mtctr 12\n"
        "    bctrl\n"
        "    li    0, " RT_XSTR(NR_exit) "\n"
        "    sc\n"
        "    trap\n"
        ".size rt_clone, . - rt_clone\n"
        ".popsection\n");
#endif

long thread_start(int (*fn)(void *arg), void *arg, void *stack, size_t stack_size,
                  volatile int *tid)
{
    *tid = 0;                            /* so a failed clone joins at once */
    return rt_clone(CLONE_THREAD_FLAGS, (u8 *)stack + stack_size, tid, fn, arg);
}

/* Linux clears the tid word and wakes it with a shared futex wake
 * (mm_release: FUTEX_WAKE without FUTEX_PRIVATE_FLAG), which does not match a
 * private waiter, so this waits with plain FUTEX_WAIT, as glibc's
 * pthread_join does.  The fence orders the thread's last stores before
 * whatever the caller reads next. */
void thread_join(volatile int *tid)
{
    int t;
    while ((t = *tid) != 0)
        sys_futex(tid, FUTEX_WAIT, t, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void _start_c(long *sp)
{
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    int status = main(argc, argv);
    put_flush();
    sys_exit_group(status);
}

/* ---- output -------------------------------------------------------------- */
static char out_buf[256];
static size_t out_len;

void put_flush(void)
{
    size_t off = 0;
    while (off < out_len) {
        long r = sys_write(1, out_buf + off, out_len - off);
        if (r <= 0)
            break;
        off += (size_t)r;
    }
    out_len = 0;
}

void put_char(char c)
{
    out_buf[out_len++] = c;
    if (c == '\n' || out_len == sizeof out_buf)
        put_flush();
}

void put_str(const char *s)
{
    while (*s)
        put_char(*s++);
}

void put_udec(u64 v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        put_char(tmp[--n]);
}

void put_hex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    put_str("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        put_char(digits[(v >> shift) & 15]);
}

void put_kv_dec(const char *key, u64 v)
{
    put_str(key);
    put_char(' ');
    put_udec(v);
    put_char('\n');
}

void put_kv_hex(const char *key, u64 v)
{
    put_str(key);
    put_char(' ');
    put_hex(v);
    put_char('\n');
}

/* ---- strings and memory ------------------------------------------------- */
size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

u64 parse_udec(const char *s, u64 dflt)
{
    u64 v = 0;
    if (!s || !*s)
        return dflt;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return dflt;
        v = v * 10 + (u64)(*s - '0');
    }
    return v;
}

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    if (p < q) {
        while (n--)
            *p++ = *q++;
    } else {
        while (n--)
            p[n] = q[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}
