"""KSM (mm_core/ksm.py): merging two identical pages into a write-protected KSM page,
unmerging with break_ksm() (walk_page_range_vma + break_ksm_pmd_entry, then an UNSHARE
fault), and break_ksm_pmd_entry()'s failure category (a failed pte_offset_map_lock() is
"no KSM page here": SKIP, no retry) forced by schedules."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.sched import traps
from emu.sched.loop import run_sync
from mm_core import huge_memory, ksm, madvise, memory, rmap
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.sanitizers import Finding
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


# -- ksmd's scan -----------------------------------------------------------------------------------

def merged(k, mm, va: int):
    """The KSM folio mapped at ``va`` (read-only), or None."""
    pte = pte_of(k, mm, va)
    if pte is None or pte.kind is not Kind.LEAF:
        return None
    folio = k.alloc.page_of(pte.paddr)
    return folio if ksm.folio_test_ksm(folio) else None




def poke(m, mm, va: int, data: bytes) -> None:
    """A user store: a write fault if needed (COW), then the bytes."""
    m.kernel.physmem.write(m.touch(mm, va, write=True), data)


def mergeable_pair(m, contents: list[int]):
    """Two processes, each with a MADV_MERGEABLE mapping at BASE whose page i holds
    ``contents[i]`` repeated (one page more, never touched)."""
    page = m.kernel.page_size
    mms = [m.new_mm(), m.new_mm()]
    for mm in mms:
        m.mmap(mm, BASE, (len(contents) + 1) * page, RW, ANON)
        for i, byte in enumerate(contents):
            fill(m, mm, BASE + i * page, byte)
        m.madvise(mm, BASE, (len(contents) + 1) * page, emu.MADV_MERGEABLE)
    return mms


def scan_round(m) -> int:
    """ksmd wakeups until ksm_scan.seqnr counts a full round."""
    k = m.kernel
    seqnr = ksm.ksm_state(k).seqnr
    while ksm.ksm_state(k).seqnr == seqnr:
        m.ksm_scan(pages=2)
    return ksm.ksm_state(k).seqnr


@pytest.mark.parametrize("arch", ARCHES)
def test_ksmd_merges_identical_pages_of_two_processes_in_the_second_round(arch: str) -> None:
    """Round 1 only records each page's checksum (calc_checksum() against the zeroed
    oldchecksum: "changing"); round 2 inserts the first process's pages into the unstable
    tree and finds them with the second's: try_to_merge_two_pages() makes the second's
    page the KSM page (write_protect_page), replace_page() points the first's pte at it,
    stable_tree_insert() + two stable_tree_append(). A write breaks COW; the next round
    drops that rmap_item from the stable node."""
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    a, b = mergeable_pair(m, [0x11, 0x22, 0x33])
    state = ksm.ksm_state(k)
    assert [s.mm for s in state.mm_slots] == [a, b]
    assert scan_round(m) == 1
    assert k.stats["ksm_checksum_changed"] == 6 and state.rmap_items == 6
    assert all(merged(k, mm, BASE + i * page) is None for mm in (a, b) for i in range(3))
    assert k.stats["ksm_scan_follow_page_null"] == 2             # the untouched page of each: no pte
    scan_round(m)
    for i, byte in enumerate((0x11, 0x22, 0x33)):
        va = BASE + i * page
        kpage = merged(k, a, va)
        assert kpage is not None and merged(k, b, va) is kpage and kpage.mapcount == 2
        assert not pte_of(m, a, va).prot & Access.W and not pte_of(m, b, va).prot & Access.W
        assert m.read_user(a, va, 8) == m.read_user(b, va, 8) == bytes([byte]) * 8
    assert (state.pages_shared, state.pages_sharing, state.pages_unshared) == (3, 3, 0)
    assert len(state.stable_tree) == 3 and a.rss[1] == b.rss[1] == 3
    # a write breaks COW: a private copy for a, the KSM page keeps b
    kpage = merged(k, a, BASE + page)
    poke(m, a, BASE + page, b"\x99" * 8)
    assert merged(k, a, BASE + page) is None and kpage.mapcount == 1
    assert m.read_user(a, BASE + page, 9) == b"\x99" * 8 + b"\x22"
    assert m.read_user(b, BASE + page, 9) == b"\x22" * 9
    scan_round(m)
    assert (state.pages_shared, state.pages_sharing) == (3, 2)
    assert merged(k, a, BASE + page) is None                     # different content: not re-merged
    for mm in (a, b):
        m.exit_mm(mm)                                            # check_mm()
    scan_round(m)                                                # ksm_test_exit(): slots and items go
    assert state.mm_slots == [] and state.rmap_items == 0 and state.stable_tree == {}
    assert (state.pages_shared, state.pages_sharing, state.pages_unshared) == (0, 0, 0)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.alloc.pages.keys() == {k.zero_page.pfn}


def test_a_page_changed_between_scans_is_not_merged_until_its_checksum_holds() -> None:
    """cmp_and_merge_page(): a page whose checksum changed since the last round is not
    even looked up in the unstable tree; two pages that differ are never merged."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    a, b = mergeable_pair(m, [0x44, 0x55])
    scan_round(m)
    poke(m, b, BASE, b"\x66")                               # b's first page changes
    scan_round(m)
    assert merged(k, a, BASE) is None and merged(k, b, BASE) is None
    assert merged(k, a, BASE + page) is not None                 # the unchanged pair merged
    scan_round(m)                                                # b's checksum holds now, but differs
    assert merged(k, a, BASE) is None and merged(k, b, BASE) is None
    assert m.read_user(b, BASE, 2) == b"\x66\x44" and m.read_user(a, BASE, 2) == b"\x44\x44"
    poke(m, b, BASE, b"\x44")                               # identical again: one more round to wait
    scan_round(m)
    assert merged(k, a, BASE) is None
    scan_round(m)
    assert merged(k, a, BASE) is not None and merged(k, a, BASE) is merged(k, b, BASE)
    finish(m, a, b)


