"""MGLRU's page-table walkers (mm_core/vmscan.py): the aging walk walk_mm() ->
walk_pmd_range() -> walk_pte_range() and the rmap-side lru_gen_look_around(), clearing
young bits in the real tables of four arches; the failure category (SKIP: a failed map or
spin_trylock() leaves the extent unaged and out of the Bloom filter) forced by schedules,
and why the stack copy of the pmd is safe under 6.6 (RCU across the walk) and not under
the 6.13 profile."""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish, pte_of

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from emu.sched.traps import sched_point
from mm_core import huge_memory, khugepaged, pgtable, rmap, vmscan
from mm_core.sanitizers import Finding

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED






@pytest.mark.parametrize("arch", ARCHES)
def test_aging_walk_clears_young_bits_and_promotes_the_young_folios(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 16 * page, RW, ANON)
    touched = [a + i * page for i in range(0, 16, 2)]          # every other page
    frames = {va: m.touch(mm, va, write=True) for va in touched}
    assert all(pte_of(m, mm, va).young for va in touched)
    lruvec = vmscan.get_lruvec(k)
    seq = lruvec.max_seq
    walk = m.lru_gen_age(mm)
    assert walk.err == 0 and walk.max_seq == seq and lruvec.max_seq == seq + 1
    assert walk.mm_stats["MM_LEAF_TOTAL"] == 16 and walk.mm_stats["MM_LEAF_YOUNG"] == 8
    for va in touched:                                         # read back from the raw entries
        pte = pte_of(m, mm, va)
        assert pte.kind is Kind.LEAF and not pte.young and pte.paddr == frames[va] & ~(page - 1)
        assert k.alloc.page_of(frames[va]).extra["lru_gen"] == vmscan.lru_gen_from_seq(seq)
    # 8 young of 16: one per cache line of 8 ptes, so the pmd goes into the next filter
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert walk.mm_stats["MM_NONLEAF_ADDED"] == 1 and pmdp in lruvec.filters[seq + 1]
    # access one page again: only it is young and promoted by the next walk
    m.touch(mm, touched[3], write=False)
    assert pte_of(m, mm, touched[3]).young and not pte_of(m, mm, touched[2]).young
    assert m.translate(mm, touched[3], "r") == frames[touched[3]]     # the same page, still mapped
    again = m.lru_gen_age(mm, force_scan=False)               # the filter lets the pmd through
    assert again.mm_stats["MM_NONLEAF_FOUND"] == 1 and again.mm_stats["MM_LEAF_YOUNG"] == 1
    assert k.alloc.page_of(frames[touched[3]]).extra["lru_gen"] == vmscan.lru_gen_from_seq(seq + 1)
    assert k.alloc.page_of(frames[touched[2]]).extra["lru_gen"] == vmscan.lru_gen_from_seq(seq)
    # 1 young of 16 is not worth a scan: out of the filter, and the next walk skips the pmd
    assert again.mm_stats["MM_NONLEAF_ADDED"] == 0 and pmdp not in lruvec.filters.get(seq + 2, set())
    third = m.lru_gen_age(mm, force_scan=False)
    assert third.mm_stats["MM_NONLEAF_TOTAL"] == 1 and third.mm_stats["MM_NONLEAF_FOUND"] == 0
    finish(m, mm)


