"""The pte_offset_map family's outcomes and the pmd transitions of spec §6, per arch."""
from __future__ import annotations

import pytest

import emu
from emu.arch import PAGE_SIZE, SWP_MIGRATION_READ, Kind, leaf_entry, swap_entry
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, pgtable, rmap
from mm_core.config import PROFILES

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def world(arch: str, kernel: str = "6.6"):
    m = emu.Machine(arch=arch, mem="32M", kernel=kernel)
    mm = m.new_mm()
    size = huge_memory.hpage_pmd_size(m.kernel)
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    m.touch(mm, a, write=True)
    pmdp = run_sync(rmap.walk_to_pmd(m.kernel, mm, a))
    return m, m.kernel, mm, a, pmdp, size


def pmd_kind(k, pmdp: int) -> Kind:
    return k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind


@pytest.mark.parametrize("arch", ARCHES)
def test_map_of_a_table_succeeds_and_holds_rcu_until_unmap(arch: str) -> None:
    m, k, mm, a, pmdp, _ = world(arch)
    ptep, pmdval = run_sync(pgtable.__pte_offset_map(k, pmdp, a))
    assert pmdval.kind is Kind.TABLE and ptep == pmdval.paddr + k.arch.levels[-1].index(a) * 8
    assert k.rcu.readers != {}
    run_sync(pgtable.pte_unmap(k, ptep))
    assert k.rcu.readers == {}


@pytest.mark.parametrize("arch", ARCHES)
def test_map_of_a_none_pmd_fails_without_holding_rcu(arch: str) -> None:
    m, k, mm, a, pmdp, size = world(arch)
    other = run_sync(rmap.walk_to_pmd(k, mm, a + size))
    assert pmd_kind(k, other) is Kind.NONE
    ptep, pmdval = run_sync(pgtable.__pte_offset_map(k, other, a + size))
    assert ptep is None and pmdval.kind is Kind.NONE and k.rcu.readers == {}
    assert run_sync(pgtable.pte_offset_map_lock(k, mm, other, a + size)) is None


@pytest.mark.parametrize("arch", ARCHES)
def test_map_of_a_huge_pmd_fails(arch: str) -> None:
    m, k, mm, a, pmdp, size = world(arch)
    m.madvise(mm, a, size, emu.MADV_COLLAPSE)
    assert pmd_kind(k, pmdp) is Kind.LEAF
    assert run_sync(pgtable.pte_offset_map(k, pmdp, a)) is None
    assert run_sync(pgtable.pte_offset_map_nolock(k, mm, pmdp, a)) is None


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "ppc64"])      # s390x has no pmd migration
def test_map_of_a_migration_pmd_fails(arch: str) -> None:
    m, k, mm, a, pmdp, size = world(arch)
    saved = k.physmem.read_entry(pmdp)
    k.physmem.write_entry(pmdp, k.arch.encode(k.arch.pmd_level, swap_entry(SWP_MIGRATION_READ, 0x1234)))
    assert pmd_kind(k, pmdp) is Kind.MIGRATION
    assert run_sync(pgtable.pte_offset_map(k, pmdp, a)) is None
    assert k.physmem.read_entry(pmdp) != saved and pmd_kind(k, pmdp) is Kind.MIGRATION   # left alone
    k.physmem.write_entry(pmdp, saved)


@pytest.mark.parametrize("arch", ["x86_64", "s390x", "ppc64"])   # arm64: a valid non-table pmd is a block
def test_map_of_a_bad_pmd_clears_it_with_pmd_error(arch: str) -> None:
    m, k, mm, a, pmdp, size = world(arch)
    other = run_sync(rmap.walk_to_pmd(k, mm, a + size))
    k.physmem.write_entry(other, 0x5077)       # table-ish bits the arch does not allow in a pmd
    assert pmd_kind(k, other) is Kind.BAD
    assert run_sync(pgtable.pte_offset_map(k, other, a + size)) is None
    assert pmd_kind(k, other) is Kind.NONE and any("pmd_ERROR" in line for line in k.log)


