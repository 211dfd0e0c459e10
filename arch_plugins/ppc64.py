"""ppc64: Power ISA 3.0 radix MMU (POWER9) as Linux uses it with 4K base pages, big-endian.

The tree is 13/9/9/9 bits (a 64K PGD over a 52-bit address space, then PUD, PMD and PTE
tables of 512 entries); PUDs and PMDs may be 1G and 2M leaves. Entries are always
big-endian (``__be64`` in ``arch/powerpc/include/asm/book3s/64/pgtable.h``), whatever the
CPU's data endianness.

The root register is the process-table entry's first doubleword (PRTE dw0: RTS, root
base, root index size). The rest of the chain the hardware follows to reach it (PTCR,
partition table, PID) is fixed for an mm and not modelled.

Unlike s390, the hardware keeps young and dirty itself: the walk sets R on every access
and C on a store with an atomic write-back (``ppc_radix64_set_rc`` in QEMU 5's
``target/ppc/mmu-radix64.c``), and Linux reads them as ``_PAGE_ACCESSED``/``_PAGE_DIRTY``.
Newer QEMU raises a storage interrupt instead of writing R/C; POWER9 writes them.
"""
from __future__ import annotations

from typing import Any

import capstone
import unicorn
from unicorn import ppc_const as uc_ppc

from emu.arch import (
    NONE_ENTRY,
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
    UpdateEntry,
    Walk,
    swap_kind,
)
from emu.hookspecs import hookimpl

# -- geometry ------------------------------------------------------------------------------
RADIX_PTE_INDEX_SIZE = 9
RADIX_PTE_INDEX_SIZE_64K = 5      # radix-64k.h: 13/9/9/5, 256-byte PTE tables
RADIX_PMD_INDEX_SIZE = 9
RADIX_PUD_INDEX_SIZE = 9
RADIX_PGD_INDEX_SIZE = 13
RADIX_TREE_SIZE = 52            # radix__get_tree_size(): RTS = 52 - 31
PGD, PUD, PMD, PTE = 0, 1, 2, 3  # indexes into Ppc64.levels
_NEXT_INDEX_SIZE = (RADIX_PUD_INDEX_SIZE, RADIX_PMD_INDEX_SIZE, RADIX_PTE_INDEX_SIZE)

# -- entry bits ----------------------------------------------------------------------------
_PAGE_PRESENT = 1 << 63         # V
_PAGE_PTE = 1 << 62             # L: a leaf (or a swap entry)
_PAGE_INVALID = 1 << 61         # SW0: present to Linux while V is clear (pmdp_invalidate)
_PAGE_SPECIAL = 0x400           # SW2
_PAGE_SOFT_DIRTY = 0x200        # SW3
_PAGE_ACCESSED = 0x100          # R
_PAGE_DIRTY = 0x080             # C
_PAGE_NON_IDEMPOTENT = 0x020    # ATT=10: guarded I/O, no instruction fetch
_PAGE_ATT = 0x030
_PAGE_PRIVILEGED = 0x008        # EAA: kernel only
_PAGE_READ = 0x004
_PAGE_WRITE = 0x002             # EAA "read/write"
_PAGE_EXEC = 0x001
_PAGE_RWX = _PAGE_READ | _PAGE_WRITE | _PAGE_EXEC
_PAGE_PA_MAX = 53
PTE_RPN_MASK = ((1 << _PAGE_PA_MAX) - 1) & ~0xFFF
R_PTE_RPN = 0x01FFFFFFFFFFF000  # what the hardware takes as the real page number
RADIX_PTE_NONE_MASK = _PAGE_DIRTY | _PAGE_ACCESSED   # "an empty PTE can still have R/C writeback"
_PTE_LEAF_BITS = (_PAGE_PRESENT | _PAGE_PTE | PTE_RPN_MASK | _PAGE_SPECIAL | _PAGE_SOFT_DIRTY
                  | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_PRIVILEGED | _PAGE_RWX)

# Page-directory entries: V | NLB | NLS (RADIX_PMD_VAL_BITS and friends)
RADIX_PDE_NLB = 0x0FFFFFFFFFFFFF00
RADIX_PDE_NLS = 0x1F
RADIX_BAD_BITS = 0x60000000000000E0       # RADIX_{PMD,PUD,PGD}_BAD_BITS: L, SW0, bits 7:5

