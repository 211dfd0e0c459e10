"""The ArchSpec contract: what an architecture plugin tells emu, and what mm_core may ask.

This module is the only vocabulary shared by ``arch_plugins`` and ``mm_core``. It plays
the part of Linux's ``asm/pgtable*.h``: an arch describes its table geometry, turns its
raw entry bits into :class:`Entry` values and back, and walks tables the way its MMU
does. Generic code never tests an arch name; if it needs a new fact, this contract grows.

Conventions
-----------
* Levels are listed top (root) first, the PTE level last. ``levels[-2]`` is the PMD
  level, whatever the hardware calls it.
* Every address in an :class:`Entry` is a *physical byte address*: a table address for
  ``TABLE`` (s390x 2K tables and powerpc fragments are not page aligned), the frame base
  for ``LEAF``.
* Entries are 8 bytes in the arch's byte order; ``ArchSpec.entry_format`` is the
  ``struct`` format that reads one.
"""
from __future__ import annotations

import enum
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class Access(enum.IntFlag):
    """Access rights; the values equal Unicorn's UC_PROT_READ/WRITE/EXEC."""

    NONE = 0
    R = 1
    W = 2
    X = 4
    RW = R | W
    RX = R | X
    RWX = R | W | X


ACCESS_BY_LETTER = {"r": Access.R, "w": Access.W, "x": Access.X}


class Kind(enum.Enum):
    """What an entry is, in Linux's terms (not the hardware's)."""

    NONE = "none"            # pte_none / pmd_none
    TABLE = "table"          # points to the next-level table
    LEAF = "leaf"            # maps a frame (4K page or huge/block leaf); present to Linux,
                             # even when prot is NONE (PROT_NONE pages are present-invalid)
    SWAP = "swap"            # non-present swap entry (type, offset)
    MIGRATION = "migration"  # non-present migration entry (a swap entry of a migration type)
    BAD = "bad"              # present but malformed: pmd_bad() and friends


# Linux's swap-type space (include/linux/swap.h, MAX_SWAPFILES_SHIFT = 5): real swap
# devices first, then the special entry types counted down from 31.
SWP_TYPE_BITS = 5
MAX_SWAPFILES = 24
SWP_HWPOISON = 24
SWP_MIGRATION_READ = 25
SWP_MIGRATION_READ_EXCLUSIVE = 26
SWP_MIGRATION_WRITE = 27
SWP_PTE_MARKER = 31
MIGRATION_TYPES = (SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, SWP_MIGRATION_WRITE)


def swap_kind(swp_type: int) -> Kind:
    """Classify a decoded swap entry: migration types are their own kind."""
    return Kind.MIGRATION if swp_type in MIGRATION_TYPES else Kind.SWAP


@dataclass(frozen=True, slots=True)
class Entry:
    """One page-table entry as Linux sees it (pte_present, pte_young, pte_dirty, ...).

    ``prot`` is Linux's view of the permissions: what the VMA granted and the kernel
    has not taken away (a write-protected COW page has no W). How an arch expresses
    "writable but clean" (x86 D=0, arm64 DBM|RDONLY, s390x PROTECT, ...) is the
    encoder's business, driven by ``dirty``.
    """

    kind: Kind
    paddr: int = 0
    prot: Access = Access.NONE
    user: bool = True
    young: bool = False
    dirty: bool = False
    special: bool = False
    soft_dirty: bool = False
    uffd_wp: bool = False
    exclusive: bool = False   # swap/migration entries: PageAnonExclusive
    swp_type: int = 0
    swp_offset: int = 0

    # Linux-flavoured predicates, so generic code reads like mm/*.c
    @property
    def none(self) -> bool:
        return self.kind is Kind.NONE

    @property
    def present(self) -> bool:
        return self.kind is Kind.LEAF or self.kind is Kind.TABLE

    def with_(self, **changes: Any) -> Entry:
        return replace(self, **changes)


NONE_ENTRY = Entry(Kind.NONE)


def table_entry(paddr: int) -> Entry:
    return Entry(Kind.TABLE, paddr=paddr)


def leaf_entry(paddr: int, prot: Access, **flags: Any) -> Entry:
    return Entry(Kind.LEAF, paddr=paddr, prot=prot, **flags)


