"""The swap device (mm/swapfile.c): one swap area, its swap_map counts, swapon/swapoff and
swapoff's page-table walker.

    swap_info_struct    one area of ``nr_slots`` page slots (slot 0 is the header, never
                        handed out), backed by host memory: the bytes reclaim wrote from
                        guest RAM; ``inuse_pages`` counts slots with a count or a cache
    swap_map[offset]    the number of swap ptes (and shmem entries: none here) naming the
                        slot, plus SWAP_HAS_CACHE while a folio is in the swap cache for it
    get_swap_pages()    folio_alloc_swap(): the lowest free slot, SWAP_HAS_CACHE set
    swap_duplicate()    one more swap pte (fork's copy_nonpresent_pte, try_to_unmap_one)
    swap_free()         one less (do_swap_page, unuse_pte)
    free_swap_and_cache() one less, and if only the cache is left, reclaim the cached folio
                        when it is unmapped and its lock can be had (zap_pte_range,
                        MADV_FREE of a swap pte)
    folio_free_swap()   drop a locked folio from the swap cache once no pte names its slot
    swapoff()           try_to_unuse(): unuse_mm() of every mm on the mmlist, then the
                        cache-only slots, round again while si->inuse_pages

Every swap_map update is one atomic step (one scheduling point before it): what si->lock
and the cluster locks give. get_swap_device()/put_swap_device() are a use count swapoff
waits to drain after try_to_unuse() (percpu_ref_kill + wait_for_completion). Not modelled:
several areas and priorities, swap slot caches, clusters and discard, count continuations
(counts are Python ints: no SWAP_MAP_MAX), THP swap, shmem's swap entries (shmem_unuse),
writeback state (I/O completes in the submitting task, see swap_state.py).

The walker, unuse_pte_range() (6.5+, Hugh's "mm/swapfile: allow pte_offset_map[_lock]()
to fail"): unuse_pmd_range() no longer checks the pmd (no pmd_none_or_trans_huge_or_clear_bad)
and unuse_pte_range() maps with pte_offset_map() per batch of ptes read locklessly; a
failed map is ``break`` and ``return 0``: SKIP the rest of that pmd's extent. What is
skipped is not lost: try_to_unuse() goes round again while si->inuse_pages. unuse_pte()
maps again with pte_offset_map_lock(); a failed map or a pte that no longer holds the
entry (pte_same_as_swp) is ``ret = 0``: SKIP that pte (someone else faulted it in).
"""
from __future__ import annotations

from emu.arch import MAX_SWAPFILES, Access, Entry, Kind, leaf_entry, swap_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import pgtable, rmap, shmem
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS

SWAP_HAS_CACHE = 0x40          # swap_map flag: a folio is (being added) in the swap cache
ENOENT, EEXIST, ENOMEM, EINVAL, EBUSY = 2, 17, 12, 22, 16
SWAP_TYPE = 0                  # the one area's type


