"""page_vma_mapped_walk() (mm_core/page_vma_mapped.py): the mappings of a folio in one VMA
found through the real table bytes (small pages, a PTE-mapped THP with holes, a PMD
mapping, a migration pmd), checked against the hardware walk; and its failure category
forced by a schedule: a failed map rereads the pmd (RETRY), and a retracted table is
"not found"."""
from __future__ import annotations

import pytest
from conftest import collapsed_world

import emu
from emu.arch import Kind
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, pgtable, rmap
from mm_core.page_vma_mapped import (
    PVMW_MIGRATION,
    PVMW_SYNC,
    PageVmaMappedWalk,
    folio_vma_walk,
    page_vma_mapped_walk,
)

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


async def walk_all(k, pvmw: PageVmaMappedWalk, clear_and_restore: bool = False) -> list:
    """Every hit: (address, pte pointer or None, the locked lock, the raw entry)."""
    hits = []
    while await page_vma_mapped_walk(k, pvmw):
        assert pvmw.ptl is not None and pvmw.ptl.holder is not None
        entp = pvmw.pte if pvmw.pte is not None else pvmw.pmd
        raw = k.physmem.read_entry(entp)
        if clear_and_restore and pvmw.pte is not None:       # what try_to_unmap_one does, undone
            await pgtable.clear_entry(k, pvmw.pte, k.arch.pte_level)
            k.physmem.write_entry(pvmw.pte, raw)
        hits.append((pvmw.address, pvmw.pte, pvmw.ptl, raw))
    assert pvmw.ptl is None
    return hits


def finish(m, *mms, files=()) -> None:
    k = m.kernel
    for mm in mms:
        m.exit_mm(mm)
    for f in files:
        m.close_file(f)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.alloc.pages.keys() == {k.zero_page.pfn}
    assert not any(k.rcu.readers.values())


def ptep_of(k, mm, va: int) -> int:
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    return pgtable.entry_addr(k, pmd.paddr, k.arch.pte_level, va)


@pytest.mark.parametrize("kernel", ["6.6", "6.13"])
@pytest.mark.parametrize("arch", ARCHES)
def test_pvmw_finds_a_small_page_under_its_ptl(arch: str, kernel: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False, kernel=kernel)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    pa = m.touch(mm, a + 3 * page, write=True)
    m.touch(mm, a + 4 * page, write=True)
    folio = k.alloc.page_of(pa)
    hits = run_sync(walk_all(k, folio_vma_walk(k, folio, mm.vma_lookup(a), a + 3 * page),
                             clear_and_restore=True))
    assert [(h[0], h[1]) for h in hits] == [(a + 3 * page, ptep_of(k, mm, a + 3 * page))]
    assert k.arch.decode(k.arch.pte_level, hits[0][3]).paddr == pa == m.translate(mm, a + 3 * page)
    # another page's pfn is not found at this address
    other = k.alloc.page_of(m.translate(mm, a + 4 * page))
    assert run_sync(walk_all(k, folio_vma_walk(k, other, mm.vma_lookup(a), a + 3 * page))) == []
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_pvmw_walks_a_pte_mapped_thp_and_skips_its_holes(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    nr = huge_memory.hpage_pmd_nr(k)
    mm, a, thp = anon_thp(m)
    vma = mm.vma_lookup(a)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    run_sync(huge_memory.split_huge_pmd(k, vma, pmdp, a))
    holes = [0, 5, 6, nr - 1]
    for i in holes:
        m.madvise(mm, a + i * page, page, emu.MADV_DONTNEED)
    folio = k.alloc.page_of(thp)
    hits = run_sync(walk_all(k, folio_vma_walk(k, folio, vma, a)))
    want = [i for i in range(nr) if i not in holes]
    assert [(h[0] - a) // page for h in hits] == want
    assert all(k.arch.decode(k.arch.pte_level, raw).paddr == m.translate(mm, va) == thp + (va - a)
               for va, _, _, raw in hits)
    assert len({id(h[2]) for h in hits}) == 1                 # one ptl, held across the ptes
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_pvmw_reports_a_pmd_mapping_and_a_migration_pmd(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    mm, a, thp = anon_thp(m)
    vma, folio = mm.vma_lookup(a), k.alloc.page_of(thp)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    hits = run_sync(walk_all(k, folio_vma_walk(k, folio, vma, a)))
    assert [(h[0], h[1]) for h in hits] == [(a, None)]         # the pmd, under the pmd lock
    assert hits[0][2] is run_sync(pgtable.pmd_lockptr(k, mm, pmdp))
    assert run_sync(walk_all(k, folio_vma_walk(k, folio, vma, a, PVMW_MIGRATION))) == []
    leaf = run_sync(huge_memory.set_pmd_migration_entry(k, vma, pmdp))
    assert run_sync(walk_all(k, folio_vma_walk(k, folio, vma, a))) == []
    mig = run_sync(walk_all(k, folio_vma_walk(k, folio, vma, a, PVMW_MIGRATION)))
    assert len(mig) == 1 and k.arch.decode(k.arch.pmd_level, mig[0][3]).kind is Kind.MIGRATION
    run_sync(huge_memory.remove_migration_pmd(k, vma, pmdp, leaf))
    assert m.translate(mm, a) == thp
    finish(m, mm)


@pytest.mark.parametrize("flags", [0, PVMW_SYNC])
@pytest.mark.parametrize("arch", ARCHES)
def test_pvmw_rereads_the_pmd_when_its_map_fails_and_finds_nothing(arch: str, flags: int) -> None:
    """The walk read the pmd (a table) for the collapsed huge folio; retract_page_tables()
    takes the table before map_pte(): the map fails, the walk goes back to restart,
    rereads the pmd, finds it none and steps over it: not found, nothing held."""
    sc, m, k, mm, inode, a, _, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    size = huge_memory.hpage_pmd_size(k)
    folio = inode.mapping.i_pages[0]
    pvmw = folio_vma_walk(k, folio, mm.vma_lookup(a), a, flags)
    sc.task("pvmw", walk_all(k, pvmw))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"pvmw:pt_read#{k.arch.pmd_level + 1} retract:* pvmw:* rcu_gp:*")
    assert sc.results["retract"] == 1 and sc.results["pvmw"] == []
    assert k.stats["pvmw_map_failed"] == 1 and pvmw.pte is None and pvmw.address >= a + size
    # unraced, the empty table is scanned pte by pte and nothing is found either
    again = folio_vma_walk(k, folio, mm.vma_lookup(a), a, flags)
    assert run_sync(walk_all(k, again)) == [] and k.stats["pvmw_map_failed"] == 1
    assert m.touch(mm, a) == folio.paddr                      # the refault maps it by PMD
    hits = run_sync(walk_all(k, folio_vma_walk(k, folio, mm.vma_lookup(a), a, flags)))
    assert [(h[0], h[1]) for h in hits] == [(a, None)]
    finish(m, mm, files=[inode])
