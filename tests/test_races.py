"""The v6.6 page-table rules under forced interleavings (spec/kernel_mm.md §6).

Each test builds a shmem mapping whose page cache has just been collapsed into a huge
folio (the small pages unmapped, the PTE table left empty: the moment
retract_page_tables() runs), then runs a walker and the retractor in a hand-written
order. Under 6.6 the walker stays safe; under 6.4 with lockless retraction the same
schedule shows the bug the 6.5/6.6 series fixed.
"""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish

import emu
from emu.arch import PAGE_SIZE, Access, Kind, leaf_entry
from emu.scenario import Scenario
from emu.scenarios import anon_thp, collapse_file_tail, collapsed_shmem
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import filemap, huge_memory, khugepaged, memory, pgtable, rmap
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.memory import CheckMMError
from mm_core.page_alloc import PAGE_POISON, PageUse
from mm_core.sanitizers import Finding

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
LOCKLESS_64 = {"retract_without_mmap_lock": True}     # 6.4 rules + 6.6's lockless retraction


def assert_clean_teardown(sc, m, k, mm, inode) -> None:
    """Nothing leaks: the mm exits with a clean check_mm, the file goes, and after
    rcu_barrier no page table (and no page but the zero page) is left."""
    sc.run()
    finish(m, mm, files=[inode])


async def lockless_reader(k, mm, pmdp: int, addr: int, reads: int):
    """A walker that maps the PTE table without its lock and peeks at entries
    (pagemap/smaps style), holding only mmap_read_lock."""
    await mmap_read_lock(mm)
    ptep = await pgtable.pte_offset_map(k, pmdp, addr)
    seen = None
    if ptep is not None:
        seen = [await pgtable.get_raw(k, ptep + 8 * i) for i in range(reads)]
        await pgtable.pte_unmap(k, ptep)
    await mmap_read_unlock(mm)
    return seen


async def pte_installer(k, mm, pmdp: int, addr: int, page):
    """A writer that installs one PTE under pte_offset_map_lock (a fault's finish_fault)."""
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        return "no table"
    ptep, ptl = locked
    await pgtable.set_entry(k, ptep, k.arch.pte_level, leaf_entry(page.paddr, Access.RW, young=True))
    memory.add_mapped_page(k, mm, page)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return "installed"


# -- case 1: an unlocked map keeps reading valid memory until pte_unmap --------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_unlocked_map_of_a_retracted_table_stays_valid_until_unmap(arch: str) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    sc.task("walker", lockless_reader(k, mm, pmdp, addr, reads=8))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run("walker:pt_read#2 retract:* rcu_gp:*", finish=False)
    assert m.physmem[pmdp:pmdp + 8] != b"" and m.translate(mm, addr) is None      # pmd is none now
    assert table.state == "deferred"          # detached, waiting for the reader's grace period
    sc.run("walker:* rcu_gp:*", finish=False)
    empty = k.arch.empty_value(k.arch.pte_level)
    assert sc.results["walker"] == [empty] * 8        # read the (empty) table, never poison
    assert table.state == "freed"
    assert k.stats["pt_pages_rcu_freed"] >= 1
    assert_clean_teardown(sc, m, k, mm, inode)


def test_lockless_retraction_under_64_rules_is_a_use_after_free() -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("x86_64", "6.4", **LOCKLESS_64)
    sc.task("walker", lockless_reader(k, mm, pmdp, addr, reads=8))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    with pytest.raises(Finding) as found:
        sc.run("walker:pt_read#2 retract:* walker:*")
    assert found.value.signature == "UAF:pagetable:read:lockless_reader"
    assert table.state == "freed"
    report = found.value.report()
    assert "detached by retract_page_tables" in report and "freed (pte_free) by retract" in report
    # without the sanitizer the same schedule goes on reading poison
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("x86_64", "6.4", **LOCKLESS_64)
    k.san.enabled = False
    sc.task("walker", lockless_reader(k, mm, pmdp, addr, reads=8))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run("walker:pt_read#2 retract:* walker:*")
    assert int.from_bytes(bytes([PAGE_POISON]) * 8, "little") in sc.results["walker"]


