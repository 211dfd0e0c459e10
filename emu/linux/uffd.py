"""userfaultfd(2) for guests (fs/userfaultfd.c): the fd, its ioctls and read(), on top of
the kernel side in mm_core/userfaultfd.py.

    userfaultfd(flags)                  a context for the caller's mm (new_userfaultfd)
    ioctl UFFDIO_API                    api 0xAA, feature negotiation, the ioctls bitmask
    ioctl UFFDIO_REGISTER / UNREGISTER  uffdio_register {range, mode, ioctls (out)}
    ioctl UFFDIO_COPY / ZEROPAGE / CONTINUE / WAKE / WRITEPROTECT / POISON (6.6+) / MOVE (6.8+)
    read(fd, msg, n)                    32-byte struct uffd_msg (UFFD_EVENT_PAGEFAULT, and
                                        UFFD_EVENT_REMOVE / UNMAP / REMAP / FORK when asked for)
    close(fd)                           userfaultfd_release() on the last reference

Structures are read and written in the guest's byte order; ioctl numbers are
_IOWR/_IOR(0xAA, nr, sizeof) in the guest arch's encoding (powerpc has 3 direction bits).
The guest has no capabilities and vm.unprivileged_userfaultfd is 0 (the default since
5.11): userfaultfd() without UFFD_USER_MODE_ONLY is -EPERM, as for an unprivileged Linux
process. UFFD_FEATURE_EVENT_REMOVE (MADV_DONTNEED), EVENT_UNMAP (munmap, mmap(MAP_FIXED),
mremap), EVENT_REMAP (mremap moving a registered range: uffd_msg.arg.remap {from, to,
len}) and EVENT_FORK (fork of a process with a registered range: read() installs an fd
for the child's new context in the reader's file table, uffd_msg.arg.fork.ufd) deliver
their events through read() and raise ctx->mmap_changing (UFFDIO_COPY / ZEROPAGE /
CONTINUE / WRITEPROTECT / POISON answer -EAGAIN meanwhile). Not modelled:
UFFD_FEATURE_THREAD_ID, poll/epoll, mmap_changing in UFFDIO_MOVE. UFFDIO_POISON (6.6+; -EINVAL,
an unknown command, before)
takes struct uffdio_poison {range, mode (DONTWAKE), updated (out)}.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from emu.linux.uaccess import copy_from_user, copy_to_user
from mm_core import userfaultfd as uffd
from mm_core.userfaultfd import EINVAL, EPERM

EAGAIN = 11
O_NONBLOCK, O_CLOEXEC = 0o4000, 0o2000000          # the same on the four arches
UFFD_API = 0xAA
UFFDIO = 0xAA
_UFFDIO_API = 0x3F
UFFD_API_IOCTLS = (1 << uffd._UFFDIO_REGISTER) | (1 << uffd._UFFDIO_UNREGISTER) | (1 << _UFFDIO_API)


@dataclass(eq=False)
class UffdFile:
    """The anon inode "[userfaultfd]" file: its context and f_flags (O_NONBLOCK)."""

    ctx: uffd.UserfaultfdCtx
    flags: int
    refs: int = 0


def ioc(abi, rw: str, nr: int, size: int) -> int:
    """_IOR / _IOWR(UFFDIO, nr, size) in the arch's asm/ioctl.h encoding."""
    shift, write, read = abi.ioc_dir
    d = (read if "R" in rw else 0) | (write if "W" in rw else 0)
    return d << shift | size << 16 | UFFDIO << 8 | nr


