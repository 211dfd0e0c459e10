"""The non-cooperative userfaultfd events of fork and mremap (6.6 fs/userfaultfd.c,
kernel/fork.c, mm/mremap.c, mm/mmap.c): UFFD_EVENT_FORK (dup_userfaultfd() under
dup_mmap()'s locks, dup_userfaultfd_complete() after them: the forker waits for the
handler's read(), which makes an fd for the child's new context), UFFD_EVENT_REMAP
(mremap_userfaultfd_prep() after the page tables moved, mremap_userfaultfd_complete()
after mmap_write_unlock()), and the UNMAP events of mmap(MAP_FIXED) and mremap. While an
event is pending ctx->mmap_changing makes UFFDIO_COPY -EAGAIN. Hand-written schedules."""
from __future__ import annotations

import struct

import pytest
from conftest import pte_of
from test_uffd_events import world
from test_uffd_syscalls import _call, _nr, _put, _sc

import emu
from emu.arch import Access, Kind
from emu.linux import uffd as guest_uffd
from emu.linux.uaccess import copy_from_user
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import fork, madvise, mmap, mremap, userfaultfd
from mm_core.memory import FaultResult, do_user_addr_fault
from mm_core.mm import VM_UFFD_MISSING, VM_UFFD_WP
from tests.test_userfaultfd import ANON, MISSING, RW

FORK, REMAP = userfaultfd.UFFD_FEATURE_EVENT_FORK, userfaultfd.UFFD_FEATURE_EVENT_REMAP
UNMAP = userfaultfd.UFFD_FEATURE_EVENT_UNMAP
EAGAIN = userfaultfd.EAGAIN
MAYMOVE, FIXED = mremap.MREMAP_MAYMOVE, mremap.MREMAP_FIXED
ELSEWHERE = 0x7F0000000000


def _copy(k, ctx, dst: int, data: bytes) -> int:
    return run_sync(userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_COPY, dst, len(data), 0,
                                                  data))


def _zap(m, k, mm, a: int, index: int) -> None:
    """MADV_DONTNEED of one page (no REMOVE event: the worlds here do not ask for it)."""
    m.madvise(mm, a + index * k.page_size, k.page_size, emu.MADV_DONTNEED)
    assert pte_of(k, mm, a + index * k.page_size).kind is Kind.NONE


# -- UFFD_EVENT_FORK ------------------------------------------------------------------------------

def test_fork_with_event_fork_registers_the_child_to_a_new_context_and_waits_for_the_read() -> None:
    sc, m, k, mm, a, ctx = world(FORK)
    page = k.page_size
    _zap(m, k, mm, a, 2)
    child = m.new_mm()
    sc.task("fork", fork.dup_mmap(k, child, mm))
    sc.run("fork:*", finish=False)
    # dup_userfaultfd_complete() runs after both mmap locks are dropped
    assert sc.state("fork") is TaskState.BLOCKED and k.stats["uffd_event_fork"] == 1
    assert mm.mmap_lock.writer is None and child.mmap_lock.writer is None
    assert ctx.mmap_changing == 1
    assert _copy(k, ctx, a + 2 * page, b"p" * page) == -EAGAIN        # mmap_changing
    cvma = child.vma_lookup(a)
    new = cvma.uffd_ctx
    assert new is not None and new is not ctx and new.mm is child and new.api_done
    assert new.features == ctx.features and cvma.flags & VM_UFFD_MISSING
    assert mm.vma_lookup(a).uffd_ctx is ctx                           # the parent keeps its own
    msg = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert msg == userfaultfd.UffdEventMsg(userfaultfd.UFFD_EVENT_FORK, 0, 0, 0, new, 0)
    assert not ctx.event_wqh
    sc.run()
    assert sc.results["fork"] == 0 and ctx.mmap_changing == 0
    # the child's missing page faults to the child's context, not the parent's
    sc.task("child_fault", do_user_addr_fault(k, child, a + 2 * page, Access.W))
    sc.run("child_fault:*", finish=False)
    assert sc.state("child_fault") is TaskState.BLOCKED
    assert [u.address for u in new.fault_pending_wqh] == [a + 2 * page] and not ctx.fault_pending_wqh
    assert m.uffdio_copy(new, a + 2 * page, b"childpg!" * 4) == page
    sc.run()
    assert sc.results["child_fault"] is FaultResult.OK
    assert m.read_user(child, a + 2 * page, 8) == b"childpg!"
    assert pte_of(k, mm, a + 2 * page).kind is Kind.NONE               # the parent's is still missing
    assert m.read_user(child, a + 3 * page, 8) == b"page0003"          # the rest came through fork
    m.exit_mm(child)
    m.exit_mm(mm)
    sc.close()


