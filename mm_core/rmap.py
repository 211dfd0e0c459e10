"""Reverse mapping (mm/rmap.c, reduced): find the PTEs of every VMA that maps a
page-cache folio (page_vma_mapped_walk, mm_core/page_vma_mapped.py) and unmap them
(try_to_unmap); for anonymous folios the anon_vma (its rwsem, folio->mapping /
folio->index, UFFDIO_MOVE's folio_move_anon_rmap) and the folio_referenced() walk reclaim
does under the folio lock."""
from __future__ import annotations

from emu.arch import SWP_HWPOISON, Kind, swap_entry
from emu.sched import traps
from mm_core import mmu_notifier, pgtable
from mm_core.locks import RwSemaphore
from mm_core.tlbflush import flush_tlb_range


def vma_address(vma, index: int) -> int | None:
    """vma_address(): where file page ``index`` is mapped in ``vma`` (None: not in it)."""
    addr = vma.start + ((index - vma.pgoff) << vma.mm.kernel.page_shift)
    return addr if vma.start <= addr < vma.end else None


async def walk_to_pmd(k, mm, addr: int) -> int | None:
    """mm_find_pmd(): the pmd entry address for ``addr`` if the upper tables exist."""
    table = mm.pgd
    for level in range(k.arch.pmd_level):
        ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, addr), level)
        if ent.kind is not Kind.TABLE:
            return None
        table = ent.paddr
    return pgtable.entry_addr(k, table, k.arch.pmd_level, addr)


TTU_HWPOISON = 1 << 5      # enum ttu_flags (include/linux/rmap.h): a poisoned page leaves hwpoison entries


async def try_to_unmap_file_page(k, folio, index: int, flags: int = 0) -> int:
    """try_to_unmap() of page ``index`` of a small page-cache folio: rmap_walk_file() over
    i_mmap, try_to_unmap_one() in each VMA: page_vma_mapped_walk() (collapse_file() passes
    no TTU_SYNC, so pte_offset_map_nolock(), a lockless look, then the ptl; a failed map
    rereads the pmd, and a retracted table means nothing to unmap there) and clear every
    pte it finds. With TTU_HWPOISON and a poisoned page (memory failure) the pte becomes
    a hwpoison entry; otherwise a uffd-wp marker is left where the pte was uffd-wp
    protected (pte_install_uffd_wp_if_needed()). Returns how many were unmapped."""
    from mm_core.memory import _put_mapped_page, pte_install_uffd_wp_if_needed
    from mm_core.page_vma_mapped import PageVmaMappedWalk, page_vma_mapped_walk
    mapping, arch = folio.mapping, k.arch
    paddr = folio.paddr + ((index - folio.index) << k.page_shift)
    unmapped = 0
    await traps.lock(mapping.i_mmap_rwsem, "r")
    try:
        for vma in list(mapping.i_mmap):
            addr = vma_address(vma, index)
            if addr is None:
                continue
            pvmw = PageVmaMappedWalk(paddr, 1, vma, addr)
            rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, vma.mm, addr, addr + k.page_size)
            while await page_vma_mapped_walk(k, pvmw):
                old = await pgtable.clear_entry(k, pvmw.pte, arch.pte_level)    # ptep_clear_flush()
                pteval = arch.decode(arch.pte_level, old)
                await flush_tlb_range(k, vma.mm, pvmw.address, pvmw.address + k.page_size)
                if flags & TTU_HWPOISON and folio.extra.get("hwpoison"):
                    poisoned = swap_entry(SWP_HWPOISON, paddr >> 12)        # make_hwpoison_entry()
                    await pgtable.set_entry(k, pvmw.pte, arch.pte_level, poisoned)
                    k.stats["hwpoison_unmapped"] += 1
                else:
                    # a uffd-wp protected pte of a file VMA leaves a marker (still under the ptl)
                    await pte_install_uffd_wp_if_needed(k, vma, pvmw.pte, pteval)
                _put_mapped_page(k, vma.mm, folio)
                unmapped += 1
            await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
    finally:
        await traps.unlock(mapping.i_mmap_rwsem, "r")
    return unmapped


# -- anonymous folios ----------------------------------------------------------------------

class AnonVma:
    """struct anon_vma (reduced): the root's rwsem, and the mm whose VMAs it covers. With
    no fork() in the model every anon_vma has one mm; the rmap walk looks at that mm's
    VMAs (the anon_vma_chain) and lets page_vma_mapped_walk's pfn check pick the pte."""

    def __init__(self, k, mm) -> None:
        self.mm = mm
        self.rwsem = RwSemaphore(f"mm{mm.id}.anon_vma{k.next_id('anon_vma')}", "anon_vma")

    def __repr__(self) -> str:
        return f"<{self.rwsem.name}>"


