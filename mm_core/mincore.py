"""mincore(2) (mm/mincore.c): which pages of a range are resident.

``mincore_pte_range`` is a walk_page_range() pmd_entry: a PMD leaf is resident whole; a
PTE table is mapped with pte_offset_map_lock(), and a failed map asks for ACTION_AGAIN
(RETRY: the walker reads the pmd again, and a retracted pmd becomes a hole, answered from
the page cache for file mappings).
"""
from __future__ import annotations

from emu.arch import Kind
from emu.sched import traps
from mm_core import huge_memory, pagewalk, pgtable, swapfile
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mmap import EINVAL, ENOMEM
from mm_core.swapops import pte_none_mostly


def _cached(walk: pagewalk.MmWalk, addr: int, end: int) -> list[int]:
    """mincore_page() of each page in [addr, end): for a file
    VMA, whether the page cache holds the page; for a swapped-out shmem page (a swap entry
    at the index), filemap_get_incore_folio() asks the swap cache (under
    get_swap_device()): 1 if an uptodate folio is there (e.g. read by MADV_WILLNEED's
    shmem_swapin_range())."""
    vma, k = walk.vma, walk.k
    n = (end - addr) >> k.page_shift
    if vma.file is None:
        return [0] * n
    first = vma.pgoff + ((addr - vma.start) >> k.page_shift)
    mapping = vma.file.mapping
    cached = list(map(mapping.i_pages.__contains__, range(first, first + n)))
    if all(cached):
        return [1] * n
    si = k.swap_info
    out = []
    for index, hit in zip(range(first, first + n), cached, strict=True):
        off = None if hit else mapping.swap_entries.get(index)
        if hit:
            out.append(1)
        elif off is None or si is None or not si.live:
            out.append(0)
        else:
            folio = si.cache.get(off)
            out.append(1 if folio is not None and folio.extra.get("uptodate") else 0)
    return out


async def mincore_unmapped_range(addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """The pte_hole callback: no table, so ask the page cache."""
    vec, start = walk.private
    first = (addr - start) >> walk.k.page_shift
    vec[first:first + ((end - addr) >> walk.k.page_shift)] = _cached(walk, addr, end)
    return 0


async def mincore_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """mincore_pte_range(): a huge or swap pmd (a THP, one being split, a migration pmd)
    is taken with pmd_trans_huge_lock() and counts as resident; otherwise the PTEs under
    pte_offset_map_lock(), RETRY (ACTION_AGAIN) on a failed map."""
    k, arch = walk.k, walk.k.arch
    vec, start = walk.private
    walk.action = pagewalk.ACTION_CONTINUE
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind in (Kind.LEAF, Kind.MIGRATION, Kind.SWAP):      # pmd_trans_huge_lock()
        ptl, _ = await huge_memory.pmd_trans_huge_lock(k, walk.mm, pmdp)
        if ptl is not None:
            for a in range(addr, end, k.page_size):
                vec[(a - start) >> k.page_shift] = 1
            await traps.unlock(ptl)
            return 0
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None:
        k.stats["mincore_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN
        return 0
    ptep, ptl = locked
    raws = await pgtable.get_raws_locked(k, ptep, (end - addr) >> k.page_shift)
    cached = None                                     # the page cache's answers, asked once
    empty = arch.empty_value(arch.pte_level)
    for i, (a, raw) in enumerate(zip(range(addr, end, k.page_size), raws, strict=True)):
        ent = None if raw == empty else arch.decode(arch.pte_level, raw)
        if ent is not None and ent.kind is Kind.LEAF:
            vec[(a - start) >> k.page_shift] = 1
        elif ent is None or pte_none_mostly(ent):     # none, or a marker: ask the page cache
            if cached is None:
                cached = _cached(walk, addr, end)
            vec[(a - start) >> k.page_shift] = cached[i]
        elif swapfile.is_swap_pte(ent):              # mincore_page(swap_address_space(entry))
            si = swapfile.swap_info_get(k, ent)
            folio = si.cache.get(ent.swp_offset) if si is not None else None
            vec[(a - start) >> k.page_shift] = int(folio is not None and bool(folio.extra.get("uptodate")))
        else:
            vec[(a - start) >> k.page_shift] = 1      # non_swap_entry(): migration, a marker
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


MINCORE_OPS = pagewalk.MmWalkOps(pmd_entry=mincore_pte_range, pte_hole=mincore_unmapped_range)


async def do_mincore(k, mm, start: int, length: int) -> list[int] | int:
    """sys_mincore() core: one byte per page (1 = resident), or -errno."""
    if start % k.page_size:
        return -EINVAL
    pages = (length + k.page_size - 1) >> k.page_shift
    end = start + (pages << k.page_shift)
    await mmap_read_lock(mm)
    try:
        addr = start
        for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
            if vma.start > addr:
                return -ENOMEM
            addr = vma.end
        if addr < end:
            return -ENOMEM
        vec = [0] * pages
        await pagewalk.walk_page_range(k, mm, start, end, MINCORE_OPS, (vec, start))
        return vec
    finally:
        await mmap_read_unlock(mm)
