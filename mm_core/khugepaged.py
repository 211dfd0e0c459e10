"""THP collapse (mm/khugepaged.c): anonymous collapse_huge_page, shmem collapse_file with
retract_page_tables, collapse_pte_mapped_thp, MADV_COLLAPSE and the khugepaged daemon.

Which locks retraction takes, and how the retracted table is freed, follows the kernel
profile (mm_core/config.py):

  5.10    retract_page_tables under i_mmap write + mmap_write_trylock of each mm, then
          khugepaged_test_exit() (18e77600f7a1) and pmd_lock() alone around
          pmdp_collapse_flush(); table freed at once (pte_free)
  <= 6.5  as 5.10, with pml + ptl around the clear
  >= 6.6  i_mmap read + pml + ptl only, no mmap_lock; table freed by pte_free_defer
"""
from __future__ import annotations

import enum

from emu.arch import Access, Kind, leaf_entry, table_entry
from emu.sched import traps
from mm_core import huge_memory, mmu_notifier, pgtable, rmap, shmem
from mm_core.locks import WaitQueue, mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.memory import VM_FAULT_OOM, VM_FAULT_SIGBUS, VM_FAULT_SIGSEGV
from mm_core.mm import VM_HUGEPAGE, VM_NOHUGEPAGE, VM_WRITE
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.pgalloc import pte_free, pte_free_defer
from mm_core.swapops import is_pte_marker, pte_marker_uffd_wp
from mm_core.tlbflush import flush_tlb_range

MAX_PTES_NONE = 511          # /sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_none
PAGES_TO_SCAN = 4096         # .../khugepaged/pages_to_scan
SCAN_SLEEP_CYCLES = 30_000_000   # .../scan_sleep_millisecs (10 s in Linux; 10 ms at 3 GHz here)


class Scan(enum.Enum):
    SUCCEED = "SCAN_SUCCEED"
    FAIL = "SCAN_FAIL"
    PMD_NULL = "SCAN_PMD_NULL"
    PMD_NONE = "SCAN_PMD_NONE"
    PMD_MAPPED = "SCAN_PMD_MAPPED"
    EXCEED_NONE_PTE = "SCAN_EXCEED_NONE_PTE"
    PTE_NON_PRESENT = "SCAN_PTE_NON_PRESENT"
    PAGE_LOCK = "SCAN_PAGE_LOCK"
    PAGE_COUNT = "SCAN_PAGE_COUNT"
    VMA_CHECK = "SCAN_VMA_CHECK"
    ANY_PROCESS = "SCAN_ANY_PROCESS"
    ALLOC_HUGE_PAGE_FAIL = "SCAN_ALLOC_HUGE_PAGE_FAIL"
    PTE_MAPPED_HUGEPAGE = "SCAN_PTE_MAPPED_HUGEPAGE"
    TRUNCATED = "SCAN_TRUNCATED"
    EXCEED_SWAP_PTE = "SCAN_EXCEED_SWAP_PTE"
    PTE_UFFD_WP = "SCAN_PTE_UFFD_WP"
    EXCEED_SHARED_PTE = "SCAN_EXCEED_SHARED_PTE"
    PAGE_NULL = "SCAN_PAGE_NULL"
    PAGE_ANON = "SCAN_PAGE_ANON"
    PAGE_RO = "SCAN_PAGE_RO"
    LACK_REFERENCED_PAGE = "SCAN_LACK_REFERENCED_PAGE"
    COPY_MC = "SCAN_COPY_MC"


def max_ptes_shared(k) -> int:
    """.../khugepaged/max_ptes_shared: HPAGE_PMD_NR / 2."""
    return huge_memory.hpage_pmd_nr(k) // 2


def max_ptes_swap(k) -> int:
    """/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_swap: HPAGE_PMD_NR / 8."""
    return huge_memory.hpage_pmd_nr(k) // 8


def hpage_collapse_test_exit(mm) -> bool:
    """hpage_collapse_test_exit(): the mm is exiting; its tables may be freed without RCU."""
    return mm.users == 0 or mm.dead


async def find_pmd_or_thp_or_none(k, mm, addr: int) -> tuple[Scan, int | None]:
    """find_pmd_or_thp_or_none(): classify the pmd for ``addr`` without allocating."""
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return Scan.PMD_NULL, None
    pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
    if pmdval.kind is Kind.NONE:
        return Scan.PMD_NONE, pmdp
    if pmdval.kind is Kind.LEAF:
        return Scan.PMD_MAPPED, pmdp
    if pmdval.kind is not Kind.TABLE:
        return Scan.PMD_NULL, pmdp
    return Scan.SUCCEED, pmdp


async def pmdp_collapse_flush(k, vma, addr: int, pmdp: int) -> int:
    """pmdp_collapse_flush(): clear a table pmd and flush the range; returns the old raw pmd."""
    old = await pgtable.clear_entry(k, pmdp, k.arch.pmd_level)
    size = huge_memory.hpage_pmd_size(k)
    await flush_tlb_range(k, vma.mm, addr, addr + size)
    return old


