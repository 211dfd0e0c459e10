"""Kernel samepage merging (mm/ksm.c, 6.6), reduced to its page-table walkers.

    break_ksm()            unshare the KSM page at one address: walk_page_range_vma() over
                           [addr, addr + 1) with break_ksm_pmd_entry(), then a
                           FAULT_FLAG_UNSHARE fault, until the walk finds no KSM page
    break_ksm_pmd_entry()  pte_offset_map_lock(); a failed map returns 0: "no KSM page
                           here" (SKIP; a huge or migration pmd never maps a KSM page, and a
                           table freed under a racing MADV_DONTNEED has nothing to break)
    write_protect_page()   make the pte mapping a page read-only and clean, so that its
                           content can no longer change (the first half of a merge)
    replace_page()         point a pte at the KSM page instead of an identical page:
                           pte_offset_map_lock() failing or the pte changed: -EFAULT
                           (GIVEUP: the merge fails)
    ksm_madvise()          MADV_MERGEABLE / MADV_UNMERGEABLE (VM_MERGEABLE; unmerging breaks
                           every KSM page of the range)

What a KSM page is here: an anon folio with ``extra["ksm"]`` set (folio_test_ksm(): its
mapping points to a stable node), write-protected everywhere it is mapped and owned by
no mm (the stable tree keeps it). ksmd's scan (the unstable and stable trees, checksums,
get_mergeable_page()'s follow_page()) is not modelled: ``ksm_merge_pages()`` is what
cmp_and_merge_page() does once the unstable tree matched two pages
(try_to_merge_two_pages()). Not modelled either: KSM-placed zero pages (use_zero_pages),
stable node chains, ksm_test_exit() and signal_pending() in unmerge_ksm_pages(), swap.
"""
from __future__ import annotations

from emu.arch import Access, Kind, leaf_entry
from mm_core import memory, pagewalk, pgtable, rmap, shmem
from mm_core.locks import mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import VM_SHARED, VMA
from mm_core.mmap import split_range
from mm_core.page_alloc import PageUse
from mm_core.tlbflush import flush_tlb_range

MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
VM_MERGEABLE = 0x80000000
VM_MAYSHARE, VM_PFNMAP, VM_IO, VM_DONTEXPAND, VM_MIXEDMAP = 0x80, 0x400, 0x4000, 0x40000, 0x10000000
EFAULT, EINVAL, ENOMEM, EAGAIN = 14, 22, 12, 11


def folio_test_ksm(folio) -> bool:
    return folio is not None and bool(folio.extra.get("ksm"))


def set_page_stable_node(k, folio) -> None:
    """set_page_stable_node(): the folio becomes a KSM page (the stable tree owns it)."""
    folio.extra["ksm"] = True
    folio.owner = None
    k.stats["ksm_pages_shared"] += 1


# -- break_ksm ------------------------------------------------------------------------------------

async def break_ksm_pmd_entry(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """break_ksm_pmd_entry() (6.6): 1 if the pte at ``addr`` maps a KSM page (present, or a
    migration entry of one: KSM pages stay KSM pages until freed), else 0. A failed
    pte_offset_map_lock() returns 0 (SKIP: nothing to break)."""
    k, arch = walk.k, walk.k.arch
    stale = "break_ksm_pmd_entry_ignores_map_failure" in k.bugs
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level) if stale else None
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None and stale:
        # bug injection: reads the pte in the table its own pmd read named
        return int(await pgtable.walk_stale_pte_table(k, pmdval, addr, addr + k.page_size) > 0)
    if locked is None:
        k.stats["break_ksm_map_failed"] += 1
        return 0
    ptep, ptl = locked
    ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
    page = None
    if ptent.kind is Kind.LEAF:
        page = None if ptent.special else k.alloc.page_of(ptent.paddr)      # vm_normal_page()
    elif ptent.kind is Kind.MIGRATION:
        page = k.alloc.page_of(ptent.swp_offset << 12)                     # pfn_swap_entry_to_page()
    ret = int(folio_test_ksm(page))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return ret


BREAK_KSM_OPS = pagewalk.MmWalkOps(pmd_entry=break_ksm_pmd_entry)


async def break_ksm(k, vma: VMA, addr: int, lock_vma: bool = False) -> int:
    """break_ksm(): while the walk finds a KSM page at ``addr``, fault with
    FAULT_FLAG_UNSHARE (a private copy replaces it); stop when it finds none or the fault
    fails. 0 or -ENOMEM. The caller holds mmap_lock (``lock_vma``: for writing)."""
    ret = 0
    while True:
        ksm_page = await pagewalk.walk_page_range(k, vma.mm, addr, addr + 1, BREAK_KSM_OPS)
        if not ksm_page:
            return 0
        k.stats["break_ksm_unshare"] += 1
        ret = await memory.handle_mm_fault(k, vma, addr, memory.FAULT_FLAG_UNSHARE | memory.FAULT_FLAG_REMOTE)
        if ret & (memory.VM_FAULT_SIGBUS | memory.VM_FAULT_SIGSEGV | memory.VM_FAULT_OOM):
            break
    return -ENOMEM if ret & memory.VM_FAULT_OOM else 0


