"""userfaultfd's UFFDIO_COPY core (mm/userfaultfd.c), as far as the page-table rules go:
mfill_atomic_pte_copy() -> mfill_atomic_install_pte() installs an anon page into a
private mapping holding only mmap_read_lock and the ptl, with no folio lock. That is why
collapse_pte_mapped_thp() must keep the ptl from emptying a table until its pmd is gone.
"""
from __future__ import annotations

from emu.arch import Access, Kind, leaf_entry
from mm_core import pgtable
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mm import MM_ANONPAGES, VM_SHARED, VM_WRITE
from mm_core.page_alloc import OutOfMemory, PageUse

EAGAIN, ENOENT, ENOMEM, EEXIST = 11, 2, 12, 17


async def mfill_atomic_copy(k, mm, dst: int, data: bytes) -> int:
    """UFFDIO_COPY of one page into a private mapping: 0, or -EAGAIN when the PTE table
    could not be mapped (the caller retries), -EEXIST when a pte is already there."""
    await mmap_read_lock(mm)
    try:
        vma = mm.vma_lookup(dst)
        if vma is None or vma.flags & VM_SHARED:
            return -ENOENT
        dst &= ~(k.page_size - 1)
        vma.anon_vma = True                            # anon_vma_prepare()
        try:
            page = k.alloc.alloc_pages(k.page_order, PageUse.ANON, owner=mm)
        except OutOfMemory:
            return -ENOMEM
        k.physmem.write(page.paddr, data[:k.page_size])
        ret = await mfill_atomic_install_pte(k, vma, dst, page)
        if ret:
            k.alloc.free_pages(page)
        return ret
    finally:
        await mmap_read_unlock(mm)


async def mfill_atomic_install_pte(k, vma, dst: int, page) -> int:
    """mfill_atomic_install_pte(): map ``page`` at ``dst`` under the ptl; a failed map is
    -EAGAIN to the caller (RETRY / -EAGAIN category)."""
    mm, arch = vma.mm, k.arch
    pmdp = await pgtable.walk_alloc(k, mm, dst, arch.pmd_level)
    if pmdp is None or not await pgtable.pte_alloc(k, mm, pmdp):
        return -EAGAIN
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, dst)
    if locked is None:
        k.stats["mfill_eagain"] += 1
        return -EAGAIN
    ptep, ptl = locked
    if (await pgtable.get_entry(k, ptep, arch.pte_level)).kind is not Kind.NONE:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return -EEXIST
    prot = Access.R | (Access.W if vma.flags & VM_WRITE else Access.NONE)
    page.mapcount = 1
    mm.rss[MM_ANONPAGES] += 1
    await pgtable.set_entry(k, ptep, arch.pte_level,
                            pgtable.pte_mkdirty(k, leaf_entry(page.paddr, prot, young=True)))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    k.stats["uffdio_copy"] += 1
    return 0
