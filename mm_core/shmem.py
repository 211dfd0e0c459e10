"""shmem / memfd (mm/shmem.c) with a page cache of small and PMD-order folios
(mm/filemap.c's address_space), the file rmap (i_mmap) and truncation."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from emu.arch import PAGE_SHIFT
from emu.sched import traps
from mm_core.locks import RwSemaphore, WaitQueue
from mm_core.page_alloc import OutOfMemory, Page, PageUse


@dataclass(eq=False)
class AddressSpace:
    """struct address_space: the page cache and the file's reverse map."""

    host: ShmemInode
    i_pages: dict[int, Page] = field(default_factory=dict)   # index -> folio (a huge folio at
                                                             # every index it covers)
    i_mmap: list = field(default_factory=list)               # VMAs mapping the file
    # the xa_value (swap entry) entries of i_pages: index -> swap slot of a swapped-out page
    swap_entries: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.i_mmap_rwsem = RwSemaphore(f"i_mmap@{self.host.ino}", "i_mmap_rwsem")

    @property
    def nrpages(self) -> int:
        return len(self.i_pages)

    def folios(self) -> list[Page]:
        """Each folio of the cache once, in the order its first page entered i_pages."""
        pages = list(self.i_pages.values())
        if pages and pages.count(pages[0]) == len(pages):   # one folio (a Page equals only itself)
            return pages[:1]
        return list(dict.fromkeys(pages))                    # a Page hashes by identity


@dataclass(eq=False)
class ShmemInode:
    """A shmem inode (what memfd_create returns a file for)."""

    name: str
    page_shift: int = PAGE_SHIFT      # the kernel's base page (4K, or 64K on ppc64-64K)
    size: int = 0
    ino: int = 0
    refs: int = 0                    # open files + mapping VMAs
    swapped: int = 0                 # shmem_inode_info.swapped: pages out on swap
    mapping: AddressSpace = None     # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mapping = AddressSpace(self)
        self.folio_wait = WaitQueue(f"folio_wait@{self.ino}")

    def __repr__(self) -> str:
        return f"<shmem {self.name!r} ino {self.ino} size {self.size:#x}>"


def memfd_create(k, name: str) -> ShmemInode:
    inode = ShmemInode(name, k.page_shift, ino=k.next_id("ino"))
    k.stats["memfd_created"] += 1
    return inode


def folio_page_paddr(folio: Page, index: int) -> int:
    """folio_page(): the physical address of page ``index`` of the file inside ``folio``."""
    return folio.paddr + ((index - folio.index) << folio.mapping.host.page_shift)


def filemap_get_folio(mapping: AddressSpace, index: int) -> Page | None:
    return mapping.i_pages.get(index)


def add_to_page_cache(mapping: AddressSpace, folio: Page, index: int) -> None:
    """filemap_add_folio(): the cache holds one reference on the folio."""
    folio.mapping, folio.index = mapping, index
    for i in range(index, index + folio_nr_pages(folio, mapping)):
        mapping.i_pages[i] = folio


def folio_nr_pages(folio: Page, mapping: AddressSpace) -> int:
    """folio_nr_pages(): base pages in the folio (a base page may be several 4K frames)."""
    return max(1, folio.nr_pages >> (mapping.host.page_shift - PAGE_SHIFT))


@functools.lru_cache(maxsize=64)
def _indices(first: int, n: int) -> tuple[int, ...]:
    return tuple(range(first, first + n))


def delete_from_page_cache(k, folio: Page) -> None:
    mapping = folio.mapping
    pages, span = mapping.i_pages, range(folio.index, folio.index + folio_nr_pages(folio, mapping))
    n = len(span)
    # the folio was the whole cache, in index order (a Page equals only itself): three C
    # passes instead of a get per index
    if len(pages) == n and list(pages.values()).count(folio) == n and tuple(pages) == _indices(span.start, n):
        pages.clear()
    else:
        for i in span:
            if pages.get(i) is folio:
                del pages[i]
    folio.mapping = None
    folio.refcount -= 1
    if folio.refcount == 0:
        k.alloc.free_pages(folio)


class _FolioLock:
    """PG_locked as a scheduler resource: a waiter sleeps (is not runnable) until the bit
    is clear, then takes it."""

    __slots__ = ("folio",)
    cls = "folio_lock"
    sleeps = True

    def __init__(self, folio: Page) -> None:
        self.folio = folio

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        if self.folio.locked:
            return False
        self.folio.locked = True
        return True

    def __repr__(self) -> str:
        return f"<folio lock pfn {self.folio.pfn:#x}>"