def test_fork_without_event_fork_drops_the_childs_registration_and_its_faults_are_normal() -> None:
    sc, m, k, mm, a, ctx = world(UNMAP)
    page = k.page_size
    _zap(m, k, mm, a, 2)
    child = m.fork_mm(mm)                         # nothing to wait for: no event
    cvma = child.vma_lookup(a)
    assert cvma.uffd_ctx is None and not cvma.flags & VM_UFFD_MISSING
    assert k.stats["uffd_event_fork"] == 0 and not ctx.event_wqh and ctx.mmap_changing == 0
    assert run_sync(do_user_addr_fault(k, child, a + 2 * page, Access.W)) is FaultResult.OK
    assert not ctx.fault_pending_wqh and pte_of(k, child, a + 2 * page).kind is Kind.LEAF
    assert m.read_user(child, a + 2 * page, 8) == bytes(8)
    m.exit_mm(child)
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize("features", [FORK, 0])
def test_event_fork_keeps_uffd_wp_in_the_child_and_without_it_the_bit_goes(features: int) -> None:
    """vma_needs_copy() / copy_present_pte(): the child keeps the uffd-wp bit only in a
    VMA that is still uffd-wp registered, i.e. with EVENT_FORK (x86_64)."""
    sc, m, k, mm, a, ctx = world(features)
    page = k.page_size
    m.uffdio_register(ctx, a, 8 * page, MISSING | userfaultfd.UFFDIO_REGISTER_MODE_WP)
    m.uffdio_writeprotect(ctx, a, page, userfaultfd.UFFDIO_WRITEPROTECT_MODE_WP)
    assert pte_of(k, mm, a).uffd_wp
    child = m.new_mm()
    sc.task("fork", fork.dup_mmap(k, child, mm))
    sc.run("fork:*", finish=False)
    if features:
        run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    sc.run()
    assert sc.results["fork"] == 0
    assert bool(child.vma_lookup(a).flags & VM_UFFD_WP) == bool(features)
    assert pte_of(k, child, a).uffd_wp == bool(features)
    m.exit_mm(child)
    m.exit_mm(mm)
    sc.close()


def test_release_of_the_parents_context_ends_the_fork_wait_and_unregisters_the_child() -> None:
    """userfaultfd_event_wait_completion() seeing ctx->released with a FORK event: the
    child's context (no one got an fd for it) is dropped from the child's VMAs."""
    sc, m, k, mm, a, ctx = world(FORK)
    child = m.new_mm()
    sc.task("fork", fork.dup_mmap(k, child, mm))
    sc.run("fork:*", finish=False)
    new = child.vma_lookup(a).uffd_ctx
    assert new is not None
    run_sync(userfaultfd.userfaultfd_release(k, ctx))
    sc.run()
    assert sc.results["fork"] == 0 and ctx.mmap_changing == 0 and not ctx.event_wqh
    cvma = child.vma_lookup(a)
    assert cvma.uffd_ctx is None and not cvma.flags & VM_UFFD_MISSING and new.released
    assert k.stats["uffd_fork_ctx_dropped"] == 1
    m.exit_mm(child)
    m.exit_mm(mm)
    sc.close()


