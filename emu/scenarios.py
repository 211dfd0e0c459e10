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

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.sched import traps
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, madvise, pgtable, shmem, swap_state, userfaultfd
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
    "proc_walker_misses_migration_pmd":
        "the /proc walkers (smaps, pagemap, clear_refs, PAGEMAP_SCAN) test only pmd_trans_huge() "
        "before pte_offset_map_lock(), not is_swap_pmd(): a migration pmd fails the map and "
        "ACTION_AGAIN repeats for as long as the migration lasts (a what-if: 6.6 takes it "
        "under pmd_trans_huge_lock())",
    "damon_endless_again":
        "DAMON's damon_mkold_pmd_entry() answers a failed pte_offset_map_lock() with "
        "ACTION_AGAIN (before the 2025 fix): endless on a pmd that stays a migration entry",
    "move_normal_pmd_without_recheck":
        "mremap's move_normal_pmd() trusts the pmd it read before taking the rmap locks "
        "(before Jann Horn's 2024 fix): a pmd retracted meanwhile is moved as pfn 0",
    "pte_lockptr_from_live_pmd":
        "pte_offset_map_lock() and pte_offset_map_nolock() derive the ptl from the live pmd "
        "read again after the map (the pre-6.5 pte_lockptr(mm, pmd)) instead of from the "
        "snapshot they validated: after a retraction that is pfn 0's or a THP head's \"lock\"",
    "move_ptes_without_pmd_same":
        "move_ptes() under 6.13 writes into the table from pte_offset_map_rw_nolock() without "
        "the pmd_same() recheck Qi Zheng added (retract_page_tables() may free that table "
        "without mmap_lock); found by the walker-contract check, run with --kernel 6.13",
    "fork_copies_file_vma_without_anon_vma":
        "fork's vma_needs_copy() without its anon_vma test: the page tables of a shared file "
        "VMA are copied, so copy_pte_range() is no longer kept apart from retract_page_tables() "
        "(which skips only VMAs with an anon_vma) and its pte_alloc_map_lock() of the child's "
        "fresh table can fail: a spurious -ENOMEM from fork",
    "move_pages_pte_unmaps_stack_copy":
        "UFFDIO_MOVE's move_pages_pte() ends its maps with pte_unmap(&orig_src_pte) and "
        "pte_unmap(&orig_dst_pte), the stack copies, before sleeping on a contended folio lock "
        "(before 927e926d72d9, 2025): the kmap_local slots leak under HIGHPTE; run with --kernel 6.13",
    "move_pages_pte_unmaps_in_map_order":
        "move_pages_pte() unmaps dst_pte before src_pte at its exit although it mapped dst first "
        "(before \"mm/userfaultfd: fix kmap_local LIFO ordering for CONFIG_HIGHPTE\", 2025): "
        "kunmap_local() out of LIFO order; run with --kernel 6.13",
    "move_pages_pte_without_dst_pmd_recheck":
        "move_pages_pte() under 6.14 (PT_RECLAIM) trusts pte_same() of its none dst pte and "
        "does not recheck pmd_same() of dst (before \"mm: userfaultfd: recheck dst_pmd entry in "
        "move_pages_pte()\"): the page is moved into a table MADV_DONTNEED just freed; run "
        "with --kernel 6.14",
    "gup_fast_maps_live_pmd":
        "GUP-fast's gup_pte_range() maps the PTE table through the live pmd with no validation "
        "(pmd_page(*pmdp), the pre-6.5 pte_offset_map()) instead of pte_offset_map(&pmd) on the "
        "stack copy it checked: after a retraction it dereferences pmd_page() of a none (pfn 0) "
        "or huge pmd (spec §6 case 15)",
    "gup_fast_without_pmd_recheck":
        "gup_pte_range() rechecks only the pte after taking the page, not the pmd (before "
        "70cbc3cc78a9, 2022): collapse_huge_page() has cleared the pmd and passed its refcount "
        "check, and GUP-fast pins a page from the detached table that the collapse then replaces",
    "retract_without_uffd_wp_recheck":
        "retract_page_tables() checks userfaultfd_wp(vma) only before taking pml and ptl, not "
        "again under them: a UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT in between puts uffd-wp "
        "markers in the table it then retracts, and the protection is gone",
    "handle_userfault_checks_before_queueing":
        "handle_userfault() runs userfaultfd_must_wait() before putting the task on "
        "fault_pending_wqh instead of after: a UFFDIO_COPY in between installs the page and "
        "finds nobody to wake (waitqueue_active() is false), the fault then sleeps forever",
    "lru_gen_walk_without_rcu":
        "MGLRU's walk_mm() without the rcu_read_lock() of mem_cgroup_trylock_pages() (gone "
        "with \"mm: memcg: no need for memcg locking for MGLRU\", the 6.13 profile's state): "
        "walk_pte_range() maps walk_pmd_range()'s stack copy of a pmd whose table was "
        "retracted and freed after the read",
    "retract_without_exit_test":
        "retract_page_tables() without the khugepaged_test_exit() after mmap_write_trylock() "
        "(before 18e77600f7a1): under 5.10 it frees the table exit_mmap() is zapping without "
        "mmap_lock; run with --kernel 5.10",
    "free_swap_and_cache_without_get_swap_device":
        "free_swap_and_cache() without get_swap_device()/put_swap_device() around its work "
        "(before 82b1c07a0af6, 6.9, \"mm: swap: fix race between free_swap_and_cache() and "
        "swapoff()\"): once it drops the count, swapoff can free the cache-only slot, finish "
        "and free swap_map under it",
    "do_swap_page_without_pte_same":
        "do_swap_page() maps the swap-cache folio under the ptl without the pte_same() recheck "
        "against the swap pte it read locklessly: a second faulter maps the page again over "
        "the first's mapping (rss counted twice, the swap count dropped twice)",
    "hmm_driver_skips_read_retry":
        "a mirroring driver (lib/test_hmm.c's dmirror_range_fault()) programs its device page "
        "table from hmm_range_fault()'s pfns without checking mmu_interval_read_retry() under "
        "the mutex its invalidate callback takes: an unmap / retract that ran after the walk "
        "leaves the device mapping pages the CPU no longer maps there",
    "change_pte_range_ignores_map_failure":
        "mprotect's change_pte_range() has no failure path for pte_offset_map_lock() (instead of "
        "-EAGAIN -> RETRY): it goes on into the PTE table its pmd named, a table "
        "retract_page_tables() detached and may have freed",
    "mlock_pte_range_ignores_map_failure":
        "mlock_pte_range() ignores a failed pte_offset_map_lock() (instead of ACTION_AGAIN) and "
        "walks the table its pmd read named, detached and perhaps freed by retract_page_tables()",
    "madvise_cold_uses_stale_pmd":
        "madvise_cold_or_pageout_pte_range() answers a failed pte_offset_map_lock() by walking "
        "the table of the pmd it read first (instead of SKIP), without rcu_read_lock or ptl",
    "gather_pte_stats_ignores_map_failure":
        "numa_maps' gather_pte_stats() ignores a failed pte_offset_map_lock() (instead of "
        "ACTION_AGAIN) and reads the table its pmd read named, after retract_page_tables() freed it",
    "change_huge_pmd_keeps_writable_migration_entry":
        "mprotect's change_huge_pmd() leaves a writable THP migration entry as it is (without "
        "its \"be safe and disable write\" branch): remove_migration_pmd() then maps the THP "
        "writable again after mprotect(PROT_READ) returned",
    "hwpoison_pte_range_ignores_map_failure":
        "memory-failure's hwpoison_pte_range() goes on into the table its pmd read named after "
        "a failed pte_offset_map_lock() (instead of SKIP, goto out) while kill_accessing_process() "
        "looks for the poisoned pfn",
}
# Bugs that only exist under another kernel profile than the default 6.6.
BUG_KERNELS = {"retract_without_mmap_lock": "6.4", "move_ptes_without_pmd_same": "6.13",
               "move_pages_pte_unmaps_stack_copy": "6.13", "move_pages_pte_unmaps_in_map_order": "6.13",
               "move_pages_pte_without_dst_pmd_recheck": "6.14", "retract_without_exit_test": "5.10"}
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
    k.physmem.write(folio.paddr, _file_data(size))
    shmem.add_to_page_cache(inode.mapping, folio, 0)
    folio.locked = locked
    mm = m.new_mm()
    flags = (emu.MAP_PRIVATE if private else emu.MAP_SHARED) | emu.MAP_FIXED
    length = size + extra_pages * k.page_size
    addr = m.mmap(mm, BASE, length, emu.PROT_READ | emu.PROT_WRITE, flags, file=inode)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, addr, k.arch.pmd_level))
    run_sync(pgtable.pte_alloc(k, mm, pmdp))
    return World([mm], [inode], addr, pmdp, inode, {"folio": folio})


