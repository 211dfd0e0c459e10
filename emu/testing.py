"""The arch-plugin conformance kit: what ``emu plugins check NAME`` runs.

Every check builds real page tables with the plugin's own encoder in a scratch guest RAM,
then asks the plugin to decode and to walk them, and compares with what the contract
(emu/arch.py) promises. A plugin author can also use it from pytest::

    from emu.testing import ArchConformance

    class TestMyArch(ArchConformance):
        arch_name = "riscv64"

Each check returns a list of problems (empty = pass); one problem is one line.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from emu.arch import (
    MAX_SWAPFILES,
    NONE_ENTRY,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_WRITE,
    Access,
    ArchSpec,
    Entry,
    Fault,
    FaultKind,
    Kind,
    Translation,
    leaf_entry,
    run_walk,
    swap_entry,
    table_entry,
)
from emu.physmem import PhysMem

REQUIRED_SYSCALLS = ("exit", "exit_group", "write", "mmap", "munmap", "mprotect", "brk", "getpid", "uname")
PROTS = (Access.R, Access.RW, Access.RX, Access.RWX, Access.NONE)


@dataclass(frozen=True)
class CheckResult:
    name: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


CHECKS: dict[str, Callable[[ArchSpec], list[str]]] = {}


def check(fn: Callable[[ArchSpec], list[str]]) -> Callable[[ArchSpec], list[str]]:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def run_checks(arch: ArchSpec) -> list[CheckResult]:
    results = []
    for name, fn in CHECKS.items():
        try:
            problems = fn(arch)
        except Exception as err:  # noqa: BLE001 - a crashing plugin is a finding, not our crash
            problems = [f"raised {type(err).__name__}: {err}"]
        results.append(CheckResult(name, tuple(problems[:20])))
    return results


# -- helpers ---------------------------------------------------------------------------------

def _leaf_levels(arch: ArchSpec) -> list[int]:
    return [i for i, lv in enumerate(arch.levels) if lv.leaf or i == arch.pte_level]


def _leaf_variants(arch: ArchSpec, level: int) -> Iterator[Entry]:
    size = arch.levels[level].span
    sw = sorted(arch.sw_bits)
    for prot, young, dirty in itertools.product(PROTS, (False, True), (False, True)):
        base = leaf_entry(size * 3, prot, young=young, dirty=dirty)
        yield base
        for bit in sw:
            yield base.with_(**{bit: True})


def _swap_variants(arch: ArchSpec) -> Iterator[Entry]:
    for t, off in ((0, 1), (1, 0x1234), (MAX_SWAPFILES - 1, 0xFFFFF), (SWP_MIGRATION_READ, 0x345),
                   (SWP_MIGRATION_WRITE, 0x7FFFF)):
        yield swap_entry(t, off)
        yield swap_entry(t, off, exclusive=True)
        if "soft_dirty" in arch.sw_bits:
            yield swap_entry(t, off, soft_dirty=True)
        if "uffd_wp" in arch.sw_bits:
            yield swap_entry(t, off, uffd_wp=True)


class _Scratch:
    """A small guest RAM with a bump allocator for tables built by the plugin's encoder."""

    def __init__(self, arch: ArchSpec) -> None:
        self.arch = arch
        self.ram = PhysMem(8 << 20, arch.big_endian)
        self.next = 1 << 20
        self.root = self.table(0)

    def table(self, level: int) -> int:
        size = max(self.arch.table_alloc_bytes(level), self.arch.table_align(level))
        self.next = (self.next + size - 1) & ~(size - 1)
        paddr, self.next = self.next, self.next + size
        self.ram.fill_entries(paddr, self.arch.levels[level].entries, self.arch.empty_value(level))
        return paddr

    def map(self, va: int, leaf: Entry, level: int) -> int:
        """Install ``leaf`` for ``va`` at ``level``; returns the leaf entry's address."""
        arch, table = self.arch, self.root
        for lv in range(level):
            entp = table + arch.levels[lv].index(va) * 8
            ent = arch.decode(lv, self.ram.read_entry(entp))
            if ent.kind is not Kind.TABLE:
                child = self.table(lv + 1)
                self.ram.write_entry(entp, arch.encode(lv, table_entry(child)))
                ent = table_entry(child)
            table = ent.paddr
        entp = table + arch.levels[level].index(va) * 8
        self.ram.write_entry(entp, arch.encode(level, leaf))
        return entp

    def walk(self, va: int, access: Access) -> Translation | Fault:
        reg = self.arch.root_register(self.root, 1)
        return run_walk(self.arch.walk(reg, va, access), self.ram.read_entry, self.ram.cmpxchg_entry)

    def close(self) -> None:
        self.ram.close()