def test_64_rules_with_mmap_lock_retraction_skip_a_table_in_use() -> None:
    """Before 6.6 retraction needed mmap_write_trylock, which a walker's read lock blocks."""
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("x86_64", "6.4")
    sc.task("walker", lockless_reader(k, mm, pmdp, addr, reads=8))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run("walker:pt_read#2 retract:* walker:*")
    assert sc.results["retract"] == 0 and table.state == "live"
    assert k.stats["retract_mmap_trylock_failed"] == 1


# -- case 2: a ptl from the live pmd instead of the snapshot is pfn 0's or a THP head's -------

STALE_PTL = "pte_lockptr_from_live_pmd"


def explorer_world(arch: str, kernel: str = "6.6", inject: tuple[str, ...] = ()):
    """The explorer's world (emu.scenarios.collapsed_shmem): the page cache holds the
    locked huge folio, the mapping's PTE table T is empty, collapse_file() is about to
    retract it. Returns the world and T."""
    sc = Scenario(arch=arch, kernel=kernel, mem="8M", prefault=False)
    k = sc.kernel
    w = collapsed_shmem(sc)
    for bug in inject:
        k.bugs[bug] = True
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp)).paddr]
    return sc, sc.machine, k, w, table


def stale_ptl_world(arch: str, huge: bool, inject: tuple[str, ...] = ()):
    """The writer maps T (its snapshot) and is parked right after; the collapser retracts
    T and unlocks the folio (and, with ``huge``, a refault maps the folio by PMD); then
    the writer derives its ptl and locks."""
    sc, m, k, w, table = explorer_world(arch, inject=inject)
    mm = w.mms[0]
    page = k.alloc.alloc_pages(0, PageUse.ANON, owner=mm)
    page.refcount = 0
    sc.task("writer", pte_installer(k, mm, w.pmdp, w.addr, page))
    sc.task("retract", collapse_file_tail(k, w))
    if huge:
        sc.task("refault", huge_refault(k, mm, w.addr))
    schedule = "writer:pt_read#1 retract:*" + (" refault:*" if huge else "") + " writer:* rcu_gp:*"
    return sc, m, k, w, table, page, schedule


@pytest.mark.parametrize("huge", [False, True], ids=["none", "huge"])
@pytest.mark.parametrize("arch", ARCHES)
def test_writer_taking_the_ptl_of_the_live_pmd_is_reported(arch: str, huge: bool) -> None:
    """pte_lockptr(mm, pmd) re-reading *pmd after the map: the retracted pmd names pfn 0
    (none) or the THP head (huge refault), whose "ptl" excludes nobody."""
    sc, m, k, w, table, page, schedule = stale_ptl_world(arch, huge, (STALE_PTL,))
    with pytest.raises(Finding) as found:
        sc.run(schedule)
    f = found.value
    assert f.sanitizer == "SPINLOCK" and f.signature == "SPINLOCK:bad-ptl:pte_installer"
    what = "a THP head page" if huge else "pfn 0"
    assert f.title == f"SPINLOCK: bad magic: writer takes the ptl of {what}, not of a page table, in " \
        "pte_installer"
    report = f.report()
    folio = w.extra["folio"]
    assert (f"pfn {folio.pfn:#x} (the head page of the PMD-mapped shmem folio" in report) if huge \
        else "pfn 0 (pmd_page() of a none pmd" in report
    assert f"(table {table.paddr:#x}), validated by __pte_offset_map()" in report
    assert f"page table {table.paddr:#x}: detached by retract_page_tables by retract" in report
    pmdval = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp))
    assert pmdval.kind is (Kind.LEAF if huge else Kind.NONE)
    writer = next(t for t in sc.sched.tasks if t.name == "writer")
    assert writer.held == [] and writer.last_event[0] == "lock"   # stopped taking the bogus lock
    assert table.state == "deferred" and k.stats["bogus_ptl"] == 1