def test_vmas_the_walk_must_skip() -> None:
    """should_skip_vma(): mlocked and PROT_NONE VMAs are never aged; anon VMAs only when
    anon pages can be swapped (can_swap)."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    b = m.mmap(mm, BASE + 4 * page, 4 * page, RW, ANON)
    c = m.mmap(mm, BASE + 8 * page, 4 * page, RW, ANON)
    for base in (a, b, c):
        m.touch(mm, base, write=True)
    m.mlock(mm, b, 4 * page)
    m.mprotect(mm, c, 4 * page, emu.PROT_NONE)
    assert [pte_of(m, mm, va).young for va in (a, b)] == [True, True]
    assert m.lru_gen_age(mm, can_swap=False).mm_stats["MM_LEAF_TOTAL"] == 0
    walk = m.lru_gen_age(mm)
    assert walk.mm_stats["MM_LEAF_TOTAL"] == 4 and walk.mm_stats["MM_LEAF_YOUNG"] == 1
    assert not pte_of(m, mm, a).young and pte_of(m, mm, b).young
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "ppc64"])
def test_a_young_thp_is_aged_through_its_pmd(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    mm, a, thp = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).young
    walk = m.lru_gen_age(mm)
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.LEAF and not pmd.young and walk.mm_stats["MM_LEAF_YOUNG"] == 1
    assert k.alloc.page_of(thp).extra["lru_gen"] == vmscan.lru_gen_from_seq(walk.max_seq)
    assert m.lru_gen_age(mm).mm_stats["MM_LEAF_OLD"] == 1       # old now: left alone
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_look_around_from_the_rmap_ages_the_neighbours(arch: str) -> None:
    """folio_referenced() with MGLRU on: lru_gen_look_around() clears the young bits of
    the ptes around the one the rmap walk found, under that walk's ptl (no map of its
    own), and promotes the neighbours' folios; the isolated folio only gets referenced."""
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    frames = [m.touch(mm, a + i * page, write=True) for i in range(8)]
    lruvec = vmscan.get_lruvec(k)
    lruvec.enabled = True
    target = k.alloc.page_of(frames[3])
    assert run_sync(rmap.folio_referenced_anon(k, target)) == (1, 1)
    assert not any(pte_of(m, mm, a + i * page).young for i in range(8))
    gen = vmscan.lru_gen_from_seq(lruvec.max_seq)
    for i, pa in enumerate(frames):
        f = k.alloc.page_of(pa)
        want = (None, True) if i == 3 else (gen, None)
        assert (f.extra.get("lru_gen"), f.extra.get("referenced")) == want
    assert k.stats["lru_gen_look_around"] == 1
    assert run_sync(rmap.walk_to_pmd(k, mm, a)) in lruvec.filters[lruvec.max_seq]
    lruvec.enabled = False                                     # the classic path: only the one pte
    m.touch(mm, a, write=False)
    m.touch(mm, a + page, write=False)
    assert run_sync(rmap.folio_referenced_anon(k, k.alloc.page_of(frames[0]))) == (1, 1)
    assert not pte_of(m, mm, a).young and pte_of(m, mm, a + page).young
    finish(m, mm)


# -- the failure category, forced ------------------------------------------------------------------

def young_table(arch: str, kernel: str = "6.6"):
    sc = Scenario(arch=arch, kernel=kernel, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * k.page_size, RW, ANON)
    for i in range(8):
        m.touch(mm, a + i * k.page_size, write=True)
    return sc, m, k, mm, a, run_sync(rmap.walk_to_pmd(k, mm, a))


async def ptl_holder(k, mm, pmdp: int, addr: int, hold: int):
    """A task holding the PTE table's ptl for a while (a fault, a zap...)."""
    ptep, ptl = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    for _ in range(hold):
        await sched_point("hold", pmdp)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)


@pytest.mark.parametrize("arch", ARCHES)
def test_trylock_failure_skips_the_table(arch: str) -> None:
    """walk_pte_range(): spin_trylock(ptl) fails while another task holds the ptl: the
    map is dropped and the extent skipped (no young bit cleared, the pmd not carried into
    the next Bloom filter), with nothing left mapped."""
    sc, m, k, mm, a, pmdp = young_table(arch)
    sc.task("holder", ptl_holder(k, mm, pmdp, a, hold=3))
    sc.task("walker", vmscan.lru_gen_age_mm(k, mm))
    sc.run("holder:hold#1 walker:* holder:*")
    walk = sc.results["walker"]
    assert walk.skipped_pmds == [pmdp] and k.stats["lru_gen_walk_pte_trylock_failed"] == 1
    assert walk.mm_stats["MM_NONLEAF_FOUND"] == 1 and walk.mm_stats["MM_NONLEAF_ADDED"] == 0
    assert walk.mm_stats["MM_LEAF_TOTAL"] == 0
    assert all(pte_of(m, mm, a + i * k.page_size).young for i in range(8))
    assert pmdp not in vmscan.get_lruvec(k).filters.get(walk.max_seq + 1, set())
    assert k.rcu.readers == {} and k.san.pte_maps == {}
    again = run_sync(vmscan.lru_gen_age_mm(k, mm))              # uncontended: aged
    assert again.mm_stats["MM_LEAF_YOUNG"] == 8
    finish(m, mm)