class SwapInfo:
    """struct swap_info_struct for the one swap area (type 0)."""

    def __init__(self, k, nr_slots: int, ra_win: int = 4, synchronous: bool = False) -> None:
        if nr_slots < 1:
            raise ValueError("a swap area needs at least one slot")
        self.type = SWAP_TYPE
        self.max = nr_slots + 1                 # slot 0 holds the swap header
        self.pages = nr_slots
        self.swap_map = [0] * self.max
        self.inuse_pages = 0
        self.slots: dict[int, bytes] = {}       # the device: offset -> the page written there
        self.cache: dict[int, object] = {}      # swap_address_space(): offset -> folio
        self.writeok = True                     # SWP_WRITEOK: slots may be allocated
        self.live = True                        # percpu_ref users alive (get_swap_device)
        self.users = 0                          # get_swap_device() references held
        self.ra_win = ra_win                    # swap_vma_readahead window (pages)
        # SWP_SYNCHRONOUS_IO (a device whose bdev has BDI_CAP_SYNCHRONOUS_IO: zram, pmem,
        # brd): do_swap_page() swaps in an entry with one count without the swap cache
        self.synchronous_io = synchronous
        self.drained = _UsersDrained(self)
        # swap_slot_cache_enabled: off while swapoff runs try_to_unuse(), so that
        # __read_swap_cache_async() does not skip a slot whose SWAP_HAS_CACHE is set by a
        # racing reader that has not added its folio yet (swapoff would fail with -ENOMEM)
        self.slot_cache_enabled = True
        self.freed = False                      # swapoff freed swap_map (KASAN check_live)
        self.freed_at = 0

    def __repr__(self) -> str:
        return f"<swap area {self.type}: {self.inuse_pages}/{self.pages} in use>"

    def check_live(self, k, where: str) -> None:
        """KASAN for the area: swap_map and the swap address space are freed by swapoff."""
        if self.freed:
            from mm_core.sanitizers import Finding
            cur = k.current_task()
            raise Finding("KASAN", f"KASAN: use-after-free in {where}: swap_info_struct {self.type}'s "
                          "swap_map freed by swapoff", f"KASAN:swap_info:{where}",
                          [f"  accessed by {cur.name if cur is not None else 'the API caller'} at step "
                           f"{k.current_step()}; the area was freed at step {self.freed_at}",
                           "  get_swap_device() pins the area against swapoff"])

    def count(self, off: int) -> int:
        """swap_count(): the swap ptes naming the slot, without SWAP_HAS_CACHE."""
        return self.swap_map[off] & ~SWAP_HAS_CACHE

    def in_use(self) -> list[int]:
        return [off for off in range(1, self.max) if self.swap_map[off]]


class _UsersDrained:
    """wait_for_completion(&si->comp): passes once every get_swap_device() user is gone."""

    sleeps = True

    def __init__(self, si: SwapInfo) -> None:
        self.si = si

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        return self.si.users == 0

    def __repr__(self) -> str:
        return f"<swap area {self.si.type} users ({self.si.users})>"


def swp_entry_to_pte(off: int, **flags) -> Entry:
    """swp_entry_to_pte(swp_entry(type, offset)) (+ pte_swp_mkexclusive & co. via flags)."""
    return swap_entry(SWAP_TYPE, off, **flags)


def is_swap_pte(ent: Entry) -> bool:
    """is_swap_pte() && !non_swap_entry(): a real swap entry (not migration, not a marker)."""
    return ent.kind is Kind.SWAP and ent.swp_type < MAX_SWAPFILES


def pte_same_as_swp(ent: Entry, swp: Entry) -> bool:
    """pte_same_as_swp(): the same entry, ignoring the exclusive / soft-dirty / uffd-wp bits."""
    return ent.kind is Kind.SWAP and ent.swp_type == swp.swp_type and ent.swp_offset == swp.swp_offset


def swap_info_get(k, ent: Entry) -> SwapInfo | None:
    """_swap_info_get(): the area a swap entry names, None for a bad or stale one."""
    si = k.swap_info
    if si is None or ent.swp_type != si.type or not 0 < ent.swp_offset < si.max:
        return None
    return si


# -- swapon, and the use count swapoff waits for -----------------------------------------------

def swapon(k, nr_slots: int, ra_win: int = 4, synchronous: bool = False) -> SwapInfo:
    """swapon(2) of an area of ``nr_slots`` pages (one area at a time); ``synchronous``:
    the device is SWP_SYNCHRONOUS_IO."""
    if k.swap_info is not None:
        raise OSError(EBUSY, "a swap area is already active")
    k.swap_info = SwapInfo(k, nr_slots, ra_win, synchronous)
    k.stats["swapon"] += 1
    return k.swap_info


def get_swap_device(k, ent: Entry) -> SwapInfo | None:
    """get_swap_device(): pin the area against swapoff (percpu_ref_tryget_live); None when
    the entry is bad or swapoff has got past try_to_unuse()."""
    si = swap_info_get(k, ent)
    if si is None or not si.live:
        return None
    si.users += 1
    return si


def put_swap_device(si: SwapInfo) -> None:
    si.users -= 1


# -- swap_map ---------------------------------------------------------------------------------