@pytest.mark.parametrize("huge", [False, True], ids=["none", "huge"])
@pytest.mark.parametrize("arch", ARCHES)
def test_writer_taking_the_ptl_of_its_snapshot_retries_and_gets_no_table(arch: str, huge: bool) -> None:
    """The same schedule under 6.6: the ptl is the one of the table the map validated (kept
    alive with it through the grace period); pmd_same fails under it, the retry's map
    fails on the none or huge pmd, and pte_offset_map_lock returns NULL."""
    sc, m, k, w, table, page, schedule = stale_ptl_world(arch, huge)
    sc.run(schedule)
    assert sc.results["writer"] == "no table"
    assert k.stats["pte_map_lock_retry"] == 1 and k.stats["bogus_ptl"] == 0
    pmdval = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp))
    assert pmdval.kind is (Kind.LEAF if huge else Kind.NONE) and table.state == "freed"
    k.alloc.free_pages(page)
    assert_clean_teardown(sc, m, k, w.mms[0], w.inode)


@pytest.mark.parametrize("kernel", ["6.6", "6.13"])
def test_nolock_map_naming_the_ptl_of_the_live_pmd_is_reported_when_taken(kernel: str) -> None:
    """pte_offset_map_nolock() (_rw_nolock from 6.13) under the same bug: the ptl handed to
    the caller is derived from the pmd read again after the map; the caller takes it
    later, before its pmd_same(), and that lock is pfn 0's."""
    for inject in ((STALE_PTL,), ()):
        sc, m, k, w, table = explorer_world("arm64", kernel, inject)
        sc.task("walker", nolock_then_recheck(k, w.mms[0], w.pmdp, w.addr))
        sc.task("retract", collapse_file_tail(k, w))
        if inject:
            with pytest.raises(Finding) as found:
                sc.run("walker:pt_read#1 retract:* walker:*")
            assert found.value.signature == "SPINLOCK:bad-ptl:nolock_then_recheck"
            assert "derived by walker in nolock_then_recheck" in found.value.report()
            continue
        # without the bug the caller takes the retracted table's own ptl and pmd_same fails
        sc.run("walker:pt_read#1 retract:* walker:* rcu_gp:*")
        assert sc.results["walker"] == (False, table.paddr) and k.stats["bogus_ptl"] == 0
        assert_clean_teardown(sc, m, k, w.mms[0], w.inode)


@pytest.mark.parametrize("sanitize", [True, False])
def test_stale_ptl_without_recheck_writes_while_the_retractor_holds_the_real_ptl(monkeypatch,
                                                                                sanitize: bool) -> None:
    """The pre-6.5 macro on the 6.6 map (ptl from the live pmd and no pmd_same): with the
    SPINLOCK report silenced, the writer does not wait for the retractor and installs its
    pte into the detached table while the retractor still holds that table's ptl."""
    sc, m, k, w, table, page, _ = stale_ptl_world("x86_64", False,
                                                  (STALE_PTL, "pte_offset_map_lock_without_recheck"))
    monkeypatch.setattr(k.san, "_bad_ptl", lambda task, lock: None)
    k.san.enabled = sanitize
    sc.run("writer:pt_read#1 retract:pt_write#1", finish=False)     # pmd cleared, ptl still held
    assert table.state == "detached" and table.ptl.holder.name == "retract"
    if sanitize:
        with pytest.raises(Finding, match="LOSTPTE: pte installed into a detached page table in pte_inst"):
            sc.run("writer:*")
        assert table.ptl.holder.name == "retract"
        sc.close()                                    # the retractor stays parked with its locks
        return
    sc.run("writer:* retract:* rcu_gp:*")
    assert sc.results["writer"] == "installed" and table.state == "freed"
    with pytest.raises(CheckMMError, match="Bad rss-counter state"):
        m.exit_mm(w.mms[0])                           # the lost pte: counted, never unmapped


# -- case 3: a writer spinning on ptl during retraction gets pmd_same failure, then NULL -----

@pytest.mark.parametrize("arch", ARCHES)
def test_writer_spinning_on_ptl_retries_and_gets_no_table(arch: str) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    page = k.alloc.alloc_pages(0, PageUse.ANON, owner=mm)
    page.refcount = 0
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.task("writer", pte_installer(k, mm, pmdp, addr, page))
    ptl_held = "retract:lock#3" if table.ptl is not None else "retract:lock#2"
    sc.run(f"{ptl_held} writer:* retract:* writer:* rcu_gp:*")
    assert sc.results["writer"] == "no table"
    assert k.stats["pte_map_lock_retry"] >= 1
    assert m.translate(mm, addr) is None
    k.alloc.free_pages(page)
    assert_clean_teardown(sc, m, k, mm, inode)