def swap_entry(swp_type: int, swp_offset: int, **flags: Any) -> Entry:
    return Entry(swap_kind(swp_type), swp_type=swp_type, swp_offset=swp_offset, **flags)


@dataclass(frozen=True, slots=True)
class Level:
    """One level of the radix tree: Linux name, hardware name and geometry."""

    name: str          # Linux: pgd / p4d / pud / pmd / pte
    hw_name: str       # PML4, L0, region-third, PGD, ...
    shift: int         # lowest VA bit indexed at this level
    index_bits: int
    leaf: bool         # may hold a leaf (huge page / block / large frame)
    # derived from index_bits once (table_base() runs on every entry access)
    table_bytes: int = field(init=False, repr=False, compare=False)
    _base_mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_bytes", 8 << self.index_bits)
        object.__setattr__(self, "_base_mask", ~((8 << self.index_bits) - 1))

    @property
    def entries(self) -> int:
        return 1 << self.index_bits

    @property
    def span(self) -> int:
        """Bytes of VA mapped by one entry of this level."""
        return 1 << self.shift

    def index(self, va: int) -> int:
        return (va >> self.shift) & ((1 << self.index_bits) - 1)

    def table_base(self, entp: int) -> int:
        """Physical address of the table of this level holding the entry at ``entp``."""
        return entp & self._base_mask


# -- the hardware walk protocol --------------------------------------------------------
# A walk is a generator. It yields ReadEntry (the driver sends back the 8-byte entry
# value) and UpdateEntry (an atomic compare-and-exchange for hardware A/D updates; the
# driver sends back True if it took). It returns a Translation or a Fault. The driver
# either runs it inline or steps it under the scheduler, one table access per step.

@dataclass(frozen=True, slots=True)
class ReadEntry:
    paddr: int
    level: int


@dataclass(frozen=True, slots=True)
class UpdateEntry:
    paddr: int
    level: int
    old: int
    new: int


class FaultKind(enum.Enum):
    NOT_PRESENT = "not-present"        # translation fault: invalid entry at some level
    PROTECTION = "protection"          # permission fault on a valid leaf
    ACCESS_FLAG = "access-flag"        # arm64 AF=0 without hardware AF
    RESERVED = "reserved"              # reserved/specification bits: a corrupt table
    ADDRESS = "address"                # VA outside what the root can translate


@dataclass(frozen=True, slots=True)
class Translation:
    """A successful walk: where ``va`` lives and what the TLB may now grant.

    ``perms`` are the rights the TLB entry gets: everything the leaf allows, minus W
    while the hardware still has to see a write (clean page on an arch with hardware
    dirty tracking), so that the first store walks again.
    """

    paddr: int          # physical address of va itself
    size: int           # leaf size (4K, 2M, 1M, 1G, ...)
    perms: Access
    level: int          # index into ArchSpec.levels of the leaf
    entry_paddr: int    # where the leaf entry lives


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    level: int
    va: int
    access: Access


WalkStep = ReadEntry | UpdateEntry
Walk = Generator[WalkStep, Any, Translation | Fault]


@dataclass(frozen=True)
class SyscallABI:
    """How a guest enters the kernel and where its arguments are.

    ``trap`` is ``"insn"`` (x86 ``syscall``, hooked as an instruction) or ``"intr"``
    (an interrupt number ``intno``). ``pc_advance`` is added to the PC after the trap
    when Unicorn leaves it on the trapping instruction (s390x ``svc``).
    """

    trap: str
    intno: int | None
    nr_reg: int
    arg_regs: tuple[int, ...]
    ret_reg: int
    pc_advance: int = 0
    numbers: Mapping[str, int] = field(default_factory=dict)
    old_mmap: bool = False      # mmap takes one pointer to six longs (s390x old_mmap)
    # ioctl number encoding (asm/ioctl.h): (_IOC_DIRSHIFT, _IOC_WRITE, _IOC_READ); the
    # generic one, or powerpc's 3 direction bits at 29 (_IOC_WRITE 4)
    ioc_dir: tuple[int, int, int] = (30, 1, 2)