def find_mergeable_vma(mm, addr: int) -> VMA | None:
    """find_mergeable_vma(): a VM_MERGEABLE VMA with an anon_vma, unless the mm exits."""
    if mm.users == 0:                                   # ksm_test_exit()
        return None
    vma = mm.vma_lookup(addr)
    if vma is None or not vma.flags & VM_MERGEABLE or not vma.anon_vma:
        return None
    return vma


async def break_cow(k, mm, addr: int) -> int:
    """break_cow() (ksmd undoing half a merge): break_ksm() under mmap_read_lock."""
    await mmap_read_lock(mm)
    try:
        vma = find_mergeable_vma(mm, addr)
        return await break_ksm(k, vma, addr) if vma is not None else 0
    finally:
        await mmap_read_unlock(mm)


async def unmerge_ksm_pages(k, vma: VMA, start: int, end: int, lock_vma: bool) -> int:
    """unmerge_ksm_pages(): break_ksm() page by page."""
    err = 0
    for addr in range(start, end, k.page_size):
        if err:
            break
        err = await break_ksm(k, vma, addr, lock_vma)
    return err


# -- merging ---------------------------------------------------------------------------------------

def vma_ksm_compatible(vma: VMA) -> bool:
    """vma_ksm_compatible(): private, ordinary memory (anon, or a private file mapping)."""
    return not vma.flags & (VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_MIXEDMAP)


async def ksm_madvise(k, mm, start: int, end: int, advice: int) -> int:
    """madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) under mmap_write_lock: ksm_madvise() on
    each VMA of the range (split to it); unmerging breaks every KSM page first."""
    await mmap_write_lock(mm)
    try:
        for vma in split_range(mm, start, end):
            if advice == MADV_MERGEABLE:
                if vma.flags & VM_MERGEABLE or not vma_ksm_compatible(vma):
                    continue
                vma.flags |= VM_MERGEABLE                      # (__ksm_enter(): ksmd would scan mm)
            else:
                if not vma.flags & VM_MERGEABLE:
                    continue
                if vma.anon_vma:
                    err = await unmerge_ksm_pages(k, vma, vma.start, vma.end, True)
                    if err:
                        return err
                vma.flags &= ~VM_MERGEABLE
        mm.merge_adjacent()
        return 0
    finally:
        await mmap_write_unlock(mm)


async def _pte_at(k, mm, addr: int):
    """(pmd pointer, pte) at ``addr`` read under the ptl; (None, None) without a table."""
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return None, None
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        return pmdp, None
    ptep, ptl = locked
    ent = k.arch.decode(k.arch.pte_level, await pgtable.get_raw(k, ptep))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return pmdp, ent


async def write_protect_page(k, vma: VMA, addr: int, page) -> int | None:
    """write_protect_page(): under the ptl, make the pte mapping ``page`` clean and
    read-only (ptep_clear_flush, then set it back), unless someone else holds an extra
    reference (GUP). Returns the new raw pte (orig_pte) or None (-EFAULT)."""
    arch, mm = k.arch, vma.mm
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return None
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)      # page_vma_mapped_walk()
    if locked is None:
        return None
    ptep, ptl = locked
    try:
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if ent.kind is not Kind.LEAF or ent.paddr != page.paddr:
            return None
        if ent.prot & Access.W or ent.dirty:
            await pgtable.clear_entry(k, ptep, arch.pte_level)          # ptep_clear_flush()
            await flush_tlb_range(k, mm, addr, addr + k.page_size)
            if page.mapcount + 1 != page.refcount:                     # + our follow_page() ref
                await pgtable.set_entry(k, ptep, arch.pte_level, ent)
                return None
            if ent.dirty:
                page.extra["dirty"] = True                             # set_page_dirty()
            ent = ent.with_(prot=ent.prot & ~Access.W, dirty=False)
            await pgtable.set_entry(k, ptep, arch.pte_level, ent)
        return arch.encode(arch.pte_level, ent)
    finally:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)


