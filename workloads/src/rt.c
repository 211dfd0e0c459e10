/*
 * rt.c - program entry and helpers for emu's guest workloads.
 *
 * _start is a few instructions of asm per arch: it passes the initial stack
 * pointer (which points at argc, as Linux sets it up) to _start_c, after
 * making the stack frame the ABI expects.  Everything else is C.
 */
#include "rt.h"

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