@dataclass(frozen=True)
class TimingDefaults:
    """Cycle-model defaults (spec/timing.md); used by the performance model."""

    clock_ghz: float
    l1_dtlb_entries: int
    l2_tlb_entries: int
    l2_tlb_hit: int
    walk_level_latency: int       # cycles per table read when no cache model is attached
    fault_cycles: int = 3300
    syscall_cycles: int = 150
    flush: str = "ipi"            # remote invalidation: "ipi" or "broadcast"


DECODED_MAX = 8192        # remembered decode() answers per arch instance before starting over


def _remembered(decode: Callable[[Any, int, int], Entry]) -> Callable[[Any, int, int], Entry]:
    """A subclass's decode(), remembering its answers: decode() is a function of (level,
    value) alone for one arch instance (whose geometry and options __init__ fixed), and an
    Entry is immutable. Generic code decodes the same few entries over and over."""
    which = decode.__qualname__            # one cache per decode(): a subclass's may call super()'s

    @functools.wraps(decode)
    def remembered(self: Any, level: int, value: int) -> Entry:
        try:
            cache = self._decoded[which]
        except (AttributeError, KeyError):
            cache = self.__dict__.setdefault("_decoded", {}).setdefault(which, {})
        if not 0 <= level < 16:
            return decode(self, level, value)
        key = value << 4 | level
        entry = cache.get(key)
        if entry is None:
            entry = decode(self, level, value)
            if len(cache) >= DECODED_MAX:
                cache.clear()
            cache[key] = entry
        return entry
    return remembered


