"""Page-table allocation and freeing: pte_alloc_one / pte_free / pte_free_defer.

Linux keeps these per arch (arch/*/mm/pgalloc.c, arch/powerpc/mm/pgtable-frag.c); here
the arch names its rules (``ArchSpec.pte_frag_rules``) and this module implements them:

``page``     one table per page (or 2^order pages); pte_free_defer = call_rcu on the page
             (x86-64, arm64, s390x from 6.7, ppc64 radix 4K).
``s390``     two 2K PTE tables per 4K page (s390 up to 6.6): a page with one free half sits
             on the mm's list for reuse; pte_free_defer marks the page Active, which keeps
             it off the list, and the page is freed through RCU once both halves are free.
``powerpc``  PTE_FRAG_NR fragments per page handed out in order and never reused; the page
             is freed when its fragment refcount drops to 0, through RCU if any fragment
             was deferred (PageActive).

Table lifetime (for the sanitizers): live -> detached (its pmd cleared) -> deferred
(waiting for a grace period) -> freed (poisoned).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import PAGE_SIZE
from emu.sched.traps import sched_point
from mm_core.locks import SpinLock
from mm_core.page_alloc import PAGE_POISON, Page, PageUse
from mm_core.rcu import call_rcu


@dataclass(eq=False)
class FragPage:
    """A page holding several table fragments, with Linux's per-page bookkeeping."""

    page: Page
    frag_bytes: int
    allocated: set[int] = field(default_factory=set)    # "AA" bits / handed-out fragments
    handed_out: int = 0                                  # powerpc: next fragment index
    active: bool = False                                 # PageActive: a fragment was deferred
    cursor: bool = False                                 # powerpc: the mm's current frag page
    tables: list = field(default_factory=list)           # every PageTable ever placed here

    @property
    def nr_frags(self) -> int:
        return (PAGE_SIZE << self.page.order) // self.frag_bytes


@dataclass(eq=False)
class PageTable:
    """struct ptdesc: one page table (or fragment) of ``level`` owned by ``mm``."""

    paddr: int
    level: int
    mm: object
    page: Page
    frag: FragPage | None = None
    ptl: SpinLock | None = None
    state: str = "live"               # live / detached / deferred / freed
    history: list = field(default_factory=list)   # (what, who, step) for reports

    def note(self, k, what: str) -> None:
        cur = k.current_task()
        self.history.append((what, cur.name if cur is not None else "api", k.current_step()))

    def provenance(self) -> list[str]:
        return [f"  page table {self.paddr:#x}: {what} by {who} at step {step}"
                for what, who, step in self.history]

    def __repr__(self) -> str:
        return f"<pt L{self.level} {self.paddr:#x} {self.state}>"


