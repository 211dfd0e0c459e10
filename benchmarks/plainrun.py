"""A minimal plain-Unicorn runner for static ELF guests: the baseline of speed.py.

No page tables, no mm, no scheduler. The PT_LOAD segments are mapped at their virtual
addresses with ordinary ``mem_map`` (one region per merged, page-rounded range, with the
segment's R/W/X), the stack gets a minimal layout (argc, argv, NULL, empty envp,
auxv = AT_NULL), and only the syscalls the benchmark guests make are served: write
(captured), exit/exit_group, brk, mmap (anonymous only: fresh memory at a bump
address, with the requested PROT_*), munmap, mprotect (accepted, not applied), getpid
and uname. Anything else returns -ENOSYS.

CPU setup and syscall conventions come from emu's arch plugin (``cpu_setup``,
``start_registers``, ``syscall_abi``, ``syscall_args``, ``set_syscall_result``), so the
same binary runs the same way as under emu.

Modes (``mode=``):

* ``"flat"``: Unicorn's own MMU (UC_TLB_CPU), plain ``mem_map`` at the VAs. The
  baseline the issue asks for. Not available on ppc64 (spec/unicorn.md §0).
* ``"vtlb"``: UC_TLB_VIRTUAL plus an identity fill hook (a raw ctypes callback like
  emu's: paddr = vaddr, perms = the region's R/W/X). One Python call per Unicorn fill.
  This is ppc64's resident baseline, and for the other arches the fastest plain setup:
  in Unicorn 2.1.4 a store to a page whose TLB entry is *executable*, and every store in
  flat mode, takes the softmmu slow path (``notdirty_write``), while stores to NX pages
  through the virtual TLB stay on the fast path (see benchmarks/README.md).
* ``"vtlb-nohook"``: UC_TLB_VIRTUAL without a hook: Unicorn maps identity in C but
  grants only the permission of the current access, so a load then a store to one page
  fill twice (both in C, about 0.1 us). ppc64's baseline for the thrash workload, where
  a Python identity hook would cost as much as emu's own fill.

Timing covers only the emulation (first ``emu_start`` to exit), not Uc creation or
loading, like emu's ``summary["seconds"]``.
"""
from __future__ import annotations

import bisect
import ctypes
import struct
import time
from dataclasses import dataclass

from unicorn import (
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn.unicorn_py3.unicorn import uclib

from emu import plugins
from emu.loader import PF_R, PF_W, PF_X, read_elf

PAGE = 4096
STACK_TOP = 0x7FF0_0000_0000
STACK_SIZE = 1 << 20
SENTINEL_PAGE = STACK_TOP               # mapped R-X right above the stack, never executed
SENTINEL = SENTINEL_PAGE + 0x100        # emu_start's `until`
MMAP_BASE = 0x7E00_0000_0000            # bump allocator for anonymous mmap
ENOSYS, EINVAL = 38, 22
MODES = ("flat", "vtlb", "vtlb-nohook")

_FILL_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                               ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p)


def _up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _seg_prot(flags: int) -> int:
    return ((UC_PROT_READ if flags & PF_R else 0) | (UC_PROT_WRITE if flags & PF_W else 0)
            | (UC_PROT_EXEC if flags & PF_X else 0))


@dataclass
class PlainResult:
    stdout: bytes
    exit_code: int | None
    seconds: float
    starts: int                 # emu_start calls (1 + one per syscall)
    fills: int                  # identity-hook fills ("vtlb" mode only)
    counted: int | None         # sum of uc_struct.emu_counter over the emu_starts, if asked


