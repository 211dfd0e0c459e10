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

from collections import Counter
from dataclasses import dataclass, field

from emu.arch import Kind
from emu.sched import traps
from mm_core import pgtable, rmap, shmem
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


# -- MGLRU (CONFIG_LRU_GEN): the aging's page-table walk and the rmap look-around ---------------
#
# What is modelled: one lruvec (one node, no memcg) with max_seq/min_seq, a folio's
# generation (``folio.extra["lru_gen"]``, the gen number folio_update_gen() writes into
# folio->flags), the Bloom filters of PMD entries that pointed at PTE tables worth
# scanning (exact sets here: a filter without false positives), and the walk itself:
# walk_mm() -> walk_page_range() -> walk_pmd_range() -> walk_pte_range() /
# walk_pmd_range_locked(), clearing young bits in the real tables. Not modelled: the LRU
# lists, eviction, tiers and refaults, the PID controller, mm_list iteration (the caller
# names the mm), need_resched() breaks, batching of huge pmds in walk_pmd_range_locked()
# (each is handled at once), non-leaf pmd young bits (should_clear_pmd_young() is taken
# as false) and vma_has_recency() (always true).
MAX_NR_GENS = 4
MIN_NR_GENS = 2
MIN_LRU_BATCH = 64            # BITS_PER_LONG
PTRS_PER_CACHELINE = 8        # clamp(cache_line_size() / sizeof(pte_t), 2, 8) for 64-byte lines


@dataclass
class LruGenFolio:
    """struct lru_gen_folio of the one lruvec, plus its mm_state's Bloom filters and the
    lru_gen_enabled() switch (/sys/kernel/mm/lru_gen/enabled; off by default here so that
    folio_referenced() behaves as the classic LRU unless a test turns MGLRU on)."""

    max_seq: int = MIN_NR_GENS + 1
    min_seq: int = 0
    enabled: bool = False
    filters: dict = field(default_factory=dict)      # seq -> set of pmd entry addresses


def get_lruvec(k) -> LruGenFolio:
    """mem_cgroup_lruvec(memcg, pgdat) of the only node and memcg."""
    if k.lrugen is None:
        k.lrugen = LruGenFolio()
    return k.lrugen


def lru_gen_enabled(k) -> bool:
    return k.lrugen is not None and k.lrugen.enabled


def lru_gen_from_seq(seq: int) -> int:
    return seq % MAX_NR_GENS


@dataclass
class LruGenMmWalk:
    """struct lru_gen_mm_walk: one aging walk's state and counters (mm_stats)."""

    max_seq: int
    force_scan: bool = True
    can_swap: bool = True          # swappiness != 0 with a swap device: anon VMAs are walked
    mm_stats: Counter = field(default_factory=Counter)
    batched: int = 0
    nr_moved: int = 0              # folios whose generation changed (update_batch_size)
    skipped_pmds: list = field(default_factory=list)   # pmds walk_pte_range() gave up on
    err: int = 0


def test_bloom_filter(lruvec: LruGenFolio, seq: int, pmdp: int) -> bool:
    """test_bloom_filter(): no filter for ``seq`` yet means "scan everything"."""
    f = lruvec.filters.get(seq)
    return f is None or pmdp in f


def update_bloom_filter(lruvec: LruGenFolio, seq: int, pmdp: int) -> None:
    lruvec.filters.setdefault(seq, set()).add(pmdp)


def suitable_to_scan(total: int, young: int) -> bool:
    """suitable_to_scan(): at least one young pte per cache line on average."""
    return young * PTRS_PER_CACHELINE >= total


def folio_lru_gen(k, folio) -> int:
    """folio_lru_gen(): -1 for an isolated folio, else its generation; a folio no walk
    has touched yet is in the oldest one (min_seq)."""
    if folio.extra.get("lru_isolated"):
        return -1
    return folio.extra.get("lru_gen", lru_gen_from_seq(get_lruvec(k).min_seq))


