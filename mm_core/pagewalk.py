"""The generic page-table walker (mm/pagewalk.c): walk_page_range() driving a walker's
``pmd_entry`` / ``pte_entry`` / ``pte_hole`` callbacks (and ``test_walk``, which may skip a VMA).

Failure handling (the 6.5 series): walk_pte_range() whose pte_offset_map_lock() fails
sets ``ACTION_AGAIN``; walk_pmd_range() then reads the pmd again (RETRY) and goes to
``pte_hole`` if it became none. A ``pmd_entry`` callback may also ask for ACTION_AGAIN
(retry this pmd) or ACTION_CONTINUE (skip its PTEs).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from emu.arch import Kind
from emu.sched.traps import sched_point
from mm_core import pgtable, rmap

ACTION_SUBTREE, ACTION_CONTINUE, ACTION_AGAIN = 0, 1, 2


@dataclass
class MmWalkOps:
    """struct mm_walk_ops: the callbacks (each ``async (..., walk) -> int``)."""

    pmd_entry: Callable[..., Awaitable[int]] | None = None
    pte_entry: Callable[..., Awaitable[int]] | None = None
    pte_hole: Callable[..., Awaitable[int]] | None = None
    # test_walk(start, end, walk): 0 walks the VMA, > 0 skips it, < 0 ends the walk
    test_walk: Callable[..., Awaitable[int]] | None = None


@dataclass
class MmWalk:
    """struct mm_walk."""

    k: Any
    mm: Any
    ops: MmWalkOps
    private: Any = None
    vma: Any = None
    action: int = ACTION_SUBTREE
    retries: int = 0
    stats: dict = field(default_factory=dict)


async def walk_page_range(k, mm, start: int, end: int, ops: MmWalkOps, private: Any = None) -> int:
    """walk_page_range(): the caller holds mmap_lock; every PMD extent of every VMA in
    [start, end) is walked; a nonzero callback result stops the walk. Address ranges
    outside any VMA go to ``pte_hole`` with ``walk.vma`` None (as in Linux); a VMA that
    ``test_walk`` answers with a positive value is skipped."""
    walk = MmWalk(k, mm, ops, private)
    addr = start
    for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
        if addr < vma.start:                               # outside vma
            walk.vma = None
            err = await ops.pte_hole(addr, vma.start, walk) if ops.pte_hole else 0
            if err:
                return err
        lo, hi = max(start, vma.start), min(end, vma.end)
        walk.vma = vma
        err = await walk_page_test(lo, hi, walk)
        if err < 0:
            return err
        if err == 0:
            err = await __walk_page_range(k, walk, lo, hi)
            if err:
                return err
        addr = hi
    if addr < end:                                         # after the last vma
        walk.vma = None
        return await ops.pte_hole(addr, end, walk) if ops.pte_hole else 0
    return 0


async def walk_page_vma(k, vma, ops: MmWalkOps, private: Any = None) -> int:
    """walk_page_vma(): the whole of one VMA (no holes outside it)."""
    walk = MmWalk(k, vma.mm, ops, private, vma)
    err = await walk_page_test(vma.start, vma.end, walk)
    if err > 0:
        return 0
    if err < 0:
        return err
    return await __walk_page_range(k, walk, vma.start, vma.end)


async def walk_page_test(start: int, end: int, walk: MmWalk) -> int:
    """walk_page_test(): the walker's test_walk, if it has one (VM_PFNMAP is not modelled)."""
    if walk.ops.test_walk is not None:
        return await walk.ops.test_walk(start, end, walk)
    return 0


async def __walk_page_range(k, walk: MmWalk, addr: int, stop: int) -> int:
    """__walk_page_range() -> walk_pgd_range() ... for one VMA's part [addr, stop)."""
    ops = walk.ops
    size = k.arch.levels[k.arch.pmd_level].span
    while addr < stop:
        nxt = min(stop, (addr | (size - 1)) + 1)
        pmdp = await rmap.walk_to_pmd(k, walk.mm, addr)
        if pmdp is None:
            err = await ops.pte_hole(addr, nxt, walk) if ops.pte_hole else 0
        else:
            err = await walk_pmd_range(k, walk, pmdp, addr, nxt)
        if err:
            return err
        addr = nxt
    return 0


async def walk_pmd_range(k, walk: MmWalk, pmdp: int, addr: int, end: int) -> int:
    """walk_pmd_range() for one pmd: ACTION_AGAIN goes back to re-reading it."""
    ops = walk.ops
    while True:                                            # again:
        pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
        if pmdval.kind is Kind.NONE:
            return await ops.pte_hole(addr, end, walk) if ops.pte_hole else 0
        walk.action = ACTION_SUBTREE
        if ops.pmd_entry is not None:
            err = await ops.pmd_entry(pmdp, addr, end, walk)
            if err:
                return err
        if walk.action == ACTION_AGAIN:
            walk.retries += 1
            await sched_point("retry", pmdp)
            continue
        if walk.action == ACTION_CONTINUE or ops.pte_entry is None:
            return 0
        err = await walk_pte_range(k, walk, pmdp, addr, end)
        if err:
            return err
        if walk.action == ACTION_AGAIN:
            walk.retries += 1
            await sched_point("retry", pmdp)
            continue
        return 0


async def walk_pte_range(k, walk: MmWalk, pmdp: int, addr: int, end: int) -> int:
    """walk_pte_range(): map with the lock; a failed map is ACTION_AGAIN (RETRY)."""
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None:
        walk.action = ACTION_AGAIN
        return 0
    ptep, ptl = locked
    err = 0
    for a in range(addr, end, k.page_size):
        err = await walk.ops.pte_entry(ptep + ((a - addr) >> k.page_shift) * 8, a, a + k.page_size, walk)
        if err:
            break
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return err
