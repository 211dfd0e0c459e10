"""madvise (mm/madvise.c): MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT,
MADV_WILLNEED, MADV_HUGEPAGE / MADV_NOHUGEPAGE, MADV_COLLAPSE, MADV_MERGEABLE /
MADV_UNMERGEABLE (mm_core/ksm.py).

MADV_FREE, MADV_COLD, MADV_PAGEOUT and MADV_WILLNEED are walk_page_range() users whose
pmd_entry maps the PTE table with pte_offset_map_lock() and answers a failed map with
``return 0`` (MADV_WILLNEED: ``break``, then 0): SKIP (that pmd's extent is left alone;
the walker does not retry). A huge pmd is handled whole under pmd_trans_huge_lock() when
the range covers it; a partial range (or a PTE-mapped large folio) wants split_folio(),
which the model does not have: it behaves as a split that failed (the kernel's outcome
when the folio has extra references), so the THP is left alone (return 0 / break).

The model has no LRU lists; a swap area exists only after swapon (mm_core/swapfile.py):
  MADV_FREE     clears young and dirty of exclusively mapped anon ptes (and of a whole
                THP's pmd) and marks the folio lazyfree; rss is unchanged until reclaim;
                a swap pte is dropped (free_swap_and_cache)
  MADV_COLD     clears young (pte and pmd) and deactivates the folio: counted in
                ``k.stats["madv_cold_deactivated"]``, there is no LRU to move it on
  MADV_PAGEOUT  as MADV_COLD, then reclaim_pages() on the isolated folios: a clean
                lazyfree anon page is discarded (the next read sees zeroes); a small
                swap-backed anon page is swapped out when there is a swap area (the next
                access faults it back in: do_swap_page); shmem pages and THPs stay
  MADV_WILLNEED reads the swapped-out pages of the range into the swap cache (anon: the
                swap ptes; shmem: the swap entries of the page cache, shmem_swapin_range)
"""
from __future__ import annotations

from emu.arch import Kind
from emu.sched import traps
from mm_core import huge_memory, khugepaged, memory, pagewalk, pgtable, swap_state, swapfile, vmscan
from mm_core.locks import mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import VM_HUGEPAGE, VM_LOCKED, VM_NOHUGEPAGE
from mm_core.mmap import EINVAL, ENOMEM, page_align, split_range
from mm_core.page_alloc import PageUse
from mm_core.tlbflush import flush_tlb_range

MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTNEED = 0, 1, 2, 3, 4
MADV_FREE, MADV_COLD, MADV_PAGEOUT = 8, 20, 21
EINTR = 4
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MADV_COLLAPSE = 25
MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13          # mm/ksm.c ksm_madvise()
_NO_OPS = (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL)


async def do_madvise(k, mm, start: int, length: int, behavior: int) -> int:
    """do_madvise(): 0 or -errno (-ENOMEM if part of the range is unmapped, after the
    advice was applied to the mapped parts, as Linux does)."""
    if start % k.page_size or length < 0:
        return -EINVAL
    end = start + page_align(length, k.page_size)
    if end == start:
        return 0
    if behavior == MADV_COLLAPSE:
        return await khugepaged.madvise_collapse(k, mm, start, end)
    if behavior == MADV_DONTNEED:
        return await madvise_dontneed(k, mm, start, end)
    if behavior in (MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED):
        return await madvise_walk_vmas(k, mm, start, end, behavior)
    if behavior in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
        return await madvise_hugepage(k, mm, start, end, behavior)
    if behavior in (MADV_MERGEABLE, MADV_UNMERGEABLE):
        if not _covered(mm, start, end):
            return -ENOMEM
        from mm_core import ksm
        return await ksm.ksm_madvise(k, mm, start, end, behavior)
    if behavior in _NO_OPS:
        return 0 if _covered(mm, start, end) else -ENOMEM
    return -EINVAL


def _covered(mm, start: int, end: int) -> bool:
    addr = start
    for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
        if vma.start > addr:
            return False
        addr = vma.end
    return addr >= end