def _page(arch: ArchSpec) -> int:
    """The arch's base page (4K, or 64K on ppc64's 64K geometry)."""
    return 1 << arch.page_shift


def _user_va(arch: ArchSpec, level: int, i: int = 0) -> int:
    span = arch.levels[level].span
    return ((arch.task_size // 4) & ~(span - 1)) + i * span


# -- the checks ------------------------------------------------------------------------------

@check
def check_geometry(arch: ArchSpec) -> list[str]:
    p, lv = [], arch.levels
    if len(lv) < 2:
        return ["needs at least a PMD and a PTE level"]
    if lv[-1].shift != arch.page_shift:
        p.append(f"PTE level shift {lv[-1].shift} != page_shift {arch.page_shift}")
    for upper, lower in zip(lv, lv[1:], strict=False):
        if upper.shift != lower.shift + lower.index_bits:
            p.append(f"{upper.name} shift {upper.shift} != {lower.name} shift + index bits")
    if (1 << (lv[0].shift + lv[0].index_bits)) < arch.task_size:
        p.append("the top level cannot reach task_size")
    if [x.name for x in lv][-2:] != ["pmd", "pte"]:
        p.append(f"the last two levels must be named pmd, pte (got {[x.name for x in lv]})")
    for i in range(len(lv)):
        if arch.table_alloc_bytes(i) < lv[i].table_bytes:
            p.append(f"{lv[i].name}: table_alloc_bytes smaller than the table")
    return p


@check
def check_empty_tables_decode_as_none(arch: ArchSpec) -> list[str]:
    p = []
    for i, lv in enumerate(arch.levels):
        kind = arch.decode(i, arch.empty_value(i)).kind
        if kind is not Kind.NONE:
            p.append(f"{lv.name}: empty value {arch.empty_value(i):#x} decodes as {kind}")
    return p


@check
def check_round_trips(arch: ArchSpec) -> list[str]:
    """decode(encode(e)) == e for every entry kind the level can hold."""
    p = []
    for level, lv in enumerate(arch.levels):
        cases: list[Entry] = [NONE_ENTRY]
        if level < arch.pte_level:
            cases.append(table_entry(arch.table_align(level + 1) * 5))
        if level in _leaf_levels(arch):
            cases += list(_leaf_variants(arch, level))
            if level in (arch.pte_level, arch.pmd_level):
                cases += list(_swap_variants(arch))
        for e in cases:
            try:
                raw = arch.encode(level, e)
            except ValueError as err:
                # a huge level may lack a software bit its PTEs have; anything else is a bug
                if level != arch.pte_level and any(getattr(e, b) for b in arch.sw_bits):
                    continue
                # an arch without THP migration has no swap/migration entries in PMDs
                if level == arch.pmd_level and e.kind in (Kind.SWAP, Kind.MIGRATION):
                    continue
                p.append(f"{lv.name}: cannot encode {e}: {err}")
                continue
            got = arch.decode(level, raw)
            if got != e:
                p.append(f"{lv.name}: {e} decoded back as {got}")
    return p


@check
def check_root_register(arch: ArchSpec) -> list[str]:
    s = _Scratch(arch)
    try:
        reg = arch.root_register(s.root, 1)
        if arch.root_table(reg) != s.root:
            return [f"root_table(root_register(t)) != t for {s.root:#x}"]
        return []
    finally:
        s.close()


@check
def check_walk_translates_every_leaf_size(arch: ArchSpec) -> list[str]:
    p = []
    for level in _leaf_levels(arch):
        s = _Scratch(arch)
        try:
            span = arch.levels[level].span
            frame = ((1 << 32) if span > (4 << 20) else (4 << 20)) & ~(span - 1) or span
            va = _user_va(arch, level, 1)
            s.map(va, leaf_entry(frame, Access.RW, young=True, dirty=True), level)
            for off in (0, 8, span - 8):
                t = s.walk(va + off, Access.R)
                if type(t) is not Translation or t.paddr != frame + off:
                    p.append(f"{arch.levels[level].name} leaf: read of va+{off:#x} gave {t}")
                elif t.size != span:
                    p.append(f"{arch.levels[level].name} leaf: size {t.size} != {span}")
        finally:
            s.close()
    return p


@check
def check_walk_faults_on_none_at_every_level(arch: ArchSpec) -> list[str]:
    p = []
    for level in range(len(arch.levels)):
        s = _Scratch(arch)
        try:
            va = _user_va(arch, arch.pte_level, 3)
            if level == arch.pte_level:
                s.map(va + _page(arch), leaf_entry(8 << 20, Access.RW, young=True, dirty=True), level)
            elif level > 0:
                s.map(va + arch.levels[level - 1].span, leaf_entry(8 << 20, Access.RW, young=True,
                                                                   dirty=True), arch.pte_level)
            t = s.walk(va, Access.R)
            if type(t) is not Fault or t.kind is not FaultKind.NOT_PRESENT:
                p.append(f"none entry at {arch.levels[level].name}: walk gave {t}")
        finally:
            s.close()
    return p


@check
def check_walk_enforces_protection(arch: ArchSpec) -> list[str]:
    p = []
    s = _Scratch(arch)
    try:
        lvl = arch.pte_level
        va = _user_va(arch, lvl, 5)
        cases = [(Access.R, Access.W, False), (Access.R, Access.R, True), (Access.RW, Access.X, False),
                 (Access.RX, Access.X, True), (Access.NONE, Access.R, False)]
        for i, (prot, access, allowed) in enumerate(cases):
            a = va + i * _page(arch)
            s.map(a, leaf_entry((16 << 20) + i * _page(arch), prot, young=True, dirty=True), lvl)
            t = s.walk(a, access)
            if allowed != (type(t) is Translation):
                p.append(f"leaf prot {prot!r}: {access!r} access gave {t}")
    finally:
        s.close()
    return p


@check
def check_young_and_dirty_tracking(arch: ArchSpec) -> list[str]:
    """An old page is either made young by the walk or faults; a clean writable page is
    either dirtied by a write walk (and not granted W on a read) or faults on write."""
    p = []
    s = _Scratch(arch)
    try:
        lvl = arch.pte_level
        va = _user_va(arch, lvl, 7)
        entp = s.map(va, leaf_entry(20 << 20, Access.RW, young=False, dirty=True), lvl)
        t = s.walk(va, Access.R)
        young = arch.decode(lvl, s.ram.read_entry(entp)).young
        if type(t) is Translation and not young:
            p.append("a read of an old page succeeded without making it young")
        if type(t) is Fault and young:
            p.append("a read fault on an old page still set young")
        entp = s.map(va + _page(arch), leaf_entry(24 << 20, Access.RW, young=True, dirty=False), lvl)
        t = s.walk(va + _page(arch), Access.R)
        if type(t) is Translation and t.perms & Access.W:
            p.append("a read of a clean page granted W: the first store would not be seen")
        t = s.walk(va + _page(arch), Access.W)
        dirty = arch.decode(lvl, s.ram.read_entry(entp)).dirty
        if type(t) is Translation and not dirty:
            p.append("a write to a clean page succeeded without making it dirty")
        if type(t) is Fault and t.kind is not FaultKind.PROTECTION:
            p.append(f"a write to a clean page faulted with {t.kind}, expected protection")
    finally:
        s.close()
    return p


@check
def check_syscall_abi(arch: ArchSpec) -> list[str]:
    abi = arch.syscall_abi
    p = [f"syscall {n!r} has no number" for n in REQUIRED_SYSCALLS if n not in abi.numbers]
    if abi.trap not in ("insn", "intr"):
        p.append(f"trap must be 'insn' or 'intr', not {abi.trap!r}")
    if abi.trap == "intr" and abi.intno is None:
        p.append("an 'intr' trap needs intno")
    if len(abi.arg_regs) != 6:
        p.append("six argument registers expected")
    if len(set(abi.numbers.values())) != len(abi.numbers):
        p.append("two syscalls share a number")
    return p


@check
def check_cpu_setup(arch: ArchSpec) -> list[str]:
    from unicorn import UC_TLB_VIRTUAL, Uc
    uc = Uc(arch.uc_arch, arch.uc_mode)
    arch.cpu_setup(uc)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.reg_write(arch.pc_reg, 0x10000)
    p = [] if uc.reg_read(arch.pc_reg) == 0x10000 else ["the PC register does not hold a 64-bit address"]
    if not arch.sentinel_code():
        p.append("sentinel_code() is empty")
    return p


class ArchConformance:
    """pytest base class: subclass it with ``arch_name = "..."`` to run the kit."""

    arch_name = ""
    arch_options: dict = {}

    def _arch(self) -> ArchSpec:
        from emu.plugins import get_arch
        return get_arch(self.arch_name, **self.arch_options)


def _make_test(name: str):
    def test(self) -> None:
        problems = CHECKS[name](self._arch())
        assert not problems, "\n".join(problems)
    test.__name__ = f"test_{name}"
    return test


for _name in CHECKS:
    setattr(ArchConformance, f"test_{_name}", _make_test(_name))
