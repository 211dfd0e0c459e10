/*
 * forktest - fork (clone(SIGCHLD)) and wait4: copy-on-write of private anonymous
 * memory, a shared memfd mapping seen by both, and the children's exit statuses.
 *
 * The parent prints only before fork and after wait4, so the output order is the
 * same under any scheduler (and under Linux).
 */
#include "rt.h"

#define PAGES 4

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    long r = sys_mmap(0, PAGES * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return fail("mmap", r);
    volatile u64 *priv = (volatile u64 *)r;
    long fd = sys_memfd_create("forktest", 0);
    if (rt_is_err(fd))
        return fail("memfd_create", fd);
    r = sys_ftruncate((int)fd, PAGE_SIZE);
    if (r)
        return fail("ftruncate", r);
    r = sys_mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, (int)fd, 0);
    if (rt_is_err(r))
        return fail("mmap shared", r);
    volatile u64 *shared = (volatile u64 *)r;
    for (u64 i = 0; i < PAGES; i++)
        priv[i * PAGE_SIZE / 8] = 10 + i;
    shared[0] = 1;
    put_str("parent: before fork\n");

    long pid = sys_fork();
    if (rt_is_err(pid))
        return fail("fork", pid);
    if (pid == 0) {                       /* the child */
        put_kv_dec("child: sees private page 2", priv[2 * PAGE_SIZE / 8]);
        priv[0] = 100;                    /* copy-on-write: the parent keeps 10 */
        priv[3 * PAGE_SIZE / 8] = 103;
        shared[0] = 2;                    /* the shared page: the parent sees it */
        put_kv_dec("child: wrote private page 0", priv[0]);
        sys_exit_group(7);
    }
    int status = -1;
    long w = sys_wait4(pid, &status, 0);
    if (w != pid)
        return fail("wait4", w);
    put_kv_dec("parent: child exit status", (u64)((status >> 8) & 0xff));
    put_kv_dec("parent: private page 0", priv[0]);
    put_kv_dec("parent: private page 3", priv[3 * PAGE_SIZE / 8]);
    put_kv_dec("parent: shared page", shared[0]);

    /* a second child that only exits; wait4(-1) reaps it, then there is none */
    pid = sys_fork();
    if (rt_is_err(pid))
        return fail("fork", pid);
    if (pid == 0)
        sys_exit_group(0);
    w = sys_wait4(-1, &status, 0);
    put_kv_dec("parent: second child reaped", (u64)(w == pid));
    w = sys_wait4(-1, &status, 0);
    put_kv_dec("parent: no more children (-ECHILD)", (u64)-w);
    return 0;
}