@pytest.mark.parametrize("injected", [False, True])
def test_scan_follow_page_vs_pt_reclaim_skips_the_freed_table(injected: bool) -> None:
    """6.14: ksmd's scan (mmap_read_lock) has read the pmd of the first PMD extent in
    follow_page() (follow_pmd_mask's pmdp_get_lockless) when MADV_DONTNEED (also
    mmap_read_lock) zaps that whole extent and PT_RECLAIM frees its table;
    follow_page_pte()'s pte_offset_map_lock() fails: NULL, the address is skipped (SKIP),
    and so is the rest of the extent. No use of the freed table (sanitizers), the second
    extent's identical pages still merge, and the zapped pages' rmap_items go. With
    follow_page_pte_ignores_map_failure injected the read of the freed table is KASAN's
    use-after-free."""
    sc = Scenario(arch="x86_64", kernel="6.14", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, ANON)
    for va in (a, a + 3 * page, a + size + page, a + size + 2 * page):
        fill(m, mm, va, 0x77)
    m.madvise(mm, a, 2 * size, emu.MADV_MERGEABLE)
    scan_round(m)
    state = ksm.ksm_state(k)
    assert state.rmap_items == 4
    nulls = k.stats["ksm_scan_follow_page_null"]
    sc.task("ksmd", ksm.ksm_do_scan(k, 100))
    sc.task("dontneed", madvise.do_madvise(k, mm, a, size, emu.MADV_DONTNEED))
    # ksmd: mmap_read_lock, follow_page_mask's reads down to the pmd and its lockless read
    schedule = f"ksmd:pt_read#{k.arch.pmd_level + 1} dontneed:* rcu_gp:* ksmd:*"
    if injected:
        k.bugs["follow_page_pte_ignores_map_failure"] = True
        with pytest.raises(Finding, match="use-after-free in follow_page_pte"):
            sc.run(schedule)
        sc.close()
        return
    sc.run(schedule)
    assert sc.results["dontneed"] == 0 and k.stats["pt_reclaimed"] == 1
    assert k.stats["gup_no_page_table"] == 1                     # the map failed
    assert k.stats["ksm_scan_follow_page_null"] - nulls == size // page + (size // page - 2)
    assert sc.results["ksmd"] == 2 and state.rmap_items == 2
    kpage = merged(k, mm, a + size + page)
    assert kpage is not None and merged(k, mm, a + size + 2 * page) is kpage
    assert m.translate(mm, a) is None and m.translate(mm, a + 3 * page) is None
    finish(m, mm)


