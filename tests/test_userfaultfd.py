"""userfaultfd beyond UFFDIO_MOVE: UFFDIO_REGISTER (MISSING / WP / MINOR) and where the arch
and kernel allow it, the fault side (handle_userfault() queueing the task, the lockless
userfaultfd_must_wait() walk and its RETRY on a failed map, the resolving ioctl waking it),
UFFDIO_WRITEPROTECT (the uffd-wp bit in present ptes, PTE_MARKER_UFFD_WP in none ptes of
shmem, the WP fault), UFFDIO_ZEROPAGE and UFFDIO_CONTINUE with their -EAGAIN category
forced by hand-written schedules. Every check reads the page-table bytes in guest RAM."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import SWP_PTE_MARKER, Access, Kind, swap_entry
from emu.scenario import Scenario
from emu.scenarios import anon_thp, collapse_file_tail, collapsed_shmem, huge_refault
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import huge_memory, khugepaged, madvise, rmap, userfaultfd
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.memory import FaultResult, do_user_addr_fault
from mm_core.mm import MM_ANONPAGES, MM_SHMEMPAGES, VM_UFFD_MINOR, VM_UFFD_MISSING, VM_UFFD_WP
from mm_core.swapops import PTE_MARKER_UFFD_WP

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
SHARED = emu.MAP_SHARED | emu.MAP_FIXED
BASE = 0x40000000
MISSING, WP, MINOR = (emu.UFFDIO_REGISTER_MODE_MISSING, emu.UFFDIO_REGISTER_MODE_WP,
                      emu.UFFDIO_REGISTER_MODE_MINOR)
# where uffd-wp exists: x86_64 always, arm64 from 6.10 ("arm64/mm: Add uffd write-protect support")
WP_WORLDS = [("x86_64", "6.6"), ("arm64", "6.13")]
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]






def write(m, mm, va: int, data: bytes) -> int:
    pa = m.touch(mm, va, write=True)
    m.physmem[pa:pa + len(data)] = data
    return pa


def shmem_world(arch: str, kernel: str, pages: int = 16, fill: int = 0):
    """A shared mapping of a shmem file, ``fill`` pages of it in the page cache (written
    through a second mapping, so this one has none mapped)."""
    m = emu.Machine(arch=arch, mem="32M", kernel=kernel, prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("uffd", pages * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * page, RW, SHARED, file=inode)
    if fill:
        writer = m.new_mm()
        w = m.mmap(writer, BASE, pages * page, RW, SHARED, file=inode)
        for i in range(fill):
            write(m, writer, w + i * page, b"file%04d" % i)
        m.exit_mm(writer)
    return m, k, mm, a, inode


# -- UFFDIO_REGISTER ---------------------------------------------------------------------------

def test_register_sets_the_vma_flags_splits_and_reports_the_ioctls() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", kernel="6.6", prefault=False)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    ctx = m.userfaultfd(mm)
    ioctls = m.uffdio_register(ctx, a + 2 * page, 4 * page, MISSING)
    assert ioctls & (1 << userfaultfd._UFFDIO_COPY) and ioctls & (1 << userfaultfd._UFFDIO_ZEROPAGE)
    assert not ioctls & (1 << userfaultfd._UFFDIO_WRITEPROTECT)
    assert not ioctls & (1 << userfaultfd._UFFDIO_CONTINUE)
    assert not ioctls & (1 << userfaultfd._UFFDIO_MOVE)              # 6.8
    assert ioctls & (1 << userfaultfd._UFFDIO_POISON)                # 6.6: every mode offers it
    parts = [(v.start - a, v.end - a) for v in mm.vmas]
    assert parts == [(0, 2 * page), (2 * page, 6 * page), (6 * page, 8 * page)]
    mid = mm.vma_lookup(a + 2 * page)
    assert mid.flags & VM_UFFD_MISSING and mid.uffd_missing and not mid.uffd_wp and mid.uffd_ctx is ctx
    assert mm.vma_lookup(a).uffd_ctx is None
    ioctls = m.uffdio_register(ctx, a + 2 * page, 4 * page, MISSING | WP)
    assert ioctls & (1 << userfaultfd._UFFDIO_WRITEPROTECT) and mid.flags & VM_UFFD_WP and mid.uffd_wp
    m.uffdio_unregister(ctx, a, 8 * page)
    assert all(v.uffd_ctx is None and not v.flags & (VM_UFFD_MISSING | VM_UFFD_WP) for v in mm.vmas)
    assert len(mm.vmas) == 1                                         # merged back
    m.exit_mm(mm)


def test_register_errors() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", kernel="6.6", prefault=False)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    ctx, other = m.userfaultfd(mm), m.userfaultfd(mm)
    for start, length, mode, errno in ((a, 4 * page, 0, 22), (a, 4 * page, 8, 22), (a + 1, page, MISSING, 22),
                                       (a, 4 * page, MINOR, 22),                 # MINOR is shmem only
                                       (a + 64 * page, page, MISSING, 12)):      # no VMA there
        with pytest.raises(OSError) as err:
            m.uffdio_register(ctx, start, length, mode)
        assert err.value.errno == errno, (start - a, mode)
    m.uffdio_register(ctx, a, 4 * page, MISSING)
    with pytest.raises(OSError) as err:
        m.uffdio_register(other, a, page, MISSING)
    assert err.value.errno == 16                                     # EBUSY: another context's
    m.exit_mm(mm)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kernel", ["6.6", "6.13"])
def test_wp_and_minor_exist_only_where_the_arch_selects_them(arch: str, kernel: str) -> None:
    """HAVE_ARCH_USERFAULTFD_WP: x86_64 (5.7), arm64 (6.10); never ppc64 or s390x, whose pte
    formats have no uffd-wp bit. HAVE_ARCH_USERFAULTFD_MINOR: x86_64 and arm64."""
    m, k, mm, a, inode = shmem_world(arch, kernel, pages=4)
    ctx = m.userfaultfd(mm)
    page = k.page_size
    wp_ok = arch == "x86_64" or (arch == "arm64" and kernel == "6.13")
    minor_ok = arch in ("x86_64", "arm64")
    assert userfaultfd.have_arch_userfaultfd(k, "WP") == wp_ok
    for mode, ok in ((WP, wp_ok), (MINOR, minor_ok), (MISSING, True)):
        if ok:
            m.uffdio_register(ctx, a, 4 * page, mode)
            m.uffdio_unregister(ctx, a, 4 * page)
        else:
            with pytest.raises(OSError) as err:
                m.uffdio_register(ctx, a, 4 * page, mode)
            assert err.value.errno == 22 and mm.vma_lookup(a).uffd_ctx is None
    if not wp_ok:                         # and UFFDIO_WRITEPROTECT finds no WP range
        with pytest.raises(OSError) as err:
            m.uffdio_writeprotect(ctx, a, page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
        assert err.value.errno == 2
    m.exit_mm(mm)
    m.close_file(inode)


def test_fork_and_mremap_drop_the_registration() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", kernel="6.6", prefault=False)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, MISSING | WP)
    child = m.fork_mm(mm)
    assert all(v.uffd_ctx is None and not v.uffd_wp and not v.uffd_missing for v in child.vmas)
    new = m.mremap(mm, a, 4 * page, 4 * page, 1 | 2, BASE + 0x100000)   # MAYMOVE | FIXED
    v = mm.vma_lookup(new)
    assert v.uffd_ctx is None and not v.uffd_wp and not v.uffd_missing   # no UFFD_FEATURE_EVENT_REMAP
    m.exit_mm(child)
    m.exit_mm(mm)


def test_retract_page_tables_skips_a_vma_registered_for_wp_through_the_flag() -> None:
    """vma.uffd_wp, what retract_page_tables() tests, is the VM_UFFD_WP bit registration sets."""
    sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    ctx = m.userfaultfd(w.mms[0])
    m.uffdio_register(ctx, w.addr, huge_memory.hpage_pmd_size(k), WP)
    assert run_sync(khugepaged.retract_page_tables(k, w.inode.mapping, 0)) == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp)).kind is Kind.TABLE
    m.uffdio_unregister(ctx, w.addr, huge_memory.hpage_pmd_size(k))
    assert run_sync(khugepaged.retract_page_tables(k, w.inode.mapping, 0)) == 1
    w.extra["folio"].locked = False
    sc.close()


# -- the fault side ----------------------------------------------------------------------------

def anon_fault_world(kernel: str = "6.6", arch: str = "x86_64", pages: int = 4):
    sc = Scenario(arch=arch, kernel=kernel, mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * k.page_size, RW, ANON)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, pages * k.page_size, MISSING)
    return sc, m, k, mm, a, ctx


@pytest.mark.parametrize("arch", ARCHES)
def test_missing_fault_waits_until_uffdio_copy_wakes_it(arch: str) -> None:
    sc, m, k, mm, a, ctx = anon_fault_world(arch=arch)
    page = k.page_size
    va = a + page
    sc.task("fault", do_user_addr_fault(k, mm, va, Access.W))
    sc.run("fault:*", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and k.stats["uffd_fault_waits"] == 1
    [uwq] = ctx.fault_pending_wqh
    assert uwq.address == va and uwq.reason == VM_UFFD_MISSING
    assert mm.mmap_lock.readers == []                  # handle_userfault() dropped mmap_lock
    assert pte_of(k, mm, va).kind is Kind.NONE
    assert m.uffdio_copy(ctx, va, b"uffdcopy" * 4) == page
    raw = pte_of(k, mm, va, raw=True)
    ent = k.arch.decode(k.arch.pte_level, raw)
    assert ent.kind is Kind.LEAF and ent.prot & Access.W and raw == k.arch.encode(k.arch.pte_level, ent)
    assert not ctx.fault_pending_wqh and k.stats["uffd_woken"] == 1
    sc.run()
    assert sc.results["fault"] is FaultResult.OK and k.stats["fault_retry"] == 1
    assert m.read_user(mm, va, 8) == b"uffdcopy" and mm.rss[MM_ANONPAGES] == 1
    with pytest.raises(OSError) as err:
        m.uffdio_copy(ctx, va, b"x")
    assert err.value.errno == 17                       # EEXIST
    m.exit_mm(mm)
    sc.close()


def test_dontwake_leaves_the_fault_waiting_until_uffdio_wake() -> None:
    sc, m, k, mm, a, ctx = anon_fault_world()
    va = a + 2 * k.page_size
    sc.task("fault", do_user_addr_fault(k, mm, va, Access.R))
    sc.run("fault:*", finish=False)
    m.uffdio_copy(ctx, va, b"late", emu.UFFDIO_COPY_MODE_DONTWAKE)
    sc.run("", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and len(ctx.fault_pending_wqh) == 1
    m.uffdio_wake(ctx, va, k.page_size)
    sc.run()
    assert sc.results["fault"] is FaultResult.OK and m.read_user(mm, va, 4) == b"late"
    m.exit_mm(mm)
    sc.close()


def test_sigbus_feature_and_faults_that_may_not_retry_get_sigbus() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", kernel="6.6", prefault=False)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    ctx = m.userfaultfd(mm, emu.UFFD_FEATURE_SIGBUS)
    m.uffdio_register(ctx, a, 2 * page, MISSING)
    assert run_sync(do_user_addr_fault(m.kernel, mm, a, Access.R)) is FaultResult.SIGBUS
    assert not ctx.fault_pending_wqh and m.kernel.stats["handle_userfault_missing"] == 1
    m.exit_mm(mm)


def must_wait_task(k, ctx, mm, addr: int, reason: int):
    async def body():
        await mmap_read_lock(mm)
        try:
            return await userfaultfd.userfaultfd_must_wait(k, ctx, addr, 0, reason)
        finally:
            await mmap_read_unlock(mm)
    return body()


@pytest.mark.parametrize("arch", ARCHES)
def test_must_wait_retries_a_map_that_failed_because_the_table_was_retracted(arch: str) -> None:
    """userfaultfd_must_wait() read the pmd (a table), retract_page_tables() cleared it, the
    pte_offset_map() fails: `goto again` reads the pmd again (RETRY), finds it none: wait."""
    sc = Scenario(arch=arch, kernel="6.6", mem="16M", prefault=False)
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    ctx = m.userfaultfd(w.mms[0])
    sc.task("uffd", must_wait_task(k, ctx, w.mms[0], w.addr + 3 * k.page_size, VM_UFFD_MISSING))
    sc.task("retract", collapse_file_tail(k, w))
    upper = k.arch.pmd_level                      # walk_to_pmd() reads one entry per upper level
    sc.run(f"uffd:pt_read#{upper + 1} retract:* rcu_gp:* uffd:*")
    assert sc.results["uffd"] is True and k.stats["uffd_must_wait_retry"] == 1
    assert k.stats["retracted_tables"] == 1
    sc.close()


def test_must_wait_retry_then_sees_the_thp_the_refault_mapped() -> None:
    """TABLE -> NONE -> HUGE under the walk (spec §6 case 5): after the retry a PMD-mapped
    page resolves a MISSING fault (no wait), and a WP fault unless the pmd is read-only."""
    for prot, reason, expect in ((RW, VM_UFFD_MISSING, False), (RW, VM_UFFD_WP, False),
                                 (emu.PROT_READ, VM_UFFD_MISSING, False), (emu.PROT_READ, VM_UFFD_WP, True)):
        sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
        w = collapsed_shmem(sc)
        m, k = sc.machine, sc.kernel
        m.mprotect(w.mms[0], w.addr, huge_memory.hpage_pmd_size(k), prot)
        ctx = m.userfaultfd(w.mms[0])
        sc.task("uffd", must_wait_task(k, ctx, w.mms[0], w.addr + 3 * k.page_size, reason))
        sc.task("retract", collapse_file_tail(k, w))
        sc.task("refault", huge_refault(k, w))
        sc.run(f"uffd:pt_read#{k.arch.pmd_level + 1} retract:* refault:* rcu_gp:* uffd:*")
        assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp)).kind is Kind.LEAF
        assert sc.results["uffd"] is expect and k.stats["uffd_must_wait_retry"] == 1
        sc.close()


@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_must_wait_answers_from_the_ptes(arch: str, kernel: str) -> None:
    m, k, mm, a, inode = shmem_world(arch, kernel, pages=8, fill=2)
    page = k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, MISSING | WP)
    m.touch(mm, a, write=True)                                       # present, writable? (uffd-wp VMA:
    m.touch(mm, a + page, write=False)                               # the write fault makes it so)

    def ask(va: int, reason: int) -> bool:
        return run_sync(userfaultfd.userfaultfd_must_wait(k, ctx, va, 0, reason))

    assert ask(a + 5 * page, VM_UFFD_MISSING) is True                # none pte
    assert ask(a + 64 * page, VM_UFFD_MISSING) is True               # no table at all... same pmd
    assert ask(a, VM_UFFD_MISSING) is False and ask(a, VM_UFFD_WP) is False
    assert ask(a + page, VM_UFFD_MISSING) is False and ask(a + page, VM_UFFD_WP) is True   # read-only
    m.uffdio_writeprotect(ctx, a + 4 * page, page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert userfaultfd.pte_none_mostly(pte_of(k, mm, a + 4 * page)) and ask(a + 4 * page, VM_UFFD_MISSING)
    m.exit_mm(mm)
    m.close_file(inode)


# -- UFFDIO_WRITEPROTECT -----------------------------------------------------------------------

@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_writeprotect_sets_the_arch_uffd_wp_bit_and_markers_in_shmem(arch: str, kernel: str) -> None:
    m, k, mm, a, inode = shmem_world(arch, kernel, pages=8, fill=4)
    page, level = k.page_size, k.arch.pte_level
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, WP)
    pa = m.touch(mm, a, write=True)                                  # present and dirty
    assert m.translate(mm, a, "w") is not None                       # wp_page_shared() upgraded it
    m.uffdio_writeprotect(ctx, a, 4 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    raw = pte_of(k, mm, a, raw=True)
    ent = k.arch.decode(level, raw)
    assert ent.kind is Kind.LEAF and ent.uffd_wp and not ent.prot & Access.W and ent.paddr == pa & ~(page - 1)
    assert raw == k.arch.encode(level, ent)
    # the arch's own bit: x86 _PAGE_UFFD_WP (bit 10), arm64 PTE_UFFD_WP (bit 58)
    assert raw & (1 << {"x86_64": 10, "arm64": 58}[arch])
    assert m.translate(mm, a, "w") is None and m.translate(mm, a, "r") is not None
    marker = k.arch.encode(level, swap_entry(SWP_PTE_MARKER, PTE_MARKER_UFFD_WP))
    for i in (1, 2, 3):                                             # none ptes of shmem: markers
        assert pte_of(k, mm, a + i * page, raw=True) == marker
        assert not m.translate(mm, a + i * page, "r")
    assert pte_of(k, mm, a + 4 * page, raw=True) == k.arch.empty_value(level)     # outside the range
    m.uffdio_writeprotect(ctx, a, 4 * page, 0)                      # un-protect
    ent = pte_of(k, mm, a)
    assert not ent.uffd_wp and ent.prot & Access.W                  # dirty shared: write back
    for i in (1, 2, 3):
        assert pte_of(k, mm, a + i * page, raw=True) == k.arch.empty_value(level)
    m.exit_mm(mm)
    m.close_file(inode)


@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_writeprotect_populates_a_table_for_markers_where_there_is_none(arch: str, kernel: str) -> None:
    m, k, mm, a, inode = shmem_world(arch, kernel, pages=8)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * k.page_size, WP)
    assert pte_of(k, mm, a, raw=True) is None
    m.uffdio_writeprotect(ctx, a + k.page_size, k.page_size, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert userfaultfd.pte_none_mostly(pte_of(k, mm, a + k.page_size))
    assert pte_of(k, mm, a + k.page_size).kind is Kind.SWAP
    m.exit_mm(mm)
    m.close_file(inode)


@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_anon_wp_has_no_markers_and_the_wp_fault_waits_for_unprotect(arch: str, kernel: str) -> None:
    sc = Scenario(arch=arch, kernel=kernel, mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    pa = m.touch(mm, a, write=True)
    m.physmem[pa:pa + 4] = b"wp!!"
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, WP)
    m.uffdio_writeprotect(ctx, a, 4 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert pte_of(k, mm, a).uffd_wp
    assert pte_of(k, mm, a + page, raw=True) == k.arch.empty_value(k.arch.pte_level)
    sc.task("writer", do_user_addr_fault(k, mm, a, Access.W))
    sc.run("writer:*", finish=False)
    assert sc.state("writer") is TaskState.BLOCKED
    assert ctx.fault_pending_wqh[0].reason == VM_UFFD_WP and k.stats["handle_userfault_wp"] == 1
    m.uffdio_writeprotect(ctx, a, page, 0)                          # resolve: wakes the writer
    sc.run()
    assert sc.results["writer"] is FaultResult.OK and m.translate(mm, a, "w") == pa
    assert k.stats["wp_copy"] == 0                                  # the same page, written in place
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_write_to_a_marker_maps_the_page_read_only_then_goes_to_the_uffd(arch: str, kernel: str) -> None:
    """handle_pte_marker() -> do_pte_missing(): the shmem page is mapped read-only with the
    uffd-wp bit (FAULT_FLAG_ORIG_PTE_VALID), the retried write goes to handle_userfault()."""
    m, k, mm, a, inode = shmem_world(arch, kernel, pages=8, fill=4)
    page = k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, WP)
    m.uffdio_writeprotect(ctx, a, 4 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    from mm_core.memory import (
        FAULT_FLAG_ALLOW_RETRY,
        FAULT_FLAG_RETRY_NOWAIT,
        FAULT_FLAG_USER,
        FAULT_FLAG_WRITE,
        VM_FAULT_RETRY,
        handle_mm_fault,
    )
    flags = FAULT_FLAG_WRITE | FAULT_FLAG_USER | FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_RETRY_NOWAIT

    async def fault(va):
        await mmap_read_lock(mm)
        try:
            return await handle_mm_fault(k, mm.vma_lookup(va), va, flags)
        finally:
            await mmap_read_unlock(mm)

    va = a + 2 * page
    assert run_sync(fault(va)) == 0
    ent = pte_of(k, mm, va)
    assert ent.kind is Kind.LEAF and ent.uffd_wp and not ent.prot & Access.W
    assert m.read_user(mm, va, 8) == b"file0002" and mm.rss[MM_SHMEMPAGES] == 1
    assert run_sync(fault(va)) & VM_FAULT_RETRY and k.stats["handle_userfault_wp"] == 1
    assert m.translate(mm, va, "w") is None
    m.exit_mm(mm)
    m.close_file(inode)


# -- UFFDIO_ZEROPAGE / UFFDIO_CONTINUE ----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_zeropage_maps_the_zero_page_and_refuses_a_present_pte(arch: str) -> None:
    sc, m, k, mm, a, ctx = anon_fault_world(arch=arch)
    page = k.page_size
    assert m.uffdio_zeropage(ctx, a, 2 * page) == 2 * page
    for va in (a, a + page):
        ent = pte_of(k, mm, va)
        assert ent.kind is Kind.LEAF and ent.paddr == k.zero_page.paddr and ent.special
        assert not ent.prot & Access.W and m.read_user(mm, va, 16) == bytes(16)
    assert mm.rss[MM_ANONPAGES] == 0
    with pytest.raises(OSError) as err:
        m.uffdio_zeropage(ctx, a + page, page)
    assert err.value.errno == 17
    m.touch(mm, a, write=True)                                      # COW from the zero page
    assert pte_of(k, mm, a).paddr != k.zero_page.paddr
    m.exit_mm(mm)
    sc.close()


def test_zeropage_on_shared_shmem_fills_the_page_cache() -> None:
    m, k, mm, a, inode = shmem_world("x86_64", "6.6", pages=4)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * k.page_size, MISSING)
    assert m.uffdio_zeropage(ctx, a + k.page_size, k.page_size) == k.page_size
    folio = inode.mapping.i_pages[1]
    ent = pte_of(k, mm, a + k.page_size)
    assert ent.paddr == folio.paddr and ent.prot & Access.W and mm.rss[MM_SHMEMPAGES] == 1
    m.exit_mm(mm)
    m.close_file(inode)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_minor_fault_waits_until_uffdio_continue_maps_the_page_cache_page(arch: str) -> None:
    sc = Scenario(arch=arch, kernel="6.6", mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    inode = m.memfd_create("minor", 8 * page)
    writer = m.new_mm()
    w = m.mmap(writer, BASE, 8 * page, RW, SHARED, file=inode)
    write(m, writer, w + 2 * page, b"cached-2")
    write(m, writer, w + 3 * page, b"cached!!")
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, SHARED, file=inode)
    ctx = m.userfaultfd(mm)
    assert m.uffdio_register(ctx, a, 8 * page, MINOR) & (1 << userfaultfd._UFFDIO_CONTINUE)
    assert mm.vma_lookup(a).flags & VM_UFFD_MINOR
    sc.task("fault", do_user_addr_fault(k, mm, a + 3 * page, Access.R))
    sc.run("fault:*", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and ctx.fault_pending_wqh[0].reason == VM_UFFD_MINOR
    assert m.translate(mm, a + 2 * page) is None                    # cached, but no fault-around with MINOR
    with pytest.raises(OSError) as err:
        m.uffdio_continue(ctx, a + 5 * page, page)                  # a hole: nothing to continue
    assert err.value.errno == 14
    assert m.uffdio_continue(ctx, a + 3 * page, page) == page
    folio = inode.mapping.i_pages[3]
    ent = pte_of(k, mm, a + 3 * page)
    assert ent.kind is Kind.LEAF and ent.paddr == folio.paddr and ent.prot & Access.W
    assert folio.mapcount == 2 and mm.rss[MM_SHMEMPAGES] == 1
    sc.run()
    assert sc.results["fault"] is FaultResult.OK and m.read_user(mm, a + 3 * page, 8) == b"cached!!"
    m.exit_mm(mm)
    m.exit_mm(writer)
    m.close_file(inode)
    sc.close()


def test_continue_gets_eagain_when_retract_takes_the_table_after_the_pmd_check() -> None:
    """mfill_atomic() saw a table in the pmd; retract_page_tables() (no mmap_lock) clears it;
    mfill_atomic_install_pte()'s pte_offset_map_lock() fails: -EAGAIN to the caller, who
    retries, and the retry maps the page into a new table."""
    sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm, page = w.mms[0], k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, w.addr, huge_memory.hpage_pmd_size(k), MINOR)
    va = w.addr + 6 * page
    sc.task("uffd", userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_CONTINUE, va, page, 0))
    sc.task("retract", collapse_file_tail(k, w))
    # mmap_read_lock, the upper levels, then the pmd twice (the second read is the strict check)
    sc.run(f"uffd:pt_read#{k.arch.pmd_level + 2} retract:* rcu_gp:* uffd:*")
    assert sc.results["uffd"] == -userfaultfd.EAGAIN and k.stats["mfill_eagain"] == 1
    assert pte_of(k, mm, va, raw=True) is None
    assert m.uffdio_continue(ctx, va, page) == page                 # the caller's retry
    assert m.read_user(mm, va, 8) == (7).to_bytes(8, "little")         # file_data(): page 6 of the file
    assert pte_of(k, mm, va).paddr == w.extra["folio"].paddr + 6 * page
    m.exit_mm(mm)
    sc.close()


def test_zeropage_gets_eagain_when_pt_reclaim_frees_the_table_after_the_pmd_check() -> None:
    """6.14: MADV_DONTNEED of a whole PMD extent frees the emptied table (PT_RECLAIM, under
    mmap_read_lock like UFFDIO_ZEROPAGE): the install's map fails, -EAGAIN."""
    sc, m, k, mm, a, ctx = anon_fault_world(kernel="6.14", pages=1024)
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    ext = (a + size - 1) & ~(size - 1)
    m.uffdio_zeropage(ctx, ext + page, page)                       # the table's only pte
    va = ext + 5 * page
    sc.task("uffd", userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_ZEROPAGE, va, page, 0))
    sc.task("dontneed", madvise.madvise_dontneed(k, mm, ext, ext + size))
    sc.run(f"uffd:pt_read#{k.arch.pmd_level + 2} dontneed:* rcu_gp:* uffd:*")
    assert k.stats["pt_reclaimed"] == 1
    assert sc.results["uffd"] == -userfaultfd.EAGAIN and k.stats["mfill_eagain"] == 1
    assert m.uffdio_zeropage(ctx, va, page) == page
    assert pte_of(k, mm, va).paddr == k.zero_page.paddr
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_walkers_take_a_marker_for_a_none_pte(arch: str, kernel: str) -> None:
    """mincore (pte_none_mostly: ask the page cache) and fork (copy_pte_marker(): a uffd-wp
    marker only into a uffd-wp VMA, which the child's is not) over uffd-wp markers."""
    m, k, mm, a, inode = shmem_world(arch, kernel, pages=8, fill=4)
    page = k.page_size
    private = m.mmap(mm, BASE + 0x200000, 8 * page, RW, emu.MAP_PRIVATE | emu.MAP_FIXED, file=inode)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, WP)
    m.uffdio_register(ctx, private, 8 * page, WP)
    m.uffdio_writeprotect(ctx, a, 8 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    m.uffdio_writeprotect(ctx, private, 8 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert m.mincore(mm, a, 8 * page) == [1, 1, 1, 1, 0, 0, 0, 0]
    m.touch(mm, private, write=False)                              # a marker refaulted: read-only
    run_sync(do_user_addr_fault(k, mm, private + page, Access.R))
    assert pte_of(k, mm, private + page).uffd_wp
    mm.vma_lookup(private).anon_vma = rmap.anon_vma_prepare(k, mm.vma_lookup(private))   # copied at fork
    child = m.fork_mm(mm)
    assert pte_of(k, mm, private + 2 * page).kind is Kind.SWAP     # the parent keeps its markers
    assert pte_of(k, child, private + 2 * page, raw=True) == k.arch.empty_value(k.arch.pte_level)
    assert not pte_of(k, child, private + page).uffd_wp           # pte_clear_uffd_wp() for the child
    m.exit_mm(child)
    m.exit_mm(mm)
    m.close_file(inode)


def test_writeprotect_retries_a_pmd_whose_table_pt_reclaim_freed() -> None:
    """change_pmd_range() saw a table; MADV_DONTNEED + PT_RECLAIM (6.14, mmap_read_lock like
    UFFDIO_WRITEPROTECT) freed it; change_pte_range()'s map fails: -EAGAIN, `goto again`
    (RETRY) reads the pmd again and finds it none (nothing left to protect)."""
    sc, m, k, mm, a, ctx = anon_fault_world(kernel="6.14", pages=1024)
    m.uffdio_register(ctx, a, 1024 * k.page_size, WP)
    size = huge_memory.hpage_pmd_size(k)
    m.touch(mm, a + 3 * k.page_size, write=True)
    sc.task("wp", userfaultfd.userfaultfd_writeprotect(k, ctx, a, size, emu.UFFDIO_WRITEPROTECT_MODE_WP))
    sc.task("dontneed", madvise.madvise_dontneed(k, mm, a, a + size))
    sc.run(f"wp:pt_read#{k.arch.pmd_level + 1} dontneed:* rcu_gp:* wp:*")
    assert sc.results["wp"] == 0 and k.stats["pt_reclaimed"] == 1 and k.stats["change_pmd_retry"] == 1
    assert pte_of(k, mm, a + 3 * k.page_size, raw=True) is None
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize("arch, kernel", WP_WORLDS)
def test_writeprotect_of_an_anon_thp_and_its_write_fault(arch: str, kernel: str) -> None:
    """change_huge_pmd(MM_CP_UFFD_WP) on a whole anon THP: the pmd's uffd-wp bit, read-only;
    a write reaches handle_userfault(VM_UFFD_WP) (userfaultfd_huge_pmd_wp()); un-protect
    gives the exclusive dirty THP its write permission back."""
    from mm_core.memory import (
        FAULT_FLAG_ALLOW_RETRY,
        FAULT_FLAG_RETRY_NOWAIT,
        FAULT_FLAG_USER,
        FAULT_FLAG_WRITE,
        VM_FAULT_RETRY,
        handle_mm_fault,
    )
    m = emu.Machine(arch=arch, mem="32M", kernel=kernel, prefault=False)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, size, WP)
    m.uffdio_writeprotect(ctx, a, size, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    raw = k.physmem.read_entry(pmdp)
    pmd = k.arch.decode(k.arch.pmd_level, raw)
    assert pmd.kind is Kind.LEAF and pmd.uffd_wp and not pmd.prot & Access.W
    assert raw & (1 << {"x86_64": 10, "arm64": 58}[arch])
    assert m.translate(mm, a + 5 * k.page_size, "w") is None

    async def write_fault():
        await mmap_read_lock(mm)
        try:
            return await handle_mm_fault(k, mm.vma_lookup(a), a + 5 * k.page_size,
                                         FAULT_FLAG_WRITE | FAULT_FLAG_USER | FAULT_FLAG_ALLOW_RETRY
                                         | FAULT_FLAG_RETRY_NOWAIT)
        finally:
            await mmap_read_unlock(mm)

    assert run_sync(write_fault()) & VM_FAULT_RETRY and k.stats["handle_userfault_wp"] == 1
    m.uffdio_writeprotect(ctx, a, size, 0)
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.LEAF and not pmd.uffd_wp and pmd.prot & Access.W
    m.exit_mm(mm)


@pytest.mark.parametrize("bug", [False, True])
def test_case_9_wp_registered_between_retracts_precheck_and_its_locks(bug: bool) -> None:
    """spec §6 case 9 by hand: retract_page_tables() passed its unlocked userfaultfd_wp()
    test and is about to take pml; UFFDIO_REGISTER(WP) (mmap_write_lock, which retract does
    not hold) and UFFDIO_WRITEPROTECT (markers under the ptl) run; retract goes on. Its
    recheck under pml + ptl skips the VMA and the markers stay; without it the table goes
    and a write to a protected page is mapped writable by the huge refault."""
    from emu.scenarios import SCENARIOS
    from mm_core.sanitizers import Finding
    sc = Scenario(arch="x86_64", kernel="6.6", mem="8M", prefault=False)
    if bug:
        sc.kernel.bugs["retract_without_uffd_wp_recheck"] = True
    w = SCENARIOS["retract-vs-uffd-wp-register"].build(sc)
    k, mm = sc.kernel, w.mms[0]
    sc.run(f"retract:pt_read#{k.arch.pmd_level + 1} uffd:*", finish=False)
    assert sc.state("uffd") is TaskState.BLOCKED                    # waits for the retract to end
    marker = k.arch.encode(k.arch.pte_level, swap_entry(SWP_PTE_MARKER, PTE_MARKER_UFFD_WP))
    assert [pte_of(k, mm, w.addr + i * k.page_size, raw=True) for i in range(4, 8)] == [marker] * 4
    if not bug:
        sc.run("retract:* uffd:*")
        assert sc.results == {"retract": 0, "uffd": "protected"}
        assert pte_of(k, mm, w.addr + 6 * k.page_size, raw=True) == marker
        assert pte_of(k, mm, w.addr + 5 * k.page_size).uffd_wp      # refaulted read-only, uffd-wp
    else:
        with pytest.raises(Finding) as found:
            sc.run("retract:* uffd:*")
        assert found.value.signature == "ORACLE:uffd-wp-lost" and k.stats["retracted_tables"] == 1
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_a_reader_sleeping_on_fd_wqh_gets_the_wp_fault_once_and_the_unprotect_wakes_it(arch: str,
                                                                                       kernel: str) -> None:
    """userfaultfd_ctx_read(): the reader sleeps on fd_wqh until handle_userfault() queues
    the fault on fault_pending_wqh, takes it (uffd_msg flags WRITE | WP) and refiles it to
    fault_wqh; a second read has nothing (-EAGAIN); UFFDIO_WRITEPROTECT un-protect wakes
    the fault from fault_wqh and the retried write succeeds."""
    sc = Scenario(arch=arch, kernel=kernel, mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    page = k.page_size
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    m.touch(mm, a, write=True)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 2 * page, WP)
    m.uffdio_writeprotect(ctx, a, page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    sc.task("reader", userfaultfd.userfaultfd_ctx_read(k, ctx, False))
    sc.run("reader:*", finish=False)
    assert sc.state("reader") is TaskState.BLOCKED                    # nothing pending: fd_wqh
    sc.task("fault", do_user_addr_fault(k, mm, a + 8, Access.W))
    sc.run("fault:*", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and k.stats["handle_userfault_wp"] == 1
    sc.run("reader:*", finish=False)
    uwq = sc.results["reader"]
    assert isinstance(uwq, userfaultfd.UffdWaitQueue) and ctx.fault_wqh == [uwq] and not ctx.fault_pending_wqh
    msg = userfaultfd.uffd_msg_pagefault(ctx, uwq, page, k.arch.big_endian)
    assert msg[0] == userfaultfd.UFFD_EVENT_PAGEFAULT and len(msg) == userfaultfd.UFFD_MSG_SIZE
    flags, address = int.from_bytes(msg[8:16], "little"), int.from_bytes(msg[16:24], "little")
    assert address == a
    assert flags == userfaultfd.UFFD_PAGEFAULT_FLAG_WRITE | userfaultfd.UFFD_PAGEFAULT_FLAG_WP
    assert run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True)) == -userfaultfd.EAGAIN
    m.uffdio_writeprotect(ctx, a, page, 0)                            # un-protect and wake
    assert uwq.waken and not ctx.fault_wqh
    sc.run()
    assert sc.results["fault"] is FaultResult.OK and m.translate(mm, a, "w") is not None
    m.exit_mm(mm)
    sc.close()
