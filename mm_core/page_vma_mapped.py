"""page_vma_mapped_walk() (mm/page_vma_mapped.c, v6.6; the 6.13 pmd_same rechecks under
the 6.13 profile): where, in one VMA, does a folio's range of pfns appear mapped?

The rmap users (try_to_unmap_one, folio_referenced_one, ...) loop::

    pvmw = PageVmaMappedWalk(paddr, nr_pages, vma, address)
    while await page_vma_mapped_walk(k, pvmw):
        ...  # pvmw.pte (or, for a PMD mapping, pvmw.pte is None and pvmw.pmd) under pvmw.ptl

Failure handling: a pmd that is none (or not present) is stepped over (``step_forward``:
nothing mapped there); a huge pmd or a migration pmd is looked at again under the pmd
lock (it may have been split meanwhile: then the pte level); ``map_pte()`` uses
pte_offset_map_lock() with PVMW_SYNC, else pte_offset_map_nolock() and a lockless look
at the first pte before spin_lock(ptl). When the map itself fails (the table was
retracted or the pmd became huge) the walk goes back to ``restart`` and reads the pmd
again (RETRY); a retracted pmd is none by then, so the range is simply not found.
A table boundary unmaps and restarts with the next pmd.

Not modelled: hugetlb VMAs, device-private / device-exclusive swap entries (never
matched), the 6.6 PVMW_SYNC take-and-drop of the pmd lock only matters with THP zap.
"""
from __future__ import annotations

from dataclasses import dataclass

from emu.arch import PAGE_SHIFT, Kind
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import huge_memory, pgtable
from mm_core.locks import SpinLock

PVMW_SYNC = 1 << 0           # look at the pmd/pte under their locks only
PVMW_MIGRATION = 1 << 1      # look for migration entries, not present mappings


@dataclass(eq=False)
class PageVmaMappedWalk:
    """struct page_vma_mapped_walk: the folio's pfn range (as a physical address and a
    count of base pages), the VMA, the address to start at; the walk's cursor (pmd,
    pte, ptl) after each hit."""

    paddr: int
    nr_pages: int
    vma: object
    address: int
    flags: int = 0
    pmd: int | None = None
    pte: int | None = None
    ptl: SpinLock | None = None
    _nolock_ptl: SpinLock | None = None
    _pmdval: object = None
    _end: int = 0


def folio_vma_walk(k, folio, vma, address: int, flags: int = 0) -> PageVmaMappedWalk:
    """DEFINE_FOLIO_VMA_WALK()."""
    return PageVmaMappedWalk(folio.paddr, folio.nr_pages >> k.page_order, vma, address, flags)


async def page_vma_mapped_walk_done(k, pvmw: PageVmaMappedWalk) -> None:
    """page_vma_mapped_walk_done(): unmap the pte, drop the lock."""
    if pvmw.pte is not None:
        await pgtable.pte_unmap(k, pvmw.pte)
    if pvmw.ptl is not None:
        await traps.unlock(pvmw.ptl)
        pvmw.ptl = None


async def not_found(k, pvmw: PageVmaMappedWalk) -> bool:
    await page_vma_mapped_walk_done(k, pvmw)
    return False


def _in_range(k, pvmw: PageVmaMappedWalk, paddr: int, size: int) -> bool:
    """check_pte()'s ``pfn - pvmw->pfn < nr_pages`` and check_pmd()'s overlap test."""
    lo, hi = pvmw.paddr, pvmw.paddr + (pvmw.nr_pages << k.page_shift)
    return paddr < hi and paddr + size > lo


async def check_pte(k, pvmw: PageVmaMappedWalk) -> bool:
    """check_pte(): does the pte (read under the ptl) map one of our pfns? With
    PVMW_MIGRATION: is it a migration entry for one of them?"""
    arch = k.arch
    pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte))
    if pvmw.flags & PVMW_MIGRATION:
        if pte.kind is not Kind.MIGRATION:
            return False
        paddr = pte.swp_offset << PAGE_SHIFT                   # swp_offset_pfn()
    elif pte.kind is not Kind.LEAF:                            # swap / device entries, none
        return False
    else:
        paddr = pte.paddr
    return _in_range(k, pvmw, paddr, k.page_size)


async def map_pte(k, pvmw: PageVmaMappedWalk) -> bool:
    """map_pte(): PVMW_SYNC maps with pte_offset_map_lock(); otherwise
    pte_offset_map_nolock() (6.13: _rw_nolock), a lockless look at the pte, and
    spin_lock(ptl) only if it may be ours (6.13: then pmd_same(), or map again).
    False with pvmw.pte None: the map failed; False with pvmw.pte set: mapped, unlocked,
    this pte is not ours (the caller scans on)."""
    mm, arch = pvmw.vma.mm, k.arch
    if pvmw.flags & PVMW_SYNC:
        locked = await pgtable.pte_offset_map_lock(k, mm, pvmw.pmd, pvmw.address)
        pvmw.pte, pvmw.ptl = locked if locked is not None else (None, None)
        pvmw._nolock_ptl = pvmw.ptl
        return locked is not None
    while True:                                                # again:
        mapped = await pgtable.pte_offset_map_for_write_nolock(k, mm, pvmw.pmd, pvmw.address)
        if mapped is None:
            pvmw.pte = None
            return False
        pvmw.pte, pvmw._nolock_ptl, pvmw._pmdval = mapped
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte))
        if pvmw.flags & PVMW_MIGRATION:
            if pte.kind not in (Kind.SWAP, Kind.MIGRATION):    # !is_swap_pte()
                return False
        elif pte.kind is not Kind.LEAF:                        # swap entries, none
            return False
        await traps.lock(pvmw._nolock_ptl)
        if k.profile.rw_nolock and not pgtable.pmd_same(k, pvmw._pmdval,
                                                        await pgtable.pmdp_get_lockless(k, pvmw.pmd)):
            await pgtable.pte_unmap_unlock(k, pvmw.pte, pvmw._nolock_ptl)
            k.stats["pvmw_pmd_changed"] += 1
            continue
        pvmw.ptl = pvmw._nolock_ptl
        return True