def anon_vma_prepare(k, vma) -> AnonVma:
    """anon_vma_prepare(): give ``vma`` an anon_vma before its first anon page."""
    if not isinstance(vma.anon_vma, AnonVma):
        vma.anon_vma = AnonVma(k, vma.mm)
    return vma.anon_vma


def linear_page_index(k, vma, addr: int) -> int:
    """linear_page_index(): the page offset ``addr`` stands for in ``vma``'s object."""
    return ((addr - vma.start) >> k.page_shift) + vma.pgoff


def folio_add_new_anon_rmap(k, folio, vma, addr: int) -> None:
    """folio_add_new_anon_rmap(): folio->mapping = anon_vma | PAGE_MAPPING_ANON,
    folio->index = linear_page_index(); the folio is exclusive (PageAnonExclusive)."""
    folio.extra["anon_vma"] = anon_vma_prepare(k, vma)
    folio.index = linear_page_index(k, vma, addr)


def folio_anon_vma(folio) -> AnonVma | None:
    """folio_get_anon_vma() / folio_anon_vma(): None once the folio is no longer anon-mapped."""
    return folio.extra.get("anon_vma") if folio.mapcount > 0 else None


def folio_move_anon_rmap(k, folio, vma) -> None:
    """folio_move_anon_rmap(): point an exclusive anon folio at ``vma``'s anon_vma (the
    caller holds the folio lock; UFFDIO_MOVE also holds the old anon_vma's write lock)."""
    folio.extra["anon_vma"] = anon_vma_prepare(k, vma)


async def folio_referenced_file(k, folio) -> tuple[int, int]:
    """folio_referenced() of a locked small shmem (page-cache) folio: rmap_walk_file()
    under the i_mmap read lock, folio_referenced_one() in each VMA mapping its index
    (page_vma_mapped_walk(), ptep_clear_flush_young() at every hit). (referenced, found)."""
    from mm_core.page_vma_mapped import folio_vma_walk, page_vma_mapped_walk
    mapping, arch = folio.mapping, k.arch
    referenced = found = 0
    await traps.lock(mapping.i_mmap_rwsem, "r")
    try:
        for vma in list(mapping.i_mmap):
            addr = vma_address(vma, folio.index)
            if addr is None:
                continue
            pvmw = folio_vma_walk(k, folio, vma, addr)
            while await page_vma_mapped_walk(k, pvmw):
                found += 1
                if pvmw.pte is None:
                    continue                                # PMD-mapped: not a small folio
                ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte))
                if ent.young:
                    referenced += 1
                    await pgtable.set_entry(k, pvmw.pte, arch.pte_level, ent.with_(young=False))
                    await flush_tlb_range(k, vma.mm, pvmw.address, pvmw.address + k.page_size)
    finally:
        await traps.unlock(mapping.i_mmap_rwsem, "r")
    return referenced, found


async def folio_referenced_anon(k, folio) -> tuple[int, int]:
    """folio_referenced() of a locked anon folio: rmap_walk_anon() under the anon_vma read
    lock, folio_referenced_one() in each VMA: page_vma_mapped_walk() from
    vma_address(folio->index) (no PVMW_SYNC: a failed map rereads the pmd, a retracted or
    zapped table means not mapped there) and ptep_clear_flush_young() at every hit.
    Returns (referenced, mappings found)."""
    from mm_core import vmscan
    from mm_core.page_vma_mapped import folio_vma_walk, page_vma_mapped_walk
    arch = k.arch
    anon_vma = folio_anon_vma(folio)
    if anon_vma is None:
        return 0, 0
    referenced = found = 0
    await traps.lock(anon_vma.rwsem, "r")
    try:
        for vma in list(anon_vma.mm.vmas):
            if not vma.anon_vma:
                continue
            addr = vma_address(vma, folio.index)
            if addr is None:
                continue
            pvmw = folio_vma_walk(k, folio, vma, addr)
            while await page_vma_mapped_walk(k, pvmw):
                found += 1
                if pvmw.pte is None:                        # PMD-mapped: pmdp_clear_flush_young
                    ent = arch.decode(arch.pmd_level, await pgtable.get_raw(k, pvmw.pmd))
                    entp, level, span = pvmw.pmd, arch.pmd_level, arch.levels[arch.pmd_level].span
                else:
                    ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte))
                    entp, level, span = pvmw.pte, arch.pte_level, k.page_size
                    if ent.young and vmscan.lru_gen_enabled(k):
                        # 6.6 folio_referenced_one(): MGLRU looks at the neighbours first
                        await vmscan.lru_gen_look_around(k, vma, pvmw.address, pvmw.pte, pvmw.ptl,
                                                         pvmw.pmd, folio)
                        referenced += 1
                        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte))
                if ent.young:
                    referenced += 1
                    await pgtable.set_entry(k, entp, level, ent.with_(young=False))
                    await flush_tlb_range(k, vma.mm, pvmw.address, pvmw.address + span)
    finally:
        await traps.unlock(anon_vma.rwsem, "r")
    return referenced, found


