"""Faults on file/shmem mappings (mm/memory.c do_fault family, mm/filemap.c fault-around).

    do_fault -> do_read_fault   (fault-around with filemap_map_pages, then ->fault)
             -> do_cow_fault    (private mapping, write: copy into an anon page)
             -> do_shared_fault (shared mapping, write)
    finish_fault: do_set_pmd for a PMD-order folio on a none pmd, else one PTE.
"""
from __future__ import annotations

from emu.arch import Access, Kind, leaf_entry
from mm_core import huge_memory, pgtable, rmap, shmem
from mm_core.mm import VM_SHARED, VM_WRITE
from mm_core.page_alloc import OutOfMemory, PageUse

FAULT_AROUND_BYTES = 64 << 10   # fault_around_bytes
FAULT_AROUND_PAGES = 16          # with 4K pages


def linear_page_index(vma, addr: int) -> int:
    return vma.pgoff + ((addr - vma.start) >> vma.mm.kernel.page_shift)


async def do_fault(k, vmf) -> int:
    """do_fault(): a none PTE in a file-backed VMA."""
    from mm_core.memory import VM_FAULT_SIGBUS
    vma = vmf.vma
    if not isinstance(vma.file, shmem.ShmemInode):
        return VM_FAULT_SIGBUS                       # no ->fault: VM_FAULT_SIGBUS
    if not vmf.write:
        return await do_read_fault(k, vmf)
    if not vma.flags & VM_SHARED:
        return await do_cow_fault(k, vmf)
    return await do_shared_fault(k, vmf)


async def __do_fault(k, vmf):
    """->fault (shmem_fault): the folio for the faulting index, locked; None = SIGBUS; an
    int is the vm_fault_t of handle_userfault() (shmem_get_folio_gfp(): a cached page in a
    VM_UFFD_MINOR VMA is a minor fault, a hole in a VM_UFFD_MISSING VMA a missing one)."""
    from mm_core import userfaultfd
    from mm_core.mm import VM_UFFD_MINOR, VM_UFFD_MISSING
    vma = vmf.vma
    index = linear_page_index(vma, vmf.address)
    if vma.uffd_ctx is not None and index << vma.file.page_shift < vma.file.size:
        cached = shmem.filemap_get_folio(vma.file.mapping, index)
        if cached is None and index in vma.file.mapping.swap_entries:
            cached = True                             # a swap entry is no hole for uffd
        if cached is not None and vma.uffd_minor:
            return await userfaultfd.handle_userfault(k, vmf, VM_UFFD_MINOR), index
        if cached is None and vma.uffd_missing:
            return await userfaultfd.handle_userfault(k, vmf, VM_UFFD_MISSING), index
    folio = await shmem.shmem_get_folio(k, vmf.vma.file, index)
    if folio is None:
        return None, index
    await shmem.folio_lock(k, folio)
    if folio.mapping is not vmf.vma.file.mapping:    # truncated or replaced by a collapse
        shmem.folio_unlock(folio)
        return "retry", index
    if folio.order == k.page_order and folio.extra.get("hwpoison"):
        # __do_fault(): PageHWPoison(vmf->page) is VM_FAULT_HWPOISON (SIGBUS); a shmem
        # page cannot be invalidated (it is dirty), so there is no VM_FAULT_NOPAGE retry
        shmem.folio_unlock(folio)
        k.stats["fault_hwpoison"] += 1
        return None, index
    return folio, index


async def do_read_fault(k, vmf) -> int:
    from mm_core.memory import VM_FAULT_NOPAGE, VM_FAULT_SIGBUS
    # should_fault_around(): not with uffd_disable_fault_around() (VM_UFFD_WP | VM_UFFD_MINOR:
    # each page must fault on its own), nor over a marker the fault came from
    if not (vmf.vma.uffd_wp or vmf.vma.uffd_minor) and await do_fault_around(k, vmf):
        return VM_FAULT_NOPAGE
    folio, index = await __do_fault(k, vmf)
    if isinstance(folio, int):
        return folio
    if folio is None:
        return VM_FAULT_SIGBUS
    if folio == "retry":
        return 0
    ret = await finish_fault(k, vmf, folio, shmem.folio_page_paddr(folio, index), write=False)
    shmem.folio_unlock(folio)
    return ret


async def do_cow_fault(k, vmf) -> int:
    """do_cow_fault(): copy the file page into a new anon page and map that."""
    from mm_core.memory import VM_FAULT_OOM, VM_FAULT_SIGBUS
    folio, index = await __do_fault(k, vmf)
    if isinstance(folio, int):
        return folio
    if folio is None:
        return VM_FAULT_SIGBUS
    if folio == "retry":
        return 0
    try:
        anon = k.alloc.alloc_pages(k.page_order, PageUse.ANON, owner=vmf.vma.mm, zero=False)
    except OutOfMemory:
        shmem.folio_unlock(folio)
        return VM_FAULT_OOM
    k.physmem.copy(anon.paddr, shmem.folio_page_paddr(folio, index), k.page_size)
    shmem.folio_unlock(folio)
    anon.refcount = 0                  # finish_fault takes the mapping's reference
    rmap.folio_add_new_anon_rmap(k, anon, vmf.vma, vmf.address)     # anon_vma_prepare() too
    ret = await finish_fault(k, vmf, anon, anon.paddr, write=True)
    if anon.refcount == 0:
        k.alloc.free_pages(anon)
    return ret


