"""The arm64 plugin: descriptor encodings, the hardware walk, and agreement with QEMU's MMU.

The differential tests build page tables with the plugin's own encoder in a Unicorn
RAM, program TCR/MAIR/TTBR0/SCTLR as spec §5 says (with the SCR_EL3/HCR_EL2 RW fix so
EL1 walks as AArch64), then ``eret`` to EL0 so the EL0 permission rules (AP[1], UXN,
APTable, UXNTable) apply, and compare the plugin's walk with ``uc_vmem_translate``
(QEMU 5's ``get_phys_addr_lpae``). QEMU 5 has no FEAT_HAFDBS, so these run with the
option off: AF=0 must fault on both sides, and neither side may change a descriptor.
"""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_ARM64, UC_HOOK_INTR, UC_MODE_ARM, UC_TLB_CPU, Uc
from unicorn import arm64_const as A

from arch_plugins.arm64 import (
    PMD_TABLE_AP_NO_EL0,
    PMD_TABLE_AP_RDONLY,
    PMD_TABLE_PXN,
    PMD_TABLE_UXN,
    PTE_AF,
    PTE_DBM,
    PTE_DIRTY,
    PTE_PRESENT_INVALID,
    PTE_RDONLY,
    PTE_TABLE_BIT,
    PTE_USER,
    PTE_UXN,
    PTE_VALID,
    PTE_WRITE,
    Arm64,
)
from emu.arch import (
    MAX_SWAPFILES,
    MIGRATION_TYPES,
    NONE_ENTRY,
    SWP_HWPOISON,
    SWP_PTE_MARKER,
    Access,
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
from tests.uc_oracle import tlb_flush, vmem_translate

PA_BITS = 48

# -- helpers -------------------------------------------------------------------------------


class PageTables:
    """Builds a tree with the plugin's encoder over any 8-byte read/write."""

    def __init__(self, arch: Arm64, read, write, table_base: int) -> None:
        self.arch, self.read, self.write = arch, read, write
        self.next_table = table_base
        self.root = self.alloc()

    def alloc(self) -> int:
        paddr, self.next_table = self.next_table, self.next_table + 4096
        return paddr

    def entry_paddr(self, va: int, level: int, user: bool = True) -> int:
        """Where ``va``'s descriptor at ``level`` lives, allocating tables on the way."""
        table = self.root
        for lvl in range(level):
            slot = table + self.arch.levels[lvl].index(va) * 8
            entry = self.arch.decode(lvl, self.read(slot))
            if entry.kind is not Kind.TABLE:
                entry = Entry(Kind.TABLE, paddr=self.alloc(), user=user)
                self.write(slot, self.arch.encode(lvl, entry))
            table = entry.paddr
        return table + self.arch.levels[level].index(va) * 8

    def set(self, va: int, level: int, entry: Entry, user_tables: bool = True) -> int:
        slot = self.entry_paddr(va, level, user_tables)
        self.write(slot, self.arch.encode(level, entry))
        return slot


class DictMemory:
    def __init__(self) -> None:
        self.words: dict[int, int] = {}
        self.cmpxchg_failures = 0     # make the next N compare-and-exchanges lose a race

    def read(self, paddr: int) -> int:
        return self.words.get(paddr, 0)

    def write(self, paddr: int, value: int) -> None:
        self.words[paddr] = value

    def cmpxchg(self, paddr: int, old: int, new: int) -> bool:
        if self.cmpxchg_failures:
            self.cmpxchg_failures -= 1
            return False
        if self.read(paddr) != old:
            return False
        self.words[paddr] = new
        return True


def walk(arch, mem: DictMemory, root: int, va: int, access: Access):
    return run_walk(arch.walk(arch.root_register(root, asid=5), va, access), mem.read, mem.cmpxchg)


def one_page(arch, prot=Access.RW, level=3, **flags):
    mem = DictMemory()
    tables = PageTables(arch, mem.read, mem.write, 0x100000)
    va = 0x7F0000000000 + (0x1234 if level == 3 else 0)
    span = arch.levels[level].span
    slot = tables.set(va, level, leaf_entry(span * 3, prot, **flags))
    return mem, tables, va, slot


# -- encode/decode round trips -------------------------------------------------------------

def aligned_paddr(size: int):
    return st.integers(0, (1 << PA_BITS) // size - 1).map(lambda n: n * size)


prots = st.sampled_from([Access.NONE, Access.R, Access.RW, Access.RX, Access.RWX, Access.X])
LEAF_LEVELS = [1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(level=st.integers(0, 2), paddr=aligned_paddr(4096), user=st.booleans())
def test_table_descriptors_round_trip_at_l0_to_l2(level, paddr, user):
    arch = Arm64()
    entry = Entry(Kind.TABLE, paddr=paddr, user=user)
    value = arch.encode(level, entry)
    assert arch.decode(level, value) == entry
    assert value & 3 == 3 and value & (PMD_TABLE_PXN if user else PMD_TABLE_UXN)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_leaf_descriptors_round_trip_at_every_leaf_level(data):
    arch = Arm64()
    level = data.draw(st.sampled_from(LEAF_LEVELS))
    prot = data.draw(prots)
    flags = {name: data.draw(st.booleans()) for name in ("user", "young", "dirty", "special", "uffd_wp")}
    if not prot:
        flags["user"] = True          # PAGE_NONE has no PTE_USER; Linux maps it for users
    elif not flags["user"]:
        prot |= Access.R              # kernel pages are always readable by the kernel
    entry = leaf_entry(data.draw(aligned_paddr(arch.levels[level].span)), prot, **flags)
    value = arch.encode(level, entry)
    assert arch.decode(level, value) == entry
    assert bool(value & PTE_VALID) == bool(prot)           # PROT_NONE is invalid to the MMU
    assert bool(value & PTE_AF) == entry.young              # Linux creates PTEs young


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_swap_and_migration_entries_round_trip_at_every_leaf_level(data):
    arch = Arm64()
    level = data.draw(st.sampled_from(LEAF_LEVELS))
    swp_type = data.draw(st.sampled_from(
        [0, 1, MAX_SWAPFILES - 1, SWP_HWPOISON, SWP_PTE_MARKER, *MIGRATION_TYPES]))
    entry = swap_entry(swp_type, data.draw(st.integers(1, (1 << 50) - 1)),
                       uffd_wp=data.draw(st.booleans()), exclusive=data.draw(st.booleans()))
    value = arch.encode(level, entry)
    assert arch.decode(level, value) == entry
    assert entry.kind is (Kind.MIGRATION if swp_type in MIGRATION_TYPES else Kind.SWAP)
    assert not value & (PTE_VALID | PTE_TABLE_BIT | PTE_PRESENT_INVALID)


def test_swap_entry_uses_the_v6_10_layout():
    value = Arm64().encode(3, swap_entry(5, 0x1234, exclusive=True, uffd_wp=True))
    assert value == 5 << 6 | 0x1234 << 12 | 1 << 2 | 1 << 3


def test_none_is_zero():
    arch = Arm64()
    for level in range(4):
        assert arch.encode(level, NONE_ENTRY) == 0
        assert arch.decode(level, 0) == NONE_ENTRY


def test_soft_dirty_is_not_an_arm64_bit():
    arch = Arm64()
    assert "soft_dirty" not in arch.sw_bits
    plain = leaf_entry(0x5000, Access.RW, young=True)
    assert arch.encode(3, plain.with_(soft_dirty=True)) == arch.encode(3, plain)


def test_writable_clean_dirty_and_readonly_encodings():
    arch = Arm64()
    clean = arch.encode(3, leaf_entry(0x5000, Access.RW))
    dirty = arch.encode(3, leaf_entry(0x5000, Access.RW, dirty=True))
    readonly = arch.encode(3, leaf_entry(0x5000, Access.R))
    assert clean & (PTE_WRITE | PTE_RDONLY | PTE_DIRTY) == PTE_WRITE | PTE_RDONLY
    assert dirty & (PTE_WRITE | PTE_RDONLY | PTE_DIRTY) == PTE_WRITE | PTE_DIRTY
    assert readonly & (PTE_WRITE | PTE_RDONLY) == PTE_RDONLY


def test_hardware_dirty_decodes_as_dirty():
    arch = Arm64()
    hw_dirty = arch.encode(3, leaf_entry(0x5000, Access.RW)) & ~PTE_RDONLY   # DBM cleared AP[2]
    assert arch.decode(3, hw_dirty) == leaf_entry(0x5000, Access.RW, dirty=True)


def test_exec_only_and_user_exec_bits():
    arch = Arm64()
    exec_only = arch.encode(3, leaf_entry(0x5000, Access.X))            # PAGE_EXECONLY
    assert not exec_only & (PTE_USER | PTE_UXN) and exec_only & (1 << 53)
    data = arch.encode(3, leaf_entry(0x5000, Access.RW))
    assert data & PTE_USER and data & PTE_UXN and data & (1 << 53)    # PXN on every user page


def test_block_at_l0_and_page_type_01_at_l3_are_bad():
    arch = Arm64()
    assert arch.decode(0, 0x40000000 | 0x401).kind is Kind.BAD
    assert arch.decode(3, 0x5000 | 0x401).kind is Kind.BAD
    assert arch.decode(0, 0x1234 << 12).kind is Kind.BAD              # invalid, non-zero at L0
    with pytest.raises(ValueError):
        arch.encode(0, leaf_entry(1 << 39, Access.R))
    with pytest.raises(ValueError):
        arch.encode(3, table_entry(0x5000))


def test_geometry_task_size_and_ttbr0():
    arch = Arm64()
    assert arch.describe() == "pgd:9/pud:9/pmd:9/pte:9 leaves 1G,2M,4K"
    assert arch.task_size == 1 << 48
    assert [lv.hw_name for lv in arch.levels] == ["L0", "L1", "L2", "L3"]
    ttbr = arch.root_register(0x123000, asid=0x42)
    assert ttbr == 0x42 << 48 | 0x123000
    assert arch.root_table(ttbr) == 0x123000
    with pytest.raises(ValueError):
        Arm64(la57=True)


# -- walk unit tests -----------------------------------------------------------------------

def test_af_clear_faults_without_hafdbs():
    arch = Arm64()
    mem, tables, va, slot = one_page(arch, young=False)
    before = mem.read(slot)
    assert walk(arch, mem, tables.root, va, Access.R) == Fault(FaultKind.ACCESS_FLAG, 3, va, Access.R)
    assert mem.read(slot) == before


def test_af_clear_is_set_by_the_walk_with_hafdbs():
    arch = Arm64(hafdbs=True)
    mem, tables, va, slot = one_page(arch, young=False)
    result = walk(arch, mem, tables.root, va + 8, Access.R)
    assert result == Translation(paddr=3 * 4096 + 0x234 + 8, size=4096, perms=Access.R,
                                 level=3, entry_paddr=slot)
    assert mem.read(slot) & PTE_AF
    assert mem.read(slot) & PTE_RDONLY                      # a read leaves the page clean


def test_write_to_writable_clean_page_faults_without_hafdbs():
    arch = Arm64()
    mem, tables, va, _ = one_page(arch, young=True)
    assert walk(arch, mem, tables.root, va, Access.R).perms == Access.R
    assert walk(arch, mem, tables.root, va, Access.W).kind is FaultKind.PROTECTION


def test_write_to_writable_clean_page_dirties_it_with_hafdbs():
    arch = Arm64(hafdbs=True)
    mem, tables, va, slot = one_page(arch, young=False)
    assert walk(arch, mem, tables.root, va, Access.W).perms == Access.RW
    assert arch.decode(3, mem.read(slot)) == leaf_entry(3 * 4096, Access.RW, young=True, dirty=True)


def test_hafdbs_does_not_make_read_only_pages_writable():
    arch = Arm64(hafdbs=True)
    mem, tables, va, slot = one_page(arch, Access.R, young=True)
    before = mem.read(slot)
    assert walk(arch, mem, tables.root, va, Access.W).kind is FaultKind.PROTECTION
    assert mem.read(slot) == before


def test_lost_cmpxchg_restarts_the_walk():
    arch = Arm64(hafdbs=True)
    mem, tables, va, slot = one_page(arch, young=False)
    mem.cmpxchg_failures = 1
    assert walk(arch, mem, tables.root, va, Access.W).perms == Access.RW
    assert mem.read(slot) & PTE_AF and not mem.read(slot) & PTE_RDONLY


def test_dirty_page_grants_write_and_exec_only_page_grants_only_exec():
    arch = Arm64()
    mem, tables, va, _ = one_page(arch, Access.RW, young=True, dirty=True)
    assert walk(arch, mem, tables.root, va, Access.R).perms == Access.RW
    mem, tables, va, _ = one_page(arch, Access.X, young=True)
    assert walk(arch, mem, tables.root, va, Access.X).perms == Access.X
    assert walk(arch, mem, tables.root, va, Access.R).kind is FaultKind.PROTECTION


@pytest.mark.parametrize("bit,denied", [(PMD_TABLE_AP_NO_EL0, Access.RWX & ~Access.X),
                                        (PMD_TABLE_AP_RDONLY, Access.W), (PMD_TABLE_UXN, Access.X)],
                         ids=["APTable0", "APTable1", "UXNTable"])
def test_table_attributes_take_rights_away_below_them(bit, denied):
    arch = Arm64()
    mem, tables, va, _ = one_page(arch, Access.RWX, young=True, dirty=True)
    l1 = tables.entry_paddr(va, 1)
    mem.words[l1] |= bit
    perms = walk(arch, mem, tables.root, va, Access.X if denied != Access.X else Access.R).perms
    assert perms == Access.RWX & ~denied


@pytest.mark.parametrize("level,size", [(2, 2 << 20), (1, 1 << 30)])
def test_blocks_translate_with_their_size(level, size):
    arch = Arm64()
    mem, tables, va, slot = one_page(arch, Access.RWX, level, young=True, dirty=True)
    result = walk(arch, mem, tables.root, va + 0x12345, Access.X)
    assert result == Translation(paddr=3 * size + 0x12345, size=size, perms=Access.RWX,
                                 level=level, entry_paddr=slot)


def test_prot_none_swap_and_reserved_encodings_fault():
    arch = Arm64()
    mem, tables, va, slot = one_page(arch, Access.NONE)
    assert walk(arch, mem, tables.root, va, Access.R) == Fault(FaultKind.NOT_PRESENT, 3, va, Access.R)
    mem.words[slot] = arch.encode(3, swap_entry(MIGRATION_TYPES[0], 99))
    assert walk(arch, mem, tables.root, va, Access.R).kind is FaultKind.NOT_PRESENT
    mem.words[slot] = 0x5000 | 0x401                        # "01" at L3
    assert walk(arch, mem, tables.root, va, Access.R).kind is FaultKind.RESERVED


def test_address_outside_ttbr0_is_address_fault():
    arch = Arm64()
    mem, tables, _, _ = one_page(arch)
    for va in (1 << 48, 0xFFFF000000001000):
        assert walk(arch, mem, tables.root, va, Access.R) == Fault(FaultKind.ADDRESS, 0, va, Access.R)


# -- CPU set-up and syscall trap (measured on Unicorn) -------------------------------------

def test_cpu_setup_sets_4k_pages_and_lets_neon_run():
    arch = Arm64()
    uc = Uc(arch.uc_arch, arch.uc_mode)
    arch.cpu_setup(uc)
    assert uc.ctl_get_page_size() == 4096
    assert uc.reg_read(A.UC_ARM64_REG_CPACR_EL1) >> 20 & 3 == 3
    uc.mem_map(0x1000, 0x1000)
    # fmov d0, x1; add v1.2d, v0.2d, v0.2d; fmov x2, d1
    uc.mem_write(0x1000, bytes.fromhex("2000679e" "0184e04e" "2200669e") + arch.sentinel_code())
    uc.reg_write(A.UC_ARM64_REG_X1, 21)
    uc.emu_start(0x1000, 0x100C, count=3)
    assert uc.reg_read(A.UC_ARM64_REG_X2) == 42


def test_svc_traps_as_interrupt_2_with_pc_already_past_it():
    arch = Arm64()
    uc = Uc(arch.uc_arch, arch.uc_mode)
    arch.cpu_setup(uc)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, bytes.fromhex("010000d4") + arch.sentinel_code())     # svc #0
    seen = []

    def on_intr(uc, intno, _):
        seen.append((intno, uc.reg_read(arch.pc_reg)))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    uc.emu_start(0x1000, 0x1010, count=10)
    assert seen == [(arch.syscall_abi.intno, 0x1004)]
    assert arch.syscall_abi.pc_advance == 0


# -- differential tests against QEMU's MMU -------------------------------------------------

RAM = 4 << 20
TABLE_BASE = 0x100000
TRAMPOLINE_VA = 0x1000            # pgd slot 0: EL1 runs an eret here, to EL0 on the same page
TRAMPOLINE_PA = 0x10000
TCR_EL1 = (16                     # T0SZ: 48-bit VA, walk starts at L0
           | 1 << 8 | 1 << 10 | 3 << 12    # IRGN0/ORGN0 write-back, SH0 inner
           | 0 << 14              # TG0 4K
           | 1 << 23              # EPD1: no TTBR1 walks
           | 2 << 30              # TG1 4K
           | 5 << 32              # IPS 48-bit
           | 1 << 36)             # AS: 16-bit ASIDs


class Oracle:
    """A Unicorn whose RAM holds the tables, at EL0 with the MMU on (spec §5 recipe)."""

    def __init__(self, arch: Arm64) -> None:
        self.arch = arch
        uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        arch.cpu_setup(uc)
        uc.ctl_set_tlb_mode(UC_TLB_CPU)
        uc.mem_map(0, RAM)
        self.uc = uc
        self.tables = PageTables(arch, self.read, self.write, TABLE_BASE)

    def read(self, paddr: int) -> int:
        return struct.unpack("<Q", self.uc.mem_read(paddr, 8))[0]

    def write(self, paddr: int, value: int) -> None:
        self.uc.mem_write(paddr, struct.pack("<Q", value))

    def enable_mmu_and_drop_to_el0(self, asid: int = 0x2A) -> None:
        uc, arch = self.uc, self.arch
        self.map_trampoline()
        uc.mem_write(TRAMPOLINE_PA, bytes.fromhex("e0039fd6" "1f2003d5" "1f2003d5"))   # eret; nop; nop
        uc.cpr_write(3, 6, 1, 1, 0, uc.cpr_read(3, 6, 1, 1, 0) | 1 << 10 | 1)   # SCR_EL3.RW|NS
        uc.cpr_write(3, 4, 1, 1, 0, uc.cpr_read(3, 4, 1, 1, 0) | 1 << 31)       # HCR_EL2.RW
        uc.reg_write(A.UC_ARM64_REG_MAIR_EL1, 0xFF)                            # MT_NORMAL = 0
        uc.cpr_write(3, 0, 2, 0, 2, TCR_EL1)
        uc.reg_write(A.UC_ARM64_REG_TTBR0_EL1, arch.root_register(self.tables.root, asid))
        uc.cpr_write(3, 0, 1, 0, 0, uc.cpr_read(3, 0, 1, 0, 0) | 1)             # SCTLR_EL1.M
        uc.cpr_write(3, 0, 4, 0, 0, 0)                                          # SPSR_EL1: EL0t
        uc.reg_write(A.UC_ARM64_REG_ELR_EL1, TRAMPOLINE_VA + 4)
        uc.emu_start(TRAMPOLINE_VA, TRAMPOLINE_VA + 8, count=1)
        assert uc.reg_read(A.UC_ARM64_REG_PC) == TRAMPOLINE_VA + 4
        assert uc.reg_read(A.UC_ARM64_REG_PSTATE) & 0xF == 0                   # EL0t
        self.root = arch.root_register(self.tables.root, asid)
        self.ctx = uc.context_save()

    def map_trampoline(self) -> None:
        """The one mapping the encoder cannot write: Unicorn fetches the page of emu_start's
        ``until`` at EL0 *and* EL1, so neither the tables nor the leaf may carry PXN/UXN."""
        table = self.tables.root
        for level in range(3):
            slot = table + self.arch.levels[level].index(TRAMPOLINE_VA) * 8
            table = self.tables.alloc()
            self.write(slot, table | 3)
        self.write(table + self.arch.levels[3].index(TRAMPOLINE_VA) * 8,
                   TRAMPOLINE_PA | 3 | PTE_AF | 3 << 8 | PTE_USER | PTE_RDONLY)

    def probe(self, va: int, access: Access):
        """(plugin's result, oracle PA or None, descriptors before, after the oracle)."""
        touched: list[int] = []

        def read(paddr: int) -> int:
            touched.append(paddr)
            return self.read(paddr)

        def cmpxchg(paddr: int, old: int, new: int) -> bool:
            raise AssertionError("no hardware updates without FEAT_HAFDBS")

        mine = run_walk(self.arch.walk(self.root, va, access), read, cmpxchg)
        before = {p: self.read(p) for p in touched}
        self.uc.context_restore(self.ctx)
        tlb_flush(self.uc)
        pa = vmem_translate(self.uc, va, int(access))
        return mine, pa, before, {p: self.read(p) for p in touched}


def agrees(mine, pa) -> bool:
    if isinstance(mine, Translation):
        return mine.paddr == pa
    return pa is None


def random_leaf(arch: Arm64, rng: random.Random, level: int) -> Entry:
    span = arch.levels[level].span
    user = rng.random() < 0.85
    prot = rng.choice([Access.R, Access.RW, Access.RX, Access.RWX, Access.X, Access.NONE])
    if not user and prot:
        prot |= Access.R
    return leaf_entry(rng.randrange(0, (1 << PA_BITS) // span) * span, prot, user=user,
                      young=rng.random() < 0.8, dirty=rng.random() < 0.5,
                      special=rng.random() < 0.2, uffd_wp=rng.random() < 0.2)


def random_descriptor(arch: Arm64, tables: PageTables, rng: random.Random, level: int) -> int:
    """A descriptor for ``level``: mostly what Linux writes, sometimes hardware corner
    cases Linux never writes (APTable/UXNTable, a reserved L3 "01", ignored bits)."""
    lv = arch.levels[level]
    r = rng.random()
    if level == arch.pte_level:
        if r < 0.75:
            value = arch.encode(level, random_leaf(arch, rng, level))
            if rng.random() < 0.1:                 # bits the MMU ignores: GP, contiguous
                value |= rng.choice([1 << 50, 1 << 52, 0xF << 55, 0xF << 59])
            return value
        if r < 0.85:
            swp_type = rng.choice([1, *MIGRATION_TYPES])
            return arch.encode(level, swap_entry(swp_type, rng.randrange(1, 1 << 30)))
        if r < 0.93:
            return 0
        return arch.encode(level, random_leaf(arch, rng, level)) & ~PTE_TABLE_BIT
    if r < 0.04:
        return 0
    if lv.leaf and r < 0.3:
        return arch.encode(level, random_leaf(arch, rng, level))
    value = arch.encode(level, Entry(Kind.TABLE, paddr=tables.alloc(), user=rng.random() < 0.9))
    if rng.random() < 0.25:
        value |= rng.choice([PMD_TABLE_AP_NO_EL0, PMD_TABLE_AP_RDONLY, PMD_TABLE_UXN, PMD_TABLE_PXN])
    return value


def build_random_tree(oracle: Oracle, rng: random.Random, pools: list[list[int]]) -> None:
    arch = oracle.arch

    def fill(table: int, level: int) -> None:
        for index in pools[level]:
            value = random_descriptor(arch, oracle.tables, rng, level)
            oracle.write(table + index * 8, value)
            if level < arch.pte_level and value & 3 == 3:
                fill(value & ((1 << PA_BITS) - 4096), level + 1)

    fill(oracle.tables.root, 0)


def random_va(arch: Arm64, rng: random.Random, pools: list[list[int]]) -> int:
    va = rng.randrange(4096)
    for level, lv in enumerate(arch.levels):
        index = rng.choice(pools[level]) if rng.random() < 0.93 else rng.randrange(lv.entries)
        va |= index << lv.shift
    r = rng.random()
    if r < 0.02:
        va |= 0xFFFF << 48                      # TTBR1's half (EPD1: no walk)
    elif r < 0.04:
        va |= 1 << rng.randrange(48, 64)         # the gap
    return va


def make_oracle(seed: int):
    arch = Arm64()
    oracle = Oracle(arch)
    rng = random.Random(seed)
    pools = [rng.sample(range(1, 512), 4)] + [rng.sample(range(512), 4) for _ in range(2)]
    pools.append(rng.sample(range(512), 8))
    build_random_tree(oracle, rng, pools)
    oracle.enable_mmu_and_drop_to_el0()
    return oracle, rng, pools


@pytest.mark.parametrize("seed", [2, 3, 5, 7])
def test_walk_agrees_with_qemu_mmu_for_el0_accesses(seed):
    """Random trees: 4K pages, 2M/1G blocks, read-only, writable-clean (DBM|RDONLY) and
    dirty pages, UXN and exec-only pages, kernel pages, AF=0, PROT_NONE and swap
    entries, APTable/UXNTable/PXNTable tables, reserved L3 "01", holes at each level and
    VAs outside TTBR0; each probe is one EL0 READ, WRITE or EXEC and must give the same
    PA or fail on both sides, and neither side may change a descriptor."""
    oracle, rng, pools = make_oracle(seed)
    arch = oracle.arch
    outcomes: dict[str, int] = {}
    for _ in range(1200):
        va = random_va(arch, rng, pools)
        access = rng.choice([Access.R, Access.W, Access.X])
        mine, pa, before, after = oracle.probe(va, access)
        assert agrees(mine, pa), f"va={va:#x} {access!r}: plugin {mine}, QEMU {pa and hex(pa)}"
        assert after == before
        key = "ok" if isinstance(mine, Translation) else mine.kind.value
        outcomes[key] = outcomes.get(key, 0) + 1
    assert set(outcomes) >= {"ok", "not-present", "protection", "access-flag", "reserved", "address"}, \
        outcomes
    assert outcomes["ok"] > 100, outcomes


# (leaf level, descriptor to change, change, accesses that succeed) on an RWX dirty user leaf
CORNER_CASES = {
    "aptable0-denies-el0-data": (3, 0, lambda v: v | PMD_TABLE_AP_NO_EL0, "x"),
    "aptable1-denies-write": (2, 1, lambda v: v | PMD_TABLE_AP_RDONLY, "rx"),
    "uxntable-denies-fetch": (3, 2, lambda v: v | PMD_TABLE_UXN, "rw"),
    "pxntable-is-irrelevant-at-el0": (3, 1, lambda v: v | PMD_TABLE_PXN, "rwx"),
    "writable-clean-denies-write": (3, 3, lambda v: v | PTE_RDONLY, "rx"),
    "af-clear-faults-everything": (1, 1, lambda v: v & ~PTE_AF, ""),
    "dbm-alone-changes-nothing": (3, 3, lambda v: v | PTE_DBM, "rwx"),
    "kernel-page-is-exec-only-for-el0": (3, 3, lambda v: v & ~PTE_USER, "x"),
    "type-01-at-l3-is-invalid": (3, 3, lambda v: v & ~PTE_TABLE_BIT, ""),
    "software-and-ignored-bits": (2, 2, lambda v: v | 0xF << 55 | 1 << 52 | 1 << 50 | 1 << 11, "rwx"),
}


@pytest.mark.parametrize("case", CORNER_CASES)
def test_hardware_corner_case_agrees_with_qemu(case):
    leaf_level, target_level, change, succeeds = CORNER_CASES[case]
    arch = Arm64()
    oracle = Oracle(arch)
    va = 0x7F1234000000 & ~(arch.levels[leaf_level].span - 1)
    span = arch.levels[leaf_level].span
    oracle.tables.set(va, leaf_level, leaf_entry(span * 5, Access.RWX, young=True, dirty=True))
    slot = oracle.tables.entry_paddr(va, target_level)
    oracle.write(slot, change(oracle.read(slot)))
    oracle.enable_mmu_and_drop_to_el0()
    for letter, access in (("r", Access.R), ("w", Access.W), ("x", Access.X)):
        mine, pa, _, _ = oracle.probe(va + 0x678, access)
        assert agrees(mine, pa), f"{access!r}: plugin {mine}, QEMU {pa and hex(pa)}"
        assert isinstance(mine, Translation) == (letter in succeeds), f"{access!r}: {mine}"


def test_l0_block_is_reserved_although_qemu5_translates_it():
    """Without LPA2 a block at L0 is a translation fault (Arm ARM); QEMU 5 maps 512G.
    The plugin follows the architecture; the random trees never contain L0 blocks."""
    arch = Arm64()
    oracle = Oracle(arch)
    va = 3 << 39
    oracle.write(oracle.tables.root + 3 * 8, arch.encode(1, leaf_entry(0, Access.RW, young=True)))
    oracle.enable_mmu_and_drop_to_el0()
    mine, pa, _, _ = oracle.probe(va + 0x1234, Access.R)
    assert mine.kind is FaultKind.RESERVED and pa == 0x1234
