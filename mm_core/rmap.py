"""Reverse mapping for file pages (mm/rmap.c, reduced): find the PTEs of every VMA that
maps a page-cache folio (page_vma_mapped_walk, mm_core/page_vma_mapped.py) and unmap
them (try_to_unmap)."""
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
    """try_to_unmap() of page ``index`` of a small page-cache folio: rmap_walk_file() over
    i_mmap, try_to_unmap_one() in each VMA: page_vma_mapped_walk() (collapse_file() passes
    no TTU_SYNC, so pte_offset_map_nolock(), a lockless look, then the ptl; a failed map
    rereads the pmd, and a retracted table means nothing to unmap there) and clear every
    pte it finds. Returns how many were unmapped."""
    from mm_core.memory import _put_mapped_page
    from mm_core.page_vma_mapped import PageVmaMappedWalk, page_vma_mapped_walk
    mapping, arch = folio.mapping, k.arch
    paddr = folio.paddr + ((index - folio.index) << k.page_shift)
    unmapped = 0
    await traps.lock(mapping.i_mmap_rwsem, "r")
    try:
        for vma in list(mapping.i_mmap):
            addr = vma_address(vma, index)
            if addr is None:
                continue
            pvmw = PageVmaMappedWalk(paddr, 1, vma, addr)
            while await page_vma_mapped_walk(k, pvmw):
                await pgtable.clear_entry(k, pvmw.pte, arch.pte_level)      # ptep_clear_flush()
                await flush_tlb_range(k, vma.mm, pvmw.address, pvmw.address + k.page_size)
                _put_mapped_page(k, vma.mm, folio)
                unmapped += 1
    finally:
        await traps.unlock(mapping.i_mmap_rwsem, "r")
    return unmapped
