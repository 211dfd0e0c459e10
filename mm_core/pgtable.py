"""Page-table pages and the generic table accessors (mm/pgtable-generic.c, mm/memory.c).

Tables live in guest RAM in the arch's real format; this module allocates them (whole
pages, multi-page CRSTs, or sub-page fragments such as s390x's 2K PTE tables), keeps a
descriptor per table (struct ptdesc: level, owner, split ptlock) and offers the
pgd_offset / p?d_alloc / pte_offset_map family to generic code. Every entry read or
write is a scheduling point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import PAGE_SIZE, Entry, Kind, table_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core.locks import SpinLock
from mm_core.page_alloc import OutOfMemory, Page, PageUse


@dataclass(eq=False)
class FragPage:
    """A page cut into equal table fragments (s390x 2K halves, powerpc PTE fragments)."""

    page: Page
    frag_bytes: int
    used: set[int] = field(default_factory=set)

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
    state: str = "live"               # live / detached / deferred / freed (lifetime sanitizer)

    def __repr__(self) -> str:
        return f"<pt L{self.level} {self.paddr:#x} {self.state}>"


# -- allocation ----------------------------------------------------------------------------

def alloc_table(k, mm, level: int) -> PageTable:
    """pte_alloc_one() / pmd_alloc_one() / crst_table_alloc(): a fresh empty table."""
    arch = k.arch
    nbytes = arch.table_alloc_bytes(level)
    frag = None
    if nbytes < PAGE_SIZE:
        frag = _alloc_fragment(k, mm, nbytes)
        paddr = frag.page.paddr + min(set(range(frag.nr_frags)) - frag.used) * nbytes
        frag.used.add((paddr - frag.page.paddr) // nbytes)
        page = frag.page
    else:
        order = max(0, (nbytes // PAGE_SIZE - 1).bit_length())
        page = k.alloc.alloc_pages(order, PageUse.PAGETABLE, owner=mm, zero=False)
        k.stats["pt_pages_allocated"] += page.nr_pages
        paddr = page.paddr
    lv = arch.levels[level]
    k.physmem.fill_entries(paddr, lv.entries, arch.empty_value(level))
    pt = PageTable(paddr, level, mm, page, frag)
    if level >= arch.pmd_level:           # split ptlocks for PMD and PTE tables
        pt.ptl = SpinLock(f"ptl@{paddr:#x}")
    k.ptdescs[paddr] = pt
    k.stats["pt_tables_allocated"] += 1
    mm.pgtables_bytes += nbytes
    return pt


def _alloc_fragment(k, mm, nbytes: int) -> FragPage:
    pool = mm.frag_pool
    for fp in pool:
        if fp.frag_bytes == nbytes and len(fp.used) < fp.nr_frags:
            return fp
    page = k.alloc.alloc_pages(0, PageUse.PAGETABLE, owner=mm, zero=False)
    k.stats["pt_pages_allocated"] += 1
    fp = FragPage(page, nbytes)
    page.private = fp
    pool.append(fp)
    return fp


def free_table(k, pt: PageTable) -> None:
    """pte_free() / pmd_free() / crst_table_free(): give the table back right now."""
    if pt.state == "freed":
        raise RuntimeError(f"double free of page table {pt!r}")
    nbytes = k.arch.table_alloc_bytes(pt.level)
    pt.state = "freed"
    del k.ptdescs[pt.paddr]
    k.stats["pt_tables_freed"] += 1
    pt.mm.pgtables_bytes -= nbytes
    if pt.frag is None:
        k.stats["pt_pages_freed"] += pt.page.nr_pages
        k.alloc.free_pages(pt.page)
        return
    fp = pt.frag
    fp.used.discard((pt.paddr - fp.page.paddr) // nbytes)
    k.physmem.fill(pt.paddr, nbytes, 0x6B)      # poison the fragment at once
    if not fp.used:
        pt.mm.frag_pool.remove(fp)
        k.stats["pt_pages_freed"] += 1
        k.alloc.free_pages(fp.page)


def pgd_alloc(k, mm) -> PageTable:
    return alloc_table(k, mm, 0)


# -- entries -------------------------------------------------------------------------------

def entry_addr(k, table: int, level: int, addr: int) -> int:
    """pXd_offset(): physical address of the entry for ``addr`` in ``table``."""
    return table + k.arch.levels[level].index(addr) * 8


async def get_entry(k, entp: int, level: int) -> Entry:
    """READ_ONCE(*pXdp) decoded (pmdp_get_lockless, ptep_get): a scheduling point."""
    await sched_point("pt_read", entp)
    return k.arch.decode(level, k.physmem.read_entry(entp))


async def get_raw(k, entp: int) -> int:
    await sched_point("pt_read", entp)
    return k.physmem.read_entry(entp)


async def set_entry(k, entp: int, level: int, entry: Entry) -> None:
    """set_pte_at() / set_pmd_at() / pXd_populate(): one entry write, a scheduling point."""
    await sched_point("pt_write", entp)
    k.physmem.write_entry(entp, k.arch.encode(level, entry))


async def clear_entry(k, entp: int, level: int) -> int:
    """ptep_get_and_clear(): returns the old raw value."""
    await sched_point("pt_write", entp)
    old = k.physmem.read_entry(entp)
    k.physmem.write_entry(entp, k.arch.empty_value(level))
    return old


# -- walking down, allocating ----------------------------------------------------------------

async def walk_alloc(k, mm, addr: int, target: int) -> int | None:
    """pgd_offset + p4d_alloc + pud_alloc + pmd_alloc: the entry pointer at level
    ``target`` for ``addr``, allocating missing tables above it.

    Returns None when a leaf (huge page) sits above ``target``. Raises OutOfMemory.
    """
    table = mm.pgd
    for level in range(target):
        entp = entry_addr(k, table, level, addr)
        ent = await get_entry(k, entp, level)
        if ent.kind is Kind.NONE:
            ent = await _install_table(k, mm, entp, level)
        if ent.kind is not Kind.TABLE:
            return None
        table = ent.paddr
    return entry_addr(k, table, target, addr)


async def _install_table(k, mm, entp: int, level: int) -> Entry:
    """__pud_alloc / __pmd_alloc / __pte_alloc + pmd_install: allocate outside the lock,
    install under it if the entry is still none, otherwise free ours."""
    new = alloc_table(k, mm, level + 1)
    lock = mm.page_table_lock
    if level + 1 == k.arch.pte_level:
        lock = await pmd_lockptr(k, mm, entp)
    async with lock:
        ent = await get_entry(k, entp, level)
        if ent.kind is Kind.NONE:
            await set_entry(k, entp, level, table_entry(new.paddr))
            return table_entry(new.paddr)
    free_table(k, new)
    return ent


async def pmd_lockptr(k, mm, pmdp: int) -> SpinLock:
    """pmd_lockptr(): the split lock of the PMD table that holds ``pmdp``."""
    pt = table_of_entry(k, pmdp)
    return pt.ptl if pt is not None and pt.ptl is not None else mm.page_table_lock


def table_of_entry(k, entp: int) -> PageTable | None:
    """virt_to_ptdesc(): the table containing entry address ``entp``."""
    arch = k.arch
    for level in range(len(arch.levels)):
        size = arch.levels[level].table_bytes
        pt = k.ptdescs.get(entp & ~(size - 1))
        if pt is not None and pt.level == level:
            return pt
    return None


async def pte_alloc(k, mm, pmdp: int) -> bool:
    """pte_alloc(): make sure ``*pmdp`` points to a PTE table. False on OOM; True also
    when the pmd is (or became) huge: the caller's pte_offset_map then fails."""
    pmd_level = k.arch.pmd_level
    ent = await get_entry(k, pmdp, pmd_level)
    if ent.kind is Kind.NONE:
        try:
            await _install_table(k, mm, pmdp, pmd_level)
        except OutOfMemory:
            return False
    return True


