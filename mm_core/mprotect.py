"""mprotect (mm/mprotect.c): change VMA flags and rewrite the PTEs in place."""
from __future__ import annotations

from emu.arch import Access, Kind
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import huge_memory, memory, pgtable
from mm_core.locks import mmap_write_lock, mmap_write_unlock
from mm_core.mm import (
    VM_ACCESS_FLAGS,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_SHARED,
    VM_WRITE,
    VMA,
    MMStruct,
)
from mm_core.mmap import EACCES, EINVAL, ENOMEM, calc_vm_prot_bits, page_align, split_range
from mm_core.page_alloc import PageUse
from mm_core.tlbflush import flush_tlb_range

EAGAIN = 11


async def do_mprotect(k, mm: MMStruct, start: int, length: int, prot: int) -> int:
    """do_mprotect_pkey(): 0 or -errno (-ENOMEM when part of the range is unmapped)."""
    if start % k.page_size:
        return -EINVAL
    end = start + page_align(length, k.page_size)
    if end <= start:
        return 0 if length == 0 else -EINVAL
    newflags = calc_vm_prot_bits(prot)
    await mmap_write_lock(mm)
    try:
        covered, addr = True, start
        for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
            covered &= vma.start <= addr
            addr = vma.end
        if not covered or addr < end:
            return -ENOMEM
        for vma in mm.overlapping(start, end):
            may = (vma.flags & (VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC)) >> 4
            if newflags & ~may:
                return -EACCES
        for vma in split_range(mm, start, end):     # mprotect_fixup()
            vma.flags = (vma.flags & ~VM_ACCESS_FLAGS) | newflags
            await change_protection(k, vma, vma.start, vma.end)
        mm.merge_adjacent()
        return 0
    finally:
        await mmap_write_unlock(mm)


async def change_protection(k, vma: VMA, start: int, end: int) -> None:
    """change_protection() -> change_pmd_range() -> change_pte_range(), then flush."""
    async for pmdp, lo, hi in memory.for_each_pmd(k, vma.mm, start, end):
        await change_pmd_range(k, vma, pmdp, lo, hi)
    await flush_tlb_range(k, vma.mm, start, end)


async def change_pmd_range(k, vma: VMA, pmdp: int, start: int, end: int, prot_numa: bool = False) -> None:
    """change_pmd_range() for one pmd: none is skipped, a PMD leaf covered whole changes in
    place (change_huge_pmd) or is split, a table goes to change_pte_range, whose -EAGAIN
    (map failure) means: look at this pmd again (RETRY)."""
    arch = k.arch
    size = arch.levels[arch.pmd_level].span
    while True:
        pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        if pmdval.kind is Kind.NONE:
            return
        if pmdval.kind is Kind.LEAF:
            if prot_numa:
                return              # change_huge_pmd(MM_CP_PROT_NUMA): not modelled, left as it is
            if start & (size - 1) == 0 and end - start == size:
                if await change_huge_pmd(k, vma, pmdp, pmdval):
                    return
            else:
                await huge_memory.split_huge_pmd(k, vma, pmdp, start)
            continue
        if pmdval.kind is not Kind.TABLE:
            return
        if await change_pte_range(k, vma, pmdp, start, end, prot_numa) != -EAGAIN:
            return
        k.stats["change_pmd_retry"] += 1
        await sched_point("retry", pmdp)


async def change_huge_pmd(k, vma: VMA, pmdp: int, pmdval) -> bool:
    """change_huge_pmd(): new protection on a PMD leaf, under pml."""
    mm, arch = vma.mm, k.arch
    pml = await pgtable.pmd_lockptr(k, mm, pmdp)
    await traps.lock(pml)
    try:
        if await pgtable.get_entry(k, pmdp, arch.pmd_level) != pmdval:
            return False
        prot = memory.vm_get_page_prot(vma.flags)
        folio = k.alloc.page_of(pmdval.paddr)
        if (vma.flags & VM_WRITE and pmdval.dirty and folio is not None and folio.use is PageUse.ANON
                and folio.refcount == 1):
            prot |= Access.W
        await pgtable.set_entry(k, pmdp, arch.pmd_level, pmdval.with_(prot=prot))
        return True
    finally:
        await traps.unlock(pml)


async def change_pte_range(k, vma: VMA, pmdp: int, start: int, end: int, prot_numa: bool = False) -> int:
    """change_pte_range(): rewrite present PTEs with the VMA's new protection. Write stays
    only where it needs no fault (shared mapping, or a dirty exclusive anon page:
    can_change_pte_writable()). -EAGAIN when the PTE table cannot be mapped.
    ``prot_numa`` (MM_CP_PROT_NUMA, change_prot_numa()): PAGE_NONE instead, skipping ptes
    already protnone, special and KSM pages, shared COW pages, dirty file pages, and pages
    already on the node a single-threaded private mapping runs on (every page, with one
    node). Returns the ptes changed."""
    mm, arch = vma.mm, k.arch
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, start)
    if locked is None:
        return -EAGAIN
    ptep, ptl = locked
    base = memory.vm_get_page_prot(vma.flags)
    single_node_target = prot_numa and not vma.flags & VM_SHARED and mm.users == 1
    pages = 0
    for addr in range(start, end, k.page_size):
        entp = ptep + ((addr - start) >> k.page_shift) * 8
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, entp))
        if ent.kind is not Kind.LEAF:
            continue
        if prot_numa:
            if memory.pte_protnone(ent) or ent.special:
                continue
            page = k.alloc.page_of(ent.paddr)
            if page is None or page.extra.get("ksm"):
                continue
            if vma.flags & VM_MAYWRITE and not vma.flags & VM_SHARED and page.refcount != 1:
                continue                                   # is_cow_mapping() && page_count() != 1
            if page.use is PageUse.FILE and (page.extra.get("dirty") or ent.dirty):
                continue                                   # page_is_file_lru() && PageDirty()
            if single_node_target:
                continue                                   # target_node == page_to_nid(page)
            await pgtable.set_entry(k, entp, arch.pte_level, ent.with_(prot=Access.NONE))
            k.stats["numa_pte_updates"] += 1
            pages += 1
            continue
        prot = base
        if vma.flags & VM_WRITE and not vma.flags & VM_SHARED and ent.dirty and not ent.special:
            page = k.alloc.page_of(ent.paddr)
            if page is not None and page.use is PageUse.ANON and page.refcount == 1:
                prot |= Access.W
        if ent.special:
            prot &= ~Access.W
        if prot != ent.prot:
            await pgtable.set_entry(k, entp, arch.pte_level, ent.with_(prot=prot))
            pages += 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return pages
