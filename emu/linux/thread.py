"""The task of one guest thread: user mode is Unicorn, kernel mode is mm_core.

    loop:
        stop = await run_user(vcpu, quantum)
        fault   -> do_user_addr_fault(); SIGSEGV/SIGBUS if it cannot be resolved
        syscall -> the handler in emu.linux.syscalls; result into the ABI's register
        intr    -> SIGILL / SIGTRAP
"""
from __future__ import annotations

from capstone import Cs

from emu.arch import Access, Translation
from emu.linux import syscalls
from emu.linux.process import SIGBUS, SIGILL, SIGKILL, SIGSEGV, SignalReport
from emu.linux.uaccess import EFault, copy_from_user
from emu.sched.traps import choose, run_user
from mm_core.memory import FaultResult, do_user_addr_fault, exit_mm

# a fault that mm_core reports fixed but that keeps coming back is a livelock, not progress
MAX_REPEATED_FAULTS = 16
_ACCESS_WORDS = {Access.R: "read", Access.W: "write", Access.X: "instruction fetch"}


async def guest_thread(machine, thread) -> None:
    proc, vcpu, arch, k = thread.process, thread.vcpu, machine.arch, machine.kernel
    abi = arch.syscall_abi
    names = {nr: name for name, nr in abi.numbers.items()}
    ctx = syscalls.SyscallContext(machine, thread)
    last_fault, repeats = None, 0
    while not thread.exited and not proc.exited:
        # quantum length: full, 1/8 or 1/64 (a data choice; always full unless exploring)
        quantum = max(1, machine.quantum >> (3 * await choose(3, "quantum")))
        stop = await run_user(thread, quantum)
        if stop.kind == "quantum":
            continue
        if stop.kind == "tlb_miss":                  # stepped walks: the MMU runs as a task
            result = await vcpu.hw_walk_stepped(stop.va, stop.access)
            if type(result) is Translation:
                continue
            vcpu.count_fault(result)
            stop.kind, stop.fault = "fault", result
        if stop.kind == "fault":
            where = (stop.pc, stop.va, stop.access)
            repeats = repeats + 1 if where == last_fault else 0
            last_fault = where
            result = await do_user_addr_fault(k, proc.mm, stop.va, stop.access)
            if result is FaultResult.OK and repeats < MAX_REPEATED_FAULTS:
                continue
            signal = {FaultResult.SIGBUS: SIGBUS, FaultResult.OOM: SIGKILL}.get(result, SIGSEGV)
            code = "fault loop" if result is FaultResult.OK else result.value
            proc.kill(_report(machine, vcpu, signal, code, stop.va, stop.pc, stop.access,
                              f"hardware fault: {stop.fault.kind.value} at level "
                              f"{arch.levels[stop.fault.level].name}"))
            break
        last_fault = None
        if stop.kind == "syscall":
            # the syscall instruction, read as the kernel would (a fault makes an old pte
            # young again: s390x's clear_refs leaves even the text page invalid)
            try:
                insn = await copy_from_user(machine, proc.mm, stop.pc, min(8, 4096 - (stop.pc & 4095)))
            except EFault:
                insn = b""

            def fetch(va: int, n: int, pc: int = stop.pc, insn: bytes = insn) -> bytes:
                if pc <= va and va + n <= pc + len(insn):
                    return insn[va - pc:va - pc + n]
                return machine.read_user(proc.mm, va, n)
            nr, args = arch.syscall_args(vcpu.uc, fetch)
            if abi.pc_advance:
                vcpu.pc = stop.pc + abi.pc_advance
            ret = await syscalls.dispatch(ctx, nr, args, names)
            if not (thread.exited or proc.exited):
                machine.bind(thread)             # another thread may have had the vCPU meanwhile
                arch.set_syscall_result(vcpu.uc, ret)
            continue
        code = f"interrupt {stop.intno}" if stop.kind == "intr" else stop.error
        proc.kill(_report(machine, vcpu, SIGILL, code, None, stop.pc, Access.X, ""))
        break
    thread.exited = True
    if thread.vcpu.loaded is thread:
        thread.vcpu.loaded = None
    if all(t.exited for t in proc.threads):
        await exit_mm(k, proc.mm)
        proc.close_files(k)
        if proc.parent is not None and proc.parent.child_exit is not None:
            proc.parent.child_exit.post()           # do_notify_parent(): SIGCHLD, wake wait4


def _report(machine, vcpu, signal: int, code: str, address: int | None, pc: int, access: Access,
            detail: str) -> SignalReport:
    return SignalReport(signal, code, address, pc, _ACCESS_WORDS.get(access, str(access)),
                        disassemble(machine, vcpu.mm, pc), detail)


def disassemble(machine, mm, pc: int) -> str:
    """The instruction at ``pc``, disassembled with capstone (or why it could not be)."""
    arch = machine.arch
    code = machine.read_user(mm, pc, 16)
    if not code:
        return "(instruction not readable)"
    md = Cs(arch.cs_arch, arch.cs_mode)
    for insn in md.disasm(code, pc):
        return f"{insn.mnemonic} {insn.op_str}".strip() + f"    ({insn.bytes.hex()})"
    return f"(undecodable bytes {code[:4].hex()})"
