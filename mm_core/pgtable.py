"""Page-table pages and the generic table accessors (mm/pgtable-generic.c, mm/memory.c).

Tables live in guest RAM in the arch's real format; this module allocates them (whole
pages, multi-page CRSTs, or sub-page fragments such as s390x's 2K PTE tables), keeps a
descriptor per table (struct ptdesc: level, owner, split ptlock) and offers the
pgd_offset / p?d_alloc / pte_offset_map family to generic code. Every entry read or
write is a scheduling point.
"""
from __future__ import annotations

from emu.arch import PAGE_SHIFT, Entry, Kind, table_entry
from emu.physmem import nonempty
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core.locks import SpinLock
from mm_core.page_alloc import OutOfMemory
from mm_core.pgalloc import PageTable, alloc_table, pte_free
from mm_core.rcu import rcu_read_lock, rcu_read_unlock
from mm_core.sanitizers import call_site

__all__ = ["PageTable", "alloc_table", "nonempty", "pte_free"]


def pgd_alloc(k, mm) -> PageTable:
    return alloc_table(k, mm, 0)


# -- entries -------------------------------------------------------------------------------

def entry_addr(k, table: int, level: int, addr: int) -> int:
    """pXd_offset(): physical address of the entry for ``addr`` in ``table``."""
    return table + k.arch.levels[level].index(addr) * 8


async def get_entry(k, entp: int, level: int) -> Entry:
    """READ_ONCE(*pXdp) decoded (pmdp_get_lockless, ptep_get): a scheduling point."""
    await sched_point("pt_read", entp)
    k.san.entry_access(entp, False)
    return k.arch.decode(level, k.physmem.read_entry(entp))


async def pmdp_get_lockless(k, pmdp: int) -> int:
    """pmdp_get_lockless(): one atomic read of a pmd without its lock."""
    return await get_raw(k, pmdp)


async def pmd_lock(k, mm, pmdp: int) -> SpinLock:
    """pmd_lock(): take and return the PMD table's lock (pml)."""
    pml = await pmd_lockptr(k, mm, pmdp)
    await traps.lock(pml)
    return pml


async def get_raw(k, entp: int) -> int:
    """READ_ONCE(*ptep). A read under the table's own ptl is not a scheduling point: every
    writer of a PTE holds that ptl, so no interleaving can change what it sees (a partial
    order reduction that keeps long locked loops from swamping the explorer)."""
    if not _under_own_ptl(k, entp):
        await sched_point("pt_read", entp)
    k.san.entry_access(entp, False)
    return k.physmem.read_entry(entp)


async def walk_stale_pte_table(k, pmdval: Entry, start: int, end: int) -> int:
    """Bug injection shared by the ``*_ignores_map_failure`` walkers: what a walker that
    ignores a failed pte_offset_map_lock() does (the pre-6.5 shape, with no failure path):
    it goes on into the PTE table named by the pmd value it read before mapping, with
    neither the rcu_read_lock() nor the ptl a successful map would hold, reading every
    entry of [start, end). Returns the number of present entries seen (a detached table's
    entries were never the VMA's to act on)."""
    if pmdval.kind is not Kind.TABLE:
        return 0
    present = 0
    for addr in range(start, end, k.page_size):
        raw = await get_raw(k, entry_addr(k, pmdval.paddr, k.arch.pte_level, addr))
        present += k.arch.decode(k.arch.pte_level, raw).kind is Kind.LEAF
    return present


async def get_raws_locked(k, ptep: int, nr: int) -> tuple[int, ...]:
    """``nr`` consecutive READ_ONCE(*ptep) of one PTE table, for loops that scan a table
    under its ptl (zap_pte_range, the collapse checks). Under the table's own ptl no read
    is a scheduling point and no other writer can run, so one checked bulk read is the
    same as ``nr`` get_raw() calls; without that ptl (the 6.4 rules' bogus lock) it falls
    back to reading entry by entry, each a scheduling point. Outside a run (API calls,
    the explorer's teardown) nothing else can run either."""
    if k.current_task() is not None and not _under_own_ptl(k, ptep):
        return tuple([await get_raw(k, ptep + i * 8) for i in range(nr)])
    k.san.entry_access(ptep, False)
    return k.physmem.read_entries(ptep, nr)


def _under_own_ptl(k, entp: int) -> bool:
    if k.profile.retract_pmd_lock_only:
        # 5.10: retract_page_tables() clears the pmd and frees the table under pmd_lock()
        # alone, so a table can go away under a walker that holds its ptl: no reduction
        return False
    task = k.current_task()
    if task is None or not task.held:
        return False
    pt = k.ptdescs.get(k.arch.levels[k.arch.pte_level].table_base(entp))
    return pt is not None and pt.level == k.arch.pte_level and pt.ptl in task.held


