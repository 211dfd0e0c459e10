"""Non-cooperative userfaultfd events (6.6 fs/userfaultfd.c): UFFD_EVENT_REMOVE from
MADV_DONTNEED (userfaultfd_remove() drops mmap_lock and waits for the handler's read(),
then madvise takes the lock again and looks the VMA up afresh) and UFFD_EVENT_UNMAP from
munmap (userfaultfd_unmap_prep() under the write lock, userfaultfd_unmap_complete()
after it). While an event is in flight ctx->mmap_changing makes UFFDIO_COPY and
UFFDIO_WRITEPROTECT answer -EAGAIN. Hand-written schedules; the pte bytes in guest RAM."""
from __future__ import annotations

import struct

import pytest
from conftest import pte_of
from test_uffd_syscalls import _call, _nr, _put, _sc, _uffd_with_api

import emu
from emu.arch import Kind
from emu.linux import uffd as guest_uffd
from emu.linux.uaccess import copy_from_user
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import madvise, mmap, userfaultfd
from mm_core.mm import MM_ANONPAGES
from tests.test_userfaultfd import ANON, BASE, MISSING, RW

REMOVE, UNMAP = userfaultfd.UFFD_FEATURE_EVENT_REMOVE, userfaultfd.UFFD_FEATURE_EVENT_UNMAP
FORK, REMAP = userfaultfd.UFFD_FEATURE_EVENT_FORK, userfaultfd.UFFD_FEATURE_EVENT_REMAP


def world(features: int, arch: str = "x86_64", pages: int = 8):
    sc = Scenario(arch=arch, kernel="6.6", mem="16M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * page, RW, ANON)
    for i in range(pages):
        pa = m.touch(mm, a + i * page, write=True)
        m.physmem[pa:pa + 8] = b"page%04d" % i
    ctx = m.userfaultfd(mm, features)
    m.uffdio_register(ctx, a, pages * page, MISSING)
    return sc, m, k, mm, a, ctx


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_dontneed_sends_remove_without_mmap_lock_and_zaps_after_the_read(arch: str) -> None:
    sc, m, k, mm, a, ctx = world(REMOVE, arch)
    page = k.page_size
    sc.task("dontneed", madvise.do_madvise(k, mm, a + 2 * page, 3 * page, madvise.MADV_DONTNEED))
    sc.run("dontneed:*", finish=False)
    assert sc.state("dontneed") is TaskState.BLOCKED and k.stats["uffd_event_remove"] == 1
    # userfaultfd_remove() dropped mmap_lock: anyone may take it, even for write
    assert mm.mmap_lock.readers == [] and ctx.mmap_changing == 1
    assert pte_of(k, mm, a + 2 * page).kind is Kind.LEAF             # nothing zapped yet
    # mmap_changing: UFFDIO_COPY and UFFDIO_WRITEPROTECT ask the handler to retry
    assert run_sync(userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_COPY, a + 2 * page,
                                                  page, 0, b"x" * page)) == -userfaultfd.EAGAIN
    assert run_sync(userfaultfd.mwriteprotect_range(k, ctx, a, page, True)) == -userfaultfd.EAGAIN
    assert k.stats["uffd_mmap_changing_eagain"] == 2
    msg = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert msg == userfaultfd.UffdEventMsg(userfaultfd.UFFD_EVENT_REMOVE, a + 2 * page, a + 5 * page)
    raw = userfaultfd.uffd_msg_event(msg, k.arch.big_endian)
    order = ">" if k.arch.big_endian else "<"
    assert raw[0] == 0x15 and struct.unpack(order + "QQ", raw[8:24]) == (a + 2 * page, a + 5 * page)
    assert len(raw) == userfaultfd.UFFD_MSG_SIZE and not ctx.event_wqh
    sc.run()
    assert sc.results["dontneed"] == 0 and ctx.mmap_changing == 0
    for i in range(8):
        assert (pte_of(k, mm, a + i * page).kind is Kind.NONE) == (2 <= i < 5), i
    assert mm.rss[MM_ANONPAGES] == 5 and m.read_user(mm, a + 5 * page, 8) == b"page0005"
    # the retry the handler was asked for now works
    assert m.uffdio_copy(ctx, a + 2 * page, b"again!!!" * 4) == page
    m.exit_mm(mm)
    sc.close()


def test_without_the_feature_dontneed_keeps_mmap_lock_and_sends_nothing() -> None:
    sc, m, k, mm, a, ctx = world(0)
    m.madvise(mm, a, 2 * k.page_size, emu.MADV_DONTNEED)
    assert k.stats["uffd_event_remove"] == 0 and not ctx.event_wqh and ctx.mmap_changing == 0
    assert pte_of(k, mm, a).kind is Kind.NONE
    m.exit_mm(mm)
    sc.close()


def test_the_vma_unmapped_while_remove_waits_makes_dontneed_enomem() -> None:
    """mmap_lock is dropped while UFFD_EVENT_REMOVE waits: a munmap gets in (it takes the
    lock for write), and madvise_dontneed_free() finds no VMA when it looks again: -ENOMEM."""
    sc, m, k, mm, a, ctx = world(REMOVE)
    page = k.page_size
    sc.task("dontneed", madvise.do_madvise(k, mm, a, 2 * page, madvise.MADV_DONTNEED))
    sc.task("munmap", mmap.do_munmap(k, mm, a, 8 * page))
    sc.run("dontneed:* munmap:*", finish=False)
    assert sc.results["munmap"] == 0 and mm.vma_lookup(a) is None
    assert isinstance(run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True)), userfaultfd.UffdEventMsg)
    sc.run()
    assert sc.results["dontneed"] == -userfaultfd.ENOMEM and ctx.mmap_changing == 0
    m.exit_mm(mm)
    sc.close()


