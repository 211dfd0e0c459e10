"""KSM (mm_core/ksm.py): merging two identical pages into a write-protected KSM page,
unmerging with break_ksm() (walk_page_range_vma + break_ksm_pmd_entry, then an UNSHARE
fault), and break_ksm_pmd_entry()'s failure category (a failed pte_offset_map_lock() is
"no KSM page here": SKIP, no retry) forced by schedules."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, ksm, madvise, pgtable, rmap
from mm_core.sched_helpers import stalled_thp_migration

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def finish(m, *mms) -> None:
    k = m.kernel
    for mm in mms:
        m.exit_mm(mm)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.alloc.pages.keys() == {k.zero_page.pfn}


def fill(m, mm, va: int, byte: int) -> int:
    """Write a page of ``byte`` at ``va`` (faulting it in); returns its frame."""
    pa = m.touch(mm, va, write=True)
    page = m.kernel.page_size
    m.physmem[pa & ~(page - 1):(pa & ~(page - 1)) + page] = bytes([byte]) * page
    return pa & ~(page - 1)


def pte_of(m, mm, va: int):
    k = m.kernel
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    ptep = pgtable.entry_addr(k, pmd.paddr, k.arch.pte_level, va)
    return k.arch.decode(k.arch.pte_level, k.physmem.read_entry(ptep))


@pytest.mark.parametrize("arch", ARCHES)
def test_merge_then_unmerge_through_break_ksm(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    frames = [fill(m, mm, a + i * page, 0x5A) for i in range(3)]
    with pytest.raises(OSError):                               # not VM_MERGEABLE yet
        m.ksm_merge(mm, a, mm, a + page)
    m.madvise(mm, a, 4 * page, emu.MADV_MERGEABLE)
    assert all(v.flags & ksm.VM_MERGEABLE for v in mm.vmas)
    m.ksm_merge(mm, a, mm, a + page)
    m.ksm_merge(mm, a, mm, a + 2 * page)
    kpage = k.alloc.page_of(frames[0])
    assert ksm.folio_test_ksm(kpage) and kpage.mapcount == 3 and kpage.owner is None
    assert k.alloc.page_of(frames[1]) is None and k.alloc.page_of(frames[2]) is None   # freed
    for i in range(3):                                         # one frame, write-protected, from the bytes
        pte = pte_of(m, mm, a + i * page)
        assert pte.kind is Kind.LEAF and pte.paddr == frames[0] and not pte.prot & Access.W
        assert m.translate(mm, a + i * page, "w") is None
        assert m.read_user(mm, a + i * page, 16) == b"\x5a" * 16
    assert mm.rss[1] == 3                                      # MM_ANONPAGES unchanged
    # a write breaks COW for that page only
    new = m.touch(mm, a + page, write=True)
    assert new & ~(page - 1) != frames[0] and kpage.mapcount == 2
    assert m.read_user(mm, a + page, 16) == b"\x5a" * 16
    # MADV_UNMERGEABLE: break_ksm() finds the KSM page and unshares it, read-only
    m.madvise(mm, a, 4 * page, emu.MADV_UNMERGEABLE)
    assert run_sync(ksm.ksm_pages_at(k, mm, a, a + 4 * page)) == []
    assert k.alloc.page_of(frames[0]) is None and k.stats["break_ksm_unshare"] == 2
    for i in (0, 2):
        assert m.translate(mm, a + i * page, "r") not in (None, frames[0])
        assert m.translate(mm, a + i * page, "w") is None       # unshare does not make it writable
        assert m.read_user(mm, a + i * page, 16) == b"\x5a" * 16
    reuse = k.stats["wp_reuse"]
    m.touch(mm, a, write=True)                                 # exclusive now: reused in place
    assert k.stats["wp_reuse"] == reuse + 1
    assert not any(v.flags & ksm.VM_MERGEABLE for v in mm.vmas)
    finish(m, mm)


def test_different_pages_do_not_merge_and_the_half_merge_is_broken() -> None:
    """try_to_merge_two_pages(): the first page became a KSM page, the second is not
    identical, so replace_page() is never called and break_cow() unshares the first."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm, other = m.new_mm(), m.new_mm()
    a = m.mmap(mm, BASE, page, RW, ANON)
    b = m.mmap(other, BASE, page, RW, ANON)
    fill(m, mm, a, 1)
    fill(m, other, b, 2)
    for x, va in ((mm, a), (other, b)):
        m.madvise(x, va, page, emu.MADV_MERGEABLE)
    with pytest.raises(OSError) as err:
        m.ksm_merge(mm, a, other, b)
    assert err.value.errno == ksm.EFAULT and k.stats["break_ksm_unshare"] == 1
    assert run_sync(ksm.ksm_pages_at(k, mm, a, a + page)) == []
    assert m.read_user(mm, a, 4) == b"\x01" * 4 and m.read_user(other, b, 4) == b"\x02" * 4
    finish(m, mm, other)