def folio_update_gen(k, folio, gen: int) -> int:
    """folio_update_gen() (6.6): move the folio to generation ``gen``; an isolated folio
    only gets PG_referenced (for shrink_folio_list()). Returns the old generation or -1."""
    old = folio_lru_gen(k, folio)
    if old < 0:
        folio.extra["referenced"] = True
        return -1
    folio.extra["lru_gen"] = gen
    return old


def should_skip_vma(k, vma, walk: LruGenMmWalk) -> bool:
    """should_skip_vma(): inaccessible (PROT_NONE), mlocked and special VMAs are never
    walked; anon and shmem ones only when anon pages can be swapped."""
    from mm_core.mm import VM_EXEC, VM_LOCKED, VM_READ, VM_WRITE
    if not vma.flags & (VM_READ | VM_WRITE | VM_EXEC):       # !vma_is_accessible()
        return True
    if vma.flags & VM_LOCKED:
        return True
    if vma.anonymous:
        return not walk.can_swap
    return not walk.can_swap                                 # every file here is shmem


def get_pte_pfn(k, ent) -> int:
    """get_pte_pfn() (6.6): -1 unless present, not the zero page and not special."""
    if ent.kind is not Kind.LEAF or ent.special or ent.paddr == k.zero_page.paddr:
        return -1
    return ent.paddr >> k.page_shift


def get_pfn_folio(k, pfn: int, walk_can_swap: bool):
    """get_pfn_folio() (6.6): the folio, unless it is anon and anon cannot be swapped."""
    folio = k.alloc.page_of(pfn << k.page_shift)
    if folio is None:
        return None
    if folio.use is PageUse.ANON and not walk_can_swap:       # !folio_is_file_lru() && !can_swap
        return None
    return folio


async def ptep_test_and_clear_young(k, ptep: int) -> bool:
    """ptep_test_and_clear_young(): clear the accessed bit (no TLB flush: MGLRU does not
    flush, a stale TLB entry only delays the next young bit)."""
    ent = k.arch.decode(k.arch.pte_level, await pgtable.get_raw(k, ptep))
    if ent.kind is not Kind.LEAF or not ent.young:
        return False
    await pgtable.set_entry(k, ptep, k.arch.pte_level, ent.with_(young=False))
    return True


def _promote(k, walk: LruGenMmWalk | None, folio, new_gen: int) -> None:
    """The young-folio tail of walk_pte_range() / lru_gen_look_around() (6.6)."""
    if walk is not None:
        old = folio_update_gen(k, folio, new_gen)
        if old >= 0 and old != new_gen:
            walk.batched += 1                               # update_batch_size()
            walk.nr_moved += 1
        return
    old = folio_lru_gen(k, folio)
    if old < 0:
        folio.extra["referenced"] = True                    # folio_set_referenced()
    elif old != new_gen:
        folio.extra["lru_gen"] = new_gen                    # folio_activate(): to max_seq
        k.stats["lru_gen_folio_activate"] += 1