def _detached(k, pt, by: str) -> None:
    pt.state = "detached"
    pt.note(k, f"detached by {by}")


async def _free_retracted(k, pt) -> None:
    k.stats["retracted_tables"] += 1
    if k.profile.pte_free_defer and "retract_without_pte_free_defer" not in k.bugs:
        await pte_free_defer(k, pt)
    else:
        pte_free(k, pt)


# -- shmem / file ------------------------------------------------------------------------------

async def retract_page_tables(k, mapping, pgoff: int) -> int:
    """retract_page_tables(mapping, pgoff): detach the (now empty) PTE tables that map
    [pgoff, pgoff + HPAGE_PMD_NR) in every VMA of the file, so a later fault or
    collapse_pte_mapped_thp() can map the huge folio with one PMD. Returns how many.
    Failure handling: SKIP the vma (none / huge / absent pmd, anon_vma, exiting mm,
    uffd-wp, mmap_write_trylock() failing before 6.6).

    The exiting-mm test: 6.6 makes it before taking any lock (exit_mmap() holds
    mmap_lock and zaps with pte_offset_map_lock()'s recheck). Before 6.6 it comes after
    mmap_write_trylock() (18e77600f7a1): under 5.10 exit_mmap() takes no mmap_lock, and
    only mm_users == 0 seen under the lock keeps retraction off the tables it zaps."""
    prof = k.profile
    size = huge_memory.hpage_pmd_size(k)
    retracted = 0
    mode = "r" if prof.retract_without_mmap_lock else "w"
    await traps.lock(mapping.i_mmap_rwsem, mode)
    try:
        for vma in list(mapping.i_mmap):
            mm = vma.mm
            if vma.anon_vma:                  # a written MAP_PRIVATE mapping: anon ptes inside
                continue
            addr = vma.start + ((pgoff - vma.pgoff) << k.page_shift)
            if addr & (size - 1) or addr < vma.start or addr + size > vma.end:
                continue
            result, pmdp = await find_pmd_or_thp_or_none(k, mm, addr)
            if result is not Scan.SUCCEED:
                continue
            test_exit = "retract_without_exit_test" not in k.bugs
            if prof.retract_without_mmap_lock and test_exit and hpage_collapse_test_exit(mm):
                continue
            if vma.uffd_wp:
                continue
            write_locked = False
            if not prof.retract_without_mmap_lock:
                if not await traps.trylock(mm.mmap_lock, "w"):
                    k.stats["retract_mmap_trylock_failed"] += 1
                    continue                  # khugepaged_add_pte_mapped_thp(): try later
                if test_exit and hpage_collapse_test_exit(mm):
                    k.stats["retract_skipped_exiting_mm"] += 1
                    await traps.unlock(mm.mmap_lock, "w")
                    continue
                write_locked = True
            # "PTEs were notified when unmapped; but now for the PMD?"
            rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, mm, addr, addr + size)
            if prof.retract_pmd_lock_only:
                done = await _collapse_pmd_under_pml(k, vma, addr, pmdp)
                if done is not None:
                    await _free_retracted(k, done)
                    retracted += 1
                await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
                await traps.unlock(mm.mmap_lock, "w")
                continue
            pml = await pgtable.pmd_lockptr(k, mm, pmdp)
            await traps.lock(pml)
            pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
            done = None
            if pmdval.kind is Kind.TABLE:
                ptl = pgtable.pte_lockptr(k, mm, pmdval)
                if ptl is not pml:
                    await traps.lock(ptl)
                # recheck under the locks: a racing UFFDIO_COPY or COW may have added anon ptes,
                # a racing UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT uffd-wp markers
                anon_vma = vma.anon_vma and "retract_without_anon_vma_recheck" not in k.bugs
                uffd_wp = vma.uffd_wp and "retract_without_uffd_wp_recheck" not in k.bugs
                if not (anon_vma or uffd_wp):
                    await pmdp_collapse_flush(k, vma, addr, pmdp)
                    done = k.ptdescs.get(pmdval.paddr)
                    if done is not None:
                        _detached(k, done, "retract_page_tables")
                if ptl is not pml:
                    await traps.unlock(ptl)
            await traps.unlock(pml)
            if done is not None:
                await _free_retracted(k, done)
                retracted += 1
            await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
            if write_locked:
                await traps.unlock(mm.mmap_lock, "w")
    finally:
        await traps.unlock(mapping.i_mmap_rwsem, mode)
    return retracted


async def _collapse_pmd_under_pml(k, vma, addr: int, pmdp: int):
    """The 5.10 body of retract_page_tables() for one vma, under mmap_write_lock:
    ``ptl = pmd_lock(mm, pmd); _pmd = pmdp_collapse_flush(vma, addr, pmd);
    spin_unlock(ptl)`` ("assume page table is clear"). No ptl of the PTE table and no
    recheck: a zap_pte_range() holding that ptl without mmap_lock (exit_mmap() before
    5.17) is not excluded. Returns the detached table (the caller pte_free()s it)."""
    pml = await pgtable.pmd_lock(k, vma.mm, pmdp)
    old = k.arch.decode(k.arch.pmd_level, await pmdp_collapse_flush(k, vma, addr, pmdp))
    await traps.unlock(pml)
    pt = k.ptdescs.get(old.paddr) if old.kind is Kind.TABLE else None
    if pt is not None:
        _detached(k, pt, "retract_page_tables")
    return pt