def _step_forward(pvmw: PageVmaMappedWalk, size: int) -> None:
    """step_forward(): on to the next ``size``-aligned address."""
    pvmw.address = (pvmw.address + size) & ~(size - 1)


async def page_vma_mapped_walk(k, pvmw: PageVmaMappedWalk) -> bool:
    """page_vma_mapped_walk(): True with the next mapping of the folio in the VMA locked
    (pvmw.pte and pvmw.ptl; for a PMD mapping pvmw.pte is None and pvmw.ptl is the pmd
    lock); False (everything released) when there is none left."""
    arch, vma = k.arch, pvmw.vma
    mm = vma.mm
    pmd_size = arch.levels[arch.pmd_level].span
    page = k.page_size
    if pvmw.pmd is not None and pvmw.pte is None:              # the pmd mapping was the only one
        return await not_found(k, pvmw)
    if not pvmw._end:                                          # vma_address_end()
        pvmw._end = min(vma.end, pvmw.address + (pvmw.nr_pages << k.page_shift))
    end = pvmw._end
    next_pte = pvmw.pte is not None
    while True:                                                # restart:
        if not next_pte:
            if pvmw.address >= end:
                return False
            table, level = mm.pgd, 0
            while level < arch.pmd_level:                      # pgd / p4d / pud present?
                ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, pvmw.address), level)
                if ent.kind is not Kind.TABLE:
                    break
                table, level = ent.paddr, level + 1
            if level < arch.pmd_level:
                _step_forward(pvmw, arch.levels[level].span)
                continue
            pvmw.pmd = pgtable.entry_addr(k, table, arch.pmd_level, pvmw.address)
            pmde = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pvmw.pmd))
            if pmde.kind in (Kind.LEAF, Kind.MIGRATION):       # pmd_trans_huge / migration
                pvmw.ptl = await pgtable.pmd_lock(k, mm, pvmw.pmd)
                pmde = await pgtable.get_entry(k, pvmw.pmd, arch.pmd_level)
                if pmde.kind in (Kind.NONE, Kind.MIGRATION, Kind.SWAP):    # !pmd_present
                    if not pvmw.flags & PVMW_MIGRATION or pmde.kind is not Kind.MIGRATION \
                            or not _in_range(k, pvmw, pmde.swp_offset << PAGE_SHIFT, pmd_size):
                        return await not_found(k, pvmw)
                    return True
                if pmde.kind is Kind.LEAF:
                    if pvmw.flags & PVMW_MIGRATION or not _in_range(k, pvmw, pmde.paddr, pmd_size):
                        return await not_found(k, pvmw)
                    return True
                await traps.unlock(pvmw.ptl)                   # split under us: the pte level
                pvmw.ptl = None
            elif pmde.kind in (Kind.NONE, Kind.SWAP):          # !pmd_present
                if pvmw.flags & PVMW_SYNC and huge_memory.thp_vma_suitable(k, vma, pvmw.address) \
                        and pvmw.nr_pages >= huge_memory.hpage_pmd_nr(k):
                    pml = await pgtable.pmd_lock(k, mm, pvmw.pmd)   # wait out a zap_huge_pmd
                    await traps.unlock(pml)
                _step_forward(pvmw, pmd_size)
                continue
            if not await map_pte(k, pvmw):
                if pvmw.pte is None:                           # the map failed: RETRY
                    k.stats["pvmw_map_failed"] += 1
                    await sched_point("retry", pvmw.pmd)
                    continue
            elif await check_pte(k, pvmw):                     # this_pte:
                return True
        next_pte = False
        while True:                                            # next_pte:
            pvmw.address += page
            if pvmw.address >= end:
                return await not_found(k, pvmw)
            if pvmw.address & (pmd_size - page) == 0:          # crossed into the next table
                if pvmw.ptl is not None:
                    await traps.unlock(pvmw.ptl)
                    pvmw.ptl = None
                await pgtable.pte_unmap(k, pvmw.pte)
                pvmw.pte = None
                break                                          # goto restart
            pvmw.pte += 8
            if arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte)).kind is Kind.NONE:
                continue
            if pvmw.ptl is None:
                await traps.lock(pvmw._nolock_ptl)
                if k.profile.rw_nolock and not pgtable.pmd_same(k, pvmw._pmdval,
                                                                await pgtable.pmdp_get_lockless(k, pvmw.pmd)):
                    await traps.unlock(pvmw._nolock_ptl)
                    await pgtable.pte_unmap(k, pvmw.pte)
                    pvmw.pte = None
                    k.stats["pvmw_pmd_changed"] += 1
                    break                                      # goto restart
                pvmw.ptl = pvmw._nolock_ptl
            if await check_pte(k, pvmw):                       # goto this_pte
                return True