@pytest.mark.parametrize("sanitize", [True, False])
def test_64_rules_install_a_pte_into_the_detached_table(sanitize: bool) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("x86_64", "6.4", **LOCKLESS_64)
    k.san.enabled = sanitize
    page = k.alloc.alloc_pages(0, PageUse.ANON, owner=mm)
    page.refcount = 0
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.task("writer", pte_installer(k, mm, pmdp, addr, page))
    if sanitize:
        with pytest.raises(Finding, match="KASAN: use-after-free in pte_installer"):   # freed at once
            sc.run("retract:lock#3 writer:* retract:* writer:*")
        return
    sc.run("retract:lock#3 writer:* retract:* writer:*")      # let it happen, to see the damage
    assert sc.results["writer"] == "installed"        # into a table that is no longer linked
    assert table.state == "freed" and m.translate(mm, addr) is None
    with pytest.raises(CheckMMError, match="Bad rss-counter state"):
        m.exit_mm(mm)                                 # the lost pte: counted, never unmapped


# -- case 4: table -> none -> new table is caught by pmd_same ---------------------------------

async def nolock_then_recheck(k, mm, pmdp: int, addr: int):
    """A _nolock user that writes: map, later take the ptl, then pmd_same()
    (pte_offset_map_rw_nolock() from 6.13, pte_offset_map_nolock() before)."""
    mapped = await pgtable.pte_offset_map_for_write_nolock(k, mm, pmdp, addr)
    if mapped is None:
        return None
    ptep, ptl, pmdval = mapped
    await emu.sched.traps.lock(ptl)
    same = pgtable.pmd_same(k, pmdval, await pgtable.get_raw(k, pmdp))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return same, pmdval.paddr


async def refault_small(k, mm, addr: int):
    """A fault that finds the pmd none and allocates a fresh PTE table (pte_alloc)."""
    return await pgtable.pte_alloc(k, mm, pmdp_of(k, mm, addr))


def pmdp_of(k, mm, addr):
    return run_sync(rmap.walk_to_pmd(k, mm, addr))


@pytest.mark.parametrize("arch", ARCHES)
def test_table_replaced_by_a_new_table_fails_pmd_same(arch: str) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    sc.task("walker", nolock_then_recheck(k, mm, pmdp, addr))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.task("fault", pgtable.pte_alloc(k, mm, pmdp))
    sc.run("walker:pt_read#1 retract:* fault:* walker:* rcu_gp:*")
    same, old_table = sc.results["walker"]
    new = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert new.kind is Kind.TABLE and new.paddr != old_table
    assert same is False
    assert_clean_teardown(sc, m, k, mm, inode)


# -- case 5: table -> none -> huge after retract maps nothing, not the THP as a table ----------

async def check_then_map(k, pmdp: int, addr: int):
    """A walker that saw a non-none pmd earlier and maps it later."""
    pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
    assert pmdval.kind is Kind.TABLE
    ptep = await pgtable.pte_offset_map(k, pmdp, addr)
    if ptep is not None:
        await pgtable.pte_unmap(k, ptep)
    return ptep


async def huge_refault(k, mm, addr: int):
    vma = mm.vma_lookup(addr)
    return await memory.handle_mm_fault(k, vma, addr, 0)


@pytest.mark.parametrize("arch", ARCHES)
def test_none_then_huge_after_retract_fails_the_map(arch: str) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    sc.task("walker", check_then_map(k, pmdp, addr))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.task("refault", huge_refault(k, mm, addr))
    sc.run("walker:pt_read#1 retract:* refault:* walker:* rcu_gp:*")
    pmdval = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmdval.kind is Kind.LEAF                    # refaulted as one PMD (do_set_pmd)
    assert sc.results["walker"] is None
    assert_clean_teardown(sc, m, k, mm, inode)


