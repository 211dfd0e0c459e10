"""Built-in race scenarios for ``emu explore`` (spec/kernel_mm.md §6-7).

A scenario builds a small world with the Machine API and spawns the concurrent kernel
tasks; the explorer runs it under many schedules. Each world is built fresh for every
schedule. Every scenario also says which injectable bugs it is meant to catch; under the
6.6 rules with no injection it must run clean.

The world most of them share is the moment inside collapse_file() just before
retract_page_tables(): a shmem file whose page cache holds one PMD-order folio, mapped by
a process whose PTE table for that range is still there but already empty.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, madvise, pgtable, shmem, userfaultfd
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.page_alloc import PageUse
from mm_core.sanitizers import Finding

BASE = 0x40000000


@dataclass
class World:
    """What a scenario built, for its tasks, its checks and the teardown."""

    mms: list = field(default_factory=list)
    files: list = field(default_factory=list)
    addr: int = 0
    pmdp: int = 0
    inode: object = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    description: str
    build: Callable[[Scenario], World]
    catches: tuple[str, ...] = ()       # injectable bugs this scenario is meant to find
    mem: str = "8M"
    cpus: int = 1
    quantum: int = 20000
    max_steps: int = 20000
    prefault: bool = False          # guest programs want prefaulted RAM; kernel tasks don't


SCENARIOS: dict[str, ScenarioSpec] = {}

BUGS: dict[str, str] = {
    "retract_without_pte_free_defer":
        "retract_page_tables() frees the detached table at once (pte_free) instead of after "
        "an RCU grace period (pte_free_defer)",
    "pte_offset_map_without_rcu":
        "pte_offset_map() does not hold rcu_read_lock() until pte_unmap() (the 6.5 state)",
    "retract_without_mmap_lock":
        "retract_page_tables() without mmap_write_trylock under pre-6.6 rules: with "
        "--kernel 6.4 this is the lockless retraction the 6.5/6.6 series made safe",
    "collapse_pte_mapped_thp_without_uffd_fix":
        "collapse_pte_mapped_thp() drops the ptl between emptying the table and clearing "
        "the pmd (before a98460494b16): UFFDIO_COPY can put an anon pte in between",
    "walker_ignores_map_failure":
        "zap_pmd_range() ignores a failed pte_offset_map_lock() and walks its first "
        "snapshot of the pmd",
    "pte_offset_map_lock_without_recheck":
        "pte_offset_map_lock() takes the ptl but does not recheck pmd_same()",
    "retract_without_anon_vma_recheck":
        "retract_page_tables() checks vma->anon_vma only before taking pml and ptl, not again "
        "under them: a UFFDIO_COPY in between leaves an anon pte in the retracted table",
    "damon_endless_again":
        "DAMON's damon_mkold_pmd_entry() answers a failed pte_offset_map_lock() with "
        "ACTION_AGAIN (before the 2025 fix): endless on a pmd that stays a migration entry",
    "move_normal_pmd_without_recheck":
        "mremap's move_normal_pmd() trusts the pmd it read before taking the rmap locks "
        "(before Jann Horn's 2024 fix): a pmd retracted meanwhile is moved as pfn 0",
    "move_ptes_without_pmd_same":
        "move_ptes() under 6.13 writes into the table from pte_offset_map_rw_nolock() without "
        "the pmd_same() recheck Qi Zheng added (retract_page_tables() may free that table "
        "without mmap_lock); found by the walker-contract check, run with --kernel 6.13",
    "retract_without_exit_test":
        "retract_page_tables() without the khugepaged_test_exit() after mmap_write_trylock() "
        "(before 18e77600f7a1): under 5.10 it frees the table exit_mmap() is zapping without "
        "mmap_lock; run with --kernel 5.10",
}
# Bugs that only exist under another kernel profile than the default 6.6.
BUG_KERNELS = {"retract_without_mmap_lock": "6.4", "move_ptes_without_pmd_same": "6.13",
               "retract_without_exit_test": "5.10"}
PROFILE_BUGS = {"retract_without_mmap_lock": {"retract_without_mmap_lock": True}}


def scenario(name: str, description: str, catches: tuple[str, ...] = (), **settings):
    def register(build: Callable[[Scenario], World]) -> Callable[[Scenario], World]:
        SCENARIOS[name] = ScenarioSpec(name, description, build, catches, **settings)
        return build
    return register


# -- shared world --------------------------------------------------------------------------

def collapsed_shmem(sc: Scenario, private: bool = False, locked: bool = True, extra_pages: int = 0) -> World:
    """A PMD-order folio in a shmem file's page cache; the file mapped at BASE with an
    empty PTE table still in place (collapse_file() has unmapped the small pages). With
    ``locked`` the folio is still locked, as collapse_file() holds it across
    retract_page_tables(); ``collapse_file_tail`` unlocks it. ``extra_pages`` makes the
    file and the mapping that many pages longer than the collapsed PMD range."""
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("race", size + extra_pages * k.page_size)
    folio = k.alloc.alloc_pages(huge_memory.hpage_pmd_order(k), PageUse.SHMEM, owner=inode.mapping)
    for i in range(0, size, 8 << 10):                   # recognisable file data
        k.physmem.write(folio.paddr + i, (i // 4096 + 1).to_bytes(8, "little"))
    shmem.add_to_page_cache(inode.mapping, folio, 0)
    folio.locked = locked
    mm = m.new_mm()
    flags = (emu.MAP_PRIVATE if private else emu.MAP_SHARED) | emu.MAP_FIXED
    length = size + extra_pages * k.page_size
    addr = m.mmap(mm, BASE, length, emu.PROT_READ | emu.PROT_WRITE, flags, file=inode)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, addr, k.arch.pmd_level))
    run_sync(pgtable.pte_alloc(k, mm, pmdp))
    return World([mm], [inode], addr, pmdp, inode, {"folio": folio})


async def collapse_file_tail(k, w: World):
    """The end of collapse_file(): retract the page tables, then unlock the huge folio."""
    n = await khugepaged.retract_page_tables(k, w.inode.mapping, 0)
    shmem.folio_unlock(w.extra["folio"])
    return n


# -- tasks ---------------------------------------------------------------------------------

async def lockless_reader(k, mm, pmdp: int, addr: int, reads: int = 4):
    """A /proc/PID/pagemap-style walker: pte_offset_map() without the ptl, peek, unmap.
    Oracle: a table it mapped holds only empty entries (the file's pages are unmapped)."""
    await mmap_read_lock(mm)
    try:
        ptep = await pgtable.pte_offset_map(k, pmdp, addr)
        if ptep is None:
            return "no table"
        empty = k.arch.empty_value(k.arch.pte_level)
        for i in range(reads):
            value = await pgtable.get_raw(k, ptep + 8 * i)
            if value != empty:
                await pgtable.pte_unmap(k, ptep)
                raise Finding("ORACLE", f"ORACLE: lockless_reader saw {value:#x} in an empty table",
                              "ORACLE:lockless_reader", [f"  entry {i} at {ptep + 8 * i:#x}"])
        await pgtable.pte_unmap(k, ptep)
        return "read"
    finally:
        await mmap_read_unlock(mm)


async def locked_collapse(k, mm, addr: int):
    await mmap_read_lock(mm)
    try:
        return (await khugepaged.collapse_pte_mapped_thp(k, mm, addr, install_pmd=True)).value
    finally:
        await mmap_read_unlock(mm)


# -- scenarios ------------------------------------------------------------------------------

@scenario("retract-vs-reader",
          "retract_page_tables() detaches the PTE table a lockless walker (pagemap/smaps style) "
          "has mapped: spec §6 case 1",
          catches=("retract_without_pte_free_defer", "pte_offset_map_without_rcu",
                   "retract_without_mmap_lock"))
def retract_vs_reader(sc: Scenario) -> World:
    w = collapsed_shmem(sc)
    k = sc.kernel
    sc.task("reader", lockless_reader(k, w.mms[0], w.pmdp, w.addr))
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("retract-vs-zap",
          "MADV_DONTNEED's zap_pmd_range() racing retract_page_tables(): a failed map must "
          "send it back to the pmd (RETRY), not into the table it saw before",
          catches=("walker_ignores_map_failure",))
def retract_vs_zap(sc: Scenario) -> World:
    w = collapsed_shmem(sc)
    k = sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    sc.task("zap", madvise.madvise_dontneed(k, w.mms[0], w.addr, w.addr + size))
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("collapse-vs-uffdio-copy",
          "collapse_pte_mapped_thp() on a private shmem mapping racing UFFDIO_COPY into it: "
          "spec §6 case 8, the bug fixed by a98460494b16",
          catches=("collapse_pte_mapped_thp_without_uffd_fix",))
def collapse_vs_uffdio_copy(sc: Scenario) -> World:
    w = collapsed_shmem(sc, private=True, locked=False)   # the folio is in cache, collapsed
    k = sc.kernel
    sc.task("collapse", locked_collapse(k, w.mms[0], w.addr))
    sc.task("uffd", userfaultfd.mfill_atomic_copy(k, w.mms[0], w.addr + 3 * k.page_size, b"\x5a" * 64))
    return w


@scenario("retract-vs-refault",
          "retract_page_tables() then a refault that maps the huge folio by PMD, while a "
          "walker that saw the table maps it late: spec §6 cases 4 and 5",
          catches=("pte_offset_map_lock_without_recheck",))
def retract_vs_refault(sc: Scenario) -> World:
    w = collapsed_shmem(sc)
    k = sc.kernel
    mm = w.mms[0]

    async def late_locker():
        """Maps with pte_offset_map_lock() and writes a pte marker only if it got a table
        (a stand-in for any writer that trusts the lock it was given)."""
        await mmap_read_lock(mm)
        try:
            locked = await pgtable.pte_offset_map_lock(k, mm, w.pmdp, w.addr)
            if locked is None:
                return "no table"
            ptep, ptl = locked
            pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp))
            if pmd.kind is not Kind.TABLE or pmd.paddr != k.arch.levels[-1].table_base(ptep):
                await pgtable.pte_unmap_unlock(k, ptep, ptl)
                raise Finding("LOCKING", "LOCKING: pte_offset_map_lock() returned a table its pmd no "
                              "longer points to", "LOCKING:late_locker",
                              [f"  pmd now {pmd.kind.value}, mapped table {ptep:#x}"])
            await pgtable.pte_unmap_unlock(k, ptep, ptl)
            return "locked"
        finally:
            await mmap_read_unlock(mm)

    async def refault():
        from mm_core.memory import handle_mm_fault
        await mmap_read_lock(mm)
        try:
            return await handle_mm_fault(k, mm.vma_lookup(w.addr), w.addr, 0)
        finally:
            await mmap_read_unlock(mm)

    sc.task("walker", late_locker())
    sc.task("retract", collapse_file_tail(k, w))
    sc.task("refault", refault())
    return w