def test_guest_read_of_a_fork_event_installs_an_fd_for_the_new_context() -> None:
    """read() of UFFD_EVENT_FORK: resolve_userfault_fork() installs an fd in the reader's
    file table (O_NONBLOCK inherited: UFFD_SHARED_FCNTL_FLAGS), uffd_msg.arg.fork.ufd is
    that fd (a __u32 at offset 8, the reserved pointer cleared), the event completed."""
    for arch in ("x86_64", "s390x"):
        m, p, sc, buf = _sc(arch)
        fd = _call(sc, "userfaultfd", userfaultfd.UFFD_USER_MODE_ONLY | guest_uffd.O_NONBLOCK)
        _put(sc, buf, guest_uffd.UFFD_API, FORK, 0)
        assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == 0
        ctx = p.files[fd].ctx
        child = m.new_mm()
        new = userfaultfd.UserfaultfdCtx(child, FORK, 99, flags=ctx.flags, api_done=True)
        new.file_flags = ctx.file_flags
        ewq = userfaultfd.UffdEventWaitQueue(ctx, userfaultfd.UFFD_EVENT_FORK, 0, 0, new_ctx=new)
        ctx.event_wqh.append(ewq)
        assert _call(sc, "read", fd, buf + 1024, 64) == 32
        raw = run_sync(copy_from_user(m, p.mm, buf + 1024, 32))
        order = ">" if sc.arch.big_endian else "<"
        assert raw[0] == userfaultfd.UFFD_EVENT_FORK and raw[1:8] == bytes(7)
        ufd = struct.unpack(order + "I", raw[8:12])[0]
        assert raw[12:] == bytes(20) and ufd not in (fd, 0, 1, 2)
        nf = p.files[ufd]
        assert isinstance(nf, guest_uffd.UffdFile) and nf.ctx is new and nf.refs == 1
        assert nf.flags & guest_uffd.O_NONBLOCK
        assert ewq.event == 0 and not ctx.event_wqh and ewq.fork_event is None
        assert _call(sc, "read", ufd, buf + 1024, 32) == -EAGAIN           # the new fd: O_NONBLOCK
        assert _call(sc, "close", ufd) == 0 and new.released
        m.exit_mm(child)


# -- UFFD_EVENT_REMAP and the UNMAP events of mremap / mmap(MAP_FIXED) ----------------------------