def test_a_page_with_an_extra_reference_is_not_merged() -> None:
    """write_protect_page(): mapcount + 1 (our follow_page reference) != refcount means
    someone else (GUP) holds the page: the pte is restored and the merge fails."""
    m = emu.Machine(arch="arm64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    pinned = k.alloc.page_of(fill(m, mm, a, 7))
    fill(m, mm, a + page, 7)
    m.madvise(mm, a, 2 * page, emu.MADV_MERGEABLE)
    pinned.refcount += 1                                       # a GUP pin
    with pytest.raises(OSError):
        m.ksm_merge(mm, a, mm, a + page)
    assert not ksm.folio_test_ksm(pinned) and pte_of(m, mm, a).prot & Access.W
    pinned.refcount -= 1
    m.ksm_merge(mm, a, mm, a + page)
    assert ksm.folio_test_ksm(pinned)
    finish(m, mm)


# -- the failure category, forced ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_break_ksm_over_a_migration_pmd_skips_at_once(arch: str) -> None:
    """A THP under migration: the walk calls break_ksm_pmd_entry(), whose
    pte_offset_map_lock() fails on the migration pmd: 0, "nothing to break" (a THP is no
    KSM page), with no ACTION_AGAIN: the walk ends although the pmd stays a migration
    entry."""
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    m.madvise(mm, a, size, emu.MADV_MERGEABLE)
    m.touch(mm, a, write=True)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("ksmd", ksm.break_cow(k, mm, a + 5 * k.page_size))
    sc.run("migrate:* ksmd:*", finish=False)
    assert sc.results["ksmd"] == 0 and k.stats["break_ksm_map_failed"] == 1
    assert k.stats["break_ksm_unshare"] == 0
    assert not any(" retry" in t for t in sc.trace_of("ksmd"))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    sc.run()
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_break_cow_vs_pt_reclaim_finds_no_table_and_skips(arch: str) -> None:
    """6.14: ksmd's break_cow() (mmap_read_lock) read the pmd of a KSM page's table;
    MADV_DONTNEED (also mmap_read_lock) zaps the whole extent and PT_RECLAIM frees the
    table; break_ksm_pmd_entry()'s map then fails: 0, nothing to break (SKIP). The KSM
    page lives on where it is still mapped."""
    sc = Scenario(arch=arch, kernel="6.14", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    b = a + size + 3 * page                                    # the other PMD extent
    kframe = fill(m, mm, a, 0x33)
    fill(m, mm, b, 0x33)
    m.madvise(mm, a, 2 * size, emu.MADV_MERGEABLE)
    m.ksm_merge(mm, a, mm, b)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, b))
    sc.task("ksmd", ksm.break_cow(k, mm, b))
    sc.task("dontneed", madvise.do_madvise(k, mm, a + size, size, emu.MADV_DONTNEED))
    # ksmd: mmap_read_lock, the walk's reads down to the pmd and walk_pmd_range's read of it
    sc.run(f"ksmd:pt_read#{k.arch.pmd_level + 1} dontneed:* rcu_gp:* ksmd:*")
    assert sc.results == {"dontneed": 0, "ksmd": 0}
    assert k.stats["pt_reclaimed"] == 1 and k.stats["break_ksm_map_failed"] == 1
    assert k.stats["break_ksm_unshare"] == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.NONE
    kpage = k.alloc.page_of(kframe)
    assert ksm.folio_test_ksm(kpage) and kpage.mapcount == 1 and pte_of(m, mm, a).paddr == kframe
    m.madvise(mm, a, 2 * size, emu.MADV_UNMERGEABLE)
    assert k.alloc.page_of(kframe) is None
    finish(m, mm)
