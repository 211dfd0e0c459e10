"""UFFDIO_MOVE (mm/userfaultfd.c move_pages -> move_pages_pte -> move_present_pte): the page
itself moves (no copy), src becomes none, the counters and the rmap follow; the error and
retry categories; the folio-lock retry path that unmaps both ptes before sleeping."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, pgtable, rmap, userfaultfd
from mm_core.mm import MM_ANONPAGES
from mm_core.sanitizers import Finding

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
BASE = 0x40000000
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]


def world(arch: str = "x86_64", kernel: str = "6.13"):
    """Two PMD extents of private anon memory; src page faulted in with a marker."""
    m = emu.Machine(arch=arch, mem="32M", kernel=kernel, prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    return m, k, mm, a, size


def fill(m, mm, va: int, tag: int) -> int:
    pa = m.touch(mm, va, write=True)
    m.physmem[pa:pa + 8] = tag.to_bytes(8, "little")
    return pa




@pytest.mark.parametrize("kernel", ["6.8", "6.13"])
@pytest.mark.parametrize("arch", ARCHES)
def test_move_moves_the_page_itself_and_keeps_the_counters(arch: str, kernel: str) -> None:
    m, k, mm, a, size = world(arch, kernel)
    page = k.page_size
    src, dst = a + 3 * page, a + size + 7 * page                  # dst in another PTE table
    pa = fill(m, mm, src, 0x5EED)
    fill(m, mm, src + page, 0x0B0E)                              # a neighbour that stays
    folio = k.alloc.page_of(pa)
    rss, tables = list(mm.rss), mm.pgtables_bytes
    flushes: list = []
    shootdown = k.flush_tlb_range
    k.flush_tlb_range = lambda mm_, lo, hi: (flushes.append((mm_, lo, hi)), shootdown(mm_, lo, hi))[1]
    assert m.uffdio_move(mm, dst, src, page) == page
    assert (mm, src, src + page) in flushes                      # ptep_clear_flush() of src
    k.flush_tlb_range = shootdown
    # the guest sees the old src bytes at dst, from the very same frame; src is none
    assert m.read_user(mm, dst, 8) == (0x5EED).to_bytes(8, "little")
    assert m.translate(mm, dst, "w") == pa
    assert m.translate(mm, src) is None and pte_of(k, mm, src, pmd=True).kind is Kind.NONE
    assert m.read_user(mm, src + page, 8) == (0x0B0E).to_bytes(8, "little")
    dst_pte = pte_of(k, mm, dst, pmd=True)
    assert dst_pte.dirty and dst_pte.paddr == pa
    # one mm: rss unchanged, the folio mapped once, its rmap moved to dst
    assert mm.rss == rss and mm.rss[MM_ANONPAGES] == 2
    assert mm.pgtables_bytes > tables                            # the dst PTE table was allocated
    assert (folio.mapcount, folio.refcount, folio.locked) == (1, 1, False)
    assert folio.index == rmap.linear_page_index(k, mm.vma_lookup(dst), dst)
    assert rmap.folio_anon_vma(folio) is mm.vma_lookup(dst).anon_vma
    assert k.stats["uffdio_move"] == 1 and not k.rcu.readers and not k.san.pte_maps
    m.touch(mm, dst, write=True)                                 # writable in place: no COW
    assert m.translate(mm, dst, "w") == pa
    m.exit_mm(mm)                                                # check_mm: no leak, no bad rss


@pytest.mark.parametrize("kernel", ["6.4", "6.5", "6.6"])
def test_there_is_no_uffdio_move_before_68(kernel: str) -> None:
    m, k, mm, a, size = world("arm64", kernel)
    fill(m, mm, a, 1)
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, a + size, a, k.page_size)
    assert err.value.errno == userfaultfd.EINVAL
    assert m.read_user(mm, a, 8) == (1).to_bytes(8, "little")
    m.exit_mm(mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_errors_eexist_enoent_and_allow_src_holes(arch: str) -> None:
    m, k, mm, a, size = world(arch)
    page = k.page_size
    fill(m, mm, a, 1)
    fill(m, mm, a + size, 2)
    with pytest.raises(OSError) as err:                          # dst pte present
        m.uffdio_move(mm, a + size, a, page)
    assert err.value.errno == userfaultfd.EEXIST
    with pytest.raises(OSError) as err:                          # src hole
        m.uffdio_move(mm, a + size + page, a + 5 * page, page)
    assert err.value.errno == userfaultfd.ENOENT
    # a hole counts as moved with ALLOW_SRC_HOLES; the page after it really moves
    fill(m, mm, a + 6 * page, 3)
    got = m.uffdio_move(mm, a + size + 4 * page, a + 5 * page, 2 * page, emu.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
    assert got == 2 * page and m.translate(mm, a + size + 4 * page) is None
    assert m.read_user(mm, a + size + 5 * page, 8) == (3).to_bytes(8, "little")
    # a partial failure reports what was moved before it
    fill(m, mm, a + 8 * page, 4)
    fill(m, mm, a + size + 9 * page, 5)                          # blocks the second page
    fill(m, mm, a + 9 * page, 6)
    assert m.uffdio_move(mm, a + size + 8 * page, a + 8 * page, 2 * page) == page
    for bad in ((a + 1, a + size, page), (a, a + size, 0), (a, a + size + 3, page)):
        with pytest.raises(OSError) as err:
            m.uffdio_move(mm, bad[1], bad[0], bad[2])
        assert err.value.errno == userfaultfd.EINVAL
    m.exit_mm(mm)


def test_shared_readonly_and_file_mappings_are_refused() -> None:
    m, k, mm, a, size = world("s390x")
    page = k.page_size
    fill(m, mm, a, 1)
    ro = m.mmap(mm, BASE + 4 * size, size, emu.PROT_READ, ANON)
    shared = m.mmap(mm, BASE + 6 * size, size, RW, emu.MAP_SHARED | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    inode = m.memfd_create("f", size)
    file = m.mmap(mm, BASE + 8 * size, size, RW, emu.MAP_PRIVATE | emu.MAP_FIXED, file=inode)
    for dst in (ro, shared, file):
        with pytest.raises(OSError) as err:
            m.uffdio_move(mm, dst, a, page)
        assert err.value.errno == userfaultfd.EINVAL
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, BASE + 12 * size, a, page)             # no VMA at dst
    assert err.value.errno == userfaultfd.ENOENT
    m.exit_mm(mm)
    m.close_file(inode)


def test_zero_page_moves_as_a_fresh_zero_pte() -> None:
    m, k, mm, a, size = world("x86_64")
    m.touch(mm, a)                                               # read fault: the zero page
    assert m.uffdio_move(mm, a + size, a, k.page_size) == k.page_size
    dst = pte_of(k, mm, a + size, pmd=True)
    assert dst.paddr == k.zero_page.paddr and dst.special and m.translate(mm, a) is None
    assert k.stats["uffdio_move_zeropage"] == 1
    m.exit_mm(mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_move_pages_pte_is_eagain_when_the_src_pmd_is_not_a_table(arch: str) -> None:
    """A src pmd that is huge or none by the time move_pages_pte() maps it fails the map:
    -EAGAIN, nothing left mapped, nothing changed. move_pages() itself splits the THP for
    a one-page move (6.8: split_huge_pmd(), then the PTE path, where the large folio's
    split_folio() is not modelled: -EBUSY; tests/test_uffd_move_huge.py has the rest)."""
    m, k, mm, a, size = world(arch)
    page = k.page_size
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    m.touch(mm, a, write=True)                                   # a THP: the src pmd is a leaf
    assert pte_of(k, mm, a, pmd=True).kind is Kind.LEAF
    fill(m, mm, a + size, 7)
    dst = a + size + page
    dst_pmd = run_sync(rmap.walk_to_pmd(k, mm, dst))
    far = m.mmap(mm, BASE + 4 * size, size, RW, ANON)            # never touched: its pmd is none
    none_pmd = run_sync(pgtable.walk_alloc(k, mm, far, k.arch.pmd_level))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(none_pmd)).kind is Kind.NONE
    for src, src_pmd in ((a, run_sync(rmap.walk_to_pmd(k, mm, a))), (far, none_pmd)):
        ret = run_sync(userfaultfd.move_pages_pte(k, mm, dst_pmd, src_pmd, mm.vma_lookup(dst),
                                                  mm.vma_lookup(src), dst, src, 0))
        assert ret == -userfaultfd.EAGAIN
        assert not k.rcu.readers and not k.san.pte_maps and pte_of(k, mm, dst, pmd=True).kind is Kind.NONE
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, dst, a, page)
    assert err.value.errno == userfaultfd.EBUSY and k.stats["uffdio_move_split_huge_pmd"] == 1
    assert k.stats["uffdio_move_split_folio_unmodelled"] == 1 and pte_of(k, mm, a, pmd=True).kind is Kind.LEAF
    split_pmd = k.physmem.read_entry(run_sync(rmap.walk_to_pmd(k, mm, a)))
    assert k.arch.decode(k.arch.pmd_level, split_pmd).kind is Kind.TABLE         # a pte now, not the pmd
    m.exit_mm(mm)


def test_dst_behind_a_thp_is_eexist() -> None:
    m, k, mm, a, size = world("arm64")
    fill(m, mm, a, 1)
    m.madvise(mm, a + size, size, emu.MADV_HUGEPAGE)
    m.touch(mm, a + size, write=True)
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, a + size + k.page_size, a, k.page_size)
    assert err.value.errno == userfaultfd.EEXIST
    m.exit_mm(mm)


# -- hand-scheduled: the retry paths -----------------------------------------------------------

def racing(kernel: str = "6.13", arch: str = "x86_64", **bugs):
    """The uffd-move-vs-folio-lock world, by hand: src page at BASE+2p, dst in another
    table (already there), reclaim isolating the src folio."""
    from mm_core import vmscan
    sc = Scenario(arch=arch, kernel=kernel, mem="16M")
    m, k = sc.machine, sc.kernel
    k.bugs.update(bugs)
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    src, dst = a + 2 * page, a + size + 5 * page
    pa = fill(m, mm, src, 0xF0110)
    fill(m, mm, dst + page, 1)                                   # the dst table exists
    folio = k.alloc.page_of(pa)
    sc.task("uffd", userfaultfd.move_pages(k, mm, dst, src, page))
    sc.task("reclaim", vmscan.shrink_folio_list(k, [folio]))
    return sc, m, k, mm, src, dst, folio


def test_folio_lock_contention_unmaps_sleeps_and_retries() -> None:
    """Reclaim holds the folio lock: move_pages_pte()'s folio_trylock() fails, it unmaps
    both ptes (LIFO), sleeps in folio_lock() (legal: no map, no RCU section left) and
    retries from the maps once reclaim unlocks."""
    sc, m, k, mm, src, dst, folio = racing()
    sc.run("reclaim:folio_trylock#1 uffd:*", finish=False)
    assert folio.locked and sc.state("uffd").value == "blocked"
    assert k.stats["uffdio_move_folio_lock_retry"] == 1
    assert not k.rcu.readers and not k.san.pte_maps              # nothing mapped while it sleeps
    sc.run()
    assert sc.results["uffd"] == k.page_size
    [res] = sc.results["reclaim"]
    assert res.activated and res.mappings_found == 1 == res.mapcount
    assert m.read_user(mm, dst, 8) == (0xF0110).to_bytes(8, "little") and m.translate(mm, src) is None
    assert (folio.refcount, folio.locked) == (1, False)
    m.exit_mm(mm)


@pytest.mark.parametrize("kernel", ["6.8", "6.13"])
def test_stack_copy_unmap_is_reported_by_the_map_balance_sanitizer(kernel: str) -> None:
    """The same schedule with the pre-927e926d72d9 code: pte_unmap(&orig_src_pte) names no
    map. The RCU counts would still balance (two rcu_read_unlock for two maps), so the RCU
    sanitizer stays quiet: the map-balance check reports it at the unmap itself."""
    sc, m, k, mm, src, dst, folio = racing(kernel, move_pages_pte_unmaps_stack_copy=True)
    with pytest.raises(Finding) as found:
        sc.run("reclaim:folio_trylock#1 uffd:*")
    f = found.value
    assert f.sanitizer == "PTEMAP" and f.signature == "PTEMAP:bad-unmap:move_pages_pte"
    report = f.report()
    assert f"pte_unmap() of {userfaultfd.STACK_ORIG_SRC_PTE:#x}" in report and "of uffd" in report
    assert "not a pointer into any page table" in report
    outstanding = [line for line in f.details if "mapped in move_pages_pte" in line]
    assert len(outstanding) == 2                                 # dst, then src, with their tables
    assert k.rcu.readers.get(next(t for t in sc.sched.tasks if t.name == "uffd"), 0) == 2


def test_src_pte_changed_before_the_pin_is_eagain_and_retried() -> None:
    """move_pages_pte() reads orig_src_pte under the ptl, drops it, and re-reads under the
    ptl to pin the folio (pte_same): reclaim clearing the young bit in between makes it
    -EAGAIN, and move_pages() tries the page again."""
    sc, m, k, mm, src, dst, folio = racing()
    # unlocks of uffd: dst_ptl after reading orig_dst_pte, src_ptl after orig_src_pte
    sc.run("uffd:unlock#2 reclaim:*", finish=False)
    [res] = sc.results["reclaim"]
    assert res.referenced == 1 and not pte_of(k, mm, src, pmd=True).young
    sc.run()
    assert sc.results["uffd"] == k.page_size and k.stats["uffdio_move_eagain"] == 1
    assert k.stats["uffdio_move_folio_lock_retry"] == 0
    assert m.read_user(mm, dst, 8) == (0xF0110).to_bytes(8, "little")
    m.exit_mm(mm)


def test_lifo_violation_at_exit_is_reported_without_any_race() -> None:
    sc, m, k, mm, src, dst, folio = racing(move_pages_pte_unmaps_in_map_order=True)
    with pytest.raises(Finding) as found:
        sc.run("uffd:*")
    assert found.value.signature == "PTEMAP:lifo:move_pages_pte"
    assert "out of LIFO order" in found.value.title


# -- 6.14: PT_RECLAIM and the dst pmd recheck -----------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_pt_reclaim_frees_a_table_dontneed_emptied_only_under_614(arch: str) -> None:
    for kernel, freed in (("6.13", False), ("6.14", True)):
        m, k, mm, a, size = world(arch, kernel)
        fill(m, mm, a + size + 3 * k.page_size, 1)
        fill(m, mm, a, 2)
        pmdp = run_sync(rmap.walk_to_pmd(k, mm, a + size))
        tables = mm.pgtables_bytes
        m.madvise(mm, a, size // 2, emu.MADV_DONTNEED)           # part of an extent: never
        m.madvise(mm, a + size, size, emu.MADV_DONTNEED)         # a whole extent: under 6.14
        pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
        assert (pmd.kind is Kind.NONE) == freed and k.stats["pt_reclaimed"] == int(freed)
        part = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(run_sync(rmap.walk_to_pmd(k, mm, a))))
        assert part.kind is Kind.TABLE and pte_of(k, mm, a, pmd=True).kind is Kind.NONE
        assert (mm.pgtables_bytes < tables) == freed
        m.rcu_barrier()
        assert m.read_user(mm, a + size + 3 * k.page_size, 8) == b""
        m.touch(mm, a + size, write=True)                        # refaults into a new table
        m.exit_mm(mm)


def reclaim_race(kernel: str, **bugs):
    """UFFDIO_MOVE into a table whose only other page MADV_DONTNEED drops (whole extent)."""
    sc = Scenario(arch="x86_64", kernel=kernel, mem="16M")
    m, k = sc.machine, sc.kernel
    k.bugs.update(bugs)
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    src, dst = a + 2 * page, a + size + 5 * page
    fill(m, mm, src, 0xD57)
    fill(m, mm, a + size + page, 1)
    from mm_core import madvise
    sc.task("uffd", userfaultfd.move_pages(k, mm, dst, src, page))
    sc.task("dontneed", madvise.madvise_dontneed(k, mm, a + size, a + 2 * size))
    return sc, m, k, mm, src, dst


# uffd has read orig_dst_pte (none) and orig_src_pte under their ptls; MADV_DONTNEED then
# zaps the dst table's other page and PT_RECLAIM frees the table
RECLAIM_SCHEDULE = "uffd:unlock#2 dontneed:* uffd:*"


def test_dst_pmd_recheck_sends_the_move_to_a_fresh_table_under_614() -> None:
    sc, m, k, mm, src, dst = reclaim_race("6.14")
    sc.run(RECLAIM_SCHEDULE)
    assert k.stats["pt_reclaimed"] == 1 and k.stats["uffdio_move_eagain"] == 1
    assert sc.results["uffd"] == k.page_size
    assert m.read_user(mm, dst, 8) == (0xD57).to_bytes(8, "little") and m.translate(mm, src) is None
    m.exit_mm(mm)


def test_without_the_dst_pmd_recheck_the_page_lands_in_the_freed_table() -> None:
    sc, m, k, mm, src, dst = reclaim_race("6.14", move_pages_pte_without_dst_pmd_recheck=True)
    with pytest.raises(Finding) as found:
        sc.run(RECLAIM_SCHEDULE)
    assert found.value.signature == "LOSTPTE:move_present_pte"
    assert any("PT_RECLAIM" in line for line in found.value.details)
