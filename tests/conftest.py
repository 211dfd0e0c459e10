"""Shared fixtures: the four built-in arches, the committed guest workloads, and the
world most race tests start from."""
from __future__ import annotations

import os

import pytest

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, pgtable, rmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000


def workload(arch: str, name: str) -> str:
    path = os.path.join(ROOT, "workloads", "bin", arch, name)
    if not os.path.exists(path):
        pytest.fail(f"missing workload ELF {path} (run `make guests`)")
    return path


def expected(name: str) -> tuple[bytes, int]:
    base = os.path.join(ROOT, "workloads", "expected", name)
    with open(base + ".out", "rb") as f:
        out = f.read()
    with open(base + ".rc") as f:
        rc = int(f.read().strip())
    return out, rc


@pytest.fixture(params=ARCHES)
def arch(request) -> str:
    return request.param


def pte_of(mk, mm, va: int, raw: bool = False, pmd: bool = False):
    """The pte mapping ``va`` in ``mm``, read from the bytes in guest RAM (not through
    mm_core's accessors) and decoded by the arch (``raw``: the 8-byte value). ``mk`` is a
    Machine or its Kernel. Where no PTE table covers ``va``: None, or with ``pmd`` the
    decoded pmd (a huge leaf, a migration entry, none)."""
    k = getattr(mk, "kernel", mk)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    if pmdp is None:
        return None
    pmdval = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    if pmdval.kind is not Kind.TABLE:
        return pmdval if pmd else None
    value = k.physmem.read_entry(pgtable.entry_addr(k, pmdval.paddr, k.arch.pte_level, va))
    return value if raw else k.arch.decode(k.arch.pte_level, value)


def collapsed_world(arch: str, kernel: str = "6.6", mem: str = "64M", prefault: bool = True, **changes):
    """A shmem file mapped shared at BASE, every page touched, then collapsed in the page
    cache up to (not including) retract_page_tables(): its PTE table is still there.
    Returns (scenario, machine, kernel, mm, inode, addr, pmdp, the PTE table)."""
    sc = Scenario(arch=arch, kernel=kernel, mem=mem, prefault=prefault, **changes)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("race", size)
    mm = m.new_mm()
    addr = m.mmap(mm, BASE, size, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for off in range(0, size, k.page_size):
        m.touch(mm, addr + off, write=True)
    assert run_sync(khugepaged.collapse_file(k, inode, 0, is_khugepaged=True, retract=False)) \
        is khugepaged.Scan.SUCCEED
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, addr))
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr]
    return sc, m, k, mm, inode, addr, pmdp, table


def finish(m, *mms, files=()) -> None:
    """Nothing leaks: every mm exits (check_mm), the files go, and after rcu_barrier no
    page table and no page but the zero page is left."""
    k = m.kernel
    for mm in mms:
        m.exit_mm(mm)
    for f in files:
        m.close_file(f)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.deferred_tables() == []
    assert k.alloc.pages.keys() == {k.zero_page.pfn}
