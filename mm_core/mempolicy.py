"""NUMA hinting (mm/mempolicy.c change_prot_numa(), kernel/sched/fair.c task_numa_work()).

    task_numa_work()    under mmap_read_lock, every VMA that NUMA balancing may migrate:
                        change_prot_numa() over it
    change_prot_numa()  change_protection(MM_CP_PROT_NUMA): present ptes become PAGE_NONE
                        (the arch's PROT_NONE encoding: present to Linux, inaccessible to
                        the MMU), so that the next access takes a NUMA hinting fault,
                        do_numa_page() (mm_core/memory.py)

The machine has one node, so do_numa_page() never migrates; it only restores the
protection. Not modelled: the scan window and period (numa_scan_offset, scan size, the
rate limits: one call scans the whole mm), vma_is_accessed()'s per-VMA access history,
huge pmds (change_huge_pmd(MM_CP_PROT_NUMA) and do_huge_pmd_numa_page()), memory tiering.
"""
from __future__ import annotations

from mm_core import memory, mprotect
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mm import VM_READ, VM_WRITE, VMA
from mm_core.tlbflush import flush_tlb_range

VM_IO, VM_PFNMAP = 0x4000, 0x400


async def change_prot_numa(k, vma: VMA, start: int, end: int) -> int:
    """change_prot_numa(): change_protection(MM_CP_PROT_NUMA): make the present ptes of
    [start, end) PAGE_NONE (RETRY on a failed map, as change_pmd_range() does for
    mprotect); returns how many changed. The TLB is flushed only if some did."""
    updated = 0
    async for pmdp, lo, hi in memory.for_each_pmd(k, vma.mm, start, end):
        ret = await mprotect.change_pmd_range(k, vma, pmdp, lo, hi, mprotect.MM_CP_PROT_NUMA)
        updated += max(ret, 0)
    if updated:
        await flush_tlb_range(k, vma.mm, start, end)       # tlb_finish_mmu()
    return updated


def vma_migratable(vma: VMA) -> bool:
    return not vma.flags & (VM_IO | VM_PFNMAP)


async def task_numa_work(k, mm) -> int:
    """task_numa_work() reduced to one full scan: every migratable, accessible VMA but
    read-only file mappings (shared libraries, expected to be cache-replicated) gets
    change_prot_numa(). Returns the ptes changed."""
    total = 0
    await mmap_read_lock(mm)
    try:
        for vma in list(mm.vmas):
            if not vma_migratable(vma) or not memory.vma_is_accessible(vma):
                continue
            if vma.file is not None and vma.flags & (VM_READ | VM_WRITE) == VM_READ:
                continue
            total += await change_prot_numa(k, vma, vma.start, vma.end)
    finally:
        await mmap_read_unlock(mm)
    k.stats["numa_scans"] += 1
    return total