async def replace_page(k, vma: VMA, addr: int, page, kpage, orig_pte: int) -> int:
    """replace_page(): map the KSM page ``kpage`` where ``page`` was, if the pte is still
    ``orig_pte``. pte_offset_map_lock() failing, or a changed pte: -EFAULT (GIVEUP)."""
    arch, mm = k.arch, vma.mm
    pmdp = await rmap.walk_to_pmd(k, mm, addr)                         # mm_find_pmd()
    if pmdp is None:
        return -EFAULT
    pmde = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
    if not pmde.present or pmde.kind is Kind.LEAF:
        return -EFAULT
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        k.stats["replace_page_map_failed"] += 1
        return -EFAULT
    ptep, ptl = locked
    if await pgtable.get_raw(k, ptep) != orig_pte:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return -EFAULT
    memory.add_mapped_page(k, mm, kpage)                               # get_page + page_add_anon_rmap
    newpte = leaf_entry(kpage.paddr, memory.vm_get_page_prot(vma.flags) & ~Access.W, young=True)
    await pgtable.clear_entry(k, ptep, arch.pte_level)                 # ptep_clear_flush()
    await flush_tlb_range(k, mm, addr, addr + k.page_size)
    await pgtable.set_entry(k, ptep, arch.pte_level, newpte)           # set_pte_at_notify()
    memory._put_mapped_page(k, mm, page)                               # page_remove_rmap + folio_put
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


async def try_to_merge_one_page(k, vma: VMA, addr: int, page, kpage) -> int:
    """try_to_merge_one_page(): lock the page, write-protect it; with no ``kpage`` it
    becomes the KSM page itself, else it is replaced by ``kpage`` if identical."""
    if page is kpage:
        return 0
    if page.use is not PageUse.ANON or page.order != k.page_order:     # PageTransCompound: not split here
        return -EFAULT
    if not await shmem.folio_trylock(k, page):
        return -EFAULT
    err = -EFAULT
    try:
        orig = await write_protect_page(k, vma, addr, page)
        if orig is not None:
            if kpage is None:
                set_page_stable_node(k, page)
                page.extra["dirty"] = True
                err = 0
            elif k.physmem.read(page.paddr, k.page_size) == k.physmem.read(kpage.paddr, k.page_size):
                err = await replace_page(k, vma, addr, page, kpage, orig)
    finally:
        shmem.folio_unlock(page)
    return err


async def get_mergeable_page(k, mm, addr: int):
    """get_mergeable_page(): the anon page mapped at ``addr`` with a reference, or None
    (follow_page(FOLL_GET) reduced to a read of the pte under its ptl)."""
    _, ent = await _pte_at(k, mm, addr)
    if ent is None or ent.kind is not Kind.LEAF or ent.special:
        return None
    page = k.alloc.page_of(ent.paddr)
    if page is None or page.use is not PageUse.ANON:
        return None
    page.refcount += 1
    return page


async def ksm_merge_pages(k, mm, addr: int, tree_mm, tree_addr: int) -> int:
    """try_to_merge_two_pages(): what ksmd does once the unstable tree matched the page at
    ``addr`` with the one at ``tree_addr``: the first becomes the KSM page, the second is
    replaced by it; if that fails, break_cow() undoes the first. 0 or -EFAULT."""
    pages = []
    for m_, a in ((mm, addr), (tree_mm, tree_addr)):
        await mmap_read_lock(m_)
        try:
            vma = find_mergeable_vma(m_, a)
            page = await get_mergeable_page(k, m_, a) if vma is not None else None
        finally:
            await mmap_read_unlock(m_)
        if page is None:
            for p in pages:
                memory.put_page(k, p)
            return -EFAULT
        pages.append(page)
    page, tree_page = pages
    err = await _merge_with(k, mm, addr, page, None)
    if not err:
        err = await _merge_with(k, tree_mm, tree_addr, tree_page, page)
        if err:
            await break_cow(k, mm, addr)
    for p in pages:
        memory.put_page(k, p)
    if not err:
        k.stats["ksm_pages_sharing"] += 1
    return err


async def _merge_with(k, mm, addr: int, page, kpage) -> int:
    """try_to_merge_with_ksm_page(): try_to_merge_one_page() under mmap_read_lock."""
    await mmap_read_lock(mm)
    try:
        vma = find_mergeable_vma(mm, addr)
        if vma is None:
            return -EFAULT
        return await try_to_merge_one_page(k, vma, addr, page, kpage)
    finally:
        await mmap_read_unlock(mm)


async def ksm_pages_at(k, mm, start: int, end: int) -> list[int]:
    """The addresses in [start, end) whose pte maps a KSM page (a test helper, like
    /proc/PID/pagemap's KPF_KSM)."""
    found = []
    for addr in range(start, end, k.page_size):
        _, ent = await _pte_at(k, mm, addr)
        if ent is not None and ent.kind is Kind.LEAF and folio_test_ksm(k.alloc.page_of(ent.paddr)):
            found.append(addr)
    return found
