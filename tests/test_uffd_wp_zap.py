"""uffd-wp across zapping (6.6 mm/memory.c zap_pte_range(), zap_install_uffd_wp_if_needed(),
include/linux/mm_inline.h pte_install_uffd_wp_if_needed()): MADV_DONTNEED, truncation and
shmem reclaim of a uffd-wp protected shmem range leave PTE_MARKER_UFFD_WP in place of the
protected ptes, so the next write still goes to the userfaultfd; munmap and exit
(unmap_vmas(): ZAP_FLAG_DROP_MARKER) drop them; anonymous memory never keeps one. Every
check reads the pte bytes in guest RAM."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import SWP_PTE_MARKER, Access, Kind, swap_entry
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import memory, userfaultfd
from mm_core.memory import FaultResult, do_user_addr_fault
from mm_core.mm import MM_SHMEMPAGES, VM_UFFD_WP
from mm_core.swapops import PTE_MARKER_UFFD_WP
from tests.test_userfaultfd import ANON, BASE, RW, SHARED, WP, WP_WORLDS, write


def marker_raw(k) -> int:
    return k.arch.encode(k.arch.pte_level, swap_entry(SWP_PTE_MARKER, PTE_MARKER_UFFD_WP))


def wp_shmem(arch: str, kernel: str, pages: int = 8, fill: int = 4, protect: int = 4, mem: str = "32M"):
    """A scenario with a shared mapping of a memfd whose first ``fill`` pages are written
    (so present in this mm), registered for WP and the first ``protect`` pages protected."""
    sc = Scenario(arch=arch, kernel=kernel, mem=mem, prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    inode = m.memfd_create("wpzap", pages * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * page, RW, SHARED, file=inode)
    for i in range(fill):
        write(m, mm, a + i * page, b"file%04d" % i)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, pages * page, WP)
    if protect:
        m.uffdio_writeprotect(ctx, a, protect * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    return sc, m, k, mm, a, inode, ctx


def write_goes_to_the_uffd(sc, m, k, mm, ctx, va: int, name: str = "writer") -> None:
    """A write fault at a marker ``va``: the marker refaults the page read-only with the
    uffd-wp bit (handle_pte_marker() -> do_pte_missing(), FAULT_FLAG_ORIG_PTE_VALID), and
    the write, executed again, faults on that pte and sleeps in handle_userfault();
    read() gets the uffd_msg (WRITE | WP at the page); un-protecting the page wakes it and
    the write maps it writable."""
    page = k.page_size
    before = k.stats["handle_userfault_wp"]
    assert userfaultfd.pte_none_mostly(pte_of(k, mm, va)) and pte_of(k, mm, va).kind is Kind.SWAP
    assert run_sync(do_user_addr_fault(k, mm, va, Access.W)) is FaultResult.OK
    ent = pte_of(k, mm, va)
    assert ent.kind is Kind.LEAF and ent.uffd_wp and not ent.prot & Access.W
    assert m.translate(mm, va, "w") is None and k.stats["handle_userfault_wp"] == before
    sc.task(name, do_user_addr_fault(k, mm, va, Access.W))                # the write again
    sc.run(f"{name}:*", finish=False)
    assert sc.state(name) is TaskState.BLOCKED and k.stats["handle_userfault_wp"] == before + 1
    uwq = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert isinstance(uwq, userfaultfd.UffdWaitQueue) and uwq.reason == VM_UFFD_WP
    msg = userfaultfd.uffd_msg_pagefault(ctx, uwq, page, k.arch.big_endian)
    order = "big" if k.arch.big_endian else "little"
    flags = userfaultfd.UFFD_PAGEFAULT_FLAG_WRITE | userfaultfd.UFFD_PAGEFAULT_FLAG_WP
    assert int.from_bytes(msg[8:16], order) == flags
    assert int.from_bytes(msg[16:24], order) == va & ~(page - 1)
    m.uffdio_writeprotect(ctx, va & ~(page - 1), page, 0)
    sc.run(f"{name}:*", finish=False)
    assert sc.results[name] is FaultResult.OK and m.translate(mm, va, "w") is not None


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_dontneed_over_protected_shmem_leaves_markers_and_a_write_still_traps(arch: str, kernel: str) -> None:
    """MADV_DONTNEED (6.6: zap_page_range_single(..., NULL details)) of pages 0-5: the four
    protected present ptes become uffd-wp markers, the two unprotected ones none; the
    page cache keeps the data. A write to a zapped protected page goes to the
    userfaultfd; a write to an unprotected one does not."""
    sc, m, k, mm, a, inode, ctx = wp_shmem(arch, kernel, pages=8, fill=6, protect=4)
    page, marker = k.page_size, marker_raw(k)
    assert all(pte_of(k, mm, a + i * page).uffd_wp for i in range(4))
    m.madvise(mm, a, 6 * page, emu.MADV_DONTNEED)
    for i in range(4):
        assert pte_of(k, mm, a + i * page, raw=True) == marker, i
        assert m.translate(mm, a + i * page, "r") is None
    for i in (4, 5):
        assert pte_of(k, mm, a + i * page, raw=True) == k.arch.empty_value(k.arch.pte_level)
    assert mm.rss[MM_SHMEMPAGES] == 0 and k.stats["uffd_wp_markers_kept"] == 4
    assert len(inode.mapping.i_pages) == 6                       # the page cache is untouched
    write_goes_to_the_uffd(sc, m, k, mm, ctx, a + 2 * page + 16)
    assert m.read_user(mm, a + 2 * page, 8) == b"file0002"
    # no trap for an unprotected page
    assert run_sync(do_user_addr_fault(k, mm, a + 5 * page, Access.W)) is FaultResult.OK
    assert k.stats["handle_userfault_wp"] == 1
    m.exit_mm(mm)
    m.close_file(inode)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_dontneed_keeps_an_existing_marker(arch: str, kernel: str) -> None:
    """A marker written by UFFDIO_WRITEPROTECT over a none pte survives a second zap
    (zap_pte_range(): `if (!vma_is_anonymous(vma) && !zap_drop_file_uffd_wp(details))
    continue;`)."""
    sc, m, k, mm, a, inode, ctx = wp_shmem(arch, kernel, pages=8, fill=2, protect=6)
    page, marker = k.page_size, marker_raw(k)
    assert [pte_of(k, mm, a + i * page, raw=True) == marker for i in range(6)] == [False, False] + [True] * 4
    m.madvise(mm, a, 8 * page, emu.MADV_DONTNEED)
    assert all(pte_of(k, mm, a + i * page, raw=True) == marker for i in range(6))
    write_goes_to_the_uffd(sc, m, k, mm, ctx, a + 4 * page)
    m.exit_mm(mm)
    m.close_file(inode)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_munmap_drops_the_markers_and_exit_leaves_nothing(arch: str, kernel: str) -> None:
    """munmap (unmap_region() -> unmap_vmas(): ZAP_FLAG_DROP_MARKER | ZAP_FLAG_UNMAP) of
    part of the range whose PTE table stays (the rest of the VMA shares it): the markers of
    the unmapped part are gone from the table, so a new mapping there starts clean; the
    rest keep theirs until exit, and check_mm() finds nothing left."""
    sc, m, k, mm, a, inode, ctx = wp_shmem(arch, kernel, pages=8, fill=4, protect=8)
    page, marker = k.page_size, marker_raw(k)
    m.madvise(mm, a, 8 * page, emu.MADV_DONTNEED)
    assert all(pte_of(k, mm, a + i * page, raw=True) == marker for i in range(8))
    m.munmap(mm, a + 4 * page, 4 * page)
    empty = k.arch.empty_value(k.arch.pte_level)
    assert all(pte_of(k, mm, a + i * page, raw=True) == empty for i in range(4, 8))
    assert all(pte_of(k, mm, a + i * page, raw=True) == marker for i in range(4))
    # a fresh anonymous mapping at the hole faults normally (no stale marker to meet)
    b = m.mmap(mm, a + 4 * page, 4 * page, RW, ANON)
    assert run_sync(do_user_addr_fault(k, mm, b, Access.W)) is FaultResult.OK
    assert k.stats["handle_userfault_wp"] == 0
    m.exit_mm(mm)                                  # exit_mmap(): unmap_vmas drops the rest
    assert mm.dead
    m.close_file(inode)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_anonymous_memory_keeps_no_marker(arch: str, kernel: str) -> None:
    """zap_install_uffd_wp_if_needed(): "Zap on anonymous always means dropping
    everything": a protected anon pte zapped by MADV_DONTNEED is none afterwards."""
    sc = Scenario(arch=arch, kernel=kernel, mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    for i in range(4):
        m.touch(mm, a + i * page, write=True)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, WP)
    m.uffdio_writeprotect(ctx, a, 4 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert pte_of(k, mm, a).uffd_wp
    m.madvise(mm, a, 4 * page, emu.MADV_DONTNEED)
    empty = k.arch.empty_value(k.arch.pte_level)
    assert all(pte_of(k, mm, a + i * page, raw=True) == empty for i in range(4))
    assert k.stats["uffd_wp_markers_kept"] == 0
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_truncation_keeps_the_markers_of_the_truncated_tail(arch: str, kernel: str) -> None:
    """truncate_pagecache() -> unmap_mapping_range(..., even_cows=1): unmap_mapping_pages()
    passes no ZAP_FLAG_DROP_MARKER, so protected ptes past the new EOF become markers; a
    fault there is SIGBUS (past EOF), not a userfault."""
    sc, m, k, mm, a, inode, ctx = wp_shmem(arch, kernel, pages=8, fill=8, protect=8)
    page, marker = k.page_size, marker_raw(k)
    run_sync(memory_shrink(k, inode, 4 * page))
    assert all(pte_of(k, mm, a + i * page).kind is Kind.LEAF for i in range(4))
    assert all(pte_of(k, mm, a + i * page, raw=True) == marker for i in range(4, 8))
    assert run_sync(do_user_addr_fault(k, mm, a + 6 * page, Access.W)) is FaultResult.SIGBUS
    assert k.stats["handle_userfault_wp"] == 0
    m.exit_mm(mm)
    m.close_file(inode)
    sc.close()


async def memory_shrink(k, inode, size: int) -> None:
    from mm_core import shmem
    await shmem.shmem_setattr_size(k, inode, size)


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_shmem_reclaim_of_a_protected_page_leaves_a_marker(arch: str, kernel: str) -> None:
    """MADV_PAGEOUT of protected shmem pages: try_to_unmap_one() clears the file pte and
    pte_install_uffd_wp_if_needed() puts a marker there; the page goes to swap, and the
    write fault swaps it in read-only with the uffd-wp bit, then traps."""
    sc, m, k, mm, a, inode, ctx = wp_shmem(arch, kernel, pages=4, fill=4, protect=2, mem="64M")
    page, marker = k.page_size, marker_raw(k)
    m.swapon(16, readahead=1)
    m.madvise(mm, a, 4 * page, emu.MADV_PAGEOUT)
    assert k.stats["shmem_writepage"] == 4 and sorted(inode.mapping.swap_entries) == [0, 1, 2, 3]
    assert [pte_of(k, mm, a + i * page, raw=True) == marker for i in range(4)] == [True, True, False, False]
    write_goes_to_the_uffd(sc, m, k, mm, ctx, a + page)
    assert m.read_user(mm, a + page, 8) == b"file0001"
    m.exit_mm(mm)
    m.close_file(inode)
    sc.close()


def test_pt_reclaim_leaves_a_table_that_holds_markers() -> None:
    """6.14 PT_RECLAIM: MADV_DONTNEED ({reclaim_pt, even_cows}, no DROP_MARKER) over a
    whole PMD extent of protected shmem keeps the table, since the markers it left are not
    none (zap_pte_range()'s any_skipped); the unprotected neighbour extent's table goes."""
    sc = Scenario(arch="x86_64", kernel="6.14", mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    span = k.arch.levels[k.arch.pmd_level].span
    npages = 2 * span // page
    inode = m.memfd_create("wpzap", 2 * span)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * span, RW, SHARED, file=inode)
    for i in (0, 1, npages // 2, npages // 2 + 1):
        write(m, mm, a + i * page, b"x")
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 2 * span, WP)
    m.uffdio_writeprotect(ctx, a, page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    m.madvise(mm, a, 2 * span, emu.MADV_DONTNEED)
    assert pte_of(k, mm, a, raw=True) == marker_raw(k)
    assert pte_of(k, mm, a + page, raw=True) == k.arch.empty_value(k.arch.pte_level)
    assert pte_of(k, mm, a + span, raw=True) is None                         # that table was reclaimed
    assert k.stats["pt_reclaimed"] == 1
    write_goes_to_the_uffd(sc, m, k, mm, ctx, a)
    m.exit_mm(mm)
    m.close_file(inode)
    sc.close()


def test_zap_details_helpers() -> None:
    """struct zap_details: NULL keeps file markers and zaps COWs; unmap_vmas' details
    drop markers; even_cows off spares anon folios only."""
    assert not memory.zap_drop_file_uffd_wp(None) and memory.should_zap_cows(None)
    assert memory.zap_drop_file_uffd_wp(memory.ZAP_UNMAP_DETAILS)
    assert not memory.zap_drop_file_uffd_wp(memory.ZapDetails(even_cows=True))
    assert not memory.should_zap_cows(memory.ZapDetails())
