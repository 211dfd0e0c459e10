"""UFFDIO_POISON (6.6, "mm: userfaultfd: add new UFFDIO_POISON ioctl", Axel Rasmussen) and
UFFDIO_CONTINUE on a hwpoisoned shmem page (-EIO). The ioctl puts PTE_MARKER_POISONED in
none ptes (mfill_atomic_pte_poison(): -EAGAIN on a failed map, -EEXIST on anything but
pte_none(), a uffd-wp marker included); the fault on it is handle_pte_marker()'s
VM_FAULT_HWPOISON (SIGBUS) with no userfault; zap drops it without rss accounting, fork
copies it (copy_pte_marker()), pagemap shows it as a swap entry of type SWP_PTE_MARKER.
Every check reads the page-table bytes in guest RAM."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import SWP_PTE_MARKER, Access, Kind
from emu.scenario import Scenario
from emu.scenarios import collapse_file_tail, collapsed_shmem
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import huge_memory, task_mmu, userfaultfd
from mm_core.memory import FaultResult, do_user_addr_fault
from mm_core.mm import MM_ANONPAGES, MM_SHMEMPAGES, MM_SWAPENTS
from mm_core.swapops import PTE_MARKER_POISONED, PTE_MARKER_UFFD_WP, is_pte_marker, pte_marker_get

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
SHARED = emu.MAP_SHARED | emu.MAP_FIXED
BASE = 0x40000000
MISSING, WP, MINOR = (emu.UFFDIO_REGISTER_MODE_MISSING, emu.UFFDIO_REGISTER_MODE_WP,
                      emu.UFFDIO_REGISTER_MODE_MINOR)
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
EEXIST, EAGAIN, EINVAL, EFAULT, EIO = 17, 11, 22, 14, 5




def is_poisoned(k, mm, va: int) -> bool:
    ent = pte_of(k, mm, va)
    return ent is not None and is_pte_marker(ent) and pte_marker_get(ent) == PTE_MARKER_POISONED


def errno_of(call) -> int:
    with pytest.raises(OSError) as err:
        call()
    return err.value.errno


def anon_world(arch: str = "x86_64", kernel: str = "6.6", pages: int = 8):
    m = emu.Machine(arch=arch, mem="16M", kernel=kernel, prefault=False)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * m.kernel.page_size, RW, ANON)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, pages * m.kernel.page_size, MISSING)
    return m, m.kernel, mm, a, ctx


def shmem_world(arch: str = "x86_64", kernel: str = "6.6", pages: int = 8, fill: int = 4):
    """A shared mapping of a shmem file whose first ``fill`` pages are in the page cache,
    written through a second mm (so this one maps none of them)."""
    m = emu.Machine(arch=arch, mem="32M", kernel=kernel, prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("poison", pages * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * page, RW, SHARED, file=inode)
    writer = m.new_mm()
    w = m.mmap(writer, BASE, pages * page, RW, SHARED, file=inode)
    for i in range(fill):
        pa = m.touch(writer, w + i * page, write=True)
        m.physmem[pa:pa + 8] = b"file%04d" % i
    m.exit_mm(writer)
    return m, k, mm, a, inode


# -- UFFDIO_API / UFFDIO_REGISTER --------------------------------------------------------------

@pytest.mark.parametrize("kernel, offered", [("6.5", False), ("6.6", True), ("6.8", True)])
def test_poison_is_offered_and_works_from_6_6_only(kernel: str, offered: bool) -> None:
    from emu.linux.uffd import uffd_api_features
    m, k, mm, a, ctx = anon_world(kernel=kernel)
    assert bool(uffd_api_features(k) & emu.UFFD_FEATURE_POISON) == offered
    for mode in (MISSING, MISSING | WP):                              # every mode (UFFD_API_RANGE_IOCTLS)
        ioctls = m.uffdio_register(ctx, a, 8 * k.page_size, mode)
        assert bool(ioctls & (1 << userfaultfd._UFFDIO_POISON)) == offered
    if offered:
        assert m.uffdio_poison(ctx, a, k.page_size) == k.page_size  # UFFD_FEATURE_POISON not asked for
        assert is_poisoned(k, mm, a)
    else:
        assert errno_of(lambda: m.uffdio_poison(ctx, a, k.page_size)) == EINVAL   # unknown command
        assert pte_of(k, mm, a) is None
        with pytest.raises(OSError):
            m.userfaultfd(mm, emu.UFFD_FEATURE_POISON)
    m.exit_mm(mm)


# -- the marker, the fault, the walkers -----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_poison_marks_none_ptes_and_an_access_gets_sigbus_without_a_userfault(arch: str) -> None:
    m, k, mm, a, ctx = anon_world(arch=arch)
    page = k.page_size
    m.uffdio_copy(ctx, a, b"present!")
    assert m.uffdio_poison(ctx, a + page, 2 * page) == 2 * page
    for va in (a + page, a + 2 * page):
        ent = pte_of(k, mm, va)
        assert ent.kind is Kind.SWAP and ent.swp_type == SWP_PTE_MARKER and is_poisoned(k, mm, va)
    assert pte_of(k, mm, a + 3 * page).kind is Kind.NONE
    assert mm.rss[MM_ANONPAGES] == 1 and mm.rss[MM_SWAPENTS] == 0        # a marker is no page
    assert m.mincore(mm, a, 4 * page) == [1, 0, 0, 0]                 # pte_none_mostly(): anon hole
    for write in (False, True):
        with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
            m.touch(mm, a + page, write=write)
    assert k.stats["fault_poison_marker"] == 2 and k.stats["handle_userfault_missing"] == 0
    assert not ctx.fault_pending_wqh
    # pte_none() only: a present pte, or a poisoned marker, is -EEXIST; the run stops there
    assert errno_of(lambda: m.uffdio_poison(ctx, a, page)) == EEXIST
    assert errno_of(lambda: m.uffdio_poison(ctx, a + page, page)) == EEXIST
    assert m.uffdio_poison(ctx, a + 3 * page, 2 * page) == 2 * page
    assert m.uffdio_poison(ctx, a + 5 * page, 2 * page, emu.UFFDIO_POISON_MODE_DONTWAKE) == 2 * page
    assert errno_of(lambda: m.uffdio_poison(ctx, a + 7 * page, page, 2)) == EINVAL     # unknown mode
    assert errno_of(lambda: m.uffdio_poison(ctx, a + 1, page)) == EINVAL
    # ZEROPAGE wants pte_none(): -EEXIST; COPY's mfill_atomic_install_pte() takes any marker
    # for none (pte_none_mostly(), 6.6: "We allow to overwrite a pte marker"): unpoisoned
    assert errno_of(lambda: m.uffdio_zeropage(ctx, a + page, page)) == EEXIST
    assert m.uffdio_copy(ctx, a + page, b"copied!!") == page
    assert m.read_user(mm, a + page, 8) == b"copied!!" and mm.rss[MM_ANONPAGES] == 2
    m.munmap(mm, a, 8 * page)                                          # zap drops them: no rss
    m.exit_mm(mm)                                                      # check_mm() passes


def test_poison_refuses_a_uffd_wp_marker_and_over_eof_is_efault() -> None:
    """mfill_atomic_pte_poison(): "Refuse to overwrite any PTE, even a PTE marker (e.g. UFFD
    WP)"; mfill_file_over_size() under the ptl: -EFAULT past i_size."""
    m, k, mm, a, inode = shmem_world(pages=8, fill=0)
    page = k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, MISSING | WP)
    m.uffdio_writeprotect(ctx, a, page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    ent = pte_of(k, mm, a)
    assert is_pte_marker(ent) and pte_marker_get(ent) == PTE_MARKER_UFFD_WP
    assert errno_of(lambda: m.uffdio_poison(ctx, a, page)) == EEXIST
    assert pte_marker_get(pte_of(k, mm, a)) == PTE_MARKER_UFFD_WP
    run_sync(_truncate(m, inode, 4 * page))
    assert errno_of(lambda: m.uffdio_poison(ctx, a + 5 * page, page)) == EFAULT
    assert pte_of(k, mm, a + 5 * page).kind is Kind.NONE
    assert m.uffdio_poison(ctx, a + page, page) == page
    m.exit_mm(mm)
    m.close_file(inode)


async def _truncate(m, inode, size: int) -> None:
    from mm_core import shmem
    await shmem.shmem_setattr_size(m.kernel, inode, size)


def test_poison_on_shmem_hides_the_page_cache_page_until_dontneed_drops_the_marker() -> None:
    """A poisoned marker in front of a page-cache page: the fault never looks at the cache
    (SIGBUS); mincore asks the page cache (pte_none_mostly): resident; pagemap: a swap
    entry of type SWP_PTE_MARKER, offset PTE_MARKER_POISONED, no PM_PRESENT / PM_UFFD_WP;
    MADV_DONTNEED (zap with NULL details: should_zap_cows()) drops it, and the next fault
    maps the cached page."""
    m, k, mm, a, inode = shmem_world(pages=8, fill=4)
    page = k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, MISSING)
    assert m.uffdio_poison(ctx, a, 2 * page) == 2 * page
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(mm, a)
    assert m.mincore(mm, a, 4 * page) == [1, 1, 1, 1]
    pme = m.pagemap(mm, a, a + 2 * page)
    shift = task_mmu.MAX_SWAPFILES_SHIFT
    for e in pme:
        assert e & task_mmu.PM_SWAP and not e & (task_mmu.PM_PRESENT | task_mmu.PM_UFFD_WP | task_mmu.PM_FILE)
        assert e & task_mmu.PM_PFRAME_MASK == SWP_PTE_MARKER | (PTE_MARKER_POISONED << shift)
    m.madvise(mm, a, page, 4)                                           # MADV_DONTNEED
    assert pte_of(k, mm, a).kind is Kind.NONE and is_poisoned(k, mm, a + page)
    assert m.read_user(mm, a, 1) == b""
    m.touch(mm, a)
    assert m.read_user(mm, a, 8) == b"file0000"
    # fault-around (filemap_map_pages) maps the cached pages at none ptes only: 0, 2, 3
    assert mm.rss[MM_SHMEMPAGES] == 3 and is_poisoned(k, mm, a + page)
    m.exit_mm(mm)
    m.close_file(inode)


