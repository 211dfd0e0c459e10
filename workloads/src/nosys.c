/*
 * nosys - a syscall number no arch defines: Linux (and emu) answer -ENOSYS (-38),
 * and emu counts it in the run summary.
 */
#include "rt.h"

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    long r = rt_syscall0(999);
    put_str("syscall 999 returned ");
    if (r < 0) {
        put_str("-");
        put_udec((u64)-r);
    } else {
        put_udec((u64)r);
    }
    put_char('\n');
    return 0;
}
