/*
 * hello - the smallest useful guest: write, getpid, uname, exit_group.
 * Prints argc and any arguments after argv[0] (argv[0] is a path and differs
 * per arch, so it is not printed).
 */
#include "rt.h"

int main(int argc, char **argv)
{
    struct utsname u;

    put_str("hello from emu\n");
    put_kv_dec("argc", (u64)argc);
    for (int i = 1; i < argc; i++) {
        put_str("arg ");
        put_udec((u64)i);
        put_str(": ");
        put_str(argv[i]);
        put_char('\n');
    }

    long pid = sys_getpid();
    put_str(pid > 0 ? "getpid > 0: yes\n" : "getpid > 0: no\n");

    long r = sys_uname(&u);
    put_str("uname returned ");
    if (r < 0) {
        put_str("-");
        put_udec((u64)-r);
    } else {
        put_udec((u64)r);
    }
    put_char('\n');
    /* Touch the result so a bad uname that leaves it unterminated is noticed
     * without printing host-specific strings. */
    put_str(r == 0 && strlen(u.sysname) == 5 ? "sysname Linux-sized: yes\n"
                                              : "sysname Linux-sized: no\n");

    /* An error result: munmap of an unaligned address is EINVAL (22) on every
     * arch.  On ppc64 the kernel reports it as +22 with CR0.SO set; rt.h turns
     * that into -22 like everywhere else. */
    r = sys_munmap((void *)1, PAGE_SIZE);
    put_str("munmap(1) returned ");
    if (r < 0) {
        put_str("-");
        put_udec((u64)-r);
    } else {
        put_udec((u64)r);
    }
    put_char('\n');
    return 0;
}
