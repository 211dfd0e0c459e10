"""The guest's userfaultfd(2) surface (emu/linux/uffd.py): the syscall, the ioctls in each
arch's encoding and byte order, read() of uffd_msg, close; the fault path itself is
driven by the uffdtest workload (tests/test_workloads.py)."""
from __future__ import annotations

import struct

import pytest
from conftest import workload

from emu.linux import syscalls, uffd
from emu.linux.syscalls import SyscallContext
from emu.linux.uaccess import copy_from_user, copy_to_user
from emu.machine import Machine
from emu.sched.loop import run_sync
from mm_core import userfaultfd as kuffd
from mm_core.mm import VM_UFFD_MISSING

MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
EPERM, EBADF, EAGAIN, EINVAL, ENOTTY = 1, 9, 11, 22, 25


def _sc(arch: str = "x86_64"):
    m = Machine(arch=arch, mem="32M")
    p = m.spawn(workload(arch, "hello"), ["hello"])
    sc = SyscallContext(m, p.threads[0])
    buf = m.mmap(p.mm, 0, 4 * 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS)
    return m, p, sc, buf


def _put(sc, addr: int, *words: int) -> None:
    fmt = (">" if sc.arch.big_endian else "<") + f"{len(words)}Q"
    run_sync(copy_to_user(sc.machine, sc.mm, addr, struct.pack(fmt, *words)))


def _get(sc, addr: int, n: int) -> list[int]:
    fmt = (">" if sc.arch.big_endian else "<") + f"{n}Q"
    return list(struct.unpack(fmt, run_sync(copy_from_user(sc.machine, sc.mm, addr, 8 * n))))


def _call(sc, name: str, *args: int) -> int:
    """The syscall as dispatch() runs it (an EFault is -EFAULT)."""
    nr = sc.arch.syscall_abi.numbers[name]
    return run_sync(syscalls.dispatch(sc, nr, list(args), {nr: name}))


