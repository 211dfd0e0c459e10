"""mremap moves page tables: whole tables (move_normal_pmd), huge leaves (move_huge_pmd)
and single PTEs (move_ptes), keeping the data and the counters."""
from __future__ import annotations

import pytest

import emu
from emu.arch import PAGE_SIZE, Kind
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, rmap

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
MAYMOVE, FIXED = 1, 2
BASE = 0x40000000


def fill(m, mm, addr: int, pages: int) -> None:
    for i in range(pages):
        pa = m.touch(mm, addr + i * PAGE_SIZE, write=True)
        m.physmem[pa:pa + 8] = (i + 1).to_bytes(8, "little")


def check(m, mm, addr: int, pages: int) -> None:
    for i in range(pages):
        pa = m.translate(mm, addr + i * PAGE_SIZE, "r")
        assert pa is not None and int.from_bytes(m.physmem[pa:pa + 8], "little") == i + 1


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_whole_table_moves_by_pmd(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M")
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    fill(m, mm, a, 32)
    old_pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    old_table = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(old_pmdp)).paddr
    b = m.mremap(mm, a, size, size, MAYMOVE | FIXED, BASE + 16 * size)
    assert b == BASE + 16 * size and k.stats["move_normal_pmd"] == 1
    new_pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(run_sync(rmap.walk_to_pmd(k, mm, b))))
    assert new_pmd.kind is Kind.TABLE and new_pmd.paddr == old_table       # the same table, moved
    check(m, mm, b, 32)
    assert m.translate(mm, a, "r") is None and mm.rss[1] == 32
    m.exit_mm(mm)


def test_unaligned_move_copies_ptes_and_growing_moves_when_blocked() -> None:
    m = emu.Machine(arch="s390x", mem="32M")
    mm = m.new_mm()
    a = m.mmap(mm, BASE + 3 * PAGE_SIZE, 8 * PAGE_SIZE, RW, ANON)
    m.mmap(mm, a + 8 * PAGE_SIZE, PAGE_SIZE, RW, ANON)              # blocks growing in place
    fill(m, mm, a, 8)
    b = m.mremap(mm, a, 8 * PAGE_SIZE, 12 * PAGE_SIZE, MAYMOVE)
    assert b != a and m.kernel.stats["move_normal_pmd"] == 0
    check(m, mm, b, 8)
    m.touch(mm, b + 11 * PAGE_SIZE, write=True)                     # the grown part is mapped
    assert m.mremap(mm, b, 12 * PAGE_SIZE, 4 * PAGE_SIZE, 0) == b   # shrink in place
    assert m.translate(mm, b + 5 * PAGE_SIZE, "r") is None
    m.mmap(mm, b + 4 * PAGE_SIZE, PAGE_SIZE, RW, ANON)
    with pytest.raises(OSError) as err:
        m.mremap(mm, b, 4 * PAGE_SIZE, 64 * PAGE_SIZE, 0)            # can't grow, may not move
    assert err.value.errno == 12
    m.exit_mm(mm)


def test_thp_moves_as_one_pmd() -> None:
    m = emu.Machine(arch="arm64", mem="32M")
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, pa = anon_thp(m)
    m.physmem[pa] = 42
    b = m.mremap(mm, a, size, size, MAYMOVE | FIXED, BASE + 8 * size)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, b))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    assert m.physmem[m.translate(mm, b, "r")] == 42 and pmdp in k.deposits
    m.exit_mm(mm)
    m.rcu_barrier()
    assert k.alloc.pages.keys() == {k.zero_page.pfn}