def test_mremap_sends_remap_after_the_unlock_and_the_new_range_stays_registered() -> None:
    sc, m, k, mm, a, ctx = world(REMAP)
    page = k.page_size
    _zap(m, k, mm, a, 1)
    sc.task("mremap", mremap.do_mremap(k, mm, a, 4 * page, 4 * page, MAYMOVE | FIXED, ELSEWHERE))
    sc.run("mremap:*", finish=False)
    assert sc.state("mremap") is TaskState.BLOCKED and k.stats["uffd_event_remap"] == 1
    assert mm.mmap_lock.writer is None and ctx.mmap_changing == 1
    assert pte_of(k, mm, ELSEWHERE).kind is Kind.LEAF                  # moved before the event
    assert _copy(k, ctx, ELSEWHERE + page, b"r" * page) == -EAGAIN
    msg = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert msg == userfaultfd.UffdEventMsg(userfaultfd.UFFD_EVENT_REMAP, a, ELSEWHERE, 4 * page)
    raw = userfaultfd.uffd_msg_event(msg, k.arch.big_endian)
    assert raw[0] == 0x14 and struct.unpack("<QQQ", raw[8:32]) == (a, ELSEWHERE, 4 * page)
    sc.run()
    assert sc.results["mremap"] == ELSEWHERE and ctx.mmap_changing == 0
    new = mm.vma_lookup(ELSEWHERE)
    assert new.uffd_ctx is ctx and new.flags & VM_UFFD_MISSING
    assert m.read_user(mm, ELSEWHERE, 8) == b"page0000"
    # the hole moved with the range, and its fault goes to the handler
    sc.task("fault", do_user_addr_fault(k, mm, ELSEWHERE + page, Access.R))
    sc.run("fault:*", finish=False)
    assert [u.address for u in ctx.fault_pending_wqh] == [ELSEWHERE + page]
    assert _copy(k, ctx, ELSEWHERE + page, b"moved!!!" * (page // 8)) == page
    sc.run()
    assert sc.results["fault"] is FaultResult.OK and m.read_user(mm, ELSEWHERE + page, 8) == b"moved!!!"
    m.exit_mm(mm)
    sc.close()


def test_mremap_without_event_remap_drops_the_registration_of_the_new_range() -> None:
    sc, m, k, mm, a, ctx = world(0)
    page = k.page_size
    _zap(m, k, mm, a, 1)
    assert m.mremap(mm, a, 4 * page, 4 * page, MAYMOVE | FIXED, ELSEWHERE) == ELSEWHERE
    new = mm.vma_lookup(ELSEWHERE)
    assert new.uffd_ctx is None and not new.flags & VM_UFFD_MISSING
    assert k.stats["uffd_event_remap"] == 0 and ctx.mmap_changing == 0
    assert run_sync(do_user_addr_fault(k, mm, ELSEWHERE + page, Access.R)) is FaultResult.OK
    assert mm.vma_lookup(a + 4 * page).uffd_ctx is ctx                 # the part not moved
    m.exit_mm(mm)
    sc.close()


def test_mremap_with_remap_and_unmap_sends_the_early_unmap_then_remap_then_the_old_ranges_unmap() -> None:
    """6.6 SYSCALL_DEFINE5(mremap): userfaultfd_unmap_complete(uf_unmap_early) (the
    MREMAP_FIXED target was a registered mapping), mremap_userfaultfd_complete(),
    userfaultfd_unmap_complete(uf_unmap) (move_vma()'s munmap of the old range, whose VMA
    was still registered)."""
    sc, m, k, mm, a, ctx = world(REMAP | UNMAP)
    page = k.page_size
    b = m.mmap(mm, ELSEWHERE, 4 * page, RW, ANON | emu.MAP_FIXED)
    m.uffdio_register(ctx, b, 4 * page, MISSING)
    sc.task("mremap", mremap.do_mremap(k, mm, a + 2 * page, 2 * page, 2 * page, MAYMOVE | FIXED, b + page))
    events = []
    while sc.state("mremap") is not TaskState.DONE:
        sc.run("mremap:*", finish=False)
        if sc.state("mremap") is TaskState.BLOCKED:
            events.append(run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True)))
    assert [(e.event, e.start, e.end, e.length) for e in events] == [
        (userfaultfd.UFFD_EVENT_UNMAP, b + page, b + 3 * page, 0),
        (userfaultfd.UFFD_EVENT_REMAP, a + 2 * page, b + page, 2 * page),
        (userfaultfd.UFFD_EVENT_UNMAP, a + 2 * page, a + 4 * page, 0)]
    assert sc.results["mremap"] == b + page and ctx.mmap_changing == 0
    assert m.read_user(mm, b + page, 8) == b"page0002"
    m.exit_mm(mm)
    sc.close()


def test_mremap_shrink_and_mmap_fixed_send_unmap_events() -> None:
    sc, m, k, mm, a, ctx = world(UNMAP)
    page = k.page_size
    sc.task("shrink", mremap.do_mremap(k, mm, a, 8 * page, 6 * page, 0))
    sc.run("shrink:*", finish=False)
    assert sc.state("shrink") is TaskState.BLOCKED and mm.mmap_lock.writer is None
    msg = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert (msg.event, msg.start, msg.end) == (userfaultfd.UFFD_EVENT_UNMAP, a + 6 * page, a + 8 * page)
    sc.run()
    assert sc.results["shrink"] == a
    sc.task("mmap", mmap.do_mmap(k, mm, a + page, 2 * page, RW, ANON | emu.MAP_FIXED))
    sc.run("mmap:*", finish=False)
    assert sc.state("mmap") is TaskState.BLOCKED and ctx.mmap_changing == 1
    msg = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert (msg.event, msg.start, msg.end) == (userfaultfd.UFFD_EVENT_UNMAP, a + page, a + 3 * page)
    sc.run()
    assert sc.results["mmap"] == a + page and ctx.mmap_changing == 0
    assert mm.vma_lookup(a + page).uffd_ctx is None and mm.vma_lookup(a).uffd_ctx is ctx
    m.exit_mm(mm)
    sc.close()


