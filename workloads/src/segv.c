/*
 * segv - store to an address that was mapped a moment ago and is now
 * unmapped.  Under Linux the process dies of SIGSEGV (status 139 in a shell).
 * If the store does not fault, it says so and exits 1.
 */
#include "rt.h"

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    long r = sys_mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r)) {
        put_str("mmap failed\n");
        return 1;
    }
    volatile u64 *p = (volatile u64 *)r;
    *p = 1;                           /* mapped: fine */
    if (sys_munmap((void *)r, PAGE_SIZE)) {
        put_str("munmap failed\n");
        return 1;
    }
    put_str("about to fault\n");
    *p = 2;                           /* unmapped: SIGSEGV */
    put_str("store to an unmapped page did not fault\n");
    return 1;
}