# -- the pte_offset_map family -----------------------------------------------------------------

async def __pte_offset_map(k, pmdp: int, addr: int) -> tuple[int | None, Entry]:
    """__pte_offset_map(pmd, addr, &pmdval): validate one snapshot of the pmd and map the
    table it names. Fails (None) on none, migration, huge and bad pmds; a bad pmd is
    cleared with a pmd_ERROR message. Returns (ptep, pmdval)."""
    pmd_level = k.arch.pmd_level
    raw = await get_raw(k, pmdp)
    pmdval = k.arch.decode(pmd_level, raw)
    if pmdval.kind is Kind.TABLE:
        return entry_addr(k, pmdval.paddr, pmd_level + 1, addr), pmdval
    if pmdval.kind is Kind.BAD:
        k.printk(f"pmd_ERROR: bad pmd {pmdp:#x}({raw:#018x})")
        await clear_entry(k, pmdp, pmd_level)
    return None, pmdval


async def pte_offset_map(k, pmdp: int, addr: int) -> int | None:
    """pte_offset_map(): map the PTE table without its lock; may fail (RETRY/SKIP callers)."""
    return (await __pte_offset_map(k, pmdp, addr))[0]


def pte_lockptr(k, mm, pmdval: Entry) -> SpinLock:
    """pte_lockptr(mm, &pmdval): the ptl of the table the *snapshot* names."""
    pt = k.ptdescs.get(pmdval.paddr)
    return pt.ptl if pt is not None and pt.ptl is not None else mm.page_table_lock


async def pte_offset_map_lock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock] | None:
    """pte_offset_map_lock(): map and lock; recheck pmd_same under the ptl and retry if
    the pmd changed meanwhile. None when there is no PTE table (any more)."""
    while True:
        ptep, pmdval = await __pte_offset_map(k, pmdp, addr)
        if ptep is None:
            return None
        ptl = pte_lockptr(k, mm, pmdval)
        await traps.lock(ptl)
        if await get_raw(k, pmdp) == k.arch.encode(k.arch.pmd_level, pmdval):
            return ptep, ptl
        await traps.unlock(ptl)
        await sched_point("retry", pmdp)


async def pte_unmap_unlock(k, ptep: int, ptl: SpinLock) -> None:
    await traps.unlock(ptl)


async def pte_offset_map_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock, Entry] | None:
    """pte_offset_map_nolock(): map, and name the ptl the caller must take later and then
    revalidate with pte_same()/pmd_same()."""
    ptep, pmdval = await __pte_offset_map(k, pmdp, addr)
    if ptep is None:
        return None
    return ptep, pte_lockptr(k, mm, pmdval), pmdval