@scenario("mremap-vs-retract",
          "mremap moving a whole PTE table (move_normal_pmd) while retract_page_tables() "
          "clears the same pmd holding only i_mmap_lock_read: spec §6 case 7",
          catches=("move_normal_pmd_without_recheck",))
def mremap_vs_retract(sc: Scenario) -> World:
    from mm_core import mremap
    w = collapsed_shmem(sc)
    k = sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    sc.task("mremap", mremap.do_mremap(k, w.mms[0], w.addr, size, size,
                                       mremap.MREMAP_MAYMOVE | mremap.MREMAP_FIXED, w.addr + 8 * size))
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("guest-collapse-race",
          "the collapse_race guest program: two threads verify a shmem mapping while a third "
          "loops MADV_COLLAPSE and MADV_DONTNEED over it, on four vCPUs; every quantum, fault, "
          "syscall and table access is a scheduling point",
          mem="64M", cpus=4, quantum=2000, max_steps=2_000_000, prefault=True)
def guest_collapse_race(sc: Scenario) -> World:
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "workloads", "bin", sc.machine.arch.name, "collapse_race")
    proc = sc.machine.spawn(path, ["collapse_race", "2"])
    return World(extra={"proc": proc, "expect": b"mismatches 0\n"})


@scenario("damon-vs-thp-migration",
          "a DAMON aging walk (walk_page_range + damon_mkold_pmd_entry) over a THP whose pmd is "
          "a migration entry for as long as the walk runs: spec §6 case 6; the retry loop "
          "must end",
          catches=("damon_endless_again",))
