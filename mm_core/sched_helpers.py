"""Kernel activities that scenarios drive as tasks but Linux runs inside bigger paths."""
from __future__ import annotations

from emu.sched import traps
from mm_core import huge_memory

MIGRATION_STALL_CYCLES = 10_000_000     # the copy takes a while (a CPU going offline, ...)


async def stalled_thp_migration(k, vma, pmdp: int) -> bool:
    """migrate_pages() of one THP: the pmd is a migration entry while the folio is copied
    (here: a long stall in simulated time), then the mapping comes back."""
    leaf = await huge_memory.set_pmd_migration_entry(k, vma, pmdp)
    if leaf is None:
        return False
    await traps.sleep(MIGRATION_STALL_CYCLES)
    await huge_memory.remove_migration_pmd(k, vma, pmdp, leaf)
    return True
