"""The generic page-table walker (mm/pagewalk.c): walk_page_range() driving a walker's
``pmd_entry`` / ``pte_entry`` / ``pte_hole`` callbacks.

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
    [start, end) is walked; a nonzero callback result stops the walk."""
    walk = MmWalk(k, mm, ops, private)
    size = k.arch.levels[k.arch.pmd_level].span
    for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
        walk.vma = vma
        addr, stop = max(start, vma.start), min(end, vma.end)
        while addr < stop:
            nxt = min(stop, (addr | (size - 1)) + 1)
            pmdp = await rmap.walk_to_pmd(k, mm, addr)
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