def alloc_table(k, mm, level: int) -> PageTable:
    """pte_alloc_one() / pmd_alloc_one() / crst_table_alloc(): a fresh empty table."""
    arch = k.arch
    nbytes = arch.table_alloc_bytes(level)
    frag = None
    if nbytes < k.page_size:
        frag, index = _alloc_fragment(k, mm, nbytes)
        page, paddr = frag.page, frag.page.paddr + index * nbytes
    else:
        order = max(0, (nbytes // PAGE_SIZE - 1).bit_length())
        page = k.alloc.alloc_pages(order, PageUse.PAGETABLE, owner=mm, zero=False)
        k.stats["pt_pages_allocated"] += page.nr_pages
        paddr = page.paddr
    k.physmem.fill_entries(paddr, arch.levels[level].entries, arch.empty_value(level))
    pt = PageTable(paddr, level, mm, page, frag)
    pt.note(k, f"allocated ({k.arch.levels[level].name})")
    k.san.table_allocated(paddr)
    if frag is not None:
        frag.tables.append(pt)
    if level >= arch.pmd_level:           # split ptlocks (pagetable_pte_ctor / _pmd_ctor)
        pt.ptl = SpinLock(f"ptl@{paddr:#x}", "pml" if level == arch.pmd_level else "ptl")
    k.ptdescs[paddr] = pt
    k.stats["pt_tables_allocated"] += 1
    mm.pgtables_bytes += nbytes
    return pt


def _alloc_fragment(k, mm, nbytes: int) -> tuple[FragPage, int]:
    rules = k.arch.pte_frag_rules
    if rules == "powerpc":                # pte_fragment_alloc(): next fragment of the cursor page
        cur = mm.pte_frag.get(nbytes)     # (pmd_fragment_alloc() keeps its own cursor)
        if cur is None or cur.handed_out >= cur.nr_frags:
            if cur is not None:
                _drop_cursor(k, mm, cur)
            cur = mm.pte_frag[nbytes] = _new_frag_page(k, mm, nbytes)
            cur.cursor = True
        index = cur.handed_out
        cur.handed_out += 1
        cur.allocated.add(index)
        return cur, index
    for fp in mm.frag_pool:               # s390 page_table_alloc(): reuse a free half
        if fp.frag_bytes == nbytes and not fp.active and len(fp.allocated) < fp.nr_frags:
            index = min(set(range(fp.nr_frags)) - fp.allocated)
            fp.allocated.add(index)
            if len(fp.allocated) == fp.nr_frags:
                mm.frag_pool.remove(fp)
            return fp, index
    fp = _new_frag_page(k, mm, nbytes)
    fp.allocated.add(0)
    mm.frag_pool.append(fp)
    return fp, 0


def _new_frag_page(k, mm, nbytes: int) -> FragPage:
    page = k.alloc.alloc_pages(k.page_order, PageUse.PAGETABLE, owner=mm, zero=False)
    k.stats["pt_pages_allocated"] += page.nr_pages      # counted in 4K frames, like whole tables
    fp = FragPage(page, nbytes)
    page.private = fp
    return fp


# -- freeing ----------------------------------------------------------------------------------

def pte_free(k, pt: PageTable) -> None:
    """pte_free() / pmd_free() / crst_table_free(): the owner gives the table back now.

    Only for tables nobody else can reach: free_pgtables() of unmapped ranges, error
    paths, a lost pmd_install race."""
    _release(k, pt)
    if pt.frag is None:
        _free_table_memory(k, pt, rcu=False)
    else:
        _release_fragment(k, pt, deferred=False)


async def pte_free_defer(k, pt: PageTable) -> None:
    """pte_free_defer() [6.6]: free the table after an RCU grace period, so lockless
    walkers that mapped it before it was detached keep reading valid memory."""
    _release(k, pt)
    k.stats["pt_tables_deferred"] += 1
    k.deferred.append(pt)
    pt.note(k, "queued by pte_free_defer")
    if pt.frag is None:
        pt.state = "deferred"
        await sched_point("call_rcu", pt.paddr)
        call_rcu(k, lambda: _free_table_memory(k, pt, rcu=True), f"pte_free_now {pt.paddr:#x}")
        return
    pt.frag.active = True                 # SetPageActive(): never reuse, free via RCU
    if pt.frag in pt.mm.frag_pool:
        pt.mm.frag_pool.remove(pt.frag)
    pt.state = "deferred"
    await sched_point("call_rcu", pt.paddr)
    _release_fragment(k, pt, deferred=True)


def _release(k, pt: PageTable) -> None:
    if pt.state in ("deferred", "freed"):
        raise RuntimeError(f"double free of page table {pt!r}")
    k.san.table_released(pt)
    if pt.state == "live" and pt.level > 0:
        pt.note(k, "freed while still live (pmd not cleared)")
    k.ptdescs.pop(pt.paddr, None)
    k.stats["pt_tables_freed"] += 1
    pt.mm.pgtables_bytes -= k.arch.table_alloc_bytes(pt.level)   # mm_dec_nr_ptes()


def _free_table_memory(k, pt: PageTable, rcu: bool) -> None:
    """pte_free_now(): the page goes back to the allocator (poisoned)."""
    pt.state = "freed"
    pt.note(k, "freed (RCU callback)" if rcu else "freed (pte_free)")
    k.san.table_freed(pt)
    k.stats["pt_pages_freed"] += pt.page.nr_pages
    if rcu:
        k.stats["pt_pages_rcu_freed"] += pt.page.nr_pages
    k.alloc.free_pages(pt.page)


def _release_fragment(k, pt: PageTable, deferred: bool) -> None:
    fp, nbytes = pt.frag, pt.frag.frag_bytes
    fp.allocated.discard((pt.paddr - fp.page.paddr) // nbytes)
    if not deferred:
        pt.state = "freed"
        pt.note(k, "freed (pte_free)")
        k.san.table_freed(pt)
        k.physmem.fill(pt.paddr, nbytes, PAGE_POISON)
    if _frag_page_unused(fp):
        if fp in pt.mm.frag_pool:
            pt.mm.frag_pool.remove(fp)
        _free_frag_page_maybe_rcu(k, fp)
    elif k.arch.pte_frag_rules == "s390" and not fp.active and fp not in pt.mm.frag_pool:
        pt.mm.frag_pool.append(fp)        # one half free again: back on the list


def _frag_page_unused(fp: FragPage) -> bool:
    return not fp.allocated and not fp.cursor


def _free_frag_page(k, fp: FragPage, rcu: bool) -> None:
    for t in fp.tables:
        if t.state != "freed":
            t.note(k, "freed with its page" + (" (RCU callback)" if rcu else ""))
            k.san.table_freed(t)
        t.state = "freed"
    k.stats["pt_pages_freed"] += fp.page.nr_pages
    if rcu:
        k.stats["pt_pages_rcu_freed"] += fp.page.nr_pages
    k.alloc.free_pages(fp.page)


def _drop_cursor(k, mm, fp: FragPage) -> None:
    fp.cursor = False
    if _frag_page_unused(fp):
        _free_frag_page_maybe_rcu(k, fp)


def _free_frag_page_maybe_rcu(k, fp: FragPage) -> None:
    """The last fragment is gone: through RCU if any fragment was deferred
    (TestClearPageActive -> call_rcu(pte_free_now)), else now."""
    if fp.active:
        call_rcu(k, lambda: _free_frag_page(k, fp, rcu=True), f"pte_free_now {fp.page.paddr:#x}")
    else:
        _free_frag_page(k, fp, rcu=False)


def pte_frag_destroy(k, mm) -> None:
    """pte_frag_destroy() at exit: drop the mm's hold on its current fragment pages."""
    cursors, mm.pte_frag = list(mm.pte_frag.values()), {}
    for fp in cursors:
        _drop_cursor(k, mm, fp)
