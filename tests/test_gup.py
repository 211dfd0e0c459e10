"""get_user_pages (mm_core/gup.py): slow GUP and GUP-fast through the real table bytes,
their references and pins, and their failure categories forced with hand-written
schedules: slow GUP answers a failed map (or a none / migration pmd, or a write-protected
pte) by faulting in and looking again (RETRY through the fault path); GUP-fast stops and
falls back to slow GUP (GIVEUP), and its pmd/pte recheck drops a page whose table was
detached under it."""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import gup, huge_memory, khugepaged, pgtable, rmap
from mm_core.sched_helpers import stalled_thp_migration

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED




def pmd_of(k, mm, va: int):
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    return pmdp, k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))


# -- the normal outputs, checked against the hardware walk ------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_gup_reads_the_zero_page_and_a_write_faults_in_private_pages(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 16 * page, RW, ANON)
    zero = m.get_user_pages(mm, a, 4)                         # untouched anon memory, read
    assert zero == [k.zero_page.paddr] * 4 and k.zero_page.refcount == 5
    assert [m.translate(mm, a + i * page) for i in range(4)] == zero
    assert k.stats["gup_faultin"] == 4 and k.stats["gup_retry"] == 4      # one fault each
    got = m.get_user_pages(mm, a, 4, write=True)              # the zero page is COWed away
    assert got == [m.translate(mm, a + i * page, "w") for i in range(4)]
    assert k.zero_page.paddr not in got and len(set(got)) == 4
    for pa in got:
        pg = k.alloc.page_of(pa)
        assert (pg.mapcount, pg.refcount) == (1, 2) and pg.extra.get("dirty") is None   # pte already dirty
    m.physmem[got[2]:got[2] + 4] = b"gup!"                    # the kernel writes through the page
    assert m.read_user(mm, a + 2 * page, 4) == b"gup!"
    for pa in zero + got:
        m.put_page(pa)
    assert k.zero_page.refcount == 1 and all(k.alloc.page_of(pa).refcount == 1 for pa in got)
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_pins_count_and_gup_fast_takes_what_is_mapped(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 16 * page, RW, ANON)
    frames = [m.touch(mm, a + i * page, write=True) for i in range(4)]
    pinned = m.get_user_pages(mm, a, 4, pin=True, fast=True)     # all mapped: GUP-fast alone
    assert pinned == frames and k.stats["gup_fast_pages"] == 4 and k.stats["gup_fast_fallback"] == 0
    for pa in frames:
        pg = k.alloc.page_of(pa)
        assert pg.refcount == 1 + gup.GUP_PIN_COUNTING_BIAS and gup.folio_maybe_dma_pinned(k, pg)
    assert k.stats["foll_pin_acquired"] == 4 and k.stats["gup_faultin"] == 0
    # six pages: GUP-fast stops at the first none pte, slow GUP faults the rest in
    got = m.get_user_pages(mm, a + 2 * page, 6, write=True, fast=True)
    assert got == [m.translate(mm, a + (2 + i) * page, "w") for i in range(6)]
    assert got[:2] == frames[2:] and k.stats["gup_fast_pages"] == 6 and k.stats["gup_fast_fallback"] == 1
    # a read pin of the zero page takes no pin (6.5+); GUP-fast leaves special ptes to slow GUP
    m.touch(mm, a + 10 * page)
    zp = m.get_user_pages(mm, a + 10 * page, 1, pin=True, fast=True)
    assert zp == [k.zero_page.paddr] and k.zero_page.refcount == 1 and k.stats["gup_fast_fallback"] == 2
    m.unpin_user_pages(pinned + zp)
    for pa in got:
        m.put_page(pa)
    assert all(not gup.folio_maybe_dma_pinned(k, k.alloc.page_of(pa)) for pa in frames)
    assert all(k.alloc.page_of(pa).refcount == 1 for pa in got)
    finish(m, mm)