async def do_shared_fault(k, vmf) -> int:
    from mm_core.memory import VM_FAULT_SIGBUS
    folio, index = await __do_fault(k, vmf)
    if isinstance(folio, int):
        return folio
    if folio is None:
        return VM_FAULT_SIGBUS
    if folio == "retry":
        return 0
    ret = await finish_fault(k, vmf, folio, shmem.folio_page_paddr(folio, index), write=True)
    shmem.folio_unlock(folio)
    return ret


async def finish_fault(k, vmf, folio, paddr: int, write: bool) -> int:
    """finish_fault(): map the page (or the whole PMD-order folio) the fault found.
    A failed map is FAULT-RETRY (VM_FAULT_NOPAGE), so is a pte that changed
    (vmf_pte_changed()). A fault on a uffd-wp marker installs the pte write-protected with
    the uffd-wp bit (set_pte_range(): pte_mkuffd_wp()), so the write faults again and
    reaches the userfaultfd."""
    from mm_core.memory import (
        VM_FAULT_NOPAGE,
        VM_FAULT_OOM,
        add_mapped_page,
        vm_get_page_prot,
        vmf_pte_changed,
    )
    from mm_core.swapops import pte_marker_uffd_wp
    vma, mm, arch = vmf.vma, vmf.vma.mm, k.arch
    pmdval = await pgtable.get_entry(k, vmf.pmd, arch.pmd_level)
    if pmdval.kind is Kind.NONE:
        if folio.order == huge_memory.hpage_pmd_order(k) and folio.use is not PageUse.ANON:
            if await huge_memory.do_set_pmd(k, vmf, folio):
                return 0
        if not await pgtable.pte_alloc(k, mm, vmf.pmd):
            return VM_FAULT_OOM
    locked = await pgtable.pte_offset_map_lock(k, mm, vmf.pmd, vmf.address)
    if locked is None:
        k.stats["fault_retry_map_failed"] += 1
        return VM_FAULT_NOPAGE
    ptep, ptl = locked
    if await vmf_pte_changed(k, vmf, ptep):
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return VM_FAULT_NOPAGE
    uffd_wp = vmf.orig_pte_valid and pte_marker_uffd_wp(arch.decode(arch.pte_level, vmf.orig_pte))
    prot = vm_get_page_prot(vma.flags)
    if write and vma.flags & VM_WRITE and not uffd_wp:
        prot |= Access.W
    add_mapped_page(k, mm, folio)
    pte = leaf_entry(paddr & ~(k.page_size - 1), prot, young=True, uffd_wp=uffd_wp)
    await pgtable.set_entry(k, ptep, arch.pte_level, pgtable.pte_mkdirty(k, pte) if write else pte)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    k.stats["file_pages_mapped"] += 1
    return 0


async def do_fault_around(k, vmf) -> bool:
    """do_fault_around(): map what the page cache already holds around the fault, within
    the VMA and the PTE table. True if the faulting address got mapped."""
    vma, arch = vmf.vma, k.arch
    span = max(FAULT_AROUND_BYTES, k.page_size)
    start = max(vma.start, vmf.address & ~(span - 1))
    table_span = arch.levels[arch.pmd_level].span
    end = min(vma.end, (vmf.address & ~(span - 1)) + span, (vmf.address & ~(table_span - 1)) + table_span)
    return await filemap_map_pages(k, vmf, start, end)


async def filemap_map_pages(k, vmf, start: int, end: int) -> bool:
    """filemap_map_pages(): map cached, unlocked pages of [start, end) read-only-ish,
    without sleeping. A failed map of the PTE table is GIVEUP: return and let the normal
    ->fault path run."""
    from mm_core.memory import add_mapped_page, vm_get_page_prot
    vma, mm, arch = vmf.vma, vmf.vma.mm, k.arch
    mapping = vma.file.mapping
    first = shmem.filemap_get_folio(mapping, linear_page_index(vma, vmf.address))
    pmdval = await pgtable.get_entry(k, vmf.pmd, arch.pmd_level)
    if pmdval.kind is Kind.NONE:
        # filemap_map_pmd(): a PMD-order folio maps by PMD; otherwise allocate the table
        if first is not None and first.order == huge_memory.hpage_pmd_order(k) and not first.locked:
            if await huge_memory.do_set_pmd(k, vmf, first):
                return True
        if not any(shmem.filemap_get_folio(mapping, linear_page_index(vma, a)) is not None
                   for a in range(start, end, k.page_size)):
            return False
        if not await pgtable.pte_alloc(k, mm, vmf.pmd):
            return False
    locked = await pgtable.pte_offset_map_lock(k, mm, vmf.pmd, start)
    if locked is None:
        k.stats["fault_around_giveup"] += 1
        return False
    ptep, ptl = locked
    prot = vm_get_page_prot(vma.flags)
    if not vma.flags & VM_SHARED:
        prot &= ~Access.W
    mapped_fault = False
    for addr in range(start, end, k.page_size):
        folio = shmem.filemap_get_folio(mapping, linear_page_index(vma, addr))
        if folio is None or folio.locked or folio.extra.get("hwpoison"):
            continue                                 # (filemap_map_folio_range: PageHWPoison skips)
        entp = ptep + ((addr - start) >> k.page_shift) * 8
        if arch.decode(arch.pte_level, await pgtable.get_raw(k, entp)).kind is not Kind.NONE:
            continue
        add_mapped_page(k, mm, folio)
        paddr = shmem.folio_page_paddr(folio, linear_page_index(vma, addr))
        await pgtable.set_entry(k, entp, arch.pte_level, leaf_entry(paddr, prot, young=True))
        k.stats["fault_around_mapped"] += 1
        mapped_fault |= addr == vmf.address
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return mapped_fault
