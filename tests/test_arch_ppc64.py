"""ppc64: Linux's radix entry encoding and the Power ISA 3.0 radix walk (POWER9, 4K pages).

Unicorn 2.1.4 cannot run the radix MMU (spec/arch_formats.md §5: PTCR/LPCR writes do
not stick), so the walk is specified by worked cases computed by hand from the rules in
spec/arch_formats.md §4 (QEMU 5's ``mmu-radix64.c``): physical addresses for 4K, 2M and
1G leaves, the V/NLS/L/EAA/PRIVILEGED checks, and the R/C write-back (R on every access,
R|C on a store). The syscall ABI is checked on a real Unicorn.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import (
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_READ,
    UC_MEM_WRITE,
    UC_PROT_ALL,
    UC_TLB_VIRTUAL,
    Uc,
)
from unicorn import ppc_const as P

from arch_plugins.ppc64 import PGD, PMD, PTE, PUD, Ppc64
from emu.arch import (
    MIGRATION_TYPES,
    NONE_ENTRY,
    Access,
    Entry,
    Fault,
    FaultKind,
    Kind,
    ReadEntry,
    Translation,
    UpdateEntry,
    leaf_entry,
    run_walk,
    swap_entry,
    table_entry,
)

ARCH = Ppc64()
FAST = settings(max_examples=150, deadline=None)
ALL_PROTS = [Access(p) for p in range(8)]
GiB, MiB = 1 << 30, 1 << 20
V, L = 1 << 63, 1 << 62
R, C = 0x100, 0x080
PRIVILEGED = 0x008


# -- geometry -----------------------------------------------------------------------------------

def test_levels_are_13_9_9_9_with_pud_and_pmd_leaves():
    assert [(lv.name, lv.shift, lv.index_bits, lv.leaf) for lv in ARCH.levels] == [
        ("pgd", 39, 13, False), ("pud", 30, 9, True), ("pmd", 21, 9, True), ("pte", 12, 9, True)]
    assert ARCH.leaf_sizes() == [GiB, 2 * MiB, 4096]
    assert [ARCH.table_alloc_bytes(lv) for lv in range(4)] == [65536, 4096, 4096, 4096]
    assert ARCH.task_size == 1 << 47


def test_entries_are_big_endian_and_empty_is_zero():
    assert ARCH.entry_format == ">Q"
    for level in range(4):
        assert ARCH.empty_value(level) == 0
        assert ARCH.decode(level, 0) == NONE_ENTRY


# -- encode/decode ------------------------------------------------------------------------------

def _leaves(level: int) -> st.SearchStrategy[Entry]:
    span = ARCH.levels[level].span
    frames = st.integers(0, (1 << 53) // span - 1).map(lambda n: n * span)
    user_and_prot = st.one_of(st.tuples(st.just(True), st.sampled_from(ALL_PROTS)),
                              st.tuples(st.just(False), st.sampled_from(ALL_PROTS[1:])))
    return st.builds(lambda paddr, up, **kw: leaf_entry(paddr, up[1], user=up[0], **kw), frames,
                     user_and_prot, young=st.booleans(), dirty=st.booleans(),
                     special=st.booleans(), soft_dirty=st.booleans())


_swaps = st.builds(swap_entry, st.integers(0, 31), st.integers(0, (1 << 41) - 1),
                   soft_dirty=st.booleans(), exclusive=st.booleans())


@FAST
@given(level=st.sampled_from([PUD, PMD, PTE]), data=st.data())
def test_leaf_round_trip(level, data):
    entry = data.draw(_leaves(level))
    value = ARCH.encode(level, entry)
    assert value & (V | L) == V | L
    assert ARCH.decode(level, value) == entry
    assert ARCH.encode(level, ARCH.decode(level, value)) == value


@FAST
@given(level=st.sampled_from([PGD, PUD, PMD]), base=st.integers(0, (1 << 48) - 1))
def test_directory_entry_is_v_nlb_and_the_next_levels_nls(level, base):
    entry = table_entry(base << 12)
    value = ARCH.encode(level, entry)
    assert value == V | base << 12 | 9
    assert ARCH.decode(level, value) == entry


@FAST
@given(level=st.sampled_from([PMD, PTE]), entry=_swaps)
def test_swap_and_migration_round_trip(level, entry):
    value = ARCH.encode(level, entry)
    assert value & (V | L) == L
    assert ARCH.decode(level, value) == entry
    assert entry.kind is (Kind.MIGRATION if entry.swp_type in MIGRATION_TYPES else Kind.SWAP)


def test_swap_layout_matches_swp_entry():
    assert ARCH.encode(PTE, swap_entry(5, 0x1234, soft_dirty=True, exclusive=True)) == (
        L | 0x1234 << 12 | 0x200 | 0x20 | 5)


def test_leaf_bits_are_eaa_r_c_and_software_bits():
    entry = leaf_entry(0x5000, Access.RWX, young=True, dirty=True, special=True, soft_dirty=True)
    assert ARCH.encode(PTE, entry) == V | L | 0x5000 | 0x400 | 0x200 | R | C | 0x4 | 0x2 | 0x1


def test_prot_none_is_privileged_without_eaa_bits():
    value = ARCH.encode(PTE, leaf_entry(0x5000, Access.NONE, young=True))
    assert value & 0xF == PRIVILEGED
    assert ARCH.decode(PTE, value) == leaf_entry(0x5000, Access.NONE, young=True)


def test_kernel_page_is_privileged():
    value = ARCH.encode(PTE, leaf_entry(0x5000, Access.RW, user=False))
    assert value & 0xF == PRIVILEGED | 0x4 | 0x2


@pytest.mark.parametrize("rc", [R, C, R | C])
def test_pte_none_tolerates_a_late_r_c_writeback(rc):
    assert ARCH.decode(PTE, rc) == NONE_ENTRY
    assert ARCH.decode(PMD, rc).kind is Kind.BAD


@FAST
@given(level=st.sampled_from([PGD, PUD, PMD]), base=st.integers(0, (1 << 48) - 1),
       bad=st.sampled_from([1 << 61, 0x80, 0x40, 0x20]))
def test_directory_entry_with_radix_bad_bits_is_bad(level, base, bad):
    # RADIX_*_BAD_BITS also holds L, but an entry with L set is a leaf (see below)
    assert ARCH.decode(level, V | base << 12 | 9 | bad).kind is Kind.BAD


@pytest.mark.parametrize("level, nls", [(PGD, 13), (PGD, 5), (PUD, 0), (PMD, 4), (PMD, 31)])
def test_directory_entry_with_wrong_nls_is_bad(level, nls):
    assert ARCH.decode(level, V | 0x20000 | nls).kind is Kind.BAD


def test_invalid_directory_entry_with_bits_is_bad():
    assert ARCH.decode(PMD, 0x20000 | 9).kind is Kind.BAD


def test_leaf_at_pgd_is_bad_to_linux():
    assert ARCH.decode(PGD, V | L | 0x8000000000 | 0x7).kind is Kind.BAD


def test_encoder_refuses_what_radix_cannot_hold():
    with pytest.raises(ValueError):
        ARCH.encode(PGD, leaf_entry(0, Access.R))
    with pytest.raises(ValueError):
        ARCH.encode(PUD, swap_entry(1, 2))
    with pytest.raises(ValueError):
        ARCH.encode(PMD, leaf_entry(0x1000, Access.R))            # not 2M aligned
    with pytest.raises(ValueError):
        ARCH.encode(PTE, leaf_entry(0x1000, Access.R, uffd_wp=True))
    with pytest.raises(ValueError):
        ARCH.encode(PTE, Entry(Kind.BAD))


def test_root_register_is_the_process_table_entry_for_a_52_bit_tree():
    prte = ARCH.root_register(0x1000000)
    # RTS = 52 - 31 = 21 = 0b10_101: 0b10 in bits 62:61, 0b101 in bits 7:5; RPDS = 13
    assert prte == 2 << 61 | 0x1000000 | 5 << 5 | 13
    assert ARCH.root_table(prte) == 0x1000000


# -- hardware walk: worked cases ------------------------------------------------------------------
# EA 0x7fff_1234_5678: PGD index 0xff, PUD index 0x1fc, PMD index 0x91, PTE index 0x145
EA = 0x7FFF12345678
PGD_T, PUD_T, PMD_T, PTE_T = 0x1000000, 0x1010000, 0x1011000, 0x1012000
PGDE, PUDE, PMDE, PTEE = PGD_T + 0xFF * 8, PUD_T + 0x1FC * 8, PMD_T + 0x91 * 8, PTE_T + 0x145 * 8
ROOT = ARCH.root_register(PGD_T)


def _tree(pgde: int | None = None, pude: int | None = None, pmde: int | None = None,
          ptee: int = 0) -> dict[int, int]:
    return {
        PGDE: ARCH.encode(PGD, table_entry(PUD_T)) if pgde is None else pgde,
        PUDE: ARCH.encode(PUD, table_entry(PMD_T)) if pude is None else pude,
        PMDE: ARCH.encode(PMD, table_entry(PTE_T)) if pmde is None else pmde,
        PTEE: ptee,
    }


class Driver:
    """Runs a walk over a dict of BE entry values, recording every step."""

    def __init__(self, mem: dict[int, int], fail_updates: int = 0) -> None:
        self.mem, self.steps, self.fail_updates = mem, [], fail_updates

    def read(self, paddr: int) -> int:
        self.steps.append(ReadEntry(paddr, -1))
        return self.mem[paddr]

    def cmpxchg(self, paddr: int, old: int, new: int) -> bool:
        self.steps.append(UpdateEntry(paddr, -1, old, new))
        if self.fail_updates:                   # another CPU changed the entry meanwhile
            self.fail_updates -= 1
            return False
        assert self.mem[paddr] == old
        self.mem[paddr] = new
        return True

    def walk(self, va: int, access: Access, root: int = ROOT) -> Translation | Fault:
        return run_walk(ARCH.walk(root, va, access), self.read, self.cmpxchg)

    @property
    def updates(self) -> list[UpdateEntry]:
        return [s for s in self.steps if isinstance(s, UpdateEntry)]


def _young_dirty(paddr: int, prot: Access = Access.RWX) -> Entry:
    return leaf_entry(paddr, prot, young=True, dirty=True)


def test_4k_page_translates_through_four_levels():
    d = Driver(_tree(ptee=ARCH.encode(PTE, _young_dirty(0x777000))))
    assert d.walk(EA, Access.R) == Translation(0x777678, 4096, Access.RWX, PTE, PTEE)
    assert [s.paddr for s in d.steps] == [PGDE, PUDE, PMDE, PTEE]


def test_2m_pmd_leaf_keeps_21_offset_bits():
    d = Driver(_tree(pmde=ARCH.encode(PMD, _young_dirty(0x4600000))))
    assert d.walk(EA, Access.W) == Translation(0x4745678, 2 * MiB, Access.RWX, PMD, PMDE)


def test_1g_pud_leaf_keeps_30_offset_bits():
    d = Driver(_tree(pude=ARCH.encode(PUD, _young_dirty(0x40000000))))
    assert d.walk(EA, Access.X) == Translation(0x52345678, GiB, Access.RWX, PUD, PUDE)


@pytest.mark.parametrize("level", [PGD, PUD, PMD, PTE])
def test_entry_without_v_is_not_present_at_its_level(level):
    d = Driver(_tree(**{("pgde", "pude", "pmde", "ptee")[level]: 0}))
    assert d.walk(EA, Access.R) == Fault(FaultKind.NOT_PRESENT, level, EA, Access.R)


def test_swap_entry_is_not_present():
    d = Driver(_tree(ptee=ARCH.encode(PTE, swap_entry(3, 77))))
    assert d.walk(EA, Access.R).kind is FaultKind.NOT_PRESENT


@pytest.mark.parametrize("nls", [0, 4])
def test_nls_below_5_is_a_bad_radix_config(nls):
    d = Driver(_tree(pude=V | PMD_T | nls))
    assert d.walk(EA, Access.R) == Fault(FaultKind.RESERVED, PMD, EA, Access.R)
    assert Driver({}).walk(EA, Access.R, root=ROOT & ~0x1F | nls).kind is FaultKind.RESERVED


def test_nls_is_what_the_hardware_follows():
    # a PUD entry claiming a 2^10-entry PMD: the PMD index takes 10 EA bits (29:20)
    pmd_index = (EA >> 20) & 0x3FF
    mem = _tree(pude=V | PMD_T | 10, ptee=0)
    mem[PMD_T + pmd_index * 8] = ARCH.encode(PMD, leaf_entry(0, Access.R, young=True))
    assert Driver(mem).walk(EA, Access.R) == Translation(EA & 0xFFFFF, MiB, Access.R, PMD,
                                                         PMD_T + pmd_index * 8)


def test_directory_past_the_pte_level_is_a_bad_radix_config():
    d = Driver(_tree(ptee=V | 0x2000000 | 5))
    assert d.walk(EA, Access.R).kind is FaultKind.RESERVED


@pytest.mark.parametrize("va", [0xC000000000001000, 0x4000000000001000, 1 << 52, 1 << 60])
def test_ea_outside_quadrant_0_or_beyond_the_tree_is_a_segment_fault(va):
    assert Driver({}).walk(va, Access.R) == Fault(FaultKind.ADDRESS, PGD, va, Access.R)


@pytest.mark.parametrize("access", [Access.R, Access.W, Access.X])
def test_privileged_page_is_inaccessible_to_user_mode(access):
    for entry in (leaf_entry(0x7000, Access.NONE, young=True),
                  leaf_entry(0x7000, Access.RWX, user=False, young=True, dirty=True)):
        d = Driver(_tree(ptee=ARCH.encode(PTE, entry)))
        assert d.walk(EA, access) == Fault(FaultKind.PROTECTION, PTE, EA, access)
        assert d.updates == []                  # a refused access does not set R


@pytest.mark.parametrize("prot, allowed", [
    (Access.R, {Access.R}),
    (Access.W, {Access.R, Access.W}),           # EAA "read/write" grants both
    (Access.RW, {Access.R, Access.W}),
    (Access.X, {Access.X}),                     # exec-only pages exist on radix
    (Access.RX, {Access.R, Access.X}),
])
def test_eaa_bits_decide_each_access(prot, allowed):
    for access in (Access.R, Access.W, Access.X):
        d = Driver(_tree(ptee=ARCH.encode(PTE, _young_dirty(0x7000, prot))))
        result = d.walk(EA, access)
        assert isinstance(result, Translation) == (access in allowed), (prot, access)


def test_guarded_io_page_cannot_be_executed():
    d = Driver(_tree(ptee=ARCH.encode(PTE, _young_dirty(0x7000)) | 0x20))   # ATT = 10
    assert d.walk(EA, Access.X).kind is FaultKind.PROTECTION
    assert d.walk(EA, Access.R).perms == Access.RW


def test_read_sets_r_and_leaves_w_out_of_the_tlb_while_c_is_clear():
    old = ARCH.encode(PTE, leaf_entry(0x7000, Access.RW))
    d = Driver(_tree(ptee=old))
    assert d.walk(EA, Access.R).perms == Access.R
    assert d.updates == [UpdateEntry(PTEE, -1, old, old | R)]
    assert ARCH.decode(PTE, d.mem[PTEE]) == leaf_entry(0x7000, Access.RW, young=True)


def test_store_sets_r_and_c():
    old = ARCH.encode(PTE, leaf_entry(0x7000, Access.RW))
    d = Driver(_tree(ptee=old))
    assert d.walk(EA, Access.W).perms == Access.RW
    assert d.updates == [UpdateEntry(PTEE, -1, old, old | R | C)]
    assert ARCH.decode(PTE, d.mem[PTEE]) == _young_dirty(0x7000, Access.RW)


def test_young_dirty_entry_is_not_written_again():
    d = Driver(_tree(ptee=ARCH.encode(PTE, _young_dirty(0x7000, Access.RW))))
    assert d.walk(EA, Access.W).perms == Access.RW
    assert d.updates == []


def test_store_to_a_young_clean_page_sets_c():
    old = ARCH.encode(PTE, leaf_entry(0x7000, Access.RW, young=True))
    d = Driver(_tree(ptee=old))
    d.walk(EA, Access.W)
    assert d.updates == [UpdateEntry(PTEE, -1, old, old | C)]


def test_huge_leaves_get_r_and_c_too():
    old = ARCH.encode(PMD, leaf_entry(0x4600000, Access.RW))
    d = Driver(_tree(pmde=old))
    d.walk(EA, Access.W)
    assert d.updates == [UpdateEntry(PMDE, -1, old, old | R | C)]


def test_lost_r_c_race_walks_again_from_the_root():
    d = Driver(_tree(ptee=ARCH.encode(PTE, leaf_entry(0x7000, Access.RW))), fail_updates=1)
    assert isinstance(d.walk(EA, Access.R), Translation)
    assert [type(s).__name__ for s in d.steps] == ["ReadEntry"] * 4 + ["UpdateEntry"] + (
        ["ReadEntry"] * 4 + ["UpdateEntry"])


@FAST
@given(level=st.sampled_from([PUD, PMD, PTE]), access=st.sampled_from([Access.R, Access.W, Access.X]),
       data=st.data())
def test_walk_leaves_linux_view_young_and_dirty_exactly_as_accessed(level, access, data):
    entry = data.draw(_leaves(level).filter(lambda e: e.user))
    key = ("pgde", "pude", "pmde", "ptee")[level]
    d = Driver(_tree(**{key: ARCH.encode(level, entry)}))
    result = d.walk(EA, access)
    granted = Access.NONE if not entry.prot else (
        entry.prot | (Access.R if entry.prot & Access.W else Access.NONE))
    after = ARCH.decode(level, d.mem[(PGDE, PUDE, PMDE, PTEE)[level]])
    if access & granted:
        assert isinstance(result, Translation) and result.size == ARCH.levels[level].span
        assert after == entry.with_(young=True, dirty=entry.dirty or access is Access.W)
        assert bool(result.perms & Access.W) == bool(granted & Access.W and after.dirty)
    else:
        assert result == Fault(FaultKind.PROTECTION, level, EA, access)
        assert after == entry


def test_walk_steps_carry_the_level_they_read():
    walker = ARCH.walk(ROOT, EA, Access.R)
    mem = _tree(ptee=ARCH.encode(PTE, _young_dirty(0x7000)))
    levels, step = [], next(walker)
    with pytest.raises(StopIteration):
        while True:
            levels.append(step.level)
            step = walker.send(mem[step.paddr])
    assert levels == [PGD, PUD, PMD, PTE]


# -- CPU and syscall ABI on a real Unicorn --------------------------------------------------------
# li r0,20 ; sc ; mfcr r5 ; trap
SC_CODE = bytes.fromhex("38000014" "44000002" "7ca00026" "7fe00008")
CR0_SO = 0x10000000                             # SO of field CR0 in the 32-bit CR


def _cpu() -> Uc:
    uc = Uc(ARCH.uc_arch, ARCH.uc_mode)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)         # the only mode ppc64 runs in (spec/unicorn.md)
    uc.mem_map(0, 1 << 20)

    def identity(uc, va, access, entry, _):
        entry.paddr, entry.perms = va & ~0xFFF, UC_PROT_ALL
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, identity)
    ARCH.cpu_setup(uc)
    return uc


def test_cpu_setup_keeps_64bit_mode_and_enables_fp_vsx_vmx():
    msr = _cpu().reg_read(P.UC_PPC_REG_MSR)
    assert msr & (1 << 63 | 1 << 25 | 1 << 23 | 1 << 13) == 1 << 63 | 1 << 25 | 1 << 23 | 1 << 13


@pytest.mark.parametrize("result, r3, so", [
    (-2, 2, True), (-4095, 4095, True), (-4096, (1 << 64) - 4096, False), (0x1234, 0x1234, False),
    (0, 0, False)])
def test_syscall_errors_are_positive_errno_with_cr0_so(result, r3, so):
    uc = _cpu()
    uc.mem_write(0x1000, SC_CODE)
    uc.reg_write(P.UC_PPC_REG_CR, CR0_SO if not so else 0)   # SO must be cleared/set, not kept
    seen = []

    def on_sc(uc, intno, _):
        assert intno == ARCH.syscall_abi.intno
        seen.append((uc.reg_read(ARCH.pc_reg), ARCH.syscall_args(uc, lambda va, n: b"")))
        ARCH.set_syscall_result(uc, result)

    uc.hook_add(UC_HOOK_INTR, on_sc)
    for reg, value in zip(ARCH.syscall_abi.arg_regs, range(10, 16), strict=True):
        uc.reg_write(reg, value)
    uc.emu_start(0x1000, 0x100C, count=10)
    assert seen == [(0x1008, (20, [10, 11, 12, 13, 14, 15]))]     # PC already past sc
    assert uc.reg_read(P.UC_PPC_REG_3) == r3
    assert bool(uc.reg_read(P.UC_PPC_REG_5) & CR0_SO) == so       # what the guest's mfcr saw


def test_start_registers_follow_elfv2():
    uc = _cpu()
    ARCH.start_registers(uc, 0x10000100, 0x7FFFFFF0)
    assert (uc.reg_read(P.UC_PPC_REG_12), uc.reg_read(P.UC_PPC_REG_1)) == (0x10000100, 0x7FFFFFF0)


def test_abi_facts():
    abi = ARCH.syscall_abi
    assert (abi.trap, abi.intno, abi.pc_advance, abi.old_mmap) == ("intr", 8, 0, False)
    assert (abi.numbers["mmap"], abi.numbers["exit_group"], abi.numbers["madvise"]) == (90, 234, 205)
    assert ARCH.sentinel_code()[:4] == bytes.fromhex("7fe00008")
    assert ARCH.elf_machine == "EM_PPC64" and ARCH.timing.flush == "broadcast"


# -- the walk driving Unicorn's virtual TLB -------------------------------------------------------
# ld r5,16(r4) ; addi r5,r5,1 ; std r5,24(r6) ; trap
LOAD_ADD_STORE = bytes.fromhex("e8a40010" "38a50001" "f8a60018" "7fe00008")
ACCESS_OF = {UC_MEM_READ: Access.R, UC_MEM_WRITE: Access.W, UC_MEM_FETCH: Access.X}


def test_walk_serves_unicorn_tlb_fills_and_sets_r_c_on_real_accesses():
    """Tables built with the encoder in guest RAM; every Unicorn TLB fill is answered by
    the plugin's walk (reads and R/C write-backs on the big-endian entries)."""
    uc = Uc(ARCH.uc_arch, ARCH.uc_mode)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.mem_map(0, 32 << 20)
    ARCH.cpu_setup(uc)

    def read(pa: int) -> int:
        return struct.unpack(">Q", uc.mem_read(pa, 8))[0]

    def cmpxchg(pa: int, old: int, new: int) -> bool:
        if read(pa) != old:
            return False
        uc.mem_write(pa, struct.pack(">Q", new))
        return True

    pgd, pud, pmd, pt = 0x100000, 0x110000, 0x111000, 0x112000
    code_va, load_va, store_va = 0x10000000, 0x10001000, 0x10002000
    for table, level, nxt in ((pgd, PGD, pud), (pud, PUD, pmd), (pmd, PMD, pt)):
        uc.mem_write(table + ARCH.levels[level].index(code_va) * 8,
                     struct.pack(">Q", ARCH.encode(level, table_entry(nxt))))
    ptes = {code_va: leaf_entry(0x400000, Access.RX), load_va: leaf_entry(0x401000, Access.R),
            store_va: leaf_entry(0x402000, Access.RW)}             # all old and clean
    for va, entry in ptes.items():
        uc.mem_write(pt + ARCH.levels[PTE].index(va) * 8, struct.pack(">Q", ARCH.encode(PTE, entry)))
    root = ARCH.root_register(pgd)

    def fill(uc, va, access, entry, _):
        result = run_walk(ARCH.walk(root, va, ACCESS_OF[access]), read, cmpxchg)
        if isinstance(result, Fault):
            return False
        entry.paddr, entry.perms = result.paddr & ~0xFFF, int(result.perms)
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    uc.mem_write(0x400000, LOAD_ADD_STORE)
    uc.mem_write(0x401010, struct.pack(">Q", 41))
    uc.reg_write(P.UC_PPC_REG_4, load_va)
    uc.reg_write(P.UC_PPC_REG_6, store_va)
    uc.emu_start(code_va, code_va + 12, count=3)
    assert struct.unpack(">Q", uc.mem_read(0x402018, 8))[0] == 42
    after = {va: ARCH.decode(PTE, read(pt + ARCH.levels[PTE].index(va) * 8)) for va in ptes}
    assert after[code_va] == ptes[code_va].with_(young=True)
    assert after[load_va] == ptes[load_va].with_(young=True)
    assert after[store_va] == ptes[store_va].with_(young=True, dirty=True)
