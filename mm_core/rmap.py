"""Reverse mapping for file pages (mm/rmap.c, mm/page_vma_mapped.c, reduced): find the PTEs
of every VMA that maps a page-cache folio and unmap them (try_to_unmap)."""
from __future__ import annotations

from emu.arch import Kind
from emu.sched import traps
from mm_core import pgtable
from mm_core.tlbflush import flush_tlb_range


def vma_address(vma, index: int) -> int | None:
    """vma_address(): where file page ``index`` is mapped in ``vma`` (None: not in it)."""
    addr = vma.start + ((index - vma.pgoff) << vma.mm.kernel.page_shift)
    return addr if vma.start <= addr < vma.end else None


async def walk_to_pmd(k, mm, addr: int) -> int | None:
    """mm_find_pmd(): the pmd entry address for ``addr`` if the upper tables exist."""
    table = mm.pgd
    for level in range(k.arch.pmd_level):
        ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, addr), level)
        if ent.kind is not Kind.TABLE:
            return None
        table = ent.paddr
    return pgtable.entry_addr(k, table, k.arch.pmd_level, addr)


async def try_to_unmap_file_page(k, folio, index: int) -> int:
    """try_to_unmap() of page ``index`` of a small page-cache folio: clear every PTE that
    maps it (page_vma_mapped_walk with PVMW_SYNC: pte_offset_map_lock; a failed map means
    the table is gone, so nothing to unmap there). Returns how many were unmapped."""
    from mm_core.memory import _put_mapped_page
    mapping, arch = folio.mapping, k.arch
    paddr = folio.paddr + ((index - folio.index) << k.page_shift)
    unmapped = 0
    await traps.lock(mapping.i_mmap_rwsem, "r")
    try:
        for vma in list(mapping.i_mmap):
            addr = vma_address(vma, index)
            if addr is None:
                continue
            pmdp = await walk_to_pmd(k, vma.mm, addr)
            if pmdp is None:
                continue
            locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
            if locked is None:
                continue
            ptep, ptl = locked
            ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
            if ent.kind is Kind.LEAF and ent.paddr == paddr:
                await pgtable.clear_entry(k, ptep, arch.pte_level)       # ptep_clear_flush()
                await flush_tlb_range(k, vma.mm, addr, addr + k.page_size)
                _put_mapped_page(k, vma.mm, folio)
                unmapped += 1
            await pgtable.pte_unmap_unlock(k, ptep, ptl)
    finally:
        await traps.unlock(mapping.i_mmap_rwsem, "r")
    return unmapped
