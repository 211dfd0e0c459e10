"""NUMA hinting (mm_core/mempolicy.py + memory.do_numa_page): change_prot_numa() makes
present ptes PAGE_NONE in the arch's real PROT_NONE encoding, the next access takes a
hinting fault and do_numa_page() restores the protection in place (one node: nothing
migrates); its failure category (a pte changed between handle_pte_fault()'s lockless
read and spin_lock(vmf->ptl): pte_same() fails, return 0, FAULT-RETRY) forced by
schedules."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from mm_core import madvise, memory

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED




def finish(m, *mms, files=()) -> None:
    k = m.kernel
    for mm in mms:
        mm.users = 1
        m.exit_mm(mm)
    for f in files:
        m.close_file(f)
    m.rcu_barrier()
    assert k.ptdescs == {} and k.alloc.pages.keys() == {k.zero_page.pfn}


@pytest.mark.parametrize("arch", ARCHES)
def test_hinting_fault_restores_the_protection_in_place(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    mm.users = 2                                               # a second thread: target_node unset
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    frames = [m.touch(mm, a + i * page, write=True) for i in range(4)]
    m.physmem[frames[1]:frames[1] + 4] = b"numa"
    assert m.numa_scan(mm) == 4
    for i in range(4):                                         # PAGE_NONE, read back from the bytes
        pte = pte_of(m, mm, a + i * page)
        assert pte.kind is Kind.LEAF and pte.prot == Access.NONE and pte.paddr == frames[i]
        assert pte.dirty
        assert m.translate(mm, a + i * page, "r") is None
    assert m.numa_scan(mm) == 0                                # already protnone: skipped
    assert m.touch(mm, a + page) == frames[1]                  # a read: no migration, same frame
    assert k.stats["numa_hint_faults"] == 1
    pte = pte_of(m, mm, a + page)
    assert pte.prot & Access.RW == Access.RW and pte.young      # exclusive anon: writable again
    assert m.read_user(mm, a + page, 4) == b"numa"
    assert m.translate(mm, a + 2 * page, "r") is None          # the others still wait for theirs
    wp = k.stats["wp_copy"] + k.stats["wp_reuse"]
    m.touch(mm, a + 2 * page, write=True)                      # a write: hinting fault, no COW
    assert k.stats["numa_hint_faults"] == 2 and k.stats["wp_copy"] + k.stats["wp_reuse"] == wp
    assert m.translate(mm, a + 2 * page, "w") == frames[2]
    finish(m, mm)


def test_what_change_prot_numa_leaves_alone() -> None:
    """A single-threaded private mapping (its pages are on its node), COW-shared pages,
    PROT_NONE and read-only file VMAs are not scanned; a shared mapping is."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("numa", 4 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    m.touch(mm, a, write=True)
    assert m.numa_scan(mm) == 0                                 # target_node == page's node
    mm.users = 2
    child = m.fork_mm(mm)                                       # the anon page is COW-shared now
    assert m.numa_scan(mm) == 0
    s = m.mmap(mm, BASE + (4 << 20), 2 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    r = m.mmap(mm, BASE + (8 << 20), 2 * page, emu.PROT_READ, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    n = m.mmap(mm, BASE + (12 << 20), page, RW, ANON)
    m.touch(mm, s, write=True)
    m.touch(mm, r)
    m.touch(mm, n, write=True)
    m.mprotect(mm, n, page, emu.PROT_NONE)
    assert m.numa_scan(mm) == 1                                  # only the shared writable page
    assert pte_of(m, mm, s).prot == Access.NONE and pte_of(m, mm, r).prot & Access.R
    assert m.touch(mm, s) == m.translate(mm, r)                 # hinting fault, same shmem page
    finish(m, mm, child, files=[inode])


# -- the failure category, forced ------------------------------------------------------------------

def numa_world(arch: str):
    sc = Scenario(arch=arch, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    mm.users = 2
    a = m.mmap(mm, BASE, 2 * k.page_size, RW, ANON)
    frame = m.touch(mm, a, write=True)
    m.physmem[frame:frame + 4] = b"data"
    assert m.numa_scan(mm) == 1
    return sc, m, k, mm, a, frame


ORIG_PTE_READ = 4       # pt_reads after the upper levels: fault's pmd, handle_pte_fault's pmd,
                        # the map's pmd, orig_pte


@pytest.mark.parametrize("arch", ARCHES)
def test_two_hinting_faults_on_one_pte_the_second_retries(arch: str) -> None:
    """Two threads fault on the same PAGE_NONE pte: the first restores it; the second read
    orig_pte before that, so its pte_same() under the ptl fails: return 0 (FAULT-RETRY),
    nothing written; its access then simply succeeds."""
    sc, m, k, mm, a, frame = numa_world(arch)
    for name in ("t1", "t2"):
        sc.task(name, memory.do_user_addr_fault(k, mm, a, Access.R))
    sc.run(f"t1:pt_read#{k.arch.pmd_level + ORIG_PTE_READ} t2:* t1:*")
    assert sc.results == {"t1": memory.FaultResult.OK, "t2": memory.FaultResult.OK}
    assert k.stats["numa_hint_faults"] == 1 and k.stats["numa_fault_pte_changed"] == 1
    assert m.translate(mm, a, "r") == frame and pte_of(m, mm, a).prot & Access.R
    assert k.rcu.readers == {} and k.san.pte_maps == {}
    finish(m, mm)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_zap_between_the_read_and_the_lock_is_a_fault_retry(arch: str) -> None:
    """MADV_DONTNEED (mmap_read_lock too) zaps the PAGE_NONE pte after the fault read it:
    do_numa_page()'s pte_same() fails, return 0, and the refault finds a none pte: a fresh
    zero-filled page, not the old data and not a resurrected pte."""
    sc, m, k, mm, a, frame = numa_world(arch)
    sc.task("fault", memory.do_user_addr_fault(k, mm, a, Access.R))
    sc.task("zap", madvise.do_madvise(k, mm, a, k.page_size, emu.MADV_DONTNEED))
    sc.run(f"fault:pt_read#{k.arch.pmd_level + ORIG_PTE_READ} zap:* fault:*")
    assert sc.results == {"fault": memory.FaultResult.OK, "zap": 0}
    assert k.stats["numa_fault_pte_changed"] == 1 and k.stats["numa_hint_faults"] == 0
    assert pte_of(m, mm, a).kind is Kind.NONE
    assert m.read_user(mm, a, 4) == b""                          # nothing mapped
    m.touch(mm, a)
    assert m.read_user(mm, a, 4) == b"\0" * 4                    # the zero page
    finish(m, mm)
