/* The per-page test pattern the page-touching workloads share: a 64-bit value derived
 * from the page number, stored at a page-dependent 8-byte aligned offset (so pages are
 * touched at different cache-line offsets), and the checksum mix over those values
 * (values, never bytes: the same on little- and big-endian arches). */
#ifndef EMU_PAGE_PATTERN_H
#define EMU_PAGE_PATTERN_H

#include "rt.h"

static u64 page_value(u64 i)
{
    return (i + 1) * 0x9e3779b97f4a7c15UL ^ (i << 32);
}

static u64 page_offset(u64 i)
{
    return (i * 56) & (PAGE_SIZE - 8);
}

static u64 mix(u64 sum, u64 v)
{
    return sum * 0x100000001b3UL ^ v;
}

#endif