async def folio_lock(k, folio: Page) -> None:
    """folio_lock(): sleep until PG_locked is clear, then take it."""
    await traps.wait(_FolioLock(folio))


async def folio_trylock(k, folio: Page) -> bool:
    """folio_trylock(): test_and_set PG_locked, never sleeping (an atomic: one scheduling
    point before it)."""
    await traps.sched_point("folio_trylock", folio.pfn)
    if folio.locked:
        return False
    folio.locked = True
    return True


def folio_unlock(folio: Page) -> None:
    folio.locked = False


async def shmem_get_folio(k, inode: ShmemInode, index: int, noalloc: bool = False) -> Page | None:
    """shmem_get_folio_gfp(SGP_CACHE, or SGP_NOALLOC with ``noalloc``): find the folio
    for ``index``; a swap entry there is swapped in (shmem_swapin_folio(): -EEXIST is
    ``goto repeat``, another error None); a hole inside i_size gets a zeroed small folio
    (SGP_NOALLOC: None). None beyond EOF."""
    if index << inode.page_shift >= inode.size:
        return None
    while True:
        folio = filemap_get_folio(inode.mapping, index)
        off = inode.mapping.swap_entries.get(index)
        if folio is not None or off is None:
            break
        err, folio = await shmem_swapin_folio(k, inode, index, off)
        if err == -EEXIST:
            k.stats["shmem_swapin_repeat"] += 1
            continue                          # goto repeat
        if err:
            return None
        folio_unlock(folio)
        folio.refcount -= 1                   # the page cache holds it (this model's
        return folio                          # shmem_get_folio hands out no reference)
    if folio is None and noalloc:
        return None
    if folio is None:
        try:
            folio = k.alloc.alloc_pages(k.page_order, PageUse.SHMEM, owner=inode.mapping)
        except OutOfMemory:
            return None
        await traps.sched_point("page_cache_insert", (inode.ino, index))
        raced = filemap_get_folio(inode.mapping, index)
        if raced is not None:
            k.alloc.free_pages(folio)
            return raced
        add_to_page_cache(inode.mapping, folio, index)
        k.stats["shmem_pages_allocated"] += 1
    return folio


# -- swap (6.6): shmem_writepage, shmem_swapin_folio, shmem_unuse -----------------------------
#
# A swapped-out shmem page leaves the page cache: its index holds the swap entry instead
# (``mapping.swap_entries``, the xa_value entries of i_pages), and the slot holds one count
# for it (swap_shmem_alloc(): SWAP_MAP_SHMEM in Linux, a plain count of 1 here). Only
# PAGE_SIZE folios: a large shmem folio is redirtied (split_huge_page() in
# shmem_writepage() is not modelled). Swap-in reads only the one slot (shmem_swapin()'s
# swap_cluster_readahead() is not modelled).

EEXIST, ENOMEM, EIO, EINVAL = 17, 12, 5, 22
SHMEM_UNUSE_BATCH = 15                # PAGEVEC_SIZE: shmem_find_swap_entries()' folio_batch


def shmem_confirm_swap(mapping: AddressSpace, index: int, off: int) -> bool:
    """shmem_confirm_swap(): the index still holds that swap entry."""
    return mapping.swap_entries.get(index) == off


async def shmem_writepage(k, folio: Page) -> bool:
    """shmem_writepage() (6.6), from reclaim's pageout() with the folio locked and unmapped
    (try_to_unmap() before): folio_alloc_swap() (no slot: redirty, false: reclaim
    activates it), the inode on shmem_swaplist, add_to_swap_cache(), swap_shmem_alloc(),
    shmem_delete_from_page_cache() (the index now holds the swap entry, the cache's
    reference is dropped), swap_writepage(). A large folio is redirtied (false)."""
    from mm_core import swap_state, swapfile
    mapping = folio.mapping
    inode = mapping.host
    if folio.order != k.page_order:
        k.stats["shmem_writepage_large_unmodelled"] += 1
        return False                          # split_huge_page() not modelled: redirty
    if folio.mapcount:
        raise RuntimeError(f"shmem_writepage: pfn {folio.pfn:#x} still mapped")   # BUG_ON
    off = await swapfile.get_swap_pages(k)
    if off is None:
        k.stats["shmem_writepage_redirty"] += 1
        return False
    if inode not in k.shmem_swaplist:         # under shmem_swaplist_mutex
        k.shmem_swaplist.append(inode)
    await swap_state.add_to_swap_cache(k, folio, off)
    folio.extra["uptodate"] = True
    await swapfile.swap_duplicate(k, swapfile.swp_entry_to_pte(off))      # swap_shmem_alloc()
    inode.swapped += 1                        # shmem_recalc_inode(inode, 0, 1)
    index = folio.index
    for i in range(index, index + folio_nr_pages(folio, mapping)):
        if mapping.i_pages.get(i) is folio:
            del mapping.i_pages[i]
    mapping.swap_entries[index] = off         # shmem_delete_from_page_cache(folio, swap)
    folio.mapping = None
    folio.refcount -= 1                       # the page cache's reference
    await swap_state.swap_writepage(k, folio)
    k.stats["shmem_writepage"] += 1
    return True