@functools.cache
def _file_data(size: int) -> bytes:
    """Recognisable file contents: every 8K, the 4K-page number + 1 as a little-endian
    u64 (a THP misread as a page table shows up as small bogus entries)."""
    data = bytearray(size)
    for i in range(0, size, 8 << 10):
        data[i:i + 8] = (i // 4096 + 1).to_bytes(8, "little")
    return bytes(data)


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


async def madvise_collapse_tail(k, w: World):
    """The end of MADV_COLLAPSE on the shmem range: collapse_file() retracts the PTE table
    and unlocks the huge folio, then madvise_collapse() maps the folio in the caller's mm
    (collapse_pte_mapped_thp(install_pmd=true) under mmap_read_lock): the collapser itself
    takes the pmd TABLE -> NONE -> HUGE."""
    await collapse_file_tail(k, w)
    mm = w.mms[0]
    await mmap_read_lock(mm)
    try:
        return (await khugepaged.collapse_pte_mapped_thp(k, mm, w.addr, install_pmd=True)).value
    finally:
        await mmap_read_unlock(mm)


async def read_fault(k, w: World, addr: int):
    """A read fault on the file mapping under mmap_read_lock: do_read_fault() maps what
    the page cache has around it (filemap_map_pages() under pte_offset_map_lock()), then
    finish_fault() installs the pte, or the whole PMD-order folio by one PMD
    (do_set_pmd) once the pmd is none and the folio unlocked."""
    from mm_core.memory import handle_mm_fault
    mm = w.mms[0]
    await mmap_read_lock(mm)
    try:
        return await handle_mm_fault(k, mm.vma_lookup(addr), addr, 0)
    finally:
        await mmap_read_unlock(mm)


def huge_refault(k, w: World):
    """The refault at the start of the mapping that turns a retracted pmd huge: the
    TABLE -> NONE -> HUGE sequence of spec §6 case 5."""
    return read_fault(k, w, w.addr)


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

    sc.task("walker", late_locker())
    sc.task("retract", collapse_file_tail(k, w))
    sc.task("refault", huge_refault(k, w))
    return w


@scenario("stale-ptl-writer",
          "a read fault installing ptes under pte_offset_map_lock() (filemap_map_pages, "
          "finish_fault) racing MADV_COLLAPSE, which retracts the table and then maps the "
          "huge folio by PMD: the ptl must be the one of the table the map validated, not of "
          "whatever the pmd names when read again (pfn 0, the THP head): spec §6 case 2",
          catches=("pte_lockptr_from_live_pmd",))
def stale_ptl_writer(sc: Scenario) -> World:
    w = collapsed_shmem(sc)
    k = sc.kernel
    sc.task("collapse", madvise_collapse_tail(k, w))
    sc.task("writer", read_fault(k, w, w.addr + 7 * k.page_size))
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


def thp_under_migration(sc: Scenario):
    """An anonymous THP at BASE and a "migrate" task that turns its pmd into a migration
    entry for a long while (migrate_pages() copying the folio). Returns (mm, addr, pmdp)."""
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
    return mm, a, pmdp


@scenario("damon-vs-thp-migration",
          "a DAMON aging walk (walk_page_range + damon_mkold_pmd_entry) over a THP whose pmd is "
          "a migration entry for as long as the walk runs: spec §6 case 6; the retry loop "
          "must end",
          catches=("damon_endless_again",))
def damon_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import damon
    k = sc.kernel
    mm, a, pmdp = thp_under_migration(sc)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("damon", damon.damon_va_mkold(k, mm, a, a + size))
    return World([mm], [], a, pmdp)


@scenario("proc-walkers-vs-thp-migration",
          "/proc/PID/smaps, pagemap, clear_refs and the PAGEMAP_SCAN ioctl (fs/proc/task_mmu.c) "
          "walking a THP whose pmd is a migration entry for as long as they run: spec §7 asked "
          "whether they share DAMON's endless ACTION_AGAIN; pmd_trans_huge_lock() takes the "
          "migration pmd, so every walk must end",
          catches=("proc_walker_misses_migration_pmd",))
def proc_walkers_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import task_mmu
    k = sc.kernel
    mm, a, pmdp = thp_under_migration(sc)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("smaps", task_mmu.show_smaps(k, mm))
    sc.task("pagemap", task_mmu.pagemap_read(k, mm, (a >> 12) * 8, (size >> 12) * 8, True))
    sc.task("clear_refs", task_mmu.clear_refs_write(k, mm, task_mmu.CLEAR_REFS_ALL))
    sc.task("pagemap_scan", task_mmu.do_pagemap_scan(k, mm, task_mmu.PmScanArg(a, a + size, vec_len=8)))
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


@scenario("retract-vs-uffd-wp-register",
          "retract_page_tables() on a shared shmem mapping while userfaultfd registers it for WP "
          "(mmap_write_lock, which retract does not take) and UFFDIO_WRITEPROTECT puts uffd-wp "
          "markers in the empty table: spec §6 case 9, the userfaultfd_wp() recheck under the "
          "locks. Oracle: a write (FOLL_NOWAIT-style fault) to a protected page must reach the "
          "userfaultfd. Needs an arch with uffd-wp (x86_64; arm64 from --kernel 6.13)",
          catches=("retract_without_uffd_wp_recheck",))
def retract_vs_uffd_wp_register(sc: Scenario) -> World:
    from emu.sched import traps
    from mm_core.locks import Completion
    from mm_core.memory import (
        FAULT_FLAG_ALLOW_RETRY,
        FAULT_FLAG_RETRY_NOWAIT,
        FAULT_FLAG_USER,
        FAULT_FLAG_WRITE,
        VM_FAULT_RETRY,
        handle_mm_fault,
    )
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm, page = w.mms[0], k.page_size
    size = huge_memory.hpage_pmd_size(k)
    ctx = m.userfaultfd(mm)
    protected = w.addr + 4 * page
    retracted = Completion("retract done")

    async def retract():
        n = await collapse_file_tail(k, w)
        retracted.complete()
        return n

    async def register_and_protect():
        ret = await userfaultfd.userfaultfd_register(k, ctx, w.addr, size,
                                                     userfaultfd.UFFDIO_REGISTER_MODE_WP)
        if ret == -userfaultfd.EINVAL and not userfaultfd.have_arch_userfaultfd(k, "WP"):
            return "no uffd-wp on this arch/kernel"
        ret = await userfaultfd.userfaultfd_writeprotect(k, ctx, protected, 4 * page,
                                                         userfaultfd.UFFDIO_WRITEPROTECT_MODE_WP)
        if ret:
            raise Finding("ORACLE", f"ORACLE: UFFDIO_WRITEPROTECT failed with {ret}",
                          "ORACLE:uffdio_writeprotect")
        await traps.wait(retracted)
        # a write to a protected page: the first fault may map it (read-only, uffd-wp, from
        # the marker), the next must go to the userfaultfd (VM_FAULT_RETRY, not waiting)
        addr = protected + page
        flags = FAULT_FLAG_WRITE | FAULT_FLAG_USER | FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_RETRY_NOWAIT
        for _ in range(3):
            await mmap_read_lock(mm)
            try:
                ret = await handle_mm_fault(k, mm.vma_lookup(addr), addr, flags)
            finally:
                await mmap_read_unlock(mm)
            if ret & VM_FAULT_RETRY:
                return "protected"
            if m.translate(mm, addr, "w") is not None:
                pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp))
                raise Finding("ORACLE", "ORACLE: a write to a uffd-wp protected page did not reach the "
                              "userfaultfd", "ORACLE:uffd-wp-lost",
                              [f"  {addr:#x} is writable; pmd now {pmd.kind.value}: the table holding "
                               f"the uffd-wp markers of [{protected:#x}, +{4 * page:#x}) is gone",
                               f"  retracted tables: {k.stats['retracted_tables']}"])
        raise Finding("ORACLE", "ORACLE: a write to a uffd-wp protected page neither mapped nor "
                      "reached the userfaultfd", "ORACLE:uffd-wp-fault")

    sc.task("retract", retract())
    sc.task("uffd", register_and_protect())
    return w


