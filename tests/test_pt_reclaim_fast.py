"""PT_RECLAIM's fast path (6.14 mm/pt_reclaim.c try_get_and_clear_pmd + free_pte, from
zap_pte_range() still holding the ptl): MADV_DONTNEED of a whole PMD extent clears the
pmd under a trylocked pml and frees the table after the grace period; a contended pml
sends zap_pte_range() to the slow path try_to_free_pte() (pml, ptl, rescan)."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched import traps
from emu.sched.loop import run_sync
from mm_core import madvise, pgtable, rmap
from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS
from tests.test_swap import ANON, ARCHES, BASE, RW, fill, finish, pattern, read_back


def world(arch: str, pages: int = 4):
    sc = Scenario(arch=arch, kernel="6.14", mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    span = k.arch.levels[k.arch.pmd_level].span
    a = m.mmap(mm, BASE, span, RW, ANON)
    for i in range(pages):
        fill(m, mm, a + i * k.page_size, i)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    table = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr
    return sc, m, k, mm, a, span, pmdp, table


def pmd_kind(k, pmdp: int) -> Kind:
    return k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind


@pytest.mark.parametrize("arch", ARCHES)
def test_dontneed_of_a_whole_extent_frees_the_table_on_the_fast_path(arch: str) -> None:
    sc, m, k, mm, a, span, pmdp, table = world(arch)
    m.madvise(mm, a, span, emu.MADV_DONTNEED)
    assert pmd_kind(k, pmdp) is Kind.NONE
    assert k.stats["pt_reclaimed"] == 1 and k.stats["pt_reclaimed_fast"] == 1
    assert k.stats["pt_reclaim_trylock_failed"] == 0
    assert [pt.paddr for pt in k.deferred_tables()] == [table] and mm.rss[MM_ANONPAGES] == 0
    m.rcu_barrier()                                     # pte_free_tlb: freed after a grace period
    assert k.deferred_tables() == [] and table not in k.ptdescs
    assert read_back(m, mm, a) == bytes(k.page_size)   # a fresh table, a zero page
    finish(m, mm)


def test_a_partial_extent_keeps_its_table() -> None:
    sc, m, k, mm, a, span, pmdp, table = world("x86_64")
    m.madvise(mm, a, span // 2, emu.MADV_DONTNEED)      # reclaim_pt_is_enabled(): < PMD_SIZE
    assert pmd_kind(k, pmdp) is Kind.TABLE and k.stats["pt_reclaimed"] == 0
    finish(m, mm)


async def hold_pml(k, mm, pmdp: int) -> None:
    pml = await pgtable.pmd_lock(k, mm, pmdp)
    await traps.sched_point("holding_pml", pmdp)
    await traps.unlock(pml)


def test_a_contended_pml_sends_the_zap_to_the_slow_path() -> None:
    sc, m, k, mm, a, span, pmdp, table = world("x86_64")
    sc.task("holder", hold_pml(k, mm, pmdp))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, span, emu.MADV_DONTNEED))
    # the holder has pml; the zap's spin_trylock() fails, it drops the ptl and sleeps on
    # pml in try_to_free_pte()
    sc.run("holder:holding_pml#1 dontneed:*", finish=False)
    assert k.stats["pt_reclaim_trylock_failed"] == 1 and sc.state("dontneed").name == "BLOCKED"
    assert pmd_kind(k, pmdp) is Kind.TABLE
    sc.run("holder:* dontneed:*")
    assert sc.results["dontneed"] == 0 and pmd_kind(k, pmdp) is Kind.NONE
    assert k.stats["pt_reclaimed"] == 1 and k.stats["pt_reclaimed_fast"] == 0     # slow path
    finish(m, mm)


def test_swap_ptes_zapped_then_the_table_reclaimed_on_the_fast_path() -> None:
    sc, m, k, mm, a, span, pmdp, table = world("arm64", pages=2)
    si = m.swapon(4, readahead=1)
    fill(m, mm, a, 5)
    m.madvise(mm, a, 2 * k.page_size, emu.MADV_PAGEOUT)
    assert mm.rss[MM_SWAPENTS] == 2 and si.inuse_pages == 2
    m.madvise(mm, a, span, emu.MADV_DONTNEED)
    assert k.stats["pt_reclaimed_fast"] == 1 and si.inuse_pages == 0 and mm.rss[MM_SWAPENTS] == 0
    fill(m, mm, a + k.page_size, 1)
    assert read_back(m, mm, a + k.page_size) == pattern(1, k.page_size)
    finish(m, mm)
