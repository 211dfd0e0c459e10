"""The Linux system calls emu implements, by name. Each arch plugin maps its own numbers
to these names (ArchSpec.syscall_abi.numbers); anything else returns -ENOSYS and is
counted in the run summary."""
from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from emu.linux import procfs, uffd
from emu.linux.uaccess import EFault, copy_from_user, copy_to_user, strncpy_from_user
from emu.sched import traps
from mm_core import madvise, shmem
from mm_core import mincore as mm_mincore
from mm_core import mlock as mm_mlock
from mm_core import mmap as mm_mmap
from mm_core import mprotect as mm_mprotect
from mm_core import mremap as mm_mremap
from mm_core.mmap import EBADF, EFAULT, EINVAL, ENOSYS

ENOTTY = 25
ESPIPE = 29
ENODEV = 19
Handler = Callable[..., Awaitable[int]]
SYSCALLS: dict[str, Handler] = {}


def syscall(name: str):
    def register(fn: Handler) -> Handler:
        SYSCALLS[name] = fn
        return fn
    return register


class SyscallContext:
    """What a handler needs: the machine, the calling thread and its process."""

    def __init__(self, machine, thread) -> None:
        self.machine = machine
        self.thread = thread
        self.proc = thread.process
        self.mm = self.proc.mm
        self.k = machine.kernel
        self.arch = machine.arch

    def words(self, data: bytes) -> list[int]:
        fmt = (">" if self.arch.big_endian else "<") + f"{len(data) // 8}Q"
        return list(struct.unpack(fmt, data))


async def dispatch(ctx: SyscallContext, nr: int, args: list[int], names: dict[int, str]) -> int:
    name = names.get(nr)
    handler = SYSCALLS.get(name) if name else None
    if handler is None:
        ctx.proc.unknown_syscalls[name or f"#{nr}"] += 1
        return -ENOSYS
    ctx.proc.syscalls[name] += 1
    try:
        return await handler(ctx, *args)
    except EFault:
        return -EFAULT