class ArchSpec(ABC):
    """An architecture: bits, primitives and the hardware walk, nothing else.

    Subclasses set the class attributes and implement the abstract methods. Options
    (x86 LA57, arm64 FEAT_HAFDBS, ...) are keyword arguments of the constructor and are
    listed in ``options``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    uc_arch: ClassVar[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        decode = cls.__dict__.get("decode")
        if decode is not None and not getattr(decode, "__isabstractmethod__", False):
            cls.decode = _remembered(decode)
    uc_mode: ClassVar[int]
    cs_arch: ClassVar[int]
    cs_mode: ClassVar[int]
    big_endian: ClassVar[bool]
    elf_machine: ClassVar[str]           # pyelftools e_machine name, e.g. "EM_X86_64"
    pc_reg: ClassVar[int]
    sp_reg: ClassVar[int]
    syscall_abi: ClassVar[SyscallABI]
    timing: ClassVar[TimingDefaults]
    options: ClassVar[Mapping[str, str]] = {}   # option name -> one-line help
    root_register_name: ClassVar[str] = "root"
    pte_frag_rules: ClassVar[str] = "page"  # how PTE tables share pages: "page", "s390", "powerpc"
                                            # (mm_core/pgalloc.py implements each)
    sw_bits: ClassVar[frozenset[str]] = frozenset()   # Linux software bits the arch has:
                                                      # "special", "soft_dirty", "uffd_wp"
    # HAVE_ARCH_* Kconfig options the arch selects, with the first kernel version that does
    # ("HAVE_ARCH_USERFAULTFD_WP": (6, 10) on arm64): generic code asks for a fact, never
    # for an arch name
    kconfig: ClassVar[Mapping[str, tuple[int, int]]] = {}
    uname_machine: ClassVar[str] = ""   # utsname.machine (defaults to name)
    page_shift: ClassVar[int] = PAGE_SHIFT
    stack_align: ClassVar[int] = 16

    levels: tuple[Level, ...]
    task_size: int                       # first VA above user space

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(self.options) or 'none'}")
        self.opts = options

    # -- geometry ----------------------------------------------------------------------
    @property
    def entry_format(self) -> str:
        return ">Q" if self.big_endian else "<Q"

    # cached on first use (after __init__ has settled ``levels``): hot in generic code
    @functools.cached_property
    def pmd_level(self) -> int:
        return len(self.levels) - 2

    @functools.cached_property
    def pte_level(self) -> int:
        return len(self.levels) - 1

    def table_alloc_bytes(self, level: int) -> int:
        """Bytes the allocator hands out for one table of ``level`` (>= table size).

        Tables smaller than a page (s390x 2K PTE tables) are fragments of a page;
        tables larger than a page (s390x 16K CRSTs, ppc64 64K PGD) take 2^order pages.
        """
        return self.levels[level].table_bytes

    def table_align(self, level: int) -> int:
        return self.levels[level].table_bytes

    def leaf_sizes(self) -> list[int]:
        return [lv.span for lv in self.levels if lv.leaf]

    # -- entries -----------------------------------------------------------------------
    @abstractmethod
    def decode(self, level: int, value: int) -> Entry:
        """Raw entry bits at ``level`` -> Linux's view of the entry."""

    @abstractmethod
    def encode(self, level: int, entry: Entry) -> int:
        """Linux's view -> raw bits. ``encode(level, NONE_ENTRY)`` is the empty value
        a fresh table is filled with (not always 0: s390x)."""

    def empty_value(self, level: int) -> int:
        """The raw value of an empty entry at ``level`` (cached: hot in table scans)."""
        cache = self.__dict__.setdefault("_empty_values", {})
        value = cache.get(level)
        if value is None:
            value = cache[level] = self.encode(level, NONE_ENTRY)
        return value

    # -- hardware ----------------------------------------------------------------------
    @abstractmethod
    def walk(self, root: int, va: int, access: Access) -> Walk:
        """The MMU's walk from root register value ``root`` for one access."""

    @abstractmethod
    def root_register(self, root_table: int, asid: int = 0) -> int:
        """Value of the hardware root register (CR3, TTBR0_EL1, ASCE, process-table
        entry) for an mm whose top-level table is at ``root_table``."""

    @abstractmethod
    def root_table(self, root_register: int) -> int:
        """Inverse of :meth:`root_register`: the top-level table's physical address."""

    # -- CPU and ABI ------------------------------------------------------------------
    @abstractmethod
    def cpu_setup(self, uc: Any) -> None:
        """Put a fresh ``Uc`` into user mode with the quirks this arch needs."""

    def start_registers(self, uc: Any, entry: int, sp: int) -> None:
        """Registers at the ELF entry point (beyond PC and SP)."""
        uc.reg_write(self.sp_reg, sp)

    def syscall_args(self, uc: Any, fetch: Callable[[int, int], bytes]) -> tuple[int, list[int]]:
        """(number, six arguments) of the syscall that just trapped. ``fetch(va, n)``
        reads guest code (s390x encodes small numbers in the ``svc`` immediate)."""
        abi = self.syscall_abi
        return uc.reg_read(abi.nr_reg), [uc.reg_read(r) for r in abi.arg_regs]

    def set_syscall_result(self, uc: Any, value: int) -> None:
        """Write a syscall's result; ``value`` is Linux's (negative errno on error)."""
        uc.reg_write(self.syscall_abi.ret_reg, value & 0xFFFFFFFFFFFFFFFF)

    # clone()'s raw argument order (CLONE_BACKWARDS on arm64/ppc64, _BACKWARDS2 on s390x)
    clone_args: ClassVar[tuple[str, ...]] = ("flags", "newsp", "parent_tid", "child_tid", "tls")

    def set_tls(self, uc: Any, value: int) -> None:
        """CLONE_SETTLS: load the thread pointer (x86 FS base, TPIDR_EL0, r13, a0/a1)."""
        raise NotImplementedError(f"{self.name}: no thread-pointer register defined")

    def sentinel_code(self) -> bytes:
        """A few bytes of code that is never meant to run (a trap), for emu_start's
        ``until`` page."""
        return b"\x00" * 16

    def describe(self) -> str:
        parts = [f"{lv.name}:{lv.index_bits}" for lv in self.levels]
        leaves = ",".join(_size(s) for s in self.leaf_sizes())
        return f"{'/'.join(parts)} leaves {leaves}"


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def format_size(n: int) -> str:
    return _size(n)


def run_walk(walk: Walk, read: Callable[[int], int],
             cmpxchg: Callable[[int, int, int], bool]) -> Translation | Fault:
    """Drive a hardware walk to its end without yielding to a scheduler (fast mode)."""
    try:
        step = next(walk)
        while True:
            if type(step) is ReadEntry:
                step = walk.send(read(step.paddr))
            else:
                step = walk.send(cmpxchg(step.paddr, step.old, step.new))
    except StopIteration as stop:
        return stop.value