async def madvise_dontneed(k, mm, start: int, end: int) -> int:
    """madvise_walk_vmas() -> madvise_dontneed_free() -> madvise_dontneed_single_vma() ->
    zap_page_range_single(): drop the mappings (anon memory reads back as zero, file memory
    from the page cache). mmap_read_lock only. A VMA whose userfaultfd context asked for
    UFFD_FEATURE_EVENT_REMOVE first gets userfaultfd_remove(), which drops mmap_lock
    until the handler has read UFFD_EVENT_REMOVE; then the lock is taken again, the VMA
    looked up afresh (gone: -ENOMEM; VM_LOCKED now: -EINVAL) and the range clipped to it
    (the rest is walked on: a split VMA gets a repeated REMOVE for its part)."""
    from mm_core.userfaultfd import userfaultfd_remove
    await mmap_read_lock(mm)
    try:
        vmas = mm.overlapping(start, end)
        if any(v.flags & VM_LOCKED for v in vmas):
            return -EINVAL
        unmapped = 0 if _covered(mm, start, end) else -ENOMEM
        addr = start
        while addr < end:
            vma = mm.find_vma(addr)
            if vma is None or vma.start >= end:
                break
            lo, hi = max(addr, vma.start), min(end, vma.end)
            if not await userfaultfd_remove(k, vma, lo, hi):
                await mmap_read_lock(mm)            # mmap_lock was dropped: look again
                vma = mm.vma_lookup(lo)
                if vma is None:
                    return -ENOMEM
                if vma.flags & VM_LOCKED:
                    return -EINVAL
                hi = min(hi, vma.end)
            # zap_details.reclaim_pt: 6.14's PT_RECLAIM frees the tables this empties
            await memory.unmap_page_range(k, vma, lo, hi, reclaim_pt=True)
            addr = hi
        k.stats["madv_dontneed"] += 1
        return unmapped
    finally:
        await mmap_read_unlock(mm)


async def madvise_hugepage(k, mm, start: int, end: int, behavior: int) -> int:
    """hugepage_madvise(): set VM_HUGEPAGE / VM_NOHUGEPAGE and register with khugepaged."""
    await mmap_write_lock(mm)
    try:
        for vma in split_range(mm, start, end):
            if behavior == MADV_HUGEPAGE:
                vma.flags = (vma.flags | VM_HUGEPAGE) & ~VM_NOHUGEPAGE
                k.khugepaged.enter(mm)
            else:
                vma.flags = (vma.flags | VM_NOHUGEPAGE) & ~VM_HUGEPAGE
        mm.merge_adjacent()
        return 0 if _covered(mm, start, end) else -ENOMEM
    finally:
        await mmap_write_unlock(mm)


# -- MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED: walk_page_range() users -----------------

async def madvise_walk_vmas(k, mm, start: int, end: int, behavior: int) -> int:
    """madvise_walk_vmas() under mmap_read_lock for the LRU advices: each VMA in turn; an
    error stops the walk, an unmapped gap is -ENOMEM after the mapped parts are done."""
    await mmap_read_lock(mm)
    try:
        for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
            lo, hi = max(start, vma.start), min(end, vma.end)
            if behavior == MADV_FREE:
                err = await madvise_free_single_vma(k, vma, lo, hi)
            elif behavior == MADV_WILLNEED:
                err = await madvise_willneed(k, vma, lo, hi)
            else:
                err = await madvise_cold_or_pageout(k, vma, lo, hi, behavior == MADV_PAGEOUT)
            if err:
                return err
        return 0 if _covered(mm, start, end) else -ENOMEM
    finally:
        await mmap_read_unlock(mm)


async def madvise_free_single_vma(k, vma, start: int, end: int) -> int:
    """madvise_free_single_vma(): anonymous VMAs only (-EINVAL otherwise, and for VM_LOCKED
    as madvise_dontneed_free_valid_vma() says); walk with madvise_free_pte_range, then
    tlb_finish_mmu() flushes."""
    if not vma.anonymous or vma.flags & VM_LOCKED:
        return -EINVAL
    await pagewalk.walk_page_range(k, vma.mm, start, end, MADV_FREE_OPS)
    await flush_tlb_range(k, vma.mm, start, end)
    k.stats["madv_free"] += 1
    return 0


