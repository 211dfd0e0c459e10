/* Mapping a shmem file so that it can be collapsed: shared by the workloads
 * that exercise khugepaged / MADV_COLLAPSE. */
#ifndef EMU_SHMEM_MAP_H
#define EMU_SHMEM_MAP_H

#include "rt.h"

/* Map len bytes of fd MAP_SHARED at an align-aligned address (reserve
 * len + align of PROT_NONE, map over the aligned part, drop the rest);
 * returns the address or -errno. */
static long map_shared_aligned(int fd, size_t len, size_t align)
{
    size_t resv_len = len + align;
    long r = sys_mmap(0, resv_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_is_err(r))
        return r;
    u64 resv = (u64)r;
    u64 at = (resv + align - 1) & ~(u64)(align - 1);
    r = sys_mmap((void *)at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    if (rt_is_err(r))
        return r;
    if (at > resv) {                       /* the unused head of the reservation */
        r = sys_munmap((void *)resv, at - resv);
        if (r)
            return r;
    }
    u64 end = at + len, resv_end = resv + resv_len;
    if (end < resv_end) {                  /* and its tail */
        r = sys_munmap((void *)end, resv_end - end);
        if (r)
            return r;
    }
    return (long)at;
}

#endif