def test_mprotect_keeps_the_marker_and_fork_copies_it_into_the_child() -> None:
    """change_pte_range() leaves poisoned markers alone; copy_nonpresent_pte() ->
    copy_pte_marker(): "Always copy error entries" (the private VMA has an anon_vma from
    mfill_atomic(), so vma_needs_copy()); the child's access is SIGBUS too."""
    m, k, mm, a, ctx = anon_world()
    page = k.page_size
    m.uffdio_poison(ctx, a + page, page)
    m.mprotect(mm, a, 8 * page, emu.PROT_READ)
    assert is_poisoned(k, mm, a + page)
    m.mprotect(mm, a, 8 * page, RW)
    child = m.fork_mm(mm)
    assert is_poisoned(k, child, a + page) and is_poisoned(k, mm, a + page)
    assert child.vma_lookup(a).uffd_ctx is None                         # registration not inherited
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(child, a + page)
    assert m.touch(child, a) is not None                                # no uffd: a fresh page
    m.exit_mm(child)
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(mm, a + page)
    m.exit_mm(mm)


# -- races ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "ppc64"])
def test_a_fault_waiting_in_handle_userfault_is_woken_by_poison_and_gets_sigbus(arch: str) -> None:
    sc = Scenario(arch=arch, kernel="6.6", mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    page = k.page_size
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, MISSING)
    va = a + 2 * page
    sc.task("fault", do_user_addr_fault(k, mm, va, Access.R))
    sc.run("fault:*", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and len(ctx.fault_pending_wqh) == 1
    assert m.uffdio_poison(ctx, va, page) == page
    assert not ctx.fault_pending_wqh and k.stats["uffd_woken"] == 1
    sc.run()
    assert sc.results["fault"] is FaultResult.SIGBUS
    assert k.stats["fault_retry"] == 1 and k.stats["fault_poison_marker"] == 1
    m.exit_mm(mm)
    sc.close()


def test_dontwake_poison_leaves_the_fault_asleep_until_uffdio_wake() -> None:
    sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    page = k.page_size
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, MISSING)
    sc.task("fault", do_user_addr_fault(k, mm, a, Access.W))
    sc.run("fault:*", finish=False)
    m.uffdio_poison(ctx, a, page, emu.UFFDIO_POISON_MODE_DONTWAKE)
    sc.run("", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and is_poisoned(k, mm, a)
    m.uffdio_wake(ctx, a, page)
    sc.run()
    assert sc.results["fault"] is FaultResult.SIGBUS
    m.exit_mm(mm)
    sc.close()


def test_a_fault_queued_after_the_poisons_wake_sleeps_on_the_marker_until_uffdio_wake() -> None:
    """The check-then-sleep window: the fault read a none pte and is in handle_userfault()
    but not yet queued when UFFDIO_POISON installs the marker and wakes the range (nobody
    there). It then queues and userfaultfd_must_wait() reads the marker: pte_none_mostly(),
    so it waits (6.6; a marker counts as none there). Only the handler's UFFDIO_WAKE after
    its own POISON's -EEXIST ends the wait; the retried fault meets the marker: SIGBUS."""
    sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    page = k.page_size
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, MISSING)
    m.uffdio_poison(ctx, a + 3 * page, page)                          # the PTE table exists
    sc.task("fault", do_user_addr_fault(k, mm, a, Access.R))
    sc.run("fault:21", finish=False)                                   # pte read, not yet queued
    assert sc.trace_of("fault")[-1] == "21: point rcu_read_unlock" and not ctx.fault_pending_wqh
    assert m.uffdio_poison(ctx, a, page) == page and k.stats["uffd_woken"] == 0
    sc.run("fault:*", finish=False)
    assert sc.state("fault") is TaskState.BLOCKED and len(ctx.fault_pending_wqh) == 1
    assert errno_of(lambda: m.uffdio_poison(ctx, a, page)) == EEXIST  # the handler's answer
    m.uffdio_wake(ctx, a, page)
    sc.run()
    assert sc.results["fault"] is FaultResult.SIGBUS and k.stats["fault_poison_marker"] == 1
    m.exit_mm(mm)
    sc.close()