async def shmem_swapin_folio(k, inode: ShmemInode, index: int, off: int) -> tuple[int, Page | None]:
    """shmem_swapin_folio() (6.6): bring swap slot ``off`` (found at ``index``) back into
    the page cache. Returns (0, the folio locked with a reference) or (-errno, None):
    get_swap_device() failing (swapoff done) is -EEXIST if the index changed meanwhile,
    else -EINVAL; no folio: -ENOMEM; after folio_lock(), a folio no longer the swap
    cache's for the slot or an index no longer holding the entry (shmem_confirm_swap()):
    -EEXIST (the caller looks again); not uptodate: -EIO. Success:
    shmem_add_to_page_cache(expected = the entry), delete_from_swap_cache(), swap_free()
    of the mapping's count (the slot goes)."""
    from mm_core import swap_state, swapfile
    from mm_core.memory import put_page
    mapping = inode.mapping
    ent = swapfile.swp_entry_to_pte(off)
    si = swapfile.get_swap_device(k, ent)
    if si is None:
        return (-EINVAL if shmem_confirm_swap(mapping, index, off) else -EEXIST), None
    folio = None
    try:
        folio = await swap_state.swap_cache_get_folio(k, off)
        if folio is None:
            folio = await swap_state.read_swap_cache_async(k, ent, None, 0)    # shmem_swapin()
            if folio is None:
                return (-ENOMEM if shmem_confirm_swap(mapping, index, off) else -EEXIST), None
            k.stats["shmem_swap_major"] += 1
        await folio_lock(k, folio)
        if folio.extra.get("swap") != off or not shmem_confirm_swap(mapping, index, off):
            err = -EEXIST
        elif not folio.extra.get("uptodate"):
            err = -EIO
        else:
            await traps.sched_point("page_cache_insert", (inode.ino, index))
            if not shmem_confirm_swap(mapping, index, off):
                err = -EEXIST                 # shmem_add_to_page_cache(): xas_find_conflict
            else:
                del mapping.swap_entries[index]
                folio.use, folio.owner = PageUse.SHMEM, mapping
                folio.refcount += 1           # the page cache's reference
                add_to_page_cache(mapping, folio, index)
                inode.swapped -= 1            # shmem_recalc_inode(inode, 0, -1)
                await swap_state.delete_from_swap_cache(k, folio)
                folio.extra["dirty"] = True   # folio_mark_dirty()
                await swapfile.swap_free(k, ent)
                k.stats["shmem_swapin"] += 1
                return 0, folio
        folio_unlock(folio)
        put_page(k, folio)
        k.stats[f"shmem_swapin_err{err}"] += 1
        return err, None
    finally:
        swapfile.put_swap_device(si)


def shmem_find_swap_entries(mapping: AddressSpace, start: int, swp_type: int) -> list[tuple[int, int]]:
    """shmem_find_swap_entries(): the next batch (PAGEVEC_SIZE) of (index, slot) swap
    entries of area ``swp_type`` from ``start`` on (an RCU walk of i_pages)."""
    out = []
    for index in sorted(mapping.swap_entries):
        if index >= start:
            out.append((index, mapping.swap_entries[index]))     # one area: every type matches
            if len(out) == SHMEM_UNUSE_BATCH:
                break
    return out


async def shmem_unuse_swap_entries(k, inode: ShmemInode, batch: list[tuple[int, int]]) -> int:
    """shmem_unuse_swap_entries(): shmem_swapin_folio() each; -ENOMEM stops the batch (and
    swapoff), other errors are ignored (-EEXIST: truncated or swapped in meanwhile).
    Returns how many were brought in, or -ENOMEM."""
    from mm_core.memory import put_page
    ret = 0
    for index, off in batch:
        err, folio = await shmem_swapin_folio(k, inode, index, off)
        if not err:
            folio_unlock(folio)
            put_page(k, folio)
            ret += 1
        if err == -ENOMEM:
            return err
    return ret


