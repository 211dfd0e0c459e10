"""Processes and threads as the Linux user ABI sees them."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

SIGILL, SIGTRAP, SIGBUS, SIGKILL, SIGSEGV = 4, 5, 7, 9, 11
SIGNAL_NAMES = {SIGILL: "SIGILL", SIGTRAP: "SIGTRAP", SIGBUS: "SIGBUS", SIGKILL: "SIGKILL",
                SIGSEGV: "SIGSEGV"}


@dataclass
class SignalReport:
    """Why a process died of a signal, for the user."""

    signal: int
    code: str             # SEGV_MAPERR, SEGV_ACCERR, ILL_ILLOPC, ...
    address: int | None
    pc: int
    access: str
    instruction: str      # capstone disassembly of the instruction at pc
    detail: str = ""

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.signal, f"signal {self.signal}")

    def format(self) -> str:
        where = f" at address {self.address:#x}" if self.address is not None else ""
        lines = [f"{self.name} ({self.code}){where}: {self.access} by instruction at pc {self.pc:#x}",
                 f"  {self.pc:#x}: {self.instruction}"]
        if self.detail:
            lines.append(f"  {self.detail}")
        return "\n".join(lines)


@dataclass(eq=False)
class Thread:
    tid: int
    process: Process
    vcpu: object = None
    task: object = None
    exited: bool = False
    ctx: object = None               # saved Unicorn context while another thread has the vCPU
    clear_child_tid: int = 0         # CLONE_CHILD_CLEARTID: zeroed and futex-woken at exit


@dataclass(eq=False)
class Process:
    pid: int
    path: str
    argv: list[str]
    mm: object
    threads: list[Thread] = field(default_factory=list)
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    signal: SignalReport | None = None
    unknown_syscalls: Counter = field(default_factory=Counter)
    syscalls: Counter = field(default_factory=Counter)
    on_output: Callable[[int, bytes], None] | None = None
    files: dict[int, object] = field(default_factory=lambda: {0: "stdin", 1: "stdout", 2: "stderr"})
    parent: Process | None = None    # the forking process (wait4 reaps the children)
    children: list[Process] = field(default_factory=list)
    child_exit: object = None        # a WaitQueue posted when a child exits (SIGCHLD)
    reaped: bool = False

    def install_fd(self, file: object) -> int:
        """fd_install() at the lowest free descriptor."""
        fd = 0
        while fd in self.files:
            fd += 1
        self.files[fd] = file
        file.refs += 1
        return fd

    def wait_status(self) -> int:
        """The wstatus wait4() reports: exit code << 8, or the killing signal."""
        if self.signal is not None:
            return self.signal.signal & 0x7F
        return (self.exit_code or 0) << 8

    def close_files(self, k) -> None:
        """exit_files(): drop every open file."""
        from emu.linux.uffd import UffdFile, userfaultfd_exit_files
        from mm_core.shmem import ShmemInode, iput
        for fd in list(self.files):
            f = self.files.pop(fd)
            if isinstance(f, ShmemInode):
                iput(k, f)
            elif isinstance(f, UffdFile):
                userfaultfd_exit_files(f)

    @property
    def exited(self) -> bool:
        return self.exit_code is not None

    def exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code & 0xFF

    def kill(self, report: SignalReport) -> None:
        if self.exit_code is None:
            self.signal = report
            self.exit_code = 128 + report.signal

    def output(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).extend(data)
        if self.on_output is not None:
            self.on_output(fd, data)