# Swap entries: L set, V clear, type in bits 4:0, offset in the RPN (__swp_entry)
_PAGE_BIT_SWAP_TYPE = 0
_SWP_TYPE_MASK = (1 << SWP_TYPE_BITS) - 1
_PAGE_SWP_SOFT_DIRTY = _PAGE_SOFT_DIRTY
_PAGE_SWP_EXCLUSIVE = _PAGE_NON_IDEMPOTENT
_SWP_BITS = (_PAGE_PTE | PTE_RPN_MASK | _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_EXCLUSIVE
             | _SWP_TYPE_MASK << _PAGE_BIT_SWAP_TYPE)

# Process-table entry dw0: RTS split in bits 62:61 and 7:5, root base, root index size
PRTB_RTS1_SHIFT = 61
PRTB_RTS2_SHIFT = 5
PRTBE_R_RPDB = 0x0FFFFFFFFFFFFF00
PRTBE_R_RPDS = 0x1F
R_EADDR_QUADRANT_SHIFT = 62

# -- MSR -----------------------------------------------------------------------------------
MSR_SF = 1 << 63
MSR_VR = 1 << 25                # Altivec
MSR_VSX = 1 << 23
MSR_FP = 1 << 13

CR0_SO = 0x1                    # summary overflow within the 4-bit CR0 field
_MAX_ERRNO = 4095
_TRAP = 0x7FE00008              # tw 31,0,0