def test_a_leaked_pin_is_caught_at_exit() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", prefault=False)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * m.kernel.page_size, RW, ANON)
    m.get_user_pages(mm, a, 1, write=True, pin=True)
    with pytest.raises(emu.machine.memory.CheckMMError, match="still owned"):
        m.exit_mm(mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_write_gup_breaks_cow_after_fork(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    old = m.touch(mm, a, write=True)
    m.physmem[old:old + 6] = b"parent"
    child = m.fork_mm(mm)
    assert m.get_user_pages(child, a, 1) == [old]             # a read takes the shared page
    m.put_page(old)
    new = m.get_user_pages(mm, a, 1, write=True, fast=True)   # read-only pte: fast gives up
    assert new != [old] and new == [m.translate(mm, a, "w")]
    assert k.stats["gup_write_fault"] == 1 and k.stats["wp_copy"] == 1 and k.stats["gup_fast_fallback"] == 1
    assert bytes(m.physmem[new[0]:new[0] + 6]) == b"parent" and m.touch(child, a) == old
    m.put_page(new[0])
    finish(m, mm, child)


@pytest.mark.parametrize("arch", ARCHES)
def test_gup_of_an_anon_thp_takes_the_folio_once_per_page(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm, a, thp = anon_thp(m)
    folio = k.alloc.page_of(thp)
    slow = m.get_user_pages(mm, a + 3 * page, 5, write=True, pin=True)   # follow_trans_huge_pmd
    assert slow == [thp + (3 + i) * page for i in range(5)] == [m.translate(mm, a + (3 + i) * page, "w")
                                                                   for i in range(5)]
    assert folio.extra["pincount"] == 5 and folio.refcount == 1 + 5 and k.stats["gup_faultin"] == 0
    fast = m.get_user_pages(mm, a + 3 * page, 2, fast=True)              # gup_huge_pmd
    assert fast == slow[:2] and folio.refcount == 8 and k.stats["gup_fast_pages"] == 2
    m.unpin_user_pages(slow)
    for pa in fast:
        m.put_page(pa)
    assert folio.refcount == 1 and "pincount" not in folio.extra
    finish(m, mm)


def test_gup_of_shared_shmem_maps_the_page_cache_small_and_huge() -> None:
    m = emu.Machine(arch="x86_64", mem="64M", prefault=False)
    k = m.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("g", 2 * size)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    got = m.get_user_pages(mm, a + 5 * page, 3, write=True)
    assert got == [inode.mapping.i_pages[5 + i].paddr for i in range(3)]
    assert got == [m.translate(mm, a + (5 + i) * page, "w") for i in range(3)]
    for pa in got:
        m.put_page(pa)
    for off in range(0, size, page):
        m.touch(mm, a + size + off, write=True)
    m.madvise(mm, a + size, size, emu.MADV_COLLAPSE)          # the second PMD: a file PMD leaf
    assert pmd_of(k, mm, a + size)[1].kind is Kind.LEAF
    huge = m.get_user_pages(mm, a + size + 7 * page, 2, fast=True)
    folio = inode.mapping.i_pages[huge_memory.hpage_pmd_nr(k)]
    assert huge == [folio.paddr + (7 + i) * page for i in range(2)] and k.stats["gup_fast_pages"] == 2
    for pa in huge:
        m.put_page(pa)
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ARCHES)
def test_the_stack_copy_map_validates_the_copy_only(arch: str) -> None:
    """pte_offset_map(&pmd, addr): a none, huge or migration copy fails without a look at
    the live pmd and without leaving an RCU section; a table copy maps (RCU held) even
    when the live pmd has changed since (the table is kept by the grace period)."""
    from emu.arch import SWP_MIGRATION_WRITE, Access, leaf_entry, swap_entry, table_entry
    from emu.sched import traps

    m = emu.Machine(arch=arch, mem="16M", prefault=False)
    k = m.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * k.page_size, RW, ANON)
    live = m.touch(mm, a, write=True)
    pmdp, pmd = pmd_of(k, mm, a)
    lvl = k.arch.pmd_level
    size = huge_memory.hpage_pmd_size(k)
    copies = [k.arch.empty_value(lvl), k.arch.encode(lvl, leaf_entry(16 * size, Access.RW))]
    if arch != "s390x":                                        # no THP migration entries there
        copies.append(k.arch.encode(lvl, swap_entry(SWP_MIGRATION_WRITE, 5)))

    async def map_copy(raw: int):
        task = await traps.current_task()
        ptep = await pgtable.pte_offset_map_stack(k, raw, a)
        depth = k.rcu.readers.get(task, 0)
        if ptep is not None:
            await pgtable.pte_unmap(k, ptep)
        return ptep, depth

    for raw in copies:
        assert run_sync(map_copy(raw)) == (None, 0)
    assert k.stats["pte_map_failed"] == len(copies)
    ptep, depth = run_sync(map_copy(k.arch.encode(lvl, table_entry(pmd.paddr))))
    assert depth == 1 and ptep == pgtable.entry_addr(k, pmd.paddr, k.arch.pte_level, a)
    assert k.arch.decode(k.arch.pte_level, k.physmem.read_entry(ptep)).paddr == live
    assert k.physmem.read_entry(pmdp) == k.arch.encode(lvl, pmd)          # the live pmd untouched
    finish(m, mm)


# -- failure categories, forced ------------------------------------------------------------

def collapsed(arch: str):
    """A shared shmem mapping whose page cache was just collapsed into a THP (unlocked,
    PTE table still in place and empty): retract_page_tables() is next."""
    sc, m, k, mm, inode, a, _, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    pmdp, pmd = pmd_of(k, mm, a)
    return sc, m, k, mm, inode, a, pmdp, k.ptdescs[pmd.paddr]


@pytest.mark.parametrize("arch", ARCHES)
def test_slow_gup_faults_in_and_retries_when_its_map_fails(arch: str) -> None:
    """follow_pmd_mask() saw a table; retract_page_tables() takes it before
    follow_page_pte()'s pte_offset_map_lock(): no_page_table(), faultin_page() maps the
    THP by PMD, and the retry follows the huge pmd."""
    sc, m, k, mm, inode, a, pmdp, table = collapsed(arch)
    page = k.page_size
    pages: list[int] = []
    sc.task("gup", gup.get_user_pages_unlocked(k, mm, a + 9 * page, 2, pages, 0))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"gup:pt_read#{k.arch.pmd_level + 1} retract:* gup:* rcu_gp:*")
    folio = inode.mapping.i_pages[0]
    assert sc.results["retract"] == 1 and sc.results["gup"] == 2
    assert k.stats["gup_no_page_table"] == 1 and k.stats["gup_retry"] == 1 and k.stats["thp_file_mapped"] == 1
    assert pages == [folio.paddr + 9 * page, folio.paddr + 10 * page]
    assert pages == [m.translate(mm, a + (9 + i) * page) for i in range(2)]
    assert table.state == "freed"
    for pa in pages:
        m.put_page(pa)
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ARCHES)
def test_gup_fast_keeps_a_retracted_table_alive_and_falls_back(arch: str) -> None:
    """GUP-fast copied the pmd and mapped its table from the copy; retraction clears the
    pmd and pte_free_defer()s the table, but no grace period ends while interrupts are
    off: the table is read (empty: stop) and freed only afterwards. Slow GUP then faults
    the huge folio in."""
    sc, m, k, mm, inode, a, pmdp, table = collapsed(arch)
    page = k.page_size
    pages: list[int] = []
    sc.task("gup", gup.pin_user_pages_fast(k, mm, a, 4, gup.FOLL_WRITE, pages))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # local_irq_save, the upper levels, the pmd copy, the map's rcu_read_lock
    sc.run("gup:rcu_read_lock#2 retract:* rcu_gp:*", finish=False)
    assert table.state == "deferred" and k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).none
    sc.run("gup:pt_read#1 rcu_gp:*", finish=False)
    assert table.state == "deferred"                 # still inside the IRQs-off section
    sc.run("gup:* rcu_gp:*")
    folio = inode.mapping.i_pages[0]
    assert sc.results["gup"] == 4 and table.state == "freed"
    assert k.stats["gup_fast_pages"] == 0 and k.stats["gup_fast_fallback"] == 1
    assert pages == [folio.paddr + i * page for i in range(4)] == [m.translate(mm, a + i * page, "w")
                                                                   for i in range(4)]
    assert folio.extra["pincount"] == 4
    m.unpin_user_pages(pages)
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ARCHES)
def test_gup_fast_recheck_drops_a_page_whose_table_was_detached(arch: str) -> None:
    """Anon collapse_huge_page() clears the pmd (pmdp_collapse_flush) but leaves the ptes
    in the detached table until it has copied them. GUP-fast read the pte and took the
    page before that; the pte recheck passes, the pmd recheck does not: the reference is
    dropped (so the collapse's refcount check passes) and slow GUP, after waiting for
    mmap_lock, pins the new THP."""
    sc = Scenario(arch=arch, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    m.madvise(mm, a, size, emu.MADV_NOHUGEPAGE)
    old = [m.touch(mm, a + i * page, write=True) for i in range(4)]
    m.physmem[old[1]:old[1] + 4] = b"old1"
    pmdp, _ = pmd_of(k, mm, a)
    pages: list[int] = []
    sc.task("gup", gup.pin_user_pages_fast(k, mm, a + page, 2, 0, pages))
    sc.task("collapse", khugepaged.collapse_huge_page(k, mm, a))
    upper = k.arch.pmd_level
    # gup: upper levels, pmd copy, pte read (parked before its pmd recheck);
    # collapse: mmap_lock(W), find_pmd (upper + pmd reads), pml, clear the pmd
    sc.run(f"gup:pt_read#{upper + 2} collapse:pt_write#1 gup:*", finish=False)
    assert k.stats["gup_fast_recheck_failed"] == 1 and sc.state("gup").name == "BLOCKED"
    assert k.alloc.page_of(old[1]).refcount == 1              # the reference was given back
    sc.run("collapse:* gup:*")
    assert sc.results["collapse"] is khugepaged.Scan.SUCCEED and sc.results["gup"] == 2
    thp = k.alloc.page_of(m.translate(mm, a))
    assert pages == [thp.paddr + page, thp.paddr + 2 * page] == [m.translate(mm, a + (1 + i) * page)
                                                                   for i in range(2)]
    assert bytes(m.physmem[pages[0]:pages[0] + 4]) == b"old1"
    assert k.alloc.page_of(old[1]) is None or k.alloc.page_of(old[1]) is thp
    m.unpin_user_pages(pages)
    finish(m, mm)


def test_collapse_gives_up_on_a_pinned_page() -> None:
    """The other order: the pin is there before the pmd is cleared, and
    __collapse_huge_page_isolate()'s refcount check sees it (SCAN_PAGE_COUNT)."""
    m = emu.Machine(arch="x86_64", mem="64M", prefault=False)
    k = m.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    old = [m.touch(mm, a + i * page, write=True) for i in range(4)]
    pinned = m.get_user_pages(mm, a + page, 1, pin=True, fast=True)
    assert run_sync(khugepaged.collapse_huge_page(k, mm, a)) is khugepaged.Scan.PAGE_COUNT
    assert pmd_of(k, mm, a)[1].kind is Kind.TABLE and m.translate(mm, a + page) == pinned[0] == old[1]
    m.unpin_user_pages(pinned)
    assert run_sync(khugepaged.collapse_huge_page(k, mm, a)) is khugepaged.Scan.SUCCEED
    finish(m, mm)


@pytest.mark.parametrize("fast", [False, True])
def test_gup_waits_for_a_thp_migration_and_retries(fast: bool) -> None:
    """A migration pmd is not present: GUP-fast stops, slow GUP's follow_pmd_mask() is
    no_page_table(), the fault sleeps in pmd_migration_entry_wait() and the retry
    follows the THP once the migration put it back."""
    sc = Scenario(arch="x86_64", mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm, a, thp = anon_thp(m)
    pmdp, _ = pmd_of(k, mm, a)
    pages: list[int] = []
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    fn = gup.get_user_pages_fast if fast else gup.get_user_pages_unlocked
    sc.task("gup", fn(k, mm, a + 2 * page, 1, gup.FOLL_WRITE, pages) if fast
            else fn(k, mm, a + 2 * page, 1, pages, gup.FOLL_WRITE))
    sc.run("migrate:* gup:*", finish=False)
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    assert sc.state("gup").name == "SLEEPING" and k.stats["pmd_migration_entry_wait"] == 1
    sc.run()
    assert sc.results["migrate"] is True and sc.results["gup"] == 1
    assert pages == [thp + 2 * page] == [m.translate(mm, a + 2 * page, "w")]
    assert k.stats["gup_pmd_not_present"] >= 1 and k.stats["gup_retry"] >= 1
    assert k.stats["gup_fast_fallback"] == (1 if fast else 0)
    m.put_page(pages[0])
    finish(m, mm)


def test_gup_errors() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, emu.PROT_READ, ANON)
    with pytest.raises(OSError) as err:                       # check_vma_flags(): no VM_WRITE
        m.get_user_pages(mm, a, 1, write=True)
    assert err.value.errno == 14
    with pytest.raises(OSError):                              # no VMA
        m.get_user_pages(mm, a + 8 * page, 1)
    got = m.get_user_pages(mm, a + 2 * page, 4)               # runs off the VMA: what there is
    assert len(got) == 2
    for pa in got:
        m.put_page(pa)
    assert run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level)) is not None
    finish(m, mm)