async def set_entry(k, entp: int, level: int, entry: Entry) -> None:
    """set_pte_at() / set_pmd_at() / pXd_populate(): one entry write, a scheduling point."""
    await sched_point("pt_write", entp)
    value = k.arch.encode(level, entry)
    k.san.entry_access(entp, True, value)
    k.physmem.write_entry(entp, value)


async def clear_entry(k, entp: int, level: int) -> int:
    """ptep_get_and_clear(): returns the old raw value."""
    await sched_point("pt_write", entp)
    k.san.entry_access(entp, True)
    old = k.physmem.read_entry(entp)
    k.physmem.write_entry(entp, k.arch.empty_value(level))
    return old


def pte_mkdirty(k, entry: Entry) -> Entry:
    """pte_mkdirty() / pmd_mkdirty(): dirty, and soft-dirty where the arch has the bit
    (x86, s390 and powerpc set _PAGE_SOFT_DIRTY together with _PAGE_DIRTY; a D bit the
    hardware sets does not): what CLEAR_REFS_SOFT_DIRTY and pagemap's PM_SOFT_DIRTY see."""
    return entry.with_(dirty=True, soft_dirty=entry.soft_dirty or "soft_dirty" in k.arch.sw_bits)


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
    pte_free(k, new)                  # lost the race: ours was never visible
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
#
# Profile switches (mm_core/config.py):
#   6.4   pte_offset_map() maps blindly from the *live* pmd: callers had to rule out
#         none/huge first (pmd_trans_unstable); pte_offset_map_lock() takes the ptl named
#         by the live pmd and never rechecks it.
#   6.5   __pte_offset_map() validates one snapshot and may fail; _lock rechecks pmd_same.
#   6.6   ... and holds rcu_read_lock() from the map until pte_unmap().

async def __pte_offset_map(k, pmdp: int, addr: int) -> tuple[int | None, Entry]:
    """__pte_offset_map(pmd, addr, &pmdval): map the PTE table of one pmd snapshot.

    Fails (None) on none, migration, huge and bad pmds (a bad pmd is cleared with a
    pmd_ERROR). pmdval is returned even on failure. Success holds an RCU read reference
    (6.6+) until pte_unmap()."""
    prof = k.profile
    pmd_level = k.arch.pmd_level
    if not prof.fallible_pte_map:
        pmdval = k.arch.decode(pmd_level, await get_raw(k, pmdp))
        # pmd_page_vaddr() of whatever is there: a none pmd names pfn 0, a huge one its THP
        ptep = entry_addr(k, pmdval.paddr, pmd_level + 1, addr)
        k.san.pte_mapped(ptep, pmdp)                  # kmap_atomic() under HIGHPTE
        return ptep, pmdval
    rcu = prof.rcu_pte_map and "pte_offset_map_without_rcu" not in k.bugs
    if rcu:
        await rcu_read_lock(k)
    raw = await pmdp_get_lockless(k, pmdp)
    pmdval = k.arch.decode(pmd_level, raw)
    if pmdval.kind is Kind.TABLE:
        ptep = entry_addr(k, pmdval.paddr, pmd_level + 1, addr)
        k.san.pte_mapped(ptep, pmdp)                  # kmap_local_page() under HIGHPTE
        return ptep, pmdval
    if pmdval.kind is Kind.BAD:
        k.printk(f"pmd_ERROR: bad pmd {pmdp:#x}({raw:#018x})")     # pmd_clear_bad()
        k.stats["pmd_clear_bad"] += 1
        await clear_entry(k, pmdp, pmd_level)
    if rcu:
        await rcu_read_unlock(k)
    k.stats["pte_map_failed"] += 1
    return None, pmdval


async def pte_offset_map(k, pmdp: int, addr: int) -> int | None:
    """pte_offset_map(): map the PTE table without its lock; may fail."""
    return (await __pte_offset_map(k, pmdp, addr))[0]


STACK_PMD = -1          # the "pmd pointer" of a map made from a pmd copied onto the stack