async def try_to_unmap_anon(k, folio) -> None:
    """try_to_unmap() of a locked anon folio in the swap cache: rmap_walk_anon() under the
    anon_vma read lock, try_to_unmap_one() at vma_address(folio->index) of each VMA; the
    walk stops early when one fails (an mlocked VMA, a stale swap entry). The caller
    looks at folio_mapped() afterwards."""
    anon_vma = folio_anon_vma(folio)
    if anon_vma is None:
        return
    await traps.lock(anon_vma.rwsem, "r")
    try:
        for vma in list(anon_vma.mm.vmas):
            if not vma.anon_vma:
                continue
            addr = vma_address(vma, folio.index)
            if addr is None:
                continue
            if not await try_to_unmap_one(k, folio, vma, addr):
                break
    finally:
        await traps.unlock(anon_vma.rwsem, "r")


async def try_to_unmap_one(k, folio, vma, addr: int) -> bool:
    """try_to_unmap_one() for a swap-backed anon folio: the unmap below between
    mmu_notifier_invalidate_range_start() and _end() over the page (a mirror drops it
    first; the start may sleep, so no pte map is held across it)."""
    rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, vma.mm, addr, addr + k.page_size)
    try:
        return await _try_to_unmap_one(k, folio, vma, addr)
    finally:
        await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)


async def _try_to_unmap_one(k, folio, vma, addr: int) -> bool:
    """try_to_unmap_one()'s body for a swap-backed anon folio (page_vma_mapped_walk with
    pte_offset_map_lock: a failed map means it is not mapped there, SKIP). Under the ptl:
    an mlocked VMA keeps it (false: the walk stops); else ptep_clear_flush() (the TLB
    flush waits for the other vCPUs), the dirty bit goes to the folio, swap_duplicate()
    of folio->swap, the mm joins swapoff's mmlist, MM_ANONPAGES -> MM_SWAPENTS, the swap
    entry (exclusive when the page was PageAnonExclusive, with soft-dirty and uffd-wp) is
    written in its place, and the mapping and its reference go (page_remove_rmap +
    folio_put; the swap cache still holds the folio)."""
    from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS, VM_LOCKED
    from mm_core.swapfile import add_to_mmlist, swap_duplicate, swp_entry_to_pte
    mm, arch = vma.mm, k.arch
    pmdp = await walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return True
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        k.stats["pvmw_map_failed"] += 1
        return True
    ptep, ptl = locked
    try:
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if pte.kind is not Kind.LEAF or pte.paddr != folio.paddr:
            return True
        if vma.flags & VM_LOCKED:
            k.stats["try_to_unmap_mlocked"] += 1
            return False
        anon_exclusive = not folio.extra.get("forked")            # PageAnonExclusive()
        old = arch.decode(arch.pte_level, await pgtable.clear_entry(k, ptep, arch.pte_level))
        await flush_tlb_range(k, mm, addr, addr + k.page_size)    # ptep_clear_flush()
        if old.dirty:
            folio.extra["dirty"] = True                           # folio_mark_dirty()
        swp = swp_entry_to_pte(folio.extra["swap"], exclusive=anon_exclusive,
                               soft_dirty=old.soft_dirty, uffd_wp=old.uffd_wp)
        if await swap_duplicate(k, swp) < 0:
            await pgtable.set_entry(k, ptep, arch.pte_level, old)
            return False
        add_to_mmlist(k, mm)
        mm.rss[MM_ANONPAGES] -= 1
        mm.rss[MM_SWAPENTS] += 1
        await pgtable.set_entry(k, ptep, arch.pte_level, swp)
        folio.mapcount -= 1                                       # page_remove_rmap()
        folio.refcount -= 1                                       # folio_put()
        k.stats["try_to_unmap_swap"] += 1
        return True
    finally:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