@scenario("uffd-fault-vs-copy",
          "a write fault on a userfaultfd-registered (MISSING) anon page racing the monitor's "
          "UFFDIO_COPY of that page: the fault is queued on fault_pending_wqh before "
          "userfaultfd_must_wait() looks at the page tables, the copy changes them before "
          "wake_userfault() looks at the queue, so the fault either sees the page or is woken",
          catches=("handle_userfault_checks_before_queueing",))
def uffd_fault_vs_copy(sc: Scenario) -> World:
    from emu.arch import Access
    from mm_core.memory import FaultResult, do_user_addr_fault
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, userfaultfd.UFFDIO_REGISTER_MODE_MISSING)
    va = a + page
    data = b"uffdcopy" + va.to_bytes(8, "little")

    async def fault():
        ret = await do_user_addr_fault(k, mm, va, Access.W)
        seen = m.read_user(mm, va, len(data))
        if ret is not FaultResult.OK or seen != data:
            raise Finding("ORACLE", "ORACLE: the faulting task did not get the copied page",
                          "ORACLE:uffd-fault", [f"  fault {ret}, reads {seen!r}"])
        return "resolved"

    async def monitor():
        return await userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_COPY, va, page, 0, data)

    sc.task("fault", fault())
    sc.task("uffd", monitor())
    return World([mm], [], va)


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


LRU_GEN_EXTENTS = 2


@scenario("lru-gen-vs-retract",
          "MGLRU's aging walk (walk_pmd_range() -> walk_pte_range() on a stack copy of the pmd, "
          "pte_offset_map_nolock + spin_trylock, SKIP) racing retract_page_tables(): the copy may "
          "name a detached table, which 6.6 keeps alive by holding rcu_read_lock() across the walk",
          catches=("lru_gen_walk_without_rcu",))
