"""mlock / munlock (mm_core/mlock.py): VM_LOCKED and the VMA splits, mlock_pte_range's
folio marking through the real tables, population, and its failure category (a failed
pte_offset_map_lock() is ACTION_AGAIN: the walker rereads the pmd) forced by schedules."""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, mlock, rmap
from mm_core.mm import VM_LOCKED
from mm_core.sched_helpers import stalled_thp_migration

BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED



@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_mlock_marks_mapped_folios_and_populates_the_rest(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    touched = m.touch(mm, a + 2 * page, write=True)
    m.mlock(mm, a + 2 * page, 4 * page)                       # the middle: the VMA splits in three
    assert [(v.start - a) // page for v in mm.vmas] == [0, 2, 6]
    assert [bool(v.flags & VM_LOCKED) for v in mm.vmas] == [False, True, False]
    assert mm.locked_vm == 4 and k.alloc.page_of(touched).extra["mlock_count"] == 1
    assert k.stats["mlock_folio"] == 1                         # the walk saw the one mapped page
    for i in range(2, 6):                                      # __mm_populate: private writable, so written
        assert m.translate(mm, a + i * page, "w") is not None
    assert m.translate(mm, a, "r") is None                     # outside the range: untouched
    with pytest.raises(OSError) as err:                        # locked: no MADV_DONTNEED / COLD
        m.madvise(mm, a + 2 * page, page, emu.MADV_DONTNEED)
    assert err.value.errno == 22
    child = m.fork_mm(mm)                                      # VM_LOCKED is not inherited
    assert not any(v.flags & VM_LOCKED for v in child.vmas)
    m.munlock(mm, a, 8 * page)
    assert len(mm.vmas) == 1 and mm.locked_vm == 0 and "mlock_count" not in k.alloc.page_of(touched).extra
    finish(m, mm, child)


def test_mlock_reports_a_hole_and_onfault_does_not_populate() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    m.mmap(mm, BASE + 3 * page, page, RW, ANON)
    with pytest.raises(OSError) as err:                        # the gap at page 2
        m.mlock(mm, a, 4 * page)
    assert err.value.errno == 12 and mm.vmas[0].flags & VM_LOCKED   # the VMA before it is locked
    m.munlock(mm, a, 2 * page)
    m.mlock(mm, a, 2 * page, mlock.MLOCK_ONFAULT)
    assert mm.vmas[0].flags & VM_LOCKED and m.translate(mm, a) is None
    finish(m, mm)


def test_mlock_of_an_anon_thp_marks_it_through_the_pmd() -> None:
    m = emu.Machine(arch="arm64", mem="64M", prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)
    m.mlock(mm, a, size)
    assert k.alloc.page_of(thp).extra["mlock_count"] == 1
    m.munlock(mm, a, size)
    assert "mlock_count" not in k.alloc.page_of(thp).extra
    finish(m, mm)


# -- the failure category, forced ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_mlock_walk_retries_a_retracted_table_and_then_sees_a_hole(arch: str) -> None:
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("mlock", mlock.do_mlock(k, mm, a, size))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # mlock: the walk's reads down to the pmd, then mlock_pte_range's own read of it
    sc.run(f"mlock:pt_read#{k.arch.pmd_level + 2} retract:* mlock:*")
    assert sc.results == {"retract": 1, "mlock": 0}
    assert k.stats["mlock_pte_range_again"] == 1               # RETRY, once: then a hole
    assert sum(" retry" in t for t in sc.trace_of("mlock")) == 1
    assert k.stats["mlock_folio"] == 0 and mm.vmas[0].flags & VM_LOCKED
    # __mm_populate() refaulted the range: the collapsed folio is mapped by one pmd
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.LEAF and pmd.paddr == inode.mapping.i_pages[0].paddr
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_mlock_walk_over_a_migration_pmd_ends(arch: str) -> None:
    """pmd_trans_huge_lock() also returns a swap (migration) pmd locked, and
    mlock_pte_range leaves it (!pmd_present): no ACTION_AGAIN, so no endless retry."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)
    m.mlock(mm, a, size)
    assert k.alloc.page_of(thp).extra["mlock_count"] == 1
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("munlock", mlock.do_munlock(k, mm, a, size))
    sc.run("migrate:* munlock:*", finish=False)
    assert sc.results["munlock"] == 0 and k.stats["mlock_pte_range_again"] == 0
    assert k.stats["mlock_pmd_not_present"] == 1 and k.stats["munlock_folio"] == 0
    assert not mm.vmas[0].flags & VM_LOCKED
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    sc.run()
    assert k.alloc.page_of(thp) is not None
    finish(m, mm)


# -- mlockall / munlockall ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_mlockall_current_locks_and_populates_every_vma(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    b = m.mmap(mm, BASE + 8 * page, 2 * page, emu.PROT_NONE, ANON)
    touched = m.touch(mm, a + page, write=True)
    m.mlockall(mm, mlock.MCL_CURRENT)
    assert all(v.flags & VM_LOCKED for v in mm.vmas) and mm.locked_vm == 6 and mm.def_flags == 0
    assert k.alloc.page_of(touched).extra["mlock_count"] == 1 and k.stats["mlock_folio"] == 1
    for i in range(4):                                         # populated, written (private writable)
        pa = m.translate(mm, a + i * page, "w")
        assert pa is not None and (pa == touched) == (i == 1)
    assert m.translate(mm, b) is None                          # PROT_NONE: locked, not populated
    c = m.mmap(mm, BASE + 16 * page, page, RW, ANON)           # no MCL_FUTURE: born unlocked
    assert not mm.vma_lookup(c).flags & VM_LOCKED and m.translate(mm, c) is None
    m.munlockall(mm)
    assert not any(v.flags & VM_LOCKED for v in mm.vmas) and mm.locked_vm == 0
    assert "mlock_count" not in k.alloc.page_of(touched).extra and k.stats["munlock_folio"] == 4
    assert len(mm.vmas) == 3                                   # separate mappings stay separate
    finish(m, mm)


def test_mlockall_future_locks_later_mappings() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    for bad in (0, 8, mlock.MCL_ONFAULT):
        with pytest.raises(OSError) as err:
            m.mlockall(mm, bad)
        assert err.value.errno == 22
    m.mlockall(mm, mlock.MCL_FUTURE)                           # existing VMAs untouched
    assert not mm.vmas[0].flags & VM_LOCKED and mm.locked_vm == 0 and mm.def_flags == VM_LOCKED
    b = m.mmap(mm, BASE + 4 * page, 2 * page, RW, ANON)
    assert mm.vma_lookup(b).flags & VM_LOCKED and mm.locked_vm == 2
    assert m.translate(mm, b, "w") is not None and m.translate(mm, b + page, "w") is not None
    m.mlockall(mm, mlock.MCL_FUTURE | mlock.MCL_ONFAULT)
    c = m.mmap(mm, BASE + 8 * page, page, RW, ANON)
    assert mm.vma_lookup(c).flags & mlock.VM_LOCKED_MASK == mlock.VM_LOCKED_MASK
    assert m.translate(mm, c) is None and mm.locked_vm == 3    # on fault: not populated
    m.munlockall(mm)
    d = m.mmap(mm, BASE + 12 * page, page, RW, ANON)
    assert mm.def_flags == 0 and not any(v.flags & mlock.VM_LOCKED_MASK for v in mm.vmas)
    assert m.translate(mm, d) is None and m.translate(mm, a) is None
    child = m.fork_mm(mm)
    assert child.def_flags == 0
    finish(m, mm, child)


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_mlockall_walk_retries_a_retracted_table_and_then_sees_a_hole(arch: str) -> None:
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    sc.task("mlockall", mlock.do_mlockall(k, mm, mlock.MCL_CURRENT))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"mlockall:pt_read#{k.arch.pmd_level + 2} retract:* mlockall:*")
    assert sc.results == {"retract": 1, "mlockall": 0}
    assert k.stats["mlock_pte_range_again"] == 1               # RETRY, once: then a hole
    assert sum(" retry" in t for t in sc.trace_of("mlockall")) == 1
    assert k.stats["mlock_folio"] == 0 and mm.vmas[0].flags & VM_LOCKED
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))   # populated: one huge pmd
    assert pmd.kind is Kind.LEAF and pmd.paddr == inode.mapping.i_pages[0].paddr
    finish(m, mm, files=[inode])