async def collapse_file(k, inode, start: int, is_khugepaged: bool, retract: bool = True) -> Scan:
    """collapse_file(): copy HPAGE_PMD_NR pages of a shmem file into one locked PMD-order
    folio, unmap the small pages everywhere, swap the folio into the page cache, retract
    the page tables (folio still locked, so refaults wait), then unlock."""
    inode.refs += 1                           # get_file(): the file outlives the collapse
    try:
        return await _collapse_file(k, inode, start, is_khugepaged, retract)
    finally:
        shmem.iput(k, inode)


async def _collapse_file(k, inode, start: int, is_khugepaged: bool, retract: bool) -> Scan:
    mapping = inode.mapping
    nr = huge_memory.hpage_pmd_nr(k)
    if (start + nr) << k.page_shift > inode.size:
        return Scan.TRUNCATED
    first = shmem.filemap_get_folio(mapping, start)
    if first is not None and first.order == huge_memory.hpage_pmd_order(k):
        return Scan.PTE_MAPPED_HUGEPAGE       # already huge: maybe only PTE-mapped
    try:
        new = k.alloc.alloc_pages(huge_memory.hpage_pmd_order(k), PageUse.SHMEM, owner=mapping)   # zeroed
    except OutOfMemory:
        return Scan.ALLOC_HUGE_PAGE_FAIL
    new.locked = True
    new.mapping, new.index = mapping, start
    olds = []
    for index in range(start, start + nr):
        folio = shmem.filemap_get_folio(mapping, index)
        if folio is None and index in mapping.swap_entries:
            # xa_is_value(): swap it in (shmem_get_folio(SGP_NOALLOC)); failing: SCAN_FAIL
            folio = await shmem.shmem_get_folio(k, inode, index, noalloc=True)
            if folio is None:
                for f in olds:
                    shmem.folio_unlock(f)
                k.alloc.free_pages(new)
                return Scan.FAIL
        if folio is None:
            continue                          # a hole: the new folio is already zero there
        if folio.locked or folio.order != k.page_order:
            for f in olds:
                shmem.folio_unlock(f)
            k.alloc.free_pages(new)
            return Scan.PAGE_LOCK
        await shmem.folio_lock(k, folio)
        olds.append(folio)
    for folio in olds:
        await rmap.try_to_unmap_file_page(k, folio, folio.index)
        if folio.mapcount:
            for f in olds:
                shmem.folio_unlock(f)
            k.alloc.free_pages(new)
            return Scan.PAGE_COUNT
    if any(folio.extra.get("hwpoison") for folio in olds):
        # copy_mc_highpage() machine-checks on a poisoned page (6.4+, 12904d953364): every
        # page is copied before the page cache is touched, so SCAN_COPY_MC rolls back
        # with the old pages still in place (unmapped: they fault back in)
        for f in olds:
            shmem.folio_unlock(f)
        k.alloc.free_pages(new)
        k.stats["collapse_copy_mc"] += 1
        return Scan.COPY_MC
    for folio in olds:                        # copy, then replace in the page cache
        k.physmem.copy(new.paddr + ((folio.index - start) << k.page_shift), folio.paddr, k.page_size)
        shmem.folio_unlock(folio)
        shmem.delete_from_page_cache(k, folio)
    shmem.add_to_page_cache(mapping, new, start)
    await traps.sched_point("page_cache_replace", (inode.ino, start))
    k.stats["thp_collapse_file"] += 1
    if retract:                       # (scenarios drive retraction themselves)
        await retract_page_tables(k, mapping, start)
    shmem.folio_unlock(new)
    return Scan.SUCCEED if is_khugepaged else Scan.PTE_MAPPED_HUGEPAGE