async def pte_offset_map_stack(k, pmd: int, addr: int) -> int | None:
    """pte_offset_map(&pmd, addr) on a pmd *copied onto the stack* (GUP-fast's
    gup_pte_range, perf_get_pgtable_size): __pte_offset_map() validates the copy, which
    no other CPU can change, so there is no read of the live pmd (no scheduling point)
    and its pmd_same-style recheck would trivially succeed. Fails (None) on a none /
    huge / migration / bad copy (pmd_clear_bad() then clears only the copy). Success
    holds an RCU read reference (6.6+) until pte_unmap(), as pte_offset_map() does."""
    prof = k.profile
    pmd_level = k.arch.pmd_level
    pmdval = k.arch.decode(pmd_level, pmd)
    if not prof.fallible_pte_map:
        ptep = entry_addr(k, pmdval.paddr, pmd_level + 1, addr)
        k.san.pte_mapped(ptep, STACK_PMD)             # kmap_atomic() under HIGHPTE
        return ptep
    if pmdval.kind is not Kind.TABLE:
        if pmdval.kind is Kind.BAD:
            k.printk(f"pmd_ERROR: bad pmd copy ({pmd:#018x})")
            k.stats["pmd_clear_bad"] += 1
        k.stats["pte_map_failed"] += 1
        return None
    if prof.rcu_pte_map and "pte_offset_map_without_rcu" not in k.bugs:
        await rcu_read_lock(k)
    ptep = entry_addr(k, pmdval.paddr, pmd_level + 1, addr)
    k.san.pte_mapped(ptep, STACK_PMD)                 # kmap_local_page() under HIGHPTE
    return ptep


async def pte_unmap(k, ptep: int) -> None:
    """pte_unmap(): end the map (kunmap_local under HIGHPTE, and the RCU read section,
    6.6+). ``ptep`` must point into the table of the caller's latest map (sanitizer PTEMAP)."""
    k.san.pte_unmapped(ptep)
    if k.profile.rcu_pte_map and "pte_offset_map_without_rcu" not in k.bugs:
        await rcu_read_unlock(k)


def pte_offset_kernel(k, pmdval: Entry, addr: int) -> int:
    """pte_offset_kernel(): kernel tables (init_mm): no validation, no RCU, no unmap."""
    return entry_addr(k, pmdval.paddr, k.arch.pmd_level + 1, addr)


class NotAPtl(SpinLock):
    """What spin_lock(pte_lockptr()) gets when the pmd value it is given names no PTE
    table: the "ptl" field of whatever struct page pmd_page() lands on (pfn 0's for a none
    pmd, a THP head's for a huge one, a freed table's). Nobody else takes it, so it
    excludes nobody; the SPINLOCK sanitizer reports it when it is taken. It carries the
    provenance for that report."""

    not_a_ptl = True

    def __init__(self, page: tuple[str, str], pmdp: int | None, raw: int, derived: str,
                 snapshot: str | None, table: int | None) -> None:
        super().__init__(f"not-a-ptl@{page[1].split(' (')[0]}", "ptl")
        self.short, self.what = page   # what the page really is
        self.pmdp = pmdp               # the pmd the value was read from (None: a caller's copy)
        self.raw = raw                 # the pmd value the lock was derived from
        self.derived = derived         # who derived it, where, when
        self.snapshot = snapshot       # the validated snapshot it should have come from
        self.table = table             # the table that snapshot names


def pte_lockptr(k, mm, pmdval: Entry, pmdp: int | None = None,
                snapshot: Entry | None = None, mapped_at: str = "") -> SpinLock:
    """pte_lockptr(mm, &pmdval): the split ptl of the PTE table ``pmdval`` names.

    Given the snapshot __pte_offset_map() validated, that table is live or, after a
    retraction, waiting for its grace period (its ptlock lives as long as the table).
    Given anything else (the 6.4 rules' live pmd, or a re-read of the live pmd under the
    ``pte_lockptr_from_live_pmd`` bug) it may name no table at all: the result is the
    "lock" inside whatever page pmd_page() lands on (``NotAPtl``). ``pmdp``, ``snapshot``
    and ``mapped_at`` only feed the sanitizer's report."""
    pt = k.ptdescs.get(pmdval.paddr) if pmdval.kind is Kind.TABLE else None
    if pt is None and pmdval.kind is Kind.TABLE:
        pt = next((d for d in k.deferred if d.paddr == pmdval.paddr and d.state == "deferred"), None)
    if pt is not None:
        return pt.ptl if pt.ptl is not None else mm.page_table_lock   # split ptlocks off
    k.stats["bogus_ptl"] += 1
    raw = k.arch.encode(k.arch.pmd_level, pmdval)
    cur = k.current_task()
    derived = (f"derived by {cur.name if cur is not None else 'the API caller'} in {call_site()} at step "
               f"{k.current_step()} from pmd value {raw:#018x} ({pmdval.kind.value})")
    snap = None
    if snapshot is not None:
        snap = (f"{k.arch.encode(k.arch.pmd_level, snapshot):#018x} ({snapshot.kind.value} "
                f"{snapshot.paddr:#x}), validated by __pte_offset_map(){mapped_at}")
    return NotAPtl(_page_named_by(k, pmdval), pmdp, raw, derived, snap,
                   snapshot.paddr if snapshot is not None and snapshot.kind is Kind.TABLE else None)