def test_a_vma_split_while_remove_waits_clips_the_zap_and_repeats_the_event() -> None:
    """mprotect splits the VMA while the lock is dropped: the zap is clipped to the VMA
    found again, and the rest of the range is walked on, with a REMOVE repeated for it
    (the manager "can handle a repetition fine")."""
    sc, m, k, mm, a, ctx = world(REMOVE)
    page = k.page_size
    sc.task("dontneed", madvise.do_madvise(k, mm, a, 4 * page, madvise.MADV_DONTNEED))
    sc.run("dontneed:*", finish=False)
    m.mprotect(mm, a + 2 * page, 6 * page, emu.PROT_READ)              # VMA split at a + 2p
    first = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    sc.run("dontneed:*", finish=False)
    assert sc.state("dontneed") is TaskState.BLOCKED                    # the second REMOVE
    second = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    sc.run()
    assert (first.start, first.end) == (a, a + 4 * page)
    assert (second.start, second.end) == (a + 2 * page, a + 4 * page)
    assert sc.results["dontneed"] == 0 and k.stats["uffd_event_remove"] == 2
    assert all(pte_of(k, mm, a + i * page).kind is Kind.NONE for i in range(4))
    assert pte_of(k, mm, a + 4 * page).kind is Kind.LEAF
    m.exit_mm(mm)
    sc.close()


def test_munmap_sends_unmap_after_dropping_the_write_lock() -> None:
    sc, m, k, mm, a, ctx = world(UNMAP)
    page = k.page_size
    sc.task("munmap", mmap.do_munmap(k, mm, a + page, 2 * page))
    sc.run("munmap:*", finish=False)
    assert sc.state("munmap") is TaskState.BLOCKED and k.stats["uffd_event_unmap"] == 1
    assert mm.mmap_lock.writer is None and mm.vma_lookup(a + page) is None   # unmapped, unlocked
    assert ctx.mmap_changing == 1
    msg = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert msg == userfaultfd.UffdEventMsg(userfaultfd.UFFD_EVENT_UNMAP, a + page, a + 3 * page)
    sc.run()
    assert sc.results["munmap"] == 0 and ctx.mmap_changing == 0
    # the two VMAs left over keep their registration; one event for the one context
    assert mm.vma_lookup(a).uffd_ctx is ctx and mm.vma_lookup(a + 3 * page).uffd_ctx is ctx
    m.exit_mm(mm)
    sc.close()


def test_release_ends_an_event_wait() -> None:
    """userfaultfd_release() (close of the last fd) wakes the event waiters: the sender
    unqueues its event and goes on; mmap_changing drops back."""
    sc, m, k, mm, a, ctx = world(UNMAP | REMOVE)
    sc.task("munmap", mmap.do_munmap(k, mm, a, k.page_size))
    sc.run("munmap:*", finish=False)
    assert ctx.event_wqh and ctx.mmap_changing == 1
    run_sync(userfaultfd.userfaultfd_release(k, ctx))
    sc.run()
    assert sc.results["munmap"] == 0 and not ctx.event_wqh and ctx.mmap_changing == 0
    m.exit_mm(mm)
    sc.close()


def test_guest_read_gets_the_event_message_and_completes_it() -> None:
    """emu/linux/uffd.py: UFFDIO_API offers EVENT_REMOVE, UNMAP, FORK and REMAP (not
    THREAD_ID); read() after the page faults takes an event and completes it (the
    sender's wait ends), the message in the guest's byte order."""
    for arch in ("x86_64", "ppc64"):
        m, p, sc, buf = _sc(arch)
        fd = _call(sc, "userfaultfd", userfaultfd.UFFD_USER_MODE_ONLY | guest_uffd.O_NONBLOCK)
        _put(sc, buf, guest_uffd.UFFD_API, REMOVE | UNMAP, 0)
        assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == 0
        ctx = p.files[fd].ctx
        assert ctx.features == REMOVE | UNMAP
        ewq = userfaultfd.UffdEventWaitQueue(ctx, userfaultfd.UFFD_EVENT_UNMAP, buf + 4096, buf + 12288)
        ctx.event_wqh.append(ewq)
        assert _call(sc, "read", fd, buf + 1024, 64) == 32
        raw = run_sync(copy_from_user(m, p.mm, buf + 1024, 32))
        order = ">" if sc.arch.big_endian else "<"
        assert raw[0] == userfaultfd.UFFD_EVENT_UNMAP
        assert struct.unpack(order + "QQ", raw[8:24]) == (buf + 4096, buf + 12288)
        assert ewq.event == 0 and not ctx.event_wqh and ewq.try_acquire(None)
        assert _call(sc, "read", fd, buf + 1024, 32) == -11
    m2, p2, sc2, buf2 = _sc()
    _uffd_with_api(sc2, buf2)
    fd = _call(sc2, "userfaultfd", userfaultfd.UFFD_USER_MODE_ONLY)
    _put(sc2, buf2, guest_uffd.UFFD_API, 1 << 8, 0)                   # UFFD_FEATURE_THREAD_ID
    assert _call(sc2, "ioctl", fd, _nr(sc2, "API"), buf2) == -22
    fd = _call(sc2, "userfaultfd", userfaultfd.UFFD_USER_MODE_ONLY)
    _put(sc2, buf2, guest_uffd.UFFD_API, FORK | REMAP, 0)
    assert _call(sc2, "ioctl", fd, _nr(sc2, "API"), buf2) == 0 and p2.files[fd].ctx.features == FORK | REMAP
