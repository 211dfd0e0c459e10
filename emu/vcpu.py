"""One vCPU: a Unicorn instance in virtual-TLB mode whose every translation comes from
the arch plugin's walk, through this vCPU's TLB model.

The fill hook is registered as a raw ctypes callback (cheaper than the binding's
wrapper). A TLB hit is a dict lookup; a miss runs the plugin's hardware walk inline; a
fault refuses the fill, which makes ``emu_start`` stop with the PC on the faulting
instruction (spec/unicorn.md §2), and the vCPU's task enters mm_core. Syscalls and other
exceptions stop the run the same way.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from unicorn import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_PROT_ALL,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn.unicorn_py3.unicorn import uclib

from emu.arch import PAGE_SHIFT, Access, ArchSpec, Fault, ReadEntry, Translation, run_walk
from emu.physmem import PhysMem
from emu.sched.traps import sched_point
from emu.tlb import TLB

_FILL_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                               ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p)
# uc_mem_type of the access (UC_MEM_READ=16, WRITE=17, FETCH=18) -> Access
# (plain ints: IntFlag arithmetic costs ~1 us a fill, more than the rest of the hit path)
_ACCESS = {16: int(Access.R), 17: int(Access.W), 18: int(Access.X)}
_PAGE_MASK = (1 << PAGE_SHIFT) - 1

# uc_struct.emu_counter / emu_count in unicorn 2.1.x (spec/unicorn.md §4); verified at run time
_COUNTER_GUESS = 1368


@dataclass(slots=True)
class UserStop:
    """Why a quantum of guest execution ended."""

    kind: str                 # "quantum", "syscall", "fault", "tlb_miss", "intr", "error"
    pc: int
    instructions: int
    cycles: int
    va: int = 0
    access: Access = Access.NONE
    fault: Fault | None = None
    intno: int = -1
    error: str = ""


class VCPU:
    def __init__(self, index: int, arch: ArchSpec, physmem: PhysMem, sentinel: int = 0,
                 stepped_walks: bool = False, counting: bool = True) -> None:
        self.index = index
        # stepped: a TLB miss stops the quantum and the walk runs as a task, one table
        # read per scheduling point, so hardware walks can race with kernel table changes
        self.stepped_walks = stepped_walks
        self.arch = arch
        self.physmem = physmem
        self.sentinel = sentinel          # emu_start's `until`: mapped executable, never run
        uc = Uc(arch.uc_arch, arch.uc_mode)
        arch.cpu_setup(uc)                # arm64 page size must be set before anything else
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, physmem.size, UC_PROT_ALL, physmem.address)
        physmem.exposed = True                  # guest stores are not tracked: never recycle
        self.uc = uc
        self.tlb = TLB()
        self.tlb_small = self.tlb.small          # the hit path's dict, without an attribute hop
        self.counting = counting                 # count= quanta: exact counts and preemption
        self.mm = None
        self.loaded = None                       # the guest thread whose registers are in uc
        self.root = 0
        self.pending_flush: list[tuple[int, int]] | None = None
        self.in_walk = False
        # statistics
        self.fills = self.tlb_hits = self.walks = self.walk_reads = 0
        self.instructions = 0
        self.faults_by_kind: dict[str, int] = {}
        self._reset_pending()
        self._hook_error: BaseException | None = None
        self._counter: ctypes.Array | None = None
        self._install_hooks()

    # -- hooks -----------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        self._fill_cb = _FILL_CFUNC(self._fill)      # keep a reference: ctypes does not
        handle = ctypes.c_size_t()
        err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), UC_HOOK_TLB_FILL,
                                ctypes.cast(self._fill_cb, ctypes.c_void_p), None,
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise UcError(err)
        abi = self.arch.syscall_abi
        if abi.trap == "insn":
            from unicorn.x86_const import UC_X86_INS_SYSCALL
            self.uc.hook_add(UC_HOOK_INSN, self._on_syscall_insn, aux1=UC_X86_INS_SYSCALL)
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def _reset_pending(self) -> None:
        self.pending_fault: tuple[int, Access, Fault] | None = None
        self.pending_syscall = False
        self.pending_intr = -1

    def _on_syscall_insn(self, uc: Uc, _data: object) -> None:
        self.pending_syscall = True
        uc.emu_stop()

    def _on_intr(self, uc: Uc, intno: int, _data: object) -> None:
        if intno == self.arch.syscall_abi.intno:
            self.pending_syscall = True
        else:
            self.pending_intr = intno
        uc.emu_stop()

    def _fill(self, _uch, vaddr, access, entry, _user) -> bool:
        acc = _ACCESS[access]
        self.fills += 1
        e = self.tlb_small.get(vaddr >> PAGE_SHIFT)
        if e is not None and e[1] & acc:
            self.tlb_hits += 1
            entry[0] = e[0] | (vaddr & _PAGE_MASK)    # arm64 wants the full address
            entry[1] = e[1]
            return True
        try:
            return self._fill_slow(vaddr, Access(acc), entry)
        except BaseException as err:                  # never let an exception cross C
            self._hook_error = err
            return False

    def _fill_slow(self, vaddr: int, acc: Access, entry) -> bool:
        tlb = self.tlb
        if tlb.huge_shifts:
            hit = tlb.lookup_huge(vaddr)
            if hit is not None and hit[1] & acc:
                self.tlb_hits += 1
                tlb.small[vaddr >> PAGE_SHIFT] = hit
                entry[0], entry[1] = hit[0] | (vaddr & _PAGE_MASK), hit[1]
                return True
        if self.stepped_walks and vaddr >> PAGE_SHIFT != self.sentinel >> PAGE_SHIFT:
            if self.pending_fault is None:
                self.pending_fault = (vaddr, acc, None)    # a miss: walk it as a task
            return False
        result = self.hw_walk(vaddr, acc)
        if type(result) is Translation:
            page, perms = tlb.insert(vaddr, result)
            entry[0], entry[1] = page | (vaddr & _PAGE_MASK), perms
            return True
        if self.pending_fault is None:                 # keep the first refusal of this run
            self.pending_fault = (vaddr, acc, result)
        return False

    def hw_walk(self, va: int, acc: Access) -> Translation | Fault:
        """The plugin's hardware walk, run inline (fast mode)."""
        self.walks += 1
        pm = self.physmem

        def read(paddr: int) -> int:
            self.walk_reads += 1
            return pm.read_entry(paddr)

        return run_walk(self.arch.walk(self.root, va, acc), read, pm.cmpxchg_entry)

    async def hw_walk_stepped(self, va: int, acc: Access) -> Translation | Fault:
        """The same walk with every table read and A/D update a scheduling point."""
        self.walks += 1
        pm = self.physmem
        walk = self.arch.walk(self.root, va, acc)
        self.in_walk = True             # mid-instruction: IPIs wait until the walk is done
        try:
            step = next(walk)
            while True:
                await sched_point("hw_walk", step.paddr)
                if type(step) is ReadEntry:
                    self.walk_reads += 1
                    step = walk.send(pm.read_entry(step.paddr))
                else:
                    step = walk.send(pm.cmpxchg_entry(step.paddr, step.old, step.new))
        except StopIteration as stop:
            result = stop.value
        finally:
            self.in_walk = False
        if type(result) is Translation:
            self.tlb.insert(va, result)
        return result

    # -- address space ------------------------------------------------------------------------
    def switch_mm(self, mm) -> None:
        """switch_mm(): load the root register; without ASIDs in use, flush everything."""
        self.mm = mm
        self.root = self.arch.root_register(mm.pgd, mm.asid)
        self.flush_all_now()

    def flush_all_now(self) -> None:
        self.tlb.flush_all()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def request_flush(self, start: int, end: int) -> None:
        """A shootdown IPI: applied at this vCPU's next scheduling point, not earlier."""
        if self.pending_flush is None:
            self.pending_flush = []
        self.pending_flush.append((start, end))

    def flush_pending_for(self, va: int) -> bool:
        """Is a shootdown covering ``va`` queued for this vCPU's next scheduling point?"""
        return any(start <= va < end for start, end in self.pending_flush or ())

    def apply_flushes(self) -> None:
        if self.pending_flush:
            for start, end in self.pending_flush:
                self.tlb.flush_range(start, end)
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.pending_flush = None

    def flush_code_cache(self) -> None:
        """Guest code written from outside this Unicorn (loading a program) is not seen
        by its translation cache."""
        self.uc.ctl_flush_tb()

    # -- registers ------------------------------------------------------------------------
    @property
    def pc(self) -> int:
        return self.uc.reg_read(self.arch.pc_reg)

    @pc.setter
    def pc(self, value: int) -> None:
        self.uc.reg_write(self.arch.pc_reg, value)

    # -- running ----------------------------------------------------------------------------
    def run(self, quantum: int) -> UserStop:
        """Run guest code from the current PC for at most ``quantum`` instructions."""
        self.apply_flushes()
        self._reset_pending()
        pc = self.pc
        error = ""
        try:
            # count=0 runs to the next syscall/fault at full speed (no per-instruction
            # count hook) but cannot be preempted and counts nothing
            self.uc.emu_start(pc, self.sentinel, count=quantum if self.counting else 0)
        except UcError as err:
            error = str(err)
        if self._hook_error is not None:
            err, self._hook_error = self._hook_error, None
            raise err
        n = self._executed(quantum) if self.counting else 0
        pc = self.pc
        if self.pending_syscall:
            kind = "syscall"
        elif self.pending_fault is not None:
            kind, n = ("fault" if self.pending_fault[2] is not None else "tlb_miss"), max(0, n - 1)
        elif self.pending_intr >= 0:
            kind = "intr"
        elif error:
            kind = "error"
        else:
            kind = "quantum"
        self.instructions += n
        stop = UserStop(kind, pc, n, n, error=error, intno=self.pending_intr)
        if kind == "fault":
            stop.va, stop.access, stop.fault = self.pending_fault
            self.count_fault(stop.fault)
        elif kind == "tlb_miss":
            stop.va, stop.access = self.pending_fault[:2]
        return stop

    def count_fault(self, fault: Fault) -> None:
        self.faults_by_kind[fault.kind.value] = self.faults_by_kind.get(fault.kind.value, 0) + 1

    def _executed(self, quantum: int) -> int:
        """Instructions of the last emu_start, from uc_struct.emu_counter."""
        if self._counter is None:
            self._counter = _find_counter(self.uc, quantum)
        if not self._counter:
            return quantum
        return min(self._counter[0], quantum)


def _find_counter(uc: Uc, count: int) -> ctypes.Array:
    """Locate uc_struct.emu_counter: the field just before emu_count, which holds the
    ``count`` of the last emu_start. Returns an empty array if the layout is unknown."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    words = (ctypes.c_uint64 * 1024).from_address(base)
    guess = _COUNTER_GUESS // 8
    if words[guess + 1] == count:
        return (ctypes.c_uint64 * 1).from_address(base + _COUNTER_GUESS)
    for i in range(1, 1023):
        if words[i + 1] == count:
            return (ctypes.c_uint64 * 1).from_address(base + i * 8)
    return (ctypes.c_uint64 * 0)()


__all__ = ["VCPU", "UserStop", "ReadEntry"]
