"""The swap cache and swap-in (mm/swap_state.c, the I/O of mm/page_io.c).

    swap cache            swap_address_space(entry): offset -> folio; the cache holds one
                          reference; folio->swap (``folio.extra["swap"]``) names the slot
    add_to_swap()         reclaim: a slot for an anon folio, the folio into the cache
    __read_swap_cache_async()  the folio for an entry: found in the cache, or allocated,
                          claimed with swapcache_prepare() (-EEXIST: someone else is adding
                          one: sleep a tick and look again), added locked and not uptodate
    swap_readpage()       the slot's bytes into the folio, uptodate, folio_unlock()
    swap_writepage()      the folio's bytes into the slot
    swap_vma_readahead()  6.5+: the window around the fault read through pte_offset_map()
                          and ptep_get_lockless(), mapped again after each entry it reads;
                          a failed map is ``break`` (SKIP the rest of the window), then the
                          faulting entry is read anyway
    free_swap_cache()     free_pages_and_swap_cache(): a folio whose last mapping went drops
                          its swap cache if its lock can be had and no swap pte needs it

I/O: a read or a write completes inside the task that submits it (one scheduling point,
the folio locked across it for a read). An area swapped on with ``synchronous=True`` is
SWP_SYNCHRONOUS_IO (zram, pmem): do_swap_page() reads an entry only one pte names
straight into a new folio, skipping the swap cache (swapin_skip_swapcache).
swap_ra_info() is reduced to a fixed window (si.ra_win pages, the faulting page second)
clamped to the VMA and the PMD: no hit statistics.
"""
from __future__ import annotations

from emu.arch import Entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import pgtable, swapfile
from mm_core.page_alloc import PAGE_POISON, OutOfMemory, PageUse


async def filemap_get_swap_folio(k, off: int):
    """filemap_get_folio(swap_address_space(entry), offset): the cached folio with a
    reference taken, or None (an RCU lookup: one scheduling point)."""
    si = k.swap_info
    await sched_point("swap_cache", ("swap", off))
    folio = si.cache.get(off) if si is not None else None
    if folio is not None:
        folio.refcount += 1
    return folio


async def swap_cache_get_folio(k, off: int):
    """swap_cache_get_folio(): a cache lookup with a reference (readahead hit counting is
    not modelled)."""
    folio = await filemap_get_swap_folio(k, off)
    if folio is not None:
        k.stats["swap_cache_hit"] += 1
    return folio


async def add_to_swap_cache(k, folio, off: int) -> None:
    """add_to_swap_cache(): the folio goes in with the cache's reference."""
    si = k.swap_info
    await sched_point("swap_cache", ("swap", off))
    if off in si.cache:
        raise RuntimeError(f"add_to_swap_cache: slot {off} already cached")
    si.cache[off] = folio
    folio.extra["swap"] = off
    folio.refcount += 1
    folio.owner = None          # the swap cache's now: it outlives the mm that swapped it out


async def delete_from_swap_cache(k, folio) -> None:
    """delete_from_swap_cache(): out of the cache, put_swap_folio() (the slot is freed when
    no count is left), and the cache's reference dropped (the caller holds another)."""
    si = k.swap_info
    off = folio.extra.pop("swap")
    await sched_point("swap_cache", ("swap", off))
    del si.cache[off]
    await swapfile.put_swap_folio(k, off)
    folio.refcount -= 1
    if folio.refcount <= 0:
        raise RuntimeError(f"delete_from_swap_cache: pfn {folio.pfn:#x} lost its last reference")


async def add_to_swap(k, folio) -> bool:
    """add_to_swap() of a locked anon folio: folio_alloc_swap(), add_to_swap_cache(),
    folio_mark_dirty(). False when no slot can be had (no area, full, swapoff)."""
    off = await swapfile.get_swap_pages(k)
    if off is None:
        return False
    await add_to_swap_cache(k, folio, off)
    folio.extra["uptodate"] = True              # a mapped anon folio holds its data
    folio.extra["dirty"] = True
    k.stats["add_to_swap"] += 1
    return True


async def swap_writepage(k, folio) -> None:
    """swap_writepage(): the folio's bytes go to its slot (completed at once)."""
    off = folio.extra["swap"]
    await sched_point("swap_io", ("swap", off))
    k.swap_info.slots[off] = k.physmem.read(folio.paddr, k.page_size)
    folio.extra.pop("dirty", None)
    k.stats["swap_writepage"] += 1


async def swap_readpage(k, folio, off: int) -> None:
    """swap_readpage(): the slot's bytes into the locked folio, folio_mark_uptodate() and
    folio_unlock() (end_swap_bio_read). A slot nobody wrote reads as poison."""
    await sched_point("swap_io", ("swap", off))
    data = k.swap_info.slots.get(off)
    if data is None:
        k.stats["swap_read_unwritten_slot"] += 1
        data = bytes([PAGE_POISON]) * k.page_size
    k.physmem.write(folio.paddr, data)
    folio.extra["uptodate"] = True
    folio.locked = False
    k.stats["swap_readpage"] += 1


