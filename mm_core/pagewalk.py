"""The generic page-table walker (mm/pagewalk.c): walk_page_range() driving a walker's
``pmd_entry`` / ``pte_entry`` / ``pte_hole`` callbacks (and ``test_walk``, which may skip a VMA).

Failure handling (the 6.5 series): walk_pte_range() whose pte_offset_map_lock() fails
sets ``ACTION_AGAIN``; walk_pmd_range() then reads the pmd again (RETRY) and goes to
``pte_hole`` if it became none. A ``pmd_entry`` callback may also ask for ACTION_AGAIN
(retry this pmd) or ACTION_CONTINUE (skip its PTEs).

walk_page_range_novma() walks tables with no VMAs behind them (ptdump): init_mm's PTE
tables are reached with pte_offset_kernel() (no validation, nothing to fail), a user mm's
with pte_offset_map() and no ptl, whose failure is the same ACTION_AGAIN (patch 10 of the
series); a huge or non-present pmd is not descended into.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from errno import EINVAL
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
    # pgd_entry / p4d_entry / pud_entry as one (walk_page_range_novma() only): called
    # for a present non-table entry above the pmd level (a leaf), at ``walk.level``
    pud_entry: Callable[..., Awaitable[int]] | None = None


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
    no_vma: bool = False                # walk_page_range_novma(): tables without VMAs
    level: int = -1                     # novma: the level whose entry a callback is given


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


async def walk_page_range_novma(k, mm, start: int, end: int, ops: MmWalkOps,
                                private: Any = None) -> int:
    """walk_page_range_novma(): walk ``mm``'s tables over [start, end) whatever VMAs there
    are (``walk.vma`` stays None; ptdump walks init_mm and, on x86, a user mm this way).
    The caller holds mmap_lock (ptdump: for write). -EINVAL for an empty range. On
    init_mm the PTE tables are reached with pte_offset_kernel(); on a user mm with
    pte_offset_map(), whose failure is ACTION_AGAIN (RETRY), as in walk_page_range()."""
    if start >= end or mm is None:
        return -EINVAL
    walk = MmWalk(k, mm, ops, private, no_vma=True)
    return await walk_pgd_range(k, walk, mm.pgd, 0, start, end)


async def walk_pgd_range(k, walk: MmWalk, table: int, level: int, addr: int, end: int) -> int:
    """walk_pgd_range() -> walk_p4d_range() -> walk_pud_range() of a no-VMA walk, one
    level per call: a none entry is a hole for its whole span (so a sparse 2^48-byte
    space costs one read per empty upper entry), a leaf goes to ``pud_entry``, a table
    is descended into, and the pmd level is walk_pmd_range()."""
    arch, ops = k.arch, walk.ops
    span = arch.levels[level].span
    while addr < end:
        nxt = min(end, (addr | (span - 1)) + 1)
        entp = pgtable.entry_addr(k, table, level, addr)
        walk.level = level
        if level == arch.pmd_level:
            err = await walk_pmd_range(k, walk, entp, addr, nxt)
        else:
            ent = await pgtable.get_entry(k, entp, level)
            if ent.kind is Kind.TABLE:
                err = await walk_pgd_range(k, walk, ent.paddr, level + 1, addr, nxt)
            elif ent.kind is Kind.NONE:
                err = await ops.pte_hole(addr, nxt, walk) if ops.pte_hole else 0
            else:
                err = await ops.pud_entry(entp, addr, nxt, walk) if ops.pud_entry else 0
        if err:
            return err
        addr = nxt
    return 0


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
        # only break down a huge pmd when the PTEs are needed: a walk with a VMA splits
        # it (split_huge_pmd() looks first), one without descends into tables only
        cur = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
        if walk.no_vma:
            if cur.kind is not Kind.TABLE:                 # pmd_leaf() || !pmd_present()
                return 0
        elif cur.kind is Kind.LEAF:                        # (a migration pmd is not split here)
            from mm_core.huge_memory import split_huge_pmd
            await split_huge_pmd(k, walk.vma, pmdp, addr)
        err = await walk_pte_range(k, walk, pmdp, addr, end)
        if err:
            return err
        if walk.action == ACTION_AGAIN:
            walk.retries += 1
            await sched_point("retry", pmdp)
            continue
        return 0


async def walk_pte_range(k, walk: MmWalk, pmdp: int, addr: int, end: int) -> int:
    """walk_pte_range(): map with the lock; a failed map is ACTION_AGAIN (RETRY). Without
    a VMA: init_mm's table by pte_offset_kernel() (cannot fail, no unmap), a user table by
    pte_offset_map() without the ptl (a failed map is ACTION_AGAIN as well)."""
    if walk.no_vma:
        if walk.mm is k.init_mm or "novma_walk_maps_user_table_as_kernel" in k.bugs:
            pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
            return await walk_pte_range_inner(k, walk, pgtable.pte_offset_kernel(k, pmdval, addr),
                                              addr, end)
        ptep = await pgtable.pte_offset_map(k, pmdp, addr)
        if ptep is None:
            walk.action = ACTION_AGAIN
            return 0
        err = await walk_pte_range_inner(k, walk, ptep, addr, end)
        await pgtable.pte_unmap(k, ptep)
        return err
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None:
        walk.action = ACTION_AGAIN
        return 0
    ptep, ptl = locked
    err = await walk_pte_range_inner(k, walk, ptep, addr, end)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return err


async def walk_pte_range_inner(k, walk: MmWalk, ptep: int, addr: int, end: int) -> int:
    """walk_pte_range_inner(): ``pte_entry`` for each PTE of [addr, end)."""
    err = 0
    for a in range(addr, end, k.page_size):
        err = await walk.ops.pte_entry(ptep + ((a - addr) >> k.page_shift) * 8, a, a + k.page_size, walk)
        if err:
            break
    return err
