"""UFFDIO_MOVE of a swap pte (mm/userfaultfd.c move_pages_pte() -> move_swap_pte(), 6.8 with
the 2025 swap-cache fixes): the entry moves with its swap count, a folio still in the swap
cache has its rmap moved with it (under its lock), a shared entry is -EBUSY, a marker
-EFAULT; a swap-in holding the cached folio's lock makes the move unmap, sleep and retry,
and the changed pte then -EAGAIN (move_pages() tries again and moves the present page)."""
from __future__ import annotations

import pytest
from conftest import pte_of
from test_uffd_move import ANON, BASE, RW, fill, world

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.sched.task import TaskState
from mm_core import huge_memory, rmap, userfaultfd
from mm_core.memory import FaultResult, do_user_addr_fault
from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]


def word(m, mm, va: int) -> int:
    pa = m.touch(mm, va)
    return int.from_bytes(m.physmem[pa:pa + 8], "little")


@pytest.mark.parametrize("arch", ARCHES)
def test_a_swap_pte_moves_with_its_swap_count_and_reads_back_at_dst(arch: str) -> None:
    m, k, mm, a, size = world(arch)
    page = k.page_size
    si = m.swapon(16, readahead=1)
    src, dst = a + 3 * page, a + size + 7 * page
    fill(m, mm, src, 0x5A5A)
    m.madvise(mm, src, page, emu.MADV_PAGEOUT)
    e = pte_of(k, mm, src, pmd=True)
    assert e.kind is Kind.SWAP and e.exclusive and si.cache == {}
    off, rss = e.swp_offset, list(mm.rss)
    assert m.uffdio_move(mm, dst, src, page) == page
    d = pte_of(k, mm, dst, pmd=True)
    assert d.kind is Kind.SWAP and d.swp_offset == off and d.exclusive
    assert d.soft_dirty == ("soft_dirty" in k.arch.sw_bits)         # pgtable_supports_soft_dirty()
    assert pte_of(k, mm, src, pmd=True).kind is Kind.NONE
    assert si.swap_map[off] == 1 and mm.rss == rss and mm.rss[MM_SWAPENTS] == 1   # one mm, one count
    assert k.stats["uffdio_move_swap"] == 1 and not k.rcu.readers and not k.san.pte_maps
    assert word(m, mm, dst) == 0x5A5A and k.stats["swap_major_fault"] == 1
    assert si.swap_map[off] == 0 or off in si.cache                 # the read took the slot over
    m.exit_mm(mm)


def test_a_folio_still_in_the_swap_cache_has_its_rmap_moved_to_dst() -> None:
    """Readahead leaves the neighbours' folios in the swap cache behind swap ptes: the move
    locks the cached folio, and under both ptls points it at dst (folio_move_anon_rmap():
    anon_vma, index), so the swap-in at dst hits the cache with the rmap it will map it
    with."""
    m, k, mm, a, size = world()
    page = k.page_size
    si = m.swapon(16, readahead=4)
    for i in range(4):
        fill(m, mm, a + i * page, 0x100 + i)
    m.madvise(mm, a, 4 * page, emu.MADV_PAGEOUT)
    assert word(m, mm, a + page) == 0x101                            # readahead of the window
    src, dst = a + 2 * page, a + size + 9 * page
    e = pte_of(k, mm, src, pmd=True)
    assert e.kind is Kind.SWAP and e.swp_offset in si.cache
    folio = si.cache[e.swp_offset]
    assert "anon_vma" not in folio.extra and folio.index == 0       # read ahead: not anon yet
    assert m.uffdio_move(mm, dst, src, page) == page
    assert folio.index == rmap.linear_page_index(k, mm.vma_lookup(dst), dst)
    assert folio.extra["anon_vma"] is mm.vma_lookup(dst).anon_vma    # folio->mapping, while unmapped
    assert not folio.locked and si.cache[e.swp_offset] is folio and folio.mapcount == 0
    hits = k.stats["swap_cache_hit"]
    assert word(m, mm, dst) == 0x102 and k.stats["swap_cache_hit"] == hits + 1
    assert m.translate(mm, dst) == folio.paddr and mm.rss[MM_ANONPAGES] == 2
    m.exit_mm(mm)


def test_a_shared_swap_entry_is_ebusy_and_a_marker_efault() -> None:
    m, k, mm, a, size = world()
    page = k.page_size
    m.swapon(16, readahead=1)
    fill(m, mm, a, 7)
    m.madvise(mm, a, page, emu.MADV_PAGEOUT)
    child = m.fork_mm(mm)                                            # the entry is shared now
    assert not pte_of(k, mm, a, pmd=True).exclusive
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, a + size, a, page)
    assert err.value.errno == userfaultfd.EBUSY and pte_of(k, mm, a, pmd=True).kind is Kind.SWAP
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 2 * size, userfaultfd.UFFDIO_REGISTER_MODE_MISSING)
    m.uffdio_poison(ctx, a + page, page)
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, a + size + page, a + page, page)
    assert err.value.errno == userfaultfd.EFAULT
    m.exit_mm(child)
    m.exit_mm(mm)