async def madvise_free_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """madvise_free_pte_range(): a huge pmd goes to madvise_free_huge_pmd(); otherwise,
    under the ptl, every exclusively mapped anon pte is made old and clean and its folio
    lazyfree. A failed pte_offset_map_lock() is SKIP (return 0)."""
    k, arch, vma = walk.k, walk.k.arch, walk.vma
    mm = vma.mm
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind is Kind.LEAF:
        if await huge_memory.madvise_free_huge_pmd(k, vma, pmdp, addr, end):
            return 0
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None and "madvise_free_ignores_map_failure" in k.bugs:
        await pgtable.walk_stale_pte_table(k, pmdval, addr, end)   # bug injection: walks on
        return 0
    if locked is None:
        k.stats["madv_free_map_failed"] += 1
        return 0                                        # SKIP
    ptep, ptl = locked
    nr_swap = 0
    for i in range((end - addr) >> k.page_shift):
        entp = ptep + 8 * i
        ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, entp))
        if ptent.kind is Kind.NONE:
            continue
        if ptent.kind is not Kind.LEAF:
            if swapfile.is_swap_pte(ptent):             # the data is not needed: drop the slot
                nr_swap -= 1
                await swapfile.free_swap_and_cache(k, ptent)
                await pgtable.clear_entry(k, entp, arch.pte_level)
            continue
        folio = None if ptent.special else k.alloc.page_of(ptent.paddr)
        if folio is None:
            continue
        if folio.order != k.page_order:                 # a large folio: split_folio() not modelled
            k.stats["madv_free_large_folio_break"] += 1
            break
        if folio.extra.get("dirty"):
            if folio.locked or folio.mapcount != 1:     # !folio_trylock() / shared: keep it dirty
                continue
            folio.extra.pop("dirty")                    # folio_clear_dirty()
        if ptent.young or ptent.dirty:
            await pgtable.clear_entry(k, entp, arch.pte_level)      # ptep_get_and_clear_full()
            await pgtable.set_entry(k, entp, arch.pte_level, ptent.with_(young=False, dirty=False))
            await flush_tlb_range(k, mm, addr + i * k.page_size, addr + (i + 1) * k.page_size)
        if folio.use is PageUse.ANON:                   # folio_mark_lazyfree()
            folio.extra["lazyfree"] = True
            k.stats["madv_free_lazyfree"] += 1
    if nr_swap:
        mm.rss[2] += nr_swap                            # MM_SWAPENTS
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


MADV_FREE_OPS = pagewalk.MmWalkOps(pmd_entry=madvise_free_pte_range)


async def madvise_cold_or_pageout(k, vma, start: int, end: int, pageout: bool) -> int:
    """madvise_cold() / madvise_pageout(): -EINVAL unless can_madv_lru_vma() (no
    VM_LOCKED); walk with madvise_cold_or_pageout_pte_range, then flush."""
    if vma.flags & VM_LOCKED:
        return -EINVAL
    private = {"pageout": pageout}
    await pagewalk.walk_page_range(k, vma.mm, start, end, COLD_WALK_OPS, private)
    await flush_tlb_range(k, vma.mm, start, end)
    k.stats["madv_pageout" if pageout else "madv_cold"] += 1
    return 0


def _deactivate(k, folio, pageout: bool, isolated: list, vma, addr: int) -> None:
    """folio_clear_referenced() + folio_test_clear_young(), then folio_deactivate() for
    MADV_COLD (no LRU here: only counted) or folio_isolate_lru() onto the reclaim list,
    with its one mapping (the anon rmap's answer), for MADV_PAGEOUT."""
    if pageout:
        folio.refcount += 1                             # folio_isolate_lru(): reclaim's reference
        isolated.append((folio, vma, addr))
    else:
        k.stats["madv_cold_deactivated"] += 1


