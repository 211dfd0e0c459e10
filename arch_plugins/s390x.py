"""s390x: z/Architecture DAT as Linux uses it for a 64-bit task with a 4 TB address space.

The user ASCE designates a region-third table (DT=01), so three levels are walked:
region-third (PUD, 2G leaves with EDAT-2), segment (PMD, 1M leaves with EDAT-1) and page
(PTE, 2K tables of 256 entries). Entries are big-endian.

Three things differ from the other arches and are the reason this module looks the way
it does:

* Empty entries are not 0: a fresh table is filled with ``_PAGE_INVALID`` /
  ``_SEGMENT_ENTRY_EMPTY`` / ``_REGION3_ENTRY_EMPTY``. A zero PTE maps frame 0 read-write.
* The hardware keeps no young/dirty bits in the tables (they live in storage keys, which
  Linux does not use for this). Linux emulates them: an old entry carries the HW invalid
  bit, a clean writable entry the HW protect bit, and the first access or store faults
  (``pte_mkold``/``pte_mkclean`` in ``arch/s390/include/asm/pgtable.h``). So the walk
  never writes a table.
* PTE tables are 2 KB: fragments of a page, 2 KB aligned.

Bit values follow ``arch/s390/include/asm/pgtable.h`` of the v6.8 era (spec/arch_formats.md
§3). Later kernels moved the segment/region-third software bits (READ 0x4000, WRITE
0x8000, SOFT_DIRTY 0x2, a PRESENT bit 0x1); only software bits differ, the hardware walk
is the same.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import capstone
import unicorn
from unicorn import s390x_const as uc_s390x

from emu.arch import (
    NONE_ENTRY,
    PAGE_SIZE,
    SWP_TYPE_BITS,
    Access,
    ArchSpec,
    Entry,
    Fault,
    FaultKind,
    Kind,
    Level,
    ReadEntry,
    SyscallABI,
    TimingDefaults,
    Translation,
    Walk,
    swap_kind,
)
from emu.hookspecs import hookimpl

# -- geometry ------------------------------------------------------------------------------
_REGION3_SHIFT = 31
_SEGMENT_SHIFT = 20
_CRST_INDEX_BITS = 11           # 2048 entries, 16K region/segment tables
_PAGE_INDEX_BITS = 8            # 256 entries, 2K page tables
PUD, PMD, PTE = 0, 1, 2         # indexes into S390x.levels
_ASCE_LIMIT = 1 << 42           # what a region-third table translates

# -- entry bits ----------------------------------------------------------------------------
# Page-table entry: hardware bits
_PAGE_LARGE = 0x800             # must be 0 for the hardware (translation-specification)
_PAGE_INVALID = 0x400
_PAGE_PROTECT = 0x200
_PAGE_NOEXEC = 0x100            # IEP
# Page-table entry: Linux software bits
_PAGE_UNUSED = 0x080
_PAGE_SPECIAL = 0x040
_PAGE_WRITE = 0x020
_PAGE_READ = 0x010
_PAGE_DIRTY = 0x008
_PAGE_YOUNG = 0x004
_PAGE_SOFT_DIRTY = 0x002
_PAGE_PRESENT = 0x001
_PAGE_SWP_EXCLUSIVE = _PAGE_LARGE
_PAGE_ORIGIN = ~0xFFF & 0xFFFFFFFFFFFFFFFF
_PAGE_LEAF_BITS = (_PAGE_ORIGIN | _PAGE_INVALID | _PAGE_PROTECT | _PAGE_NOEXEC | _PAGE_SPECIAL
                   | _PAGE_WRITE | _PAGE_READ | _PAGE_DIRTY | _PAGE_YOUNG | _PAGE_SOFT_DIRTY
                   | _PAGE_PRESENT)

# Swap PTE: .11..ttttt.0 with the offset above bit 12 (__swp_entry / mk_swap_pte)
_SWP_TYPE_SHIFT = 2
_SWP_TYPE_MASK = (1 << SWP_TYPE_BITS) - 1
_SWP_OFFSET_SHIFT = 12
_SWP_OFFSET_BITS = 52
_PAGE_SWP_BITS = (_PAGE_ORIGIN | _PAGE_SWP_EXCLUSIVE | _PAGE_INVALID | _PAGE_PROTECT
                  | (_SWP_TYPE_MASK << _SWP_TYPE_SHIFT) | _PAGE_SOFT_DIRTY)

# Segment-table entry
_SEGMENT_ENTRY_ORIGIN = ~0x7FF & 0xFFFFFFFFFFFFFFFF       # 2K-aligned page-table origin
_SEGMENT_ENTRY_ORIGIN_LARGE = ~0xFFFFF & 0xFFFFFFFFFFFFFFFF
_SEGMENT_ENTRY_SOFT_DIRTY = 0x4000
_SEGMENT_ENTRY_DIRTY = 0x2000
_SEGMENT_ENTRY_YOUNG = 0x1000
_SEGMENT_ENTRY_LARGE = 0x400    # FC: 1M frame (EDAT-1)
_SEGMENT_ENTRY_PROTECT = 0x200
_SEGMENT_ENTRY_NOEXEC = 0x100
_SEGMENT_ENTRY_INVALID = 0x20
_SEGMENT_ENTRY_CS = 0x10        # common segment: a specification error in a private space
_SEGMENT_ENTRY_TYPE_MASK = 0x0C
_SEGMENT_ENTRY_WRITE = 0x2
_SEGMENT_ENTRY_READ = 0x1
_SEGMENT_ENTRY = 0
_SEGMENT_ENTRY_EMPTY = _SEGMENT_ENTRY_INVALID

# Region entries (only region-third is used)
_REGION_ENTRY_ORIGIN = ~0xFFF & 0xFFFFFFFFFFFFFFFF
_REGION_ENTRY_PROTECT = 0x200
_REGION_ENTRY_NOEXEC = 0x100
_REGION_ENTRY_OFFSET = 0xC0     # TF
_REGION_ENTRY_INVALID = 0x20
_REGION_ENTRY_TYPE_MASK = 0x0C
_REGION_ENTRY_TYPE_R3 = 0x04
_REGION_ENTRY_LENGTH = 0x03     # TL
_REGION3_ENTRY = _REGION_ENTRY_TYPE_R3 | _REGION_ENTRY_LENGTH
_REGION3_ENTRY_EMPTY = _REGION_ENTRY_TYPE_R3 | _REGION_ENTRY_INVALID
_REGION3_ENTRY_ORIGIN_LARGE = ~0x7FFFFFFF & 0xFFFFFFFFFFFFFFFF
_REGION3_ENTRY_SOFT_DIRTY = 0x4000
_REGION3_ENTRY_DIRTY = 0x2000
_REGION3_ENTRY_YOUNG = 0x1000
_REGION3_ENTRY_LARGE = 0x400    # FC: 2G frame (EDAT-2)
_REGION3_ENTRY_CR = 0x10        # common region: a specification error in a private space
_REGION3_ENTRY_READ = 0x2       # note: READ/WRITE are swapped relative to the segment entry
_REGION3_ENTRY_WRITE = 0x1

# Address-space-control element (CR1/CR7/CR13)
_ASCE_ORIGIN = ~0xFFF & 0xFFFFFFFFFFFFFFFF
_ASCE_PRIVATE_SPACE = 0x100
_ASCE_ALT_EVENT = 0x80
_ASCE_SPACE_SWITCH = 0x40
_ASCE_REAL_SPACE = 0x20
_ASCE_TYPE_MASK = 0x0C
_ASCE_TYPE_REGION3 = 0x04
_ASCE_TABLE_LENGTH = 0x03
# Linux's user ASCE; the private-space bit also switches off low-address protection
_ASCE_USER_BITS = _ASCE_SPACE_SWITCH | _ASCE_PRIVATE_SPACE | _ASCE_ALT_EVENT


class _LargeBits(NamedTuple):
    """Segment (1M) and region-third (2G) leaves share one scheme with their own bits."""

    origin: int
    fc: int
    type_bits: int
    read: int
    write: int
    young: int
    dirty: int
    soft_dirty: int
    invalid: int
    protect: int
    noexec: int


_LARGE = {
    PMD: _LargeBits(_SEGMENT_ENTRY_ORIGIN_LARGE, _SEGMENT_ENTRY_LARGE, 0, _SEGMENT_ENTRY_READ,
                    _SEGMENT_ENTRY_WRITE, _SEGMENT_ENTRY_YOUNG, _SEGMENT_ENTRY_DIRTY,
                    _SEGMENT_ENTRY_SOFT_DIRTY, _SEGMENT_ENTRY_INVALID, _SEGMENT_ENTRY_PROTECT,
                    _SEGMENT_ENTRY_NOEXEC),
    PUD: _LargeBits(_REGION3_ENTRY_ORIGIN_LARGE, _REGION3_ENTRY_LARGE, _REGION_ENTRY_TYPE_R3,
                    _REGION3_ENTRY_READ, _REGION3_ENTRY_WRITE, _REGION3_ENTRY_YOUNG,
                    _REGION3_ENTRY_DIRTY, _REGION3_ENTRY_SOFT_DIRTY, _REGION_ENTRY_INVALID,
                    _REGION_ENTRY_PROTECT, _REGION_ENTRY_NOEXEC),
}
_LARGE_LEAF_BITS = {level: functools.reduce(operator.or_, bits) for level, bits in _LARGE.items()}

# -- control registers and PSW -------------------------------------------------------------
PSW_MASK_DAT = 1 << 58
PSW_MASK_64 = 1 << 32           # EA
PSW_MASK_32 = 1 << 31           # BA
CR0_EDAT = 0x800000
CR0_IEP = 0x100000
CR0_AFP = 0x40000               # additional floating-point registers
CR0_VECTOR = 0x20000

_SVC_OPCODE = 0x0A


def _linux_prot(prot: Access) -> Access:
    """s390 cannot express write- or exec-only; protection_map gives them read too."""
    return prot | Access.R if prot else Access.NONE


class S390x(ArchSpec):
    """z/Architecture, Linux 64-bit task with a region-third ASCE (4 TB)."""

    name = "s390x"
    description = "IBM Z, z/Architecture DAT (region-third ASCE, 2K PTE tables, 1M/2G leaves)"
    uc_arch = unicorn.UC_ARCH_S390X
    uc_mode = unicorn.UC_MODE_BIG_ENDIAN
    cs_arch = capstone.CS_ARCH_SYSZ
    cs_mode = capstone.CS_MODE_BIG_ENDIAN
    big_endian = True
    elf_machine = "EM_S390"
    uname_machine = "s390x"
    pc_reg = uc_s390x.UC_S390X_REG_PC
    sp_reg = uc_s390x.UC_S390X_REG_R15
    root_register_name = "ASCE"
    sw_bits = frozenset({"special", "soft_dirty"})

    levels = (
        Level("pud", "region-third", _REGION3_SHIFT, _CRST_INDEX_BITS, leaf=True),
        Level("pmd", "segment", _SEGMENT_SHIFT, _CRST_INDEX_BITS, leaf=True),
        Level("pte", "page", 12, _PAGE_INDEX_BITS, leaf=True),
    )
    task_size = _ASCE_LIMIT

    options = {"full_page_pte": "one 2K PTE table per 4K page (Linux 6.7+, d08d4e7cd6bf) "
                                "instead of two halves sharing a page"}
    pte_frag_rules = "s390"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opts.get("full_page_pte"):
            self.pte_frag_rules = "page"

    def table_alloc_bytes(self, level: int) -> int:
        """16K CRSTs (order-2 pages); 2K page tables at any 2K boundary, or (6.7+) one
        per 4K page with the upper half unused."""
        if level == PTE and self.opts.get("full_page_pte"):
            return PAGE_SIZE
        return self.levels[level].table_bytes

    # -- encode/decode ---------------------------------------------------------------------
    def decode(self, level: int, value: int) -> Entry:
        if level == PTE:
            return _decode_pte(value)
        if level == PMD:
            if value == _SEGMENT_ENTRY_EMPTY:
                return NONE_ENTRY
            if value & _SEGMENT_ENTRY_TYPE_MASK:
                return Entry(Kind.BAD)
            if value & _SEGMENT_ENTRY_LARGE:
                return _decode_large(PMD, value)
            if value & ~_SEGMENT_ENTRY_ORIGIN:      # invalid, protected or CS table entry
                return Entry(Kind.BAD)
            return Entry(Kind.TABLE, paddr=value & _SEGMENT_ENTRY_ORIGIN)
        if level == PUD:
            if value == _REGION3_ENTRY_EMPTY:
                return NONE_ENTRY
            if value & _REGION_ENTRY_TYPE_MASK != _REGION_ENTRY_TYPE_R3:
                return Entry(Kind.BAD)
            if value & _REGION3_ENTRY_LARGE:
                return _decode_large(PUD, value)
            if value & ~_REGION_ENTRY_ORIGIN != _REGION3_ENTRY:   # full table, TF=0, TL=3
                return Entry(Kind.BAD)
            return Entry(Kind.TABLE, paddr=value & _REGION_ENTRY_ORIGIN)
        raise IndexError(f"s390x has no level {level}")

    def encode(self, level: int, entry: Entry) -> int:
        if not 0 <= level <= PTE:
            raise IndexError(f"s390x has no level {level}")
        kind = entry.kind
        if kind is Kind.NONE:
            return (_REGION3_ENTRY_EMPTY, _SEGMENT_ENTRY_EMPTY, _PAGE_INVALID)[level]
        if entry.uffd_wp:
            raise ValueError("s390x has no uffd-wp bit")
        if kind is Kind.TABLE:
            if level == PTE:
                raise ValueError("a PTE cannot point to a table")
            origin = _REGION_ENTRY_ORIGIN if level == PUD else _SEGMENT_ENTRY_ORIGIN
            _check_addr(entry.paddr, origin, "table origin")
            return entry.paddr | (_REGION3_ENTRY if level == PUD else _SEGMENT_ENTRY)
        if kind is Kind.LEAF:
            if level == PTE:
                return _encode_pte(entry)
            return _encode_large(level, entry)
        if kind in (Kind.SWAP, Kind.MIGRATION):
            if level != PTE:
                raise ValueError("s390x has swap/migration entries in PTEs only (no THP migration)")
            return _encode_swap(entry)
        raise ValueError(f"cannot encode a {kind.value} entry")

    # -- hardware walk ---------------------------------------------------------------------
    def walk(self, root: int, va: int, access: Access) -> Walk:
        """DAT from a region-third ASCE, as ``mmu_translate_asce`` in QEMU's
        ``target/s390x/mmu_helper.c``, on a machine with EDAT-1, EDAT-2 and IEP enabled
        in CR0 (what Linux turns on when the facilities exist). Tables are only read."""
        if root & _ASCE_REAL_SPACE or root & _ASCE_TYPE_MASK != _ASCE_TYPE_REGION3:
            raise ValueError(f"ASCE {root:#x}: only a region-third ASCE is walked")
        private = root & _ASCE_PRIVATE_SPACE
        if va >= _ASCE_LIMIT:                           # ASCE-type: bits above the R3 reach
            return Fault(FaultKind.ADDRESS, PUD, va, access)
        rx = (va >> _REGION3_SHIFT) & 0x7FF
        if rx >> 9 > root & _ASCE_TABLE_LENGTH:         # region-third-translation exception
            return Fault(FaultKind.NOT_PRESENT, PUD, va, access)
        writable, executable = True, True

        entry_paddr = (root & _ASCE_ORIGIN) + rx * 8
        rte = yield ReadEntry(entry_paddr, PUD)
        if rte & _REGION_ENTRY_INVALID:
            return Fault(FaultKind.NOT_PRESENT, PUD, va, access)
        if rte & _REGION_ENTRY_TYPE_MASK != _REGION_ENTRY_TYPE_R3:
            return Fault(FaultKind.RESERVED, PUD, va, access)
        if rte & _REGION3_ENTRY_CR and private:
            return Fault(FaultKind.RESERVED, PUD, va, access)
        if rte & _REGION_ENTRY_PROTECT:
            writable = False
        if rte & _REGION3_ENTRY_LARGE:
            if rte & _REGION_ENTRY_NOEXEC:
                executable = False
            paddr = (rte & _REGION3_ENTRY_ORIGIN_LARGE) | (va & ~_REGION3_ENTRY_ORIGIN_LARGE)
            return _finish(va, access, paddr, 1 << _REGION3_SHIFT, PUD, entry_paddr, writable,
                           executable)
        sx = (va >> _SEGMENT_SHIFT) & 0x7FF
        if not (rte & _REGION_ENTRY_OFFSET) >> 6 <= sx >> 9 <= rte & _REGION_ENTRY_LENGTH:
            return Fault(FaultKind.NOT_PRESENT, PMD, va, access)   # segment-translation

        entry_paddr = (rte & _REGION_ENTRY_ORIGIN) + sx * 8
        ste = yield ReadEntry(entry_paddr, PMD)
        if ste & _SEGMENT_ENTRY_INVALID:
            return Fault(FaultKind.NOT_PRESENT, PMD, va, access)
        if ste & _SEGMENT_ENTRY_TYPE_MASK or (ste & _SEGMENT_ENTRY_CS and private):
            return Fault(FaultKind.RESERVED, PMD, va, access)
        if ste & _SEGMENT_ENTRY_PROTECT:
            writable = False
        if ste & _SEGMENT_ENTRY_LARGE:
            if ste & _SEGMENT_ENTRY_NOEXEC:
                executable = False
            paddr = (ste & _SEGMENT_ENTRY_ORIGIN_LARGE) | (va & ~_SEGMENT_ENTRY_ORIGIN_LARGE)
            return _finish(va, access, paddr, 1 << _SEGMENT_SHIFT, PMD, entry_paddr, writable,
                           executable)

        entry_paddr = (ste & _SEGMENT_ENTRY_ORIGIN) + ((va >> 12) & 0xFF) * 8
        pte = yield ReadEntry(entry_paddr, PTE)
        if pte & _PAGE_INVALID:
            return Fault(FaultKind.NOT_PRESENT, PTE, va, access)
        if pte & _PAGE_LARGE:
            return Fault(FaultKind.RESERVED, PTE, va, access)
        if pte & _PAGE_PROTECT:
            writable = False
        if pte & _PAGE_NOEXEC:
            executable = False
        paddr = (pte & _PAGE_ORIGIN) | (va & (PAGE_SIZE - 1))
        return _finish(va, access, paddr, PAGE_SIZE, PTE, entry_paddr, writable, executable)

    def root_register(self, root_table: int, asid: int = 0) -> int:
        """Linux's user ASCE (``init_new_context``): origin | user bits | DT=R3 | TL=3.
        s390 has no ASID in the ASCE; ``asid`` is ignored."""
        _check_addr(root_table, _ASCE_ORIGIN, "region-third table origin")
        return root_table | _ASCE_USER_BITS | _ASCE_TYPE_REGION3 | _ASCE_TABLE_LENGTH

    def root_table(self, root_register: int) -> int:
        return root_register & _ASCE_ORIGIN

    # -- TLB/flush facts -------------------------------------------------------------------
    # IPTE/IDTE invalidate an entry and purge it from every CPU's TLB in one instruction
    # (no IPIs); Linux does it inside ptep_xchg_direct/lazy, and flush_tlb_range is a no-op.
    # Because young/dirty are emulated by faults, clearing young or dirty is an
    # invalidation too. The broadcast cost is timing.flush below.

    # -- CPU and syscall ABI ---------------------------------------------------------------
    def cpu_setup(self, uc: Any) -> None:
        # Unicorn resets to 24-bit addressing; AFP/vector are off, so the first FP or vector
        # instruction would take a data exception. CR0 accepts reg_write in Unicorn 2.1.4.
        uc.reg_write(uc_s390x.UC_S390X_REG_PSWM, PSW_MASK_64 | PSW_MASK_32)
        cr0 = uc.reg_read(uc_s390x.UC_S390X_REG_CR0)
        uc.reg_write(uc_s390x.UC_S390X_REG_CR0, cr0 | CR0_AFP | CR0_VECTOR)

    def syscall_args(self, uc: Any, fetch: Callable[[int, int], bytes]) -> tuple[int, list[int]]:
        """``svc NR`` carries numbers below 256 in its immediate; ``svc 0`` takes r1.
        Unicorn reports the svc interrupt with the PC still on the 2-byte ``svc``."""
        abi = self.syscall_abi
        insn = fetch(uc.reg_read(self.pc_reg), 2)
        nr = insn[1] if insn[0] == _SVC_OPCODE and insn[1] else uc.reg_read(abi.nr_reg)
        return nr, [uc.reg_read(r) for r in abi.arg_regs]

    clone_args = ("newsp", "flags", "parent_tid", "child_tid", "tls")      # CLONE_BACKWARDS2

    def set_tls(self, uc: Any, value: int) -> None:
        uc.reg_write(uc_s390x.UC_S390X_REG_A0, value >> 32)      # access registers 0/1
        uc.reg_write(uc_s390x.UC_S390X_REG_A1, value & 0xFFFFFFFF)

    def sentinel_code(self) -> bytes:
        return b"\x00\x00" * 8      # opcode 0x00 is an operation exception

    syscall_abi = SyscallABI(
        trap="intr",
        intno=2,
        nr_reg=uc_s390x.UC_S390X_REG_R1,
        arg_regs=tuple(getattr(uc_s390x, f"UC_S390X_REG_R{i}") for i in range(2, 8)),
        ret_reg=uc_s390x.UC_S390X_REG_R2,
        pc_advance=2,
        old_mmap=True,
        numbers={
            "read": 3, "write": 4, "writev": 146, "ioctl": 54, "brk": 45, "mmap": 90,
            "mlock": 150, "munlock": 151, "mlock2": 374,
            "munmap": 91, "mprotect": 125, "madvise": 219, "mremap": 163, "exit": 1,
            "exit_group": 248, "set_tid_address": 252, "set_robust_list": 304, "rseq": 383,
            "prlimit64": 334, "readlink": 85, "readlinkat": 298, "getrandom": 349,
            "newfstatat": 293, "fstat": 108, "uname": 122, "futex": 238, "clock_gettime": 260,
            "clone": 120, "wait4": 114, "sched_yield": 158,
            "rt_sigaction": 174, "rt_sigprocmask": 175, "getpid": 20, "gettid": 236,
            "tgkill": 241, "memfd_create": 350, "ftruncate": 93, "userfaultfd": 355, "openat": 288,
            "close": 6,
            "lseek": 19, "pread64": 180, "mincore": 218, "process_madvise": 440,
        },
    )

    # -- timing defaults -------------------------------------------------------------------
    # spec/timing.md §2 "z15-like": z10 TLB shape with larger arrays (mostly assumed).
    timing = TimingDefaults(
        clock_ghz=5.2,
        l1_dtlb_entries=512,
        l2_tlb_entries=4096,        # TLB2 PTE part
        l2_tlb_hit=6,
        walk_level_latency=8,       # an L2 hit per table read
        flush="broadcast",
    )


# -- encode/decode helpers ---------------------------------------------------------------------
def _check_addr(paddr: int, mask: int, what: str) -> None:
    if paddr < 0 or paddr & ~mask:
        raise ValueError(f"{what} {paddr:#x} is not aligned to the field {mask:#x}")


def _decode_pte(value: int) -> Entry:
    """pte_none / pte_present / pte_swap, then the bits (the table in pgtable.h)."""
    if value == _PAGE_INVALID:
        return NONE_ENTRY
    if value & _PAGE_PRESENT:
        if value & ~_PAGE_LEAF_BITS:             # _PAGE_LARGE or _PAGE_UNUSED in a user PTE
            return Entry(Kind.BAD)
        prot = Access.NONE
        if value & _PAGE_READ:
            prot |= Access.R
            if not value & _PAGE_NOEXEC:
                prot |= Access.X
        if value & _PAGE_WRITE:
            prot |= Access.W
        return Entry(Kind.LEAF, paddr=value & _PAGE_ORIGIN, prot=prot,
                     young=bool(value & _PAGE_YOUNG), dirty=bool(value & _PAGE_DIRTY),
                     special=bool(value & _PAGE_SPECIAL),
                     soft_dirty=bool(value & _PAGE_SOFT_DIRTY))
    # Not present: only a swap entry with I|P set is safe; anything else (0 included) the
    # hardware would translate, so it is corrupt.
    if value & (_PAGE_INVALID | _PAGE_PROTECT) == _PAGE_INVALID | _PAGE_PROTECT \
            and not value & ~_PAGE_SWP_BITS:
        swp_type = (value >> _SWP_TYPE_SHIFT) & _SWP_TYPE_MASK
        return Entry(swap_kind(swp_type), swp_type=swp_type, swp_offset=value >> _SWP_OFFSET_SHIFT,
                     soft_dirty=bool(value & _PAGE_SOFT_DIRTY),
                     exclusive=bool(value & _PAGE_SWP_EXCLUSIVE))
    return Entry(Kind.BAD)


def _encode_pte(entry: Entry) -> int:
    """mk_pte + pte_mkyoung/pte_mkold + pte_mkdirty/pte_mkclean."""
    _check_addr(entry.paddr, _PAGE_ORIGIN, "page frame")
    prot = _linux_prot(entry.prot)
    value = entry.paddr | _PAGE_PRESENT
    if prot & Access.R:
        value |= _PAGE_READ
        if not prot & Access.X:
            value |= _PAGE_NOEXEC            # PAGE_NONE has no NOEXEC, like Linux's
    if prot & Access.W:
        value |= _PAGE_WRITE
    if entry.young:
        value |= _PAGE_YOUNG
    if not (entry.young and prot & Access.R):
        value |= _PAGE_INVALID               # old (or PROT_NONE): the next access faults
    if entry.dirty:
        value |= _PAGE_DIRTY
    if not (entry.dirty and prot & Access.W):
        value |= _PAGE_PROTECT               # read-only, or clean: the next store faults
    if entry.special:
        value |= _PAGE_SPECIAL
    if entry.soft_dirty:
        value |= _PAGE_SOFT_DIRTY
    return value


def _encode_swap(entry: Entry) -> int:
    if not 0 <= entry.swp_type <= _SWP_TYPE_MASK:
        raise ValueError(f"swap type {entry.swp_type} does not fit {SWP_TYPE_BITS} bits")
    if not 0 <= entry.swp_offset < 1 << _SWP_OFFSET_BITS:
        raise ValueError(f"swap offset {entry.swp_offset:#x} does not fit {_SWP_OFFSET_BITS} bits")
    value = (_PAGE_INVALID | _PAGE_PROTECT | entry.swp_type << _SWP_TYPE_SHIFT
             | entry.swp_offset << _SWP_OFFSET_SHIFT)
    if entry.soft_dirty:
        value |= _PAGE_SOFT_DIRTY
    if entry.exclusive:
        value |= _PAGE_SWP_EXCLUSIVE
    return value


def _decode_large(level: int, value: int) -> Entry:
    f = _LARGE[level]
    if value & ~_LARGE_LEAF_BITS[level]:
        return Entry(Kind.BAD)
    prot = Access.NONE
    if value & f.read:
        prot |= Access.R
        if not value & f.noexec:
            prot |= Access.X
    if value & f.write:
        prot |= Access.W
    return Entry(Kind.LEAF, paddr=value & f.origin, prot=prot, young=bool(value & f.young),
                 dirty=bool(value & f.dirty), soft_dirty=bool(value & f.soft_dirty))


def _encode_large(level: int, entry: Entry) -> int:
    """pmd_mkhuge/pud_mkhuge with the same young/dirty emulation as PTEs."""
    f = _LARGE[level]
    if entry.special:
        raise ValueError("s390x segment/region-third leaves have no special bit")
    _check_addr(entry.paddr, f.origin, "large frame")
    prot = _linux_prot(entry.prot)
    value = entry.paddr | f.fc | f.type_bits
    if prot & Access.R:
        value |= f.read
        if not prot & Access.X:
            value |= f.noexec
    if prot & Access.W:
        value |= f.write
    if entry.young:
        value |= f.young
    if not (entry.young and prot & Access.R):
        value |= f.invalid
    if entry.dirty:
        value |= f.dirty
    if not (entry.dirty and prot & Access.W):
        value |= f.protect
    if entry.soft_dirty:
        value |= f.soft_dirty
    return value


# -- hardware walk helpers ---------------------------------------------------------------------
def _finish(va: int, access: Access, paddr: int, size: int, level: int, entry_paddr: int,
            writable: bool, executable: bool) -> Translation | Fault:
    """The DAT-protection and IEP checks that follow a successful translation."""
    perms = Access.R | (Access.W if writable else Access.NONE) | (Access.X if executable else Access.NONE)
    if access & ~perms:
        return Fault(FaultKind.PROTECTION, level, va, access)
    return Translation(paddr, size, perms, level, entry_paddr)


@hookimpl
def emu_arch_specs() -> list[type]:
    return [S390x]