def swapin_vs_move():
    """A page swapped out at src (its folio freed: the swap cache is empty), a swap-in
    fault at src and a UFFDIO_MOVE of it to dst (whose table exists), not started."""
    sc = Scenario(kernel="6.13", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    si = m.swapon(16, readahead=1)
    src, dst = a + 5 * page, a + size + 5 * page
    fill(m, mm, src, 0xC0FFEE)
    fill(m, mm, dst + page, 1)                                       # the dst table exists
    m.madvise(mm, src, page, emu.MADV_PAGEOUT)
    off = pte_of(k, mm, src, pmd=True).swp_offset
    sc.task("swapin", do_user_addr_fault(k, mm, src, Access.R))
    sc.task("uffd", userfaultfd.move_pages(k, mm, dst, src, page))
    return sc, m, k, mm, si, src, dst, off


def racing_swapin():
    """The swap-in has put the folio in the swap cache, locked, and is reading it; the
    move has found it there, failed folio_trylock(), unmapped both ptes, dropped the swap
    device and sleeps in folio_lock()."""
    sc, m, k, mm, si, src, dst, off = swapin_vs_move()
    while not (off in si.cache and si.cache[off].locked):
        sc.run("swapin:1", finish=False)
    folio = si.cache[off]
    sc.run("uffd:*", finish=False)
    assert sc.state("uffd") is TaskState.BLOCKED and k.stats["uffdio_move_swap_folio_lock_retry"] == 1
    assert not k.rcu.readers and not k.san.pte_maps and si.users == 1   # only the swap-in's pin
    return sc, m, k, mm, si, src, dst, off, folio


def test_the_move_sleeping_on_the_swapin_folio_lock_then_moves_the_entry_and_the_swapin_refaults() -> None:
    """The move gets the folio lock as soon as the read unlocks it: the swap-in's
    folio_lock_or_retry() fails (VM_FAULT_RETRY), the move's retry finds the same swap pte
    and the folio still the cache's for it: the entry and the folio's rmap move to dst. The
    swap-in's refault finds src none (the zero page); dst reads the data from the cache."""
    sc, m, k, mm, si, src, dst, off, folio = racing_swapin()
    sc.run()
    assert sc.results["swapin"] is FaultResult.OK and sc.results["uffd"] == k.page_size
    assert k.stats["uffdio_move_swap"] == 1 and k.stats["folio_lock_or_retry_failed"] == 1
    d = pte_of(k, mm, dst, pmd=True)
    assert d.kind is Kind.SWAP and d.swp_offset == off and si.cache[off] is folio
    assert folio.index == rmap.linear_page_index(k, mm.vma_lookup(dst), dst) and not folio.locked
    assert m.translate(mm, src) == k.zero_page.paddr
    assert word(m, mm, dst) == 0xC0FFEE and m.translate(mm, dst) == folio.paddr
    m.exit_mm(mm)
    sc.close()


def test_a_swapin_that_maps_first_makes_the_move_eagain_and_the_present_page_moves() -> None:
    """The move has read the swap pte (under the src ptl, unlocks: dst's, then src's) when
    the whole swap-in runs: the folio is in the cache, unlocked and mapped at src. The move
    finds and locks it, and move_swap_pte()'s is_pte_pages_stable() under both ptls sees
    the pte changed: -EAGAIN, and move_pages() tries again, moving the present page.
    (The folio_unlock() hand-off to a sleeping folio_lock() means the swap-in cannot take
    the lock back from a move already waiting for it: that order is the test above.)"""
    sc, m, k, mm, si, src, dst, off = swapin_vs_move()
    sc.run("uffd:unlock#2 swapin:*", finish=False)
    folio = si.cache[off]
    assert sc.results["swapin"] is FaultResult.OK and m.translate(mm, src) == folio.paddr
    sc.run()
    assert k.stats["uffdio_move_eagain"] >= 1
    assert sc.results["uffd"] == k.page_size
    assert k.stats["uffdio_move_swap"] == 0 and k.stats["uffdio_move"] == 1
    assert m.translate(mm, dst) == folio.paddr and pte_of(k, mm, src, pmd=True).kind is Kind.NONE
    assert word(m, mm, dst) == 0xC0FFEE and not folio.locked and si.users == 0
    m.exit_mm(mm)
    sc.close()