async def madvise_cold_or_pageout_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """madvise_cold_or_pageout_pte_range(): a huge pmd covering the whole range is made old
    and its folio deactivated (or reclaimed); a partial one wants split_folio() (not
    modelled: as if it failed, return 0). PTEs: a failed pte_offset_map_lock() is SKIP
    (return 0); young is cleared on every exclusively mapped small folio."""
    k, arch, vma = walk.k, walk.k.arch, walk.vma
    mm = vma.mm
    pageout = walk.private["pageout"]
    isolated: list = []
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind is Kind.LEAF:
        pml, orig = await huge_memory.pmd_trans_huge_lock(k, mm, pmdp)
        if pml is None:
            return 0
        folio = k.alloc.page_of(orig.paddr) if orig.kind is Kind.LEAF else None
        if folio is not None and folio.mapcount == 1:   # folio_estimated_sharers() == 1
            if end - addr != huge_memory.hpage_pmd_size(k):
                k.stats["madv_cold_split_folio_unmodelled"] += 1
            else:
                if orig.young:                          # pmdp_invalidate() + pmd_mkold()
                    await pgtable.set_entry(k, pmdp, arch.pmd_level, orig.with_(young=False))
                    await flush_tlb_range(k, mm, addr, end)
                _deactivate(k, folio, pageout, isolated, vma, addr)
        await traps.unlock(pml)
        if pageout:
            await reclaim_pages(k, isolated)
        return 0
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None and "madvise_cold_uses_stale_pmd" in k.bugs:
        await pgtable.walk_stale_pte_table(k, pmdval, addr, end)   # bug injection: walks on
        return 0
    if locked is None:
        k.stats["madv_cold_map_failed"] += 1
        return 0                                        # SKIP
    ptep, ptl = locked
    for i in range((end - addr) >> k.page_shift):
        entp = ptep + 8 * i
        ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, entp))
        if ptent.kind is not Kind.LEAF:
            continue
        folio = None if ptent.special else k.alloc.page_of(ptent.paddr)
        if folio is None:
            continue
        if folio.order != k.page_order:                 # split_folio() not modelled: a failed split
            k.stats["madv_cold_large_folio_break"] += 1
            break
        if folio.mapcount != 1:                         # do not interfere with other mappings
            continue
        if ptent.young:
            await pgtable.clear_entry(k, entp, arch.pte_level)
            await pgtable.set_entry(k, entp, arch.pte_level, ptent.with_(young=False))
            await flush_tlb_range(k, mm, addr + i * k.page_size, addr + (i + 1) * k.page_size)
        _deactivate(k, folio, pageout, isolated, vma, addr + i * k.page_size)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    if pageout:
        await reclaim_pages(k, isolated)
    return 0


COLD_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=madvise_cold_or_pageout_pte_range)


async def reclaim_pages(k, isolated: list) -> int:
    """reclaim_pages() -> shrink_folio_list() on the folios the walk isolated (each with
    the isolation's reference, which reclaim consumes): a lazyfree anon folio is unmapped
    and freed if still clean (try_to_unmap_one's MADV_FREE discard, no swap needed); a
    swap-backed anon folio is swapped out when there is a swap area
    (vmscan.shrink_folio_list: add_to_swap, try_to_unmap, pageout, __remove_mapping); so
    is a small shmem folio (try_to_unmap of its file ptes, pageout = shmem_writepage; the
    caller is taken to own the file: can_do_file_pageout()); every other folio (a THP, a
    large shmem folio, no swap area) goes back to the LRU."""
    reclaimed = 0
    to_swap = []
    for folio, vma, addr in isolated:
        small_anon = folio.use is PageUse.ANON and folio.order == k.page_order
        if small_anon and folio.extra.get("lazyfree"):
            if await try_to_unmap_lazyfree(k, folio, vma, addr):
                reclaimed += 1
                memory.put_page(k, folio)                # the isolation's reference: freed
                continue
        elif small_anon and k.swap_info is not None:
            to_swap.append(folio)
            continue
        elif (folio.use is PageUse.SHMEM and folio.order == k.page_order and k.swap_info is not None
              and folio.mapping is not None):
            to_swap.append(folio)                        # shmem_writepage() through pageout()
            continue
        k.stats["pageout_kept"] += 1
        memory.put_page(k, folio)                        # folio_putback_lru()
    if to_swap:
        for res in await vmscan.shrink_folio_list(k, to_swap, isolated=True):
            reclaimed += res.reclaimed
            k.stats["pageout_kept"] += not res.reclaimed
    k.stats["pageout_reclaimed"] += reclaimed
    return reclaimed