async def __read_swap_cache_async(k, ent: Entry, vma, addr: int):
    """__read_swap_cache_async(): (folio with a reference, allocated?) or (None, False).
    The folio comes from the swap cache, or is allocated, claimed with
    swapcache_prepare() and added to the cache locked for the caller to read into."""
    si = swapfile.get_swap_device(k, ent)
    if si is None:
        return None, False
    try:
        off = ent.swp_offset
        while True:
            folio = await filemap_get_swap_folio(k, off)
            if folio is not None:
                return folio, False
            if not si.count(off) and si.slot_cache_enabled:
                return None, False                  # an unused slot: no readahead of it
            try:
                folio = k.alloc.alloc_pages(k.page_order, PageUse.ANON, zero=False)
            except OutOfMemory:
                return None, False
            err = await swapfile.swapcache_prepare(k, ent)
            if not err:
                break
            k.alloc.free_pages(folio)
            if err != -swapfile.EEXIST:
                return None, False
            # racing __delete_from_swap_cache() or another __read_swap_cache_async()
            k.stats["swapcache_prepare_eexist"] += 1
            await traps.sleep(1)                    # schedule_timeout_uninterruptible(1)
        folio.locked = True                         # __folio_set_locked(): nobody sees it yet
        folio.extra["swapbacked"] = True
        await add_to_swap_cache(k, folio, off)
        return folio, True
    finally:
        swapfile.put_swap_device(si)


async def swapin_skip_swapcache(k, ent: Entry, vma, addr: int):
    """do_swap_page()'s direct swap-in from a SWP_SYNCHRONOUS_IO device (6.6, the
    ``skip swapcache`` branch): vma_alloc_folio(), __folio_set_locked(),
    __folio_set_swapbacked(), folio->swap = entry for swap_readpage(synchronous) (the
    read completes at once and unlocks the folio), folio->private = NULL. The folio is
    never in the swap cache, so nothing but the caller's pte_same() (and, from
    13ddaf26be32 on, the SWAP_HAS_CACHE pin of swapcache_prepare()) keeps two faulters
    apart. Returns the folio with the caller's reference, or None (no memory)."""
    try:
        folio = k.alloc.alloc_pages(k.page_order, PageUse.ANON, zero=False)
    except OutOfMemory:
        return None
    folio.locked = True
    folio.extra["swapbacked"] = True
    k.stats["swapin_skip_swapcache"] += 1
    await swap_readpage(k, folio, ent.swp_offset)
    return folio


async def read_swap_cache_async(k, ent: Entry, vma, addr: int):
    """read_swap_cache_async(): __read_swap_cache_async(), and the read when allocated."""
    folio, allocated = await __read_swap_cache_async(k, ent, vma, addr)
    if allocated:
        await swap_readpage(k, folio, ent.swp_offset)
    return folio


def swap_ra_window(k, vmf) -> tuple[int, int]:
    """swap_ra_info(), reduced: [start, end) of the readahead window (a fixed
    ``si.ra_win`` pages, the faulting one second), within the VMA and the PMD."""
    vma, faddr = vmf.vma, vmf.address
    win = k.swap_info.ra_win
    if win <= 1:
        return faddr, faddr + k.page_size
    pmd_span = k.arch.levels[k.arch.pmd_level].span
    left = (win - 1) // 2
    start = max(faddr - left * k.page_size, vma.start, faddr & ~(pmd_span - 1))
    end = min(faddr + (win - left) * k.page_size, vma.end, (faddr & ~(pmd_span - 1)) + pmd_span)
    return start, end


async def swap_vma_readahead(k, ent: Entry, vmf):
    """swap_vma_readahead() (6.5+): over the window, pte_offset_map(vmf->pmd) and
    ptep_get_lockless() each pte; every other swap entry found is read into the swap cache
    (the map is dropped around it and taken again for the next pte). A failed map is
    ``break``: SKIP the rest of the window. Then read_swap_cache_async() of the faulting
    entry itself."""
    arch = k.arch
    start, end = swap_ra_window(k, vmf)
    if end - start > k.page_size:
        ptep = None
        addr = start
        while addr < end:
            if ptep is None:                             # if (!pte++) pte = pte_offset_map()
                ptep = await pgtable.pte_offset_map(k, vmf.pmd, addr)
                if ptep is None:
                    k.stats["swap_ra_map_failed"] += 1
                    break
            else:
                ptep += 8
            pent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
            if not swapfile.is_swap_pte(pent):
                addr += k.page_size
                continue
            await pgtable.pte_unmap(k, ptep)
            ptep = None
            folio, allocated = await __read_swap_cache_async(k, pent, vmf.vma, addr)
            if folio is not None:
                if allocated:
                    await swap_readpage(k, folio, pent.swp_offset)
                    if addr != vmf.address:
                        k.stats["swap_ra"] += 1
                from mm_core.memory import put_page
                put_page(k, folio)
            addr += k.page_size
        if ptep is not None:
            await pgtable.pte_unmap(k, ptep)
    return await read_swap_cache_async(k, ent, vmf.vma, vmf.address)


async def swapin_readahead(k, ent: Entry, vmf):
    """swapin_readahead(): VMA-based readahead (swap_use_vma_readahead() is the default)."""
    return await swap_vma_readahead(k, ent, vmf)


async def free_swap_cache(k, folio, tlb: list | None = None) -> None:
    """free_swap_cache() (free_pages_and_swap_cache, after the last mapping of a folio was
    zapped): if it is in the swap cache, unmapped, and folio_trylock() succeeds, drop it
    from the cache when no swap pte needs it. The batch's reference is then released
    (release_pages): the folio is freed after the TLB flush when ``tlb`` is given."""
    if "swap" not in folio.extra or folio.mapcount:
        return
    from mm_core import shmem
    from mm_core.memory import put_page
    folio.refcount += 1                          # the mmu_gather batch still holds it
    if await shmem.folio_trylock(k, folio):
        if await swapfile.folio_free_swap(k, folio):
            k.stats["free_swap_cache"] += 1
        shmem.folio_unlock(folio)
    put_page(k, folio, tlb)
