"""DAMON's access checks (mm/damon/vaddr.c): damon_va_mkold() clears the young bit in
the real entry, damon_va_young() reads it back; a failed PTE map is SKIP (the 2025 fix),
RETRY forever under the damon_endless_again injection."""
from __future__ import annotations

import pytest
from conftest import ARCHES, collapsed_world, finish, pte_of

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import damon, huge_memory, khugepaged, pgtable
from mm_core.sanitizers import Finding
from mm_core.sched_helpers import stalled_thp_migration

BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE




@pytest.mark.parametrize("arch", ARCHES)
def test_mkold_then_young_through_the_real_entries(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * k.page_size, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.touch(mm, a, write=True)
    assert pte_of(k, mm, a, pmd=True).young
    assert run_sync(damon.damon_va_young(k, mm, a)) == (True, k.page_size)
    run_sync(damon.damon_va_mkold(k, mm, a, a + 1))
    assert not pte_of(k, mm, a, pmd=True).young                           # cleared in guest RAM
    assert run_sync(damon.damon_va_young(k, mm, a)) == (False, k.page_size)
    m.touch(mm, a)                                # an access: the MMU (or the fault) marks it young
    assert pte_of(k, mm, a, pmd=True).young
    assert run_sync(damon.damon_va_young(k, mm, a)) == (True, k.page_size)
    finish(m, mm)


def test_young_of_a_thp_answers_for_the_whole_pmd() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    assert pte_of(k, mm, a, pmd=True).kind is Kind.LEAF                    # the pmd is a leaf
    assert run_sync(damon.damon_va_young(k, mm, a + 5 * k.page_size)) == (True, size)
    run_sync(damon.damon_va_mkold(k, mm, a, a + 1))
    assert run_sync(damon.damon_va_young(k, mm, a)) == (False, size)
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_young_walk_skips_a_table_retracted_under_it(arch: str) -> None:
    """retract_page_tables() clears the pmd between the walk's read and damon's map: SKIP
    (no answer, no retry) since the 2025 fix."""
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, mem="32M", prefault=False)
    sc.task("young", damon.damon_va_young(k, mm, a))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"young:pt_read#{k.arch.pmd_level + 2} retract:* young:*")
    assert sc.results == {"retract": 1, "young": (False, k.page_size)}
    assert not any(" retry" in t for t in sc.trace_of("young"))
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("bug", [False, True])
def test_young_walk_over_a_migration_pmd_ends_unless_the_old_retry_is_injected(bug: bool) -> None:
    sc = Scenario(arch="arm64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    if bug:
        k.bugs["damon_endless_again"] = True
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("young", damon.damon_va_young(k, mm, a))
    if bug:
        with pytest.raises(Finding, match="LIVELOCK"):
            sc.run("migrate:*", finish=True)
        return
    sc.run("migrate:*", finish=False)                          # the pmd is a migration entry now
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    sc.run("young:*", finish=False)
    assert sc.results["young"] == (False, k.page_size)         # no answer, and it ended
    sc.run()
    finish(m, mm)