def test_64_rules_map_the_thp_as_if_it_were_a_page_table() -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("x86_64", "6.4", **LOCKLESS_64)
    sc.task("walker", check_then_map(k, pmdp, addr))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.task("refault", huge_refault(k, mm, addr))
    sc.run("walker:pt_read#1 retract:* refault:* walker:*")
    folio = inode.mapping.i_pages[0]
    ptep = sc.results["walker"]
    assert folio.paddr <= ptep < folio.paddr + (PAGE_SIZE << folio.order)   # a "table" inside file data


# -- the whole flow, and nothing leaks -----------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_madv_collapse_maps_a_pmd_leaf_and_frees_tables_through_rcu(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M")
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("c", 2 * size)
    mm1, mm2 = m.new_mm(), m.new_mm()
    rw, shared = emu.PROT_READ | emu.PROT_WRITE, emu.MAP_SHARED | emu.MAP_FIXED
    a1 = m.mmap(mm1, BASE, 2 * size, rw, shared, file=inode)
    a2 = m.mmap(mm2, BASE + 8 * size, 2 * size, rw, shared, file=inode)
    for off in range(0, 2 * size, PAGE_SIZE):
        pa = m.touch(mm1, a1 + off, write=True)
        m.physmem[pa:pa + 8] = (off // PAGE_SIZE + 1).to_bytes(8, "little")
        m.touch(mm2, a2 + off)
    m.madvise(mm1, a1, size, emu.MADV_COLLAPSE)
    # mm1: one PMD leaf in the arch's format, found by walking the real bytes
    leaf = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp_of(k, mm1, a1)))
    assert leaf.kind is Kind.LEAF and leaf.paddr == inode.mapping.i_pages[0].paddr
    # mm2's table was retracted without its mmap_lock and waits for a grace period
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp_of(k, mm2, a2))).kind is Kind.NONE
    assert k.stats["retracted_tables"] == 2 and len(k.deferred_tables()) == 2
    m.rcu_barrier()
    # a whole-page table is freed by the grace period; an s390 2K half waits for its
    # sibling half too (PageActive keeps the page off the reuse list meanwhile)
    waiting = k.deferred_tables()
    assert all(pt.frag is not None and pt.frag.allocated and pt.frag.active for pt in waiting)
    assert k.stats["pt_pages_rcu_freed"] == 2 - len(waiting)
    for off in range(0, 2 * size, PAGE_SIZE):               # same data through both mappings
        for mm, base in ((mm1, a1), (mm2, a2)):
            pa = m.touch(mm, base + off)
            assert int.from_bytes(m.physmem[pa:pa + 8], "little") == off // PAGE_SIZE + 1
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp_of(k, mm2, a2))).kind is Kind.LEAF
    m.exit_mm(mm1)
    m.exit_mm(mm2)
    m.close_file(inode)
    m.rcu_barrier()
    assert k.ptdescs.keys() == set() and k.alloc.pages.keys() == {k.zero_page.pfn}


@pytest.mark.parametrize("arch", ARCHES)
def test_shmem_collapse_workload(arch: str) -> None:
    from conftest import expected, workload
    m = emu.Machine(arch=arch, mem="64M")
    m.spawn(workload(arch, "shmem_collapse"), ["shmem_collapse"])
    r = m.run()
    assert r.stdout == expected("shmem_collapse")[0] and r.exit_code == 0
    assert b"collapse returned 0" in r.stderr
    s = r.summary
    assert s["pt_tables_rcu_deferred"] >= 2 and s["pt_pages_rcu_freed"] >= 2
    assert m.kernel.stats["thp_file_mapped"] >= 2 and s["pt_pages_allocated"] == s["pt_pages_freed"]


