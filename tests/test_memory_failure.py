"""memory-failure (mm_core/memory_failure.py): poisoning a page (hwpoison entries in the
real tables), kill_accessing_process()'s walk finding the address that maps the pfn
(present pte, hwpoison entry, THP pmd), and hwpoison_pte_range()'s failure categories
forced by schedules: a failed pte_offset_map_lock() is SKIP (the walk goes on to the next
pmd), a migration pmd under pmd_trans_huge_lock() is not present (0, no retry)."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import SWP_HWPOISON, Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import gup, huge_memory, khugepaged, memory_failure, rmap
from mm_core.mm import MM_ANONPAGES, MM_SHMEMPAGES
from mm_core.sched_helpers import stalled_thp_migration

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
AR = memory_failure.MF_ACTION_REQUIRED




def finish(m, *mms, files=(), poisoned=()) -> None:
    """Teardown: everything goes but the poisoned pages (never freed)."""
    k = m.kernel
    for mm in mms:
        m.exit_mm(mm)
    for f in files:
        m.close_file(f)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.alloc.pages.keys() == {k.zero_page.pfn, *poisoned}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_poisoned_anon_page_is_unmapped_and_found_by_its_hwpoison_entry(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm, other = m.new_mm(), m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    m.mmap(other, BASE, page, RW, ANON)
    m.touch(other, BASE, write=True)
    for i in range(4):
        m.touch(mm, a + i * page, write=True)
    pa = m.translate(mm, a + 2 * page, "r")
    pfn = pa >> k.page_shift
    assert mm.rss[MM_ANONPAGES] == 4
    assert m.memory_failure(pfn, mm) is None                  # first report: poison + unmap
    pte = pte_of(m, mm, a + 2 * page)                          # from the raw bytes
    assert pte.kind is Kind.SWAP and pte.swp_type == SWP_HWPOISON and pte.swp_offset == pa >> 12
    assert mm.rss[MM_ANONPAGES] == 3 and k.alloc.page_of(pa).mapcount == 0
    assert m.translate(mm, a + 2 * page) is None
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(mm, a + 2 * page)
    # the access machine-checks again: MF_ACTION_REQUIRED walks the mm for the address
    assert m.memory_failure(pfn, mm) == a + 2 * page
    assert k.stats["hwpoison_kill_proc"] == 1
    with pytest.raises(OSError) as err:                       # not mapped by that mm
        m.memory_failure(pfn, other)
    assert err.value.errno == memory_failure.EFAULT
    with pytest.raises(OSError) as err:
        m.memory_failure(pfn, mm, action_required=False)
    assert err.value.errno == memory_failure.EHWPOISON
    finish(m, mm, other, poisoned=[pa >> 12])


@pytest.mark.parametrize("arch", ARCHES)
def test_a_poisoned_shmem_page_is_unmapped_everywhere_and_kept_in_the_page_cache(arch: str) -> None:
    """memory_failure() of a small shmem page: every mapping (two processes, one of them
    twice) becomes a hwpoison entry, MM_SHMEMPAGES drops, and the page stays in the page
    cache poisoned: a new mapping's fault gets SIGBUS (__do_fault) and fault-around skips
    it while it maps its neighbours; a second report finds the lowest address."""
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("mf", 4 * page)
    mm, other, late = m.new_mm(), m.new_mm(), m.new_mm()
    shared = emu.MAP_SHARED | emu.MAP_FIXED
    lo = m.mmap(mm, BASE, 4 * page, RW, shared, file=inode)
    hi = m.mmap(mm, BASE + (8 << 20), 4 * page, RW, shared, file=inode)
    o = m.mmap(other, BASE, 4 * page, RW, shared, file=inode)
    pa = m.touch(mm, hi + page, write=True)
    assert m.touch(mm, lo + page) == pa == m.touch(other, o + page)
    before = (mm.rss[MM_SHMEMPAGES], other.rss[MM_SHMEMPAGES])
    assert m.memory_failure(pa >> k.page_shift, mm) is None          # recovered
    for who, va in ((mm, lo + page), (mm, hi + page), (other, o + page)):
        pte = pte_of(m, who, va)
        assert pte.kind is Kind.SWAP and pte.swp_type == SWP_HWPOISON and pte.swp_offset == pa >> 12
    assert (mm.rss[MM_SHMEMPAGES], other.rss[MM_SHMEMPAGES]) == (before[0] - 2, before[1] - 1)
    folio = inode.mapping.i_pages[1]
    assert folio.paddr == pa and folio.mapcount == 0 and folio.refcount == 2   # cache + memory_failure
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(other, o + page)
    late_a = m.mmap(late, BASE, 4 * page, RW, shared, file=inode)
    assert m.touch(late, late_a) is not None                          # fault-around maps 0, 2, 3 ...
    assert pte_of(m, late, late_a + page).kind is Kind.NONE           # ... but not the poisoned 1
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(late, late_a + page)                                  # __do_fault: VM_FAULT_HWPOISON
    assert k.stats["fault_hwpoison"] == 1 and k.stats["memory_failure_recovered"] == 1
    assert m.memory_failure(pa >> k.page_shift, mm) == lo + page     # the walk stops at the first
    finish(m, mm, other, late, files=[inode], poisoned=[pa >> k.page_shift])


def test_collapse_of_a_range_with_a_poisoned_shmem_page_rolls_back() -> None:
    """collapse_file()'s copy_mc_highpage() machine-checks on the poisoned page:
    SCAN_COPY_MC (MADV_COLLAPSE: -EINVAL), nothing replaced in the page cache, the other
    pages fault back in with their data."""
    m = emu.Machine(arch="arm64", mem="32M", prefault=False)
    k = m.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("mf", size)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for off in range(0, size, page):
        m.physmem[m.touch(mm, a + off, write=True)] = off // page % 251
    pa = m.translate(mm, a + 5 * page)
    assert m.memory_failure(pa >> k.page_shift, mm) is None
    with pytest.raises(OSError) as err:
        m.madvise(mm, a, size, emu.MADV_COLLAPSE)
    assert err.value.errno == 22 and k.stats["collapse_copy_mc"] == 1
    assert inode.mapping.i_pages[5].paddr == pa and inode.mapping.i_pages[0].order == k.page_order
    assert m.physmem[m.touch(mm, a + 6 * page)] == 6
    finish(m, mm, files=[inode], poisoned=[pa >> k.page_shift])


def test_a_pinned_shmem_page_is_unmapped_but_not_recovered() -> None:
    """A GUP pin is a reference beyond the page cache's: has_extra_refcount() makes the
    result MF_FAILED (-EBUSY), though the mappings were replaced all the same."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    inode = m.memfd_create("mf", 2 * k.page_size)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    [pa] = m.get_user_pages(mm, a, 1, write=True, pin=True)
    with pytest.raises(OSError) as err:
        m.memory_failure(pa >> k.page_shift, mm)
    assert err.value.errno == memory_failure.EBUSY and k.stats["memory_failure_failed"] == 1
    assert pte_of(m, mm, a).swp_type == SWP_HWPOISON
    # a FOLL_PIN on a small folio is GUP_PIN_COUNTING_BIAS references
    assert k.log[-1].endswith(f"still referenced by {gup.GUP_PIN_COUNTING_BIAS} users")
    m.unpin_user_pages([pa])
    finish(m, mm, files=[inode], poisoned=[pa >> k.page_shift])


