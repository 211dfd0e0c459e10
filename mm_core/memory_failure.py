"""Memory failure (mm/memory-failure.c, 6.6), reduced to its page-table walk.

    memory_failure(pfn, flags)  the first report of an error marks the page HWPoison and,
                                for a small anon page, replaces every pte mapping it by a
                                hwpoison swap entry (hwpoison_user_mappings ->
                                try_to_unmap(TTU_HWPOISON)); a report on a page already
                                poisoned with MF_ACTION_REQUIRED (the access was retried
                                and machine-checked again) goes to
                                kill_accessing_process(current)
    kill_accessing_process()    walk_page_range(mm, 0, TASK_SIZE) with hwpoison_pte_range()
                                to find the first address that maps the pfn (a present pte,
                                a hwpoison entry, or a THP through its pmd); the SIGBUS it
                                sends (kill_proc) is not modelled: the address and size
                                are returned
    hwpoison_pte_range()        a huge or swap pmd under pmd_trans_huge_lock():
                                check_hwpoisoned_pmd_entry() (a migration pmd is not
                                present: 0, no retry); else pte_offset_map_lock(), whose
                                failure is ``goto out``: 0, SKIP (the walk goes on with the
                                next pmd)

    shmem pages                 a small shmem folio is locked and unmapped the same way
                                through the file rmap (rmap_walk_file ->
                                page_vma_mapped_walk, hwpoison entries in every mapping),
                                then me_pagecache_clean(): shmem_error_remove_page() keeps it
                                in the page cache, poisoned, so that a later fault on the
                                index gets VM_FAULT_HWPOISON from __do_fault() (SIGBUS) and
                                fault-around skips it; a reference beyond the page cache's
                                (a GUP pin, a mapping that could not be undone) is
                                has_extra_refcount(): MF_FAILED, -EBUSY

Not modelled: huge pages (split_huge_page(): -EBUSY as for an unsplit THP), page cache
of other filesystems (truncate_error_page()), the LRU/swap-cache states of
error_states[], hugetlb, early kill (collect_procs), unpoison, MF_COUNT_INCREASED, and
signal delivery. A poisoned page is never freed: memory_failure() keeps the reference it
took, so the page is out of circulation (left allocated; an anon page owned by nobody).
"""
from __future__ import annotations

from dataclasses import dataclass

from emu.arch import SWP_HWPOISON, Kind, swap_entry
from emu.sched import traps
from mm_core import huge_memory, memory, pagewalk, pgtable, rmap, shmem
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.page_alloc import PageUse
from mm_core.tlbflush import flush_tlb_range

MF_ACTION_REQUIRED = 1 << 0
EFAULT, EBUSY, ENXIO = 14, 16, 6
EHWPOISON = 133


@dataclass
class ToKill:
    """struct to_kill: where the error page is mapped in the task's mm."""

    addr: int = 0
    size_shift: int = 0


@dataclass
class HwpWalk:
    """struct hwp_walk."""

    pfn: int
    tk: ToKill


def PageHWPoison(page) -> bool:  # noqa: N802 - the kernel's name
    return bool(page is not None and page.extra.get("hwpoison"))


def set_to_kill(tk: ToKill, addr: int, shift: int) -> None:
    tk.addr, tk.size_shift = addr, shift


def check_hwpoisoned_entry(k, pte, addr: int, shift: int, poisoned_pfn: int, tk: ToKill) -> int:
    """check_hwpoisoned_entry(): 1 (and the address noted) if ``pte`` maps the pfn, as a
    present pte or as a hwpoison entry."""
    pfn = 0
    if pte.kind is Kind.LEAF:
        pfn = pte.paddr >> k.page_shift
    elif pte.kind is Kind.SWAP and pte.swp_type == SWP_HWPOISON:
        pfn = (pte.swp_offset << 12) >> k.page_shift            # swp_offset_pfn()
    if not pfn or pfn != poisoned_pfn:
        return 0
    set_to_kill(tk, addr, shift)
    return 1