def collapsed_file(arch: str, kernel: str):
    """A shmem file collapsed in the page cache up to retract_page_tables(): the PTE
    table is still in the pmd, empty."""
    sc, m, k, mm, inode, a, _, _ = collapsed_world(arch, kernel, mem="32M", prefault=False)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr]
    return sc, m, k, mm, inode, a, pmdp, table


@pytest.mark.parametrize("arch", ARCHES)
def test_table_retracted_after_the_pmd_read_is_walked_under_rcu_in_66(arch: str) -> None:
    """6.6: walk_pmd_range() read the pmd into its stack copy, then retract_page_tables()
    took the table away before walk_pte_range() mapped the copy. The copy still names the
    table, so the map succeeds: the walker reads the detached (empty) table, writes
    nothing, and the extent is not carried into the Bloom filter. The table cannot be
    freed under it: walk_mm() holds rcu_read_lock() across the walk, so the grace period
    waits for the walker."""
    sc, m, k, mm, inode, a, pmdp, table = collapsed_file(arch, "6.6")
    sc.task("walker", vmscan.lru_gen_age_mm(k, mm))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"walker:pt_read#{k.arch.pmd_level + 1} retract:* rcu_gp:*", finish=False)
    assert sc.results["retract"] == 1 and table.state == "deferred"      # the grace period waits
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.NONE
    sc.run("walker:* rcu_gp:*", finish=False)
    walk = sc.results["walker"]
    ptes = huge_memory.hpage_pmd_size(k) // k.page_size
    assert walk.mm_stats["MM_NONLEAF_FOUND"] == 1 and walk.mm_stats["MM_LEAF_TOTAL"] == ptes
    assert walk.mm_stats["MM_LEAF_YOUNG"] == 0
    assert walk.mm_stats["MM_NONLEAF_ADDED"] == 0 and table.state == "freed"
    sc.run()
    finish(m, mm, files=[inode])


def test_the_same_schedule_under_613_takes_the_ptl_of_a_freed_table() -> None:
    """6.13 profile: walk_mm() no longer holds rcu_read_lock() ("mm: memcg: no need for
    memcg locking for MGLRU"), and walk_pte_range() still maps walk_pmd_range()'s stack
    copy, whose pmd_same() recheck compares the copy with itself. Preempted between the
    pmd read and the map's rcu_read_lock(), the walker lets the retraction's grace period
    end: the table is freed and the walker takes the ptl of a freed page table (then
    would clear "young" bits in whatever the page became). Needs a preemptible RCU; the
    model's traps are preemption points. 6.6 with ``lru_gen_walk_without_rcu`` is the
    same code."""
    for kernel, bugs in (("6.13", ()), ("6.6", ("lru_gen_walk_without_rcu",))):
        sc, m, k, mm, inode, a, pmdp, table = collapsed_file("x86_64", kernel)
        k.bugs.update(dict.fromkeys(bugs, True))
        sc.task("walker", vmscan.lru_gen_age_mm(k, mm))
        sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
        with pytest.raises(Finding) as found:
            sc.run(f"walker:pt_read#{k.arch.pmd_level + 1} retract:* rcu_gp:* walker:*")
        assert found.value.signature == "SPINLOCK:bad-ptl:walk_pte_range", kernel
        assert table.state == "freed" and "freed (RCU callback) by rcu_gp" in found.value.report()
        sc.close()