def test_a_second_report_during_the_unmap_finds_a_mapping_still_present() -> None:
    """Two machine checks on one shmem page: the first report's rmap walk has replaced
    one mapping (the VMA first in i_mmap, at the higher address) when the second report
    (MF_ACTION_REQUIRED: PageHWPoison is already set) walks the mm: it finds the lower
    mapping, still a present pte, first."""
    sc = Scenario(arch="x86_64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    inode = m.memfd_create("mf", 2 * page)
    mm = m.new_mm()
    hi = m.mmap(mm, BASE + (8 << 20), 2 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    lo = m.mmap(mm, BASE, 2 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    pa = m.touch(mm, hi, write=True)
    assert m.touch(mm, lo) == pa
    pfn = pa >> k.page_shift
    sc.task("first", memory_failure.memory_failure(k, pfn, AR, mm))
    sc.task("second", memory_failure.memory_failure(k, pfn, AR, mm))
    writes = 2                                            # hi: ptep_clear_flush(), the hwpoison entry
    sc.run(f"first:pt_write#{writes} second:*", finish=False)
    assert pte_of(m, mm, hi).kind is Kind.SWAP and pte_of(m, mm, lo).kind is Kind.LEAF
    ret, tk = sc.results["second"]
    assert ret == -memory_failure.EHWPOISON and tk.addr == lo
    sc.run()
    assert sc.results["first"] == (0, None) and pte_of(m, mm, lo).kind is Kind.SWAP
    finish(m, mm, files=[inode], poisoned=[pfn])


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "ppc64", "s390x"])
def test_a_poisoned_thp_subpage_is_found_through_the_pmd(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    mm, a, thp = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    pfn = (thp >> k.page_shift) + 5
    with pytest.raises(OSError):                              # split_huge_page(): not modelled
        m.memory_failure(pfn, mm)
    assert m.memory_failure(pfn, mm) == a + 5 * k.page_size    # check_hwpoisoned_pmd_entry()
    m.exit_mm(mm)
    m.rcu_barrier()
    assert k.ptdescs == {}


# -- the failure categories, forced ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_a_table_retracted_under_the_walk_is_skipped_and_the_walk_goes_on(arch: str) -> None:
    """The first extent is a shmem mapping whose table retract_page_tables() takes away
    between the walk's pmd reads and hwpoison_pte_range()'s pte_offset_map_lock(): the map
    fails, ``goto out``, 0 (SKIP, no retry), and the walk finds the page in the next
    extent."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("race", size)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    b = m.mmap(mm, BASE + size, size, RW, ANON)
    for off in range(0, size, k.page_size):
        m.touch(mm, a + off, write=True)
    assert run_sync(khugepaged.collapse_file(k, inode, 0, is_khugepaged=True, retract=False)) \
        is khugepaged.Scan.SUCCEED
    pa = m.touch(mm, b + 3 * k.page_size, write=True)
    pfn = pa >> k.page_shift
    assert run_sync(memory_failure.memory_failure(k, pfn, AR, mm)) == (0, None)
    sc.task("mf", memory_failure.kill_accessing_process(k, mm, pfn, AR))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # mf: mmap_read_lock, the walk's reads down to the pmd, walk_pmd_range's and
    # hwpoison_pte_range's reads of it; then retract, then the map
    sc.run(f"mf:pt_read#{k.arch.pmd_level + 2} retract:* mf:*")
    ret, tk = sc.results["mf"]
    assert sc.results["retract"] == 1 and k.stats["hwpoison_pte_range_map_failed"] == 1
    assert ret == -memory_failure.EHWPOISON and tk.addr == b + 3 * k.page_size
    assert tk.size_shift == k.page_shift
    assert not any(" retry" in t for t in sc.trace_of("mf"))
    finish(m, mm, files=[inode], poisoned=[pa >> 12])


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_a_migration_pmd_is_not_present_and_the_walk_ends(arch: str) -> None:
    """The poisoned THP is being migrated: pmd_trans_huge_lock() returns its pmd locked,
    check_hwpoisoned_pmd_entry() sees it is not present: 0, no retry; the walk ends
    without an address (-EFAULT). Once the migration is done the same walk finds it."""
    sc = Scenario(arch=arch, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm, a, thp = anon_thp(m)
    pfn = (thp >> k.page_shift) + 7
    assert run_sync(memory_failure.memory_failure(k, pfn, AR, mm))[0] == -memory_failure.EBUSY
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("mf", memory_failure.kill_accessing_process(k, mm, pfn, AR))
    sc.run("migrate:* mf:*", finish=False)
    ret, tk = sc.results["mf"]
    assert ret == -memory_failure.EFAULT and tk.addr == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    assert not any(" retry" in t for t in sc.trace_of("mf"))
    sc.run()
    ret, tk = run_sync(memory_failure.kill_accessing_process(k, mm, pfn, AR))
    assert ret == -memory_failure.EHWPOISON and tk.addr == a + 7 * k.page_size
    m.exit_mm(mm)
    m.rcu_barrier()
    assert k.ptdescs == {}
