"""The x86-64 plugin: entry encodings, the hardware walk, and agreement with QEMU's MMU.

The differential tests build page tables with the plugin's own encoder in a Unicorn
RAM, drop the CPU to CPL 3 (``sysretq``) so user/supervisor rules apply, and compare the
plugin's walk with ``uc_vmem_translate`` (QEMU 5's ``handle_mmu_fault``), including the
A/D bits each walk leaves behind.
"""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_TLB_CPU, Uc
from unicorn import x86_const as X

from arch_plugins.x86_64 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PAT_LARGE,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_USER,
    X86_64,
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

ARCHES = [X86_64(), X86_64(la57=True)]
ARCH_IDS = ["4-level", "la57"]
MAXPHYADDR = 46

# -- helpers -------------------------------------------------------------------------------


class PageTables:
    """Builds a tree with the plugin's encoder over any 8-byte read/write."""

    def __init__(self, arch: X86_64, read, write, table_base: int) -> None:
        self.arch, self.read, self.write = arch, read, write
        self.next_table = table_base
        self.root = self.alloc()

    def alloc(self) -> int:
        paddr, self.next_table = self.next_table, self.next_table + 4096
        return paddr

    def entry_paddr(self, va: int, level: int) -> int:
        """Where ``va``'s entry at ``level`` lives, allocating tables on the way."""
        table = self.root
        for lvl in range(level):
            slot = table + self.arch.levels[lvl].index(va) * 8
            entry = self.arch.decode(lvl, self.read(slot))
            if entry.kind is not Kind.TABLE:
                entry = table_entry(self.alloc())
                self.write(slot, self.arch.encode(lvl, entry))
            table = entry.paddr
        return table + self.arch.levels[level].index(va) * 8

    def set(self, va: int, level: int, entry: Entry) -> int:
        slot = self.entry_paddr(va, level)
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
    return run_walk(arch.walk(arch.root_register(root), va, access), mem.read, mem.cmpxchg)


def level_of(arch: X86_64, name: str) -> int:
    return [lv.name for lv in arch.levels].index(name)


# -- encode/decode round trips -------------------------------------------------------------