async def shmem_unuse_inode(k, inode: ShmemInode, swp_type: int) -> int:
    """shmem_unuse_inode(): batch after batch until no swap entry of the area is left."""
    start = 0
    while True:
        await traps.sched_point("shmem_find_swap_entries", inode.ino)
        batch = shmem_find_swap_entries(inode.mapping, start, swp_type)
        if not batch:
            return 0
        ret = await shmem_unuse_swap_entries(k, inode, batch)
        if ret < 0:
            return ret
        start = batch[-1][0] + 1


async def shmem_unuse(k, swp_type: int) -> int:
    """shmem_unuse() (from try_to_unuse(), before the mms): every inode on shmem_swaplist
    with swapped pages (pinned with igrab() while shmem_swaplist_mutex is dropped) gets
    shmem_unuse_inode(); an inode with none left is pruned from the list. 0 or -ENOMEM."""
    for inode in list(k.shmem_swaplist):
        if not inode.swapped:
            k.shmem_swaplist.remove(inode)
            continue
        if not inode.refs:
            continue                          # igrab() failed: being evicted
        inode.refs += 1
        err = await shmem_unuse_inode(k, inode, swp_type)
        iput(k, inode)
        if not inode.swapped and inode in k.shmem_swaplist:
            k.shmem_swaplist.remove(inode)
        if err:
            return err
    return 0


def shmem_free_swap(k, mapping: AddressSpace, index: int) -> None:
    """shmem_free_swap() of eviction / truncation: the index's swap entry goes and the
    mapping's count on the slot is dropped (free_swap_and_cache()). When only the swap
    cache is left, __try_to_reclaim_swap(TTRS_UNMAPPED | TTRS_FULL): an unmapped folio
    whose lock can be had (a read-ahead one, e.g. MADV_WILLNEED's) leaves the cache and
    the slot goes; a locked one (a read still in flight) is left to reclaim
    (drain_swap_cache()). One atomic step here: the callers are not coroutines."""
    from mm_core import swapfile
    off = mapping.swap_entries.pop(index)
    mapping.host.swapped -= 1
    si = k.swap_info
    si.swap_map[off] -= 1
    if si.swap_map[off] == 0:
        swapfile._slot_free(k, si, off)
    elif si.swap_map[off] == swapfile.SWAP_HAS_CACHE:
        folio = si.cache.get(off)
        if folio is not None and not folio.locked and not folio.mapcount:   # folio_trylock()
            del si.cache[off]                                 # folio_free_swap()
            folio.extra.pop("swap")
            si.swap_map[off] = 0                              # put_swap_folio()
            swapfile._slot_free(k, si, off)
            folio.refcount -= 1                               # the swap cache's reference
            if folio.refcount == 0:
                k.alloc.free_pages(folio)
            k.stats["swap_cache_reclaimed"] += 1
    k.stats["shmem_free_swap"] += 1


async def shmem_setattr_size(k, inode: ShmemInode, size: int) -> None:
    """ftruncate(): shrinking unmaps the tail from every mapping and drops it from the
    cache (truncate_pagecache); growing only moves i_size."""
    from mm_core.memory import unmap_mapping_range
    old = inode.size
    inode.size = size
    if size < old:
        first = (size + k.page_size - 1) >> k.page_shift
        await unmap_mapping_range(k, inode.mapping, first, (old + k.page_size - 1) >> k.page_shift)
        for folio in inode.mapping.folios():
            if folio.index + folio_nr_pages(folio, inode.mapping) > first:
                delete_from_page_cache(k, folio)
        for index in sorted(inode.mapping.swap_entries):
            if index >= first:
                shmem_free_swap(k, inode.mapping, index)


def iput(k, inode: ShmemInode) -> None:
    """Drop a reference; the last one frees the whole page cache (evict)."""
    inode.refs -= 1
    if inode.refs == 0:
        for folio in inode.mapping.folios():
            delete_from_page_cache(k, folio)
        for index in sorted(inode.mapping.swap_entries):
            shmem_free_swap(k, inode.mapping, index)        # shmem_evict_inode()
        if inode in k.shmem_swaplist:
            k.shmem_swaplist.remove(inode)
        k.stats["shmem_inodes_freed"] += 1