async def collapse_pte_mapped_thp(k, mm, addr: int, install_pmd: bool) -> Scan:
    """collapse_pte_mapped_thp(mm, addr, install_pmd): the file THP is in the page cache
    but this mm still maps it with PTEs (or not at all): clear those PTEs, retract the
    table (pte_free_defer) and, with install_pmd, map the folio with one PMD.
    Needs mmap_read_lock only; ptl is held from clearing the PTEs until the pmd is gone
    (the fix for UFFDIO_COPY inserting a pte meanwhile)."""
    arch = k.arch
    size = huge_memory.hpage_pmd_size(k)
    haddr = addr & ~(size - 1)
    vma = mm.vma_lookup(haddr)
    if vma is None or vma.file is None or haddr < vma.start or haddr + size > vma.end:
        return Scan.VMA_CHECK
    result, pmdp = await find_pmd_or_thp_or_none(k, mm, haddr)
    if result is Scan.PMD_MAPPED:
        return Scan.PMD_MAPPED
    index = vma.pgoff + ((haddr - vma.start) >> k.page_shift)
    folio = shmem.filemap_get_folio(vma.file.mapping, index)
    if folio is None or folio.order != huge_memory.hpage_pmd_order(k) or folio.index != index:
        return Scan.FAIL
    await shmem.folio_lock(k, folio)
    try:
        result, pmdp = await find_pmd_or_thp_or_none(k, mm, haddr)
        if result is Scan.PMD_NONE:
            return await _install(k, vma, haddr, pmdp, folio, install_pmd)
        if result is not Scan.SUCCEED:
            return result
        # step 1: every present pte must map the right subpage
        locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, haddr)
        if locked is None:
            return Scan.FAIL                  # "mmap_lock + page lock should prevent this"
        ptep, ptl = locked
        ok = await _ptes_map_folio(k, ptep, folio)
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        if not ok:
            return Scan.FAIL
        if "collapse_pte_mapped_thp_without_uffd_fix" in k.bugs:
            pmdval = await _clear_then_relock(k, vma, haddr, pmdp, folio)
            if pmdval is None:
                return Scan.FAIL
        else:
            # step 2 + 4: pml, then ptl, held until the pmd is cleared
            pml = await pgtable.pmd_lockptr(k, mm, pmdp)
            await traps.lock(pml)
            locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, haddr)
            if locked is None:
                await traps.unlock(pml)
                return Scan.FAIL
            ptep, ptl = locked
            if not await _ptes_map_folio(k, ptep, folio):
                await pgtable.pte_unmap_unlock(k, ptep, ptl)
                await traps.unlock(pml)
                return Scan.FAIL
            await _clear_folio_ptes(k, mm, ptep, folio)
            pmdval = arch.decode(arch.pmd_level, await pmdp_collapse_flush(k, vma, haddr, pmdp))
            await pgtable.pte_unmap_unlock(k, ptep, ptl)
            await traps.unlock(pml)
        pt = k.ptdescs.get(pmdval.paddr)
        if pt is not None:
            _detached(k, pt, "collapse_pte_mapped_thp")
            await _free_retracted(k, pt)
        k.stats["collapse_pte_mapped_thp"] += 1
        return await _install(k, vma, haddr, pmdp, folio, install_pmd)
    finally:
        shmem.folio_unlock(folio)


async def _clear_folio_ptes(k, mm, ptep: int, folio) -> int:
    """Step 2: clear the PTEs that map the folio, dropping their rmap and counters."""
    from mm_core.memory import _put_mapped_page
    arch, cleared = k.arch, 0
    empty = arch.empty_value(arch.pte_level)
    for i, raw in enumerate(await pgtable.get_raws_locked(k, ptep, huge_memory.hpage_pmd_nr(k))):
        entp = ptep + i * 8
        if raw != empty and arch.decode(arch.pte_level, raw).kind is Kind.LEAF:
            await pgtable.clear_entry(k, entp, arch.pte_level)
            _put_mapped_page(k, mm, folio)
            cleared += 1
    return cleared


async def _clear_then_relock(k, vma, haddr: int, pmdp: int, folio):
    """The 6.6-rc code before a98460494b16 (bug injection): empty the table under the ptl,
    drop it, and only then take pml + ptl to clear the pmd; UFFDIO_COPY can put an anon
    pte into the emptied table in between."""
    mm, arch = vma.mm, k.arch
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, haddr)
    if locked is None:
        return None
    ptep, ptl = locked
    if not await _ptes_map_folio(k, ptep, folio):
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return None
    await _clear_folio_ptes(k, mm, ptep, folio)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    pml = await pgtable.pmd_lock(k, mm, pmdp)
    pmdval = arch.decode(arch.pmd_level, await pgtable.get_raw(k, pmdp))
    ptl = pgtable.pte_lockptr(k, mm, pmdval)
    if ptl is not pml:
        await traps.lock(ptl)
    await pmdp_collapse_flush(k, vma, haddr, pmdp)
    if ptl is not pml:
        await traps.unlock(ptl)
    await traps.unlock(pml)
    return pmdval


async def _ptes_map_folio(k, ptep: int, folio) -> bool:
    arch = k.arch
    empty = arch.empty_value(arch.pte_level)
    for i, raw in enumerate(await pgtable.get_raws_locked(k, ptep, huge_memory.hpage_pmd_nr(k))):
        if raw == empty:
            continue
        ent = arch.decode(arch.pte_level, raw)
        if ent.kind is Kind.NONE:
            continue
        if ent.kind is not Kind.LEAF or ent.paddr != folio.paddr + i * k.page_size:
            return False
    return True


async def _install(k, vma, haddr: int, pmdp: int | None, folio, install_pmd: bool) -> Scan:
    """set_huge_pmd(): map the locked folio with one PMD leaf."""
    from mm_core.memory import VmFault
    if not install_pmd:
        return Scan.SUCCEED
    if pmdp is None:
        pmdp = await pgtable.walk_alloc(k, vma.mm, haddr, k.arch.pmd_level)
    vmf = VmFault(vma, haddr, 0, pmd=pmdp)
    return Scan.SUCCEED if await huge_memory.do_set_pmd(k, vmf, folio) else Scan.FAIL


