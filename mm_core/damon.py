"""DAMON's virtual-address access checks (mm/damon/vaddr.c): mark pages old, later see
whether they became young again, through walk_page_range().

``damon_mkold_pmd_entry`` (prepare_access_checks) and ``damon_young_pmd_entry``
(check_accesses) map the PTE table with pte_offset_map_lock(). Since the 6.5 series a
failed map asked for ACTION_AGAIN (RETRY); on a pmd that stays a migration entry that
retries forever (a soft lockup, fixed in 2025 by "mm/damon/vaddr: do not repeat
pte_offset_map_lock() until success", which changed both): they now skip the pmd (SKIP).
The old behaviour is the bug injection ``damon_endless_again``.
"""
from __future__ import annotations

from emu.arch import Kind
from emu.sched import traps
from mm_core import pagewalk, pgtable
from mm_core.locks import mmap_read_lock, mmap_read_unlock


async def damon_mkold_pmd_entry(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """damon_mkold_pmd_entry(): clear young on a huge pmd, or on each present pte."""
    k, arch = walk.k, walk.k.arch
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind is Kind.LEAF:
        pml = await pgtable.pmd_lock(k, walk.mm, pmdp)
        cur = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        if cur.kind is Kind.LEAF and cur.young:
            await pgtable.set_entry(k, pmdp, arch.pmd_level, cur.with_(young=False))   # damon_pmdp_mkold
            walk.stats["mkold"] = walk.stats.get("mkold", 0) + 1
        await traps.unlock(pml)
        walk.action = pagewalk.ACTION_CONTINUE
        return 0
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None:
        if "damon_endless_again" in k.bugs:
            walk.action = pagewalk.ACTION_AGAIN           # the pre-2025 RETRY
        else:
            walk.action = pagewalk.ACTION_CONTINUE        # SKIP this pmd
        return 0
    ptep, ptl = locked
    for a in range(addr, end, k.page_size):
        entp = ptep + ((a - addr) >> k.page_shift) * 8
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, entp))
        if ent.kind is Kind.LEAF and ent.young:
            await pgtable.set_entry(k, entp, arch.pte_level, ent.with_(young=False))  # damon_ptep_mkold
            walk.stats["mkold"] = walk.stats.get("mkold", 0) + 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    walk.action = pagewalk.ACTION_CONTINUE
    return 0


DAMON_MKOLD_OPS = pagewalk.MmWalkOps(pmd_entry=damon_mkold_pmd_entry)


async def damon_va_mkold(k, mm, start: int, end: int) -> int:
    """damon_va_mkold(): one aging pass over [start, end) under mmap_read_lock."""
    await mmap_read_lock(mm)
    try:
        return await pagewalk.walk_page_range(k, mm, start, end, DAMON_MKOLD_OPS)
    finally:
        await mmap_read_unlock(mm)


async def damon_young_pmd_entry(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """damon_young_pmd_entry(): was the page at ``addr`` accessed since it was made old?
    A huge pmd is looked at under its lock (not present: no answer; no longer huge: fall
    to the PTE); the PTE under pte_offset_map_lock(), whose failure is SKIP (RETRY before
    the 2025 fix). The answer goes to walk.private: {"young": bool, "page_sz": int}."""
    k, arch = walk.k, walk.k.arch
    priv = walk.private
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind is Kind.LEAF:                            # pmd_trans_huge(pmdp_get(pmd))
        pml = await pgtable.pmd_lock(k, walk.mm, pmdp)
        cur = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        if cur.kind is Kind.LEAF:
            priv["young"] = priv["young"] or cur.young
            priv["page_sz"] = arch.levels[arch.pmd_level].span
            await traps.unlock(pml)
            return 0
        await traps.unlock(pml)
        if cur.kind is not Kind.TABLE:                    # !pmd_present(pmde): no answer
            return 0
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)   # regular_page:
    if locked is None:
        if "damon_endless_again" in k.bugs:
            walk.action = pagewalk.ACTION_AGAIN           # the pre-2025 RETRY
        return 0                                          # SKIP
    ptep, ptl = locked
    ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
    if ent.kind is Kind.LEAF:
        priv["young"] = priv["young"] or ent.young
        priv["page_sz"] = k.page_size
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


DAMON_YOUNG_OPS = pagewalk.MmWalkOps(pmd_entry=damon_young_pmd_entry)


async def damon_va_young(k, mm, addr: int) -> tuple[bool, int]:
    """damon_va_young(): one access check of the sampling address under mmap_read_lock;
    returns (young, the size of the page that answered)."""
    priv = {"young": False, "page_sz": k.page_size}
    await mmap_read_lock(mm)
    try:
        await pagewalk.walk_page_range(k, mm, addr, addr + 1, DAMON_YOUNG_OPS, priv)
    finally:
        await mmap_read_unlock(mm)
    return priv["young"], priv["page_sz"]