def test_poison_gets_eagain_when_retract_takes_the_table_after_the_pmd_check() -> None:
    """mfill_atomic() saw a table in the pmd; retract_page_tables() (no mmap_lock) clears it
    and frees it by RCU; mfill_atomic_pte_poison()'s pte_offset_map_lock() fails: -EAGAIN
    to the caller (no retry inside mfill_atomic), who retries: the marker lands in a new
    table and the access is SIGBUS although the THP is in the page cache."""
    sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm, page = w.mms[0], k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, w.addr, huge_memory.hpage_pmd_size(k), MISSING)
    va = w.addr + 6 * page
    sc.task("uffd", userfaultfd.userfaultfd_poison(k, ctx, va, page, 0))
    sc.task("retract", collapse_file_tail(k, w))
    # mmap_read_lock, the upper levels, then the pmd twice (the second read is the strict check)
    sc.run(f"uffd:pt_read#{k.arch.pmd_level + 2} retract:* rcu_gp:* uffd:*")
    assert sc.results["uffd"] == -EAGAIN and k.stats["mfill_eagain"] == 1
    assert sc.results["retract"] == 1 and pte_of(k, mm, va) is None
    assert m.uffdio_poison(ctx, va, page) == page                       # the caller's retry
    assert is_poisoned(k, mm, va)
    with pytest.raises(emu.GuestAccessError, match="SIGBUS"):
        m.touch(mm, va)
    assert m.read_user(mm, va - page, 8) == b""                         # unmapped, not poisoned
    m.exit_mm(mm)
    sc.close()