def check_hwpoisoned_pmd_entry(k, pmd, addr: int, hwp: HwpWalk) -> int:
    """check_hwpoisoned_pmd_entry(): a THP covering the pfn: the subpage's address. A
    migration (not present) pmd: 0."""
    if pmd.kind is not Kind.LEAF:
        return 0
    pfn = pmd.paddr >> k.page_shift
    nr = huge_memory.hpage_pmd_size(k) >> k.page_shift
    if pfn <= hwp.pfn < pfn + nr:
        set_to_kill(hwp.tk, addr + ((hwp.pfn - pfn) << k.page_shift), k.page_shift)
        return 1
    return 0


async def hwpoison_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """hwpoison_pte_range() (6.6): a huge or swap pmd is checked under
    pmd_trans_huge_lock(); else the PTE table under pte_offset_map_lock(): a failed map
    is ``goto out``, 0 (SKIP: this extent does not map it, the walk goes on)."""
    k, arch, hwp = walk.k, walk.k.arch, walk.private
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind in (Kind.LEAF, Kind.MIGRATION, Kind.SWAP):     # is_swap_pmd() || pmd_trans_huge()
        pml, cur = await huge_memory.pmd_trans_huge_lock(k, walk.mm, pmdp)
        if pml is not None:
            ret = check_hwpoisoned_pmd_entry(k, cur, addr, hwp)
            await traps.unlock(pml)
            return ret
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None and "hwpoison_pte_range_ignores_map_failure" in k.bugs:
        await pgtable.walk_stale_pte_table(k, pmdval, addr, end)   # bug injection: walks on
        return 0
    if locked is None:
        k.stats["hwpoison_pte_range_map_failed"] += 1
        return 0                                                   # goto out
    ptep, ptl = locked
    ret = 0
    for i in range((end - addr) >> k.page_shift):
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep + 8 * i))
        ret = check_hwpoisoned_entry(k, pte, addr + (i << k.page_shift), k.page_shift, hwp.pfn, hwp.tk)
        if ret == 1:
            break
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return ret


HWP_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=hwpoison_pte_range)


async def kill_accessing_process(k, mm, pfn: int, flags: int) -> tuple[int, ToKill]:
    """kill_accessing_process(current, pfn, flags): under mmap_read_lock, walk the whole
    address space for the first mapping of ``pfn``. -EHWPOISON with the address found
    (kill_proc() would send SIGBUS with it), else -EFAULT."""
    if mm is None or mm.dead:
        return -EFAULT, ToKill()
    hwp = HwpWalk(pfn, ToKill())
    await mmap_read_lock(mm)
    try:
        ret = await pagewalk.walk_page_range(k, mm, 0, k.arch.task_size, HWP_WALK_OPS, hwp)
        if ret == 1 and hwp.tk.addr:
            k.stats["hwpoison_kill_proc"] += 1                     # kill_proc(): SIGBUS
        else:
            ret = 0
    finally:
        await mmap_read_unlock(mm)
    return (-EHWPOISON if ret > 0 else -EFAULT), hwp.tk


async def hwpoison_user_mappings(k, page) -> bool:
    """hwpoison_user_mappings() -> try_to_unmap(TTU_HWPOISON) of a small anon page: in
    every VMA of its anon_vma, the pte mapping it (pte_offset_map_lock; no table: not
    mapped there) becomes a hwpoison entry and the mapping is dropped. True if nothing
    maps it any more."""
    arch = k.arch
    anon_vma = rmap.folio_anon_vma(page)
    if anon_vma is None:
        return page.mapcount == 0
    await traps.lock(anon_vma.rwsem, "r")
    try:
        for vma in list(anon_vma.mm.vmas):
            addr = rmap.vma_address(vma, page.index) if vma.anon_vma else None
            if addr is None:
                continue
            pmdp = await rmap.walk_to_pmd(k, vma.mm, addr)
            locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr) if pmdp is not None else None
            if locked is None:
                continue
            ptep, ptl = locked
            pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
            if pte.kind is Kind.LEAF and pte.paddr == page.paddr:
                await pgtable.clear_entry(k, ptep, arch.pte_level)            # ptep_clear_flush()
                await flush_tlb_range(k, vma.mm, addr, addr + k.page_size)
                await pgtable.set_entry(k, ptep, arch.pte_level,
                                        swap_entry(SWP_HWPOISON, page.paddr >> 12))
                memory._put_mapped_page(k, vma.mm, page)                      # dec_mm_counter + rmap
                k.stats["hwpoison_unmapped"] += 1
            await pgtable.pte_unmap_unlock(k, ptep, ptl)
    finally:
        await traps.unlock(anon_vma.rwsem, "r")
    return page.mapcount == 0