class Ppc64(ArchSpec):
    """POWER9 radix, 4K base pages, big-endian (ELFv2 and ELFv1 binaries)."""

    name = "ppc64"
    description = "POWER9, Power ISA 3.0 radix MMU (4K pages, 2M/1G leaves), big-endian"
    uc_arch = unicorn.UC_ARCH_PPC
    uc_mode = unicorn.UC_MODE_PPC64 | unicorn.UC_MODE_BIG_ENDIAN
    cs_arch = capstone.CS_ARCH_PPC
    cs_mode = capstone.CS_MODE_64 | capstone.CS_MODE_BIG_ENDIAN
    big_endian = True
    elf_machine = "EM_PPC64"
    uname_machine = "ppc64"
    pc_reg = uc_ppc.UC_PPC_REG_PC
    sp_reg = uc_ppc.UC_PPC_REG_1
    root_register_name = "PRTE"
    sw_bits = frozenset({"special", "soft_dirty"})
    pte_frag_rules = "powerpc"     # PTE_FRAG_NR is 1 with 4K pages: one table per page
    options = {"page_size": "base page size: '4K' (default) or '64K' (radix-64k: 13/9/9/5, "
                            "256-byte PTE tables, 256 fragments per page)"}

    levels = (
        Level("pgd", "PGD", 39, RADIX_PGD_INDEX_SIZE, leaf=False),
        Level("pud", "PUD", 30, RADIX_PUD_INDEX_SIZE, leaf=True),
        Level("pmd", "PMD", 21, RADIX_PMD_INDEX_SIZE, leaf=True),
        Level("pte", "PTE", 12, RADIX_PTE_INDEX_SIZE, leaf=True),
    )
    task_size = 1 << 47             # DEFAULT_MAP_WINDOW: 128 TB unless an mmap hint asks for more
    _next_index_size = _NEXT_INDEX_SIZE

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        size = self.opts.get("page_size", "4K")
        if size not in ("4K", "64K"):
            raise ValueError(f"ppc64: page_size must be '4K' or '64K', not {size!r}")
        if size == "64K":
            self.page_shift = 16
            self.levels = self.levels[:3] + (Level("pte", "PTE", 16, RADIX_PTE_INDEX_SIZE_64K, leaf=True),)
            self._next_index_size = (RADIX_PUD_INDEX_SIZE, RADIX_PMD_INDEX_SIZE, RADIX_PTE_INDEX_SIZE_64K)

    # -- encode/decode ---------------------------------------------------------------------
    def decode(self, level: int, value: int) -> Entry:
        if not 0 <= level <= PTE:
            raise IndexError(f"ppc64 has no level {level}")
        if value == 0 or (level == PTE and not value & ~RADIX_PTE_NONE_MASK):
            return NONE_ENTRY
        if value & _PAGE_PTE:
            if not self.levels[level].leaf:
                return Entry(Kind.BAD)              # Linux never maps 512G leaves
            if value & (_PAGE_PRESENT | _PAGE_INVALID):
                return _decode_leaf(value)
            if level >= PMD:                        # THP migration entries live in PMDs
                return _decode_swap(value)
            return Entry(Kind.BAD)
        if level == PTE or not value & _PAGE_PRESENT or value & RADIX_BAD_BITS:
            return Entry(Kind.BAD)
        if value & ~(_PAGE_PRESENT | RADIX_PDE_NLB | RADIX_PDE_NLS) \
                or value & RADIX_PDE_NLS != self._next_index_size[level]:
            return Entry(Kind.BAD)
        return Entry(Kind.TABLE, paddr=value & RADIX_PDE_NLB)

    def encode(self, level: int, entry: Entry) -> int:
        if not 0 <= level <= PTE:
            raise IndexError(f"ppc64 has no level {level}")
        kind = entry.kind
        if kind is Kind.NONE:
            return 0
        if entry.uffd_wp:
            raise ValueError("ppc64 radix has no uffd-wp bit")
        if kind is Kind.TABLE:
            if level == PTE:
                raise ValueError("a PTE cannot point to a table")
            _check_addr(entry.paddr, RADIX_PDE_NLB, "next-level base")
            return _PAGE_PRESENT | entry.paddr | self._next_index_size[level]
        if kind is Kind.LEAF:
            if not self.levels[level].leaf:
                raise ValueError(f"no leaves at {self.levels[level].name}")
            _check_addr(entry.paddr, PTE_RPN_MASK & ~(self.levels[level].span - 1), "frame")
            return _encode_leaf(entry)
        if kind in (Kind.SWAP, Kind.MIGRATION):
            if level < PMD:
                raise ValueError("swap/migration entries live in PTEs and PMDs only")
            return _encode_swap(entry)
        raise ValueError(f"cannot encode a {kind.value} entry")

    # -- hardware walk ---------------------------------------------------------------------
    def walk(self, root: int, va: int, access: Access) -> Walk:
        """Process-scoped radix translation of a user (MSR.PR=1) access, as
        ``ppc_radix64_walk_tree``/``check_prot``/``set_rc`` in QEMU 5's mmu-radix64.c.

        Also, as the ISA says and QEMU 5 does not check: an EA beyond the tree size
        (RTS+31 bits, below the quadrant bits) takes a segment interrupt (ADDRESS), and
        so does any quadrant but 0, which is the only one that maps user PIDs."""
        tree_size = (((root >> 58) & 0x18) | ((root >> PRTB_RTS2_SHIFT) & 0x7)) + 31
        if va >> R_EADDR_QUADRANT_SHIFT or va >> tree_size:
            return Fault(FaultKind.ADDRESS, PGD, va, access)
        while True:                     # the R/C write-back lost a race: walk again
            result = yield from self._walk_tree(root, tree_size, va, access)
            if result is not None:
                return result

    def _walk_tree(self, root: int, size: int, va: int, access: Access) -> Walk:
        base, nls = root & PRTBE_R_RPDB, root & PRTBE_R_RPDS
        for level in range(len(self.levels)):
            if nls < 5 or size - nls < self.page_shift:   # DSISR_R_BADCONFIG
                return Fault(FaultKind.RESERVED, level, va, access)
            index = (va >> (size - nls)) & ((1 << nls) - 1)
            entry_paddr = base + index * 8
            pte = yield ReadEntry(entry_paddr, level)
            if not pte & _PAGE_PRESENT:
                return Fault(FaultKind.NOT_PRESENT, level, va, access)
            size -= nls
            if pte & _PAGE_PTE:
                return (yield from self._leaf(pte, entry_paddr, level, size, va, access))
            base, nls = pte & RADIX_PDE_NLB, pte & RADIX_PDE_NLS
        return Fault(FaultKind.RESERVED, len(self.levels) - 1, va, access)   # no leaf at the PTE level

    def _leaf(self, pte: int, entry_paddr: int, level: int, size: int, va: int,
              access: Access) -> Walk:
        if pte & _PAGE_PRIVILEGED:           # user access to a kernel (or PROT_NONE) page
            return Fault(FaultKind.PROTECTION, level, va, access)
        perms = Access.NONE
        if pte & _PAGE_READ:
            perms |= Access.R
        if pte & _PAGE_WRITE:
            perms |= Access.RW
        if pte & _PAGE_EXEC and pte & _PAGE_ATT != _PAGE_NON_IDEMPOTENT:
            perms |= Access.X
        if access & ~perms:
            return Fault(FaultKind.PROTECTION, level, va, access)
        new = pte | _PAGE_ACCESSED | (_PAGE_DIRTY if access & Access.W else 0)
        if new != pte:
            if not (yield UpdateEntry(entry_paddr, level, pte, new)):
                return None
        if not new & _PAGE_DIRTY:
            perms &= ~Access.W               # the first store must come back to set C
        mask = (1 << size) - 1
        return Translation((pte & R_PTE_RPN & ~mask) | (va & mask), 1 << size, perms, level,
                           entry_paddr)

    def root_register(self, root_table: int, asid: int = 0) -> int:
        """The radix root descriptor: process-table entry dw0 for a 52-bit tree rooted at
        ``root_table`` (``radix__get_tree_size() | __pa(pgd) | RADIX_PGD_INDEX_SIZE``).
        The PID that selects the entry lives in its own SPR; ``asid`` is ignored."""
        _check_addr(root_table, PRTBE_R_RPDB, "root table")
        rts = RADIX_TREE_SIZE - 31
        return ((rts >> 3) << PRTB_RTS1_SHIFT | (rts & 0x7) << PRTB_RTS2_SHIFT | root_table
                | RADIX_PGD_INDEX_SIZE)

    def root_table(self, root_register: int) -> int:
        return root_register & PRTBE_R_RPDB

    # -- TLB/flush facts -------------------------------------------------------------------
    # tlbie broadcasts an invalidation to every CPU over the fabric (no IPIs); Linux uses
    # tlbiel for mms only this CPU has run. R/C are written by the walk, so clearing young
    # or dirty in a PTE needs a flush before the hardware sets them again.

    # -- CPU and syscall ABI ---------------------------------------------------------------
    def cpu_setup(self, uc: Any) -> None:
        # The default CPU starts in 64-bit mode (SF); ctl_set_cpu_model would reset the MSR
        # to 32-bit, so the model is left alone. glibc uses FP, VMX and VSX at once.
        msr = uc.reg_read(uc_ppc.UC_PPC_REG_MSR)
        uc.reg_write(uc_ppc.UC_PPC_REG_MSR, msr | MSR_SF | MSR_FP | MSR_VSX | MSR_VR)

    def start_registers(self, uc: Any, entry: int, sp: int) -> None:
        """ELFv2: the global entry point computes the TOC from r12."""
        uc.reg_write(self.sp_reg, sp)
        uc.reg_write(uc_ppc.UC_PPC_REG_12, entry)

    def set_syscall_result(self, uc: Any, value: int) -> None:
        """Linux/powerpc returns errors as a positive errno with CR0.SO set
        (``syscall_exit_prepare``); success clears SO."""
        cr0 = uc.reg_read(uc_ppc.UC_PPC_REG_CR0)
        if -_MAX_ERRNO <= value < 0:
            uc.reg_write(self.syscall_abi.ret_reg, -value)
            uc.reg_write(uc_ppc.UC_PPC_REG_CR0, cr0 | CR0_SO)
        else:
            uc.reg_write(self.syscall_abi.ret_reg, value & 0xFFFFFFFFFFFFFFFF)
            uc.reg_write(uc_ppc.UC_PPC_REG_CR0, cr0 & ~CR0_SO)

    clone_args = ("flags", "newsp", "parent_tid", "tls", "child_tid")      # CLONE_BACKWARDS

    def set_tls(self, uc: Any, value: int) -> None:
        uc.reg_write(uc_ppc.UC_PPC_REG_13, value)                # r13: the thread pointer

    def sentinel_code(self) -> bytes:
        return _TRAP.to_bytes(4, "big") * 4

    syscall_abi = SyscallABI(
        trap="intr",
        intno=8,                    # sc arrives with the PC already past it
        nr_reg=uc_ppc.UC_PPC_REG_0,
        arg_regs=tuple(getattr(uc_ppc, f"UC_PPC_REG_{i}") for i in range(3, 9)),
        ret_reg=uc_ppc.UC_PPC_REG_3,
        numbers={
            "read": 3, "write": 4, "writev": 146, "ioctl": 54, "brk": 45, "mmap": 90,
            "mlock": 150, "munlock": 151, "mlock2": 378,
            "munmap": 91, "mprotect": 125, "madvise": 205, "mremap": 163, "exit": 1,
            "exit_group": 234, "set_tid_address": 232, "set_robust_list": 300, "rseq": 387,
            "prlimit64": 325, "readlink": 85, "readlinkat": 296, "getrandom": 359,
            "newfstatat": 291, "fstat": 108, "uname": 122, "futex": 221, "clock_gettime": 246,
            "clone": 120, "wait4": 114, "sched_yield": 158,
            "rt_sigaction": 173, "rt_sigprocmask": 174, "getpid": 20, "gettid": 207,
            "tgkill": 250, "memfd_create": 360, "ftruncate": 93, "userfaultfd": 364, "openat": 286,
            "close": 6,
            "lseek": 19, "pread64": 179, "mincore": 206, "process_madvise": 440,
        },
        ioc_dir=(29, 4, 2),         # arch/powerpc/include/uapi/asm/ioctl.h: 3 dir bits, 13 size bits
    )

    # -- timing defaults -------------------------------------------------------------------
    # spec/timing.md §2 "power9": 64-entry D-ERAT in front of a 1024-entry TLB.
    timing = TimingDefaults(
        clock_ghz=3.5,
        l1_dtlb_entries=64,
        l2_tlb_entries=1024,
        l2_tlb_hit=8,
        walk_level_latency=12,      # an L2 hit per table read
        flush="broadcast",
    )