async def try_to_unmap_lazyfree(k, folio, vma, addr: int) -> bool:
    """try_to_unmap_one() for an exclusively mapped lazyfree anon folio, found through its
    anon rmap at (vma, addr) by page_vma_mapped_walk() (no PVMW_SYNC: reclaim does not
    pass TTU_SYNC): a failed map makes the walk reread the pmd, and a table retracted
    or zapped meanwhile means the folio is not mapped there (nothing unmapped). The pte
    is cleared and flushed; if it was dirtied again (or the folio is), it is put back and
    the folio is swap-backed again; otherwise the page is discarded (MM_ANONPAGES drops,
    the page is freed)."""
    from mm_core import mmu_notifier
    rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, vma.mm, addr, addr + k.page_size)
    try:
        return await _try_to_unmap_lazyfree(k, folio, vma, addr)
    finally:
        await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)


async def _try_to_unmap_lazyfree(k, folio, vma, addr: int) -> bool:
    """try_to_unmap_lazyfree()'s walk, inside its mmu_notifier range."""
    from mm_core.page_vma_mapped import folio_vma_walk, page_vma_mapped_walk, page_vma_mapped_walk_done
    mm, arch = vma.mm, k.arch
    pvmw = folio_vma_walk(k, folio, vma, addr)
    ok = False
    while await page_vma_mapped_walk(k, pvmw):
        if pvmw.pte is None:                                         # PMD-mapped: not a small folio
            await page_vma_mapped_walk_done(k, pvmw)
            break
        ptep = pvmw.pte
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        await pgtable.clear_entry(k, ptep, arch.pte_level)          # ptep_clear_flush()
        await flush_tlb_range(k, mm, pvmw.address, pvmw.address + k.page_size)
        if pte.dirty:
            folio.extra["dirty"] = True                              # folio_mark_dirty()
        if folio.refcount == folio.mapcount + 1 and not folio.extra.get("dirty"):   # + isolation's
            memory._put_mapped_page(k, mm, folio)                    # discard
            k.stats["lazyfree_discarded"] += 1
            ok = True
            continue
        await pgtable.set_entry(k, ptep, arch.pte_level, pte)        # redirtied: remap
        folio.extra.pop("lazyfree", None)                            # folio_set_swapbacked()
        k.stats["lazyfree_redirtied"] += 1
        await page_vma_mapped_walk_done(k, pvmw)
        break
    return ok


# -- MADV_WILLNEED ------------------------------------------------------------------------------

async def madvise_willneed(k, vma, start: int, end: int) -> int:
    """madvise_willneed() (6.6; ``*prev = vma``, no mmap_lock dropped on these paths): an
    anonymous VMA gets the swapin_walk_ops walk (its swap ptes' entries read into the
    swap cache), a shmem VMA shmem_swapin_range() (the swap entries of the mapping's page
    cache over the range), each followed by lru_add_drain() (no LRU here: nothing to
    push). Neither maps anything: the later fault finds the folio in the swap cache.

    A regular file would go to vfs_fadvise(POSIX_FADV_WILLNEED) with mmap_lock dropped
    (``*prev = NULL``, get_file(), mmap_read_unlock(), readahead, mmap_read_lock(); 6.16+
    says mark_mmap_lock_dropped()): not modelled, the model has no files but shmem
    (do_fault() answers SIGBUS for any other), so no page-cache readahead exists."""
    from mm_core import shmem
    if vma.anonymous:
        await pagewalk.walk_page_range(k, vma.mm, start, end, SWAPIN_WALK_OPS, vma)
    elif isinstance(vma.file, shmem.ShmemInode):                # shmem_mapping()
        await shmem_swapin_range(k, vma, start, end, vma.file.mapping)
    else:
        raise NotImplementedError("madvise_willneed: vfs_fadvise() of a non-shmem file is not modelled")
    k.stats["madv_willneed"] += 1
    return 0