def aligned_paddr(size: int):
    return st.integers(0, (1 << MAXPHYADDR) // size - 1).map(lambda n: n * size)


prots = st.sampled_from([Access.NONE, Access.R, Access.RW, Access.RX, Access.RWX])


@pytest.mark.parametrize("arch", ARCHES, ids=ARCH_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_table_entries_round_trip_on_every_non_pte_level(arch, data):
    level = data.draw(st.integers(0, arch.pte_level - 1))
    entry = Entry(Kind.TABLE, paddr=data.draw(aligned_paddr(4096)), user=data.draw(st.booleans()))
    assert arch.decode(level, arch.encode(level, entry)) == entry


@pytest.mark.parametrize("arch", ARCHES, ids=ARCH_IDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_leaf_entries_round_trip_on_every_leaf_level(arch, data):
    level = data.draw(st.sampled_from([i for i, lv in enumerate(arch.levels) if lv.leaf]))
    prot = data.draw(prots)
    flags = {name: data.draw(st.booleans())
             for name in ("user", "young", "dirty", "special", "soft_dirty", "uffd_wp")}
    if not prot:
        flags["user"] = True          # PAGE_NONE has no _PAGE_USER; Linux maps it for users
    entry = leaf_entry(data.draw(aligned_paddr(arch.levels[level].span)), prot, **flags)
    value = arch.encode(level, entry)
    assert arch.decode(level, value) == entry
    assert bool(value & _PAGE_PRESENT) == bool(prot)       # PROT_NONE is invisible to the MMU


@pytest.mark.parametrize("arch", ARCHES, ids=ARCH_IDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_swap_and_migration_entries_round_trip_on_every_leaf_level(arch, data):
    level = data.draw(st.sampled_from([i for i, lv in enumerate(arch.levels) if lv.leaf]))
    swp_type = data.draw(st.sampled_from(
        [0, 1, MAX_SWAPFILES - 1, SWP_HWPOISON, SWP_PTE_MARKER, *MIGRATION_TYPES]))
    entry = swap_entry(swp_type, data.draw(st.integers(1, (1 << 50) - 2)),
                       soft_dirty=data.draw(st.booleans()), uffd_wp=data.draw(st.booleans()),
                       exclusive=data.draw(st.booleans()))
    value = arch.encode(level, entry)
    assert arch.decode(level, value) == entry
    assert entry.kind is (Kind.MIGRATION if swp_type in MIGRATION_TYPES else Kind.SWAP)
    # never present, never PROT_NONE, never a huge pmd, and no A/D (erratum)
    assert not value & (_PAGE_PRESENT | _PAGE_PSE | 1 << 8 | _PAGE_ACCESSED | _PAGE_DIRTY)


def test_swap_entry_keeps_linux_inverted_offset_layout():
    arch = X86_64()
    value = arch.encode(3, swap_entry(5, 0x1234))
    assert value >> 59 == 5
    assert (value >> 9) & ((1 << 50) - 1) == ~0x1234 & ((1 << 50) - 1)


@pytest.mark.parametrize("arch", ARCHES, ids=ARCH_IDS)
def test_none_is_zero_and_ignores_erratum_accessed_dirty(arch):
    for level in range(len(arch.levels)):
        assert arch.encode(level, NONE_ENTRY) == 0
        assert arch.decode(level, 0) == NONE_ENTRY
        assert arch.decode(level, _PAGE_ACCESSED | _PAGE_DIRTY) == NONE_ENTRY


def test_table_entry_is_linux_page_table_and_decode_tolerates_clear_accessed():
    arch = X86_64()
    value = arch.encode(0, table_entry(0x5000))
    assert value == 0x5000 | 0x67                               # _PAGE_TABLE
    assert arch.decode(0, value & ~_PAGE_ACCESSED) == table_entry(0x5000)


@pytest.mark.parametrize("value", [
    0x5000 | 0x67 | _PAGE_NX,                 # extra flag bit on a table
    0x5000 | 0x65,                            # read-only table: not what Linux writes
    0x5000 | 0x67 | 1 << 9,                   # software bit on a table
    0x5000 | 0x27,                            # no D: pmd_bad() wants _KERNPG_TABLE's D
], ids=["nx", "readonly", "sw-bit", "no-dirty"])
def test_present_non_leaf_with_other_flags_is_bad(value):
    arch = X86_64()
    for level in range(3):
        assert arch.decode(level, value).kind is Kind.BAD


def test_ps_where_no_leaf_can_be_is_bad():
    arch = X86_64(la57=True)
    for level in (0, 1):                      # PML5E, PML4E
        assert arch.decode(level, 0x200000 | 0xe7).kind is Kind.BAD
        with pytest.raises(ValueError):
            arch.encode(level, leaf_entry(0x200000, Access.R))


def test_huge_leaves_set_ps_and_4k_leaves_do_not():
    arch = X86_64()
    assert arch.encode(1, leaf_entry(1 << 30, Access.R)) & _PAGE_PSE
    assert arch.encode(2, leaf_entry(2 << 20, Access.R)) & _PAGE_PSE
    assert not arch.encode(3, leaf_entry(4096, Access.R)) & _PAGE_PSE


def test_encode_rejects_misaligned_frames_and_tables_in_ptes():
    arch = X86_64()
    with pytest.raises(ValueError):
        arch.encode(2, leaf_entry(0x1000, Access.R))
    with pytest.raises(ValueError):
        arch.encode(3, table_entry(0x1000))


def test_geometry_and_task_size():
    assert X86_64().describe() == "pgd:9/pud:9/pmd:9/pte:9 leaves 1G,2M,4K"
    assert X86_64().task_size == 0x7FFFFFFFF000
    assert [lv.name for lv in X86_64(la57=True).levels] == ["pgd", "p4d", "pud", "pmd", "pte"]
    assert X86_64(la57=True).task_size == (1 << 56) - 4096
    with pytest.raises(ValueError):
        X86_64(pae=True)


def test_cr3_holds_root_and_pcid():
    arch = X86_64()
    cr3 = arch.root_register(0x123000, asid=7)
    assert cr3 == 0x123007
    assert arch.root_table(cr3) == 0x123000


# -- walk unit tests -----------------------------------------------------------------------

def one_page(arch, prot=Access.RW, level_name="pte", **flags):
    mem = DictMemory()
    tables = PageTables(arch, mem.read, mem.write, 0x100000)
    level = level_of(arch, level_name)
    va = 0x7F0000000000 + (0x1234 if level_name == "pte" else 0)
    slot = tables.set(va, level, leaf_entry(arch.levels[level].span * 3, prot, **flags))
    return mem, tables, va, slot, level


def test_write_to_clean_page_sets_dirty_and_grants_write():
    arch = X86_64()
    mem, tables, va, slot, _ = one_page(arch, young=True)
    result = walk(arch, mem, tables.root, va + 8, Access.W)
    assert result == Translation(paddr=3 * 4096 + 0x234 + 8, size=4096, perms=Access.RW,
                                 level=3, entry_paddr=slot)
    assert arch.decode(3, mem.read(slot)).dirty


def test_read_of_clean_page_grants_no_write_and_sets_only_accessed():
    arch = X86_64()
    mem, tables, va, slot, _ = one_page(arch)
    result = walk(arch, mem, tables.root, va, Access.R)
    assert result.perms == Access.R
    entry = arch.decode(3, mem.read(slot))
    assert entry.young and not entry.dirty


def test_read_of_dirty_page_grants_write():
    arch = X86_64()
    mem, tables, va, _, _ = one_page(arch, young=True, dirty=True)
    assert walk(arch, mem, tables.root, va, Access.R).perms == Access.RW


def test_walk_sets_accessed_on_every_level_used():
    arch = X86_64()
    mem = DictMemory()
    tables = PageTables(arch, mem.read, mem.write, 0x100000)
    tables.set(0x400000, 3, leaf_entry(0x9000, Access.RX))
    for slot in list(mem.words):
        mem.words[slot] &= ~_PAGE_ACCESSED
    walk(arch, mem, tables.root, 0x400000, Access.X)
    assert all(value & _PAGE_ACCESSED for value in mem.words.values())


def test_lost_cmpxchg_restarts_the_walk():
    arch = X86_64()
    mem, tables, va, slot, _ = one_page(arch, young=False)
    mem.cmpxchg_failures = 1
    result = walk(arch, mem, tables.root, va, Access.W)
    assert isinstance(result, Translation) and result.perms == Access.RW
    assert arch.decode(3, mem.read(slot)).dirty


@pytest.mark.parametrize("level_name,size", [("pmd", 2 << 20), ("pud", 1 << 30)])
def test_huge_leaf_translates_with_its_size(level_name, size):
    arch = X86_64()
    mem, tables, va, _, level = one_page(arch, Access.RWX, level_name, young=True, dirty=True)
    result = walk(arch, mem, tables.root, va + 0x12345, Access.X)
    assert result.size == size and result.level == level
    assert result.paddr == 3 * size + 0x12345 and result.perms == Access.RWX


def test_reserved_low_address_bits_of_huge_leaf_fault():
    arch = X86_64()
    mem, tables, va, slot, _ = one_page(arch, Access.R, "pmd")
    mem.words[slot] |= 1 << 13
    assert walk(arch, mem, tables.root, va, Access.R).kind is FaultKind.RESERVED
    mem.words[slot] &= ~(1 << 13)
    mem.words[slot] |= _PAGE_PAT_LARGE                 # bit 12 is PAT, not address
    assert isinstance(walk(arch, mem, tables.root, va, Access.R), Translation)


def test_address_bits_above_maxphyaddr_are_reserved():
    arch = X86_64(maxphyaddr=40)
    mem, tables, va, slot, _ = one_page(arch, Access.R)
    mem.words[slot] |= 1 << 41
    assert walk(arch, mem, tables.root, va, Access.R).kind is FaultKind.RESERVED


def test_protection_faults_for_write_fetch_and_supervisor_pages():
    arch = X86_64()
    mem, tables, va, _, _ = one_page(arch, Access.R)
    assert walk(arch, mem, tables.root, va, Access.W).kind is FaultKind.PROTECTION
    assert walk(arch, mem, tables.root, va, Access.X).kind is FaultKind.PROTECTION
    mem, tables, va, _, _ = one_page(arch, Access.RWX, user=False)
    fault = walk(arch, mem, tables.root, va, Access.R)
    assert fault == Fault(FaultKind.PROTECTION, 3, va, Access.R)


def test_prot_none_and_swap_entries_are_not_present_to_the_mmu():
    arch = X86_64()
    mem, tables, va, slot, _ = one_page(arch, Access.NONE)
    assert walk(arch, mem, tables.root, va, Access.R) == Fault(FaultKind.NOT_PRESENT, 3, va, Access.R)
    mem.words[slot] = arch.encode(3, swap_entry(1, 99))
    assert walk(arch, mem, tables.root, va, Access.R).kind is FaultKind.NOT_PRESENT


@pytest.mark.parametrize("arch", ARCHES, ids=ARCH_IDS)
def test_non_canonical_address_is_address_fault(arch):
    mem, tables, _, _, _ = one_page(arch)
    va = 1 << (arch.levels[0].shift + 8)          # first bit above the VA width
    assert walk(arch, mem, tables.root, va, Access.R) == Fault(FaultKind.ADDRESS, 0, va, Access.R)


# -- CPU set-up and syscall trap (measured on Unicorn) -------------------------------------

def bare_cpu(code: bytes):
    arch = X86_64()
    uc = Uc(arch.uc_arch, arch.uc_mode)
    arch.cpu_setup(uc)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, code + arch.sentinel_code())
    return arch, uc


def test_cpu_setup_leaves_sse_usable():
    arch, uc = bare_cpu(bytes.fromhex("66480f6ec0" "660fd4c0" "66480f7ec3"))  # movq; paddq; movq
    uc.reg_write(X.UC_X86_REG_RAX, 21)
    uc.emu_start(0x1000, 0x100E, count=3)
    assert uc.reg_read(X.UC_X86_REG_RBX) == 42


def test_syscall_hook_sees_rip_on_the_insn_and_unicorn_steps_past_it():
    """RIP reads as the ``syscall`` itself inside the hook; Unicorn adds its 2 bytes after
    the hook returns (also to a RIP the hook wrote), so pc_advance is 0."""
    arch, uc = bare_cpu(b"\x0f\x05" + b"\x48\xff\xc0")             # syscall; inc rax
    seen = []
    uc.hook_add(UC_HOOK_INSN, lambda uc, _: seen.append(uc.reg_read(arch.pc_reg)),
                aux1=X.UC_X86_INS_SYSCALL)
    uc.emu_start(0x1000, 0x1005, count=10)
    assert seen == [0x1000]
    assert uc.reg_read(X.UC_X86_REG_RAX) == 1                      # the inc after it ran
    assert arch.syscall_abi.trap == "insn" and arch.syscall_abi.pc_advance == 0


def test_emu_stop_in_syscall_hook_leaves_rip_past_the_syscall():
    arch, uc = bare_cpu(b"\x0f\x05" + b"\x48\xff\xc0")
    uc.hook_add(UC_HOOK_INSN, lambda uc, _: uc.emu_stop(), aux1=X.UC_X86_INS_SYSCALL)
    uc.emu_start(0x1000, 0x1005, count=10)
    assert uc.reg_read(arch.pc_reg) == 0x1002
    assert uc.reg_read(X.UC_X86_REG_RAX) == 0


# -- differential tests against QEMU's MMU -------------------------------------------------

RAM = 4 << 20
TABLE_BASE = 0x100000
CODE_VA = 0x1000                  # pgd slot 0 is kept for the sysretq trampoline
UC_MAXPHYADDR = 40                # QEMU 5's TCG CPU: PHYS_ADDR_MASK is 40 bits
TABLE_ADDR = (1 << UC_MAXPHYADDR) - 4096   # where a (possibly corrupted) table entry points


class Oracle:
    """A Unicorn whose RAM holds the tables, in long mode at CPL 3 (spec §5 recipe)."""

    def __init__(self, arch: X86_64) -> None:
        self.arch = arch
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_CPU)
        uc.mem_map(0, RAM)
        self.uc = uc
        self.tables = PageTables(arch, self.read, self.write, TABLE_BASE)

    def read(self, paddr: int) -> int:
        return struct.unpack("<Q", self.uc.mem_read(paddr, 8))[0]

    def write(self, paddr: int, value: int) -> None:
        self.uc.mem_write(paddr, struct.pack("<Q", value))

    def enable_paging(self) -> None:
        uc, arch = self.uc, self.arch
        self.tables.set(CODE_VA, arch.pte_level, leaf_entry(0x10000, Access.RX))
        uc.mem_write(0x10000, b"\x48\x0f\x07" + b"\x90" * 13)         # sysretq; nop...
        uc.reg_write(X.UC_X86_REG_CR3, arch.root_register(self.tables.root))
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 0x20
                     | (1 << 12 if arch.la57 else 0))                   # PAE, LA57
        uc.msr_write(0xC0000080, uc.msr_read(0xC0000080) | 0x100 | 0x800 | 1)   # LME NXE SCE
        uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 1 | 1 << 16 | 1 << 31)
        uc.msr_write(0xC0000081, 0x10 << 48 | 0x08 << 32)             # STAR: user CS/SS
        uc.reg_write(X.UC_X86_REG_RCX, CODE_VA + 3)
        uc.reg_write(X.UC_X86_REG_R11, 0x2)
        uc.emu_start(CODE_VA, CODE_VA + 3, count=1)
        assert uc.reg_read(X.UC_X86_REG_CS) & 3 == 3
        # restoring this before each probe also clears QEMU's pending-#PF state
        self.ctx = uc.context_save()

    def probe(self, va: int, access: Access):
        """(plugin's result, oracle PA or None, entries after the oracle, after the plugin)."""
        overlay: dict[int, int] = {}
        touched: list[int] = []

        def read(paddr: int) -> int:
            touched.append(paddr)
            return overlay[paddr] if paddr in overlay else self.read(paddr)

        def cmpxchg(paddr: int, old: int, new: int) -> bool:
            if read(paddr) != old:
                return False
            overlay[paddr] = new
            return True

        root = self.arch.root_register(self.tables.root)
        mine = run_walk(self.arch.walk(root, va, access), read, cmpxchg)
        before = {p: self.read(p) for p in touched}
        self.uc.context_restore(self.ctx)
        tlb_flush(self.uc)
        pa = vmem_translate(self.uc, va, int(access))
        after_oracle = {p: self.read(p) for p in touched}
        after_mine = {p: overlay.get(p, v) for p, v in before.items()}
        for p, v in before.items():
            self.write(p, v)
        return mine, pa, after_oracle, after_mine