def test_a_write_fault_between_write_protect_page_and_replace_page_fails_the_merge() -> None:
    """try_to_merge_two_pages(): the second page became the KSM page; the tree page has
    been write-protected (write_protect_page(), folio still locked) when the owner writes
    to it: the write fault cannot reuse the page (ksmd's reference) and copies it, so
    replace_page() finds the pte changed: -EFAULT, and break_cow() unshares the KSM page
    again. Nothing is merged, both addresses keep their bytes."""
    sc = Scenario(arch="x86_64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    first = fill(m, mm, a, 0x5A)
    fill(m, mm, a + page, 0x5A)
    m.madvise(mm, a, 2 * page, emu.MADV_MERGEABLE)
    scan_round(m)

    async def writer():
        await mmap_read_lock(mm)
        ret = await memory.handle_mm_fault(k, mm.vma_lookup(a), a, memory.FAULT_FLAG_WRITE)
        await mmap_read_unlock(mm)
        return ret

    sc.task("ksmd", ksm.ksm_do_scan(k, 100))
    sc.task("writer", writer())
    # ksmd's 9th unlock: the ptl after write_protect_page() of the tree page (at a)
    sc.run("ksmd:unlock#9 writer:* ksmd:*")
    assert sc.results["writer"] == 0 and sc.results["ksmd"] == 2
    assert k.stats["wp_reuse"] == 0 and k.stats["ksm_half_merge_broken"] == 1
    assert k.stats["break_ksm_unshare"] == 1 and k.stats["ksm_merged_unstable"] == 0
    assert m.translate(mm, a) & ~(page - 1) != first                # the write fault's copy
    k.physmem.write(m.translate(mm, a, "w"), b"\x01")           # the store the fault was for
    assert merged(k, mm, a) is None and merged(k, mm, a + page) is None
    assert m.read_user(mm, a, 2) == b"\x01\x5a" and m.read_user(mm, a + page, 2) == b"\x5a\x5a"
    state = ksm.ksm_state(k)
    assert state.pages_shared == state.pages_sharing == 0 and state.stable_tree == {}
    finish(m, mm)


def test_the_ksmd_daemon_scans_batches_once_run_is_set() -> None:
    """ksm_scan_thread(): asleep on ksm_thread_wait while run is KSM_RUN_STOP (the boot
    value); with KSM_RUN_MERGE it scans pages_to_scan pages a wakeup and sleeps between
    batches, so the pair merges after two rounds of several batches."""
    sc = Scenario(arch="arm64", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    a, b = mergeable_pair(m, [0x3C, 0x3D])
    state = ksm.ksm_state(k)
    state.pages_to_scan = 2
    sc.sched.spawn(ksm.ksm_scan_thread(k), "ksmd", daemon=True)

    async def user(rounds: int):
        for _ in range(400):
            if state.seqnr >= rounds:
                return state.seqnr
            await traps.sleep(10)
        return state.seqnr

    sc.task("idle", user(1))
    sc.run()
    assert sc.results["idle"] == 0 and state.rmap_items == 0     # KSM_RUN_STOP: nothing scanned
    state.run = ksm.KSM_RUN_MERGE
    state.wq.post()                                              # (the sysfs store wakes ksmd)
    sc.task("user", user(2))
    sc.run()
    assert sc.results["user"] == 2 and k.stats["ksm_merged_unstable"] == 2
    assert merged(k, a, BASE) is merged(k, b, BASE) is not None
    assert merged(k, a, BASE + k.page_size) is not None
    finish(m, a, b)
