"""/proc/PID files a guest can open (fs/proc/base.c + fs/proc/task_mmu.c): the
page-table walkers of mm_core.task_mmu behind open/read/pread64/lseek/write/close.

    /proc/self/smaps, /proc/PID/smaps_rollup   seq_file text, generated at a read from 0
    /proc/self/pagemap                         64-bit entries in the guest's byte order
    /proc/self/clear_refs                      write "1".."5"

The guest has no CAP_SYS_ADMIN (there are no credentials here): pagemap shows no pfns,
as for any unprivileged reader since 4.2. Other /proc paths are -ENOENT.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from errno import EACCES, EBADF, EINVAL, ENOENT

from mm_core import task_mmu

O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2

# name -> (readable, writable) as the files' modes allow (0444 / 0400 / 0200)
PROC_FILES = {"smaps": (True, False), "smaps_rollup": (True, False), "pagemap": (True, False),
              "clear_refs": (False, True)}


@dataclass(eq=False)
class ProcFile:
    """An open /proc/PID/<name> of process ``proc``."""

    proc: object
    name: str
    flags: int
    pos: int = 0
    text: bytes | None = None          # the seq_file buffer of a text file
    refs: int = 0

    @property
    def readable(self) -> bool:
        return self.flags & O_ACCMODE in (O_RDONLY, O_RDWR)

    @property
    def writable(self) -> bool:
        return self.flags & O_ACCMODE in (O_WRONLY, O_RDWR)


def proc_open(machine, caller, path: str, flags: int) -> ProcFile | int:
    """proc_pid_lookup() + the file's open: "/proc/self/X", "/proc/thread-self/X" or
    "/proc/<pid>/X" of a live process."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != "proc":
        return -ENOENT
    who, name = parts[2], parts[3]
    if who in ("self", "thread-self"):
        proc = caller
    elif who.isdigit():
        proc = next((p for p in machine.processes if p.pid == int(who) and not p.exited), None)
        if proc is None:
            return -ENOENT
    else:
        return -ENOENT
    if name not in PROC_FILES:
        return -ENOENT
    readable, writable = PROC_FILES[name]
    acc = flags & O_ACCMODE
    if (acc in (O_RDONLY, O_RDWR) and not readable) or (acc in (O_WRONLY, O_RDWR) and not writable):
        return -EACCES
    return ProcFile(proc, name, flags)


async def _text(k, f: ProcFile) -> bytes:
    mm = f.proc.mm
    if f.name == "smaps":
        return "".join(rec.render() for rec in await task_mmu.show_smaps(k, mm)).encode()
    return (await task_mmu.show_smaps_rollup(k, mm)).render().encode()


async def proc_read(k, f: ProcFile, count: int, pos: int, big_endian: bool) -> bytes | int:
    """The file's read at ``pos`` (seq_read for the text files: the text is made afresh by
    a read from offset 0; pagemap_read for pagemap)."""
    if not f.readable:
        return -EBADF
    if f.name == "pagemap":
        count -= count % task_mmu.PM_ENTRY_BYTES
        entries = await task_mmu.pagemap_read(k, f.proc.mm, pos, count, show_pfn=False)
        if isinstance(entries, int):
            return entries
        return struct.pack((">" if big_endian else "<") + f"{len(entries)}Q", *entries)
    if f.text is None or pos == 0:
        f.text = await _text(k, f)
    return f.text[pos:pos + count]


async def proc_write(k, f: ProcFile, data: bytes) -> int:
    """clear_refs_write(): kstrtoint of the stripped buffer (at most PROC_NUMBUF - 1 bytes)."""
    if not f.writable:
        return -EBADF
    text = data[:12].split(b"\0")[0].strip()
    try:
        value = int(text.decode())
    except (UnicodeDecodeError, ValueError):
        return -EINVAL
    ret = await task_mmu.clear_refs_write(k, f.proc.mm, value)
    return ret if ret < 0 else len(data)


def proc_lseek(f: ProcFile, offset: int, whence: int) -> int:
    """seq_lseek() for the text files, mem_lseek() for pagemap (any offset, SEEK_END none)."""
    if whence == SEEK_SET:
        new = offset
    elif whence == SEEK_CUR:
        new = f.pos + offset
    else:
        return -EINVAL
    if new < 0:
        return -EINVAL
    f.pos = new
    return new