def test_retract_after_poison_drops_the_marker_with_the_table() -> None:
    """The other order, as 6.6 reads: retract_page_tables() rechecks only anon_vma and
    userfaultfd_wp() under its locks, so a MINOR-registered shmem range (no anon_vma, no
    WP, the page cache full: collapse_file() has no hole to roll back for) loses the
    poisoned marker with its table; once unregistered, the access maps the THP's page
    instead of SIGBUS. (A WP-registered range is skipped: the marker stays.)"""
    sc = Scenario(arch="x86_64", kernel="6.6", mem="16M", prefault=False)
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm, page, size = w.mms[0], k.page_size, huge_memory.hpage_pmd_size(k)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, w.addr, size, MINOR)
    va = w.addr + 6 * page
    sc.task("uffd", userfaultfd.userfaultfd_poison(k, ctx, va, page, 0))
    sc.task("retract", collapse_file_tail(k, w))
    sc.run("uffd:* retract:* rcu_gp:*")
    assert sc.results == {"uffd": page, "retract": 1}
    assert pte_of(k, mm, va) is None                                     # the pmd is none
    m.uffdio_unregister(ctx, w.addr, size)
    m.touch(mm, va)
    assert m.read_user(mm, va, 8) == (7).to_bytes(8, "little")           # file_data(): page 6
    m.exit_mm(mm)
    sc.close()


