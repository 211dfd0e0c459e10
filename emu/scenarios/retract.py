"""Scenarios around retract_page_tables() (and the anon collapse): readers, zap, faults,
mremap, mincore, MGLRU, fork and exit racing the lockless retraction; spec §6 cases 1-5, 7.
"""
from __future__ import annotations

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios.base import (
    BASE,
    World,
    collapse_file_tail,
    collapsed_shmem,
    huge_refault,
    locked_collapse,
    lockless_reader,
    madvise_collapse_tail,
    read_fault,
    scenario,
    write_file_data,
)
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, madvise, pgtable, shmem, userfaultfd
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.page_alloc import PageUse
from mm_core.sanitizers import Finding

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


@scenario("ptdump-vs-retract",
          "a page-table dump of a user mm (ptdump_walk_pgd -> walk_page_range_novma, x86's "
          "page_tables/current_user) over the end of a collapsed shmem range and an anon page "
          "after it, racing retract_page_tables(): mmap_write_lock does not keep the retraction "
          "out; the no-VMA walk maps the user table with pte_offset_map() (a failed map is "
          "ACTION_AGAIN) and must show the anon page and nothing in the retracted range",
          catches=("novma_walk_maps_user_table_as_kernel",))
def ptdump_vs_retract(sc: Scenario) -> World:
    from mm_core import ptdump
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    anon = m.mmap(w.mms[0], w.addr + size, page, emu.PROT_READ | emu.PROT_WRITE,
                  emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.touch(w.mms[0], anon, write=True)
    start, end = w.addr + size - 4 * page, anon + page   # four ptes of the table, then the anon page

    async def dump():
        st = ptdump.PtdumpState(k, [], user_bit=ptdump.has_user_bit(k))
        await ptdump.ptdump_walk_pgd(k, st, w.mms[0], start, end)
        shown = [(r.start, r.end, r.level) for r in st.ranges]
        if shown != [(anon, anon + page, "pte")]:
            raise Finding("ORACLE", "ORACLE: the page-table dump shows the wrong mappings",
                          "ORACLE:ptdump", [f"  {r.render()}" for r in st.ranges]
                          + [f"  expected only {anon:#x}-{anon + page:#x} (pte)"])
        return "ok"

    sc.task("ptdump", dump())
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
        write_file_data(k, folio.paddr, size)
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