def _slot_free(k, si: SwapInfo, off: int) -> None:
    """swap_range_free(): the slot is free again (its contents are forgotten)."""
    si.inuse_pages -= 1
    si.slots.pop(off, None)
    k.stats["swap_slots_freed"] += 1


async def get_swap_pages(k) -> int | None:
    """get_swap_pages() for one page: the lowest free slot with SWAP_HAS_CACHE set, or
    None when the area is full, being swapped off, or there is none."""
    si = k.swap_info
    await sched_point("swap_map", si)
    if si is None or not si.writeok:
        return None
    for off in range(1, si.max):
        if si.swap_map[off] == 0:
            si.swap_map[off] = SWAP_HAS_CACHE
            si.inuse_pages += 1
            k.stats["swap_slots_allocated"] += 1
            return off
    k.stats["swap_full"] += 1
    return None


async def __swap_duplicate(k, ent: Entry, usage: int) -> int:
    """__swap_duplicate(): one more count (usage 1) or the cache bit (SWAP_HAS_CACHE).
    -ENOENT for a slot nobody holds, -EEXIST when the cache bit is already set."""
    si = swap_info_get(k, ent)
    await sched_point("swap_map", si)
    if si is None:
        return -EINVAL
    off = ent.swp_offset
    has_cache, count = si.swap_map[off] & SWAP_HAS_CACHE, si.count(off)
    if usage == SWAP_HAS_CACHE:
        if not has_cache and count:
            si.swap_map[off] |= SWAP_HAS_CACHE
            return 0
        return -EEXIST if has_cache else -ENOENT
    if count or has_cache:
        si.swap_map[off] += usage
        return 0
    return -ENOENT


async def swap_duplicate(k, ent: Entry) -> int:
    """swap_duplicate(): one more swap pte names the slot (0, or < 0 for a stale entry)."""
    return await __swap_duplicate(k, ent, 1)


async def swapcache_prepare(k, ent: Entry) -> int:
    """swapcache_prepare(): claim the right to add a folio for the slot to the swap cache."""
    return await __swap_duplicate(k, ent, SWAP_HAS_CACHE)


async def swapcache_clear(k, si: SwapInfo, ent: Entry) -> None:
    """swapcache_clear() (13ddaf26be32 "mm/swap: fix race when skipping swapcache", 6.8,
    6.6.19): drop the SWAP_HAS_CACHE pin do_swap_page()'s swapcache_prepare() took for a
    direct swap-in, after the pte is set and the ptl dropped; the slot is freed if no
    count is left (the fault's swap_free() left only the pin)."""
    await sched_point("swap_map", si)
    si.check_live(k, "swapcache_clear")
    off = ent.swp_offset
    si.swap_map[off] &= ~SWAP_HAS_CACHE
    if si.swap_map[off] == 0:
        _slot_free(k, si, off)


async def swap_free(k, ent: Entry) -> None:
    """swap_free(): one swap pte less; the slot is freed when nothing is left."""
    si = swap_info_get(k, ent)
    await sched_point("swap_map", si)
    if si is None:
        return
    off = ent.swp_offset
    if not si.count(off):
        k.printk(f"swap_free: Unused swap offset entry {off:#x}")
        k.stats["swap_free_unused"] += 1
        return
    si.swap_map[off] -= 1
    if si.swap_map[off] == 0:
        _slot_free(k, si, off)


async def put_swap_folio(k, off: int) -> None:
    """put_swap_folio(): the cache bit goes; the slot is freed if no count is left."""
    si = k.swap_info
    await sched_point("swap_map", si)
    si.swap_map[off] &= ~SWAP_HAS_CACHE
    if si.swap_map[off] == 0:
        _slot_free(k, si, off)