# -- anonymous ------------------------------------------------------------------------------

def hugepage_vma_revalidate(k, mm, haddr: int):
    """hugepage_vma_revalidate(mm, address, expect_anon=true) (6.6), after mmap_lock was
    dropped and taken again: SCAN_ANY_PROCESS for an exiting mm, SCAN_VMA_CHECK when the
    VMA went, no longer covers the PMD range, or is not anonymous. Returns (result, vma)."""
    if hpage_collapse_test_exit(mm):
        return Scan.ANY_PROCESS, None
    size = huge_memory.hpage_pmd_size(k)
    vma = mm.vma_lookup(haddr)
    if vma is None or not vma.anonymous or haddr < vma.start or haddr + size > vma.end:
        return Scan.VMA_CHECK, None
    return Scan.SUCCEED, vma       # (hugepage_vma_check()'s sysfs / VM_NOHUGEPAGE tests: the callers')


def _unmapped_pte(ent) -> bool:
    """Generic is_swap_pte(): neither none nor present (swap, migration, pte marker)."""
    return ent.kind in (Kind.SWAP, Kind.MIGRATION)


async def hpage_collapse_scan_pmd(k, mm, vma, haddr: int, is_khugepaged: bool) -> Scan:
    """hpage_collapse_scan_pmd() (6.6), entered with mmap_read_lock held and returning
    with it released (``*mmap_locked = false`` once collapse_huge_page() was called; the
    caller's unlock otherwise, done here). Under pte_offset_map_lock() (failing:
    SCAN_PMD_NULL, GIVEUP) it counts the non-present ptes ("unmapped": swap, migration,
    markers); khugepaged gives up past max_ptes_swap (SCAN_EXCEED_SWAP_PTE), MADV_COLLAPSE
    takes any number; a uffd-wp one (pte_swp_uffd_wp_any) is SCAN_PTE_UFFD_WP; none ptes
    past max_ptes_none (khugepaged only, or any in a uffd-armed VMA) are
    SCAN_EXCEED_NONE_PTE. Each present pte: uffd-wp (SCAN_PTE_UFFD_WP), no normal page
    (SCAN_PAGE_NULL), not anon (SCAN_PAGE_ANON), shared past max_ptes_shared (khugepaged,
    SCAN_EXCEED_SHARED_PTE), locked (SCAN_PAGE_LOCK), extra references (SCAN_PAGE_COUNT),
    young or referenced counted for khugepaged. Then no writable pte is SCAN_PAGE_RO, and
    khugepaged wants a referenced page, and with swap ptes at least HPAGE_PMD_NR / 2 of
    them (SCAN_LACK_REFERENCED_PAGE: swap-in only for a hot range)."""
    arch = k.arch
    nr = huge_memory.hpage_pmd_nr(k)
    result, pmdp = await find_pmd_or_thp_or_none(k, mm, haddr)
    if result is not Scan.SUCCEED:
        await mmap_read_unlock(mm)
        return result
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, haddr)
    if locked is None:
        await mmap_read_unlock(mm)
        return Scan.PMD_NULL
    ptep, ptl = locked
    unmapped = none = shared = referenced = 0
    writable = False
    for raw in await pgtable.get_raws_locked(k, ptep, nr):
        ent = arch.decode(arch.pte_level, raw)
        if _unmapped_pte(ent):
            unmapped += 1
            if not is_khugepaged or unmapped <= max_ptes_swap(k):
                if ent.uffd_wp or pte_marker_uffd_wp(ent):        # pte_swp_uffd_wp_any()
                    result = Scan.PTE_UFFD_WP
                    break
                continue
            result = Scan.EXCEED_SWAP_PTE
            k.stats["thp_scan_exceed_swap_pte"] += 1
            break
        if ent.kind is Kind.NONE or ent.kind is Kind.LEAF and ent.paddr == k.zero_page.paddr:
            none += 1
            armed = vma.uffd_missing or vma.uffd_wp or vma.uffd_minor   # userfaultfd_armed()
            if not armed and (not is_khugepaged or none <= MAX_PTES_NONE):
                continue
            result = Scan.EXCEED_NONE_PTE
            break
        if ent.uffd_wp:
            result = Scan.PTE_UFFD_WP
            break
        if ent.prot & Access.W:
            writable = True
        folio = None if ent.special else k.alloc.page_of(ent.paddr)     # vm_normal_page()
        if folio is None:
            result = Scan.PAGE_NULL
            break
        if folio.use is not PageUse.ANON:
            result = Scan.PAGE_ANON
            break
        if folio.mapcount > 1:                                          # folio_likely_mapped_shared()
            shared += 1
            if is_khugepaged and shared > max_ptes_shared(k):
                result = Scan.EXCEED_SHARED_PTE
                break
        if folio.locked:
            result = Scan.PAGE_LOCK
            break
        if not is_refcount_suitable(folio):
            result = Scan.PAGE_COUNT
            break
        if is_khugepaged and (ent.young or folio.extra.get("referenced")):
            referenced += 1
    if result is Scan.SUCCEED:
        if not writable:
            result = Scan.PAGE_RO
        elif is_khugepaged and (not referenced or unmapped and referenced < nr // 2):
            result = Scan.LACK_REFERENCED_PAGE     # swap in only for a well-referenced range
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    await mmap_read_unlock(mm)             # collapse_huge_page() starts by dropping it
    if result is not Scan.SUCCEED:
        return result
    return await collapse_huge_page(k, mm, haddr, unmapped=unmapped, referenced=referenced)


async def __collapse_huge_page_swapin(k, mm, vma, haddr: int, pmdp: int, referenced: int = 0) -> Scan:
    """__collapse_huge_page_swapin() (6.6), under mmap_read_lock: bring every swap pte of
    the range in through do_swap_page() with FAULT_FLAG_ALLOW_RETRY. One pte map is kept
    across the ptes that need nothing (``if (!pte++)``: pte_offset_map_nolock(), 6.13+
    pte_offset_map_ro_nolock()); do_swap_page() unmaps it, so the next swap pte maps again.
    GIVEUP, the collapse dropped, with mmap_lock released on every failure: a failed map
    is SCAN_PMD_NULL (unlock here); VM_FAULT_RETRY (folio_lock_or_retry() dropped
    mmap_lock) is SCAN_PAGE_LOCK; VM_FAULT_ERROR is SCAN_FAIL (unlock here). A swap pte
    someone else faulted in meanwhile is no failure (do_swap_page() returns 0)."""
    from mm_core.memory import (
        FAULT_FLAG_ALLOW_RETRY,
        VM_FAULT_RETRY,
        VmFault,
        do_swap_page,
        do_swap_page_marker,
        migration_entry_wait,
    )
    arch = k.arch
    nr = huge_memory.hpage_pmd_nr(k)
    swapped_in = 0
    ptep = None
    ptl = None
    vm_fault_error = VM_FAULT_OOM | VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV
    for i in range(nr):
        address = haddr + i * k.page_size
        vmf = VmFault(vma, address, FAULT_FLAG_ALLOW_RETRY, pmd=pmdp)
        if ptep is None:
            if k.profile.rw_nolock:
                mapped = await pgtable.pte_offset_map_ro_nolock(k, mm, pmdp, address)
            else:
                mapped = await pgtable.pte_offset_map_nolock(k, mm, pmdp, address)
            if mapped is None:
                await mmap_read_unlock(mm)
                k.stats["collapse_swapin:SCAN_PMD_NULL"] += 1
                return Scan.PMD_NULL
            ptep, ptl = mapped[0], mapped[1]
            base = i
        entp = ptep + (i - base) * 8
        vmf.orig_pte = await pgtable.get_raw(k, entp)              # ptep_get_lockless()
        ent = arch.decode(arch.pte_level, vmf.orig_pte)
        if not _unmapped_pte(ent):
            continue
        vmf.pte, vmf.ptl = entp, ptl
        if ent.kind is Kind.MIGRATION:
            await pgtable.pte_unmap(k, entp)                     # do_swap_page(): pte_unmap_same(),
            await migration_entry_wait(k, mm, "migration_entry")
            ret = 0
        elif is_pte_marker(ent):
            ret = await do_swap_page_marker(k, vmf, ent)
        else:
            ret = await do_swap_page(k, vmf)
        ptep = None                                             # which unmaps the pte
        if ret & VM_FAULT_RETRY:
            k.stats["collapse_swapin:SCAN_PAGE_LOCK"] += 1
            return Scan.PAGE_LOCK                               # mmap_lock already released
        if ret & vm_fault_error:
            await mmap_read_unlock(mm)
            k.stats["collapse_swapin:SCAN_FAIL"] += 1
            return Scan.FAIL
        swapped_in += 1
    if ptep is not None:
        await pgtable.pte_unmap(k, ptep + (nr - 1 - base) * 8)
    k.stats["collapse_swapin_pages"] += swapped_in             # lru_add_drain() is a no-op here
    return Scan.SUCCEED


def is_refcount_suitable(folio) -> bool:
    """is_refcount_suitable() (6.6): only the mappings' references, plus the swap cache's."""
    expected = folio.mapcount + (1 if "swap" in folio.extra else 0)
    return folio.refcount == expected


async def collapse_huge_page(k, mm, haddr: int, unmapped: int = 0, referenced: int = 0) -> Scan:
    """collapse_huge_page() (6.6), entered with mmap_lock released (the kernel's first
    step is mmap_read_unlock()): allocate the THP; under mmap_read_lock
    hugepage_vma_revalidate() and find_pmd_or_thp_or_none(), and with ``unmapped`` swap
    ptes __collapse_huge_page_swapin() (its failure returns with mmap_lock dropped: the
    collapse is given up); then under mmap_write_lock revalidate again, check the pmd
    (check_pmd_still_valid()), detach the PTE table, copy its pages into the THP, deposit
    the table and map the THP with one PMD. A swap pte left (someone swapped it out again,
    or do_swap_page() backed out) is SCAN_PTE_NON_PRESENT at isolation."""
    from mm_core.memory import mm_counter, put_page, vm_get_page_prot
    from mm_core.swap_state import free_swap_cache
    arch = k.arch
    nr = huge_memory.hpage_pmd_nr(k)
    try:
        new = k.alloc.alloc_pages(huge_memory.hpage_pmd_order(k), PageUse.ANON, owner=mm)
    except OutOfMemory:
        return Scan.ALLOC_HUGE_PAGE_FAIL
    await mmap_read_lock(mm)
    result, vma = hugepage_vma_revalidate(k, mm, haddr)
    if result is Scan.SUCCEED:
        result, pmdp = await find_pmd_or_thp_or_none(k, mm, haddr)
    if result is not Scan.SUCCEED:
        await mmap_read_unlock(mm)
        k.alloc.free_pages(new)
        return result
    if unmapped:
        result = await __collapse_huge_page_swapin(k, mm, vma, haddr, pmdp, referenced)
        if result is not Scan.SUCCEED:
            k.alloc.free_pages(new)                 # out_nolock: mmap_lock already dropped
            return result
    await mmap_read_unlock(mm)
    await mmap_write_lock(mm)
    try:
        result, vma = hugepage_vma_revalidate(k, mm, haddr)
        if result is not Scan.SUCCEED:
            k.alloc.free_pages(new)
            return result
        result, pmdp2 = await find_pmd_or_thp_or_none(k, mm, haddr)    # check_pmd_still_valid()
        if result is Scan.SUCCEED and pmdp2 != pmdp:
            result = Scan.FAIL
        if result is not Scan.SUCCEED:
            k.alloc.free_pages(new)
            return result
        pml = await pgtable.pmd_lockptr(k, mm, pmdp)
        await traps.lock(pml)
        raw = await pmdp_collapse_flush(k, vma, haddr, pmdp)
        await traps.unlock(pml)
        pmdval = arch.decode(arch.pmd_level, raw)
        table = k.ptdescs[pmdval.paddr]
        # isolate: the detached table is ours (pte_offset_map_lock on the stack copy)
        entries = [arch.decode(arch.pte_level, k.physmem.read_entry(table.paddr + i * 8)) for i in range(nr)]
        bad = [e for e in entries if e.kind not in (Kind.NONE, Kind.LEAF)]
        none = sum(e.kind is Kind.NONE for e in entries)
        if bad or none > MAX_PTES_NONE:
            await traps.lock(pml)                     # restore the pmd
            await pgtable.set_entry(k, pmdp, arch.pmd_level, table_entry(table.paddr))
            await traps.unlock(pml)
            k.alloc.free_pages(new)
            return Scan.PTE_NON_PRESENT if bad else Scan.EXCEED_NONE_PTE
        # __collapse_huge_page_isolate(): !is_refcount_suitable(folio) is SCAN_PAGE_COUNT.
        # A GUP reference or pin taken before the pmd was cleared shows here; GUP-fast
        # cannot take a new one later: it rechecks the pmd after grabbing the page.
        folios = {id(p): p for e in entries if e.kind is Kind.LEAF and not e.special
                  for p in [k.alloc.page_of(e.paddr)] if p is not None}
        if any(not is_refcount_suitable(p) for p in folios.values()):
            await traps.lock(pml)                     # restore the pmd
            await pgtable.set_entry(k, pmdp, arch.pmd_level, table_entry(table.paddr))
            await traps.unlock(pml)
            k.alloc.free_pages(new)
            return Scan.PAGE_COUNT
        await traps.sched_point("collapse_isolated", haddr)     # anon_vma_unlock_write()
        # __collapse_huge_page_copy(): copy every page, then clear each pte of the
        # detached table (under its ptl, a scheduling point each) and drop the old page
        for i, e in enumerate(entries):
            if e.kind is Kind.LEAF and not e.special:
                k.physmem.copy(new.paddr + i * k.page_size, e.paddr, k.page_size)
        ptl = table.ptl or mm.page_table_lock
        for i, e in enumerate(entries):
            if e.kind is Kind.NONE:
                continue
            await traps.lock(ptl)
            await pgtable.clear_entry(k, table.paddr + i * 8, arch.pte_level)     # ptep_clear()
            await traps.unlock(ptl)
            page = None if e.special else k.alloc.page_of(e.paddr)
            if page is not None:
                # folio_remove_rmap_pte() + free_page_and_swap_cache(): a swapped-in
                # folio's swap cache (and slot) goes with its last mapping
                page.mapcount -= 1
                mm.rss[mm_counter(page)] -= 1
                await free_swap_cache(k, page)
                put_page(k, page)
        prot = vm_get_page_prot(vma.flags) | (Access.W if vma.flags & VM_WRITE else Access.NONE)
        await traps.lock(pml)
        huge_memory.pgtable_trans_huge_deposit(k, mm, pmdp, table)
        new.mapcount = 1
        rmap.folio_add_new_anon_rmap(k, new, vma, haddr)
        mm.rss[1] += nr
        await pgtable.set_entry(k, pmdp, arch.pmd_level,
                                pgtable.pte_mkdirty(k, leaf_entry(new.paddr, prot, young=True)))
        await traps.unlock(pml)
        k.stats["thp_collapse_alloc"] += 1
        return Scan.SUCCEED
    finally:
        await mmap_write_unlock(mm)


# -- drivers ---------------------------------------------------------------------------------

def madvise_collapse_errno(result: Scan) -> int:
    """madvise_collapse_errno()."""
    if result in (Scan.SUCCEED, Scan.PMD_MAPPED):
        return 0
    if result is Scan.ALLOC_HUGE_PAGE_FAIL:
        return -12
    if result in (Scan.PAGE_LOCK, Scan.PAGE_COUNT):
        return -11
    return -22


async def madvise_collapse(k, mm, start: int, end: int) -> int:
    """madvise_collapse(): collapse every PMD-sized range of [start, end) synchronously.
    File/shmem ranges are collapsed with no mmap_lock, then mapped by PMD under
    mmap_read_lock (collapse_pte_mapped_thp(install_pmd=true))."""
    size = huge_memory.hpage_pmd_size(k)
    worst = 0
    haddr = (start + size - 1) & ~(size - 1)
    while haddr + size <= end:
        await mmap_read_lock(mm)
        vma = mm.vma_lookup(haddr)
        if vma is None or haddr + size > vma.end or vma.flags & VM_NOHUGEPAGE:
            await mmap_read_unlock(mm)
            worst = worst or -22
            haddr += size
            continue
        if vma.anonymous:
            result = await hpage_collapse_scan_pmd(k, mm, vma, haddr, is_khugepaged=False)
        else:
            inode, index = vma.file, vma.pgoff + ((haddr - vma.start) >> k.page_shift)
            await mmap_read_unlock(mm)
            result = await collapse_file(k, inode, index, is_khugepaged=False)
            if result is Scan.PTE_MAPPED_HUGEPAGE:
                await mmap_read_lock(mm)
                result = await collapse_pte_mapped_thp(k, mm, haddr, install_pmd=True)
                await mmap_read_unlock(mm)
        k.stats[f"madvise_collapse:{result.value}"] += 1
        worst = worst or madvise_collapse_errno(result)
        haddr += size
    return worst


class Khugepaged:
    """The khugepaged kthread's state: registered mms (mm slots) and its wait queue."""

    def __init__(self) -> None:
        self.mm_slots: list = []
        self.wq = WaitQueue("khugepaged_wait")
        self.full_scans = 0
        self.scan_sleep = SCAN_SLEEP_CYCLES

    def enter(self, mm) -> None:
        """khugepaged_enter_vma(): start scanning this mm."""
        if mm not in self.mm_slots:
            self.mm_slots.append(mm)
        self.wq.post()


async def khugepaged(k) -> None:
    """khugepaged: scan registered mms for PMD ranges worth collapsing, with
    mmap_read_trylock; file ranges are collapsed with no mmap_lock held and then, under
    mmap_read_lock, collapse_pte_mapped_thp(install_pmd=false) drops their PTE tables."""
    state = k.khugepaged
    while True:
        await traps.wait(state.wq)
        await traps.sleep(state.scan_sleep)          # khugepaged_wait_work()
        for mm in list(state.mm_slots):
            if hpage_collapse_test_exit(mm):
                state.mm_slots.remove(mm)
                continue
            await khugepaged_scan_mm_slot(k, mm)
        state.full_scans += 1


async def khugepaged_scan_mm_slot(k, mm) -> None:
    size = huge_memory.hpage_pmd_size(k)
    if not await traps.trylock(mm.mmap_lock, "r"):
        k.stats["khugepaged_trylock_failed"] += 1
        return
    work = []
    for vma in mm.vmas:
        if not vma.flags & VM_HUGEPAGE or vma.flags & VM_NOHUGEPAGE:
            continue
        haddr = (vma.start + size - 1) & ~(size - 1)
        while haddr + size <= vma.end and len(work) * huge_memory.hpage_pmd_nr(k) < PAGES_TO_SCAN:
            work.append((vma, haddr))
            haddr += size
    await traps.unlock(mm.mmap_lock, "r")
    start = await traps.choose(len(work), "khugepaged.addr")    # where the scan resumes
    work = work[start:] + work[:start]
    for vma, haddr in work:
        if hpage_collapse_test_exit(mm):
            return
        if vma.anonymous:
            await mmap_read_lock(mm)
            result, vma = hugepage_vma_revalidate(k, mm, haddr)
            if result is Scan.SUCCEED:
                result = await hpage_collapse_scan_pmd(k, mm, vma, haddr, is_khugepaged=True)
            else:
                await mmap_read_unlock(mm)
        else:
            index = vma.pgoff + ((haddr - vma.start) >> k.page_shift)
            result = await collapse_file(k, vma.file, index, is_khugepaged=True)
            if result in (Scan.SUCCEED, Scan.PTE_MAPPED_HUGEPAGE):
                await mmap_read_lock(mm)
                if not hpage_collapse_test_exit(mm):
                    await collapse_pte_mapped_thp(k, mm, haddr, install_pmd=False)
                await mmap_read_unlock(mm)
        k.stats[f"khugepaged:{result.value}"] += 1
