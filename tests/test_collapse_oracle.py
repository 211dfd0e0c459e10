"""Huge mappings installed by MADV_COLLAPSE, checked against Unicorn's own QEMU MMU.

The oracle Unicorn maps emu's guest RAM itself (mem_map_ptr on the same buffer), loads
the mm's root register, and translates every page of the collapsed range with
uc_vmem_translate (spec/arch_formats.md §5). x86-64 and arm64 only: Unicorn's s390x
ignores EDAT (no 1M leaves) and has no radix MMU for ppc64.
"""
from __future__ import annotations

import pytest
from test_arch_arm64 import TCR_EL1
from uc_oracle import tlb_flush, vmem_translate
from unicorn import (
    UC_ARCH_ARM64,
    UC_ARCH_X86,
    UC_MODE_64,
    UC_MODE_ARM,
    UC_PROT_ALL,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_CPU,
    Uc,
)
from unicorn import arm64_const as A
from unicorn import x86_const as X

import emu
from emu.arch import PAGE_SIZE, Kind
from emu.sched.loop import run_sync
from mm_core import huge_memory, rmap

BASE = 0x40000000


def oracle_for(m: emu.Machine, mm) -> Uc:
    if m.arch.name == "x86_64":
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_CPU)
        uc.mem_map_ptr(0, m.ram.size, UC_PROT_ALL, m.ram.address)
        uc.reg_write(X.UC_X86_REG_CR3, m.root_register(mm))
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 0x20)           # PAE
        uc.msr_write(0xC0000080, uc.msr_read(0xC0000080) | 0x100 | 0x800)              # LME, NXE
        uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 1 | 1 << 16 | 1 << 31)
        return uc
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    m.arch.cpu_setup(uc)
    uc.ctl_set_tlb_mode(UC_TLB_CPU)
    uc.mem_map_ptr(0, m.ram.size, UC_PROT_ALL, m.ram.address)
    uc.cpr_write(3, 6, 1, 1, 0, uc.cpr_read(3, 6, 1, 1, 0) | 1 << 10 | 1)     # SCR_EL3.RW|NS
    uc.cpr_write(3, 4, 1, 1, 0, uc.cpr_read(3, 4, 1, 1, 0) | 1 << 31)         # HCR_EL2.RW
    uc.reg_write(A.UC_ARM64_REG_MAIR_EL1, 0xFF)
    uc.cpr_write(3, 0, 2, 0, 2, TCR_EL1)
    uc.reg_write(A.UC_ARM64_REG_TTBR0_EL1, m.root_register(mm))
    uc.cpr_write(3, 0, 1, 0, 0, uc.cpr_read(3, 0, 1, 0, 0) | 1)               # SCTLR_EL1.M
    return uc


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
@pytest.mark.parametrize("kind", ["shmem", "anon"])
def test_collapsed_range_translates_like_qemu(arch: str, kind: str) -> None:
    m = emu.Machine(arch=arch, mem="32M")
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    rw = emu.PROT_READ | emu.PROT_WRITE
    if kind == "shmem":
        inode = m.memfd_create("o", size)
        a = m.mmap(mm, BASE, size, rw, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    else:
        a = m.mmap(mm, BASE, size, rw, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for off in range(0, size, PAGE_SIZE):
        m.touch(mm, a + off, write=True)
    m.madvise(mm, a, size, emu.MADV_COLLAPSE)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    uc = oracle_for(m, mm)
    tlb_flush(uc)
    for off in range(0, size, 17 * PAGE_SIZE + 8):
        for letter, prot in (("r", UC_PROT_READ), ("w", UC_PROT_WRITE)):
            mine = m.translate(mm, a + off, letter)
            assert mine is not None or letter == "w"     # a clean arm64 block is DBM|RDONLY
            assert vmem_translate(uc, a + off, prot) == mine
    assert vmem_translate(uc, a + size, UC_PROT_READ) is None