async def free_swap_and_cache(k, ent: Entry) -> None:
    """free_swap_and_cache(): drop the count of a zapped swap pte; if the swap cache is all
    that is left (and swap_page_trans_huge_swapped() says no THP sibling is swapped),
    __try_to_reclaim_swap(TTRS_UNMAPPED | TTRS_FULL): free the cached folio when its lock
    can be had and it is unmapped (or the area is more than half full).

    The area is pinned with get_swap_device() across all of it (82b1c07a0af6, 6.9, in
    the 6.6 stable series): once the count is dropped, swapoff's try_to_unuse() may find
    the slot cache-only, free it and finish; without the pin it would go on to free
    swap_map and the swap address space under us (``--inject
    free_swap_and_cache_without_get_swap_device``: KASAN use-after-free)."""
    pinned = "free_swap_and_cache_without_get_swap_device" not in k.bugs
    si = get_swap_device(k, ent) if pinned else swap_info_get(k, ent)
    if si is None:
        return
    try:
        await sched_point("swap_map", si)
        si.check_live(k, "free_swap_and_cache")
        off = ent.swp_offset
        if not si.count(off):
            k.printk(f"free_swap_and_cache: Unused swap offset entry {off:#x}")
            return
        si.swap_map[off] -= 1
        if si.swap_map[off] == 0:
            _slot_free(k, si, off)
            return
        if si.swap_map[off] != SWAP_HAS_CACHE:
            return
        await sched_point("swap_map", si)               # swap_page_trans_huge_swapped()
        si.check_live(k, "swap_page_trans_huge_swapped")
        await __try_to_reclaim_swap(k, si, off)
    finally:
        if pinned:
            put_swap_device(si)


def vm_swap_full(si: SwapInfo) -> bool:
    """vm_swap_full(): more than half the area in use."""
    return si.inuse_pages * 2 > si.pages


async def __try_to_reclaim_swap(k, si: SwapInfo, off: int) -> None:
    await sched_point("swap_cache", ("swap", off))      # filemap_get_folio(swap_address_space())
    si.check_live(k, "__try_to_reclaim_swap")
    folio = si.cache.get(off)
    if folio is None:
        return
    folio.refcount += 1                              # filemap_get_folio()
    if await shmem.folio_trylock(k, folio):
        if not folio.mapcount or vm_swap_full(si):
            if await folio_free_swap(k, folio):
                k.stats["swap_cache_reclaimed"] += 1
        shmem.folio_unlock(folio)
    from mm_core.memory import put_page
    put_page(k, folio)


def folio_swapped(k, folio) -> bool:
    """folio_swapped(): a swap pte still names the folio's slot."""
    off = folio.extra.get("swap")
    return off is not None and k.swap_info.count(off) > 0


async def folio_free_swap(k, folio) -> bool:
    """folio_free_swap() of a locked folio: out of the swap cache (its slot freed) unless
    it is not in it or a swap pte still names the slot. The folio is dirty again: its
    only copy is in memory."""
    if "swap" not in folio.extra or folio_swapped(k, folio):
        return False
    from mm_core.swap_state import delete_from_swap_cache
    await delete_from_swap_cache(k, folio)
    folio.extra["dirty"] = True
    return True


def add_to_mmlist(k, mm) -> None:
    """list_add(&mm->mmlist, &init_mm.mmlist) under mmlist_lock: swapoff visits it."""
    if mm not in k.mmlist:
        k.mmlist.append(mm)


# -- swapoff and its walker -------------------------------------------------------------------

async def swapoff(k) -> int:
    """swapoff(2): no more allocations (SWP_WRITEOK off), try_to_unuse() until every slot
    is back in memory, then wait for get_swap_device() users and free the area. 0 or a
    negative errno (-ENOMEM from try_to_unuse: the area stays on, writable again)."""
    si = k.swap_info
    if si is None:
        return -EINVAL
    si.writeok = False                               # del_from_avail_list(), ~SWP_WRITEOK
    si.slot_cache_enabled = False                    # disable_swap_slots_cache_lock()
    err = await try_to_unuse(k, si)
    si.slot_cache_enabled = True                     # reenable_swap_slots_cache_unlock()
    if err:
        si.writeok = True                            # reinsert_swap_info()
        return err
    si.live = False                                  # percpu_ref_kill(&p->users)
    await traps.wait(si.drained)                     # wait_for_completion(&p->comp)
    if si.inuse_pages or si.cache:
        raise RuntimeError(f"swapoff: {si!r} still has slots {si.in_use()[:8]} after try_to_unuse")
    k.swap_info = None
    si.freed, si.freed_at = True, k.current_step()     # vfree(swap_map), exit_swap_address_space()
    k.stats["swapoff"] += 1
    return 0