def damon_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import damon
    from mm_core.sched_helpers import stalled_thp_migration
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    m.touch(mm, a, write=True)                                   # one THP
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("damon", damon.damon_va_mkold(k, mm, a, a + size))
    return World([mm], [], a, pmdp)


@scenario("retract-vs-uffdio-copy",
          "retract_page_tables() on a private shmem mapping while UFFDIO_COPY puts an anon page "
          "into it (anon_vma_prepare, then the pte): spec §6 case 9, the recheck under the locks",
          catches=("retract_without_anon_vma_recheck",))
def retract_vs_uffdio_copy(sc: Scenario) -> World:
    w = collapsed_shmem(sc, private=True)
    k = sc.kernel
    sc.task("retract", collapse_file_tail(k, w))
    sc.task("uffd", userfaultfd.mfill_atomic_copy(k, w.mms[0], w.addr + 5 * k.page_size, b"\xa5" * 64))
    return w


@scenario("mincore-vs-retract",
          "mincore()'s mincore_pte_range racing retract_page_tables(): a failed map is "
          "ACTION_AGAIN, the retracted pmd then a hole answered from the page cache")
def mincore_vs_retract(sc: Scenario) -> World:
    from mm_core import mincore
    w = collapsed_shmem(sc)
    k = sc.kernel
    size = huge_memory.hpage_pmd_size(k)

    async def check():
        vec = await mincore.do_mincore(k, w.mms[0], w.addr, size)
        if vec != [1] * (size // k.page_size):
            raise Finding("ORACLE", "ORACLE: mincore saw a cached shmem page as not resident",
                          "ORACLE:mincore", [f"  vec[:8] = {vec[:8]}"])
        return "ok"

    sc.task("mincore", check())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("mremap-move-ptes",
          "mremap moving four present anon ptes into another PTE table (move_ptes) while "
          "mincore() walks the destination; under 6.13 the new table comes from "
          "pte_offset_map_rw_nolock() and must be rechecked with pmd_same() under its ptl",
          catches=("move_ptes_without_pmd_same",))
def mremap_move_ptes(sc: Scenario) -> World:
    from mm_core import mincore, mremap
    from mm_core.memory import FAULT_FLAG_WRITE, handle_mm_fault
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    addr = m.mmap(mm, BASE, 64 * page, emu.PROT_READ | emu.PROT_WRITE,
                  emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(4):
        run_sync(handle_mm_fault(k, mm.vma_lookup(addr), addr + i * page, FAULT_FLAG_WRITE))
    dest = addr + huge_memory.hpage_pmd_size(k) + 32 * page      # another PTE table

    async def move():
        got = await mremap.do_mremap(k, mm, addr, 4 * page, 4 * page,
                                     mremap.MREMAP_MAYMOVE | mremap.MREMAP_FIXED, dest)
        return "moved" if got == dest else got

    async def check():
        return await mincore.do_mincore(k, mm, dest, 4 * page)

    sc.task("mremap", move())
    sc.task("mincore", check())
    return World([mm], [], addr)


@scenario("retract-vs-exit",
          "the last thread of a process exits (exit_mm, then exit_mmap as a kernel task) while "
          "collapse_file()'s retract_page_tables() retracts the empty PTE table of its shmem "
          "mapping, whose one page past the PMD range is mapped. Under 5.10 exit_mmap() "
          "zaps with no mmap_lock: only khugepaged_test_exit() after mmap_write_trylock() "
          "(18e77600f7a1) keeps the table from being freed under zap_pte_range()",
          catches=("retract_without_exit_test",))
def retract_vs_exit(sc: Scenario) -> World:
    from mm_core import memory
    w = collapsed_shmem(sc, extra_pages=1)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]
    m.touch(mm, w.addr + huge_memory.hpage_pmd_size(k), write=True)   # in the next PTE table
    sc.task("exit", memory.exit_mm(k, mm))
    sc.task("retract", collapse_file_tail(k, w))
    return w