def _page_named_by(k, pmdval: Entry) -> tuple[str, str]:
    """What pmd_page(pmdval) really is, short and long, for the report."""
    paddr = pmdval.paddr
    pfn = f"pfn {paddr >> PAGE_SHIFT:#x}"
    if pmdval.kind is Kind.NONE or paddr == 0:
        return "pfn 0", f"pfn 0 (pmd_page() of a {pmdval.kind.value} pmd: a reserved page, never allocated)"
    if paddr in k.san.dead:
        return "a freed page table", f"{pfn} (page table {paddr:#x}, freed)"
    page = k.alloc.page_of(paddr)
    if page is None:
        return "free memory", f"{pfn} (free memory)"
    if page.order and page.paddr == paddr and pmdval.kind is Kind.LEAF:
        return "a THP head page", f"{pfn} (the head page of the PMD-mapped {page.use.value} folio, " \
            f"order {page.order})"
    return f"a {page.use.value} page", f"{pfn} (a {page.use.value} page, order {page.order})"


def pmd_same(k, a: Entry, raw_b: int) -> bool:
    return k.arch.encode(k.arch.pmd_level, a) == raw_b


async def pte_offset_map_lock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock] | None:
    """pte_offset_map_lock(): map and take the ptl; under the ptl recheck pmd_same and
    start again if the pmd changed meanwhile. None when there is no PTE table (any more)."""
    if not k.profile.fallible_pte_map:        # 6.4: trust the live pmd, no recheck
        pmdval = k.arch.decode(k.arch.pmd_level, await get_raw(k, pmdp))
        ptl = pte_lockptr(k, mm, pmdval, pmdp=pmdp)
        ptep, _ = await __pte_offset_map(k, pmdp, addr)
        await traps.lock(ptl)
        return ptep, ptl
    while True:
        ptep, pmdval = await __pte_offset_map(k, pmdp, addr)
        if ptep is None:
            return None
        if "pte_lockptr_from_live_pmd" in k.bugs:
            ptl = await _pte_lockptr_live(k, mm, pmdp, pmdval)
        else:
            ptl = pte_lockptr(k, mm, pmdval)
        await traps.lock(ptl)
        if "pte_offset_map_lock_without_recheck" in k.bugs:
            return ptep, ptl
        if pmd_same(k, pmdval, await pmdp_get_lockless(k, pmdp)):
            return ptep, ptl
        await pte_unmap_unlock(k, ptep, ptl)
        k.stats["pte_map_lock_retry"] += 1
        await sched_point("retry", pmdp)


async def _pte_lockptr_live(k, mm, pmdp: int, snapshot: Entry) -> SpinLock:
    """Bug injection ``pte_lockptr_from_live_pmd``: the pre-6.5 ``pte_lockptr(mm, pmd)``
    inside the 6.5+ map: the ptl is derived from a second, later read of the live ``*pmd``
    (a scheduling point after the map) instead of from the snapshot the map validated.
    If a retraction cleared the pmd meanwhile (or a refault made it huge), that names pfn
    0's or the THP head's page, not the table the caller has mapped (spec §6 case 2)."""
    mapped_at = f" at step {k.current_step()}"
    live = k.arch.decode(k.arch.pmd_level, await get_raw(k, pmdp))
    return pte_lockptr(k, mm, live, pmdp=pmdp, snapshot=snapshot, mapped_at=mapped_at)


async def pte_unmap_unlock(k, ptep: int, ptl: SpinLock) -> None:
    """pte_unmap_unlock(): spin_unlock(ptl), then pte_unmap()."""
    await traps.unlock(ptl)
    await pte_unmap(k, ptep)


class ApiError(Exception):
    """A kernel function called under a profile where it does not exist."""


async def pte_offset_map_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock, Entry] | None:
    """pte_offset_map_nolock() (6.5-6.12): map, and name the ptl of the mapped table for
    the caller to take later and then revalidate with pte_same()/pmd_same()."""
    if k.profile.rw_nolock:
        raise ApiError("pte_offset_map_nolock() was removed in 6.13: use _ro_nolock or _rw_nolock")
    return await _map_nolock(k, mm, pmdp, addr)