def test_fault_around_maps_neighbours_from_the_page_cache() -> None:
    m = emu.Machine(arch="arm64", mem="32M")
    inode = m.memfd_create("fa", 64 * PAGE_SIZE)
    mm_w, mm_r = m.new_mm(), m.new_mm()
    rw = emu.PROT_READ | emu.PROT_WRITE
    a = m.mmap(mm_w, 0, 64 * PAGE_SIZE, rw, emu.MAP_SHARED, file=inode)
    for i in range(64):
        m.touch(mm_w, a + i * PAGE_SIZE, write=True)
    b = m.mmap(mm_r, 0, 64 * PAGE_SIZE, emu.PROT_READ, emu.MAP_SHARED, file=inode)
    m.touch(mm_r, b + 5 * PAGE_SIZE)
    mapped = [m.translate(mm_r, b + i * PAGE_SIZE) is not None for i in range(64)]
    assert sum(mapped) == filemap.FAULT_AROUND_PAGES and all(mapped[:16])
    m.exit_mm(mm_w)
    m.exit_mm(mm_r)
    m.close_file(inode)


def test_private_file_mapping_copies_on_write() -> None:
    m = emu.Machine(arch="s390x", mem="32M")
    inode = m.memfd_create("cow", 4 * PAGE_SIZE)
    mm = m.new_mm()
    shared = m.mmap(mm, 0, 4 * PAGE_SIZE, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_SHARED, file=inode)
    private = m.mmap(mm, 0, 4 * PAGE_SIZE, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_PRIVATE, file=inode)
    pa = m.touch(mm, shared, write=True)
    m.physmem[pa] = 7
    assert m.physmem[m.touch(mm, private)] == 7                  # reads see the file
    pb = m.touch(mm, private, write=True)
    m.physmem[pb] = 9
    assert pb != pa and m.physmem[pa] == 7                        # the write stayed private
    assert mm.vma_lookup(private).anon_vma
    m.exit_mm(mm)
    m.close_file(inode)