def _signed(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


@syscall("write")
async def sys_write(ctx, fd, buf, count, *_):
    f = ctx.proc.files.get(_signed(fd))
    if isinstance(f, procfs.ProcFile):
        return await procfs.proc_write(ctx.k, f, await copy_from_user(ctx.machine, ctx.mm, buf,
                                                                      min(count, 4096)))
    if fd not in (1, 2):
        return -EBADF
    count = min(count, 1 << 20)
    ctx.proc.output(fd, await copy_from_user(ctx.machine, ctx.mm, buf, count))
    return count


@syscall("writev")
async def sys_writev(ctx, fd, iov, iovcnt, *_):
    if fd not in (1, 2):
        return -EBADF
    if iovcnt > 1024:
        return -EINVAL
    total = 0
    vec = ctx.words(await copy_from_user(ctx.machine, ctx.mm, iov, 16 * iovcnt))
    for base, length in zip(vec[0::2], vec[1::2], strict=True):
        ctx.proc.output(fd, await copy_from_user(ctx.machine, ctx.mm, base, length))
        total += length
    return total


@syscall("read")
async def sys_read(ctx, fd, buf, count, *_):
    f = ctx.proc.files.get(_signed(fd))
    if isinstance(f, procfs.ProcFile):
        data = await procfs.proc_read(ctx.k, f, min(count, 1 << 20), f.pos, ctx.arch.big_endian)
        if isinstance(data, int):
            return data
        await copy_to_user(ctx.machine, ctx.mm, buf, data)
        f.pos += len(data)
        return len(data)
    if isinstance(f, uffd.UffdFile):
        return await uffd.userfaultfd_read(ctx, f, buf, count)
    return 0 if fd == 0 else -EBADF          # stdin is empty


@syscall("pread64")
async def sys_pread64(ctx, fd, buf, count, pos, *_):
    f = ctx.proc.files.get(_signed(fd))
    if not isinstance(f, procfs.ProcFile):
        return -EBADF if f is None else -ESPIPE
    if _signed(pos) < 0:
        return -EINVAL
    data = await procfs.proc_read(ctx.k, f, min(count, 1 << 20), pos, ctx.arch.big_endian)
    if isinstance(data, int):
        return data
    await copy_to_user(ctx.machine, ctx.mm, buf, data)
    return len(data)


@syscall("lseek")
async def sys_lseek(ctx, fd, offset, whence, *_):
    f = ctx.proc.files.get(_signed(fd))
    if not isinstance(f, procfs.ProcFile):
        return -EBADF if f is None else -ESPIPE
    return procfs.proc_lseek(f, _signed(offset), whence)


@syscall("openat")
async def sys_openat(ctx, dirfd, upath, flags, mode, *_):
    """openat(): only the /proc/PID files of emu/linux/procfs.py exist (absolute paths)."""
    path = (await strncpy_from_user(ctx.machine, ctx.mm, upath, 4096)).decode(errors="replace")
    if not path.startswith("/"):
        return -procfs.ENOENT
    f = procfs.proc_open(ctx.machine, ctx.proc, path, flags)
    if isinstance(f, int):
        return f
    return ctx.proc.install_fd(f)


@syscall("exit")
async def sys_exit(ctx, code, *_):
    """exit(): this thread only; CLONE_CHILD_CLEARTID's word is zeroed and futex-woken
    (mm_release), which is how pthread_join() learns of it."""
    thread = ctx.thread
    if thread.clear_child_tid:
        addr, thread.clear_child_tid = thread.clear_child_tid, 0
        try:
            await copy_to_user(ctx.machine, ctx.mm, addr, bytes(4))
            ctx.machine.futexes.wake(ctx.mm, addr, 1)
        except EFault:
            pass
    thread.exited = True
    if all(t.exited for t in ctx.proc.threads):
        ctx.proc.exit(code)
    return 0


@syscall("exit_group")
async def sys_exit_group(ctx, code, *_):
    for t in ctx.proc.threads:
        t.exited = True
    ctx.machine.futexes.wake_all_of(ctx.proc.threads)
    ctx.proc.exit(code)
    return 0


# clone flags (include/uapi/linux/sched.h)
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SETTLS = 0x10000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x100000, 0x200000, 0x1000000
FUTEX_WAIT, FUTEX_WAKE, FUTEX_PRIVATE_FLAG = 0, 1, 128
EAGAIN = 11
CSIGNAL, SIGCHLD = 0xFF, 17
WNOHANG, ECHILD = 1, 10


@syscall("clone")
async def sys_clone(ctx, *args):
    """clone() of a thread (CLONE_VM | CLONE_THREAD | CLONE_SIGHAND): a new task on a
    vCPU, sharing the mm. Processes (fork) are not modelled yet: -ENOSYS."""
    a = dict(zip(ctx.arch.clone_args, args, strict=False))
    flags = a["flags"]
    if not flags & (CLONE_VM | CLONE_THREAD | CLONE_SIGHAND | CLONE_FILES | CLONE_FS):
        return await _fork(ctx, flags, a)
    need = CLONE_VM | CLONE_THREAD | CLONE_SIGHAND
    if flags & need != need:
        return -ENOSYS
    child = ctx.machine.clone_thread(ctx.thread, a["newsp"], a["tls"] if flags & CLONE_SETTLS else None)
    tid = child.tid.to_bytes(4, "big" if ctx.arch.big_endian else "little")
    if flags & CLONE_PARENT_SETTID:
        await copy_to_user(ctx.machine, ctx.mm, a["parent_tid"], tid)
    if flags & CLONE_CHILD_SETTID:
        await copy_to_user(ctx.machine, ctx.mm, a["child_tid"], tid)
    if flags & CLONE_CHILD_CLEARTID:
        child.clear_child_tid = a["child_tid"]
    ctx.k.stats["threads_created"] += 1
    return child.tid


async def _fork(ctx, flags: int, a: dict) -> int:
    """kernel_clone() of a process (fork, or clone(SIGCHLD)): copy_mm() -> dup_mmap() (the
    page tables copied where mm_core/fork.py says, COW on both sides), the files shared
    (fds dup'd), a new thread on a vCPU with the caller's registers returning 0. Exit
    signals other than SIGCHLD, CLONE_VFORK, namespaces and the like are not modelled."""
    if flags & ~(CSIGNAL | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | CLONE_PARENT_SETTID) \
            or flags & CSIGNAL not in (0, SIGCHLD):
        return -EINVAL
    child = await ctx.machine.fork_process(ctx.thread, a["newsp"])
    if isinstance(child, int):
        return child
    pid = child.pid.to_bytes(4, "big" if ctx.arch.big_endian else "little")
    if flags & CLONE_PARENT_SETTID:
        await copy_to_user(ctx.machine, ctx.mm, a["parent_tid"], pid)
    if flags & CLONE_CHILD_SETTID:
        await copy_to_user(ctx.machine, child.mm, a["child_tid"], pid)
    ctx.k.stats["processes_forked"] += 1
    return child.pid


@syscall("wait4")
async def sys_wait4(ctx, pid, wstatus, options, rusage, *_):
    """wait4(): reap an exited child (pid -1: any, or that pid); WNOHANG answers 0 while
    none has exited, otherwise the caller sleeps until a child exits."""
    pid = _signed(pid)
    if options & ~WNOHANG or rusage:
        return -EINVAL
    proc = ctx.proc
    while True:
        mine = [c for c in proc.children if not c.reaped and (pid == -1 or c.pid == pid)]
        if not mine:
            return -ECHILD
        done = next((c for c in mine if c.exited and all(t.exited for t in c.threads)), None)
        if done is not None:
            done.reaped = True
            if wstatus:
                status = done.wait_status().to_bytes(4, "big" if ctx.arch.big_endian else "little")
                await copy_to_user(ctx.machine, ctx.mm, wstatus, status)
            return done.pid
        if options & WNOHANG:
            return 0
        await traps.wait(proc.child_exit)


@syscall("futex")
async def sys_futex(ctx, uaddr, op, val, *_):
    cmd = op & ~FUTEX_PRIVATE_FLAG
    if uaddr & 3:
        return -EINVAL
    if cmd == FUTEX_WAIT:
        word = int.from_bytes(await copy_from_user(ctx.machine, ctx.mm, uaddr, 4),
                              "big" if ctx.arch.big_endian else "little")
        if word != val & 0xFFFFFFFF:
            return -EAGAIN
        waiter = ctx.machine.futexes.enqueue(ctx.mm, uaddr, ctx.thread)
        await traps.wait(waiter)
        return 0
    if cmd == FUTEX_WAKE:
        return ctx.machine.futexes.wake(ctx.mm, uaddr, val)
    return -ENOSYS


@syscall("sched_yield")
async def sys_sched_yield(ctx, *_):
    await traps.sched_point("sched_yield", ctx.thread)
    return 0


@syscall("mmap")
async def sys_mmap(ctx, addr, length, prot, flags, fd, offset, *_):
    if ctx.arch.syscall_abi.old_mmap:        # s390x old_mmap: one pointer to six longs
        addr, length, prot, flags, fd, offset = ctx.words(
            await copy_from_user(ctx.machine, ctx.mm, addr, 48))
    if offset % 4096:
        return -EINVAL
    inode = None
    if not flags & mm_mmap.MAP_ANONYMOUS:
        inode = ctx.proc.files.get(_signed(fd))
        if not isinstance(inode, shmem.ShmemInode):
            return -EBADF if inode is None else -ENODEV
    return await mm_mmap.do_mmap(ctx.k, ctx.mm, addr, length, prot & 7, flags, inode, offset >> 12)


@syscall("memfd_create")
async def sys_memfd_create(ctx, uname, flags, *_):
    name = (await strncpy_from_user(ctx.machine, ctx.mm, uname, 249)).decode(errors="replace")
    if flags & ~0xF:                          # MFD_CLOEXEC | ALLOW_SEALING | HUGETLB | NOEXEC_SEAL
        return -EINVAL
    return ctx.proc.install_fd(shmem.memfd_create(ctx.k, f"memfd:{name}"))


@syscall("ftruncate")
async def sys_ftruncate(ctx, fd, length, *_):
    inode = ctx.proc.files.get(_signed(fd))
    if not isinstance(inode, shmem.ShmemInode):
        return -EBADF if inode is None else -EINVAL
    if _signed(length) < 0:
        return -EINVAL
    await shmem.shmem_setattr_size(ctx.k, inode, length)
    return 0


@syscall("close")
async def sys_close(ctx, fd, *_):
    inode = ctx.proc.files.pop(_signed(fd), None)
    if inode is None:
        return -EBADF
    if isinstance(inode, shmem.ShmemInode):
        shmem.iput(ctx.k, inode)
    elif isinstance(inode, uffd.UffdFile):
        await uffd.userfaultfd_close(ctx.k, inode)
    return 0


@syscall("userfaultfd")
async def sys_userfaultfd(ctx, flags, *_):
    """userfaultfd(2): an fd for a new userfaultfd context of the caller's mm (emu/linux/uffd.py)."""
    f = uffd.new_userfaultfd(ctx.k, ctx.mm, flags & 0xFFFFFFFF)
    if isinstance(f, int):
        return f
    return ctx.proc.install_fd(f)


@syscall("mlock")
async def sys_mlock(ctx, addr, length, *_):
    return await mm_mlock.do_mlock(ctx.k, ctx.mm, addr, _signed(length))


@syscall("mlock2")
async def sys_mlock2(ctx, addr, length, flags, *_):
    return await mm_mlock.do_mlock(ctx.k, ctx.mm, addr, _signed(length), flags)


@syscall("munlock")
async def sys_munlock(ctx, addr, length, *_):
    return await mm_mlock.do_munlock(ctx.k, ctx.mm, addr, _signed(length))


@syscall("madvise")
async def sys_madvise(ctx, addr, length, behavior, *_):
    return await madvise.do_madvise(ctx.k, ctx.mm, addr, length, _signed(behavior))


@syscall("munmap")
async def sys_munmap(ctx, addr, length, *_):
    return await mm_mmap.do_munmap(ctx.k, ctx.mm, addr, length)


@syscall("mprotect")
async def sys_mprotect(ctx, addr, length, prot, *_):
    if prot & ~7:
        return -EINVAL
    return await mm_mprotect.do_mprotect(ctx.k, ctx.mm, addr, length, prot)


@syscall("mremap")
async def sys_mremap(ctx, addr, old_len, new_len, flags, new_addr, *_):
    return await mm_mremap.do_mremap(ctx.k, ctx.mm, addr, old_len, new_len, flags, new_addr)


@syscall("mincore")
async def sys_mincore(ctx, addr, length, vec, *_):
    result = await mm_mincore.do_mincore(ctx.k, ctx.mm, addr, length)
    if isinstance(result, int):
        return result
    await copy_to_user(ctx.machine, ctx.mm, vec, bytes(result))
    return 0


@syscall("brk")
async def sys_brk(ctx, brk, *_):
    return await mm_mmap.do_brk(ctx.k, ctx.mm, brk)


@syscall("getpid")
async def sys_getpid(ctx, *_):
    return ctx.proc.pid


@syscall("gettid")
async def sys_gettid(ctx, *_):
    return ctx.thread.tid


@syscall("set_tid_address")
async def sys_set_tid_address(ctx, *_):
    return ctx.thread.tid


@syscall("set_robust_list")
async def sys_set_robust_list(ctx, *_):
    return 0


@syscall("ioctl")
async def sys_ioctl(ctx, fd, cmd=0, arg=0, *_):
    f = ctx.proc.files.get(_signed(fd))
    if isinstance(f, uffd.UffdFile):
        return await uffd.userfaultfd_ioctl(ctx, f, cmd, arg)
    if f is None:
        return -EBADF
    return -ENOTTY


@syscall("uname")
async def sys_uname(ctx, buf, *_):
    machine = ctx.arch.uname_machine or ctx.arch.name
    fields = ["Linux", "emu", f"{ctx.k.profile.name}.0-emu", "#1 SMP emu", machine, "(none)"]
    data = b"".join(f.encode()[:64].ljust(65, b"\0") for f in fields)
    await copy_to_user(ctx.machine, ctx.mm, buf, data)
    return 0
