"""MADV_WILLNEED on shmem (6.6 mm/madvise.c shmem_swapin_range()): the swap entries of the
mapping's page cache over the range are read into the swap cache, nothing is mapped, and
the fault then finds the folio there (no second read). The entry is read under RCU and
used after rcu_read_unlock(): forced interleavings with truncation, swapoff and a fault
on the same index make it stale, and read_swap_cache_async() must then read nothing in
(SKIP), leak no slot and no folio reference (the teardown audits both)."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind
from emu.sched.loop import run_sync
from mm_core import madvise, shmem, swapfile
from mm_core.memory import FaultResult
from mm_core.mm import MM_SHMEMPAGES
from mm_core.swapfile import SWAP_HAS_CACHE
from tests.test_shmem_swap import SHARED, shmem_world
from tests.test_swap import ARCHES, BASE, RW, fault, finish, pattern, pte, read_back


def willneed(k, mm, va: int, length: int):
    return madvise.do_madvise(k, mm, va, length, emu.MADV_WILLNEED)


@pytest.mark.parametrize("arch", ARCHES)
def test_willneed_reads_swapped_shmem_pages_into_the_swap_cache_and_the_fault_finds_them(arch: str) -> None:
    sc, m, k, mm, inode, a, si = shmem_world(arch, pages=4)
    page, mapping = k.page_size, inode.mapping
    offs = dict(mapping.swap_entries)
    assert sorted(offs) == [0, 1, 2, 3] and si.cache == {}
    reads = k.stats["swap_readpage"]
    m.madvise(mm, a + page, 2 * page, emu.MADV_WILLNEED)
    assert k.stats["shmem_swapin_range_read"] == 2 and k.stats["swap_readpage"] == reads + 2
    assert set(si.cache) == {offs[1], offs[2]}
    for i in (1, 2):
        folio = si.cache[offs[i]]
        assert folio.extra["uptodate"] and not folio.locked and folio.refcount == 1   # the cache's only
        assert bytes(m.physmem[folio.paddr:folio.paddr + page]) == pattern(i, page)
        assert si.swap_map[offs[i]] == 1 | SWAP_HAS_CACHE
    # not mapped, still swapped: the index keeps its swap entry
    assert mapping.swap_entries == offs and inode.swapped == 4 and mapping.i_pages == {}
    assert all(pte(k, mm, a + i * page).kind is Kind.NONE for i in range(4))
    assert mm.rss[MM_SHMEMPAGES] == 0
    # mincore_page() -> filemap_get_incore_folio(): a shmem swap entry asks the swap cache
    assert m.mincore(mm, a, 4 * page) == [0, 1, 1, 0]
    # the fault: shmem_swapin_folio() finds the folio in the swap cache (no major fault)
    major, cached = k.stats["shmem_swap_major"], si.cache[offs[2]]
    assert read_back(m, mm, a + 2 * page) == pattern(2, page)
    assert k.stats["shmem_swap_major"] == major and k.stats["swap_readpage"] == reads + 2
    assert mapping.i_pages[2] is cached and offs[2] not in si.cache and si.swap_map[offs[2]] == 0
    # index 0 was not in the range: its fault reads from the device
    assert read_back(m, mm, a) == pattern(0, page) and k.stats["shmem_swap_major"] == major + 1
    # eviction: shmem_free_swap() of 1 and 3; free_swap_and_cache() reclaims index 1's
    # read-ahead folio (unmapped, unlocked) with its slot
    finish(m, mm, files=[inode])
    assert k.stats["swap_cache_reclaimed"] == 1


def test_willneed_reads_exactly_the_range_of_a_mapping_with_a_file_offset() -> None:
    """linear_page_index(vma, end) - 1 is the last index (the 6.5 fix of an off-by-one):
    one page of a mapping at pgoff 2 reads index 2 only."""
    sc, m, k, mm, inode, a, si = shmem_world(pages=5)
    page = k.page_size
    mm2 = m.new_mm()
    b = m.mmap(mm2, BASE, 3 * page, RW, SHARED, file=inode, offset=2 * page)
    m.madvise(mm2, b, page, emu.MADV_WILLNEED)
    assert list(si.cache) == [inode.mapping.swap_entries[2]]
    m.madvise(mm2, b + page, 2 * page, emu.MADV_WILLNEED)
    assert set(si.cache) == {inode.mapping.swap_entries[i] for i in (2, 3, 4)}
    assert k.stats["shmem_swapin_range_read"] == 3
    assert [read_back(m, mm2, b + i * page) for i in range(3)] == [pattern(i + 2, page) for i in range(3)]
    finish(m, mm, mm2, files=[inode])


def test_willneed_on_a_shmem_range_with_resident_pages_and_holes_reads_only_swap_entries() -> None:
    sc, m, k, mm, inode, a, si = shmem_world(pages=4, out=2)
    page = k.page_size
    run_sync(shmem.shmem_setattr_size(k, inode, 6 * page))          # two holes past the pages
    m.munmap(mm, a, 4 * page)
    a = m.mmap(mm, BASE, 6 * page, RW, SHARED, file=inode)
    m.madvise(mm, a, 6 * page, emu.MADV_WILLNEED)
    assert k.stats["shmem_swapin_range_read"] == 2 and len(si.cache) == 2
    assert sorted(inode.mapping.i_pages) == [2, 3]                  # folios: skipped (!xa_is_value)
    assert [read_back(m, mm, a + i * page) for i in range(4)] == [pattern(i, page) for i in range(4)]
    assert read_back(m, mm, a + 5 * page) == bytes(page)
    finish(m, mm, files=[inode])


# -- the entry read under RCU, used after it: forced interleavings ------------------------------
#
# shmem_swapin_range's trace for one swap entry: xas_find (the lookup), rcu_read_unlock,
# then read_swap_cache_async(): swap_cache (lookup, after get_swap_device), swap_map
# (swapcache_prepare), swap_cache (add_to_swap_cache), swap_io (swap_readpage).
# "w:xas_find#1" parks it holding the entry with RCU still held (no area pin yet).

def one_swapped_page(arch: str = "x86_64"):
    sc, m, k, mm, inode, a, si = shmem_world(arch, pages=1)
    off = inode.mapping.swap_entries[0]
    return sc, m, k, mm, inode, a, si, off


def test_truncation_frees_the_entry_under_willneed_and_nothing_is_read_in() -> None:
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    reads = k.stats["swap_readpage"]
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.task("trunc", shmem.shmem_setattr_size(k, inode, 0))
    sc.run("w:xas_find#1 trunc:*", finish=False)
    assert k.stats["shmem_free_swap"] == 1 and si.swap_map[off] == 0 and si.inuse_pages == 0
    sc.run("w:*")
    assert sc.results["w"] == 0
    # the stale entry: no count left (swap_swapcount() == 0): SKIP, nothing allocated or read
    assert k.stats["shmem_swapin_range_skipped"] == 1 and k.stats["shmem_swapin_range_read"] == 0
    assert k.stats["swap_readpage"] == reads and si.cache == {} and si.inuse_pages == 0
    finish(m, mm, files=[inode])


def test_truncation_after_swapcache_prepare_leaves_a_reclaimable_orphan_cache_folio() -> None:
    """Truncation drops the count after the reader set SWAP_HAS_CACHE: the slot stays
    (cache-only), so the read brings in the right bytes into a folio no index names;
    the kernel's free_swap_and_cache() found no folio yet to reclaim, and later reclaim
    (drain_swap_cache here) frees it and the slot."""
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.task("trunc", shmem.shmem_setattr_size(k, inode, 0))
    sc.run("w:swap_map#1 trunc:*", finish=False)         # swapcache_prepare() done, not yet added
    assert si.swap_map[off] == SWAP_HAS_CACHE and inode.mapping.swap_entries == {}
    sc.run("w:*")
    folio = si.cache[off]
    assert k.stats["shmem_swapin_range_read"] == 1 and folio.refcount == 1 and not folio.locked
    assert bytes(m.physmem[folio.paddr:folio.paddr + k.page_size]) == pattern(0, k.page_size)
    assert inode.mapping.i_pages == {} and si.count(off) == 0
    assert run_sync(swapfile.drain_swap_cache(k)) == 1 and si.inuse_pages == 0
    finish(m, mm, files=[inode])


def test_swapoff_under_willneed_before_the_area_pin_reads_nothing() -> None:
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.task("swapoff", swapfile.swapoff(k))
    sc.run("w:xas_find#1 swapoff:*", finish=False)
    assert sc.results["swapoff"] == 0 and k.swap_info is None       # shmem_unuse brought it in
    assert inode.mapping.swap_entries == {} and 0 in inode.mapping.i_pages
    sc.run("w:*")
    assert sc.results["w"] == 0 and k.stats["shmem_swapin_range_skipped"] == 1   # get_swap_device()
    assert k.stats["swap_readpage"] == 1                                         # swapoff's only
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm, files=[inode])


def test_swapoff_waits_for_willneeds_area_pin_and_the_stale_entry_is_skipped() -> None:
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.task("swapoff", swapfile.swapoff(k))
    # w holds get_swap_device() at its swap cache lookup; swapoff's shmem_unuse swaps the
    # page in and frees the slot, then waits for the area's users
    sc.run("w:rcu_read_unlock#1 swapoff:*", finish=False)
    assert "swapoff" not in sc.results and si.users == 1 and si.inuse_pages == 0
    assert not si.live and 0 in inode.mapping.i_pages
    sc.run("w:*", finish=False)
    assert k.stats["shmem_swapin_range_skipped"] == 1 and k.stats["swap_readpage"] == 1
    assert si.users == 0 and si.cache == {}
    sc.run("swapoff:*")
    assert sc.results == {"w": 0, "swapoff": 0} and k.swap_info is None
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm, files=[inode])


def test_a_fault_that_swapped_the_index_in_first_leaves_willneed_a_stale_entry() -> None:
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.task("t", fault(k, mm, a))
    sc.run("w:xas_find#1 t:*", finish=False)
    assert sc.results["t"] is FaultResult.OK and si.inuse_pages == 0 and si.cache == {}
    sc.run("w:*")
    assert k.stats["shmem_swapin_range_skipped"] == 1 and k.stats["swap_readpage"] == 1
    assert si.cache == {} and mm.rss[MM_SHMEMPAGES] == 1
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm, files=[inode])


def test_a_fault_finds_willneeds_folio_locked_in_the_swap_cache_and_waits_for_the_read() -> None:
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.task("t", fault(k, mm, a))
    sc.run("w:swap_cache#2 t:*", finish=False)          # added locked, not read yet
    folio = si.cache[off]
    assert folio.locked and "t" not in sc.results and folio.refcount == 3   # w's, the cache's, t's lookup
    sc.run("w:*", finish=False)
    assert sc.results["w"] == 0 and folio.extra["uptodate"]
    sc.run("t:*")
    assert sc.results["t"] is FaultResult.OK and inode.mapping.i_pages[0] is folio
    assert k.stats["swap_readpage"] == 1 and k.stats["shmem_swap_major"] == 0     # read once
    assert si.cache == {} and si.inuse_pages == 0
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm, files=[inode])


def test_willneed_loses_swapcache_prepare_to_a_fault_and_looks_again() -> None:
    sc, m, k, mm, inode, a, si, off = one_swapped_page()
    sc.task("t", fault(k, mm, a))
    sc.task("w", willneed(k, mm, a, k.page_size))
    sc.run("t:swap_map#1 w:*", finish=False)            # t set SWAP_HAS_CACHE, has not added
    assert k.stats["swapcache_prepare_eexist"] == 1 and "w" not in sc.results
    sc.run("t:* w:*")
    assert sc.results == {"t": FaultResult.OK, "w": 0}
    assert k.stats["swap_readpage"] == 1 and k.stats["shmem_swapin_range_skipped"] == 1
    assert si.cache == {} and si.inuse_pages == 0 and mm.rss[MM_SHMEMPAGES] == 1
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    finish(m, mm, files=[inode])


def test_the_explorers_willneed_race_reaches_stale_entries_and_runs_clean() -> None:
    """emu explore shmem-willneed-race: random schedules are clean, and some of them hand
    shmem_swapin_range() an entry that went stale after its RCU lookup (SKIP), others read."""
    import dataclasses

    from emu import explore as ex
    from emu.scenarios import SCENARIOS
    from emu.sched.strategy import RandomWalk
    kernels: list = []

    def build(sc):
        kernels.append(sc.kernel)
        return SCENARIOS["shmem-willneed-race"].build(sc)
    spec = dataclasses.replace(SCENARIOS["shmem-willneed-race"], build=build)
    skipped = read = 0
    for seed in range(40):
        outcome = ex.execute(spec, RandomWalk(seed=seed))
        assert outcome.finding is None, outcome.finding
        skipped += kernels[-1].stats["shmem_swapin_range_skipped"] > 0
        read += kernels[-1].stats["shmem_swapin_range_read"] > 0
    assert skipped and read, (skipped, read)


@pytest.mark.parametrize("arch", ARCHES)
def test_the_guest_madvise_syscall_reaches_shmem_swapin_range(arch: str) -> None:
    """memfd_create, ftruncate, madvise(MADV_PAGEOUT / MADV_WILLNEED) and mincore at the
    guest's syscall numbers: mincore shows what WILLNEED read back, the data comes back."""
    from conftest import workload

    from emu.linux import syscalls
    from emu.linux.syscalls import SyscallContext
    from emu.linux.uaccess import copy_from_user, copy_to_user
    from emu.machine import Machine
    m = Machine(arch=arch, mem="32M")
    k = m.kernel
    page = k.page_size
    si = m.swapon(8, readahead=1)
    p = m.spawn(workload(arch, "hello"), ["hello"])
    sc = SyscallContext(m, p.threads[0])

    def call(name: str, *args: int) -> int:
        nr = sc.arch.syscall_abi.numbers[name]
        return run_sync(syscalls.dispatch(sc, nr, list(args), {nr: name}))

    buf = m.mmap(p.mm, 0, page, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS)
    run_sync(copy_to_user(m, p.mm, buf, b"willneed\0"))
    fd = call("memfd_create", buf, 0)
    assert fd >= 3 and call("ftruncate", fd, 3 * page) == 0
    inode = p.files[fd]
    a = m.mmap(p.mm, 0, 3 * page, RW, emu.MAP_SHARED, file=inode)
    for i in range(3):
        run_sync(copy_to_user(m, p.mm, a + i * page, pattern(i, page)))
    assert call("madvise", a, 3 * page, emu.MADV_PAGEOUT) == 0 and inode.swapped == 3
    assert call("madvise", a + page, 2 * page, emu.MADV_WILLNEED) == 0
    assert k.stats["shmem_swapin_range_read"] == 2 and len(si.cache) == 2
    assert call("mincore", a, 3 * page, buf) == 0
    assert run_sync(copy_from_user(m, p.mm, buf, 3)) == bytes([0, 1, 1])
    for i in range(3):
        assert run_sync(copy_from_user(m, p.mm, a + i * page, page)) == pattern(i, page)
    assert k.stats["shmem_swap_major"] == 1 and inode.swapped == 0 and si.inuse_pages == 0


def test_truncating_a_read_ahead_index_reclaims_its_swap_cache_folio_and_slot() -> None:
    """shmem_free_swap() -> free_swap_and_cache(): only the cache is left on the slot and
    the read-ahead folio is unmapped and unlocked: __try_to_reclaim_swap() frees both."""
    sc, m, k, mm, inode, a, si = shmem_world(pages=2)
    page = k.page_size
    m.madvise(mm, a + page, page, emu.MADV_WILLNEED)
    off = inode.mapping.swap_entries[1]
    folio = si.cache[off]
    run_sync(shmem.shmem_setattr_size(k, inode, page))
    assert si.cache == {} and si.swap_map[off] == 0 and si.inuse_pages == 1
    assert k.alloc.page_of(folio.paddr) is None and k.stats["swap_cache_reclaimed"] == 1
    assert read_back(m, mm, a) == pattern(0, page)
    finish(m, mm, files=[inode])
