"""GUP-fast and HMM scenarios: lockless walks on a stack copy of the pmd and a mirroring
driver, against retraction and collapse; spec §6 case 15.
"""
from __future__ import annotations

import emu
from emu.scenario import Scenario
from emu.scenarios.base import (
    BASE,
    World,
    collapse_file_tail,
    collapsed_shmem,
    completing,
    locked_collapse,
    scenario,
)
from emu.sched import traps
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged
from mm_core.sanitizers import Finding

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


@scenario("gup-split-pmd-vs-collapse",
          "get_user_pages(FOLL_SPLIT_PMD) (uprobes) of a page of a shmem THP mapped by a PMD "
          "racing khugepaged's collapse_pte_mapped_thp() of the same range: follow_pmd_mask() "
          "splits the pmd (a file THP's mapping is dropped), pte_alloc() stuffs an empty table "
          "in, and the collapse may take that table (or the ptes the fault put in it) back to a "
          "PMD mapping before follow_page_pte() maps it: no_page_table(), the fault, and the "
          "retry splits again. Oracle: the page taken is the one mapped there")
def gup_split_pmd_vs_collapse(sc: Scenario) -> World:
    from mm_core import gup
    from mm_core.locks import Completion
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]
    run_sync(collapse_file_tail(k, w))                  # the collapse is over ...
    m.rcu_barrier()
    m.touch(mm, w.addr)                                 # ... and the THP is mapped by a PMD
    collapsed = Completion("collapse")
    addr = w.addr + 9 * k.page_size

    async def get_and_check():
        pages: list[int] = []
        n = await gup.get_user_pages_unlocked(k, mm, addr, 1, pages, gup.FOLL_SPLIT_PMD)
        await traps.wait(collapsed)
        now = m.translate(mm, addr)
        if n != 1 or pages != [now]:
            raise Finding("ORACLE", "ORACLE: GUP(FOLL_SPLIT_PMD) took a page that is not mapped there",
                          "ORACLE:gup-split-pmd", [f"  got {n}: {[hex(p) for p in pages]}, mapped now: "
                                                   f"{'nothing' if now is None else hex(now)}"])
        gup.put_user_page(k, pages[0])
        return n

    sc.task("gup", get_and_check())
    sc.task("collapse", completing(locked_collapse(k, mm, w.addr), collapsed))
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
