"""khugepaged's __collapse_huge_page_swapin() (6.6): an anon PMD range with swap ptes is
swapped in through do_swap_page() (FAULT_FLAG_ALLOW_RETRY) under mmap_read_lock before
collapse_huge_page() takes mmap_write_lock; the bytes written before MADV_PAGEOUT read back
from the THP, the swap slots go with the old folios, and the counters add up at exit
(check_mm). The GIVEUP categories are forced by hand-written schedules: a folio locked by
someone else (VM_FAULT_RETRY, mmap_lock dropped: SCAN_PAGE_LOCK), the table freed by
PT_RECLAIM under mmap_read_lock (6.14: SCAN_PMD_NULL), and khugepaged's max_ptes_swap."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, madvise
from mm_core.khugepaged import Scan
from mm_core.locks import mmap_read_lock
from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS
from tests.test_swap import ANON, ARCHES, BASE, RW, fault, fill, finish, pattern, pte, read_back


def pmd_kind(k, mm, va: int) -> Kind:
    from mm_core import rmap
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    return k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind


def swapped_range(arch: str = "x86_64", kernel: str = "6.6", swapped: int = 8, present: int = 4,
                  slots: int = 16, cache: bool = False):
    """One PMD extent of anon memory at BASE: ``swapped`` pages written and swapped out
    (MADV_PAGEOUT), then ``present`` more written and left mapped; the rest none.
    ``cache``: MADV_WILLNEED read the swapped ones back into the swap cache."""
    sc = Scenario(arch=arch, kernel=kernel, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    si = m.swapon(slots, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, huge_memory.hpage_pmd_size(k), RW, ANON)
    for i in range(swapped):
        fill(m, mm, a + i * page, i)
    m.madvise(mm, a, swapped * page, emu.MADV_PAGEOUT)
    for i in range(swapped, swapped + present):
        fill(m, mm, a + i * page, i)
    if cache:
        m.madvise(mm, a, swapped * page, emu.MADV_WILLNEED)
    assert mm.rss[MM_SWAPENTS] == swapped and si.inuse_pages == swapped
    return sc, m, k, mm, a, si


async def scan(k, mm, a: int, is_khugepaged: bool):
    """khugepaged_scan_mm_slot() / madvise_collapse() around one range: mmap_read_lock,
    then hpage_collapse_scan_pmd() (which returns with it released)."""
    await mmap_read_lock(mm)
    return await khugepaged.hpage_collapse_scan_pmd(k, mm, mm.vma_lookup(a), a, is_khugepaged)


@pytest.mark.parametrize("arch", ARCHES)
def test_madv_collapse_swaps_the_range_in_and_the_thp_holds_the_same_bytes(arch: str) -> None:
    sc, m, k, mm, a, si = swapped_range(arch)
    page, nr = k.page_size, huge_memory.hpage_pmd_nr(k)
    assert pte(k, mm, a).kind is Kind.SWAP
    m.madvise(mm, a, nr * page, emu.MADV_COLLAPSE)
    assert pmd_kind(k, mm, a) is Kind.LEAF
    assert k.stats["collapse_swapin_pages"] == 8 and k.stats["do_swap_page"] == 8
    assert k.stats["madvise_collapse:SCAN_SUCCEED"] == 1 and k.stats["thp_collapse_alloc"] == 1
    # the swapped-in folios' swap cache and slots went with their last mapping
    assert si.inuse_pages == 0 and si.cache == {} and k.stats["free_swap_cache"] == 8
    assert mm.rss[MM_SWAPENTS] == 0 and mm.rss[MM_ANONPAGES] == nr
    for i in range(12):
        assert read_back(m, mm, a + i * page) == pattern(i, page)
    assert read_back(m, mm, a + 12 * page) == bytes(page)
    finish(m, mm)                                       # check_mm at exit, nothing leaks


def test_khugepaged_gives_up_past_max_ptes_swap_and_madv_collapse_does_not() -> None:
    limit = 64                                          # HPAGE_PMD_NR / 8 on x86_64
    sc, m, k, mm, a, si = swapped_range(swapped=limit + 1, present=1, slots=80)
    assert khugepaged.max_ptes_swap(k) == limit
    assert run_sync(scan(k, mm, a, is_khugepaged=True)) is Scan.EXCEED_SWAP_PTE
    assert k.stats["thp_scan_exceed_swap_pte"] == 1 and k.stats["do_swap_page"] == 0
    assert pmd_kind(k, mm, a) is Kind.TABLE and mm.rss[MM_SWAPENTS] == limit + 1
    assert not mm.mmap_lock.readers
    # MADV_COLLAPSE (cc->is_khugepaged false) swaps in any number
    assert run_sync(scan(k, mm, a, is_khugepaged=False)) is Scan.SUCCEED
    assert k.stats["collapse_swapin_pages"] == limit + 1 and si.inuse_pages == 0
    assert mm.rss[MM_SWAPENTS] == 0 and pmd_kind(k, mm, a) is Kind.LEAF
    for i in (0, limit // 2, limit):
        assert read_back(m, mm, a + i * k.page_size) == pattern(i, k.page_size)
    finish(m, mm)


def test_khugepaged_swaps_in_only_for_a_well_referenced_range() -> None:
    """hpage_collapse_scan_pmd() for khugepaged: with swap ptes it wants at least
    HPAGE_PMD_NR / 2 young ptes (SCAN_LACK_REFERENCED_PAGE, nothing swapped in), and no
    writable pte at all is SCAN_PAGE_RO (MADV_COLLAPSE too)."""
    sc, m, k, mm, a, si = swapped_range(arch="arm64", swapped=3, present=1)
    nr = huge_memory.hpage_pmd_nr(k)
    assert run_sync(scan(k, mm, a, is_khugepaged=True)) is Scan.LACK_REFERENCED_PAGE
    assert k.stats["do_swap_page"] == 0 and mm.rss[MM_SWAPENTS] == 3
    for i in range(4, nr // 2 + 3):                     # young, written ptes: a hot range
        fill(m, mm, a + i * k.page_size, i)
    assert run_sync(scan(k, mm, a, is_khugepaged=True)) is Scan.SUCCEED
    assert k.stats["collapse_swapin_pages"] == 3 and pmd_kind(k, mm, a) is Kind.LEAF
    assert [read_back(m, mm, a + i * k.page_size) for i in range(5)] == \
        [pattern(i, k.page_size) for i in range(5)]
    finish(m, mm)


def test_a_range_with_no_writable_pte_is_scan_page_ro() -> None:
    sc, m, k, mm, a, si = swapped_range(swapped=2, present=0)
    m.touch(mm, a + 5 * k.page_size)                    # a read fault: the zero page, none
    assert run_sync(scan(k, mm, a, is_khugepaged=False)) is Scan.PAGE_RO
    assert k.stats["do_swap_page"] == 0 and pmd_kind(k, mm, a) is Kind.TABLE
    finish(m, mm)


def test_a_locked_swap_cache_folio_drops_mmap_lock_and_gives_the_collapse_up() -> None:
    """do_swap_page()'s folio_lock_or_retry() finds the cached folio locked: with
    FAULT_FLAG_ALLOW_RETRY it releases mmap_read_lock, waits for the bit and returns
    VM_FAULT_RETRY; __collapse_huge_page_swapin() answers SCAN_PAGE_LOCK with the lock
    already dropped (GIVEUP: no second unlock, no write lock taken). The swap pte stays,
    and MADV_COLLAPSE reports -EAGAIN."""
    sc, m, k, mm, a, si = swapped_range(swapped=2, present=1, cache=True)
    folio = si.cache[pte(k, mm, a).swp_offset]
    folio.locked = True                                  # someone else holds PG_locked
    sc.task("collapse", madvise.do_madvise(k, mm, a, huge_memory.hpage_pmd_size(k), emu.MADV_COLLAPSE))
    sc.run("collapse:*", finish=False)
    assert sc.state("collapse").name == "BLOCKED"        # folio_wait_locked()
    assert not mm.mmap_lock.readers and mm.mmap_lock.writer is None      # released first
    assert k.stats["folio_lock_or_retry_failed"] == 1
    folio.locked = False                                 # folio_unlock()
    sc.run("collapse:*")
    assert sc.results["collapse"] == -11 and k.stats["madvise_collapse:SCAN_PAGE_LOCK"] == 1
    assert k.stats["collapse_swapin:SCAN_PAGE_LOCK"] == 1 and k.stats["thp_collapse_alloc"] == 0
    assert pmd_kind(k, mm, a) is Kind.TABLE and pte(k, mm, a).kind is Kind.SWAP
    assert mm.rss[MM_SWAPENTS] == 2 and mm.rss[MM_ANONPAGES] == 1
    # the next attempt gets the folio lock and collapses
    m.madvise(mm, a, huge_memory.hpage_pmd_size(k), emu.MADV_COLLAPSE)
    assert k.stats["madvise_collapse:SCAN_SUCCEED"] == 1
    assert [read_back(m, mm, a + i * k.page_size) for i in range(3)] == \
        [pattern(i, k.page_size) for i in range(3)]
    assert si.inuse_pages == 0 and mm.rss[MM_SWAPENTS] == 0
    finish(m, mm)


def test_a_user_fault_on_a_locked_swap_cache_folio_retries_with_fault_flag_tried() -> None:
    """The same folio_lock_or_retry() from a user fault: VM_FAULT_RETRY with mmap_lock
    dropped, do_user_addr_fault() retries with FAULT_FLAG_TRIED and then sleeps in
    folio_lock()."""
    sc, m, k, mm, a, si = swapped_range(swapped=1, present=0, cache=True)
    folio = si.cache[pte(k, mm, a).swp_offset]
    folio.locked = True
    sc.task("t1", fault(k, mm, a))
    sc.run("t1:*", finish=False)
    assert sc.state("t1").name == "BLOCKED" and not mm.mmap_lock.readers
    folio.locked = False
    sc.run("t1:*")
    assert k.stats["fault_retry"] == 1 and k.stats["do_swap_page"] == 1
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_swapin_map_fails_after_pt_reclaim_and_the_collapse_is_given_up(arch: str) -> None:
    """6.14: MADV_DONTNEED of the whole extent (mmap_read_lock too) frees the PTE table
    (PT_RECLAIM) after collapse_huge_page()'s find_pmd_or_thp_or_none(): the swap-in's
    pte_offset_map_ro_nolock() fails, SCAN_PMD_NULL with mmap_lock released (GIVEUP)."""
    sc, m, k, mm, a, si = swapped_range(arch, kernel="6.14", swapped=2, present=1)
    span = huge_memory.hpage_pmd_size(k)
    sc.task("collapse", madvise.do_madvise(k, mm, a, span, emu.MADV_COLLAPSE))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, span, emu.MADV_DONTNEED))
    # the scan's pte_offset_map_lock is the first map; the swap-in's is the second
    sc.run("collapse:rcu_read_lock#2 dontneed:*", finish=False)
    assert k.stats["pt_reclaimed"] == 1 and sc.results["dontneed"] == 0
    sc.run("collapse:*")
    assert sc.results["collapse"] == -22 and k.stats["collapse_swapin:SCAN_PMD_NULL"] == 1
    assert k.stats["madvise_collapse:SCAN_PMD_NULL"] == 1 and k.stats["do_swap_page"] == 0
    assert not mm.mmap_lock.readers and k.stats["thp_collapse_alloc"] == 0
    assert si.inuse_pages == 0 and mm.rss[MM_SWAPENTS] == mm.rss[MM_ANONPAGES] == 0
    finish(m, mm)