@pytest.mark.parametrize("arch", ARCHES)
def test_pmd_transitions_none_table_huge_table_none(arch: str) -> None:
    """NONE -> TABLE (fault), TABLE -> HUGE (anon collapse, table deposited),
    HUGE -> TABLE (split with the deposit), TABLE -> NONE (munmap's free_pgtables),
    NONE -> HUGE (THP fault), HUGE -> NONE (MADV_DONTNEED: zap_huge_pmd)."""
    m, k, mm, a, pmdp, size = world(arch)
    assert pmd_kind(k, pmdp) is Kind.TABLE
    for off in range(0, size, PAGE_SIZE):
        m.touch(mm, a + off, write=True)
    m.madvise(mm, a, size, emu.MADV_COLLAPSE)
    assert pmd_kind(k, pmdp) is Kind.LEAF and k.deposits[pmdp]
    m.mprotect(mm, a + PAGE_SIZE, PAGE_SIZE, emu.PROT_READ)
    assert pmd_kind(k, pmdp) is Kind.TABLE and pmdp not in k.deposits
    m.munmap(mm, a, 2 * size)
    assert pmd_kind(k, pmdp) is Kind.NONE or run_sync(rmap.walk_to_pmd(k, mm, a)) is None
    b = m.mmap(mm, BASE, size, RW, ANON)
    m.madvise(mm, b, size, emu.MADV_HUGEPAGE)
    m.touch(mm, b + 3 * PAGE_SIZE, write=True)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, b))
    assert pmd_kind(k, pmdp) is Kind.LEAF
    m.madvise(mm, b, size, emu.MADV_DONTNEED)
    assert pmd_kind(k, pmdp) is Kind.NONE and mm.rss[1] == 0
    m.exit_mm(mm)
    m.rcu_barrier()
    assert k.alloc.pages.keys() == {k.zero_page.pfn}


def test_pte_offset_map_lock_uses_the_snapshot_tables_lock() -> None:
    m, k, mm, a, pmdp, _ = world("x86_64")
    ptep, ptl = run_sync(pgtable.pte_offset_map_lock(k, mm, pmdp, a)) or (None, None)
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr]
    assert ptl is table.ptl and ptl is not mm.page_table_lock
    run_sync(pgtable.pte_unmap_unlock(k, ptep, ptl))


