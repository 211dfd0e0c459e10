"""The /proc/PID walkers (mm_core/task_mmu.py): smaps / smaps_rollup, pagemap and
clear_refs through the real page-table bytes, checked against independently computed
expectations (Machine.translate(), the raw entries, the kernel's fixed-point Pss), and
their failure category forced by schedules: a failed pte_offset_map_lock() is
ACTION_AGAIN (RETRY: the pmd is read again, a retracted one is a hole), and a pmd that
stays a migration entry is taken by pmd_trans_huge_lock() (no endless retry)."""
from __future__ import annotations

import re

import pytest
from conftest import finish

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, rmap, task_mmu
from mm_core.sched_helpers import stalled_thp_migration
from mm_core.task_mmu import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFRAME_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PSS_SHIFT,
)

BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]




def kb(n: int) -> int:
    return n >> 10


def raw_ptes(m, mm, a: int, n: int) -> list[int]:
    """The raw PTE values of pages [a, a + n pages), read from guest RAM."""
    k = m.kernel
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.TABLE
    base = pmd.paddr + k.arch.levels[k.arch.pte_level].index(a) * 8
    return [k.physmem.read_entry(base + 8 * i) for i in range(n)]


# -- smaps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_smaps_counts_what_the_tables_map(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 16 * page, RW, ANON)
    written, read = [1, 2, 3, 7, 8], [10, 11]
    for i in written:
        m.touch(mm, a + i * page, write=True)
    for i in read:                                          # the zero page: not a normal page
        m.touch(mm, a + i * page)
    # independent count: pages whose translation is a frame other than the zero page
    mapped = [i for i in range(16) if (pa := m.translate(mm, a + i * page)) is not None
              and pa >> k.page_shift != k.zero_page.paddr >> k.page_shift]
    assert mapped == written
    [rec] = m.smaps(mm)
    n = len(written) * page
    assert rec.mss.resident == n and rec.mss.anonymous == n and rec.mss.private_dirty == n
    assert rec.mss.pss == n << PSS_SHIFT and rec.mss.referenced == n
    assert rec.mss.shared_clean == rec.mss.shared_dirty == rec.mss.private_clean == 0
    assert rec["Rss"] == rec["Pss"] == rec["Private_Dirty"] == kb(n) == mm.rss[1] * page >> 10
    assert rec["Size"] == kb(16 * page) and rec["KernelPageSize"] == kb(page)
    text = rec.render()
    assert text.splitlines()[0] == f"{a:08x}-{a + 16 * page:08x} rw-p 00000000 00:00 0 "
    assert re.search(rf"^Rss: +{kb(n)} kB$", text, re.M)
    assert f"\nRss:            {kb(n):8} kB\n" in text        # SEQ_PUT_DEC: width 8
    assert text.endswith("VmFlags: rd wr mr mw me \n")
    roll = m.smaps_rollup(mm)
    assert roll["Rss"] == kb(n) and roll["Pss_Anon"] == kb(n) and roll["Pss_File"] == 0
    assert roll.render().splitlines()[0].endswith(" [rollup]")
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_smaps_pss_is_divided_by_the_mapcount_after_fork(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    for i in range(3):
        m.touch(mm, a + i * page, write=True)
    child = m.fork_mm(mm)
    for who in (mm, child):                                  # each page: mapcount 2
        [rec] = m.smaps(who)
        assert rec.mss.pss == 3 * ((page << PSS_SHIFT) // 2)
        assert rec["Pss"] == kb(3 * page // 2) and rec["Rss"] == kb(3 * page)
        assert rec.mss.shared_dirty == 3 * page and rec.mss.private_dirty == 0
    grandchild = m.fork_mm(child)                           # mapcount 3: the fixed point shows
    [rec] = m.smaps(mm)
    assert rec.mss.pss == 3 * ((page << PSS_SHIFT) // 3)
    assert rec["Pss"] == kb((3 * ((page << PSS_SHIFT) // 3)) >> PSS_SHIFT) < kb(page)   # a byte lost
    m.touch(mm, a, write=True)                              # COW: the parent gets its own page
    [rec] = m.smaps(mm)
    assert rec.mss.private_dirty == page and rec.mss.shared_dirty == 2 * page
    assert rec.mss.pss == (page << PSS_SHIFT) + 2 * ((page << PSS_SHIFT) // 3)
    finish(m, grandchild, child, mm)


def test_smaps_thp_lazyfree_and_locked() -> None:
    m = emu.Machine(arch="x86_64", mem="64M", prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    page = k.page_size
    mm, a, _ = anon_thp(m)
    [rec] = m.smaps(mm)
    assert rec.mss.anonymous_thp == rec.mss.resident == rec.mss.private_dirty == size
    assert rec.mss.pss == size << PSS_SHIFT and rec["THPeligible"] == 1
    child = m.fork_mm(mm)                                   # refcount 2: per page, mapcount 2
    [rec] = m.smaps(mm)
    assert rec.mss.pss == (size // page) * ((page << PSS_SHIFT) // 2) and rec.mss.shared_dirty == size
    m.exit_mm(child)
    m.mlock(mm, a, size)
    [rec] = m.smaps(mm)
    assert rec.mss.pss_locked == rec.mss.pss == size << PSS_SHIFT and rec["Locked"] == kb(size)
    assert "lo " in rec.render().splitlines()[-1]
    m.munlock(mm, a, size)
    b = m.mmap(mm, BASE + size, 8 * page, RW, ANON)
    for i in range(8):
        m.touch(mm, b + i * page, write=True)
    m.madvise(mm, b, 8 * page, emu.MADV_FREE)              # clean + lazyfree
    recs = m.smaps(mm)
    assert recs[1].mss.lazyfree == 8 * page and recs[1].mss.private_clean == 8 * page
    m.touch(mm, b, write=True)                              # dirtied again: not lazyfree any more
    assert m.smaps(mm)[1].mss.lazyfree == 7 * page
    finish(m, mm)


def test_smaps_of_shared_file_mappings() -> None:
    m = emu.Machine(arch="arm64", mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("smaps", size)
    mm, other = m.new_mm(), m.new_mm()
    a = m.mmap(mm, BASE, size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    m.mmap(other, BASE, size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for i in range(4):
        m.touch(mm, a + i * page, write=True)
    m.touch(other, a, write=True)                           # page 0 is mapped twice
    [rec] = m.smaps(mm)
    assert rec.mss.resident == 4 * page and rec.mss.anonymous == 0
    assert rec.mss.shared_dirty == page and rec.mss.private_dirty == 3 * page
    assert rec.mss.pss == ((page << PSS_SHIFT) // 2) + 3 * (page << PSS_SHIFT) == rec.mss.pss_shmem
    prefix = f"{a:08x}-{a + size:08x} rw-s 00000000 00:01 {inode.ino} "
    assert rec.render().splitlines()[0] == prefix + " " * (72 - len(prefix)) + " /memfd:smaps (deleted)"
    pm = m.pagemap(mm, a, a + 2 * page)
    assert pm[0] & PM_FILE and not pm[0] & PM_MMAP_EXCLUSIVE    # shared with the other mm
    assert pm[1] & PM_FILE and pm[1] & PM_MMAP_EXCLUSIVE
    m.exit_mm(other)
    # a collapsed file THP refaulted as one pmd: ShmemPmdMapped
    assert run_sync(khugepaged.collapse_file(k, inode, 0, is_khugepaged=True)) is khugepaged.Scan.SUCCEED
    m.touch(mm, a)
    [rec] = m.smaps(mm)
    assert rec.mss.shmem_thp == size == rec.mss.resident and rec.mss.anonymous_thp == 0
    pm = m.pagemap(mm, a, a + size)
    assert all(e & PM_PRESENT and not e & PM_FILE for e in pm)   # 6.6: no PM_FILE for a pmd
    finish(m, mm, files=[inode])


# -- pagemap -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_pagemap_entries_match_the_translations(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    m.mmap(mm, BASE + 10 * page, 2 * page, RW, ANON)       # a gap of two pages before it
    for i in (0, 3, 4):
        m.touch(mm, a + i * page, write=True)
    m.touch(mm, a + 6 * page)                               # the zero page
    m.touch(mm, a + 11 * page, write=True)
    pm = m.pagemap(mm, a, a + 14 * page)                   # past the last VMA too
    assert len(pm) == 14
    for i, e in enumerate(pm):
        pa = m.translate(mm, a + i * page)
        assert bool(e & PM_PRESENT) == (pa is not None), i
        assert not e & (PM_SWAP | PM_FILE)
        if pa is None:
            assert e == 0
            continue
        assert e & PM_PFRAME_MASK == pa >> k.page_shift
        normal = pa >> k.page_shift != k.zero_page.paddr >> k.page_shift
        assert bool(e & PM_MMAP_EXCLUSIVE) == normal       # the zero page is no normal page
    hidden = m.pagemap(mm, a, a + 14 * page, show_pfn=False)
    assert [e & PM_PFRAME_MASK for e in hidden] == [0] * 14
    assert [e & ~PM_PFRAME_MASK for e in hidden] == [e & ~PM_PFRAME_MASK for e in pm]
    child = m.fork_mm(mm)                                   # shared now: no longer exclusive
    assert not m.pagemap(mm, a, a + page)[0] & PM_MMAP_EXCLUSIVE
    assert m.pagemap(child, a, a + page)[0] & PM_PFRAME_MASK == pm[0] & PM_PFRAME_MASK
    finish(m, child, mm)


@pytest.mark.parametrize("arch", ["x86_64", "ppc64"])
def test_pagemap_expands_a_huge_pmd_page_by_page(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    m.madvise(mm, a, 2 * size, emu.MADV_HUGEPAGE)
    m.touch(mm, a + size, write=True)
    start = a + size - 2 * page                             # an unaligned read across two chunks
    pm = m.pagemap(mm, start, a + 2 * size)
    assert pm[:2] == [0, 0] and len(pm) == 2 + size // page
    for i, e in enumerate(pm[2:]):
        assert e & PM_PRESENT and e & PM_MMAP_EXCLUSIVE
        assert e & PM_PFRAME_MASK == m.translate(mm, a + size + i * page) >> k.page_shift
    finish(m, mm)


def test_pagemap_walks_pmd_sized_chunks_each_under_mmap_read_lock() -> None:
    sc = Scenario(arch="x86_64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 3 * size, RW, ANON)
    m.touch(mm, a + size + 5 * k.page_size, write=True)
    start = a + size // 2
    sc.task("pagemap", task_mmu.pagemap_read(k, mm, (start >> 12) * 8, (2 * size >> 12) * 8, True))
    sc.run()
    pm = sc.results["pagemap"]
    assert len(pm) == 2 * size >> 12
    assert [i for i, e in enumerate(pm) if e] == [size // 2 // 4096 + 5]
    locks = [t for t in sc.trace_of("pagemap") if "mmap_lock" in t and " lock" in t]
    assert len(locks) == 3                                   # half a pmd, a pmd, half a pmd
    finish(m, mm)


# -- clear_refs ----------------------------------------------------------------------------------

YOUNG_BIT = {"x86_64": 1 << 5, "arm64": 1 << 10, "s390x": 0x004, "ppc64": 0x100}


@pytest.mark.parametrize("arch", ARCHES)
def test_clear_refs_clears_the_young_bits_in_the_raw_entries(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("refs", 4 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    f = m.mmap(mm, BASE + 8 * page, 4 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for i in range(4):
        m.touch(mm, a + i * page, write=True)
        m.touch(mm, f + i * page, write=True)
    young = YOUNG_BIT[arch]
    assert all(raw & young for raw in raw_ptes(m, mm, a, 4) + raw_ptes(m, mm, f, 4))
    assert [r["Referenced"] for r in m.smaps(mm)] == [kb(4 * page)] * 2
    flushes = k.stats["tlb_shootdowns"]
    m.clear_refs(mm, task_mmu.CLEAR_REFS_ANON)              # 2: only the anonymous VMA
    assert not any(raw & young for raw in raw_ptes(m, mm, a, 4))
    assert all(raw & young for raw in raw_ptes(m, mm, f, 4))
    assert [r["Referenced"] for r in m.smaps(mm)] == [0, kb(4 * page)]
    m.clear_refs(mm, task_mmu.CLEAR_REFS_MAPPED)            # 3: only the file VMA
    assert not any(raw & young for raw in raw_ptes(m, mm, f, 4))
    assert [r["Referenced"] for r in m.smaps(mm)] == [0, 0]
    assert all(k.arch.decode(k.arch.pte_level, raw).kind is Kind.LEAF for raw in raw_ptes(m, mm, a, 4))
    assert k.stats["tlb_shootdowns"] == flushes             # young clearing: no flush in 6.6
    m.touch(mm, a + page)                                   # accessed again: young again
    assert m.smaps(mm)[0]["Referenced"] == kb(page)
    m.clear_refs(mm, task_mmu.CLEAR_REFS_ALL)
    assert [r["Referenced"] for r in m.smaps(mm)] == [0, 0]
    for bad in (0, 6):
        with pytest.raises(OSError) as err:
            m.clear_refs(mm, bad)
        assert err.value.errno == 22
    m.clear_refs(mm, task_mmu.CLEAR_REFS_MM_HIWATER_RSS)
    assert mm.hiwater_rss == 8
    finish(m, mm, files=[inode])


def test_clear_refs_clears_the_young_bit_of_a_huge_pmd() -> None:
    m = emu.Machine(arch="arm64", mem="64M", prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert k.physmem.read_entry(pmdp) & YOUNG_BIT["arm64"]
    assert m.smaps(mm)[0].mss.referenced == size
    m.clear_refs(mm, task_mmu.CLEAR_REFS_ALL)
    assert not k.physmem.read_entry(pmdp) & YOUNG_BIT["arm64"]
    assert m.smaps(mm)[0].mss.referenced == 0
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_clear_refs_soft_dirty_then_a_write_marks_only_that_page(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    for i in range(4):
        m.touch(mm, a + i * page, write=True)
    has = task_mmu.mem_soft_dirty(k)
    assert has == (arch != "arm64")
    assert [bool(e & PM_SOFT_DIRTY) for e in m.pagemap(mm, a, a + 4 * page)] == [has] * 4
    before = raw_ptes(m, mm, a, 4)
    flushes = k.stats["tlb_shootdowns"]
    m.clear_refs(mm, task_mmu.CLEAR_REFS_SOFT_DIRTY)
    assert k.stats["tlb_shootdowns"] == flushes + 1         # flush_tlb_mm() after the walk
    if not has:                                             # arm64: clear_soft_dirty() is a stub
        assert raw_ptes(m, mm, a, 4) == before
        finish(m, mm)
        return
    ptes = [k.arch.decode(k.arch.pte_level, raw) for raw in raw_ptes(m, mm, a, 4)]
    assert all(not p.soft_dirty and not p.prot & Access.W and p.dirty for p in ptes)
    assert not any(e & PM_SOFT_DIRTY for e in m.pagemap(mm, a, a + 4 * page))
    assert m.translate(mm, a + 2 * page, "w") is None      # write-protected: the write faults
    m.touch(mm, a + 2 * page, write=True)                   # do_wp_page: reuse, pte_mkdirty()
    assert [bool(e & PM_SOFT_DIRTY) for e in m.pagemap(mm, a, a + 4 * page)] == [False, False, True, False]
    finish(m, mm)


# -- the failure category, forced ------------------------------------------------------------

def _collapsed_file(sc: Scenario):
    """A shmem file whose page cache holds one PMD-order folio, mapped by a process whose
    (now empty) PTE table for it is still in place: collapse_file() without the retract."""
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("race", size)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for off in range(0, size, k.page_size):
        m.touch(mm, a + off, write=True)
    assert run_sync(khugepaged.collapse_file(k, inode, 0, is_khugepaged=True, retract=False)) \
        is khugepaged.Scan.SUCCEED
    return m, k, size, inode, mm, a


WALKERS = {
    "smaps": (lambda k, mm, a, size: task_mmu.show_smaps(k, mm), "smaps_pte_range_again"),
    "pagemap": (lambda k, mm, a, size: task_mmu.pagemap_read(k, mm, (a >> 12) * 8, (size >> 12) * 8, True),
                "pagemap_pmd_range_again"),
    "clear_refs": (lambda k, mm, a, size: task_mmu.clear_refs_write(k, mm, task_mmu.CLEAR_REFS_ALL),
                   "clear_refs_pte_range_again"),
}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("walker", sorted(WALKERS))
def test_walker_retries_a_retracted_table_and_then_sees_a_hole(walker: str, arch: str) -> None:
    """The pmd read by walk_pmd_range() and by the pmd_trans_huge_lock() test names the
    (empty) table; retract_page_tables() clears it before pte_offset_map_lock(): the map
    fails, ACTION_AGAIN, walk_pmd_range() reads the pmd again and finds a hole."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k, size, inode, mm, a = _collapsed_file(sc)
    make, again = WALKERS[walker]
    sc.task(walker, make(k, mm, a, size))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # the walk's reads down to the pmd, walk_pmd_range's read of it, the pmd_trans_huge_lock test
    sc.run(f"{walker}:pt_read#{k.arch.pmd_level + 2} retract:* {walker}:*")
    assert sc.results["retract"] == 1
    assert k.stats[again] == 1 and sum(" retry" in t for t in sc.trace_of(walker)) == 1
    assert k.stats["pte_map_failed"] >= 1
    result = sc.results[walker]
    if walker == "smaps":
        assert [r.mss.resident for r in result] == [0]      # the hole holds nothing
    elif walker == "pagemap":
        assert result == [0] * (size // k.page_size)        # every page of the hole: an entry 0
    else:
        assert result == 0 and k.stats["clear_refs_young"] == 0
    sc.run()
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])           # s390x has no THP migration entries
@pytest.mark.parametrize("walker", sorted(WALKERS))
def test_walker_over_a_migration_pmd_ends(walker: str, arch: str) -> None:
    """A THP under migration: pmd_trans_huge_lock() returns the migration pmd locked, so
    the walkers handle it there and never set ACTION_AGAIN for it (no endless retry,
    unlike DAMON before 2025)."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    page = k.page_size
    mm, a, thp = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    make, again = WALKERS[walker]
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task(walker, make(k, mm, a, size))
    sc.run(f"migrate:* {walker}:*", finish=False)
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    assert k.stats[again] == 0 and not any(" retry" in t for t in sc.trace_of(walker))
    result = sc.results[walker]
    if walker == "smaps":                                   # counted whole, private (mapcount unread)
        [rec] = result
        assert rec.mss.anonymous_thp == rec.mss.resident == size and rec.mss.pss == size << PSS_SHIFT
    elif walker == "pagemap":                               # PM_SWAP, type | (pfn + i) << 5
        pfn = thp >> k.page_shift
        assert all(e & PM_SWAP and not e & (PM_PRESENT | PM_MMAP_EXCLUSIVE) for e in result)
        assert [(e & PM_PFRAME_MASK) >> 5 for e in result] == [pfn + i for i in range(size // page)]
        assert {e & 31 for e in result} == {27}            # SWP_MIGRATION_WRITE
    else:
        assert result == 0 and k.stats["clear_refs_young"] == 0
    sc.run()
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    finish(m, mm)


# -- PAGEMAP_SCAN (6.7+) -------------------------------------------------------------------------

def _categories_from_pagemap(k, e: int) -> int:
    """What PAGEMAP_SCAN must say about a small page, from its pagemap entry."""
    cats = 0
    if e & PM_PRESENT:
        cats |= task_mmu.PAGE_IS_PRESENT | task_mmu.PAGE_IS_WRITTEN
        if e & PM_PFRAME_MASK == k.zero_page.paddr >> k.page_shift:
            cats |= task_mmu.PAGE_IS_PFNZERO
        if e & PM_FILE:
            cats |= task_mmu.PAGE_IS_FILE
    return cats


@pytest.mark.parametrize("arch", ARCHES)
def test_pagemap_scan_reports_regions_by_category(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("scan", 4 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    f = m.mmap(mm, BASE + 10 * page, 4 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for i in (0, 1, 2, 5):
        m.touch(mm, a + i * page, write=True)
    m.touch(mm, a + 3 * page)                               # the zero page
    m.touch(mm, f + page, write=True)
    # the expectation, independently: per-page categories from pagemap, merged
    expect: list[list[int]] = []
    for i, e in enumerate(m.pagemap(mm, a, a + 14 * page)):
        va = a + i * page
        if mm.vma_lookup(va) is None:                       # outside any VMA: not reported
            continue
        cats = _categories_from_pagemap(k, e)
        if expect and expect[-1][1] == va and expect[-1][2] == cats:
            expect[-1][1] += page
        else:
            expect.append([va, va + page, cats])
    got = m.pagemap_scan(mm, a, a + 14 * page)
    assert got == [tuple(r) for r in expect]
    assert got[:3] == [(a, a + 3 * page, task_mmu.PAGE_IS_PRESENT | task_mmu.PAGE_IS_WRITTEN),
                       (a + 3 * page, a + 4 * page,
                        task_mmu.PAGE_IS_PRESENT | task_mmu.PAGE_IS_WRITTEN | task_mmu.PAGE_IS_PFNZERO),
                       (a + 4 * page, a + 5 * page, 0)]
    # only present pages, at most two regions: -ENOSPC inside, two regions out
    present = m.pagemap_scan(mm, a, a + 14 * page, category_mask=task_mmu.PAGE_IS_PRESENT, vec_len=2)
    assert present == [(a, a + 3 * page, got[0][2]), (a + 3 * page, a + 4 * page, got[1][2])]
    assert m.pagemap_scan(mm, a, a + 14 * page, category_anyof_mask=task_mmu.PAGE_IS_FILE)[0][:2] \
        == (f + page, f + 2 * page)
    assert m.pagemap_scan(mm, a, a + 14 * page, category_mask=task_mmu.PAGE_IS_PRESENT, max_pages=2) \
        == [(a, a + 2 * page, got[0][2])]
    for bad, errno in (({"flags": task_mmu.PM_SCAN_CHECK_WPASYNC}, 1),
                       ({"flags": task_mmu.PM_SCAN_WP_MATCHING}, 22), ({"return_mask": 1 << 9}, 22)):
        with pytest.raises(OSError) as err:
            m.pagemap_scan(mm, a, a + page, **bad)
        assert err.value.errno == errno
    finish(m, mm, files=[inode])


def _scan(k, mm, a, size):
    return task_mmu.do_pagemap_scan(k, mm, task_mmu.PmScanArg(a, a + size, vec_len=64))


@pytest.mark.parametrize("arch", ARCHES)
def test_pagemap_scan_retries_a_retracted_table_and_then_sees_a_hole(arch: str) -> None:
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k, size, inode, mm, a = _collapsed_file(sc)
    sc.task("scan", _scan(k, mm, a, size))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"scan:pt_read#{k.arch.pmd_level + 2} retract:* scan:*")
    assert sc.results["retract"] == 1
    assert k.stats["pagemap_scan_pmd_entry_again"] == 1
    assert sum(" retry" in t for t in sc.trace_of("scan")) == 1
    assert sc.results["scan"] == (1, [(a, a + size, 0)])     # the hole: one region, no category
    sc.run()
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_pagemap_scan_over_a_persistent_migration_pmd_ends(arch: str) -> None:
    """spec section 7 asked whether PAGEMAP_SCAN copied DAMON's endless ACTION_AGAIN: its
    pagemap_scan_thp_entry() takes the migration pmd with pmd_trans_huge_lock() first,
    so the walk reports it (HUGE | SWAPPED) and ends while the migration is still stalled."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("scan", _scan(k, mm, a, size))
    sc.run("migrate:* scan:*", finish=False)
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    huge_swapped = task_mmu.PAGE_IS_HUGE | task_mmu.PAGE_IS_SWAPPED | task_mmu.PAGE_IS_WRITTEN
    assert sc.results["scan"] == (1, [(a, a + size, huge_swapped)])
    assert k.stats["pagemap_scan_pmd_entry_again"] == 0
    assert not any(" retry" in t for t in sc.trace_of("scan"))
    sc.run()
    assert m.pagemap_scan(mm, a, a + size) == [(a, a + size, task_mmu.PAGE_IS_HUGE | task_mmu.PAGE_IS_PRESENT
                                                | task_mmu.PAGE_IS_WRITTEN)]
    finish(m, mm)