# -- a COPY racing the mremap ---------------------------------------------------------------------

def test_copy_before_the_mremap_works_at_the_old_address_and_moves_with_the_range() -> None:
    sc, m, k, mm, a, ctx = world(REMAP)
    page = k.page_size
    _zap(m, k, mm, a, 1)
    sc.task("copy", userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_COPY, a + page, page, 0,
                                                  b"early!!!" * (page // 8)))
    sc.task("mremap", mremap.do_mremap(k, mm, a, 4 * page, 4 * page, MAYMOVE | FIXED, ELSEWHERE))
    sc.run("copy:* mremap:*", finish=False)
    assert sc.results["copy"] == page and sc.state("mremap") is TaskState.BLOCKED
    run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    sc.run()
    assert m.read_user(mm, ELSEWHERE + page, 8) == b"early!!!"
    m.exit_mm(mm)
    sc.close()


def test_copy_that_waited_on_mmap_lock_behind_the_mremap_gets_eagain() -> None:
    """Forced interleaving: mremap holds mmap_write_lock; the COPY sleeps on the read
    lock; mremap_userfaultfd_prep() raises mmap_changing before the unlock, so the COPY,
    once it has the lock, answers -EAGAIN (the handler reads the REMAP, then retries at
    the new address)."""
    sc, m, k, mm, a, ctx = world(REMAP)
    page = k.page_size
    _zap(m, k, mm, a, 1)
    sc.task("mremap", mremap.do_mremap(k, mm, a, 4 * page, 4 * page, MAYMOVE | FIXED, ELSEWHERE))
    sc.task("copy", userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_COPY, a + page, page, 0,
                                                  b"late!!!!" * (page // 8)))
    sc.run("mremap:lock#1 copy:*", finish=False)
    assert mm.mmap_lock.writer is not None and sc.state("copy") is TaskState.BLOCKED
    assert ctx.mmap_changing == 0
    sc.run("mremap:* copy:*", finish=False)
    assert sc.state("mremap") is TaskState.BLOCKED and sc.results["copy"] == -EAGAIN
    assert pte_of(k, mm, ELSEWHERE + page).kind is Kind.NONE and mm.vma_lookup(a) is None
    run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    sc.run()
    assert _copy(k, ctx, ELSEWHERE + page, b"retry!!!" * (page // 8)) == page
    assert m.read_user(mm, ELSEWHERE + page, 8) == b"retry!!!"
    m.exit_mm(mm)
    sc.close()


def test_after_the_remap_a_copy_at_the_old_address_is_enoent_and_the_new_one_works() -> None:
    """After a REMAP the old range is gone: a COPY there is -ENOENT (no VMA), not a write
    into the pages that moved."""
    sc, m, k, mm, a, ctx = world(REMAP)
    page = k.page_size
    sc.task("mremap", mremap.do_mremap(k, mm, a, 4 * page, 4 * page, MAYMOVE | FIXED, ELSEWHERE))
    sc.run("mremap:*", finish=False)
    run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    sc.run()
    assert _copy(k, ctx, a, b"x" * page) == -userfaultfd.ENOENT
    m.madvise(mm, ELSEWHERE, page, madvise.MADV_DONTNEED)
    assert _copy(k, ctx, ELSEWHERE, b"y" * page) == page
    m.exit_mm(mm)
    sc.close()