def test_khugepaged_daemon_collapses_a_registered_anon_range() -> None:
    """khugepaged wakes on MADV_HUGEPAGE, sleeps scan_sleep, then collapses with
    mmap_read_trylock + collapse_huge_page while the guest keeps running."""
    from emu.scenario import Scenario
    sc = Scenario(arch="x86_64")
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    for off in range(0, size, PAGE_SIZE):
        pa = m.touch(mm, a + off, write=True)
        m.physmem[pa] = (off // PAGE_SIZE) & 0xFF
    k.khugepaged.scan_sleep = 1000
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    sc.sched.spawn(khugepaged.khugepaged(k), "khugepaged", daemon=True)

    async def busy():                       # a user task whose time lets khugepaged wake
        from emu.sched import traps
        for _ in range(10):
            await traps.sched_point("work", None, 500)
    sc.task("user", busy())
    sc.run()
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert pmd_kind(k, pmdp) is Kind.LEAF
    assert k.stats["khugepaged:SCAN_SUCCEED"] == 1 and k.khugepaged.full_scans == 1
    for off in range(0, size, 61 * PAGE_SIZE):
        assert m.physmem[m.touch(mm, a + off)] == (off // PAGE_SIZE) & 0xFF
    assert leaf_entry is not None


def test_nolock_variants_exist_only_in_their_profiles() -> None:
    m613, k613, mm613, a613, pmdp613, _ = world("x86_64", "6.13")
    with pytest.raises(pgtable.ApiError, match="removed in 6.13"):
        run_sync(pgtable.pte_offset_map_nolock(k613, mm613, pmdp613, a613))
    ptep, ptl, pmdval = run_sync(pgtable.pte_offset_map_rw_nolock(k613, mm613, pmdp613, a613))
    assert pmdval.kind is Kind.TABLE and ptl is k613.ptdescs[pmdval.paddr].ptl
    run_sync(pgtable.pte_unmap(k613, ptep))
    m66, k66, mm66, a66, pmdp66, _ = world("x86_64", "6.6")
    with pytest.raises(pgtable.ApiError, match="from 6.13 on"):
        run_sync(pgtable.pte_offset_map_ro_nolock(k66, mm66, pmdp66, a66))


@pytest.mark.parametrize("kernel", list(PROFILES))
def test_guest_programs_run_under_every_profile(kernel: str) -> None:
    from conftest import expected, workload
    m = emu.Machine(arch="arm64", mem="32M", kernel=kernel)
    m.spawn(workload("arm64", "pagetouch"), ["pagetouch"])
    assert m.run().stdout == expected("pagetouch")[0]


def test_walk_page_range_retries_a_failed_map_and_reports_holes() -> None:
    """walk_pte_range's failed pte_offset_map_lock is ACTION_AGAIN: walk_pmd_range reads
    the pmd again and, now none, reports a hole (RETRY category)."""
    from mm_core import pagewalk
    m, k, mm, a, pmdp, size = world("x86_64")
    seen = {"holes": [], "ptes": 0}

    async def pte_entry(ptep, addr, end, walk):
        seen["ptes"] += 1
        return 0

    async def pte_hole(addr, end, walk):
        seen["holes"].append((addr, end))
        return 0

    ops = pagewalk.MmWalkOps(pte_entry=pte_entry, pte_hole=pte_hole)
    assert run_sync(pagewalk.walk_page_range(k, mm, a, a + 2 * size, ops)) == 0
    assert seen["ptes"] == size // PAGE_SIZE and seen["holes"] == [(a + size, a + 2 * size)]
    # the pmd is retracted between the walker's pmd read and its map: RETRY, then a hole
    from emu.scenario import Scenario
    from emu.scenarios import collapse_file_tail, collapsed_shmem
    from mm_core.locks import mmap_read_lock, mmap_read_unlock
    sc = Scenario(arch="x86_64", mem="8M")
    w = collapsed_shmem(sc)
    seen = {"holes": [], "ptes": 0}
    walk = pagewalk.MmWalk(sc.kernel, w.mms[0], ops)

    async def walker():
        await mmap_read_lock(w.mms[0])                 # walk_page_range's caller holds it
        await pagewalk.walk_pmd_range(sc.kernel, walk, w.pmdp, w.addr, w.addr + size)
        await mmap_read_unlock(w.mms[0])

    sc.task("walker", walker())
    sc.task("retract", collapse_file_tail(sc.kernel, w))
    sc.run("walker:pt_read#1 retract:* walker:*")
    assert walk.retries == 1 and seen["holes"] == [(w.addr, w.addr + size)] and seen["ptes"] == 0


def test_mincore_reports_resident_pages_and_retries_a_failed_map() -> None:
    m, k, mm, a, pmdp, size = world("arm64")
    vec = m.mincore(mm, a, 2 * size)
    assert vec[0] == 1 and sum(vec) == 1                      # one touched page
    with pytest.raises(OSError):
        m.mincore(mm, a + 1, 4096)
    from emu.scenario import Scenario
    from emu.scenarios import SCENARIOS
    sc = Scenario(arch="x86_64", mem="8M")
    SCENARIOS["mincore-vs-retract"].build(sc)
    sc.run("mincore:pt_read#4 retract:* mincore:*")           # the map comes after the retract
    assert sc.results["mincore"] == "ok"
    assert sc.kernel.stats["pte_map_failed"] == 1             # failed once: RETRY, then a hole