class PlainRunner:
    """Load ``path`` into a fresh plain ``Uc``; :meth:`run` runs it to exit."""

    def __init__(self, arch: str, path: str, argv: list[str], count: int = 0,
                 mode: str | None = None, counter_offset: int | None = None) -> None:
        spec = self.arch = plugins.get_arch(arch)
        if mode is None:
            mode = "vtlb" if spec.name == "ppc64" else "flat"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode == "flat" and spec.name == "ppc64":
            raise ValueError("ppc64 runs only in UC_TLB_VIRTUAL mode (spec/unicorn.md §0)")
        self.mode = mode
        self.count = count
        self.counter_offset = counter_offset
        self.abi = spec.syscall_abi
        self.nr_names = {nr: name for name, nr in self.abi.numbers.items()}
        self.endian = ">" if spec.big_endian else "<"
        uc = Uc(spec.uc_arch, spec.uc_mode)
        spec.cpu_setup(uc)                  # arm64: ctl_set_page_size(4096) comes first
        self.uc = uc
        self.fills = 0
        self.regions: list[tuple[int, int, int]] = []     # sorted (start, end, prot)
        self._starts: list[int] = []
        self._page_prot: dict[int, int] = {}
        if mode != "flat":
            uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
            if mode == "vtlb":
                self._fill_cb = _FILL_CFUNC(self._identity_fill)   # keep a reference
                handle = ctypes.c_size_t()
                err = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_TLB_FILL,
                                        ctypes.cast(self._fill_cb, ctypes.c_void_p), None,
                                        ctypes.c_uint64(1), ctypes.c_uint64(0))
                if err:
                    raise UcError(err)
        image = read_elf(path)
        # PT_LOAD segments: merge page-rounded ranges (OR of their rights), map, copy
        ranges: list[list[int]] = []
        for seg in sorted(image.segments, key=lambda s: s.vaddr):
            lo, hi, prot = seg.vaddr & ~(PAGE - 1), _up(seg.vaddr + seg.memsz), _seg_prot(seg.flags)
            if ranges and lo < ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], hi)
                ranges[-1][2] |= prot
            else:
                ranges.append([lo, hi, prot])
        for lo, hi, prot in ranges:
            self._map(lo, hi - lo, prot)
        for seg in image.segments:
            if seg.data:
                uc.mem_write(seg.vaddr, seg.data)
        self.brk_start = self.brk = self.brk_mapped = _up(image.end)
        self.mmap_next = MMAP_BASE
        self.mmaps: dict[int, int] = {}
        self._map(STACK_TOP - STACK_SIZE, STACK_SIZE, UC_PROT_READ | UC_PROT_WRITE)
        self._map(SENTINEL_PAGE, PAGE, UC_PROT_READ | UC_PROT_EXEC)
        uc.mem_write(SENTINEL_PAGE, spec.sentinel_code() * (PAGE // len(spec.sentinel_code())))
        sp = self._build_stack(argv)
        self.entry = image.entry
        uc.reg_write(spec.pc_reg, image.entry)
        spec.start_registers(uc, image.entry, sp)
        self.pending_syscall = False
        self.pending_intr = -1
        if self.abi.trap == "insn":
            from unicorn.x86_const import UC_X86_INS_SYSCALL
            uc.hook_add(UC_HOOK_INSN, self._on_syscall_insn, aux1=UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        self.stdout = bytearray()
        self.exit_code: int | None = None

    # -- memory --------------------------------------------------------------------------
    def _map(self, addr: int, size: int, prot: int) -> None:
        # Regions are mapped RWX: in virtual mode they are the "physical" memory (identity)
        # and the fill hook hands out ``prot``; in flat mode s390x takes a program
        # interrupt fetching from an R-X region, and flat-mode speed does not depend on
        # the rights (every store takes the slow path either way, README.md).
        self.uc.mem_map(addr, size, UC_PROT_ALL)
        i = bisect.bisect(self._starts, addr)
        self._starts.insert(i, addr)
        self.regions.insert(i, (addr, addr + size, prot))
        self._page_prot.clear()

    def _unmap(self, addr: int, size: int) -> None:
        self.uc.mem_unmap(addr, size)
        i = self._starts.index(addr)
        del self._starts[i], self.regions[i]
        self._page_prot.clear()

    def _prot_of(self, va: int) -> int:
        i = bisect.bisect(self._starts, va) - 1
        if i >= 0 and va < self.regions[i][1]:
            return self.regions[i][2]
        return 0

    def _identity_fill(self, _uch, vaddr, access, entry, _user) -> bool:
        self.fills += 1
        prot = self._page_prot.get(vaddr)
        if prot is None:
            prot = self._page_prot[vaddr] = self._prot_of(vaddr)
        if not prot & (1 << (access - 16)):        # UC_MEM_READ/WRITE/FETCH = 16/17/18
            return False
        entry[0] = vaddr
        entry[1] = prot
        return True

    def _build_stack(self, argv: list[str]) -> int:
        strings, offsets = b"", []
        for a in argv:
            offsets.append(len(strings))
            strings += a.encode() + b"\0"
        str_base = (STACK_TOP - len(strings) - 16) & ~15
        # argc, argv[], NULL, envp NULL, auxv AT_NULL (type 0, value 0)
        words = [len(argv)] + [str_base + o for o in offsets] + [0, 0, 0, 0]
        block = struct.pack(f"{self.endian}{len(words)}Q", *words)
        sp = (str_base - len(block) - 64) & ~15
        self.uc.mem_write(sp, block)
        self.uc.mem_write(str_base, strings)
        return sp

    # -- traps -----------------------------------------------------------------------------
    def _on_syscall_insn(self, uc: Uc, _data: object) -> None:
        self.pending_syscall = True
        uc.emu_stop()

    def _on_intr(self, uc: Uc, intno: int, _data: object) -> None:
        if intno == self.abi.intno:
            self.pending_syscall = True
        else:
            self.pending_intr = intno
        uc.emu_stop()

    def _syscall(self) -> bool:
        """Serve the pending syscall; False when the guest exited."""
        uc, spec = self.uc, self.arch
        nr, args = spec.syscall_args(uc, lambda va, n: bytes(uc.mem_read(va, n)))
        name = self.nr_names.get(nr, "")
        if self.abi.pc_advance:                   # s390x: the PC is still on the svc
            uc.reg_write(spec.pc_reg, uc.reg_read(spec.pc_reg) + self.abi.pc_advance)
        if name in ("exit", "exit_group"):
            self.exit_code = args[0] & 0xFF
            return False
        ret = -ENOSYS
        if name == "write":
            data = bytes(uc.mem_read(args[1], args[2])) if args[2] else b""
            if args[0] == 1:
                self.stdout += data
            ret = len(data)
        elif name == "brk":
            new = args[0]
            if new >= self.brk_start:
                if new > self.brk_mapped:
                    top = _up(new)
                    self._map(self.brk_mapped, top - self.brk_mapped, UC_PROT_READ | UC_PROT_WRITE)
                    self.brk_mapped = top
                self.brk = new
            ret = self.brk
        elif name == "mmap":
            if self.abi.old_mmap:                 # s390x old_mmap: a pointer to six longs
                args = list(struct.unpack(f"{self.endian}6Q", bytes(uc.mem_read(args[0], 48))))
            length = _up(args[1])
            if not length:
                ret = -EINVAL
            elif args[3] & 0x20:                  # MAP_ANONYMOUS only
                addr = self.mmap_next
                self._map(addr, length, args[2] & UC_PROT_ALL)
                self.mmaps[addr] = length
                self.mmap_next += length + PAGE
                ret = addr
        elif name == "munmap":
            addr = args[0]
            if addr & (PAGE - 1):
                ret = -EINVAL
            else:
                if self.mmaps.get(addr) == _up(args[1]):
                    self._unmap(addr, self.mmaps.pop(addr))
                ret = 0                           # partial unmaps: left mapped
        elif name == "mprotect":
            ret = 0
        elif name == "getpid":
            ret = 1000
        elif name == "uname":
            fields = [b"Linux", b"emu", b"6.6.0", b"#1", (spec.uname_machine or spec.name).encode(),
                      b"(none)"]
            uc.mem_write(args[0], b"".join(f.ljust(65, b"\0") for f in fields))
            ret = 0
        spec.set_syscall_result(uc, ret)
        return True

    # -- running ---------------------------------------------------------------------------
    def run(self) -> PlainResult:
        uc, pc_reg = self.uc, self.arch.pc_reg
        pc, starts, counted = self.entry, 0, 0
        t0 = time.perf_counter()
        while True:
            self.pending_syscall, self.pending_intr = False, -1
            starts += 1
            try:
                uc.emu_start(pc, SENTINEL, count=self.count)
            except UcError as err:
                raise RuntimeError(f"plain {self.arch.name}: {err} at pc {uc.reg_read(pc_reg):#x}") from None
            if self.counter_offset is not None:
                counted += read_word(uc, self.counter_offset)
            if self.pending_syscall:
                if not self._syscall():
                    break
            elif self.pending_intr >= 0:
                raise RuntimeError(f"plain {self.arch.name}: interrupt {self.pending_intr} "
                                   f"at pc {uc.reg_read(pc_reg):#x}")
            elif not self.count:
                raise RuntimeError(f"plain {self.arch.name}: stopped at {uc.reg_read(pc_reg):#x}")
            pc = uc.reg_read(pc_reg)
        seconds = time.perf_counter() - t0
        return PlainResult(bytes(self.stdout), self.exit_code, seconds, starts, self.fills,
                           counted if self.counter_offset is not None else None)


# -- uc_struct.emu_counter (spec/unicorn.md §4) ----------------------------------------------
COUNTER_GUESS = 1368


def find_counter_offset(uc: Uc, count: int) -> int | None:
    """Byte offset of uc_struct.emu_counter: the word before emu_count, which holds the
    ``count`` of the last emu_start (call after an emu_start with a distinctive count)."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    words = (ctypes.c_uint64 * 1024).from_address(base)
    if words[COUNTER_GUESS // 8 + 1] == count:
        return COUNTER_GUESS
    for i in range(1, 1023):
        if words[i + 1] == count:
            return i * 8
    return None


def read_word(uc: Uc, offset: int) -> int:
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    return ctypes.c_uint64.from_address(base + offset).value