def test_anon_thp_fault_collapse_and_split() -> None:
    m = emu.Machine(arch="x86_64", mem="64M")
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    rw, anon = emu.PROT_READ | emu.PROT_WRITE, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS
    a = m.mmap(mm, BASE, 2 * size, rw, anon | emu.MAP_FIXED)
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    pa = m.touch(mm, a + 4096, write=True)                        # a THP fault
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp_of(k, mm, a))).kind is Kind.LEAF
    m.physmem[pa] = 5
    m.mprotect(mm, a, PAGE_SIZE, emu.PROT_READ)                   # part of the THP: split
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp_of(k, mm, a))).kind is Kind.TABLE
    assert m.physmem[m.touch(mm, a + 4096)] == 5
    for off in range(0, size, PAGE_SIZE):                         # small pages in the other PMD
        m.touch(mm, a + size + off, write=True)
    m.madvise(mm, a + size, size, emu.MADV_COLLAPSE)               # anon collapse_huge_page
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp_of(k, mm, a + size))).kind is Kind.LEAF
    m.exit_mm(mm)
    m.rcu_barrier()
    assert k.alloc.pages.keys() == {k.zero_page.pfn}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_walker_meeting_an_anon_thp_split_waits_instead_of_seeing_a_hole(arch: str) -> None:
    """MADV_DONTNEED of the second half of an anon THP splits its pmd; between
    pmdp_invalidate() and pmd_populate() the pmd is still a (not present to the MMU) huge
    leaf to Linux, so mincore()'s pmd_trans_huge_lock() waits for the split and then
    walks the new table: the first half's pages are resident, never a hole."""
    from mm_core import madvise, mincore
    sc, m, k, mm, a, size = _anon_thp(arch)
    pmdp = pmdp_of(k, mm, a)
    sc.task("zap", madvise.madvise_dontneed(k, mm, a + size // 2, a + size))
    sc.task("mincore", mincore.do_mincore(k, mm, a, 8 * PAGE_SIZE))
    zap_writes = [i for i, ev in enumerate(_dry_run_writes(arch), 1) if ev == pmdp]
    sc.run(f"zap:pt_write#{zap_writes[0]} mincore:*", finish=False)
    invalid = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert invalid.kind is Kind.LEAF and invalid.prot == Access.NONE     # pmdp_invalidate()
    assert sc.state("mincore") is not TaskState.DONE                     # waiting for the pml
    sc.run("zap:* mincore:*")
    assert sc.results["mincore"] == [1] * 8 and k.stats["thp_split_pmd"] == 1
    m.exit_mm(mm)


def test_mincore_counts_a_thp_under_migration_as_resident_at_once() -> None:
    """mincore_pte_range() takes a migration pmd with pmd_trans_huge_lock() (a swap pmd)
    and reports the range resident: no pte_offset_map_lock() failure, no ACTION_AGAIN
    spinning for as long as the migration lasts."""
    from emu.scenarios import thp_under_migration
    from mm_core import mincore
    sc = Scenario(arch="arm64", mem="16M", prefault=False)
    k = sc.kernel
    mm, a, pmdp = thp_under_migration(sc)
    sc.task("mincore", mincore.do_mincore(k, mm, a, 4 * PAGE_SIZE))
    sc.run("migrate:sleep#1 mincore:*", finish=False)
    assert sc.results["mincore"] == [1] * 4 and k.stats["pte_map_failed"] == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    sc.run()


def _anon_thp(arch: str):
    """One anon THP mapped by a PMD at BASE."""
    sc = Scenario(arch=arch, mem="16M", prefault=False)
    mm, a, _ = anon_thp(sc.machine)
    return sc, sc.machine, sc.kernel, mm, a, huge_memory.hpage_pmd_size(sc.kernel)


def _dry_run_writes(arch: str) -> list[int]:
    """The entries MADV_DONTNEED of the THP's second half writes, in order."""
    from mm_core import madvise
    sc, m, k, mm, a, size = _anon_thp(arch)
    sc.task("zap", madvise.madvise_dontneed(k, mm, a + size // 2, a + size))
    sc.run()
    return [ev[2] for name, ev in sc.trace if ev[:2] == ("point", "pt_write")]


# -- the profile table, exercised: one scenario, four kernels ---------------------------------

@pytest.mark.parametrize("kernel, retracted, rcu_freed", [
    ("6.4", 0, 0),       # retraction needs mmap_write_trylock: the reader's mmap_read_lock wins
    ("6.5", 0, 0),       # same locking; the map could fail now, but the table stays
    ("6.6", 1, 1),       # retracted under the reader; freed after its grace period
    ("6.13", 1, 1),
])
def test_reader_vs_retract_under_each_profile(kernel: str, retracted: int, rcu_freed: int) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("x86_64", kernel)
    sc.task("walker", lockless_reader(k, mm, pmdp, addr, reads=4))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run("walker:pt_read#2 retract:* walker:* rcu_gp:*")
    assert sc.results["retract"] == retracted
    assert k.stats["pt_pages_rcu_freed"] == rcu_freed
    assert sc.results["walker"] == [k.arch.empty_value(k.arch.pte_level)] * 4
    assert k.rcu.readers == {}                   # every map was balanced by pte_unmap
    assert_clean_teardown(sc, m, k, mm, inode)


@pytest.mark.parametrize("kernel", ["6.4", "6.5", "6.6", "6.13"])
def test_failed_map_and_recheck_per_profile(kernel: str) -> None:
    """pte_offset_map_lock on a pmd that became none: 6.4 maps pfn 0 blindly, later
    profiles fail cleanly."""
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world("arm64", kernel, retract_without_mmap_lock=True)
    run_sync(khugepaged.retract_page_tables(k, inode.mapping, 0))
    ptep = run_sync(pgtable.pte_offset_map(k, pmdp, addr))
    if kernel == "6.4":
        assert ptep is not None and ptep < PAGE_SIZE       # a "table" at physical page 0
    else:
        assert ptep is None and k.stats["pte_map_failed"] >= 1


# -- exit_mmap vs retract_page_tables: khugepaged_test_exit() under mmap_lock (5.10) -----------

EXIT_TEST = "retract_without_exit_test"


def exited_cleanly(sc, m, k, mm, inode) -> None:
    """The exit task ran exit_mmap() and its check_mm(); after the file closes and
    rcu_barrier, no table and no page but the zero page is left."""
    sc.run()
    assert mm.dead and mm.users == 0
    m.close_file(inode)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.deferred_tables() == []
    assert k.alloc.pages.keys() == {k.zero_page.pfn}


def exit_and_retract(arch: str, kernel: str, bug: bool):
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch, kernel)
    if bug:
        k.bugs[EXIT_TEST] = True
    sc.task("exit", memory.exit_mm(k, mm))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    return sc, m, k, mm, inode, table


@pytest.mark.parametrize("arch", ARCHES)
def test_510_retract_without_exit_test_frees_the_table_exit_mmap_is_zapping(arch: str) -> None:
    """5.10's exit_mmap() zaps with no mmap_lock, so retract_page_tables()'s
    mmap_write_trylock() succeeds; without khugepaged_test_exit() it clears the pmd under
    pmd_lock() alone and pte_free()s the table zap_pte_range() holds the ptl of."""
    sc, m, k, mm, inode, table = exit_and_retract(arch, "5.10", bug=True)
    with pytest.raises(Finding) as found:
        sc.run("exit:lock#2 exit:4 retract:* exit:*")         # lock#2: the zap's ptl
    assert found.value.signature == "UAF:pagetable:read:zap_pte_range"
    assert sc.results["retract"] == 1 and table.state == "freed"
    report = found.value.report()
    assert "detached by retract_page_tables by retract" in report and "freed (pte_free) by retract" in report
    assert "by exit" in report


@pytest.mark.parametrize("arch", ARCHES)
def test_510_retract_skips_the_exiting_mm_once_it_holds_mmap_lock(arch: str) -> None:
    """The fix (18e77600f7a1): the same schedule; mmap_write_trylock() still succeeds,
    but mm_users is 0 by then, so the table is left to exit_mmap()'s free_pgtables()."""
    sc, m, k, mm, inode, table = exit_and_retract(arch, "5.10", bug=False)
    sc.run("exit:lock#2 exit:4 retract:* exit:*", finish=False)
    assert sc.results["retract"] == 0 and k.stats["retract_skipped_exiting_mm"] == 1
    assert k.stats["retract_mmap_trylock_failed"] == 0         # the lock was free: only the test saved it
    assert table.state == "freed" and "detached by free_pgtables" in "\n".join(table.provenance())
    exited_cleanly(sc, m, k, mm, inode)


def test_510_exit_waits_for_a_retraction_that_took_mmap_lock_first() -> None:
    """A retraction that won mmap_write_trylock() while mm_users was 1 finishes before
    exit_mm() gets its mmap_read_lock(); exit_mmap() then finds the pmd none."""
    sc, m, k, mm, inode, table = exit_and_retract("x86_64", "5.10", bug=False)
    sc.run("retract:trylock#1 exit:*", finish=False)
    assert sc.state("exit").value == "blocked" and mm.users == 1
    sc.run("retract:* exit:*", finish=False)
    assert sc.results["retract"] == 1 and table.state == "freed"
    assert k.stats["ptes_zapped"] == 0
    exited_cleanly(sc, m, k, mm, inode)


@pytest.mark.parametrize("kernel", ["6.4", "6.6", "6.13"])
def test_exit_test_is_not_needed_once_exit_mmap_holds_mmap_lock(kernel: str) -> None:
    """From 5.17 exit_mmap() zaps and frees under mmap_lock: the injection has nothing
    left to break. Under 6.4 the trylock fails; under 6.6 retraction takes the ptl and
    waits for the zap, and the table is freed after a grace period."""
    sc, m, k, mm, inode, table = exit_and_retract("x86_64", kernel, bug=True)
    sc.run("exit:lock#3 retract:*", finish=False)             # mmap_lock(W), then the zap's ptl
    if kernel == "6.4":
        assert sc.results["retract"] == 0 and k.stats["retract_mmap_trylock_failed"] == 1
    else:
        assert sc.state("retract").value == "blocked"          # on the ptl the zap holds
    sc.run("exit:*", finish=False)
    if kernel != "6.4":
        assert sc.state("exit").value == "blocked"             # unlink_file_vma: i_mmap_rwsem
        sc.run("retract:*", finish=False)                       # clears the pmd of the zapped table
        assert sc.results["retract"] == 1 and table.state == "deferred"
    exited_cleanly(sc, m, k, mm, inode)
    assert k.stats["pt_pages_rcu_freed"] == (0 if kernel == "6.4" else 1)
