"""shmem swap (6.6 mm/shmem.c): MADV_PAGEOUT of a shared memfd mapping reclaims its
folios (folio_referenced over the file rmap, try_to_unmap of the file ptes through
page_vma_mapped_walk, pageout = shmem_writepage: the index then holds the swap entry);
a fault or swapoff's shmem_unuse() brings the same bytes back (shmem_swapin_folio), and
truncation / eviction free the slots. Counters (MM_SHMEMPAGES) are checked at exit, the
-EEXIST "look again" of shmem_swapin_folio is forced by a hand-written schedule."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, shmem, swapfile, vmscan
from mm_core.memory import FaultResult
from mm_core.mm import MM_SHMEMPAGES
from tests.test_swap import ARCHES, BASE, RW, fault, fill, finish, pattern, pte, read_back

SHARED = emu.MAP_SHARED | emu.MAP_FIXED


def shmem_world(arch: str = "x86_64", pages: int = 4, out: int | None = None, slots: int = 16):
    """A memfd of ``pages`` pages mapped shared at BASE, each written with its pattern;
    the first ``out`` (default all) then paged out with MADV_PAGEOUT."""
    sc = Scenario(arch=arch, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    si = m.swapon(slots, readahead=1)
    inode = m.memfd_create("swapme", pages * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * page, RW, SHARED, file=inode)
    for i in range(pages):
        fill(m, mm, a + i * page, i)
    out = pages if out is None else out
    if out:
        m.madvise(mm, a, out * page, emu.MADV_PAGEOUT)
    return sc, m, k, mm, inode, a, si


@pytest.mark.parametrize("arch", ARCHES)
def test_pageout_moves_shmem_pages_to_swap_and_a_fault_reads_them_back(arch: str) -> None:
    sc, m, k, mm, inode, a, si = shmem_world(arch, pages=4, out=3)
    page, mapping = k.page_size, inode.mapping
    assert k.stats["shmem_writepage"] == 3 and k.stats["reclaim_swapped_out"] == 3
    assert sorted(mapping.swap_entries) == [0, 1, 2] and sorted(mapping.i_pages) == [3]
    assert inode.swapped == 3 and inode in k.shmem_swaplist and si.cache == {}
    for i in range(3):
        off = mapping.swap_entries[i]
        assert si.swap_map[off] == 1 and si.slots[off] == pattern(i, page)   # the mapping's count
        assert pte(k, mm, a + i * page).kind is Kind.NONE                      # file ptes: cleared
    assert mm.rss[MM_SHMEMPAGES] == 1 and si.inuse_pages == 3
    # a read fault: shmem_fault -> shmem_get_folio -> shmem_swapin_folio
    assert read_back(m, mm, a + page) == pattern(1, page)
    assert k.stats["shmem_swapin"] == 1 and 1 in mapping.i_pages and 1 not in mapping.swap_entries
    assert inode.swapped == 2 and si.inuse_pages == 2 and si.cache == {}
    assert mm.rss[MM_SHMEMPAGES] == 2
    # a second mapping of the file sees the rest through the page cache path too
    mm2 = m.new_mm()
    b = m.mmap(mm2, BASE, 4 * page, RW, SHARED, file=inode)
    for i in range(4):
        assert read_back(m, mm2, b + i * page) == pattern(i, page)
    assert si.inuse_pages == 0 and inode.swapped == 0 and mapping.swap_entries == {}
    assert read_back(m, mm, a) == pattern(0, page)
    assert mm.rss[MM_SHMEMPAGES] == 4                   # fault-around mapped index 2 as well
    finish(m, mm, mm2, files=[inode])


def test_swapoff_brings_unmapped_shmem_pages_back_through_shmem_unuse() -> None:
    sc, m, k, mm, inode, a, si = shmem_world("arm64", pages=20, slots=32)
    page = k.page_size
    assert inode.swapped == 20 and si.inuse_pages == 20
    m.munmap(mm, a, 20 * page)                          # nothing maps the file any more
    m.swapoff()
    # shmem_find_swap_entries() hands out batches of 15: two batches for one inode
    assert k.swap_info is None and k.stats["shmem_swapin"] == 20 and k.stats["shmem_swap_major"] == 20
    assert inode.swapped == 0 and inode.mapping.swap_entries == {} and k.shmem_swaplist == []
    assert k.stats["unuse_pte"] == 0                    # no mm held an entry
    b = m.mmap(mm, BASE, 20 * page, RW, SHARED, file=inode)
    for i in range(20):
        assert read_back(m, mm, b + i * page) == pattern(i, page)
    finish(m, mm, files=[inode])


def test_swapoff_with_shmem_and_anon_swap_both_come_back() -> None:
    sc, m, k, mm, inode, a, si = shmem_world(pages=2)
    page = k.page_size
    anon = m.mmap(mm, BASE + 0x100000, page, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    fill(m, mm, anon, 9)
    m.madvise(mm, anon, page, emu.MADV_PAGEOUT)
    assert si.inuse_pages == 3
    m.swapoff()
    assert k.swap_info is None and k.stats["unuse_pte"] == 1 and k.stats["shmem_swapin"] == 2
    assert read_back(m, mm, anon) == pattern(9, page)
    assert [read_back(m, mm, a + i * page) for i in range(2)] == [pattern(i, page) for i in range(2)]
    finish(m, mm, files=[inode])


def test_a_referenced_shmem_page_is_kept_and_a_truncated_swap_entry_frees_its_slot() -> None:
    sc, m, k, mm, inode, a, si = shmem_world(pages=3, out=0)
    page = k.page_size
    m.madvise(mm, a, 2 * page, emu.MADV_PAGEOUT)        # the walk clears young: both go out
    assert inode.swapped == 2
    # shrink_folio_list() on a young mapped shmem folio (no MADV_PAGEOUT walk before it):
    # folio_referenced() over the file rmap finds the young pte, FOLIOREF_KEEP
    m.touch(mm, a + 2 * page)
    folio = inode.mapping.i_pages[2]
    folio.refcount += 1                                 # isolated
    [res] = run_sync(vmscan.shrink_folio_list(k, [folio], isolated=True))
    assert res.kept and res.referenced == 1 and k.stats["reclaim_kept_referenced"] == 1
    assert inode.mapping.i_pages[2] is folio and pte(k, mm, a + 2 * page).kind is Kind.LEAF
    # ftruncate to one page: index 1's swap entry goes and its slot is freed
    run_sync(shmem.shmem_setattr_size(k, inode, page))
    assert sorted(inode.mapping.swap_entries) == [0] and inode.swapped == 1 and si.inuse_pages == 1
    assert k.stats["shmem_free_swap"] == 1
    assert read_back(m, mm, a) == pattern(0, page)
    finish(m, mm, files=[inode])                        # eviction would free the rest


def test_two_faults_on_one_swapped_index_the_loser_gets_eexist_and_looks_again() -> None:
    """t1 allocated the folio, put it in the swap cache and read it (swap_readpage), and
    is parked before folio_lock(); t2 finds the folio in the swap cache, locks it and
    moves it to the page cache (delete_from_swap_cache, swap_free). t1 then holds a folio
    that is no longer the swap cache's for the slot: -EEXIST, ``goto repeat``, and the
    page cache hit maps it."""
    sc, m, k, mm, inode, a, si = shmem_world(pages=1)
    sc.task("t1", fault(k, mm, a))
    sc.task("t2", fault(k, mm, a))
    sc.run("t1:swap_io#1 t2:*", finish=False)
    assert sc.results == {"t2": FaultResult.OK} and k.stats["shmem_swapin"] == 1
    assert inode.swapped == 0 and si.inuse_pages == 0 and si.cache == {}
    sc.run("t1:*")
    assert sc.results == {"t1": FaultResult.OK, "t2": FaultResult.OK}
    assert k.stats["shmem_swapin"] == 1 and k.stats["shmem_swapin_err-17"] == 1
    assert k.stats["shmem_swapin_repeat"] == 1 and k.stats["swap_readpage"] == 1
    assert mm.rss[MM_SHMEMPAGES] == 1
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm, files=[inode])


def test_collapse_file_swaps_shmem_pages_in_and_large_folios_stay_out_of_swap() -> None:
    sc = Scenario(arch="x86_64", mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    si = m.swapon(8, readahead=1)
    inode = m.memfd_create("thp", size)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, SHARED, file=inode)
    for i in range(4):
        fill(m, mm, a + i * page, i)
    m.madvise(mm, a, 2 * page, emu.MADV_PAGEOUT)
    assert inode.swapped == 2
    m.madvise(mm, a, size, emu.MADV_COLLAPSE)           # collapse_file: SGP_NOALLOC swap-in
    assert inode.swapped == 0 and si.inuse_pages == 0 and k.stats["shmem_swapin"] == 2
    folio = inode.mapping.i_pages[0]
    assert folio.order == huge_memory.hpage_pmd_order(k)
    for i in range(4):
        assert read_back(m, mm, a + i * page) == pattern(i, page)
    m.madvise(mm, a, size, emu.MADV_PAGEOUT)            # a large shmem folio: kept
    assert inode.mapping.i_pages[0] is folio and inode.swapped == 0 and si.inuse_pages == 0
    finish(m, mm, files=[inode])


def test_swap_slots_of_an_evicted_inode_are_freed() -> None:
    sc, m, k, mm, inode, a, si = shmem_world(pages=3)
    assert si.inuse_pages == 3
    m.exit_mm(mm)
    m.close_file(inode)                                 # shmem_evict_inode: shmem_free_swap
    assert si.inuse_pages == 0 and k.shmem_swaplist == [] and k.stats["shmem_free_swap"] == 3
    assert swapfile.swap_leaks(k) == []
    m.rcu_barrier()
    assert k.alloc.pages.keys() == {k.zero_page.pfn}
