"""Reclaim (mm/vmscan.c), reduced to its part that holds an anon folio's lock for a while:
shrink_folio_list() on folios already isolated from the LRU, with no swap device.

    folio_trylock()          a folio locked by someone else is kept (skipped)
    folio_referenced()       the anon rmap walk (anon_vma read lock, page_vma_mapped_walk,
                             ptep_clear_flush_young) under the folio lock
    add_to_swap()            fails without swap: activate_locked, folio_unlock()

What UFFDIO_MOVE's move_pages_pte() meets as folio-lock contention: its folio_trylock()
fails, so it unmaps both ptes, sleeps in folio_lock() and retries.
"""
from __future__ import annotations

from dataclasses import dataclass

from mm_core import rmap, shmem


@dataclass
class ReclaimResult:
    """What shrink_folio_list() did with one folio."""

    kept_locked: bool = False      # folio_trylock() failed: someone else holds it
    referenced: int = 0            # young ptes found (and cleared) by folio_referenced()
    mappings_found: int = 0        # ptes the rmap walk found mapping the folio
    mapcount: int = 0              # folio_mapcount() while the folio was locked
    activated: bool = False


async def shrink_folio_list(k, folios: list) -> list[ReclaimResult]:
    """shrink_folio_list() for isolated anon folios and no swap: lock, check references
    through the rmap, fail add_to_swap(), activate and unlock. A folio locked by another
    task is kept for a later pass (skip)."""
    results = []
    for folio in folios:
        res = ReclaimResult()
        results.append(res)
        if not await shmem.folio_trylock(k, folio):
            res.kept_locked = True
            k.stats["reclaim_kept_locked"] += 1
            continue
        res.mapcount = folio.mapcount
        res.referenced, res.mappings_found = await rmap.folio_referenced_anon(k, folio)
        # folio_test_anon && !folio_test_swapcache: add_to_swap() fails with no swap device
        res.activated = True
        folio.extra["active"] = True                 # activate_locked: folio_set_active()
        k.stats["reclaim_activated"] += 1
        shmem.folio_unlock(folio)
    return results
