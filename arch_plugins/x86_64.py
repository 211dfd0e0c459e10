"""x86-64: 4-level paging (PML4), 5-level with LA57; 2M and 1G leaves.

Entry bits and primitives follow Linux's ``arch/x86/include/asm/pgtable_types.h`` and
``pgtable_64.h``; the walk follows the SDM and QEMU's ``target/i386`` ``mmu_translate()``
(spec/arch_formats.md §1).
"""
from __future__ import annotations

from typing import Any, ClassVar

import capstone
import unicorn
from unicorn import x86_const

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
    UpdateEntry,
    Walk,
    swap_kind,
)
from emu.hookspecs import hookimpl

U64 = (1 << 64) - 1

# -- geometry ------------------------------------------------------------------------------
# Every table is one 4K page of 512 entries. With 4 levels Linux folds the p4d into the pgd.
LEVELS_4 = (
    Level("pgd", "PML4", 39, 9, leaf=False),
    Level("pud", "PDPT", 30, 9, leaf=True),     # 1G with PS
    Level("pmd", "PD", 21, 9, leaf=True),       # 2M with PS
    Level("pte", "PT", 12, 9, leaf=True),
)
LEVELS_5 = (Level("pgd", "PML5", 48, 9, leaf=False),
            Level("p4d", "PML4", 39, 9, leaf=False)) + LEVELS_4[1:]

# TASK_SIZE_MAX: the last page below the canonical hole stays unmapped (SYSRET erratum).
TASK_SIZE_4 = (1 << 47) - PAGE_SIZE
TASK_SIZE_5 = (1 << 56) - PAGE_SIZE

# -- entry bits (pgtable_types.h) ----------------------------------------------------------
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_PWT = 1 << 3
_PAGE_PCD = 1 << 4
_PAGE_ACCESSED = 1 << 5
_PAGE_DIRTY = 1 << 6
_PAGE_PSE = 1 << 7                      # PS in a PDPTE/PDE; PAT in a 4K PTE
_PAGE_GLOBAL = 1 << 8
_PAGE_PROTNONE = _PAGE_GLOBAL           # only while _PAGE_PRESENT is clear
_PAGE_SPECIAL = 1 << 9                  # software bits 9..11: ignored by the MMU
_PAGE_UFFD_WP = 1 << 10
_PAGE_SOFT_DIRTY = 1 << 11
_PAGE_PAT_LARGE = 1 << 12               # PAT moves here in a large leaf
_PAGE_NX = 1 << 63

PHYSICAL_MASK_SHIFT = 52
PTE_PFN_MASK = ((1 << PHYSICAL_MASK_SHIFT) - 1) & ~(PAGE_SIZE - 1)
PTE_FLAGS_MASK = U64 & ~PTE_PFN_MASK

_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
_KERNPG_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY
# Knights Landing may set A/D in a non-present entry, so *_none() ignores them.
_PAGE_KNL_ERRATUM_MASK = _PAGE_DIRTY | _PAGE_ACCESSED

# Swap entries (pgtable_64.h): type in 63:59, the *inverted* offset in 58:9 (L1TF: a
# non-present entry must not point at real memory). Bits 0, 7 and 8 stay clear so the
# entry is neither present nor PROT_NONE nor a huge pmd; A/D (5, 6) stay clear because
# of the erratum above.
SWP_OFFSET_FIRST_BIT = 9                # _PAGE_BIT_PROTNONE + 1
SWP_OFFSET_SHIFT = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS
SWP_OFFSET_BITS = 64 - SWP_OFFSET_SHIFT
_PAGE_SWP_SOFT_DIRTY = _PAGE_RW
_PAGE_SWP_UFFD_WP = _PAGE_USER
_PAGE_SWP_EXCLUSIVE = _PAGE_PWT

DEFAULT_MAXPHYADDR = 46                 # Skylake-SP, the timing profile below