def lru_gen_vs_retract(sc: Scenario) -> World:
    from mm_core import vmscan
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    nr = LRU_GEN_EXTENTS
    inode = m.memfd_create("race", nr * size)
    folios = []
    for i in range(nr):                  # collapsed_shmem() times nr: an empty table per extent
        folio = k.alloc.alloc_pages(huge_memory.hpage_pmd_order(k), PageUse.SHMEM, owner=inode.mapping)
        k.physmem.write(folio.paddr, _file_data(size))
        shmem.add_to_page_cache(inode.mapping, folio, i * (size // k.page_size))
        folio.locked = True
        folios.append(folio)
    mm = m.new_mm()
    addr = m.mmap(mm, BASE, nr * size, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_SHARED | emu.MAP_FIXED,
                  file=inode)
    for i in range(nr):
        pmdp = run_sync(pgtable.walk_alloc(k, mm, addr + i * size, k.arch.pmd_level))
        run_sync(pgtable.pte_alloc(k, mm, pmdp))
    w = World([mm], [inode], addr, pmdp, inode, {"folio": folios[0]})

    async def retract():                 # collapse_file()'s tail, extent by extent
        n = 0
        for i, folio in enumerate(folios):
            n += await khugepaged.retract_page_tables(k, inode.mapping, i * (size // k.page_size))
            shmem.folio_unlock(folio)
        return n

    async def age():
        walk = await vmscan.lru_gen_age_mm(k, w.mms[0])
        if walk.mm_stats["MM_LEAF_YOUNG"]:           # the table is empty: nothing can be young
            raise Finding("ORACLE", "ORACLE: the aging walk found young ptes in an empty table",
                          "ORACLE:lru_gen", [f"  mm_stats {dict(walk.mm_stats)}"])
        return walk.err

    sc.task("aging", age())
    sc.task("retract", retract())
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


@scenario("fork-vs-retract",
          "fork (dup_mmap -> copy_page_range -> copy_pte_range) of a process mapping a shmem file "
          "whose page cache was just collapsed, plus some anon memory, while retract_page_tables() "
          "runs without mmap_lock: vma_needs_copy() and retract's anon_vma test keep them apart",
          catches=("fork_copies_file_vma_without_anon_vma",))
def fork_vs_retract(sc: Scenario) -> World:
    from mm_core import fork
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    parent = w.mms[0]
    size = huge_memory.hpage_pmd_size(k)
    anon = m.mmap(parent, BASE + 4 * size, 4 * k.page_size, emu.PROT_READ | emu.PROT_WRITE,
                  emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    frames = [m.touch(parent, anon + i * k.page_size, write=True) for i in range(2)]
    child = m.new_mm()                                  # dup_mm(): mm_alloc + pgd_alloc
    w.mms.append(child)

    async def do_fork():
        ret = await fork.dup_mmap(k, child, parent)
        if ret:
            raise Finding("ORACLE", f"ORACLE: fork failed with {ret} with memory to spare",
                          "ORACLE:fork", [f"  copy_pte_range -ENOMEM: {k.stats['copy_pte_range_enomem']}"])
        pmdp = await pgtable.walk_alloc(k, child, anon, k.arch.pmd_level)
        ptep = await pgtable.pte_offset_map(k, pmdp, anon)
        raw = [await pgtable.get_raw(k, ptep + 8 * i) for i in range(2)]
        seen = [k.arch.decode(k.arch.pte_level, v).paddr for v in raw]
        await pgtable.pte_unmap(k, ptep)
        if seen != frames:
            raise Finding("ORACLE", "ORACLE: the child does not share the parent's anon pages",
                          "ORACLE:fork-cow", [f"  child {seen}, parent {frames}"])
        return "forked"

    sc.task("fork", do_fork())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("uffd-move-vs-folio-lock",
          "UFFDIO_MOVE of an anon page while reclaim (shrink_folio_list, no swap) holds its folio "
          "lock: move_pages_pte()'s folio_trylock() fails, so it unmaps both ptes, sleeps in "
          "folio_lock() and retries; spec §6 case 14 (map/unmap balance). Needs --kernel 6.8 or "
          "later (under older profiles the ioctl is -EINVAL and only reclaim runs)",
          catches=("move_pages_pte_unmaps_stack_copy", "move_pages_pte_unmaps_in_map_order"))
def uffd_move_vs_folio_lock(sc: Scenario) -> World:
    from mm_core import vmscan
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    src, dst = a + 2 * page, a + size + 5 * page            # dst in another PTE table
    paddr = m.touch(mm, src, write=True)
    marker = b"uffdmove" + (src >> k.page_shift).to_bytes(8, "little")
    k.physmem.write(paddr, marker)
    folio = k.alloc.page_of(paddr)                          # isolated from the LRU by reclaim

    async def move():
        ret = await userfaultfd.move_pages(k, mm, dst, src, page)
        if not k.profile.uffdio_move and ret == -userfaultfd.EINVAL:
            return "no UFFDIO_MOVE"
        moved = m.read_user(mm, dst, len(marker))
        if ret != page or moved != marker or m.translate(mm, src) is not None:
            raise Finding("ORACLE", "ORACLE: UFFDIO_MOVE did not move the page", "ORACLE:uffdio_move",
                          [f"  returned {ret}, dst reads {moved!r}, src still mapped: "
                           f"{m.translate(mm, src) is not None}"])
        return "moved"

    async def reclaim():
        [res] = await vmscan.shrink_folio_list(k, [folio])
        if not res.kept_locked and res.mappings_found != res.mapcount:
            raise Finding("ORACLE", "ORACLE: folio_referenced() missed a mapping of a locked anon folio",
                          "ORACLE:folio_referenced",
                          [f"  found {res.mappings_found} of mapcount {res.mapcount}: the anon rmap "
                           f"(anon_vma, index {folio.index}) does not lead to the pte"])
        return "kept" if res.kept_locked else "activated"

    sc.task("uffd", move())
    sc.task("reclaim", reclaim())
    return World([mm], [], src, 0, extra={"folio": folio, "dst": dst})


@scenario("uffd-move-vs-pt-reclaim",
          "UFFDIO_MOVE into a PTE table whose only other page MADV_DONTNEED zaps, and whose "
          "table 6.14's PT_RECLAIM then frees (pml + ptl, pmd_clear, RCU free), all under "
          "mmap_read_lock: move_pages_pte() must recheck the dst pmd under the ptl; spec §7 "
          "(6.14). Needs --kernel 6.14 (before it the table stays and the move just happens)",
          catches=("move_pages_pte_without_dst_pmd_recheck",))
def uffd_move_vs_pt_reclaim(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    src, dst = a + 2 * page, a + size + 5 * page
    paddr = m.touch(mm, src, write=True)
    marker = b"uffdmove" + (src >> k.page_shift).to_bytes(8, "little")
    k.physmem.write(paddr, marker)
    m.touch(mm, a + size + page, write=True)                # the dst table's only other page

    async def move():
        ret = await userfaultfd.move_pages(k, mm, dst, src, page)
        if not k.profile.uffdio_move and ret == -userfaultfd.EINVAL:
            return "no UFFDIO_MOVE"
        intact = m.read_user(mm, src, len(marker)) == marker
        if ret == -userfaultfd.EINVAL and k.profile.pt_reclaim and intact:
            return "EINVAL (the dst table went between the map and the sanity check)"
        moved = m.read_user(mm, dst, len(marker))          # b"": MADV_DONTNEED dropped it since
        if ret != page or moved not in (marker, b"") or m.translate(mm, src) is not None:
            raise Finding("ORACLE", "ORACLE: UFFDIO_MOVE did not move the page", "ORACLE:uffdio_move",
                          [f"  returned {ret}, dst reads {moved!r}, src still mapped: "
                           f"{m.translate(mm, src) is not None}"])
        return "moved"

    sc.task("uffd", move())
    sc.task("dontneed", madvise.madvise_dontneed(k, mm, a + size, a + 2 * size))
    return World([mm], [], src, 0, extra={"dst": dst})


# -- GUP-fast --------------------------------------------------------------------------------


async def pin_and_check(sc: Scenario, mm, start: int, nr: int, after: list, write: bool = False):
    """A driver's pin_user_pages_fast() (GUP-fast, slow GUP for the rest). Once the racing
    tasks in ``after`` are done (nothing else changes the mapping then), every pinned page
    must still be the one the mapping translates to: a pin of a page that is no longer
    mapped where GUP found it is a DMA into memory the process can no longer see."""
    from mm_core import gup
    k = sc.kernel
    pages: list[int] = []
    n = await gup.pin_user_pages_fast(k, mm, start, nr, gup.FOLL_WRITE if write else 0, pages)
    for done in after:
        await traps.wait(done)
    for i, pa in enumerate(pages):
        now = sc.machine.translate(mm, start + i * k.page_size)
        if now != pa:
            page = k.alloc.page_of(pa)
            raise Finding("ORACLE", "ORACLE: GUP pinned a page that is not mapped where it found it",
                          "ORACLE:gup-pin",
                          [f"  va {start + i * k.page_size:#x}: pinned {pa:#x}"
                           f" ({page.use.value if page else 'freed'}), mapped now: "
                           f"{'nothing' if now is None else hex(now)}"])
    gup.unpin_user_pages(k, pages)
    return n


async def completing(coro, done):
    """Run ``coro``, then complete ``done`` (whatever happens)."""
    try:
        return await coro
    finally:
        done.complete()


@scenario("gup-fast-vs-retract",
          "pin_user_pages_fast() over two anon pages and the start of a shared shmem mapping whose "
          "page cache was just collapsed, racing retract_page_tables(): GUP-fast works on a pmd "
          "copied onto the stack, stops at the empty or retracted table and falls back to slow "
          "GUP, which waits for the huge folio and maps it by PMD; spec §6 case 15",
          catches=("gup_fast_maps_live_pmd",))
def gup_fast_vs_retract(sc: Scenario) -> World:
    from mm_core.locks import Completion
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    anon = m.mmap(mm, BASE - size, size, emu.PROT_READ | emu.PROT_WRITE,
                  emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in (1, 2):                                    # GUP-fast has something to find
        m.touch(mm, anon + size - i * page, write=True)
    retracted = Completion("retract")
    sc.task("gup", pin_and_check(sc, mm, w.addr - 2 * page, 4, [retracted]))
    sc.task("retract", completing(collapse_file_tail(k, w), retracted))
    return w


@scenario("gup-fast-vs-collapse",
          "pin_user_pages_fast() of anon pages racing khugepaged's collapse_huge_page(), which "
          "clears the pmd, checks that no page has extra references and copies the pages out of "
          "the detached table: GUP-fast must recheck the pmd after taking a page",
          catches=("gup_fast_without_pmd_recheck",))
def gup_fast_vs_collapse(sc: Scenario) -> World:
    from mm_core.locks import Completion
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(2):
        m.touch(mm, a + i * page, write=True)
    collapsed = Completion("collapse")
    sc.task("gup", pin_and_check(sc, mm, a + page, 1, [collapsed]))
    sc.task("collapse", completing(khugepaged.collapse_huge_page(k, mm, a), collapsed))
    return World([mm], [], a)
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


# -- HMM ---------------------------------------------------------------------------------------


async def mirror_and_check(sc: Scenario, dm, start: int, end: int, after: list):
    """A mirroring driver's dmirror_range_fault() (hmm_range_fault() + the seq protocol).
    Once the racing tasks in ``after`` are done, what the device maps must be what the CPU
    maps: every device entry the pfn the CPU page tables translate its address to."""
    from mm_core import hmm
    k = sc.kernel
    ret = await hmm.dmirror_range_fault(k, dm, start, end)
    for done in after:
        await traps.wait(done)
    for a in range(start, end, k.page_size):
        dev = dm.pt.get(a)
        cpu = sc.machine.translate(dm.mm, a)
        if dev is not None and (cpu is None or hmm.hmm_pfn_to_pfn(dev) != cpu >> k.page_shift):
            pa = hmm.hmm_pfn_to_pfn(dev) << k.page_shift
            page = k.alloc.page_of(pa)
            raise Finding("ORACLE", "ORACLE: the device mirror maps a page the CPU does not map there",
                          "ORACLE:hmm-mirror",
                          [f"  va {a:#x}: device {pa:#x} ({page.use.value if page else 'freed'}), "
                           f"CPU: {'nothing' if cpu is None else hex(cpu)}"])
    return ret if isinstance(ret, int) else len(dm.pt)


@scenario("hmm-vs-retract",
          "a mirroring driver's hmm_range_fault() loop (mmu_interval_read_begin, the lockless "
          "walk under mmap_read_lock, mmu_interval_read_retry under the driver mutex) over two "
          "mapped pages of a shared shmem mapping, racing khugepaged's collapse_file(), which "
          "unmaps the small pages (try_to_unmap) and retracts the PTE table "
          "(retract_page_tables): both invalidate the interval, and the device must end up "
          "mapping what the CPU maps",
          catches=("hmm_driver_skips_read_retry",), mem="16M")
def hmm_vs_retract(sc: Scenario) -> World:
    from mm_core import hmm
    from mm_core.locks import Completion
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("hmm", size)
    mm = m.new_mm()
    addr = m.mmap(mm, BASE, size, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for i in range(2):
        m.touch(mm, addr + i * k.page_size, write=True)
    dm = run_sync(hmm.dmirror_new(k, mm, addr, 2 * k.page_size))
    collapsed = Completion("collapse")
    sc.task("driver", mirror_and_check(sc, dm, addr, addr + 2 * k.page_size, [collapsed]))
    sc.task("collapse", completing(khugepaged.collapse_file(k, inode, 0, is_khugepaged=True), collapsed))
    return World([mm], [inode], addr, 0, inode, {"dmirror": dm})


# -- swap ------------------------------------------------------------------------------------

def swapped_page(sc: Scenario, cached: bool, pages: int = 1) -> tuple:
    """An mm with ``pages`` anon pages written, swapped out by MADV_PAGEOUT (and, ``cached``,
    the first read back into the swap cache by MADV_WILLNEED): (mm, address, the first
    page's bytes); page i holds swap_marker(k, address + i pages)."""
    m, k = sc.machine, sc.kernel
    m.swapon(4, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(pages):
        va = a + i * k.page_size
        k.physmem.write(m.touch(mm, va, write=True), swap_marker(k, va))
    m.madvise(mm, a, pages * k.page_size, madvise.MADV_PAGEOUT)
    if cached:
        m.madvise(mm, a, k.page_size, madvise.MADV_WILLNEED)
    return mm, a, swap_marker(k, a)


def swap_marker(k, va: int) -> bytes:
    return b"swapped!" + (va >> k.page_shift).to_bytes(8, "little")


async def swapin_and_check(k, m, mm, va: int, write: bool, name: str):
    """Fault ``va`` in (again after each FAULT-RETRY) and check the bytes swapped out."""
    from emu.arch import Access
    from mm_core import memory
    data = swap_marker(k, va)
    for _ in range(8):
        paddr = m.translate(mm, va, "w" if write else "r")
        if paddr is not None:
            seen = k.physmem.read(paddr, len(data))
            if seen != data:
                raise Finding("ORACLE", "ORACLE: a swapped-in page does not hold what was swapped out",
                              "ORACLE:swapin", [f"  {name} reads {seen!r} at {va:#x}, expected {data!r}"])
            return "written" if write else "read"
        ret = await memory.do_user_addr_fault(k, mm, va, Access.W if write else Access.R)
        if ret is not memory.FaultResult.OK:
            raise Finding("ORACLE", f"ORACLE: swap-in fault failed: {ret.value}", "ORACLE:swapin-fault")
    raise Finding("ORACLE", f"ORACLE: {name} kept faulting on a swapped-out page", "ORACLE:swapin-refault")


@scenario("swapin-vs-swapin",
          "two threads fault the same swapped-out anon page (do_swap_page): one maps the swap-cache "
          "folio, the other finds the pte changed under its ptl (pte_same) and refaults; both must "
          "read the bytes written before MADV_PAGEOUT, and rss and the swap counts must balance",
          catches=("do_swap_page_without_pte_same",))
def swapin_vs_swapin(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    mm, a, _ = swapped_page(sc, cached=False)
    sc.task("t1", swapin_and_check(k, m, mm, a, False, "t1"))
    sc.task("t2", swapin_and_check(k, m, mm, a, False, "t2"))
    return World([mm], [], a, 0)


@scenario("swapoff-vs-swapin",
          "swapoff (try_to_unuse -> unuse_pte_range -> unuse_pte) while two threads fault in the "
          "two swapped-out pages, one of them already in the swap cache: get_swap_device() pins "
          "the area under a fault, do_swap_page rechecks the folio is still the swap cache's and "
          "pte_same, unuse_pte skips a pte faulted in first; the bytes must come back either way")
def swapoff_vs_swapin(sc: Scenario) -> World:
    from mm_core import swapfile
    m, k = sc.machine, sc.kernel
    mm, a, _ = swapped_page(sc, cached=True, pages=2)

    async def swapoff():
        ret = await swapfile.swapoff(k)
        if ret:
            raise Finding("ORACLE", f"ORACLE: swapoff failed with {ret}", "ORACLE:swapoff")
        return "off"

    sc.task("swapoff", swapoff())
    sc.task("t1", swapin_and_check(k, m, mm, a, False, "t1"))
    sc.task("t2", swapin_and_check(k, m, mm, a + k.page_size, True, "t2"))
    return World([mm], [], a, 0)


@scenario("swapoff-vs-exit",
          "swapoff's try_to_unuse() while a process exits: exit_mmap() (mm_users already 0, so "
          "unuse_mm skips it) zaps a swap pte whose slot also has a swap-cache folio, and "
          "free_swap_and_cache() drops the count; swapoff's cache pass can then free the slot, "
          "finish, and free the area: free_swap_and_cache() must hold it with get_swap_device()",
          catches=("free_swap_and_cache_without_get_swap_device",))
def swapoff_vs_exit(sc: Scenario) -> World:
    from mm_core import memory, swapfile
    k = sc.kernel
    mm, a, _ = swapped_page(sc, cached=True)

    async def swapoff():
        ret = await swapfile.swapoff(k)
        if ret:
            raise Finding("ORACLE", f"ORACLE: swapoff failed with {ret}", "ORACLE:swapoff")
        return "off"

    async def exit_mm():
        await memory.exit_mmap(k, mm)            # check_mm() at its end
        return "exited"

    sc.task("exit", exit_mm())
    sc.task("swapoff", swapoff())
    return World([], [], a, 0)


@scenario("pageout-vs-swapin",
          "MADV_PAGEOUT swapping out two anon pages (the walk, then shrink_folio_list: "
          "add_to_swap, try_to_unmap_one under the ptl, pageout, __remove_mapping) while one "
          "thread reads and another writes them, faulting them back in (do_swap_page) when they "
          "are gone: the bytes written before must be read back whatever the interleaving")
def pageout_vs_swapin(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    m.swapon(4, readahead=2)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(2):
        va = a + i * k.page_size
        k.physmem.write(m.touch(mm, va, write=True), swap_marker(k, va))

    async def pageout():
        for _ in range(2):
            ret = await madvise.do_madvise(k, mm, a, 2 * k.page_size, madvise.MADV_PAGEOUT)
            if ret:
                raise Finding("ORACLE", f"ORACLE: MADV_PAGEOUT failed with {ret}", "ORACLE:pageout")
        return "paged out"

    async def reader():
        for _ in range(2):
            await swapin_and_check(k, m, mm, a, False, "reader")
        return "read"

    sc.task("pageout", pageout())
    sc.task("reader", reader())
    sc.task("writer", swapin_and_check(k, m, mm, a + k.page_size, True, "writer"))
    return World([mm], [], a, 0)


@scenario("khugepaged-swapin-vs-zap",
          "MADV_COLLAPSE of an anon PMD range with two swapped-out pages, one already in the swap "
          "cache: hpage_collapse_scan_pmd() counts them and __collapse_huge_page_swapin() brings "
          "them in through do_swap_page(FAULT_FLAG_ALLOW_RETRY) under mmap_read_lock, while a "
          "thread faults the cached one in (a locked folio: VM_FAULT_RETRY, the collapse gives up "
          "with mmap_lock already dropped) and MADV_DONTNEED zaps the other (its swap pte before "
          "the swap-in, or its page after the collapse): the kept page must read its bytes, the "
          "zapped one zeroes, and rss and the swap counts must balance at exit")
def khugepaged_swapin_vs_zap(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    m.swapon(4, readahead=1)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(3):                                   # the third stays: a writable pte
        k.physmem.write(m.touch(mm, a + i * page, write=True), swap_marker(k, a + i * page))
    m.madvise(mm, a, 2 * page, madvise.MADV_PAGEOUT)
    m.madvise(mm, a, page, madvise.MADV_WILLNEED)

    async def collapse():
        ret = await madvise.do_madvise(k, mm, a, size, madvise.MADV_COLLAPSE)
        if ret not in (0, -11):                          # SCAN_SUCCEED, or SCAN_PAGE_LOCK: -EAGAIN
            raise Finding("ORACLE", f"ORACLE: MADV_COLLAPSE failed with {ret}", "ORACLE:collapse")
        return "collapsed" if ret == 0 else "gave up"

    async def dontneed():
        ret = await madvise.do_madvise(k, mm, a + page, page, madvise.MADV_DONTNEED)
        paddr = m.translate(mm, a + page)
        if ret or (paddr is not None and k.physmem.read(paddr, 16) != bytes(16)):
            raise Finding("ORACLE", "ORACLE: a zapped page still holds its bytes", "ORACLE:zap",
                          [f"  MADV_DONTNEED returned {ret}, pa {paddr}"])
        return "zapped"

    sc.task("collapse", collapse())
    sc.task("reader", swapin_and_check(k, m, mm, a, False, "reader"))
    sc.task("dontneed", dontneed())
    return World([mm], [], a, 0)


@scenario("shmem-swapoff-vs-fault",
          "swapoff's shmem_unuse() (shmem_find_swap_entries, shmem_swapin_folio) while two "
          "threads fault the two swapped-out pages of a shared memfd mapping back in, one "
          "already in the swap cache: whoever locks the folio second finds it no longer the swap "
          "cache's (or the index no longer holding the entry) and looks again (-EEXIST, "
          "goto repeat); the bytes written before MADV_PAGEOUT must come back and every slot go")
def shmem_swapoff_vs_fault(sc: Scenario) -> World:
    from mm_core import swapfile
    m, k = sc.machine, sc.kernel
    page = k.page_size
    m.swapon(4, readahead=1)
    inode = m.memfd_create("shmem-swap", 2 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_SHARED | emu.MAP_FIXED,
               file=inode)
    for i in range(2):
        k.physmem.write(m.touch(mm, a + i * page, write=True), swap_marker(k, a + i * page))
    m.madvise(mm, a, 2 * page, madvise.MADV_PAGEOUT)
    off = inode.mapping.swap_entries[0]
    run_sync(swap_state.read_swap_cache_async(k, swapfile.swp_entry_to_pte(off), None, 0))
    k.swap_info.cache[off].refcount -= 1                # only the swap cache holds it

    async def swapoff():
        ret = await swapfile.swapoff(k)
        if ret or inode.swapped or inode.mapping.swap_entries:
            raise Finding("ORACLE", f"ORACLE: swapoff returned {ret} with {inode.swapped} shmem pages "
                          "still swapped", "ORACLE:shmem-swapoff")
        return "off"

    sc.task("swapoff", swapoff())
    sc.task("t1", swapin_and_check(k, m, mm, a, False, "t1"))
    sc.task("t2", swapin_and_check(k, m, mm, a + page, True, "t2"))
    return World([mm], [inode], a, 0)


# -- the remaining walker entry points against retract_page_tables() -------------------------
#
# Each is a collapsed_shmem() world two pages longer than the collapsed PMD range (those two
# pages written, so present, dirty and young in the next PTE table): the walker covers the
# whole mapping while collapse_file_tail() retracts the first table. The oracle checks the
# walker's user-visible result on the pages it must have handled; the injected bug is the
# walker going on into the table its pmd named after pte_offset_map_lock() failed.

ENTRY_EXTRA_PAGES = 2


def entry_world(sc: Scenario) -> tuple[World, int, list[int]]:
    """collapsed_shmem() with ENTRY_EXTRA_PAGES written pages after the PMD range.
    Returns (world, whole length, the extra pages' pte addresses)."""
    w = collapsed_shmem(sc, extra_pages=ENTRY_EXTRA_PAGES)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    extra = w.addr + size
    for i in range(ENTRY_EXTRA_PAGES):
        m.touch(w.mms[0], extra + i * k.page_size, write=True)
    pmdp = run_sync(pgtable.walk_alloc(k, w.mms[0], extra, k.arch.pmd_level))
    table = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr
    pteps = [pgtable.entry_addr(k, table, k.arch.pte_level, extra + i * k.page_size)
             for i in range(ENTRY_EXTRA_PAGES)]
    return w, size + ENTRY_EXTRA_PAGES * k.page_size, pteps


def _oracle(what: str, detail: str) -> Finding:
    return Finding("ORACLE", f"ORACLE: {what}", f"ORACLE:{what.split()[0]}", [f"  {detail}"])


@scenario("mprotect-vs-retract",
          "mprotect(PROT_READ) of a shared shmem mapping (change_protection -> change_pmd_range "
          "-> change_pte_range, -EAGAIN -> RETRY) racing retract_page_tables(). Oracle: no page "
          "of the range is writable afterwards",
          catches=("change_pte_range_ignores_map_failure",))
def mprotect_vs_retract(sc: Scenario) -> World:
    from mm_core import mprotect
    w, length, _ = entry_world(sc)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]

    async def protect():
        ret = await mprotect.do_mprotect(k, mm, w.addr, length, emu.PROT_READ)
        if ret:
            raise _oracle("mprotect failed", f"ret {ret}")
        writable = [hex(va) for va in range(w.addr, w.addr + length, k.page_size)
                    if m.translate(mm, va, "w") is not None]
        if writable:
            raise _oracle("mprotect left pages writable", f"{writable[:4]}")
        if m.translate(mm, w.addr + length - k.page_size, "r") is None:
            raise _oracle("mprotect lost a present page", f"{w.addr + length - k.page_size:#x}")
        return "protected"

    sc.task("mprotect", protect())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("mlock-vs-retract",
          "mlock2(MLOCK_ONFAULT) of a shared shmem mapping (apply_vma_lock_flags -> "
          "mlock_vma_pages_range -> mlock_pte_range, a failed map is ACTION_AGAIN) racing "
          "retract_page_tables(); ONFAULT keeps __mm_populate() from faulting 512 pages per "
          "schedule. Oracle: the VMA is VM_LOCKED, the written pages still present and their "
          "folios mlocked once",
          catches=("mlock_pte_range_ignores_map_failure",))
def mlock_vs_retract(sc: Scenario) -> World:
    from mm_core import mlock
    from mm_core.mm import VM_LOCKED
    w, length, pteps = entry_world(sc)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]
    extra = [k.alloc.page_of(k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p)).paddr) for p in pteps]

    async def lock():
        ret = await mlock.do_mlock(k, mm, w.addr, length, mlock.MLOCK_ONFAULT)
        if ret:
            raise _oracle("mlock failed", f"ret {ret}")
        vmas = mm.overlapping(w.addr, w.addr + length)
        unlocked = [f"{v.start:#x}" for v in vmas if not v.flags & VM_LOCKED]
        if unlocked:
            raise _oracle("mlock left a VMA without VM_LOCKED", f"{unlocked}")
        tail = w.addr + length - ENTRY_EXTRA_PAGES * k.page_size
        absent = [hex(va) for va in range(tail, w.addr + length, k.page_size) if m.translate(mm, va) is None]
        if absent:
            raise _oracle("mlock lost present pages", f"{absent}")
        counts = [f.extra.get("mlock_count", 0) for f in extra]
        if counts != [1] * ENTRY_EXTRA_PAGES:
            raise _oracle("mlock missed a mapped folio", f"mlock_count {counts}")
        return "locked"

    sc.task("mlock", lock())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("madv-cold-vs-retract",
          "MADV_COLD (madvise_cold_or_pageout_pte_range, a failed map is SKIP) over a shared "
          "shmem mapping racing retract_page_tables(). Oracle: the written pages after the "
          "retracted range end old and deactivated",
          catches=("madvise_cold_uses_stale_pmd",))
def madv_cold_vs_retract(sc: Scenario) -> World:
    w, length, pteps = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]

    async def cold():
        ret = await madvise.do_madvise(k, mm, w.addr, length, madvise.MADV_COLD)
        if ret:
            raise _oracle("madvise_cold failed", f"ret {ret}")
        ptes = [k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p)) for p in pteps]
        if any(p.kind is not Kind.LEAF or p.young for p in ptes):
            raise _oracle("madvise_cold left a pte young or unmapped", f"{ptes}")
        if k.stats["madv_cold_deactivated"] != ENTRY_EXTRA_PAGES:
            raise _oracle("madvise_cold deactivated the wrong folios",
                          f"{k.stats['madv_cold_deactivated']} of {ENTRY_EXTRA_PAGES}")
        return "cold"

    sc.task("cold", cold())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("numa-maps-vs-retract",
          "/proc/PID/numa_maps (show_numa_map -> gather_pte_stats, a failed map is ACTION_AGAIN) "
          "racing retract_page_tables(). Oracle: the shmem VMA's line counts exactly the written "
          "pages (the retracted table is empty, the huge folio not mapped)",
          catches=("gather_pte_stats_ignores_map_failure",))
def numa_maps_vs_retract(sc: Scenario) -> World:
    from mm_core import task_mmu
    w, _, _ = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]
    expect = {f"dirty={ENTRY_EXTRA_PAGES}", f"N0={ENTRY_EXTRA_PAGES}"}

    async def show():
        text = await task_mmu.show_numa_maps(k, mm)
        fields = set(text.split())
        if not expect <= fields or any(f.startswith(("anon=", "mapped=")) for f in fields):
            raise _oracle("numa_maps miscounted", f"{text.strip()!r}, want {sorted(expect)}")
        return text

    sc.task("numa_maps", show())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("hwpoison-vs-retract",
          "memory failure's kill_accessing_process() (walk_page_range + hwpoison_pte_range, a "
          "failed map is SKIP) looking for a poisoned page of a shared shmem mapping racing "
          "retract_page_tables() of the range before it. Oracle: it finds the page's address "
          "(-EHWPOISON, the SIGBUS address)",
          catches=("hwpoison_pte_range_ignores_map_failure",))
def hwpoison_vs_retract(sc: Scenario) -> World:
    from mm_core import memory_failure
    w, length, pteps = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]
    last = w.addr + length - k.page_size
    pfn = k.arch.decode(k.arch.pte_level, k.physmem.read_entry(pteps[-1])).paddr >> k.page_shift

    async def kill():
        ret, tk = await memory_failure.kill_accessing_process(k, mm, pfn, memory_failure.MF_ACTION_REQUIRED)
        if ret != -memory_failure.EHWPOISON or tk.addr != last:
            raise _oracle("hwpoison walk missed the page", f"ret {ret}, addr {tk.addr:#x}, want {last:#x}")
        return "found"

    sc.task("hwpoison", kill())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("mprotect-vs-thp-migration",
          "mprotect(PROT_READ) of an anonymous THP while migration (rmap-driven, without "
          "mmap_lock) has its pmd as a writable migration entry: change_pmd_range() takes the "
          "swap pmd to change_huge_pmd(), which makes the entry readable so that "
          "remove_migration_pmd() does not map the THP writable again. Oracle: once both are "
          "done, the THP is mapped and not writable",
          catches=("change_huge_pmd_keeps_writable_migration_entry",))
def mprotect_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import mprotect
    from mm_core.locks import Completion
    from mm_core.sched_helpers import stalled_thp_migration
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    thp = m.touch(mm, a, write=True)                             # one THP
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    migrated = Completion("migrated")

    async def protect():
        ret = await mprotect.do_mprotect(k, mm, a, size, emu.PROT_READ)
        await traps.wait(migrated)
        if ret:
            raise _oracle("mprotect failed", f"ret {ret}")
        if m.translate(mm, a + 3 * k.page_size, "w") is not None:
            raise _oracle("mprotect left the THP writable",
                          f"pmd {k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))}")
        if m.translate(mm, a) != thp:
            raise _oracle("mprotect lost the THP", f"{m.translate(mm, a)} != {thp:#x}")
        return "protected"

    sc.task("mprotect", protect())
    sc.task("migrate", completing(stalled_thp_migration(k, mm.vma_lookup(a), pmdp), migrated))
    return World([mm], [], a, pmdp)
