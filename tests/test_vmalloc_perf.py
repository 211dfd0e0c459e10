"""Kernel-table and IRQs-off walkers: vmalloc_to_page() on init_mm's tables
(pte_offset_kernel(): nothing to fail) and perf_get_page_size() /
perf_get_pgtable_size() (pte_offset_map(&pmd) on a stack copy; a failed map is
``goto again``, RETRY), with the retry's termination forced by schedules."""
from __future__ import annotations

import pytest
from conftest import collapsed_world

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, rmap, vmalloc
from mm_core.sanitizers import Finding
from mm_core.sched_helpers import stalled_thp_migration

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def kernel_entry(k, addr: int):
    """The leaf mapping ``addr`` in init_mm, decoded from the raw table bytes."""
    arch = k.arch
    table = k.init_mm.pgd
    for level in range(len(arch.levels)):
        ent = arch.decode(level, k.physmem.read_entry(table + arch.levels[level].index(addr) * 8))
        if ent.kind is not Kind.TABLE:
            return level, ent
        table = ent.paddr
    raise AssertionError("walked below the PTE level")


@pytest.mark.parametrize("arch", ARCHES)
def test_vmalloc_to_page_walks_init_mm(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    a = run_sync(vmalloc.vmalloc(k, 3 * page))
    area = k.init_mm.vm_areas[a]
    for i, p in enumerate(area.pages):
        level, pte = kernel_entry(k, a + i * page)
        assert level == k.arch.pte_level and pte.kind is Kind.LEAF and pte.paddr == p.paddr
        assert pte.prot & Access.RW == Access.RW
        assert not pte.user or arch == "s390x"        # s390x: no user bit, a separate kernel ASCE
        assert run_sync(vmalloc.vmalloc_to_pfn(k, a + i * page + 8)) == p.paddr >> k.page_shift
        assert run_sync(vmalloc.vmalloc_to_page(k, a + i * page)) is p
    assert run_sync(vmalloc.vmalloc_to_page(k, a + 3 * page)) is None      # the guard page
    b = run_sync(vmalloc.vmalloc(k, page))
    assert b > a + 3 * page and run_sync(vmalloc.vmalloc_to_page(k, b)) is not None
    assert m.perf_page_size(a + page) == page                              # a kernel thread's sample
    run_sync(vmalloc.vfree(k, a))
    assert run_sync(vmalloc.vmalloc_to_page(k, a)) is None and m.perf_page_size(a) == 0
    assert all(k.alloc.page_of(p.paddr) is None for p in area.pages)
    level, pte = kernel_entry(k, a)
    assert pte.kind is Kind.NONE and level == k.arch.pte_level             # the tables stay


@pytest.mark.parametrize("arch", ARCHES)
def test_a_huge_vmalloc_mapping_is_a_pmd_leaf(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    span = huge_memory.hpage_pmd_size(k)
    h = run_sync(vmalloc.vmalloc(k, span, huge=True))
    block = k.init_mm.vm_areas[h].pages[0]
    level, pmd = kernel_entry(k, h)
    assert level == k.arch.pmd_level and pmd.kind is Kind.LEAF and pmd.paddr == block.paddr
    off = 5 * k.page_size + 16
    assert run_sync(vmalloc.vmalloc_to_pfn(k, h + off)) == (block.paddr + off) >> k.page_shift
    assert run_sync(vmalloc.vmalloc_to_page(k, h + off)) is block
    assert m.perf_page_size(h + off) == span
    run_sync(vmalloc.vfree(k, h))
    assert run_sync(vmalloc.vmalloc_to_pfn(k, h)) is None


@pytest.mark.parametrize("arch", ARCHES)
def test_perf_page_size_of_user_samples(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    m.madvise(mm, a + size, size, emu.MADV_HUGEPAGE)
    m.touch(mm, a + 3 * k.page_size, write=True)
    m.touch(mm, a + size, write=True)
    assert m.perf_page_size(a + 3 * k.page_size + 12, mm) == k.page_size
    assert m.perf_page_size(a + 4 * k.page_size, mm) == 0                 # in the table, not mapped
    assert m.perf_page_size(a + size + 12345, mm) == size                 # the THP's pmd
    assert m.perf_page_size(a + 3 * size, mm) == 0                        # no table at all
    assert m.perf_page_size(0, mm) == 0
    assert k.rcu.readers == {}
    m.exit_mm(mm)


# -- the retry and its end, forced --------------------------------------------------------------------

def collapsed_file(arch: str):
    sc, m, k, mm, inode, a, _, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr]
    return sc, m, k, mm, inode, a, pmdp, table


@pytest.mark.parametrize("arch", ARCHES)
def test_a_table_retracted_after_the_pmd_read_is_mapped_from_the_copy(arch: str) -> None:
    """perf_get_pgtable_size() read the pmd into its copy; retract_page_tables() takes
    the table away and the grace period cannot end (IRQs off: the sampler is an RCU
    reader). pte_offset_map(&pmd) maps the detached, empty table from the copy: no
    ``goto again``, size 0, and only then is the table freed."""
    sc, m, k, mm, inode, a, pmdp, table = collapsed_file(arch)
    from mm_core import events_core
    sc.task("perf", events_core.perf_get_page_size(k, mm, a + 3 * k.page_size))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"perf:pt_read#{k.arch.pmd_level + 1} retract:* rcu_gp:*", finish=False)
    assert sc.results["retract"] == 1 and table.state == "deferred"
    sc.run("perf:* rcu_gp:*", finish=False)
    assert sc.results["perf"] == 0 and k.stats["perf_pgtable_again"] == 0
    assert table.state == "freed"
    sc.run()
    m.exit_mm(mm)
    m.close_file(inode)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_a_persistent_migration_pmd_returns_0_before_any_map(arch: str) -> None:
    """The RETRY terminates: a migration pmd is !pmd_present(), so the walk returns 0
    before mapping anything, however long the migration takes."""
    sc = Scenario(arch=arch, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    from mm_core import events_core
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("perf", events_core.perf_get_page_size(k, mm, a + 8))
    sc.run("migrate:* perf:*", finish=False)
    assert sc.results["perf"] == 0 and k.stats["perf_pgtable_again"] == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    sc.run()
    assert m.perf_page_size(a + 8, mm) == size                 # migrated back: the THP again
    m.exit_mm(mm)


def test_a_corrupt_pmd_makes_the_retry_endless() -> None:
    """The one map failure left: a bad pmd. pmd_clear_bad(&pmd) clears the copy, not the
    pmd, and ``goto again`` reads the same bad pmd: endless (in the kernel with IRQs off,
    a hard lockup; a pmd_ERROR each time). The explorer's LIVELOCK check reports it."""
    sc = Scenario(arch="x86_64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, RW, ANON)
    m.touch(mm, a, write=True)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    good = k.physmem.read_entry(pmdp)
    k.physmem.write_entry(pmdp, good | 0x100)                  # _PAGE_GLOBAL in a table entry
    assert k.arch.decode(k.arch.pmd_level, good | 0x100).kind is Kind.BAD
    from mm_core import events_core
    sc.task("perf", events_core.perf_get_page_size(k, mm, a))
    with pytest.raises(Finding) as found:
        sc.run()
    assert found.value.signature == "LIVELOCK:perf_get_pgtable_size"
    assert k.stats["perf_pgtable_again"] > 1000 and k.physmem.read_entry(pmdp) == good | 0x100
    assert any("pmd_ERROR" in line for line in k.log)
    sc.close()