def _uffd_with_api(sc, buf: int, flags: int = kuffd.UFFD_USER_MODE_ONLY) -> int:
    fd = _call(sc, "userfaultfd", flags)
    assert fd >= 3
    _put(sc, buf, uffd.UFFD_API, 0, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == 0
    return fd


def _nr(sc, name: str) -> int:
    return {v: k for k, v in uffd.uffd_ioctls(sc.arch.syscall_abi).items()}[name]


def test_ioctl_numbers_are_the_uapi_ones_with_powerpc_direction_bits() -> None:
    generic = {v: k for k, v in uffd.uffd_ioctls(Machine(arch="x86_64", mem="32M").arch.syscall_abi).items()}
    assert generic == {"API": 0xC018AA3F, "REGISTER": 0xC020AA00, "UNREGISTER": 0x8010AA01,
                       "WAKE": 0x8010AA02, "COPY": 0xC028AA03, "ZEROPAGE": 0xC020AA04, "MOVE": 0xC028AA05,
                       "WRITEPROTECT": 0xC018AA06, "CONTINUE": 0xC020AA07, "POISON": 0xC020AA08}
    ppc = {v: k for k, v in uffd.uffd_ioctls(Machine(arch="ppc64", mem="32M").arch.syscall_abi).items()}
    # _IOWR is the same bits (3 << 30 == 6 << 29); _IOR is 2 << 29 on powerpc
    assert ppc["COPY"] == generic["COPY"] and ppc["UNREGISTER"] == 0x4010AA01 and ppc["WAKE"] == 0x4010AA02


def test_userfaultfd_needs_user_mode_only_and_known_flags() -> None:
    m, p, sc, buf = _sc()
    assert _call(sc, "userfaultfd", 0) == -EPERM                      # unprivileged, sysctl 0
    assert _call(sc, "userfaultfd", kuffd.UFFD_USER_MODE_ONLY | 0x2) == -EINVAL
    fd = _call(sc, "userfaultfd", kuffd.UFFD_USER_MODE_ONLY | uffd.O_CLOEXEC)
    assert isinstance(p.files[fd], uffd.UffdFile) and p.files[fd].ctx.mm is p.mm


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_uffdio_api_negotiates_and_every_other_ioctl_waits_for_it(arch: str) -> None:
    m, p, sc, buf = _sc(arch)
    fd = _call(sc, "userfaultfd", kuffd.UFFD_USER_MODE_ONLY)
    _put(sc, buf + 64, buf + 4096, 4096, kuffd.UFFDIO_REGISTER_MODE_MISSING, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "REGISTER"), buf + 64) == -EINVAL   # before UFFDIO_API
    assert _call(sc, "read", fd, buf + 256, 32) == -EINVAL
    _put(sc, buf, 0xAB, 0, 0)                                          # bad api: zeroed back
    assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == -EINVAL and _get(sc, buf, 3) == [0, 0, 0]
    _put(sc, buf, uffd.UFFD_API, 1 << 8, 0)                            # THREAD_ID: not offered
    assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == -EINVAL
    _put(sc, buf, uffd.UFFD_API, kuffd.UFFD_FEATURE_EXACT_ADDRESS, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == 0
    api, features, ioctls = _get(sc, buf, 3)
    assert api == uffd.UFFD_API
    assert ioctls == 1 << 0 | 1 << 1 | 1 << 0x3F and features == uffd.uffd_api_features(m.kernel)
    # no uffd-wp pte bit on s390x: no PAGEFAULT_FLAG_WP
    assert bool(features & kuffd.UFFD_FEATURE_PAGEFAULT_FLAG_WP) == (arch == "x86_64")
    assert bool(features & kuffd.UFFD_FEATURE_WP_UNPOPULATED) == (arch == "x86_64")   # 6.4+, with uffd-wp
    assert p.files[fd].ctx.features == kuffd.UFFD_FEATURE_EXACT_ADDRESS
    _put(sc, buf, uffd.UFFD_API, 0, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == -EINVAL        # only once
    assert _call(sc, "ioctl", fd, _nr(sc, "REGISTER"), buf + 64) == 0
    ioctls = _get(sc, buf + 64, 4)[3]
    assert ioctls & (1 << 2 | 1 << 3 | 1 << 4) == 1 << 2 | 1 << 3 | 1 << 4 and not ioctls & 1 << 6
    assert p.mm.find_vma(buf + 4096).flags & VM_UFFD_MISSING


def test_bad_ioctls_and_fds() -> None:
    m, p, sc, buf = _sc()
    fd = _uffd_with_api(sc, buf)
    assert _call(sc, "ioctl", fd, 0xC018AA3E, buf) == -EINVAL           # unknown nr
    assert _call(sc, "ioctl", fd, 0x5401, buf) == -EINVAL               # TCGETS on a uffd
    assert _call(sc, "ioctl", 1, 0x5401, buf) == -ENOTTY
    assert _call(sc, "ioctl", 77, _nr(sc, "API"), buf) == -EBADF
    _put(sc, buf, buf + 1, 4096, 1, 0)                                  # unaligned range
    assert _call(sc, "ioctl", fd, _nr(sc, "REGISTER"), buf) == -EINVAL
    _put(sc, buf, buf + 4096, buf, 4096, 1 << 5, 0)                    # unknown copy mode
    assert _call(sc, "ioctl", fd, _nr(sc, "COPY"), buf) == -EINVAL
    _put(sc, buf, buf + 4096, 2 ** 64 - 4096, 8192, 0, 0)              # src + len wraps
    assert _call(sc, "ioctl", fd, _nr(sc, "COPY"), buf) == -EINVAL
    _put(sc, buf, buf + 4096, buf, 4096, 0, 0)                          # dst not registered
    assert _call(sc, "ioctl", fd, _nr(sc, "COPY"), buf) == -kuffd.ENOENT
    assert _get(sc, buf + 32, 1) == [2 ** 64 - kuffd.ENOENT]            # uffdio_copy.copy = -ENOENT


def test_read_with_nothing_pending() -> None:
    m, p, sc, buf = _sc()
    fd = _uffd_with_api(sc, buf, kuffd.UFFD_USER_MODE_ONLY | uffd.O_NONBLOCK)
    assert _call(sc, "read", fd, buf, 32) == -EAGAIN
    assert _call(sc, "read", fd, buf, 31) == -EINVAL                    # shorter than a uffd_msg


def test_read_reports_the_oldest_fault_once_and_the_resolution_still_wakes_it() -> None:
    m, p, sc, buf = _sc("ppc64")
    fd = _uffd_with_api(sc, buf, kuffd.UFFD_USER_MODE_ONLY | uffd.O_NONBLOCK)
    ctx = p.files[fd].ctx
    first = kuffd.UffdWaitQueue(ctx, buf + 4096 + 0x123, 0x1, VM_UFFD_MISSING)   # a write fault
    second = kuffd.UffdWaitQueue(ctx, buf + 8192, 0, kuffd.VM_UFFD_WP)
    ctx.fault_pending_wqh += [first, second]
    assert _call(sc, "read", fd, buf + 1024, 64) == 64                  # both: only the first blocks
    raw = run_sync(copy_from_user(m, p.mm, buf + 1024, 64))
    assert raw[0] == kuffd.UFFD_EVENT_PAGEFAULT and raw[32] == kuffd.UFFD_EVENT_PAGEFAULT
    # big-endian; page-aligned without UFFD_FEATURE_EXACT_ADDRESS
    assert struct.unpack(">QQ", raw[8:24]) == (kuffd.UFFD_PAGEFAULT_FLAG_WRITE, buf + 4096)
    assert struct.unpack(">QQ", raw[40:56]) == (kuffd.UFFD_PAGEFAULT_FLAG_WP, buf + 8192)
    assert ctx.fault_pending_wqh == [] and ctx.fault_wqh == [first, second]
    assert _call(sc, "read", fd, buf + 1024, 32) == -EAGAIN             # reported once
    _put(sc, buf, buf + 4096, 4096)
    assert _call(sc, "ioctl", fd, _nr(sc, "WAKE"), buf) == 0
    assert first.waken and not second.waken and ctx.fault_wqh == [second]


def test_close_releases_the_context() -> None:
    m, p, sc, buf = _sc()
    fd = _uffd_with_api(sc, buf)
    ctx = p.files[fd].ctx
    _put(sc, buf + 64, buf + 4096, 8192, kuffd.UFFDIO_REGISTER_MODE_MISSING, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "REGISTER"), buf + 64) == 0
    waiter = kuffd.UffdWaitQueue(ctx, buf + 4096, 0, VM_UFFD_MISSING)
    ctx.fault_pending_wqh.append(waiter)
    assert _call(sc, "close", fd) == 0 and fd not in p.files
    assert ctx.released and waiter.waken and not ctx.fault_pending_wqh
    vma = p.mm.find_vma(buf + 4096)
    assert vma.uffd_ctx is None and not vma.flags & VM_UFFD_MISSING
    assert _call(sc, "ioctl", fd, _nr(sc, "API"), buf) == -EBADF


def test_a_kernel_uaccess_fault_on_a_user_mode_only_uffd_is_efault_not_a_wait() -> None:
    """copy_from_user() of an ioctl argument lying in a MODE_MISSING range: the uaccess
    fault has no FAULT_FLAG_USER, so handle_userfault() answers VM_FAULT_SIGBUS and the
    syscall returns -EFAULT instead of sleeping until a handler resolves it."""
    m, p, sc, buf = _sc()
    fd = _uffd_with_api(sc, buf)
    _put(sc, buf + 64, buf + 8192, 8192, kuffd.UFFDIO_REGISTER_MODE_MISSING, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "REGISTER"), buf + 64) == 0
    fd2 = _call(sc, "userfaultfd", kuffd.UFFD_USER_MODE_ONLY)
    assert _call(sc, "ioctl", fd2, _nr(sc, "API"), buf + 8192) == -kuffd.EFAULT
    assert m.kernel.stats["handle_userfault_missing"] == 1 and m.kernel.stats["uffd_fault_waits"] == 0
    assert not p.files[fd].ctx.fault_pending_wqh