# -- encode/decode helpers ---------------------------------------------------------------------
def _check_addr(paddr: int, mask: int, what: str) -> None:
    if paddr < 0 or paddr & ~mask:
        raise ValueError(f"{what} {paddr:#x} is not aligned to / does not fit the field {mask:#x}")


def _decode_leaf(value: int) -> Entry:
    if value & ~(_PTE_LEAF_BITS | _PAGE_INVALID):    # keys, ATT, devmap, RSV: not modelled
        return Entry(Kind.BAD)
    prot = Access.NONE
    if value & _PAGE_READ:
        prot |= Access.R
    if value & _PAGE_WRITE:
        prot |= Access.W
    if value & _PAGE_EXEC:
        prot |= Access.X
    # PROT_NONE is a privileged page without EAA bits (PAGE_NONE); a user page has neither.
    user = not value & _PAGE_PRIVILEGED or not prot
    return Entry(Kind.LEAF, paddr=value & PTE_RPN_MASK, prot=prot, user=user,
                 young=bool(value & _PAGE_ACCESSED), dirty=bool(value & _PAGE_DIRTY),
                 special=bool(value & _PAGE_SPECIAL), soft_dirty=bool(value & _PAGE_SOFT_DIRTY))


def _encode_leaf(entry: Entry) -> int:
    value = _PAGE_PRESENT | _PAGE_PTE | entry.paddr
    if entry.prot & Access.R:
        value |= _PAGE_READ
    if entry.prot & Access.W:
        value |= _PAGE_WRITE
    if entry.prot & Access.X:
        value |= _PAGE_EXEC
    if not entry.user or not entry.prot:
        value |= _PAGE_PRIVILEGED
    if entry.young:
        value |= _PAGE_ACCESSED
    if entry.dirty:
        value |= _PAGE_DIRTY
    if entry.special:
        value |= _PAGE_SPECIAL
    if entry.soft_dirty:
        value |= _PAGE_SOFT_DIRTY
    return value