def random_leaf(arch: X86_64, rng: random.Random, level: int) -> Entry:
    span = arch.levels[level].span
    return leaf_entry(rng.randrange(0, (1 << UC_MAXPHYADDR) // span) * span,
                      rng.choice([Access.R, Access.RW, Access.RX, Access.RWX, Access.NONE]),
                      user=rng.random() < 0.85, young=rng.random() < 0.5, dirty=rng.random() < 0.5,
                      special=rng.random() < 0.2, soft_dirty=rng.random() < 0.2,
                      uffd_wp=rng.random() < 0.2)


def random_entry(arch: X86_64, tables: PageTables, rng: random.Random, level: int) -> int:
    """An entry value for ``level``: mostly what Linux writes, sometimes hardware corner
    cases Linux never writes (read-only, NX or supervisor tables, reserved bits)."""
    lv = arch.levels[level]
    r = rng.random()
    if level == arch.pte_level:
        if r < 0.75:
            return arch.encode(level, random_leaf(arch, rng, level))
        if r < 0.85:
            swp_type = rng.choice([1, *MIGRATION_TYPES])
            return arch.encode(level, swap_entry(swp_type, rng.randrange(1, 1 << 30)))
        if r < 0.93:
            return 0
        return arch.encode(level, random_leaf(arch, rng, level)) | 1 << rng.randrange(UC_MAXPHYADDR, 52)
    if r < 0.04:
        return 0
    if lv.leaf and r < 0.3:
        value = arch.encode(level, random_leaf(arch, rng, level))
        if rng.random() < 0.1:
            value |= 1 << rng.randrange(13, lv.shift)          # reserved low address bit
        return value
    value = arch.encode(level, table_entry(tables.alloc()))
    if rng.random() < 0.25:
        value = rng.choice([
            lambda v: v & ~_PAGE_RW,
            lambda v: v | _PAGE_NX,
            lambda v: v & ~_PAGE_USER,
            lambda v: v & ~_PAGE_ACCESSED,
            lambda v: v | 1 << rng.randrange(UC_MAXPHYADDR, 52),   # reserved address bit
            lambda v: v if lv.leaf else v | _PAGE_PSE,              # PS in a PML4E/PML5E
        ])(value)
    return value


def build_random_tree(oracle: Oracle, rng: random.Random, pools: list[list[int]]) -> None:
    """Fill every combination of the per-level index pools below the root."""
    arch, tables = oracle.arch, oracle.tables

    def fill(table: int, level: int, va: int) -> None:
        for index in pools[level]:
            child_va = va | index << arch.levels[level].shift
            value = random_entry(arch, tables, rng, level)
            oracle.write(table + index * 8, value)
            # below every present non-leaf entry, including the ones Linux would call bad
            huge = arch.levels[level].leaf and value & _PAGE_PSE
            if level < arch.pte_level and value & _PAGE_PRESENT and not huge:
                fill(value & TABLE_ADDR, level + 1, child_va)

    fill(tables.root, 0, 0)


def random_va(arch: X86_64, rng: random.Random, pools: list[list[int]]) -> int:
    va = 0
    for level, lv in enumerate(arch.levels):
        pool = pools[level]
        index = rng.choice(pool) if rng.random() < 0.93 else rng.randrange(lv.entries)
        va |= index << lv.shift
    va |= rng.randrange(4096)
    top = arch.levels[0].shift + 9                                    # sign-extend
    if va >> (top - 1) & 1:
        va |= ((1 << 64) - 1) ^ ((1 << top) - 1)
    if rng.random() < 0.02:
        va ^= 1 << rng.randrange(top, 64)                             # non-canonical
    return va


def make_oracle(la57: bool, seed: int):
    arch = X86_64(la57=la57, maxphyaddr=UC_MAXPHYADDR)
    oracle = Oracle(arch)
    rng = random.Random(seed)
    n = len(arch.levels)
    pools = [rng.sample(range(1, 511), 3) + [0x1FF]] + [rng.sample(range(512), 4) for _ in range(n - 2)]
    pools.append(rng.sample(range(512), 8))
    if la57:
        pools[1] = pools[1][:2]
    build_random_tree(oracle, rng, pools)
    oracle.enable_paging()
    return oracle, rng, pools


def agrees(mine, pa) -> bool:
    if isinstance(mine, Translation):
        return mine.paddr == pa
    return pa is None


QEMU_1G_QUIRK = "QEMU 5 sets A in a PDPTE before it knows the PDPTE is a faulting 1G leaf"


def expected_side_effects(arch, mine, after_mine):
    """The plugin's entries, adjusted for the one QEMU 5 ordering quirk."""
    expected = dict(after_mine)
    if isinstance(mine, Fault) and mine.kind in (FaultKind.PROTECTION, FaultKind.RESERVED) \
            and arch.levels[mine.level].name == "pud":
        slot = [p for p in after_mine][mine.level]
        expected[slot] |= _PAGE_ACCESSED
    return expected


@pytest.mark.parametrize("la57,seed,probes", [(False, 1, 1500), (False, 2, 1500), (False, 7, 1500),
                                               (True, 3, 1000)],
                         ids=["4-level-a", "4-level-b", "4-level-c", "la57"])
def test_walk_agrees_with_qemu_mmu_for_user_accesses(la57, seed, probes):
    """Random trees: 4K/2M/1G leaves, RO/NX/supervisor leaves and tables, PROT_NONE and
    swap entries, holes at each level, reserved bits, non-canonical VAs; each probe is
    one READ, WRITE or EXEC at CPL 3, and must give the same PA, or fail on both sides,
    and leave the same A/D bits."""
    oracle, rng, pools = make_oracle(la57, seed)
    arch = oracle.arch
    outcomes: dict[str, int] = {}
    for _ in range(probes):
        va = random_va(arch, rng, pools)
        access = rng.choice([Access.R, Access.W, Access.X])
        mine, pa, after_oracle, after_mine = oracle.probe(va, access)
        assert agrees(mine, pa), f"va={va:#x} {access!r}: plugin {mine}, QEMU {pa and hex(pa)}"
        assert after_oracle == expected_side_effects(arch, mine, after_mine), \
            f"va={va:#x} {access!r}: A/D differ ({mine})"
        key = "ok" if isinstance(mine, Translation) else mine.kind.value
        outcomes[key] = outcomes.get(key, 0) + 1
    # the tree really exercised every outcome
    assert set(outcomes) >= {"ok", "not-present", "protection", "reserved", "address"}, outcomes
    assert outcomes["ok"] > probes // 10, outcomes


def test_walk_sets_accessed_and_dirty_exactly_like_qemu():
    """Fresh leaves of every size with A and D clear, and tables with A clear: a read probe
    then a write probe, comparing every entry on the path after each."""
    arch = X86_64(maxphyaddr=UC_MAXPHYADDR)
    oracle = Oracle(arch)
    vas = []
    for i, level_name in enumerate(["pte", "pte", "pmd", "pud"]):
        level = level_of(arch, level_name)
        va = (i + 1) << 39 | (i + 3) << 30 | (i + 5) << 21 | (i + 7) << 12
        va &= ~(arch.levels[level].span - 1)
        oracle.tables.set(va, level, leaf_entry(arch.levels[level].span * 2, Access.RW))
        vas.append(va + 0x10)
    for slot in range(TABLE_BASE, oracle.tables.next_table, 8):
        oracle.write(slot, oracle.read(slot) & ~_PAGE_ACCESSED)
    oracle.enable_paging()
    for va in vas:
        path_before = None
        for access, leaf_bits in ((Access.R, _PAGE_ACCESSED), (Access.W, _PAGE_ACCESSED | _PAGE_DIRTY)):
            mine, pa, after_oracle, after_mine = oracle.probe(va, access)
            assert agrees(mine, pa) and pa is not None
            assert after_oracle == after_mine
            path_before = path_before or {p: oracle.read(p) for p in after_oracle}
            for p, v in after_oracle.items():             # keep the state for the next probe
                oracle.write(p, v)
            *tables, leaf = after_oracle
            assert after_oracle[leaf] ^ path_before[leaf] == leaf_bits
            assert all(after_oracle[p] ^ path_before[p] == _PAGE_ACCESSED for p in tables)


# (leaf level, entry to change, change, accesses that succeed) on an RWX user leaf
CORNER_CASES = {
    "ps-in-pml4e-is-reserved": ("pte", "pgd", lambda v: v | _PAGE_PSE, ""),
    "bit7-of-4k-pte-is-pat": ("pte", "pte", lambda v: v | _PAGE_PSE, "rwx"),
    "bit12-of-2m-leaf-is-pat": ("pmd", "pmd", lambda v: v | _PAGE_PAT_LARGE, "rwx"),
    "low-address-bit-of-1g-leaf-is-reserved": ("pud", "pud", lambda v: v | 1 << 21, ""),
    "address-above-maxphyaddr-is-reserved": ("pte", "pmd", lambda v: v | 1 << 45, ""),
    "read-only-table-denies-write": ("pte", "pud", lambda v: v & ~_PAGE_RW, "rx"),
    "nx-table-denies-fetch": ("pmd", "pgd", lambda v: v | _PAGE_NX, "rw"),
    "supervisor-table-denies-user": ("pte", "pgd", lambda v: v & ~_PAGE_USER, ""),
    "software-global-and-pkey-bits-are-ignored": (
        "pte", "pte", lambda v: v | 0xE00 | 0x100 | 0x7F << 52 | 0xF << 59, "rwx"),
}


@pytest.mark.parametrize("case", CORNER_CASES)
def test_hardware_corner_case_agrees_with_qemu(case):
    leaf_name, target_name, change, succeeds = CORNER_CASES[case]
    arch = X86_64(maxphyaddr=UC_MAXPHYADDR)
    oracle = Oracle(arch)
    leaf = level_of(arch, leaf_name)
    va = 0x7F1234000000 & ~(arch.levels[leaf].span - 1)
    oracle.tables.set(va, leaf, leaf_entry(arch.levels[leaf].span * 5, Access.RWX, young=True, dirty=True))
    slot = oracle.tables.entry_paddr(va, level_of(arch, target_name))
    oracle.write(slot, change(oracle.read(slot)))
    oracle.enable_paging()
    for letter, access in (("r", Access.R), ("w", Access.W), ("x", Access.X)):
        mine, pa, _, _ = oracle.probe(va + 0x678, access)
        assert agrees(mine, pa), f"{access!r}: plugin {mine}, QEMU {pa and hex(pa)}"
        assert isinstance(mine, Translation) == (letter in succeeds), f"{access!r}: {mine}"