async def _map_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock, Entry] | None:
    ptep, pmdval = await __pte_offset_map(k, pmdp, addr)
    if ptep is None:
        return None
    if "pte_lockptr_from_live_pmd" in k.bugs:
        return ptep, await _pte_lockptr_live(k, mm, pmdp, pmdval), pmdval
    return ptep, pte_lockptr(k, mm, pmdval), pmdval


async def pte_offset_map_ro_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock] | None:
    """pte_offset_map_ro_nolock() (6.13): for callers that only read after locking."""
    _require_613(k, "pte_offset_map_ro_nolock")
    mapped = await _map_nolock(k, mm, pmdp, addr)
    return None if mapped is None else mapped[:2]


async def pte_offset_map_rw_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock, Entry] | None:
    """pte_offset_map_rw_nolock() (6.13): also hands back pmdval; a writer must check
    pmd_same() (or pte_same()) after taking the ptl."""
    _require_613(k, "pte_offset_map_rw_nolock")
    mapped = await _map_nolock(k, mm, pmdp, addr)
    if mapped is not None:
        k.san.rw_nolock_mapped(pmdp, mapped[0], mapped[1])
    return mapped


async def pte_offset_map_copy(k, pmdval: Entry, addr: int, pmdp: int) -> int | None:
    """pte_offset_map(&pmd, addr) on a caller's *stack copy* of the pmd (MGLRU's
    walk_pte_range(), perf_get_pgtable_size(), GUP-fast): __pte_offset_map() validates the
    copy, which cannot change, and never re-reads the live pmd. A bad copy is "cleared"
    (pmd_clear_bad(&pmd) clears the copy, the live pmd stays as it is) and the map fails.
    Success holds an RCU read reference (6.6+) until pte_unmap(). ``pmdp``, where the copy
    was read from, only feeds the sanitizers and the messages. Under the 6.4 rules the copy
    is mapped blindly (the caller checked it)."""
    pmd_level = k.arch.pmd_level
    if not k.profile.fallible_pte_map:
        ptep = entry_addr(k, pmdval.paddr, pmd_level + 1, addr)
        k.san.pte_mapped(ptep, pmdp)
        return ptep
    rcu = k.profile.rcu_pte_map and "pte_offset_map_without_rcu" not in k.bugs
    if rcu:
        await rcu_read_lock(k)
    if pmdval.kind is not Kind.TABLE:
        if pmdval.kind is Kind.BAD:
            k.printk(f"pmd_ERROR: bad pmd in a copy of {pmdp:#x} (pmd_clear_bad() clears the copy)")
            k.stats["pmd_clear_bad_copy"] += 1
        if rcu:
            await rcu_read_unlock(k)
        k.stats["pte_map_failed"] += 1
        return None
    ptep = entry_addr(k, pmdval.paddr, pmd_level + 1, addr)
    k.san.pte_mapped(ptep, pmdp)
    return ptep


async def pte_offset_map_nolock_copy(k, mm, pmdval: Entry, addr: int,
                                     pmdp: int) -> tuple[int, SpinLock, Entry] | None:
    """pte_offset_map_nolock(mm, &val, addr, &ptl) (6.13: pte_offset_map_rw_nolock(mm, &val,
    addr, &pmdval, &ptl)) on a stack copy ``val`` of the pmd, as MGLRU's walk_pmd_range()
    passes it to walk_pte_range(): pte_offset_map_copy(), and the ptl named is that of the
    table the copy points to."""
    ptep = await pte_offset_map_copy(k, pmdval, addr, pmdp)
    if ptep is None:
        return None
    if not k.profile.fallible_pte_map:
        return ptep, pte_lockptr(k, mm, pmdval, pmdp=pmdp), pmdval
    ptl = pte_lockptr(k, mm, pmdval, pmdp=pmdp, snapshot=pmdval)
    if k.profile.rw_nolock:
        k.san.rw_nolock_mapped(pmdp, ptep, ptl)
    return ptep, ptl, pmdval


def _require_613(k, name: str) -> None:
    if not k.profile.rw_nolock:
        raise ApiError(f"{name}() exists from 6.13 on (profile {k.profile.name})")


async def pte_offset_map_for_write_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock, Entry] | None:
    """What a writer that locks later calls: _rw_nolock under 6.13, _nolock before."""
    if k.profile.rw_nolock:
        return await pte_offset_map_rw_nolock(k, mm, pmdp, addr)
    return await pte_offset_map_nolock(k, mm, pmdp, addr)
