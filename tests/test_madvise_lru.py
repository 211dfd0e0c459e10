"""MADV_FREE, MADV_COLD and MADV_PAGEOUT (mm_core/madvise.py): their effects on the real
table bytes, lazyfree reclaim without swap, and their failure category (a failed
pte_offset_map_lock() skips the pmd: no retry, the walk ends) forced by schedules."""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, madvise, pgtable, rmap
from mm_core.mm import MM_ANONPAGES, MM_SHMEMPAGES
from mm_core.sched_helpers import stalled_thp_migration

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def entry(k, mm, va: int):
    """The pmd leaf or pte for ``va``, decoded from guest RAM."""
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    if pmd.kind is not Kind.TABLE:
        return pmd
    return k.arch.decode(k.arch.pte_level,
                         k.physmem.read_entry(pgtable.entry_addr(k, pmd.paddr, k.arch.pte_level, va)))



@pytest.mark.parametrize("arch", ARCHES)
def test_madv_free_then_pageout_discards_clean_lazyfree_pages(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    frames = []
    for i in range(4):
        pa = m.touch(mm, a + i * page, write=True)
        m.physmem[pa:pa + 4] = b"pg%d." % i
        frames.append(pa)
        assert entry(k, mm, a + i * page).dirty and entry(k, mm, a + i * page).young
    m.madvise(mm, a, 8 * page, emu.MADV_FREE)
    for i in range(4):                                   # old and clean, still mapped, rss unchanged
        e = entry(k, mm, a + i * page)
        assert e.kind is Kind.LEAF and e.paddr == frames[i] and not e.dirty and not e.young
        assert k.alloc.page_of(frames[i]).extra["lazyfree"]
    assert mm.rss[MM_ANONPAGES] == 4 and k.stats["madv_free_lazyfree"] == 4
    assert bytes(m.physmem[m.touch(mm, a):][:4]) == b"pg0."      # a read does not redirty
    m.touch(mm, a + page, write=True)                            # a write does
    assert entry(k, mm, a + page).dirty
    m.madvise(mm, a, 8 * page, emu.MADV_PAGEOUT)
    # the clean lazyfree pages are gone (the next read sees zeroes); the redirtied one stays
    assert k.stats["lazyfree_discarded"] == 3 and k.stats["lazyfree_redirtied"] == 1
    assert mm.rss[MM_ANONPAGES] == 1
    for i in (0, 2, 3):
        assert entry(k, mm, a + i * page).kind is Kind.NONE and k.alloc.page_of(frames[i]) is None
    assert entry(k, mm, a + page).paddr == frames[1] and bytes(m.physmem[frames[1]:frames[1] + 4]) == b"pg1."
    assert "lazyfree" not in k.alloc.page_of(frames[1]).extra               # swap-backed again
    assert m.touch(mm, a) == k.zero_page.paddr
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_madv_cold_clears_young_and_pageout_keeps_what_needs_swap(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("c", 4 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    f = m.mmap(mm, BASE + (4 << 20), 4 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for i in range(2):
        m.touch(mm, a + i * page, write=True)
        m.touch(mm, f + i * page, write=True)
    m.madvise(mm, a, 4 * page, emu.MADV_COLD)
    m.madvise(mm, f, 4 * page, emu.MADV_COLD)
    for va in (a, a + page, f, f + page):
        e = entry(k, mm, va)
        assert e.kind is Kind.LEAF and not e.young and e.dirty
    assert k.stats["madv_cold_deactivated"] == 4 and mm.rss[MM_ANONPAGES] == mm.rss[MM_SHMEMPAGES] == 2
    m.touch(mm, a)                                                   # young again
    m.madvise(mm, a, 4 * page, emu.MADV_PAGEOUT)
    m.madvise(mm, f, 4 * page, emu.MADV_PAGEOUT)
    # no swap device: swap-backed anon and shmem pages cannot be reclaimed
    assert k.stats["pageout_kept"] == 4 and k.stats["pageout_reclaimed"] == 0
    assert not entry(k, mm, a).young and entry(k, mm, f + page).kind is Kind.LEAF
    finish(m, mm, files=[inode])


def test_madv_free_is_for_anonymous_vmas_only_and_lru_advice_reports_holes() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", prefault=False)
    k = m.kernel
    inode = m.memfd_create("f", 4 * k.page_size)
    mm = m.new_mm()
    f = m.mmap(mm, BASE, 4 * k.page_size, RW, emu.MAP_PRIVATE | emu.MAP_FIXED, file=inode)
    with pytest.raises(OSError) as err:
        m.madvise(mm, f, 4 * k.page_size, emu.MADV_FREE)
    assert err.value.errno == 22
    with pytest.raises(OSError) as err:                   # applied to the mapped part, then -ENOMEM
        m.madvise(mm, f, 8 * k.page_size, emu.MADV_COLD)
    assert err.value.errno == 12 and k.stats["madv_cold"] == 1
    finish(m, mm, files=[inode])


def test_madv_free_shared_with_a_child_is_not_reclaimed() -> None:
    m = emu.Machine(arch="s390x", mem="32M", prefault=False)
    k = m.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, RW, ANON)
    pa = m.touch(mm, a, write=True)
    child = m.fork_mm(mm)
    m.madvise(mm, a, 2 * k.page_size, emu.MADV_FREE)
    m.madvise(mm, a, 2 * k.page_size, emu.MADV_PAGEOUT)      # mapcount 2: not isolated
    assert entry(k, mm, a).paddr == pa and entry(k, child, a).paddr == pa
    assert k.stats["pageout_reclaimed"] == 0 and k.stats["lazyfree_discarded"] == 0
    finish(m, mm, child)


def test_madv_free_and_cold_on_an_anon_thp() -> None:
    m = emu.Machine(arch="x86_64", mem="64M", prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)
    m.madvise(mm, a, size // 2, emu.MADV_FREE)             # partial: split_folio() wanted, not modelled
    e = entry(k, mm, a)
    assert e.kind is Kind.LEAF and e.dirty and "lazyfree" not in k.alloc.page_of(thp).extra
    assert k.stats["madv_free_split_folio_unmodelled"] == 1
    m.madvise(mm, a, size, emu.MADV_FREE)                  # whole: pmd clean and old, lazyfree
    e = entry(k, mm, a)
    assert e.kind is Kind.LEAF and not e.dirty and not e.young and k.alloc.page_of(thp).extra["lazyfree"]
    m.touch(mm, a)
    assert entry(k, mm, a).young
    m.madvise(mm, a, size, emu.MADV_COLD)
    assert not entry(k, mm, a).young and k.stats["madv_cold_deactivated"] == 1
    assert mm.rss[MM_ANONPAGES] == huge_memory.hpage_pmd_nr(k)
    finish(m, mm)


# -- the failure category, forced ---------------------------------------------------------------

@pytest.mark.parametrize("advice", [madvise.MADV_FREE, madvise.MADV_COLD, madvise.MADV_PAGEOUT])
@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_a_migration_pmd_is_skipped_and_the_walk_ends(arch: str, advice: int) -> None:
    """The pmd turns into a THP migration entry before the walk reaches it: the pmd_entry
    is called (not a hole), its pte_offset_map_lock() fails, and it returns 0 without
    ACTION_AGAIN: the pmd is skipped even though it stays a migration entry (the bug
    DAMON had, an endless retry, cannot happen here)."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("advise", madvise.do_madvise(k, mm, a, size, advice))
    sc.run("migrate:* advise:*", finish=False)
    assert sc.results["advise"] == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    name = "madv_free_map_failed" if advice == madvise.MADV_FREE else "madv_cold_map_failed"
    assert k.stats[name] == 1 and k.stats["madv_cold_deactivated"] == 0
    assert not any(" retry" in t for t in sc.trace_of("advise"))
    sc.run()
    assert sc.results["migrate"] is True
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_cold_walk_skips_a_table_retracted_under_it(arch: str) -> None:
    """retract_page_tables() clears the pmd between walk_pmd_range()'s read (a table, so
    the pmd_entry runs) and the pte_offset_map_lock() in madvise_cold_or_pageout_pte_range:
    SKIP, the walk does not look at the pmd again."""
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("cold", madvise.do_madvise(k, mm, a, size, madvise.MADV_COLD))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # cold: mmap_read_lock, the walk's reads down to the pmd, then the pmd_entry's own read
    reads = k.arch.pmd_level + 2
    sc.run(f"cold:pt_read#{reads} retract:* cold:*")
    assert sc.results == {"retract": 1, "cold": 0}
    assert k.stats["madv_cold_map_failed"] == 1 and k.stats["madv_cold"] == 1
    assert not any(" retry" in t for t in sc.trace_of("cold"))       # SKIP: no second look
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.NONE
    finish(m, mm, files=[inode])