async def try_to_unuse(k, si: SwapInfo) -> int:
    """try_to_unuse(): shmem_unuse() of the shmem inodes with swapped pages, unuse_mm() of
    every mm on the mmlist, then drop the cache-only slots
    (folio_free_swap), and go round again while si->inuse_pages."""
    from mm_core.swap_state import filemap_get_swap_folio
    while si.inuse_pages:
        err = await shmem.shmem_unuse(k, si.type)        # retry: shmem first
        if err:
            return err
        for mm in list(k.mmlist):
            if mm.dead or not mm.users:              # mmget_not_zero()
                continue
            err = await unuse_mm(k, mm, si.type)
            if err:
                return err
        for off in range(1, si.max):
            if not si.inuse_pages:
                break
            if not si.swap_map[off]:
                continue
            folio = await filemap_get_swap_folio(k, off)
            if folio is None:
                continue
            await shmem.folio_lock(k, folio)
            await folio_free_swap(k, folio)
            shmem.folio_unlock(folio)
            from mm_core.memory import put_page
            put_page(k, folio)
        if si.inuse_pages:
            k.stats["try_to_unuse_again"] += 1
            await sched_point("retry", si)
            await traps.sleep(1)                         # cond_resched(): let the holder run
    return 0


async def unuse_mm(k, mm, swp_type: int) -> int:
    """unuse_mm(): under mmap_read_lock, unuse_vma() of every VMA with an anon_vma."""
    from mm_core.memory import for_each_pmd
    await mmap_read_lock(mm)
    try:
        for vma in list(mm.vmas):
            if not vma.anon_vma:
                continue
            # unuse_vma() -> unuse_p4d_range() ... -> unuse_pmd_range(): every pmd under
            # present upper tables, no check of the pmd itself (6.5+)
            async for pmdp, addr, nxt in for_each_pmd(k, mm, vma.start, vma.end):
                if not k.profile.fallible_pte_map and not await pmd_is_table_64(k, pmdp):
                    continue                             # 6.4: pmd_none_or_trans_huge_or_clear_bad()
                ret = await unuse_pte_range(k, vma, pmdp, addr, nxt, swp_type)
                if ret:
                    return ret
    finally:
        await mmap_read_unlock(mm)
    return 0


async def pmd_is_table_64(k, pmdp: int) -> bool:
    """The pre-6.5 callers' pmd_none_or_trans_huge_or_clear_bad(), negated: 6.4's
    pte_offset_map() maps whatever the pmd names, so its callers filtered first."""
    return (await pgtable.get_entry(k, pmdp, k.arch.pmd_level)).kind is Kind.TABLE


async def unuse_pte_range(k, vma, pmdp: int, addr: int, end: int, swp_type: int) -> int:
    """unuse_pte_range(): read the ptes locklessly through pte_offset_map(), mapped again
    after every swap entry it handles; a failed map is SKIP (``break``: the rest of this
    pmd's extent waits for try_to_unuse's next round). For each swap pte of the area: the
    folio from the swap cache or swapin_readahead(), locked, unuse_pte(), folio_free_swap().
    -ENOMEM when no folio could be had for a slot still in use."""
    from mm_core.memory import VmFault, put_page
    from mm_core.swap_state import swap_cache_get_folio, swapin_readahead
    arch = k.arch
    si = k.swap_info
    ptep = None                                          # the pte looked at last, if mapped
    while addr != end:
        if ptep is None:                                 # if (!pte++) pte = pte_offset_map()
            ptep = await pgtable.pte_offset_map(k, pmdp, addr)
            if ptep is None:
                k.stats["unuse_pte_range_map_failed"] += 1
                break                                    # SKIP the rest of the extent
        else:
            ptep += 8
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))   # ptep_get_lockless()
        if not is_swap_pte(ent) or ent.swp_type != swp_type:
            addr += k.page_size
            continue
        await pgtable.pte_unmap(k, ptep)
        ptep = None
        folio = await swap_cache_get_folio(k, ent.swp_offset)
        if folio is None:
            vmf = VmFault(vma, addr, 0, pmd=pmdp)
            folio = await swapin_readahead(k, ent, vmf)
        if folio is None:
            if si.swap_map[ent.swp_offset] == 0:         # freed meanwhile: nothing to do
                addr += k.page_size
                continue
            return -ENOMEM
        await shmem.folio_lock(k, folio)
        ret = await unuse_pte(k, vma, pmdp, addr, ent, folio)
        if ret < 0:
            shmem.folio_unlock(folio)
            put_page(k, folio)
            return ret
        await folio_free_swap(k, folio)
        shmem.folio_unlock(folio)
        put_page(k, folio)
        addr += k.page_size
    if ptep is not None:
        await pgtable.pte_unmap(k, ptep)
    return 0