@pytest.mark.parametrize("bug", [False, True])
def test_without_the_pmd_recheck_gup_fast_pins_a_page_the_collapse_replaces(bug: bool) -> None:
    """The schedule of 70cbc3cc78a9: GUP-fast copied the pmd; collapse_huge_page() clears
    the pmd and finds no extra reference (GUP has none yet); GUP-fast maps the table from
    its copy and takes the page, and the pte in the detached table is unchanged. Only the
    pmd recheck stops it: without it the pinned page is one the collapse copies and
    unmaps (the pin no longer reaches the process); with it GUP falls back and pins the
    THP's subpage."""
    sc = Scenario(arch="x86_64", mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    if bug:
        k.bugs["gup_fast_without_pmd_recheck"] = True
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    old = [m.touch(mm, a + i * page, write=True) for i in range(2)]
    pages: list[int] = []
    sc.task("gup", gup.pin_user_pages_fast(k, mm, a + page, 1, 0, pages))
    sc.task("collapse", khugepaged.collapse_huge_page(k, mm, a))
    sc.run(f"gup:pt_read#{k.arch.pmd_level + 1} collapse:collapse_isolated#1 gup:* collapse:* gup:*")
    assert sc.results["collapse"] is khugepaged.Scan.SUCCEED and sc.results["gup"] == 1
    now = m.translate(mm, a + page)
    if bug:
        assert pages == [old[1]] and now != old[1]                 # a stale pin
        assert k.alloc.page_of(old[1]).refcount == gup.GUP_PIN_COUNTING_BIAS and k.stats["gup_faultin"] == 0
    else:
        assert pages == [now] and k.stats["gup_fast_recheck_failed"] == 1
        assert k.stats["gup_fast_fallback"] == 1
    m.unpin_user_pages(pages)
    finish(m, mm)


def test_gup_fast_mapping_the_live_pmd_reads_the_thp_as_a_table() -> None:
    """spec §6 case 15 with the bug injected: GUP-fast validated a table pmd, then maps
    through the live pmd, which retraction and a refault have made a huge pmd:
    pmd_page() of a non-table, the file's data read as ptes (BADPMD)."""
    from mm_core.memory import handle_mm_fault
    from mm_core.sanitizers import Finding

    sc, m, k, mm, inode, a, pmdp, table = collapsed("x86_64")
    k.bugs["gup_fast_maps_live_pmd"] = True
    pages: list[int] = []
    sc.task("gup", gup.get_user_pages_fast(k, mm, a, 2, 0, pages))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.task("refault", handle_mm_fault(k, mm.vma_lookup(a), a, 0))
    with pytest.raises(Finding) as found:
        sc.run(f"gup:pt_read#{k.arch.pmd_level + 1} retract:* refault:* gup:*")
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    assert found.value.signature == "BADPMD:read:gup_pte_range" and "shmem page" in found.value.title
    sc.close()


# -- FOLL_SPLIT_PMD (uprobes) --------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_split_pmd_gup_of_an_anon_thp_splits_it_and_follows_the_pte(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm, a, thp = anon_thp(m)
    assert pmd_of(k, mm, a)[1].kind is Kind.LEAF
    got = m.get_user_pages(mm, a + 7 * page, 2, split_pmd=True)
    assert pmd_of(k, mm, a)[1].kind is Kind.TABLE and k.stats["gup_split_pmd"] == 1
    assert got == [thp + 7 * page, thp + 8 * page] == [m.translate(mm, a + (7 + i) * page) for i in range(2)]
    assert k.stats["gup_faultin"] == 0                        # the deposited table keeps every pte
    with pytest.raises(OSError):
        m.get_user_pages(mm, a, 1, fast=True, split_pmd=True)
    for pa in got:
        m.put_page(pa)
    finish(m, mm)


def _shmem_pmd_mapped(arch: str = "x86_64"):
    """A shared shmem mapping whose huge folio is mapped by a PMD leaf."""
    sc, m, k, mm, inode, a, pmdp, table = collapsed_world(arch, mem="32M", prefault=False)
    run_sync(khugepaged.retract_page_tables(k, inode.mapping, 0))
    m.rcu_barrier()
    m.touch(mm, a)                                            # do_set_pmd()
    assert pmd_of(k, mm, a)[1].kind is Kind.LEAF
    return sc, m, k, mm, inode, a, pmdp


@pytest.mark.parametrize("arch", ARCHES)
def test_split_pmd_gup_of_a_file_thp_stuffs_a_table_and_faults_the_pte(arch: str) -> None:
    """split_huge_pmd() of a file THP drops the mapping; pte_alloc() puts an empty table
    there, so the fault maps a pte (not the PMD again) and the retry follows it."""
    sc, m, k, mm, inode, a, pmdp = _shmem_pmd_mapped(arch)
    page = k.page_size
    got = m.get_user_pages(mm, a + 9 * page, 1, split_pmd=True)
    folio = inode.mapping.i_pages[0]
    assert got == [folio.paddr + 9 * page] == [m.translate(mm, a + 9 * page)]
    assert pmd_of(k, mm, a)[1].kind is Kind.TABLE
    assert k.stats["gup_split_pmd"] == 1 and k.stats["gup_faultin"] == 1 and k.stats["gup_retry"] == 1
    m.put_page(got[0])
    finish(m, mm, files=[inode])


def test_split_pmd_gup_whose_new_table_is_retracted_faults_and_splits_again() -> None:
    """retract_page_tables() takes the empty table pte_alloc() just put in before
    follow_page_pte() maps it: the map fails (no_page_table), the fault maps the THP by
    PMD again (the pmd is none), and the retry splits once more: RETRY, and it ends."""
    sc, m, k, mm, inode, a, pmdp = _shmem_pmd_mapped()
    page = k.page_size
    pages: list[int] = []
    sc.task("gup", gup.get_user_pages_unlocked(k, mm, a + 9 * page, 1, pages, gup.FOLL_SPLIT_PMD))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run("gup:rcu_read_lock#1 retract:* gup:* rcu_gp:*")
    folio = inode.mapping.i_pages[0]
    assert sc.results["retract"] == 1 and sc.results["gup"] == 1
    assert pages == [folio.paddr + 9 * page] == [m.translate(mm, a + 9 * page)]
    # one failed map (the retracted table); the second pass finds a none pte in its table
    assert k.stats["gup_split_pmd"] == 2 and k.stats["gup_no_page_table"] == 1
    assert k.stats["gup_faultin"] == 2 and k.stats["thp_file_mapped"] == 2   # the touch, then the fault
    m.put_page(pages[0])
    finish(m, mm, files=[inode])