async def walk_pte_range(k, mm, pmdp: int, val, segments: list, walk: LruGenMmWalk) -> bool:
    """walk_pte_range() (mm/vmscan.c): clear the young bits of one PTE table, over every
    VMA segment that falls in it (get_next_vma(): "finish an entire PMD table"). The table
    is mapped from walk_pmd_range()'s stack copy ``val`` with pte_offset_map_nolock()
    (6.13: _rw_nolock), then spin_trylock(ptl). A failed map or trylock returns false:
    SKIP (the extent is not aged this time and the pmd does not go into the next Bloom
    filter). 6.13 adds pmd_same(pmdval, pmdp_get_lockless(pmd)), but ``pmd`` is the
    stack copy, so that recheck cannot fail; what keeps the writes safe is that ptes are
    re-read under the ptl before ptep_test_and_clear_young() (the pte_same-style check)."""
    arch = k.arch
    new_gen = lru_gen_from_seq(walk.max_seq)
    pmd_span = arch.levels[arch.pmd_level].span
    base = segments[0][0] & ~(pmd_span - 1)
    mapped = await pgtable.pte_offset_map_nolock_copy(k, mm, val, base, pmdp)
    if mapped is None:
        k.stats["lru_gen_walk_pte_map_failed"] += 1
        walk.skipped_pmds.append(pmdp)
        return False
    ptep0, ptl, pmdval = mapped
    if not await traps.trylock(ptl):
        await pgtable.pte_unmap(k, ptep0)
        k.stats["lru_gen_walk_pte_trylock_failed"] += 1
        walk.skipped_pmds.append(pmdp)
        return False
    if k.profile.rw_nolock and not pgtable.pmd_same(k, pmdval, arch.encode(arch.pmd_level, val)):
        await pgtable.pte_unmap_unlock(k, ptep0, ptl)           # pmd_same() against &val
        return False
    total = young = 0
    for start, end, _vma in segments:                         # restart: (get_next_vma)
        for addr in range(start, end, k.page_size):
            ptep = ptep0 + ((addr - base) >> k.page_shift) * 8
            total += 1
            walk.mm_stats["MM_LEAF_TOTAL"] += 1
            ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
            pfn = get_pte_pfn(k, ent)
            if pfn == -1:
                continue
            if not ent.young:
                walk.mm_stats["MM_LEAF_OLD"] += 1
                continue
            folio = get_pfn_folio(k, pfn, walk.can_swap)
            if folio is None:
                continue
            if not await ptep_test_and_clear_young(k, ptep):
                k.printk("WARNING: walk_pte_range: ptep_test_and_clear_young() found an old pte")
            young += 1
            walk.mm_stats["MM_LEAF_YOUNG"] += 1
            if ent.dirty:
                folio.extra["dirty"] = True                     # folio_mark_dirty()
            _promote(k, walk, folio, new_gen)
    await pgtable.pte_unmap_unlock(k, ptep0, ptl)
    return suitable_to_scan(total, young)


async def walk_pmd_range_locked(k, mm, pmdp: int, addr: int, walk: LruGenMmWalk) -> None:
    """walk_pmd_range_locked() for one huge pmd (not batched here): spin_trylock of the
    pmd's lock (failure: skip), then pmdp_test_and_clear_young() on the THP."""
    arch = k.arch
    pml = await pgtable.pmd_lockptr(k, mm, pmdp)
    if not await traps.trylock(pml):
        k.stats["lru_gen_walk_pmd_trylock_failed"] += 1
        return
    ent = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if ent.kind is Kind.LEAF and not ent.special:             # get_pmd_pfn(): present, not huge zero
        folio = get_pfn_folio(k, ent.paddr >> k.page_shift, walk.can_swap)
        if folio is not None and ent.young:                   # pmdp_test_and_clear_young()
            await pgtable.set_entry(k, pmdp, arch.pmd_level, ent.with_(young=False))
            walk.mm_stats["MM_LEAF_YOUNG"] += 1
            if ent.dirty:
                folio.extra["dirty"] = True
            _promote(k, walk, folio, lru_gen_from_seq(walk.max_seq))
    await traps.unlock(pml)


