"""Page-table pages and the generic table accessors (mm/pgtable-generic.c, mm/memory.c).

Tables live in guest RAM in the arch's real format; this module allocates them (whole
pages, multi-page CRSTs, or sub-page fragments such as s390x's 2K PTE tables), keeps a
descriptor per table (struct ptdesc: level, owner, split ptlock) and offers the
pgd_offset / p?d_alloc / pte_offset_map family to generic code. Every entry read or
write is a scheduling point.
"""
from __future__ import annotations

from emu.arch import Entry, Kind, table_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core.locks import SpinLock
from mm_core.page_alloc import OutOfMemory
from mm_core.pgalloc import PageTable, alloc_table, pte_free
from mm_core.rcu import rcu_read_lock, rcu_read_unlock

__all__ = ["PageTable", "alloc_table", "pte_free"]


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
        return entry_addr(k, pmdval.paddr, pmd_level + 1, addr), pmdval
    rcu = prof.rcu_pte_map and "pte_offset_map_without_rcu" not in k.bugs
    if rcu:
        await rcu_read_lock(k)
    raw = await pmdp_get_lockless(k, pmdp)
    pmdval = k.arch.decode(pmd_level, raw)
    if pmdval.kind is Kind.TABLE:
        return entry_addr(k, pmdval.paddr, pmd_level + 1, addr), pmdval
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


async def pte_unmap(k, ptep: int) -> None:
    """pte_unmap(): end the map (and its RCU read section, 6.6+)."""
    k.san.pte_unmapped(ptep)
    if k.profile.rcu_pte_map and "pte_offset_map_without_rcu" not in k.bugs:
        await rcu_read_unlock(k)


def pte_offset_kernel(k, pmdval: Entry, addr: int) -> int:
    """pte_offset_kernel(): kernel tables (init_mm): no validation, no RCU, no unmap."""
    return entry_addr(k, pmdval.paddr, k.arch.pmd_level + 1, addr)


def pte_lockptr(k, mm, pmdval: Entry) -> SpinLock:
    """pte_lockptr(mm, &pmdval): the split ptl of the table the *snapshot* names.

    A snapshot that names no table (possible only under the 6.4 rules, where the live pmd
    is used) yields the lock of whatever page it names: a bogus lock nobody else takes."""
    pt = k.ptdescs.get(pmdval.paddr)
    if pt is not None and pt.ptl is not None:
        return pt.ptl
    if pmdval.kind is Kind.TABLE and pt is None:
        return mm.page_table_lock             # split ptlocks off for this table size
    k.stats["bogus_ptl"] += 1
    return SpinLock(f"bogus-ptl@{pmdval.paddr:#x}")


def pmd_same(k, a: Entry, raw_b: int) -> bool:
    return k.arch.encode(k.arch.pmd_level, a) == raw_b


async def pte_offset_map_lock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock] | None:
    """pte_offset_map_lock(): map and take the ptl; under the ptl recheck pmd_same and
    start again if the pmd changed meanwhile. None when there is no PTE table (any more)."""
    if not k.profile.fallible_pte_map:        # 6.4: trust the live pmd, no recheck
        pmdval = k.arch.decode(k.arch.pmd_level, await get_raw(k, pmdp))
        ptl = pte_lockptr(k, mm, pmdval)
        ptep, _ = await __pte_offset_map(k, pmdp, addr)
        await traps.lock(ptl)
        return ptep, ptl
    while True:
        ptep, pmdval = await __pte_offset_map(k, pmdp, addr)
        if ptep is None:
            return None
        ptl = pte_lockptr(k, mm, pmdval)
        await traps.lock(ptl)
        if "pte_offset_map_lock_without_recheck" in k.bugs:
            return ptep, ptl
        if pmd_same(k, pmdval, await pmdp_get_lockless(k, pmdp)):
            return ptep, ptl
        await pte_unmap_unlock(k, ptep, ptl)
        k.stats["pte_map_lock_retry"] += 1
        await sched_point("retry", pmdp)


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


def _require_613(k, name: str) -> None:
    if not k.profile.rw_nolock:
        raise ApiError(f"{name}() exists from 6.13 on (profile {k.profile.name})")


async def pte_offset_map_for_write_nolock(k, mm, pmdp: int, addr: int) -> tuple[int, SpinLock, Entry] | None:
    """What a writer that locks later calls: _rw_nolock under 6.13, _nolock before."""
    if k.profile.rw_nolock:
        return await pte_offset_map_rw_nolock(k, mm, pmdp, addr)
    return await pte_offset_map_nolock(k, mm, pmdp, addr)