async def unuse_pte(k, vma, pmdp: int, addr: int, ent: Entry, folio) -> int:
    """unuse_pte(): under pte_offset_map_lock, if the pte still holds the entry
    (pte_same_as_swp), map the locked swap-cache folio there (old, with vm_page_prot:
    read-only in a private mapping; exclusive if the swap pte said so) and swap_free().
    A failed map or a changed pte is 0: SKIP that pte. Returns 1 when it mapped."""
    from mm_core.memory import vm_get_page_prot
    arch, mm = k.arch, vma.mm
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        k.stats["unuse_pte_map_failed"] += 1
        return 0
    ptep, ptl = locked
    try:
        old = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if not pte_same_as_swp(old, ent):
            k.stats["unuse_pte_changed"] += 1
            return 0
        if not folio.extra.get("uptodate"):
            raise RuntimeError("unuse_pte: a swap-cache folio that was never read")
        mm.rss[MM_SWAPENTS] -= 1
        mm.rss[MM_ANONPAGES] += 1
        page_add_anon_rmap(k, folio, vma, addr, old.exclusive)    # get_page() + the rmap
        prot = vm_get_page_prot(vma.flags)
        new = leaf_entry(folio.paddr, prot & ~Access.W, young=False, soft_dirty=old.soft_dirty,
                         uffd_wp=old.uffd_wp)
        await pgtable.set_entry(k, ptep, arch.pte_level, new)
        await swap_free(k, ent)
        k.stats["unuse_pte"] += 1
        return 1
    finally:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)


def page_add_anon_rmap(k, folio, vma, addr: int, exclusive: bool) -> None:
    """page_add_anon_rmap() (+ the mapping's reference): one more mapping of an anon folio;
    the first one sets folio->mapping and ->index. A folio mapped from a shared swap entry
    is not exclusive (fork shared it)."""
    folio.mapcount += 1
    folio.refcount += 1
    if "anon_vma" not in folio.extra or folio.mapcount == 1:
        rmap.folio_add_new_anon_rmap(k, folio, vma, addr)
    if exclusive:
        folio.extra.pop("forked", None)
    else:
        folio.extra["forked"] = True


# -- teardown audit ---------------------------------------------------------------------------

async def drain_swap_cache(k) -> int:
    """What later reclaim does with swap-cache folios nobody maps and no swap pte names:
    drop them (folio_free_swap) and free them. Returns how many."""
    from mm_core.memory import put_page
    si = k.swap_info
    if si is None:
        return 0
    n = 0
    for off, folio in list(si.cache.items()):
        if folio.mapcount or folio.locked or si.count(off):
            continue
        folio.refcount += 1
        folio.locked = True
        if await folio_free_swap(k, folio):
            n += 1
        folio.locked = False
        put_page(k, folio)
    return n


def swap_leaks(k) -> list[str]:
    """Slots still in use and folios still in the swap cache (after every mm exited and
    drain_swap_cache()): each a leak."""
    si = k.swap_info
    if si is None:
        return []
    out = [f"slot {off}: swap_map {si.swap_map[off]:#x}" for off in si.in_use()]
    out += [f"swap cache: slot {off} -> pfn {f.pfn:#x}" for off, f in si.cache.items()]
    return out
