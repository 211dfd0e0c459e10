"""arm64 (AArch64 VMSAv8-64, stage 1, EL1&0): 4K granule, 48-bit VA, 4 levels; 2M/1G blocks.

Descriptor bits and primitives follow Linux v6.10+ ``arch/arm64/include/asm/pgtable-hwdef.h``,
``pgtable-prot.h`` and ``pgtable.h`` (PTE_PRESENT_INVALID, PTE_UFFD_WP at bit 58); the walk
follows the Arm ARM and QEMU's ``get_phys_addr_lpae()`` (spec/arch_formats.md §2).
"""
from __future__ import annotations

from typing import Any, ClassVar

import capstone
import unicorn
from unicorn import arm64_const

from emu.arch import (
    NONE_ENTRY,
    PAGE_SIZE,
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
# ARM64_HW_PGTABLE_LEVELS(48) = 4 with a 4K granule: 9 index bits per level, each table
# one page. Blocks exist at L1 (1G) and L2 (2M); a block at L0 needs LPA2.
VA_BITS = 48
LEVELS = (
    Level("pgd", "L0", 39, 9, leaf=False),
    Level("pud", "L1", 30, 9, leaf=True),
    Level("pmd", "L2", 21, 9, leaf=True),
    Level("pte", "L3", 12, 9, leaf=True),
)
TASK_SIZE = 1 << VA_BITS                # TASK_SIZE_64: all of TTBR0's range

# -- entry bits (pgtable-hwdef.h, pgtable-prot.h) ------------------------------------------
PTE_VALID = 1 << 0
PTE_TABLE_BIT = 1 << 1                  # table at L0-L2, page at L3; clear: block
PTE_TYPE_PAGE = 3
PMD_TYPE_TABLE = 3
PMD_TYPE_SECT = 1
MT_NORMAL = 0                           # MAIR_EL1 slot of normal write-back memory
PTE_USER = 1 << 6                       # AP[1]: EL0 may access
PTE_RDONLY = 1 << 7                     # AP[2]
PTE_SHARED = 3 << 8                     # SH: inner shareable
PTE_AF = 1 << 10
PTE_NG = 1 << 11
PTE_PRESENT_INVALID = PTE_NG            # only while PTE_VALID is clear: PROT_NONE
PTE_DBM = 1 << 51
PTE_WRITE = PTE_DBM                     # Linux's write permission is the DBM bit
PTE_PXN = 1 << 53
PTE_UXN = 1 << 54
PTE_DIRTY = 1 << 55                     # software bits 55..58: ignored by the MMU
PTE_SPECIAL = 1 << 56
PTE_UFFD_WP = 1 << 58
PTE_ADDR_LOW = ((1 << (VA_BITS - 12)) - 1) << 12      # output address 47:12

# next-level attributes in a table descriptor; they only ever take rights away
PMD_TABLE_PXN = 1 << 59
PMD_TABLE_UXN = 1 << 60
PMD_TABLE_AP_NO_EL0 = 1 << 61           # APTable[0]
PMD_TABLE_AP_RDONLY = 1 << 62           # APTable[1]

# Swap entries (v6.10+): type in 10:6, offset in 61:12, bits 1:0 and PTE_PRESENT_INVALID
# clear so the entry is neither valid nor PROT_NONE.
__SWP_TYPE_SHIFT = 6
__SWP_TYPE_BITS = 5
__SWP_OFFSET_SHIFT = 12
__SWP_OFFSET_BITS = 50
PTE_SWP_EXCLUSIVE = 1 << 2
PTE_SWP_UFFD_WP = 1 << 3


def PTE_ATTRINDX(mt: int) -> int:      # the kernel's macro
    return mt << 2


# the memory-type part of _PAGE_DEFAULT: normal write-back memory, inner shareable
_NORMAL_ATTRS = PTE_SHARED | PTE_ATTRINDX(MT_NORMAL)
TTBR_BADDR_MASK = PTE_ADDR_LOW          # a 4K-aligned L0 table
TTBR_ASID_SHIFT = 48


# -- encode/decode -------------------------------------------------------------------------
def _flag(value: int, bit: int) -> bool:
    return bool(value & bit)


def _swp_entry(swp_type: int, offset: int) -> int:
    """__swp_entry()"""
    if not 0 <= swp_type < 1 << __SWP_TYPE_BITS:
        raise ValueError(f"arm64: swap type {swp_type} needs more than {__SWP_TYPE_BITS} bits")
    if not 0 <= offset < 1 << __SWP_OFFSET_BITS:
        raise ValueError(f"arm64: swap offset {offset:#x} needs more than {__SWP_OFFSET_BITS} bits")
    return swp_type << __SWP_TYPE_SHIFT | offset << __SWP_OFFSET_SHIFT


def _swp_type(value: int) -> int:
    return value >> __SWP_TYPE_SHIFT & ((1 << __SWP_TYPE_BITS) - 1)


def _swp_offset(value: int) -> int:
    return value >> __SWP_OFFSET_SHIFT & ((1 << __SWP_OFFSET_BITS) - 1)


def _pte_dirty(value: int) -> bool:
    """pte_dirty(): software dirty, or hardware dirty (DBM set, AP[2] cleared)."""
    return _flag(value, PTE_DIRTY) or (_flag(value, PTE_WRITE) and not value & PTE_RDONLY)


class Arm64(ArchSpec):
    """arm64 as Linux drives it: user pages in TTBR0 with an ASID, EL0 accesses."""

    name = "arm64"
    description = "arm64, 4K granule, 48-bit VA, 4 levels, 2M/1G blocks"
    uc_arch = unicorn.UC_ARCH_ARM64
    uc_mode = unicorn.UC_MODE_ARM
    cs_arch = capstone.CS_ARCH_ARM64
    cs_mode = capstone.CS_MODE_ARM
    big_endian = False
    elf_machine = "EM_AARCH64"
    uname_machine = "aarch64"
    pc_reg = arm64_const.UC_ARM64_REG_PC
    sp_reg = arm64_const.UC_ARM64_REG_SP
    options = {"hafdbs": "FEAT_HAFDBS: the MMU sets AF and clears AP[2] on a write to a DBM page"}
    root_register_name = "TTBR0_EL1"
    sw_bits = frozenset({"special", "uffd_wp"})      # no soft-dirty on arm64
    # PTE_UFFD_WP (bit 58) and PTE_SWP_UFFD_WP came with "arm64/mm: Add uffd write-protect
    # support" (6.10): under older profiles the bit is in the format but unused
    kconfig = {"HAVE_ARCH_USERFAULTFD_WP": (6, 10), "HAVE_ARCH_USERFAULTFD_MINOR": (5, 13)}
    levels = LEVELS
    task_size = TASK_SIZE

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.hafdbs = bool(options.get("hafdbs", False))

    # -- encode/decode ---------------------------------------------------------------------
    def decode(self, level: int, value: int) -> Entry:
        lv = self.levels[level]
        if not value:
            return NONE_ENTRY
        if value & PTE_VALID:
            table_bit = _flag(value, PTE_TABLE_BIT)
            if level < self.pte_level and table_bit:
                return Entry(Kind.TABLE, paddr=value & PTE_ADDR_LOW, user=not value & PMD_TABLE_UXN)
            if lv.leaf and (table_bit or level < self.pte_level):
                return self._decode_leaf(level, value)
            return Entry(Kind.BAD)          # a block at L0, or the reserved L3 "01"
        if not lv.leaf:
            return Entry(Kind.BAD)
        if value & PTE_PRESENT_INVALID:     # pte_present_invalid(): PROT_NONE, split pmd
            return self._decode_leaf(level, value)
        return self._decode_swap(value)

    def _decode_leaf(self, level: int, value: int) -> Entry:
        paddr = value & PTE_ADDR_LOW & ~(self.levels[level].span - 1)
        write = _flag(value, PTE_WRITE)
        if not value & PTE_VALID:           # PAGE_NONE has no PTE_USER; it is a user page
            prot, user = Access.NONE, True
        elif value & PTE_USER or not value & PTE_UXN:   # user page, or user exec-only
            user = True
            prot = (Access.R if value & PTE_USER else Access.NONE) \
                | (Access.W if write else Access.NONE) \
                | (Access.NONE if value & PTE_UXN else Access.X)
        else:                               # kernel page: UXN always, PXN unless exec
            user = False
            prot = Access.R | (Access.W if write else Access.NONE) \
                | (Access.NONE if value & PTE_PXN else Access.X)
        return Entry(Kind.LEAF, paddr=paddr, prot=prot, user=user, young=_flag(value, PTE_AF),
                     dirty=_pte_dirty(value), special=_flag(value, PTE_SPECIAL),
                     uffd_wp=_flag(value, PTE_UFFD_WP))

    def _decode_swap(self, value: int) -> Entry:
        swp_type = _swp_type(value)
        return Entry(swap_kind(swp_type), swp_type=swp_type, swp_offset=_swp_offset(value),
                     uffd_wp=_flag(value, PTE_SWP_UFFD_WP), exclusive=_flag(value, PTE_SWP_EXCLUSIVE))

    def encode(self, level: int, entry: Entry) -> int:
        lv = self.levels[level]
        kind = entry.kind
        if kind is Kind.NONE:
            return 0
        if kind is Kind.TABLE:
            if level == self.pte_level:
                raise ValueError("arm64: an L3 descriptor cannot point to a table")
            self._check_paddr(entry.paddr, PAGE_SIZE)
            # pmd_populate(): user tables never let EL1 execute, kernel ones never EL0
            return entry.paddr | PMD_TYPE_TABLE | (PMD_TABLE_PXN if entry.user else PMD_TABLE_UXN)
        if not lv.leaf:
            raise ValueError(f"arm64: {lv.name} entries are tables or none, not {kind.value}")
        if kind is Kind.LEAF:
            return self._encode_leaf(level, entry)
        if kind is Kind.SWAP or kind is Kind.MIGRATION:
            return self._encode_swap(entry)
        raise ValueError(f"arm64: cannot encode a {kind.value} entry")

    def _encode_leaf(self, level: int, entry: Entry) -> int:
        """The protection_map[] values (PAGE_READONLY, PAGE_SHARED_EXEC, PAGE_EXECONLY,
        PAGE_NONE, ...) plus pte_mkyoung/pte_mkdirty/pte_mkspecial/pte_mkuffd_wp.
        soft_dirty is dropped: arm64 has no soft-dirty bit, and Linux's helpers are no-ops."""
        self._check_paddr(entry.paddr, self.levels[level].span)
        prot = entry.prot
        if prot & Access.W:                 # W implies R (no write-only mappings)
            prot |= Access.R
        value = entry.paddr | _NORMAL_ATTRS
        if level == self.pte_level:
            value |= PTE_TYPE_PAGE if prot else PTE_TABLE_BIT
        else:
            value |= PMD_TYPE_SECT if prot else 0
        if not prot:                        # PAGE_NONE: invalid to the MMU, present to Linux
            value |= PTE_PRESENT_INVALID | PTE_RDONLY | PTE_PXN | PTE_UXN
        elif entry.user:
            value |= PTE_NG | PTE_PXN       # user mappings are per-ASID; EL1 never runs them
            if prot & Access.R:
                value |= PTE_USER
            if not prot & Access.X:
                value |= PTE_UXN
        else:
            value |= PTE_UXN
            if not prot & Access.X:
                value |= PTE_PXN
        if prot & Access.W:
            # writable-clean is DBM|RDONLY; pte_mkdirty() adds PTE_DIRTY and clears RDONLY
            value |= PTE_WRITE | (PTE_DIRTY if entry.dirty else PTE_RDONLY)
        else:
            value |= PTE_RDONLY | (PTE_DIRTY if entry.dirty else 0)
        if entry.young:
            value |= PTE_AF
        if entry.special:
            value |= PTE_SPECIAL
        if entry.uffd_wp:
            value |= PTE_UFFD_WP
        return value

    def _encode_swap(self, entry: Entry) -> int:
        if swap_kind(entry.swp_type) is not entry.kind:
            raise ValueError(f"arm64: swap type {entry.swp_type} is not a {entry.kind.value} entry")
        value = _swp_entry(entry.swp_type, entry.swp_offset)
        if entry.uffd_wp:
            value |= PTE_SWP_UFFD_WP
        if entry.exclusive:
            value |= PTE_SWP_EXCLUSIVE
        return value

    @staticmethod
    def _check_paddr(paddr: int, align: int) -> None:
        if paddr & (align - 1) or not 0 <= paddr <= PTE_ADDR_LOW:
            raise ValueError(f"arm64: physical address {paddr:#x} is not a {align:#x}-aligned "
                             f"{VA_BITS}-bit address")

    # -- hardware walk ---------------------------------------------------------------------
    def walk(self, root: int, va: int, access: Access) -> Walk:
        """An EL0 access through TTBR0_EL1 (T0SZ=16, TBI off), as get_phys_addr_lpae().

        Table descriptors can only take rights away (APTable, UXNTable). AF=0 is an
        access-flag fault, checked before permissions. With FEAT_HAFDBS a permitted access
        sets AF instead, and a store to a DBM|RDONLY page clears RDONLY; both are one
        compare-and-exchange, and a lost race restarts the walk.
        """
        if va >> VA_BITS:                   # TTBR1's half, or the gap: not this root
            return Fault(FaultKind.ADDRESS, 0, va, access)
        while True:
            result = yield from self._walk_once(root, va, access)
            if result is not None:
                return result

    def _walk_once(self, root: int, va: int, access: Access) -> Walk:
        table = root & TTBR_BADDR_MASK      # the ASID in 63:48 and CnP are not address
        no_el0 = rdonly = uxn = False
        for level, lv in enumerate(self.levels):
            entry_paddr = table + lv.index(va) * 8
            desc = yield ReadEntry(entry_paddr, level)
            if not desc & PTE_VALID:
                return Fault(FaultKind.NOT_PRESENT, level, va, access)
            if level < self.pte_level and desc & PTE_TABLE_BIT:
                no_el0 = no_el0 or _flag(desc, PMD_TABLE_AP_NO_EL0)
                rdonly = rdonly or _flag(desc, PMD_TABLE_AP_RDONLY)
                uxn = uxn or _flag(desc, PMD_TABLE_UXN)
                table = desc & PTE_ADDR_LOW
                continue
            if not lv.leaf or not (desc & PTE_TABLE_BIT or level < self.pte_level):
                # a translation fault to the hardware; Linux never writes these
                return Fault(FaultKind.RESERVED, level, va, access)
            if not desc & PTE_AF and not self.hafdbs:
                return Fault(FaultKind.ACCESS_FLAG, level, va, access)
            allowed = Access.NONE if uxn or desc & PTE_UXN else Access.X
            clean_dbm = False
            if desc & PTE_USER and not no_el0:
                allowed |= Access.R
                if not rdonly and not desc & PTE_RDONLY:
                    allowed |= Access.W
                elif not rdonly and self.hafdbs and desc & PTE_DBM:
                    clean_dbm = True        # writable-clean: a store makes it dirty
            make_dirty = clean_dbm and bool(access & Access.W)
            if make_dirty:
                allowed |= Access.W
            if access & ~allowed:
                return Fault(FaultKind.PROTECTION, level, va, access)
            new = desc | PTE_AF
            if make_dirty:
                new &= ~PTE_RDONLY
            if new != desc and not (yield UpdateEntry(entry_paddr, level, desc, new)):
                return None
            frame = desc & PTE_ADDR_LOW & ~(lv.span - 1)
            return Translation(paddr=frame | (va & (lv.span - 1)), size=lv.span, perms=allowed,
                               level=level, entry_paddr=entry_paddr)
        raise AssertionError("unreachable: L3 descriptors are never tables")

    def root_register(self, root_table: int, asid: int = 0) -> int:
        if root_table & (PAGE_SIZE - 1) or not 0 <= root_table <= PTE_ADDR_LOW or not 0 <= asid < 1 << 16:
            raise ValueError(f"arm64: TTBR0_EL1 needs a page-aligned root ({root_table:#x}) "
                             f"and a 16-bit ASID ({asid})")
        return asid << TTBR_ASID_SHIFT | root_table

    def root_table(self, root_register: int) -> int:
        return root_register & TTBR_BADDR_MASK

    # -- TLB/flush facts -------------------------------------------------------------------
    # "dsb ishst; tlbi vale1is, ASID<<48 | va>>12; dsb ish": TLBI is broadcast to every CPU
    # in the inner-shareable domain, so no IPIs (timing.flush). Linux switches from per-page
    # TLBIs to one ASID-wide flush above MAX_TLBI_OPS pages.
    MAX_TLBI_OPS: ClassVar[int] = 512    # PTRS_PER_PTE

    # -- CPU and syscall ABI ---------------------------------------------------------------
    def cpu_setup(self, uc: Any) -> None:
        # Before any other call: the default 1K target page makes every TLB fill cover 1K.
        uc.ctl_set_page_size(PAGE_SIZE)
        # CPACR_EL1.FPEN=0b11: FP/SIMD does not trap (compilers emit NEON for memcpy etc.)
        cpacr = uc.reg_read(arm64_const.UC_ARM64_REG_CPACR_EL1)
        uc.reg_write(arm64_const.UC_ARM64_REG_CPACR_EL1, cpacr | 3 << 20)

    # svc #0 arrives as UC_HOOK_INTR intno 2 (EXCP_SWI) with PC already past the svc.
    syscall_abi = SyscallABI(
        trap="intr",
        intno=2,
        nr_reg=arm64_const.UC_ARM64_REG_X8,
        arg_regs=(arm64_const.UC_ARM64_REG_X0, arm64_const.UC_ARM64_REG_X1, arm64_const.UC_ARM64_REG_X2,
                  arm64_const.UC_ARM64_REG_X3, arm64_const.UC_ARM64_REG_X4, arm64_const.UC_ARM64_REG_X5),
        ret_reg=arm64_const.UC_ARM64_REG_X0,
        pc_advance=0,
        numbers={
            "read": 63, "write": 64, "writev": 66, "ioctl": 29, "brk": 214, "mmap": 222,
            "mlock": 228, "munlock": 229, "mlock2": 284,
            "munmap": 215, "mprotect": 226, "madvise": 233, "mremap": 216, "exit": 93,
            "exit_group": 94, "set_tid_address": 96, "set_robust_list": 99, "rseq": 293,
            "prlimit64": 261, "readlinkat": 78, "getrandom": 278, "newfstatat": 79,
            "fstat": 80, "uname": 160, "futex": 98, "clock_gettime": 113, "rt_sigaction": 134,
            "clone": 220, "wait4": 260, "sched_yield": 124,
            "rt_sigprocmask": 135, "getpid": 172, "gettid": 178, "tgkill": 131,
            "memfd_create": 279, "ftruncate": 46, "userfaultfd": 282, "openat": 56, "close": 57, "lseek": 62,
            "pread64": 67, "mincore": 232, "process_madvise": 440,
        },
    )

    clone_args = ("flags", "newsp", "parent_tid", "tls", "child_tid")      # CLONE_BACKWARDS

    def set_tls(self, uc: Any, value: int) -> None:
        uc.reg_write(arm64_const.UC_ARM64_REG_TPIDR_EL0, value)

    def sentinel_code(self) -> bytes:
        return b"\xad\xde\x00\x00" * 4     # udf #0xdead

    # -- timing defaults (spec/timing.md §2, profile "neoverse_n1") ------------------------
    # walk_level_latency: the L2 hit figure (see the x86_64 plugin for why).
    timing = TimingDefaults(clock_ghz=3.0, l1_dtlb_entries=48, l2_tlb_entries=1280, l2_tlb_hit=3,
                            walk_level_latency=11, fault_cycles=3300, syscall_cycles=150,
                            flush="broadcast")


@hookimpl
def emu_arch_specs() -> list[type]:
    return [Arm64]