async def walk_pmd_range(k, mm, pmdp: int, segments: list, walk: LruGenMmWalk) -> None:
    """walk_pmd_range() for one PMD entry: one lockless read into a stack copy ``val``;
    not present (none, migration) or the huge zero pmd: counted and left; a THP:
    walk_pmd_range_locked(); a table: walk_pte_range(&val) if the Bloom filter (or
    force_scan) says so, and into the next generation's filter if it was worth it."""
    lruvec = get_lruvec(k)
    val = k.arch.decode(k.arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
    if not val.present:
        walk.mm_stats["MM_LEAF_TOTAL"] += 1
        return
    if val.kind is Kind.LEAF:
        walk.mm_stats["MM_LEAF_TOTAL"] += 1
        if not val.young:
            walk.mm_stats["MM_LEAF_OLD"] += 1
            return
        await walk_pmd_range_locked(k, mm, pmdp, segments[0][0], walk)
        return
    walk.mm_stats["MM_NONLEAF_TOTAL"] += 1
    if not walk.force_scan and not test_bloom_filter(lruvec, walk.max_seq, pmdp):
        return
    walk.mm_stats["MM_NONLEAF_FOUND"] += 1
    if not await walk_pte_range(k, mm, pmdp, val, segments, walk):
        return
    walk.mm_stats["MM_NONLEAF_ADDED"] += 1
    update_bloom_filter(lruvec, walk.max_seq + 1, pmdp)      # carry over to the next generation


async def walk_mm(k, mm, walk: LruGenMmWalk) -> int:
    """walk_mm(): under mmap_read_trylock() (failure: -EBUSY, the mm is not aged), walk
    every VMA should_skip_vma() lets through, PMD extent by PMD extent. 6.6 holds
    rcu_read_lock() across the whole walk (mem_cgroup_trylock_pages(), for
    folio_memcg_rcu()): a PTE table that walk_pmd_range() read into its stack copy cannot
    be freed before walk_pte_range() maps it. 6.13 dropped that lock ("mm: memcg: no need
    for memcg locking for MGLRU"); the walk then relies on nothing freeing the table
    between the pmd read and the map's own rcu_read_lock()."""
    from mm_core.rcu import rcu_read_lock, rcu_read_unlock
    rcu = not k.profile.rw_nolock and "lru_gen_walk_without_rcu" not in k.bugs
    if rcu:
        await rcu_read_lock(k)                          # mem_cgroup_trylock_pages()
    try:
        if not await traps.trylock(mm.mmap_lock, "r"):
            k.stats["lru_gen_walk_mm_busy"] += 1
            return -16                                  # -EBUSY
        try:
            await _walk_page_range(k, mm, walk)
        finally:
            await traps.unlock(mm.mmap_lock, "r")
    finally:
        if rcu:
            await rcu_read_unlock(k)                    # mem_cgroup_unlock_pages()
    return 0


async def _walk_page_range(k, mm, walk: LruGenMmWalk) -> None:
    """walk_page_range(mm, ..., &mm_walk_ops) with .test_walk = should_skip_vma and
    .p4d_entry = walk_pud_range: the VMAs' extents, grouped by the PMD entry they fall
    under (walk_pte_range()'s get_next_vma() restart keeps one map for all of them)."""
    span = k.arch.levels[k.arch.pmd_level].span
    groups: dict[int, list] = {}
    for vma in sorted(mm.vmas, key=lambda v: v.start):
        if should_skip_vma(k, vma, walk):
            continue
        addr = vma.start
        while addr < vma.end:
            nxt = min(vma.end, (addr | (span - 1)) + 1)
            groups.setdefault(addr & ~(span - 1), []).append((addr, nxt, vma))
            addr = nxt
    for base in sorted(groups):
        pmdp = await rmap.walk_to_pmd(k, mm, base)
        if pmdp is None:                                  # !pud_present(): continue
            continue
        await walk_pmd_range(k, mm, pmdp, groups[base], walk)


async def lru_gen_age_mm(k, mm, force_scan: bool = True, can_swap: bool = True) -> LruGenMmWalk:
    """One aging step of the one lruvec over ``mm``: try_to_inc_max_seq() reduced to
    walk_mm() of this mm, then inc_max_seq(). ``force_scan`` (iterate_mm_list() sets it
    for an mm the last iteration did not see) ignores the Bloom filter."""
    lruvec = get_lruvec(k)
    walk = LruGenMmWalk(max_seq=lruvec.max_seq, force_scan=force_scan, can_swap=can_swap)
    lruvec.filters[walk.max_seq + 1] = set()              # iterate_mm_list(): reset_bloom_filter()
    walk.err = await walk_mm(k, mm, walk)
    lruvec.max_seq += 1                                    # inc_max_seq()
    if lruvec.max_seq - lruvec.min_seq + 1 > MAX_NR_GENS:
        lruvec.min_seq = lruvec.max_seq - MAX_NR_GENS + 1  # inc_min_seq(): the oldest gen ages out
    lruvec.filters.pop(walk.max_seq, None)
    k.stats["lru_gen_walks"] += 1
    return walk


async def lru_gen_look_around(k, vma, addr: int, ptep: int, ptl, pmdp: int, folio) -> None:
    """lru_gen_look_around() (6.6), from folio_referenced_one() with the pte at ``addr``
    young: under page_vma_mapped_walk()'s ptl and map (no map of its own, so nothing can
    fail here), clear the young bits of up to MIN_LRU_BATCH neighbouring ptes of the same
    table and VMA and promote their folios; feed the PMD into the current Bloom filter.
    Gives up at once if someone spins on the ptl (spin_is_contended())."""
    arch = k.arch
    lruvec = get_lruvec(k)
    if _ptl_contended(k, ptl):
        k.stats["lru_gen_look_around_contended"] += 1
        return
    new_gen = lru_gen_from_seq(lruvec.max_seq)
    pmd_span = arch.levels[arch.pmd_level].span
    start = max(addr & ~(pmd_span - 1), vma.start)
    end = min(addr | (pmd_span - 1), vma.end - 1) + 1
    batch = MIN_LRU_BATCH * k.page_size
    if end - start > batch:
        if addr - start < batch // 2:
            end = start + batch
        elif end - addr < batch // 2:
            start = end - batch
        else:
            start, end = addr - batch // 2, addr + batch // 2
    first = ptep - ((addr - start) >> k.page_shift) * 8
    can_swap = folio.use is PageUse.ANON or folio.use is PageUse.SHMEM   # !folio_is_file_lru()
    young = i = 0
    for i in range(1, ((end - start) >> k.page_shift) + 1):
        p = first + (i - 1) * 8
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, p))
        pfn = get_pte_pfn(k, ent)
        if pfn == -1 or not ent.young:
            continue
        other = get_pfn_folio(k, pfn, can_swap)
        if other is None:
            continue
        if not await ptep_test_and_clear_young(k, p):
            k.printk("WARNING: lru_gen_look_around: ptep_test_and_clear_young() found an old pte")
        young += 1
        if ent.dirty:
            other.extra["dirty"] = True
        if other is folio:                                   # isolated by shrink_folio_list()
            folio.extra["referenced"] = True
            continue
        _promote(k, None, other, new_gen)
    k.stats["lru_gen_look_around"] += 1
    if suitable_to_scan(i, young):
        update_bloom_filter(lruvec, lruvec.max_seq, pmdp)