def uffd_ioctls(abi) -> dict[int, str]:
    """The uapi ioctl numbers (include/uapi/linux/userfaultfd.h) -> their names."""
    return {
        ioc(abi, "RW", _UFFDIO_API, 24): "API",                               # uffdio_api
        ioc(abi, "RW", uffd._UFFDIO_REGISTER, 32): "REGISTER",                # uffdio_register
        ioc(abi, "R", uffd._UFFDIO_UNREGISTER, 16): "UNREGISTER",             # uffdio_range
        ioc(abi, "R", uffd._UFFDIO_WAKE, 16): "WAKE",                         # uffdio_range
        ioc(abi, "RW", uffd._UFFDIO_COPY, 40): "COPY",                        # uffdio_copy
        ioc(abi, "RW", uffd._UFFDIO_ZEROPAGE, 32): "ZEROPAGE",                # uffdio_zeropage
        ioc(abi, "RW", uffd._UFFDIO_MOVE, 40): "MOVE",                        # uffdio_move
        ioc(abi, "RW", uffd._UFFDIO_WRITEPROTECT, 24): "WRITEPROTECT",        # uffdio_writeprotect
        ioc(abi, "RW", uffd._UFFDIO_CONTINUE, 32): "CONTINUE",                # uffdio_continue
        ioc(abi, "RW", uffd._UFFDIO_POISON, 32): "POISON",                    # uffdio_poison (6.6)
    }


def uffd_api_features(k) -> int:
    """UFFD_API_FEATURES as far as this model honours them, with the arch's #ifndef
    CONFIG_HAVE_ARCH_USERFAULTFD_WP / _MINOR clearing done by userfaultfd_api()."""
    features = uffd.UFFD_FEATURE_MISSING_SHMEM | uffd.UFFD_FEATURE_SIGBUS | uffd.UFFD_FEATURE_EXACT_ADDRESS
    features |= uffd.UFFD_FEATURE_EVENT_REMOVE | uffd.UFFD_FEATURE_EVENT_UNMAP
    features |= uffd.UFFD_FEATURE_EVENT_FORK | uffd.UFFD_FEATURE_EVENT_REMAP
    if uffd.have_arch_userfaultfd(k, "WP"):
        features |= uffd.UFFD_FEATURE_PAGEFAULT_FLAG_WP
        if k.profile.version >= (6, 4):         # #ifndef CONFIG_PTE_MARKER_UFFD_WP clears it
            features |= uffd.UFFD_FEATURE_WP_UNPOPULATED
    if uffd.have_arch_userfaultfd(k, "MINOR"):
        features |= uffd.UFFD_FEATURE_MINOR_SHMEM
    if uffd.uffdio_poison_supported(k):
        features |= uffd.UFFD_FEATURE_POISON      # 6.6, on every arch
    if k.profile.uffdio_move:
        features |= uffd.UFFD_FEATURE_MOVE
    return features


def new_userfaultfd(k, mm, flags: int) -> UffdFile | int:
    """SYSCALL_DEFINE1(userfaultfd): userfaultfd_syscall_allowed() (UFFD_USER_MODE_ONLY, as
    the guest is unprivileged) -> -EPERM, then new_userfaultfd(): unknown flags -EINVAL."""
    if not flags & uffd.UFFD_USER_MODE_ONLY:
        return -EPERM
    if flags & ~(O_CLOEXEC | O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY):
        return -EINVAL
    ctx = uffd.userfaultfd_ctx_new(k, mm)
    ctx.flags = flags & uffd.UFFD_USER_MODE_ONLY
    ctx.file_flags = flags & (O_NONBLOCK | O_CLOEXEC)     # UFFD_SHARED_FCNTL_FLAGS of ctx->flags
    k.stats["uffd_ctx_created"] += 1
    return UffdFile(ctx, flags & (O_NONBLOCK | O_CLOEXEC))


class _Regs:
    """Reads and writes of one ioctl argument in the guest's byte order."""

    def __init__(self, sc, arg: int) -> None:
        self.sc, self.arg = sc, arg
        self.order = ">" if sc.arch.big_endian else "<"

    async def get(self, nwords: int) -> list[int]:
        data = await copy_from_user(self.sc.machine, self.sc.mm, self.arg, 8 * nwords)
        return list(struct.unpack(f"{self.order}{nwords}Q", data))

    async def put(self, index: int, value: int) -> None:
        data = struct.pack(f"{self.order}Q", value & 0xFFFFFFFFFFFFFFFF)
        await copy_to_user(self.sc.machine, self.sc.mm, self.arg + 8 * index, data)