@pytest.mark.parametrize("arch, kernel", [("x86_64", "6.6"), ("s390x", "6.6"), ("ppc64", "6.5")])
def test_uffdio_poison_ioctl_writes_updated_and_a_short_count_is_eagain(arch: str, kernel: str) -> None:
    """struct uffdio_poison {range, mode, updated} in the guest's byte order (6.6+; before,
    an unknown command: -EINVAL); UFFD_FEATURE_POISON offered from 6.6; -EEXIST on the
    second page of a range makes updated one page and the ioctl -EAGAIN; a bad mode or
    range is -EINVAL with nothing written back; the guest's own access is then SIGBUS."""
    m = Machine(arch=arch, mem="32M", kernel=kernel)
    p = m.spawn(workload(arch, "hello"), ["hello"])
    sc = SyscallContext(m, p.threads[0])
    buf = m.mmap(p.mm, 0, 8 * 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS)
    fd = _uffd_with_api(sc, buf)
    assert bool(_get(sc, buf, 2)[1] & kuffd.UFFD_FEATURE_POISON) == (kernel != "6.5")
    dst = buf + 4 * 4096
    _put(sc, buf + 64, dst, 4 * 4096, kuffd.UFFDIO_REGISTER_MODE_MISSING, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "REGISTER"), buf + 64) == 0
    assert bool(_get(sc, buf + 64, 4)[3] & 1 << kuffd._UFFDIO_POISON) == (kernel != "6.5")
    _put(sc, buf + 128, dst, 4096, 0, 0x5A5A)
    if kernel == "6.5":
        assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == -EINVAL
        assert _get(sc, buf + 128, 4)[3] == 0x5A5A
        return
    assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == 0
    assert _get(sc, buf + 128, 4)[3] == 4096                          # uffdio_poison.updated
    _put(sc, buf + 128, dst + 4096, 4096, 1 << 1, 0x5A5A)            # unknown mode
    assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == -EINVAL
    assert _get(sc, buf + 128, 4)[3] == 0x5A5A                        # `goto out`: not written
    _put(sc, buf + 128, dst + 4096, 4096, kuffd.UFFDIO_POISON_MODE_DONTWAKE, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == 0
    _put(sc, buf + 128, dst + 3 * 4096, 4096, 0, 0)                  # the range's last page first
    assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == 0
    _put(sc, buf + 128, dst + 2 * 4096, 2 * 4096, 0, 0)              # page 2, then page 3 (-EEXIST)
    assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == -EAGAIN   # short: 1 page
    assert _get(sc, buf + 128, 4)[3] == 4096
    _put(sc, buf + 128, dst, 4096, 0, 0)
    assert _call(sc, "ioctl", fd, _nr(sc, "POISON"), buf + 128) == -kuffd.EEXIST
    assert _get(sc, buf + 128, 4)[3] == 2 ** 64 - kuffd.EEXIST
    with pytest.raises(Exception, match="SIGBUS"):
        m.touch(p.mm, dst + 4096)
