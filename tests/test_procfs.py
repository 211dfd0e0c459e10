"""The guest's /proc/PID files (emu/linux/procfs.py): which paths exist, who may open
them how, and that reads go through mm_core.task_mmu's walkers."""
from __future__ import annotations

import struct

from conftest import workload

from emu.linux import procfs
from emu.machine import Machine
from emu.sched.loop import run_sync
from mm_core import task_mmu


def _machine_with_process(arch: str = "x86_64"):
    m = Machine(arch=arch, mem="32M")
    p = m.spawn(workload(arch, "hello"), ["hello"])
    return m, p


def test_only_the_task_mmu_files_of_live_processes_exist() -> None:
    m, p = _machine_with_process()
    assert isinstance(procfs.proc_open(m, p, "/proc/self/smaps", procfs.O_RDONLY), procfs.ProcFile)
    assert isinstance(procfs.proc_open(m, p, f"/proc/{p.pid}/pagemap", procfs.O_RDONLY), procfs.ProcFile)
    assert procfs.proc_open(m, p, "/proc/self/environ", procfs.O_RDONLY) == -procfs.ENOENT
    assert procfs.proc_open(m, p, "/etc/passwd", procfs.O_RDONLY) == -procfs.ENOENT
    assert procfs.proc_open(m, p, "/proc/99999/smaps", procfs.O_RDONLY) == -procfs.ENOENT
    # clear_refs is write-only (0200), the others read-only
    assert procfs.proc_open(m, p, "/proc/self/clear_refs", procfs.O_RDONLY) == -procfs.EACCES
    assert procfs.proc_open(m, p, "/proc/self/smaps", procfs.O_WRONLY) == -procfs.EACCES


def test_pagemap_reads_the_walk_in_the_guest_byte_order_without_pfns() -> None:
    for arch, fmt in (("x86_64", "<Q"), ("s390x", ">Q")):
        m, p = _machine_with_process(arch)
        f = procfs.proc_open(m, p, "/proc/self/pagemap", procfs.O_RDONLY)
        stack_page = m.stack_top - m.kernel.page_size        # the argv/env page: present
        pos = stack_page // m.kernel.page_size * 8
        data = run_sync(procfs.proc_read(m.kernel, f, 8, pos, m.arch.big_endian))
        (entry,) = struct.unpack(fmt, data)
        assert entry & task_mmu.PM_PRESENT and entry & ((1 << 55) - 1) == 0   # no CAP_SYS_ADMIN: no pfn
        # whole entries only
        assert run_sync(procfs.proc_read(m.kernel, f, 7, pos, m.arch.big_endian)) == b""


def test_smaps_text_is_made_at_a_read_from_zero_and_continues_from_the_position() -> None:
    m, p = _machine_with_process()
    f = procfs.proc_open(m, p, "/proc/self/smaps_rollup", procfs.O_RDONLY)
    first = run_sync(procfs.proc_read(m.kernel, f, 10, 0, False))
    rest = run_sync(procfs.proc_read(m.kernel, f, 1 << 16, 10, False))
    assert b"[rollup]" in first + rest and b"Rss:" in rest
    assert procfs.proc_lseek(f, 5, procfs.SEEK_SET) == 5
    assert procfs.proc_lseek(f, -6, procfs.SEEK_CUR) == -procfs.EINVAL


def test_clear_refs_takes_a_number_and_rejects_the_rest() -> None:
    m, p = _machine_with_process()
    f = procfs.proc_open(m, p, "/proc/self/clear_refs", procfs.O_WRONLY)
    assert run_sync(procfs.proc_write(m.kernel, f, b"1\n")) == 2
    assert run_sync(procfs.proc_write(m.kernel, f, b"nonsense")) == -procfs.EINVAL
    assert run_sync(procfs.proc_write(m.kernel, f, b"9")) == -procfs.EINVAL