async def userfaultfd_ioctl(sc, f: UffdFile, cmd: int, arg: int) -> int:
    """userfaultfd_ioctl() (6.6): every command but UFFDIO_API needs the API done (-EINVAL);
    an unknown command is -EINVAL (ret's initial value). ``sc`` is the SyscallContext."""
    k, ctx = sc.k, f.ctx
    name = uffd_ioctls(sc.arch.syscall_abi).get(cmd & 0xFFFFFFFF)
    if name != "API" and not ctx.api_done:
        return -EINVAL
    if name is None:
        return -EINVAL
    k.stats[f"uffdio_{name.lower()}_ioctl"] += 1
    r = _Regs(sc, arg)
    if name == "API":
        return await userfaultfd_api(k, ctx, r)
    if name == "REGISTER":
        start, length, mode = await r.get(3)            # the last 8 bytes (ioctls) are not read
        ret = await uffd.userfaultfd_register(k, ctx, start, length, mode)
        if ret < 0:
            return ret
        await r.put(3, ret)                              # put_user(ioctls_out, &user->ioctls)
        return 0
    if name == "UNREGISTER":
        start, length = await r.get(2)
        return await uffd.userfaultfd_unregister(k, ctx, start, length)
    if name == "WAKE":
        start, length = await r.get(2)
        return await uffd.userfaultfd_wake(k, ctx, start, length)
    if name == "COPY":
        return await userfaultfd_copy(sc, ctx, r)
    if name in ("ZEROPAGE", "CONTINUE"):
        start, length, mode = await r.get(3)
        what = uffd.MFILL_ATOMIC_ZEROPAGE if name == "ZEROPAGE" else uffd.MFILL_ATOMIC_CONTINUE
        ret = await uffd.userfaultfd_mfill(k, ctx, what, start, length, mode)
        await r.put(3, ret)                              # uffdio_zeropage.zeropage / continue.mapped
        if ret < 0:
            return ret
        return 0 if ret == length else -EAGAIN
    if name == "WRITEPROTECT":
        start, length, mode = await r.get(3)
        return await uffd.userfaultfd_writeprotect(k, ctx, start, length, mode)
    if name == "POISON":
        return await userfaultfd_poison(sc, ctx, r)
    # MOVE (userfaultfd_move(), 6.8+)
    if not k.profile.uffdio_move:
        return -EINVAL
    dst, src, length, mode = await r.get(4)
    ret = await uffd.move_pages(k, ctx.mm, dst, src, length, mode)
    await r.put(4, ret)                                  # uffdio_move.move
    if ret < 0:
        return ret
    if not mode & uffd.UFFDIO_MOVE_MODE_DONTWAKE:
        await uffd.wake_userfault(k, ctx, dst, ret)
    return 0 if ret == length else -EAGAIN


async def userfaultfd_api(k, ctx: uffd.UserfaultfdCtx, r: _Regs) -> int:
    """userfaultfd_api(): api must be UFFD_API and the features requested a subset of what
    is available (-EINVAL); write back every available feature and UFFD_API_IOCTLS, then
    enable the requested features; a second UFFDIO_API is -EINVAL. On error the struct is
    zeroed in user memory (err_out)."""
    api, features, _ = await r.get(3)
    available = uffd_api_features(k)
    if api != UFFD_API or features & ~available or ctx.api_done:
        for i in range(3):
            await r.put(i, 0)
        return -EINVAL
    await r.put(1, available)
    await r.put(2, UFFD_API_IOCTLS)
    ctx.features = features
    ctx.api_done = True
    return 0


async def userfaultfd_copy(sc, ctx: uffd.UserfaultfdCtx, r: _Regs) -> int:
    """userfaultfd_copy(): validate dst (page-aligned, non-empty, below TASK_SIZE) and src
    (no wrap), the mode (DONTWAKE, WP), then mfill_atomic_copy(); the bytes copied (or the
    -errno) go to uffdio_copy.copy; a short copy is -EAGAIN. The source bytes come from the
    caller's mm (mfill_atomic_pte_copy()'s copy_from_user(), done here up front: its
    -ENOENT drop-the-locks-and-copy retry is the same copy)."""
    k = sc.k
    dst, src, length, mode = await r.get(4)
    page = k.page_size
    if dst % page or length % page or not length or dst + length > sc.arch.task_size:
        return -EINVAL                                   # validate_range()
    if (src + length) & 0xFFFFFFFFFFFFFFFF <= src:       # src + len wraps
        return -EINVAL
    if mode & ~(uffd.UFFDIO_COPY_MODE_DONTWAKE | uffd.UFFDIO_COPY_MODE_WP):
        return -EINVAL
    data = await copy_from_user(sc.machine, sc.mm, src, length)
    ret = await uffd.userfaultfd_mfill(k, ctx, uffd.MFILL_ATOMIC_COPY, dst, length, mode, data)
    await r.put(4, ret)                                  # put_user(ret, &user_uffdio_copy->copy)
    if ret < 0:
        return ret
    return 0 if ret == length else -EAGAIN