def _ptl_contended(k, ptl) -> bool:
    """spin_is_contended(): another task is blocked on ``ptl``."""
    return any(t.blocked_on is not None and t.blocked_on[0] is ptl for t in k.tasks())


async def shrink_one(k, folio, res: ReclaimResult, isolated: bool) -> None:
    from mm_core import swap_state
    if not await shmem.folio_trylock(k, folio):
        res.kept_locked = True
        k.stats["reclaim_kept_locked"] += 1
        return
    res.mapcount = folio.mapcount
    is_shmem = folio.use is PageUse.SHMEM
    if is_shmem and folio.mapping is None:           # truncated while isolated: not ours to write
        res.kept = True
        shmem.folio_unlock(folio)
        return
    referenced = rmap.folio_referenced_file if is_shmem else rmap.folio_referenced_anon
    res.referenced, res.mappings_found = await referenced(k, folio)
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
        if is_shmem:
            await rmap.try_to_unmap_file_page(k, folio, folio.index)   # file ptes: just cleared
        else:
            await rmap.try_to_unmap_anon(k, folio)
        if folio.mapcount:
            res.unmap_failed = True
            k.stats["reclaim_unmap_failed"] += 1
            _activate_locked(k, folio, res)
            return
    if is_shmem:
        # pageout() -> shmem_writepage(): into the swap cache, out of the page cache
        if not await shmem.shmem_writepage(k, folio):
            _activate_locked(k, folio, res)          # redirty: AOP_WRITEPAGE_ACTIVATE
            return
    else:
        await swap_state.swap_writepage(k, folio)    # pageout(): PAGE_SUCCESS, no writeback left
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