# -- encode/decode -------------------------------------------------------------------------
def _swp_entry(swp_type: int, offset: int) -> int:
    """__swp_entry(): offset stored inverted."""
    return ((~offset << SWP_OFFSET_SHIFT) & U64) >> SWP_TYPE_BITS | swp_type << (64 - SWP_TYPE_BITS)


def _swp_type(value: int) -> int:
    return value >> (64 - SWP_TYPE_BITS)


def _swp_offset(value: int) -> int:
    return ((~value << SWP_TYPE_BITS) & U64) >> SWP_OFFSET_SHIFT


def _flag(value: int, bit: int) -> bool:
    return bool(value & bit)


class X86_64(ArchSpec):
    """x86-64 long mode as Linux drives it: CR0.WP, EFER.NXE, no SMEP/SMAP (user accesses)."""

    name = "x86_64"
    description = "x86-64, 4-level paging (5-level with la57), 2M/1G leaves"
    uc_arch = unicorn.UC_ARCH_X86
    uc_mode = unicorn.UC_MODE_64
    cs_arch = capstone.CS_ARCH_X86
    cs_mode = capstone.CS_MODE_64
    big_endian = False
    elf_machine = "EM_X86_64"
    uname_machine = "x86_64"
    pc_reg = x86_const.UC_X86_REG_RIP
    sp_reg = x86_const.UC_X86_REG_RSP
    options = {
        "la57": "5-level paging (PML5, 57-bit VA)",
        "maxphyaddr": f"physical address width in bits (default {DEFAULT_MAXPHYADDR}); "
                      "address bits above it are reserved",
    }
    root_register_name = "CR3"
    sw_bits = frozenset({"special", "soft_dirty", "uffd_wp"})
    kconfig = {"HAVE_ARCH_USERFAULTFD_WP": (5, 7),          # _PAGE_UFFD_WP (bit 10), X86_64 only
               "HAVE_ARCH_USERFAULTFD_MINOR": (5, 13)}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.la57 = bool(options.get("la57", False))
        self.levels = LEVELS_5 if self.la57 else LEVELS_4
        self.task_size = TASK_SIZE_5 if self.la57 else TASK_SIZE_4
        self.va_bits = 57 if self.la57 else 48
        self.maxphyaddr = int(options.get("maxphyaddr", DEFAULT_MAXPHYADDR))
        if not 36 <= self.maxphyaddr <= PHYSICAL_MASK_SHIFT:
            raise ValueError(f"x86_64: maxphyaddr must be 36..52, not {self.maxphyaddr}")
        # Address bits the CPU does not implement are reserved in every entry (EFER.NXE
        # is on, so NX is not).
        self._rsvd_mask = PTE_PFN_MASK & ~((1 << self.maxphyaddr) - 1)

    def describe(self) -> str:
        return super().describe() + (" (LA57)" if self.la57 else "")

    # -- encode/decode ---------------------------------------------------------------------
    def decode(self, level: int, value: int) -> Entry:
        lv = self.levels[level]
        if not value & ~_PAGE_KNL_ERRATUM_MASK:
            return NONE_ENTRY
        huge = level != self.pte_level and _flag(value, _PAGE_PSE)
        if value & _PAGE_PRESENT:
            if level == self.pte_level or huge:
                return self._decode_leaf(level, value) if lv.leaf else Entry(Kind.BAD)
            return self._decode_table(value)
        if not lv.leaf:
            return Entry(Kind.BAD)
        # pte_present()/pmd_present(): PROT_NONE, or a huge pmd made invalid for a split
        if value & _PAGE_PROTNONE or huge:
            return self._decode_leaf(level, value)
        return self._decode_swap(value)

    def _decode_table(self, value: int) -> Entry:
        """pmd_bad() and friends: a table entry carries exactly _PAGE_TABLE (user) or
        _KERNPG_TABLE; A may be clear (hardware sets it) and nothing else may be set."""
        flags = value & PTE_FLAGS_MASK | _PAGE_ACCESSED
        if flags == _PAGE_TABLE:
            return Entry(Kind.TABLE, paddr=value & PTE_PFN_MASK)
        if flags == _KERNPG_TABLE:
            return Entry(Kind.TABLE, paddr=value & PTE_PFN_MASK, user=False)
        return Entry(Kind.BAD)

    def _decode_leaf(self, level: int, value: int) -> Entry:
        # pmd_pfn(): below the leaf size sit PAT (bit 12) and reserved bits, not address
        paddr = value & PTE_PFN_MASK & ~(self.levels[level].span - 1)
        if value & _PAGE_PRESENT:
            prot = Access.R
            if value & _PAGE_RW:
                prot |= Access.W
            if not value & _PAGE_NX:
                prot |= Access.X
            user = _flag(value, _PAGE_USER)
        else:                               # PAGE_NONE has no USER bit; it is a user page
            prot, user = Access.NONE, True
        return Entry(Kind.LEAF, paddr=paddr, prot=prot, user=user,
                     young=_flag(value, _PAGE_ACCESSED), dirty=_flag(value, _PAGE_DIRTY),
                     special=_flag(value, _PAGE_SPECIAL), soft_dirty=_flag(value, _PAGE_SOFT_DIRTY),
                     uffd_wp=_flag(value, _PAGE_UFFD_WP))

    def _decode_swap(self, value: int) -> Entry:
        swp_type = _swp_type(value)
        return Entry(swap_kind(swp_type), swp_type=swp_type, swp_offset=_swp_offset(value),
                     soft_dirty=_flag(value, _PAGE_SWP_SOFT_DIRTY),
                     uffd_wp=_flag(value, _PAGE_SWP_UFFD_WP),
                     exclusive=_flag(value, _PAGE_SWP_EXCLUSIVE))

    def encode(self, level: int, entry: Entry) -> int:
        lv = self.levels[level]
        kind = entry.kind
        if kind is Kind.NONE:
            return 0
        if kind is Kind.TABLE:
            if level == self.pte_level:
                raise ValueError("x86_64: a pte cannot point to a table")
            self._check_paddr(entry.paddr, PAGE_SIZE)
            return entry.paddr | (_PAGE_TABLE if entry.user else _KERNPG_TABLE)
        if not lv.leaf:
            raise ValueError(f"x86_64: {lv.name} entries are tables or none, not {kind.value}")
        if kind is Kind.LEAF:
            return self._encode_leaf(level, entry)
        if kind is Kind.SWAP or kind is Kind.MIGRATION:
            return self._encode_swap(entry)
        raise ValueError(f"x86_64: cannot encode a {kind.value} entry")

    def _encode_leaf(self, level: int, entry: Entry) -> int:
        self._check_paddr(entry.paddr, self.levels[level].span)
        value = entry.paddr
        if entry.prot:                      # x86 cannot map without read: W or X imply R
            value |= _PAGE_PRESENT
            if entry.prot & Access.W:
                value |= _PAGE_RW
            if not entry.prot & Access.X:
                value |= _PAGE_NX
            if entry.user:
                value |= _PAGE_USER
        else:                               # PAGE_NONE: not present to the MMU, present to Linux
            value |= _PAGE_PROTNONE
        if level != self.pte_level:
            value |= _PAGE_PSE
        if entry.young:
            value |= _PAGE_ACCESSED
        if entry.dirty:
            value |= _PAGE_DIRTY
        if entry.special:
            value |= _PAGE_SPECIAL
        if entry.uffd_wp:
            value |= _PAGE_UFFD_WP
        if entry.soft_dirty:
            value |= _PAGE_SOFT_DIRTY
        return value

    def _encode_swap(self, entry: Entry) -> int:
        if not 0 <= entry.swp_type < 1 << SWP_TYPE_BITS:
            raise ValueError(f"x86_64: swap type {entry.swp_type} needs more than {SWP_TYPE_BITS} bits")
        if not 0 <= entry.swp_offset < 1 << SWP_OFFSET_BITS:
            raise ValueError(f"x86_64: swap offset {entry.swp_offset:#x} needs more than "
                             f"{SWP_OFFSET_BITS} bits")
        if swap_kind(entry.swp_type) is not entry.kind:
            raise ValueError(f"x86_64: swap type {entry.swp_type} is not a {entry.kind.value} entry")
        value = _swp_entry(entry.swp_type, entry.swp_offset)
        if entry.soft_dirty:
            value |= _PAGE_SWP_SOFT_DIRTY
        if entry.uffd_wp:
            value |= _PAGE_SWP_UFFD_WP
        if entry.exclusive:
            value |= _PAGE_SWP_EXCLUSIVE
        return value

    @staticmethod
    def _check_paddr(paddr: int, align: int) -> None:
        if paddr & (align - 1) or not 0 <= paddr <= PTE_PFN_MASK:
            raise ValueError(f"x86_64: physical address {paddr:#x} is not a {align:#x}-aligned "
                             f"{PHYSICAL_MASK_SHIFT}-bit address")

    # -- hardware walk ---------------------------------------------------------------------
    def walk(self, root: int, va: int, access: Access) -> Walk:
        """A CPL-3 access, as the SDM's walk and QEMU's mmu_translate() do it.

        A is set in each non-leaf entry as the walk passes through it, and in the leaf
        (with D for a write) only when the access is allowed; every update is a
        compare-and-exchange, and a lost race restarts the walk from CR3.
        """
        sext = va >> (self.va_bits - 1)
        if sext != 0 and sext != U64 >> (self.va_bits - 1):
            return Fault(FaultKind.ADDRESS, 0, va, access)      # #GP, not #PF
        while True:
            result = yield from self._walk_once(root, va, access)
            if result is not None:
                return result

    def _walk_once(self, root: int, va: int, access: Access) -> Walk:
        table = root & PTE_PFN_MASK         # CR3[51:12]; the PCID in 11:0 is not address
        rw = user = True
        nx = False
        for level, lv in enumerate(self.levels):
            entry_paddr = table + lv.index(va) * 8
            value = yield ReadEntry(entry_paddr, level)
            if not value & _PAGE_PRESENT:
                return Fault(FaultKind.NOT_PRESENT, level, va, access)
            leaf = level == self.pte_level or (lv.leaf and _flag(value, _PAGE_PSE))
            reserved = value & self._rsvd_mask
            if not lv.leaf:
                reserved |= value & _PAGE_PSE                   # PS in a PML5E/PML4E
            elif leaf and level != self.pte_level:
                reserved |= value & (lv.span - 1) & PTE_PFN_MASK & ~_PAGE_PAT_LARGE
            if reserved:
                return Fault(FaultKind.RESERVED, level, va, access)
            # effective rights: R/W and U/S ANDed, NX ORed over the levels
            rw = rw and _flag(value, _PAGE_RW)
            user = user and _flag(value, _PAGE_USER)
            nx = nx or _flag(value, _PAGE_NX)
            if not leaf:
                if not value & _PAGE_ACCESSED:
                    if not (yield UpdateEntry(entry_paddr, level, value, value | _PAGE_ACCESSED)):
                        return None
                table = value & PTE_PFN_MASK
                continue
            allowed = Access.R | (Access.W if rw else Access.NONE) | (Access.NONE if nx else Access.X)
            if not user or access & ~allowed:
                return Fault(FaultKind.PROTECTION, level, va, access)
            new = value | _PAGE_ACCESSED | (_PAGE_DIRTY if access & Access.W else 0)
            if new != value and not (yield UpdateEntry(entry_paddr, level, value, new)):
                return None
            if not new & _PAGE_DIRTY:       # the first store must walk again to set D
                allowed &= ~Access.W
            frame = value & PTE_PFN_MASK & ~(lv.span - 1)
            return Translation(paddr=frame | (va & (lv.span - 1)), size=lv.span, perms=allowed,
                               level=level, entry_paddr=entry_paddr)
        raise AssertionError("unreachable: the pte level is always a leaf")

    def root_register(self, root_table: int, asid: int = 0) -> int:
        if root_table & (PAGE_SIZE - 1) or not 0 <= asid < 1 << 12:
            raise ValueError(f"x86_64: CR3 needs a page-aligned root ({root_table:#x}) "
                             f"and a 12-bit PCID ({asid})")
        return root_table | asid

    def root_table(self, root_register: int) -> int:
        return root_register & PTE_PFN_MASK

    # -- TLB/flush facts -------------------------------------------------------------------
    # INVLPG drops one VA (all its sizes) for the current PCID; a MOV to CR3 without bit 63
    # drops the PCID's non-global entries. Remote CPUs are reached by IPI (timing.flush).
    # Linux flushes up to tlb_single_page_flush_ceiling pages one by one, then everything.
    tlb_single_page_flush_ceiling: ClassVar[int] = 33

    # -- CPU and syscall ABI ---------------------------------------------------------------
    def cpu_setup(self, uc: Any) -> None:
        """Nothing to do: Unicorn's UC_MODE_64 reset is already long mode with CR4.OSFXSR
        and OSXSAVE set (SSE works), and ``syscall`` reaches UC_HOOK_INSN without
        EFER.SCE. The emulator translates through UC_TLB_VIRTUAL, so CR0.PG stays off."""

    # Measured (Unicorn 2.1.4): inside the UC_HOOK_INSN hook RIP still points at the
    # 2-byte ``syscall``; Unicorn adds 2 after the hook returns (also to a RIP the hook
    # wrote), and after emu_stop() in the hook RIP is past it. So nothing to add.
    syscall_abi = SyscallABI(
        trap="insn",
        intno=None,
        nr_reg=x86_const.UC_X86_REG_RAX,
        arg_regs=(x86_const.UC_X86_REG_RDI, x86_const.UC_X86_REG_RSI, x86_const.UC_X86_REG_RDX,
                  x86_const.UC_X86_REG_R10, x86_const.UC_X86_REG_R8, x86_const.UC_X86_REG_R9),
        ret_reg=x86_const.UC_X86_REG_RAX,
        pc_advance=0,
        numbers={
            "read": 0, "write": 1, "writev": 20, "ioctl": 16, "brk": 12, "mmap": 9,
            "mlock": 149, "munlock": 150, "mlock2": 325,
            "munmap": 11, "mprotect": 10, "madvise": 28, "mremap": 25, "exit": 60,
            "exit_group": 231, "set_tid_address": 218, "set_robust_list": 273, "rseq": 334,
            "prlimit64": 302, "readlink": 89, "readlinkat": 267, "getrandom": 318,
            "newfstatat": 262, "fstat": 5, "arch_prctl": 158, "uname": 63, "futex": 202,
            "clone": 56, "wait4": 61, "sched_yield": 24,
            "clock_gettime": 228, "rt_sigaction": 13, "rt_sigprocmask": 14, "getpid": 39,
            "gettid": 186, "tgkill": 234, "memfd_create": 319, "ftruncate": 77, "userfaultfd": 323,
            "openat": 257, "close": 3, "lseek": 8, "pread64": 17, "mincore": 27,
            "process_madvise": 440,
        },
    )

    def set_tls(self, uc: Any, value: int) -> None:
        uc.reg_write(x86_const.UC_X86_REG_FS_BASE, value)       # arch_prctl(ARCH_SET_FS) too

    def sentinel_code(self) -> bytes:
        return b"\x0f\x0b" * 8              # ud2

    # -- timing defaults (spec/timing.md §2, profile "skylake") ----------------------------
    # walk_level_latency: the L2 hit figure; upper levels mostly hit the page-walk caches
    # and L1, the PTE line often comes from L2.
    timing = TimingDefaults(clock_ghz=3.0, l1_dtlb_entries=64, l2_tlb_entries=1536, l2_tlb_hit=9,
                            walk_level_latency=12, fault_cycles=3300, syscall_cycles=150, flush="ipi")


@hookimpl
def emu_arch_specs() -> list[type]:
    return [X86_64]