async def userfaultfd_poison(sc, ctx: uffd.UserfaultfdCtx, r: _Regs) -> int:
    """userfaultfd_poison() (6.6): before 6.6 the command is unknown (-EINVAL). -EAGAIN
    while mmap_changing (returned before the struct is read: 6.6 writes nothing back then),
    else copy in {range, mode}, validate, mfill_atomic_poison(), put_user() of the bytes
    poisoned (or the -errno) to uffdio_poison.updated; the range done is woken unless
    DONTWAKE; a short count is -EAGAIN."""
    k = sc.k
    if not uffd.uffdio_poison_supported(k):
        return -EINVAL
    if ctx.mmap_changing:
        k.stats["uffd_mmap_changing_eagain"] += 1
        return -EAGAIN
    start, length, mode = await r.get(3)                # the last 8 bytes (updated) are not read
    err = uffd.validate_range(k, start, length)
    if err or mode & ~uffd.UFFDIO_POISON_MODE_DONTWAKE:
        return err or -EINVAL                            # `goto out`: nothing written back
    ret = await uffd.userfaultfd_poison(k, ctx, start, length, mode)
    await r.put(3, ret)                                  # put_user(ret, &user_uffdio_poison->updated)
    if ret < 0:
        return ret
    return 0 if ret == length else -EAGAIN


async def userfaultfd_read(sc, f: UffdFile, buf: int, count: int) -> int:
    """userfaultfd_read(): -EINVAL before UFFDIO_API or for a buffer smaller than one
    uffd_msg; block for the first message only (unless O_NONBLOCK: -EAGAIN), then take
    as many more as are pending and fit. Returns the bytes read."""
    ctx = f.ctx
    if not ctx.api_done:
        return -EINVAL
    no_wait = bool(f.flags & O_NONBLOCK)
    ret = 0

    def resolve_userfault_fork(new: uffd.UserfaultfdCtx) -> int:
        # anon_inode_getfd("[userfaultfd]", ..., O_RDWR | (new->flags & UFFD_SHARED_FCNTL_FLAGS))
        # in the reader's file table
        sc.k.stats["uffd_fork_fds"] += 1
        return sc.proc.install_fd(UffdFile(new, new.file_flags))

    while True:
        if count < uffd.UFFD_MSG_SIZE:
            return ret if ret else -EINVAL
        uwq = await uffd.userfaultfd_ctx_read(sc.k, ctx, no_wait, resolve_userfault_fork)
        if isinstance(uwq, int):
            return ret if ret else uwq
        if isinstance(uwq, uffd.UffdEventMsg):
            msg = uffd.uffd_msg_event(uwq, sc.arch.big_endian)
        else:
            msg = uffd.uffd_msg_pagefault(ctx, uwq, sc.k.page_size, sc.arch.big_endian)
        await copy_to_user(sc.machine, sc.mm, buf, msg)
        ret += len(msg)
        buf += len(msg)
        count -= len(msg)
        no_wait = True


async def userfaultfd_close(k, f: UffdFile) -> None:
    """fput() of the file: userfaultfd_release() when the last reference goes."""
    f.refs -= 1
    if f.refs <= 0:
        await uffd.userfaultfd_release(k, f.ctx)


def userfaultfd_exit_files(f: UffdFile) -> None:
    """exit_files() of the file's last holder (synchronous: the mm goes with the process):
    mark the context released and wake every waiter, as userfaultfd_release() would."""
    f.refs -= 1
    if f.refs <= 0:
        ctx = f.ctx
        ctx.released = True
        for wqh in (ctx.fault_pending_wqh, ctx.fault_wqh):
            for uwq in wqh:
                uwq.waken = True
            wqh.clear()
