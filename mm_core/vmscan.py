"""Reclaim (mm/vmscan.c): shrink_folio_list() on anon folios already isolated from the LRU.

    folio_trylock()          a folio locked by someone else is kept (skipped)
    folio_referenced()       the anon rmap walk (anon_vma read lock, page_vma_mapped_walk,
                             ptep_clear_flush_young) under the folio lock
    add_to_swap()            a slot and the swap cache; fails without a swap area (or with
                             it full, or being swapped off): activate_locked, folio_unlock()
    try_to_unmap()           every pte becomes the swap entry (rmap.try_to_unmap_one); a
                             folio still mapped afterwards is activated
    pageout()                swap_writepage(): the bytes go to the slot
    __remove_mapping()       only if nobody else holds a reference (refcount frozen at the
                             isolation's + the cache's): out of the swap cache (the slot
                             stays: the swap ptes hold it) and freed

With a swap area, folio_check_references() comes first (6.6 reclaim_pages() does not
ignore references): a pte found young again since MADV_PAGEOUT cleared it keeps the folio
(FOLIOREF_KEEP; more than one: FOLIOREF_ACTIVATE). Without one, every swap-backed anon
folio is activated, as before (what UFFDIO_MOVE's move_pages_pte() meets as folio-lock
contention: its folio_trylock() fails, so it unmaps both ptes, sleeps and retries).
"""
from __future__ import annotations

from dataclasses import dataclass

from mm_core import rmap, shmem
from mm_core.page_alloc import PageUse


@dataclass
class ReclaimResult:
    """What shrink_folio_list() did with one folio."""

    kept_locked: bool = False      # folio_trylock() failed: someone else holds it
    referenced: int = 0            # young ptes found (and cleared) by folio_referenced()
    mappings_found: int = 0        # ptes the rmap walk found mapping the folio
    mapcount: int = 0              # folio_mapcount() while the folio was locked
    activated: bool = False
    kept: bool = False             # FOLIOREF_KEEP, or __remove_mapping() found other references
    unmap_failed: bool = False     # still mapped after try_to_unmap()
    reclaimed: bool = False        # written to swap and freed


async def shrink_folio_list(k, folios: list, isolated: bool = False) -> list[ReclaimResult]:
    """shrink_folio_list() for isolated anon folios. ``isolated``: the caller holds one
    reference per folio (folio_isolate_lru's), which this consumes (folio_putback_lru or
    the free). A folio locked by another task is kept for a later pass (skip)."""
    results = []
    for folio in folios:
        res = ReclaimResult()
        results.append(res)
        await shrink_one(k, folio, res, isolated)
        if isolated and not res.reclaimed:
            from mm_core.memory import put_page
            put_page(k, folio)                       # folio_putback_lru()
    return results


async def shrink_one(k, folio, res: ReclaimResult, isolated: bool) -> None:
    from mm_core import swap_state
    if not await shmem.folio_trylock(k, folio):
        res.kept_locked = True
        k.stats["reclaim_kept_locked"] += 1
        return
    res.mapcount = folio.mapcount
    res.referenced, res.mappings_found = await rmap.folio_referenced_anon(k, folio)
    si = k.swap_info
    if si is None:
        # folio_test_anon && !folio_test_swapcache: add_to_swap() fails with no swap area
        _activate_locked(k, folio, res)
        return
    if res.referenced:                               # folio_check_references()
        if res.referenced > 1:
            _activate_locked(k, folio, res)
        else:
            res.kept = True
            k.stats["reclaim_kept_referenced"] += 1
            shmem.folio_unlock(folio)
        return
    if folio.use is PageUse.ANON and "swap" not in folio.extra:
        if folio.order != k.page_order or not await swap_state.add_to_swap(k, folio):
            _activate_locked(k, folio, res)          # no slot (or a THP: split not modelled)
            return
    if folio.mapcount:
        await rmap.try_to_unmap_anon(k, folio)
        if folio.mapcount:
            res.unmap_failed = True
            k.stats["reclaim_unmap_failed"] += 1
            _activate_locked(k, folio, res)
            return
    await swap_state.swap_writepage(k, folio)        # pageout(): PAGE_SUCCESS, no writeback left
    # __remove_mapping(): folio_ref_freeze(folio, 1 + nr) -- the isolation's and the cache's
    if folio.refcount != 1 + int(isolated):
        res.kept = True
        k.stats["reclaim_kept_refs"] += 1
        shmem.folio_unlock(folio)
        return
    if not isolated:
        folio.refcount += 1                          # the reference put below frees it
    await swap_state.delete_from_swap_cache(k, folio)   # the slot stays for the swap ptes
    shmem.folio_unlock(folio)
    from mm_core.memory import put_page
    put_page(k, folio)
    res.reclaimed = True
    k.stats["reclaim_swapped_out"] += 1


def _activate_locked(k, folio, res: ReclaimResult) -> None:
    res.activated = True
    folio.extra["active"] = True                     # activate_locked: folio_set_active()
    k.stats["reclaim_activated"] += 1
    shmem.folio_unlock(folio)