async def shmem_swapin_range(k, vma, start: int, end: int, mapping) -> None:
    """shmem_swapin_range() (6.5+, Hugh Dickins' "mm/madvise: clean up
    force_shm_swapin_readahead()"): under rcu_read_lock(), xas_for_each() over the
    mapping's i_pages from linear_page_index(start) to linear_page_index(end) - 1; each
    value (swap) entry: its address in the VMA, xas_pause(), rcu_read_unlock(),
    read_swap_cache_async(entry, vma, addr) (the folio put at once), rcu_read_lock()
    again and on from the next index. Folios are skipped (``!xa_is_value``).

    The entry is read under RCU but used after it: by then truncation, swapoff or a
    fault may have freed the slot. read_swap_cache_async() copes (SKIP that entry):
    get_swap_device() fails once swapoff is done; a slot with no count left is not read
    (``!swap_swapcount() && swap_slot_cache_enabled``, or swapcache_prepare()'s
    -ENOENT); a folio another reader put in the swap cache is found there. A slot freed
    after swapcache_prepare() holds SWAP_HAS_CACHE is read into a swap-cache folio no
    index names, which reclaim frees. Nothing is mapped and the index keeps its swap
    entry; the fault's shmem_swapin_folio() finds the folio in the swap cache."""
    from mm_core.filemap import linear_page_index
    from mm_core.rcu import rcu_read_lock, rcu_read_unlock
    index = linear_page_index(vma, start)
    end_index = linear_page_index(vma, end) - 1
    await rcu_read_lock(k)
    while True:
        await traps.sched_point("xas_find", (mapping.host.ino, index))    # xas_for_each()
        found = [i for i in mapping.swap_entries if index <= i <= end_index]
        if not found:
            break
        nxt = min(found)
        ent = swapfile.swp_entry_to_pte(mapping.swap_entries[nxt])      # radix_to_swp_entry()
        addr = vma.start + ((nxt - vma.pgoff) << k.page_shift)
        index = nxt + 1                                                  # xas_pause()
        in_rcu = "shmem_swapin_range_reads_under_rcu" in k.bugs          # bug injection
        if not in_rcu:
            await rcu_read_unlock(k)
        folio = await swap_state.read_swap_cache_async(k, ent, vma, addr)
        if folio is not None:
            k.stats["shmem_swapin_range_read"] += 1
            memory.put_page(k, folio)
        else:
            k.stats["shmem_swapin_range_skipped"] += 1
        if not in_rcu:
            await rcu_read_lock(k)
    await rcu_read_unlock(k)


async def swapin_walk_pmd_entry(pmdp: int, start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """swapin_walk_pmd_entry() (6.5+): pte_offset_map_lock() per batch, each swap pte's
    entry read (ptep_get) under the ptl; the map is dropped for read_swap_cache_async()
    and taken again for the next pte. A failed map is ``break`` and ``return 0``: SKIP
    the rest of the pmd's extent (no ACTION_AGAIN)."""
    k, arch, vma = walk.k, walk.k.arch, walk.private
    if not k.profile.fallible_pte_map and not await swapfile.pmd_is_table_64(k, pmdp):
        return 0                                        # 6.4: pmd_none_or_trans_huge_or_clear_bad()
    ptep = ptl = None
    addr = start
    while addr < end:
        if ptep is None:                                # if (!ptep++) ptep = pte_offset_map_lock()
            locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
            if locked is None:
                k.stats["swapin_walk_map_failed"] += 1
                break                                   # SKIP
            ptep, ptl = locked
        else:
            ptep += 8
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if not swapfile.is_swap_pte(ent):
            addr += k.page_size
            continue
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        ptep = ptl = None
        folio = await swap_state.read_swap_cache_async(k, ent, vma, addr)
        if folio is not None:
            k.stats["swapin_walk_read"] += 1
            memory.put_page(k, folio)
        addr += k.page_size
    if ptep is not None:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


SWAPIN_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=swapin_walk_pmd_entry)