def _decode_swap(value: int) -> Entry:
    if value & ~_SWP_BITS:
        return Entry(Kind.BAD)
    swp_type = (value >> _PAGE_BIT_SWAP_TYPE) & _SWP_TYPE_MASK
    return Entry(swap_kind(swp_type), swp_type=swp_type, swp_offset=(value & PTE_RPN_MASK) >> 12,
                 soft_dirty=bool(value & _PAGE_SWP_SOFT_DIRTY),
                 exclusive=bool(value & _PAGE_SWP_EXCLUSIVE))


def _encode_swap(entry: Entry) -> int:
    if not 0 <= entry.swp_type <= _SWP_TYPE_MASK:
        raise ValueError(f"swap type {entry.swp_type} does not fit {SWP_TYPE_BITS} bits")
    offset = entry.swp_offset << 12
    if entry.swp_offset < 0 or offset & ~PTE_RPN_MASK:
        raise ValueError(f"swap offset {entry.swp_offset:#x} does not fit the RPN field")
    value = _PAGE_PTE | offset | entry.swp_type << _PAGE_BIT_SWAP_TYPE
    if entry.soft_dirty:
        value |= _PAGE_SWP_SOFT_DIRTY
    if entry.exclusive:
        value |= _PAGE_SWP_EXCLUSIVE
    return value


@hookimpl
def emu_arch_specs() -> list[type]:
    return [Ppc64]