def test_poison_is_eagain_while_mmap_changing() -> None:
    m, k, mm, a, ctx = anon_world()
    ctx.mmap_changing += 1                      # a REMOVE / UNMAP event not yet read
    assert errno_of(lambda: m.uffdio_poison(ctx, a, k.page_size)) == EAGAIN
    ctx.mmap_changing -= 1
    assert m.uffdio_poison(ctx, a, k.page_size) == k.page_size
    m.exit_mm(mm)


# -- UFFDIO_CONTINUE on a hwpoisoned shmem page ---------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_continue_on_a_hwpoisoned_shmem_page_is_eio(arch: str) -> None:
    """memory_failure() keeps a small shmem page in the page cache, poisoned;
    mfill_atomic_pte_continue() finds it, `if (PageHWPoison(page)) { ret = -EIO; goto
    out_release; }`: nothing mapped, the folio unlocked and its reference dropped; the
    next page of the file still maps."""
    m, k, mm, a, inode = shmem_world(arch=arch, pages=8, fill=4)
    page = k.page_size
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 8 * page, MINOR)
    folio = inode.mapping.i_pages[2]
    refs = folio.refcount
    assert m.memory_failure(folio.paddr >> k.page_shift, action_required=False) is None
    assert folio.extra.get("hwpoison") and inode.mapping.i_pages[2] is folio
    refs = folio.refcount                                              # + memory_failure()'s own
    assert errno_of(lambda: m.uffdio_continue(ctx, a + 2 * page, page)) == EIO
    assert pte_of(k, mm, a + 2 * page).kind is Kind.NONE
    assert folio.refcount == refs and not folio.locked and k.stats["uffdio_continue_hwpoison"] == 1
    # a range running into the poisoned page maps what comes before it (a short count)
    assert m.uffdio_continue(ctx, a + page, 2 * page) == page
    assert m.read_user(mm, a + page, 8) == b"file0001"
    assert m.uffdio_continue(ctx, a + 3 * page, page) == page
    assert m.read_user(mm, a + 3 * page, 8) == b"file0003"
    m.exit_mm(mm)
    m.close_file(inode)
