"""PT_RECLAIM (6.14, mm/pt_reclaim.c): MADV_DONTNEED frees the PTE tables it emptied.

    try_to_free_pte()   under pml and the table's ptl (nested), check that every pte is
                        none, clear the pmd, then free the table after a grace period
                        (pte_free_tlb with RCU table freeing: a pte_free_defer here)

A second remover of PTE tables that holds only mmap_read_lock (after retract_page_tables):
whoever mapped the table before (pte_offset_map*) and writes into it after taking its ptl
must recheck pmd_same(), since a none pte proves nothing about a detached table. That is
why 6.14 made move_pages_pte() recheck its dst pmd ("mm: userfaultfd: recheck dst_pmd entry
in move_pages_pte()", a prerequisite of this series). Modelled on every arch (Linux 6.14
offers PT_RECLAIM on x86_64 only).

The fast path (zap_pte_range(), still holding the ptl it zapped under, every pte of the
whole PMD extent zapped, none skipped): try_get_and_clear_pmd() spin_trylock()s the pml
and clears the pmd there; after pte_unmap_unlock() free_pte() frees the table. When the
trylock fails (pml contended, or pml is the ptl itself: no split PTE locks) zap_pte_range()
falls back to try_to_free_pte(), which takes pml, then the ptl, and rescans the table.
"""
from __future__ import annotations

from emu.arch import Kind
from emu.sched import traps
from mm_core import pgtable
from mm_core.pgalloc import pte_free_defer
from mm_core.tlbflush import flush_tlb_range


async def try_get_and_clear_pmd(k, mm, pmdp: int):
    """try_get_and_clear_pmd() (6.14), called under the PTE table's ptl: spin_trylock()
    the pml (GIVEUP on contention: the caller takes the slow path), read the pmd
    (pmdp_get_lockless) and pmd_clear() it. Returns the old pmd value, or None."""
    arch = k.arch
    pml = await pgtable.pmd_lockptr(k, mm, pmdp)
    if not await traps.trylock(pml):
        k.stats["pt_reclaim_trylock_failed"] += 1
        return None
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    await pgtable.clear_entry(k, pmdp, arch.pmd_level)                 # pmd_clear()
    await traps.unlock(pml)
    pt = k.ptdescs.get(pmdval.paddr) if pmdval.kind is Kind.TABLE else None
    if pt is not None:
        pt.state = "detached"
        pt.note(k, "detached by try_get_and_clear_pmd (PT_RECLAIM fast path)")
    return pmdval


async def free_pte(k, mm, addr: int, pmdval) -> None:
    """free_pte(): pte_free_tlb() of the table the fast path detached (after the flush,
    RCU-freed: a pte_free_defer here), mm_dec_nr_ptes()."""
    arch = k.arch
    span = arch.levels[arch.pmd_level].span
    start = addr & ~(span - 1)
    await flush_tlb_range(k, mm, start, start + span)
    pt = k.ptdescs.get(pmdval.paddr) if pmdval.kind is Kind.TABLE else None
    if pt is not None:
        await pte_free_defer(k, pt)
    k.stats["pt_reclaimed"] += 1
    k.stats["pt_reclaimed_fast"] += 1


async def try_to_free_pte(k, mm, pmdp: int, addr: int) -> bool:
    """try_to_free_pte(): free the PTE table under ``pmdp`` if it is (still) empty.
    GIVEUP (leave it) if the map fails or a pte is not none."""
    arch = k.arch
    pml = await pgtable.pmd_lock(k, mm, pmdp)
    mapped = await pgtable.pte_offset_map_rw_nolock(k, mm, pmdp, addr)
    if mapped is None:
        await traps.unlock(pml)
        return False
    ptep, ptl, pmdval = mapped
    if ptl is not pml:
        await traps.lock(ptl)                   # spin_lock_nested(SINGLE_DEPTH_NESTING)
    lv = arch.levels[arch.pte_level]
    base = lv.table_base(ptep)
    empty = arch.empty_value(arch.pte_level)
    await pgtable.get_raw(k, base)              # the scan, under the ptl (one access for the sanitizers)
    if any(value != empty for value in k.physmem.read_entries(base, lv.entries)):
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        if ptl is not pml:
            await traps.unlock(pml)
        return False
    await pgtable.pte_unmap(k, ptep)
    await pgtable.clear_entry(k, pmdp, arch.pmd_level)                 # pmd_clear()
    pt = k.ptdescs.get(pmdval.paddr) if pmdval.kind is Kind.TABLE else None
    if pt is not None:
        pt.state = "detached"
        pt.note(k, "detached by try_to_free_pte (PT_RECLAIM)")
    if ptl is not pml:
        await traps.unlock(ptl)
    await traps.unlock(pml)
    span = arch.levels[arch.pmd_level].span
    start = addr & ~(span - 1)
    await flush_tlb_range(k, mm, start, start + span)
    if pt is not None:
        await pte_free_defer(k, pt)             # free_pte(): tlb_remove_ptdesc, RCU-freed
    k.stats["pt_reclaimed"] += 1
    return True