async def memory_failure(k, pfn: int, flags: int, current_mm=None) -> tuple[int, ToKill | None]:
    """memory_failure(pfn, flags) for a page of user memory. The first report poisons the
    page (and unmaps a small anon page); later reports return -EHWPOISON, with
    MF_ACTION_REQUIRED after kill_accessing_process() of ``current_mm``. Returns
    (0 / -errno, where the accessing task maps it or None)."""
    page = k.alloc.page_of(pfn << k.page_shift)
    if page is None or page.use not in (PageUse.ANON, PageUse.SHMEM, PageUse.FILE):
        return -ENXIO, None                                  # free, kernel or unknown: not modelled
    if PageHWPoison(page):                                   # TestSetPageHWPoison()
        if flags & MF_ACTION_REQUIRED:
            return await kill_accessing_process(k, current_mm, pfn, flags)
        return -EHWPOISON, None
    page.extra["hwpoison"] = True
    k.stats["hwpoison_pages"] += 1
    if page.use is PageUse.ANON and page.order == k.page_order:
        page.refcount += 1                                   # memory_failure()'s own reference
        unmapped = await hwpoison_user_mappings(k, page)
        page.owner = None                                    # never freed: out of circulation
        return (0 if unmapped else -EBUSY), None
    if page.use is PageUse.SHMEM and page.order == k.page_order:
        return await memory_failure_shmem(k, page), None
    return -EBUSY, None                                      # THP split / other file systems


MF_FAILED, MF_RECOVERED = "Failed", "Recovered"


def has_extra_refcount(k, page, extra_pins: bool) -> bool:
    """has_extra_refcount(): references beyond memory_failure()'s own (and, for shmem,
    the page cache's, which the page keeps)."""
    count = page.refcount - 1 - (1 if extra_pins else 0)
    if count > 0:
        k.printk(f"Memory failure: {page.paddr >> k.page_shift:#x}: dirty LRU page still "
                 f"referenced by {count} users")
        return True
    return False


def me_pagecache_clean(k, page) -> str:
    """me_pagecache_dirty() -> me_pagecache_clean() for a shmem page: truncate_error_page()
    calls shmem_error_remove_page(), which keeps the page in the page cache (poisoned, so
    the next access of the index fails instead of reading zeroes); the page cache's
    reference is an expected one (extra_pins)."""
    if page.mapping is None:                                 # truncated meanwhile
        return MF_FAILED
    return MF_FAILED if has_extra_refcount(k, page, extra_pins=True) else MF_RECOVERED


async def memory_failure_shmem(k, page) -> int:
    """memory_failure() of a small shmem folio (6.6): get_hwpoison_page()'s reference
    (kept: the page never goes back), lock_page(), hwpoison_user_mappings() (any mapping
    left is MF_FAILED), identify_page_state() -> me_pagecache_clean(). 0 when recovered,
    -EBUSY when not."""
    page.refcount += 1                                       # get_hwpoison_page()
    await shmem.folio_lock(k, page)
    try:
        if page.mapping is not None:
            # hwpoison_user_mappings() -> try_to_unmap(TTU_HWPOISON): every mapping of the
            # index becomes a hwpoison entry (SKIP where page_vma_mapped_walk finds no table)
            await rmap.try_to_unmap_file_page(k, page, page.index, rmap.TTU_HWPOISON)
        if page.mapcount:                                    # hwpoison_user_mappings() failed
            k.printk(f"Memory failure: {page.paddr >> k.page_shift:#x}: failed to unmap page "
                     f"(mapcount={page.mapcount})")
            result = MF_FAILED
        else:
            result = me_pagecache_clean(k, page)
    finally:
        shmem.folio_unlock(page)
    k.stats[f"memory_failure_{result.lower()}"] += 1
    return 0 if result == MF_RECOVERED else -EBUSY
