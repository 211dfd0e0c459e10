"""Swap (mm_core/swapfile.py, swap_state.py, memory.do_swap_page, vmscan, madvise): the
swap-out of MADV_PAGEOUT through real swap ptes, do_swap_page bringing the same bytes back,
fork's shared swap counts, MADV_WILLNEED's read-ahead walk, swapoff's unuse walk, the
slots freed by zap, and the walkers' failure categories forced by schedules:
do_swap_page's pte_same failure (FAULT-RETRY), the swap cache released under a fault,
and (6.14, PT_RECLAIM) the table gone between the pmd read and the map."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import madvise, memory, pgtable, rmap, swapfile
from mm_core.memory import FaultResult
from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS
from mm_core.swapfile import SWAP_HAS_CACHE

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def pte(k, mm, va: int):
    """The pte for ``va``, decoded from guest RAM."""
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.TABLE
    return k.arch.decode(k.arch.pte_level,
                         k.physmem.read_entry(pgtable.entry_addr(k, pmd.paddr, k.arch.pte_level, va)))


def pattern(i: int, n: int) -> bytes:
    return bytes((i * 31 + j * 7) & 0xFF for j in range(n))


def fill(m, mm, va: int, i: int) -> int:
    """Write a recognisable page at ``va`` through the fault path; returns the frame."""
    pa = m.touch(mm, va, write=True)
    m.physmem[pa:pa + m.kernel.page_size] = pattern(i, m.kernel.page_size)
    return pa


def read_back(m, mm, va: int) -> bytes:
    """What the guest reads at ``va``: the hardware walk, faulting it in if needed."""
    pa = m.touch(mm, va)
    return bytes(m.physmem[pa:pa + m.kernel.page_size])


def finish(m, *mms, files=()) -> None:
    k = m.kernel
    for mm in mms:
        m.exit_mm(mm)
    for f in files:
        m.close_file(f)
    m.rcu_barrier()
    assert swapfile.swap_leaks(k) == []
    assert k.ptdescs == {} and k.alloc.pages.keys() == {k.zero_page.pfn}


@pytest.mark.parametrize("arch", ARCHES)
def test_pageout_writes_swap_ptes_and_the_fault_reads_the_same_bytes_back(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    si = m.swapon(16, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    frames = [fill(m, mm, a + i * page, i) for i in range(4)]
    m.madvise(mm, a, 8 * page, emu.MADV_PAGEOUT)
    offsets = []
    for i in range(4):
        e = pte(k, mm, a + i * page)
        assert e.kind is Kind.SWAP and e.swp_type == 0 and e.exclusive
        assert m.translate(mm, a + i * page) is None and k.alloc.page_of(frames[i]) is None
        assert si.swap_map[e.swp_offset] == 1 and si.slots[e.swp_offset] == pattern(i, page)
        offsets.append(e.swp_offset)
    assert len(set(offsets)) == 4 and si.inuse_pages == 4 and si.cache == {}
    assert mm.rss[MM_ANONPAGES] == 0 and mm.rss[MM_SWAPENTS] == 4 and mm in k.mmlist
    # a read fault: the same bytes, read-only, the slot kept for the clean swap-cache copy
    assert read_back(m, mm, a) == pattern(0, page)
    e = pte(k, mm, a)
    assert e.kind is Kind.LEAF and m.translate(mm, a, "w") is None
    folio = k.alloc.page_of(e.paddr)
    assert si.cache[offsets[0]] is folio and si.swap_map[offsets[0]] == SWAP_HAS_CACHE
    assert (folio.mapcount, folio.refcount) == (1, 2) and k.stats["swap_major_fault"] == 1
    # a write to it: do_wp_page reuses the exclusive folio and drops its swap cache
    m.touch(mm, a, write=True)
    assert pte(k, mm, a).paddr == folio.paddr and offsets[0] not in si.cache
    assert folio.refcount == 1 and si.swap_map[offsets[0]] == 0
    # a write fault on a swap pte: writable at once, the slot freed (should_try_to_free_swap)
    pa = m.touch(mm, a + page, write=True)
    assert bytes(m.physmem[pa:pa + page]) == pattern(1, page) and pte(k, mm, a + page).dirty
    assert si.swap_map[offsets[1]] == 0 and si.inuse_pages == 2
    assert mm.rss[MM_ANONPAGES] == 2 and mm.rss[MM_SWAPENTS] == 2
    finish(m, mm)                                  # exit zaps two swap ptes: their slots go
    assert si.inuse_pages == 0 and mm not in k.mmlist


def test_pageout_without_swap_or_with_a_full_area_keeps_the_pages() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    for i in range(4):
        fill(m, mm, a + i * page, i)
    m.madvise(mm, a, 4 * page, emu.MADV_PAGEOUT)           # no swap area
    assert k.stats["pageout_kept"] == 4 and mm.rss[MM_SWAPENTS] == 0
    si = m.swapon(2)
    m.madvise(mm, a, 4 * page, emu.MADV_PAGEOUT)           # two slots for four pages
    assert k.stats["reclaim_swapped_out"] == 2 and k.stats["swap_full"] == 2
    assert [pte(k, mm, a + i * page).kind for i in range(4)] == [Kind.SWAP] * 2 + [Kind.LEAF] * 2
    assert si.inuse_pages == 2 and mm.rss[MM_SWAPENTS] == 2 and mm.rss[MM_ANONPAGES] == 2
    for i in range(4):
        assert read_back(m, mm, a + i * page) == pattern(i, page)
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_fork_duplicates_swap_counts_and_both_sides_read_the_same_data(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    si = m.swapon(8, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    fill(m, mm, a, 7)
    fill(m, mm, a + page, 8)
    m.madvise(mm, a, 2 * page, emu.MADV_PAGEOUT)
    off = pte(k, mm, a).swp_offset
    child = m.fork_mm(mm)
    for side in (mm, child):                                   # copy_nonpresent_pte
        e = pte(k, side, a)
        assert e.kind is Kind.SWAP and e.swp_offset == off and not e.exclusive
    assert si.swap_map[off] == 2 and child.rss[MM_SWAPENTS] == 2 and child in k.mmlist
    # the child faults it in; the parent then maps the very same swap-cache folio
    assert read_back(m, child, a) == pattern(7, page)
    assert read_back(m, mm, a) == pattern(7, page)
    folio = k.alloc.page_of(pte(k, mm, a).paddr)
    assert pte(k, child, a).paddr == folio.paddr and folio.mapcount == 2 and si.cache[off] is folio
    # a write by the child copies (the folio is shared): the parent keeps the old bytes
    pa = m.touch(child, a, write=True)
    m.physmem[pa:pa + 4] = b"kid!"
    assert pa != folio.paddr and read_back(m, mm, a) == pattern(7, page)
    m.exit_mm(mm)                                   # the parent goes first: one swap pte left
    assert si.swap_map[pte(k, child, a + page).swp_offset] == 1
    assert read_back(m, child, a + page) == pattern(8, page)
    finish(m, child)


@pytest.mark.parametrize("arch", ["arm64", "ppc64"])
def test_zap_of_swap_ptes_frees_their_slots(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    si = m.swapon(8, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 6 * page, RW, ANON)
    for i in range(6):
        fill(m, mm, a + i * page, i)
    m.madvise(mm, a, 6 * page, emu.MADV_PAGEOUT)
    m.madvise(mm, a + 4 * page, page, emu.MADV_WILLNEED)     # slot 5 cached, pte still swap
    assert pte(k, mm, a + 4 * page).kind is Kind.SWAP and len(si.cache) == 1
    m.madvise(mm, a, 2 * page, emu.MADV_DONTNEED)
    assert si.inuse_pages == 4 and mm.rss[MM_SWAPENTS] == 4
    assert read_back(m, mm, a) == bytes(page)                  # gone: a fresh zero page
    m.madvise(mm, a + 2 * page, page, emu.MADV_FREE)           # MADV_FREE drops a swap pte too
    assert si.inuse_pages == 3 and pte(k, mm, a + 2 * page).kind is Kind.NONE
    m.munmap(mm, a + 3 * page, 2 * page)                       # the cached one: folio freed too
    assert si.inuse_pages == 1 and si.cache == {} and mm.rss[MM_SWAPENTS] == 1
    assert k.stats["swap_cache_reclaimed"] == 1
    finish(m, mm)                                              # exit_mmap: the last one


@pytest.mark.parametrize("arch", ARCHES)
def test_willneed_reads_swapped_pages_into_the_swap_cache(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    si = m.swapon(8, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    for i in range(4):
        fill(m, mm, a + i * page, i)
    m.madvise(mm, a, 4 * page, emu.MADV_PAGEOUT)
    m.madvise(mm, a + page, 2 * page, emu.MADV_WILLNEED)
    assert k.stats["swapin_walk_read"] == 2 and k.stats["swap_readpage"] == 2
    cached = {pte(k, mm, a + i * page).swp_offset: i for i in (1, 2)}
    assert set(si.cache) == set(cached)
    for off, i in cached.items():
        folio = si.cache[off]
        assert folio.extra["uptodate"] and not folio.locked and folio.refcount == 1
        assert bytes(m.physmem[folio.paddr:folio.paddr + page]) == pattern(i, page)
    assert pte(k, mm, a + page).kind is Kind.SWAP                # only read ahead, not mapped
    assert m.mincore(mm, a, 4 * page) == [0, 1, 1, 0]           # mincore_page() of the swap cache
    hits = k.stats["swap_cache_hit"]
    assert read_back(m, mm, a + 2 * page) == pattern(2, page)
    assert k.stats["swap_cache_hit"] == hits + 1 and k.stats["swap_readpage"] == 2   # no I/O
    finish(m, mm)


def test_fault_readahead_reads_the_window_around_the_fault() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    si = m.swapon(16, readahead=4)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    for i in range(8):
        fill(m, mm, a + i * page, i)
    m.madvise(mm, a, 8 * page, emu.MADV_PAGEOUT)
    assert read_back(m, mm, a + 4 * page) == pattern(4, page)
    # the window [3, 7): pages 3, 5, 6 read ahead into the cache, page 4 mapped
    assert k.stats["swap_ra"] == 3 and len(si.cache) == 4
    for i in (3, 5, 6):
        assert pte(k, mm, a + i * page).swp_offset in si.cache
    assert read_back(m, mm, a + 5 * page) == pattern(5, page) and k.stats["swap_major_fault"] == 1
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_swapoff_brings_every_page_back_in_every_mm(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    pmd_span = k.arch.levels[k.arch.pmd_level].span
    si = m.swapon(16)
    mm = m.new_mm()
    # two PMD extents, the first with no table: unuse_pte_range's map of it fails (skip)
    a = m.mmap(mm, BASE, 2 * pmd_span, RW, ANON)
    b = a + pmd_span
    for i in range(5):
        fill(m, mm, b + i * page, i)
    m.madvise(mm, b, 5 * page, emu.MADV_PAGEOUT)
    child = m.fork_mm(mm)
    m.madvise(mm, b + 3 * page, page, emu.MADV_WILLNEED)      # one already in the swap cache
    assert si.inuse_pages == 5 and mm.rss[MM_SWAPENTS] == child.rss[MM_SWAPENTS] == 5
    m.swapoff()
    assert k.swap_info is None and si.inuse_pages == 0 and si.cache == {} and si.freed
    assert k.stats["unuse_pte"] == 10 and k.stats["unuse_pte_range_map_failed"] >= 2
    for side in (mm, child):
        assert side.rss[MM_SWAPENTS] == 0 and side.rss[MM_ANONPAGES] == 5
        for i in range(5):
            e = pte(k, side, b + i * page)
            assert e.kind is Kind.LEAF and not e.young            # pte_mkold(mk_pte())
            assert read_back(m, side, b + i * page) == pattern(i, page)
        assert pte(k, mm, b).paddr == pte(k, child, b).paddr      # still shared: COW on write
    m.touch(child, b, write=True)
    assert read_back(m, mm, b) == pattern(0, page)
    with pytest.raises(OSError):
        m.swapoff()                                               # no area any more: -EINVAL
    finish(m, mm, child)


# -- the failure categories, forced ------------------------------------------------------------

def swapped_world(arch: str = "x86_64", kernel: str = "6.6", pages: int = 1, cache: bool = False):
    """A Scenario whose mm has ``pages`` anon pages swapped out at BASE (readahead off);
    ``cache``: MADV_WILLNEED read them back into the swap cache."""
    sc = Scenario(arch=arch, kernel=kernel, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    m.swapon(8, readahead=1)
    mm = m.new_mm()
    span = k.arch.levels[k.arch.pmd_level].span
    a = m.mmap(mm, BASE, span, RW, ANON)                           # one whole PMD extent
    for i in range(pages):
        fill(m, mm, a + i * k.page_size, i)
    m.madvise(mm, a, pages * k.page_size, emu.MADV_PAGEOUT)
    if cache:
        m.madvise(mm, a, pages * k.page_size, emu.MADV_WILLNEED)
    return sc, m, k, mm, a


def fault(k, mm, va: int, write: bool = False):
    return memory.do_user_addr_fault(k, mm, va, emu.arch.Access.W if write else emu.arch.Access.R)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_do_swap_page_pte_same_fails_when_another_thread_swapped_it_in_first(arch: str) -> None:
    sc, m, k, mm, a = swapped_world(arch)
    si = k.swap_info
    off = pte(k, mm, a).swp_offset
    sc.task("t1", fault(k, mm, a))
    sc.task("t2", fault(k, mm, a))
    # t1 has read the swap pte and dropped its map (pte_unmap_same): parked at the cache
    # lookup; t2 does the whole swap-in (a read: the folio stays in the swap cache)
    sc.run("t1:rcu_read_unlock#1 t2:* t1:*")
    assert sc.results == {"t1": FaultResult.OK, "t2": FaultResult.OK}
    assert k.stats["do_swap_page"] == 1 and k.stats["do_swap_page_pte_changed"] == 1   # FAULT-RETRY
    assert k.stats["swap_cache_hit"] == 1 and k.stats["swap_readpage"] == 1
    folio = si.cache[off]
    assert pte(k, mm, a).paddr == folio.paddr and (folio.mapcount, folio.refcount) == (1, 2)
    assert mm.rss[MM_ANONPAGES] == 1 and mm.rss[MM_SWAPENTS] == 0 and si.swap_map[off] == SWAP_HAS_CACHE
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm)


def test_do_swap_page_backs_out_without_oom_when_a_write_fault_freed_the_slot() -> None:
    sc, m, k, mm, a = swapped_world()
    sc.task("t1", fault(k, mm, a))
    sc.task("t2", fault(k, mm, a, write=True))
    sc.run("t1:rcu_read_unlock#1 t2:* t1:*")
    # t2's write freed the swap cache and the slot: t1 finds no folio, and backs out with
    # pte_same failing under the lock: 0 (refault), not VM_FAULT_OOM
    assert sc.results == {"t1": FaultResult.OK, "t2": FaultResult.OK}
    assert k.swap_info.inuse_pages == 0 and k.stats["do_swap_page"] == 1
    assert m.translate(mm, a, "w") is not None and read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm)


def test_swapoff_releases_the_swap_cache_under_a_fault_pinned_on_the_area() -> None:
    sc, m, k, mm, a = swapped_world(cache=True)
    si = k.swap_info
    sc.task("t1", fault(k, mm, a))
    sc.task("swapoff", swapfile.swapoff(k))
    # t1 holds the area (get_swap_device) and the folio (cache hit), parked before
    # folio_lock; swapoff maps it, frees the cache, then waits for t1's pin to go
    sc.run("t1:rcu_read_unlock#1 t1:1 swapoff:*", finish=False)
    assert si.inuse_pages == 0 and si.cache == {} and k.swap_info is si and si.users == 1
    assert sc.state("swapoff").name == "BLOCKED"
    sc.run("t1:* swapoff:*")
    assert sc.results == {"t1": FaultResult.OK, "swapoff": 0}
    assert k.stats["do_swap_page_not_swapcache"] == 1 and k.stats["unuse_pte"] == 1
    assert k.swap_info is None and mm.rss[MM_ANONPAGES] == 1 and mm.rss[MM_SWAPENTS] == 0
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm)


def test_unuse_pte_skips_a_pte_a_fault_swapped_in_first() -> None:
    sc, m, k, mm, a = swapped_world()
    sc.task("swapoff", swapfile.swapoff(k))
    sc.task("t1", fault(k, mm, a))
    # swapoff read the swap pte locklessly and dropped the map: parked at the cache lookup
    sc.run("swapoff:rcu_read_unlock#1 t1:* swapoff:*")
    assert sc.results == {"swapoff": 0, "t1": FaultResult.OK}
    assert k.stats["unuse_pte_changed"] == 1 and k.stats["unuse_pte"] == 0      # SKIP
    assert k.swap_info is None and mm.rss[MM_ANONPAGES] == 1 and mm.rss[MM_SWAPENTS] == 0
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm)


# 6.14: MADV_DONTNEED of a whole PMD extent frees the PTE table (PT_RECLAIM) under a
# walker that read the pmd: the 6.5+ map fails and each walker takes its category

@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_do_swap_page_map_fails_after_pt_reclaim_and_retries_the_fault(arch: str) -> None:
    sc, m, k, mm, a = swapped_world(arch, kernel="6.14", cache=True)
    si = k.swap_info
    span = k.arch.levels[k.arch.pmd_level].span
    sc.task("t1", fault(k, mm, a))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, span, emu.MADV_DONTNEED))
    # t1 holds the folio lock and is inside the RCU section of do_swap_page's
    # pte_offset_map_lock (the second map of the fault), before its read of the pmd
    sc.run("t1:rcu_read_lock#2 dontneed:*", finish=False)
    assert k.stats["pt_reclaimed"] == 1 and sc.results["dontneed"] == 0
    sc.run("t1:*")
    assert sc.results["t1"] is FaultResult.OK and k.stats["do_swap_page_map_failed"] == 1   # FAULT-RETRY
    assert k.stats["do_swap_page"] == 0 and mm.rss[MM_ANONPAGES] == mm.rss[MM_SWAPENTS] == 0
    # the zap could not take the folio lock: the unmapped folio stays cached until reclaim
    assert len(si.cache) == 1 and run_sync(swapfile.drain_swap_cache(k)) == 1
    assert read_back(m, mm, a) == bytes(k.page_size)
    finish(m, mm)


def test_unuse_walk_skips_a_table_pt_reclaim_freed_under_it() -> None:
    sc, m, k, mm, a = swapped_world(kernel="6.14", pages=2)
    span = k.arch.levels[k.arch.pmd_level].span
    sc.task("swapoff", swapfile.swapoff(k))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, span, emu.MADV_DONTNEED))
    sc.run("swapoff:rcu_read_lock#1 dontneed:*", finish=False)         # unuse_pte_range's first map
    assert k.stats["pt_reclaimed"] == 1
    sc.run("swapoff:*")
    assert sc.results["swapoff"] == 0 and k.stats["unuse_pte_range_map_failed"] == 1    # SKIP
    assert k.stats["unuse_pte"] == 0 and k.stats["try_to_unuse_again"] == 0
    assert k.swap_info is None and mm.rss[MM_SWAPENTS] == 0
    finish(m, mm)


def test_willneed_walk_skips_a_table_pt_reclaim_freed_under_it() -> None:
    sc, m, k, mm, a = swapped_world(kernel="6.14", pages=2)
    span = k.arch.levels[k.arch.pmd_level].span
    sc.task("willneed", madvise.do_madvise(k, mm, a, span, emu.MADV_WILLNEED))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, span, emu.MADV_DONTNEED))
    # walk_pmd_range read the pmd (a table); swapin_walk_pmd_entry's map has not yet
    sc.run("willneed:rcu_read_lock#1 dontneed:*", finish=False)
    sc.run("willneed:*")
    assert sc.results == {"willneed": 0, "dontneed": 0}
    assert k.stats["swapin_walk_map_failed"] == 1 and k.stats["swapin_walk_read"] == 0   # SKIP
    assert k.stats["pt_reclaimed"] == 1 and k.swap_info.cache == {} and k.swap_info.inuse_pages == 0
    finish(m, mm)


def test_pageout_keeps_a_page_the_guest_touched_again_before_reclaim_looked() -> None:
    """6.6 reclaim_pages() does not ignore references: MADV_PAGEOUT cleared young in its
    walk, and a hardware access that sets it again before folio_referenced() keeps the
    folio (FOLIOREF_KEEP): no slot is used, the pte stays."""
    sc = Scenario(arch="arm64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    si = m.swapon(4)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, RW, ANON)
    pa = fill(m, mm, a, 0)
    sc.task("pageout", madvise.do_madvise(k, mm, a, k.page_size, emu.MADV_PAGEOUT))
    sc.run("pageout:folio_trylock#1", finish=False)      # reclaim has the folio locked
    assert not pte(k, mm, a).young
    assert m.touch(mm, a) == pa                          # the access flag is set again
    sc.run("pageout:*")
    assert sc.results["pageout"] == 0 and k.stats["reclaim_kept_referenced"] == 1
    assert pte(k, mm, a).kind is Kind.LEAF and si.inuse_pages == 0 and si.cache == {}
    assert not k.alloc.page_of(pa).locked and k.alloc.page_of(pa).refcount == 1
    m.madvise(mm, a, k.page_size, emu.MADV_PAGEOUT)      # untouched this time: swapped out
    assert pte(k, mm, a).kind is Kind.SWAP and read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm)


def test_swap_readahead_skips_its_window_when_the_table_went_and_the_fault_backs_out() -> None:
    """6.14: the table is freed (MADV_DONTNEED + PT_RECLAIM, which also freed the slot)
    after the fault read the swap pte: swap_vma_readahead()'s pte_offset_map() fails
    (``break``: SKIP the window), read_swap_cache_async() finds the slot unused, and the
    back-out pte_offset_map_lock() fails too: 0 (refault), not VM_FAULT_OOM."""
    sc, m, k, mm, a = swapped_world(kernel="6.14", pages=2)
    k.swap_info.ra_win = 4
    span = k.arch.levels[k.arch.pmd_level].span
    sc.task("t1", fault(k, mm, a + k.page_size))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, span, emu.MADV_DONTNEED))
    sc.run("t1:rcu_read_unlock#1 dontneed:*", finish=False)    # t1 holds the swap pte's value
    assert k.stats["pt_reclaimed"] == 1 and k.swap_info.inuse_pages == 0
    sc.run("t1:*")
    assert sc.results["t1"] is FaultResult.OK
    assert k.stats["swap_ra_map_failed"] == 1 and k.stats["swap_readpage"] == 0
    assert k.stats["do_swap_page"] == 0 and mm.rss[MM_ANONPAGES] == mm.rss[MM_SWAPENTS] == 0
    assert read_back(m, mm, a + k.page_size) == bytes(k.page_size)
    finish(m, mm)


@pytest.mark.parametrize("kernel", ["6.4", "6.5", "6.8", "6.13", "6.14"])
def test_swap_round_trip_under_every_profile(kernel: str) -> None:
    """Pageout, fork, MADV_WILLNEED, a fault and swapoff under each profile: under 6.4 the
    walkers filter the pmd first (pmd_none_or_trans_huge_or_clear_bad), from 6.5 the map
    of the none pmd fails and unuse_pte_range skips it."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, kernel=kernel)
    k = m.kernel
    page, span = k.page_size, k.arch.levels[k.arch.pmd_level].span
    m.swapon(16)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * span, RW, ANON)
    b = a + span
    for i in range(5):
        fill(m, mm, b + i * page, i)
    m.madvise(mm, b, 5 * page, emu.MADV_PAGEOUT)
    child = m.fork_mm(mm)
    m.madvise(mm, a, 2 * span, emu.MADV_WILLNEED)
    assert read_back(m, mm, b + page) == pattern(1, page)
    m.swapoff()
    assert k.stats["unuse_pte_range_map_failed"] == (0 if kernel == "6.4" else 2)
    for i in range(5):
        assert read_back(m, child, b + i * page) == pattern(i, page)
        assert read_back(m, mm, b + i * page) == pattern(i, page)
    finish(m, mm, child)
