"""mprotect (mm/mprotect.c): change VMA flags and rewrite the PTEs in place."""
from __future__ import annotations

from emu.arch import (
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    Access,
    Kind,
    swap_entry,
)
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import huge_memory, memory, mmu_notifier, pgtable
from mm_core.locks import mmap_write_lock, mmap_write_unlock
from mm_core.mm import (
    VM_ACCESS_FLAGS,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_SHARED,
    VM_WRITE,
    VMA,
    MMStruct,
)
from mm_core.mmap import EACCES, EINVAL, ENOMEM, calc_vm_prot_bits, page_align, split_range
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.swapops import PTE_MARKER_UFFD_WP, is_pte_marker, make_pte_marker, pte_marker_uffd_wp
from mm_core.tlbflush import flush_tlb_range

EAGAIN = 11


async def do_mprotect(k, mm: MMStruct, start: int, length: int, prot: int) -> int:
    """do_mprotect_pkey(): 0 or -errno (-ENOMEM when part of the range is unmapped)."""
    if start % k.page_size:
        return -EINVAL
    end = start + page_align(length, k.page_size)
    if end <= start:
        return 0 if length == 0 else -EINVAL
    newflags = calc_vm_prot_bits(prot)
    await mmap_write_lock(mm)
    try:
        covered, addr = True, start
        for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
            covered &= vma.start <= addr
            addr = vma.end
        if not covered or addr < end:
            return -ENOMEM
        for vma in mm.overlapping(start, end):
            may = (vma.flags & (VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC)) >> 4
            if newflags & ~may:
                return -EACCES
        for vma in split_range(mm, start, end):     # mprotect_fixup()
            vma.flags = (vma.flags & ~VM_ACCESS_FLAGS) | newflags
            await change_protection(k, vma, vma.start, vma.end, MM_CP_TRY_CHANGE_WRITABLE)
        mm.merge_adjacent()
        return 0
    finally:
        await mmap_write_unlock(mm)


# cp_flags of change_protection() (include/linux/mm.h)
MM_CP_TRY_CHANGE_WRITABLE = 1 << 0
MM_CP_PROT_NUMA = 1 << 1
MM_CP_UFFD_WP = 1 << 2
MM_CP_UFFD_WP_RESOLVE = 1 << 3
MM_CP_UFFD_WP_ALL = MM_CP_UFFD_WP | MM_CP_UFFD_WP_RESOLVE


def userfaultfd_wp_use_markers(vma: VMA) -> bool:
    """userfaultfd_wp_use_markers() (include/linux/userfaultfd_k.h, 6.4+): only WP mode
    uses markers; a file VMA always protects none ptes with PTE_MARKER_UFFD_WP (the page
    cache may hold the page); anonymous memory only with UFFD_FEATURE_WP_UNPOPULATED
    ("to apply markers on zero pages")."""
    from mm_core.userfaultfd import userfaultfd_wp_unpopulated
    if not vma.uffd_wp:
        return False
    if not vma.anonymous:
        return True
    return userfaultfd_wp_unpopulated(vma)


def pgtable_split_needed(vma: VMA, cp_flags: int) -> bool:
    """pgtable_split_needed() (6.4+; uffd_wp_protect_file() before): markers live at the
    PTE level, and a file THP cannot be write-protected whole: split (for a file THP: drop
    the pmd) under MM_CP_UFFD_WP. An anon THP is protected in place as a pmd, with or
    without WP_UNPOPULATED."""
    return bool(cp_flags & MM_CP_UFFD_WP) and not vma.anonymous


def pgtable_populate_needed(vma: VMA, cp_flags: int) -> bool:
    """pgtable_populate_needed() (6.4+): UFFDIO_WRITEPROTECT of a VMA that uses markers (a
    file VMA, or anon with WP_UNPOPULATED) must allocate the PTE tables to hold them."""
    return bool(cp_flags & MM_CP_UFFD_WP) and userfaultfd_wp_use_markers(vma)


async def change_protection(k, vma: VMA, start: int, end: int, cp_flags: int = 0) -> int:
    """change_protection() -> change_pmd_range() -> change_pte_range(), then flush.
    Returns the pages changed, or -ENOMEM when change_pmd_prepare() could not allocate a
    PTE table for uffd-wp markers."""
    assert cp_flags & MM_CP_UFFD_WP_ALL != MM_CP_UFFD_WP_ALL
    pages = 0
    if pgtable_populate_needed(vma, cp_flags):
        # change_p?d_prepare(): the upper tables too, where none are there yet
        addr = start
        size = k.arch.levels[k.arch.pmd_level].span
        while addr < end:
            try:
                if await pgtable.walk_alloc(k, vma.mm, addr, k.arch.pmd_level) is None:
                    return -ENOMEM
            except OutOfMemory:
                return -ENOMEM
            addr = (addr | (size - 1)) + 1
    rng = None
    async for pmdp, lo, hi in memory.for_each_pmd(k, vma.mm, start, end):
        if rng is None and getattr(vma.mm, "notifier_subscriptions", None) is not None \
                and (await pgtable.get_entry(k, pmdp, k.arch.pmd_level)).kind is not Kind.NONE:
            # change_pmd_range(): "invoke the mmu notifier if the pmd is populated"
            rng = await mmu_notifier.mmu_notifier_invalidate_range_start(
                k, vma.mm, lo, end, mmu_notifier.MMU_NOTIFY_PROTECTION_VMA)
        ret = await change_pmd_range(k, vma, pmdp, lo, hi, cp_flags)
        if ret < 0:
            pages = ret
            break
        pages += ret
    if rng is not None:
        await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
    await flush_tlb_range(k, vma.mm, start, end)
    return pages


async def change_pmd_prepare(k, vma: VMA, pmdp: int, cp_flags: int) -> int:
    """change_pmd_prepare(): allocate the PTE table of a none pmd when markers need it."""
    if pgtable_populate_needed(vma, cp_flags):
        try:
            if not await pgtable.pte_alloc(k, vma.mm, pmdp):
                return -ENOMEM
        except OutOfMemory:
            return -ENOMEM
    return 0


async def change_pmd_range(k, vma: VMA, pmdp: int, start: int, end: int, cp_flags: int = 0) -> int:
    """change_pmd_range() for one pmd: none is skipped, a PMD leaf covered whole changes in
    place (change_huge_pmd) or is split (always for a file VMA under MM_CP_UFFD_WP), a table
    goes to change_pte_range, whose -EAGAIN (map failure) means: look at this pmd again
    (RETRY). Under MM_CP_UFFD_WP on a marker-using VMA a none pmd first gets a table."""
    arch = k.arch
    size = arch.levels[arch.pmd_level].span
    while True:                                                      # again:
        ret = await change_pmd_prepare(k, vma, pmdp, cp_flags)
        if ret:
            return ret
        pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        if pmdval.kind is Kind.NONE:
            return 0
        whole = start & (size - 1) == 0 and end - start == size
        if pmdval.kind is Kind.MIGRATION and whole:                  # is_swap_pmd()
            ret = await change_huge_pmd(k, vma, pmdp, pmdval, cp_flags)
            if ret:
                return 0
            continue
        if pmdval.kind is Kind.LEAF:
            if whole and not pgtable_split_needed(vma, cp_flags):
                ret = await change_huge_pmd(k, vma, pmdp, pmdval, cp_flags)
                if ret:                                      # "huge pmd was handled"
                    return size >> k.page_shift if ret == 2 else 0
            else:
                await huge_memory.split_huge_pmd(k, vma, pmdp, start)
            continue
        if pmdval.kind is not Kind.TABLE:
            return 0
        ret = await change_pte_range(k, vma, pmdp, start, end, cp_flags)
        if ret == -EAGAIN and "change_pte_range_ignores_map_failure" in k.bugs:
            # bug injection: no failure path, change_pte_range() walks the table it saw
            await pgtable.walk_stale_pte_table(k, pmdval, start, end)
            return 0
        if ret != -EAGAIN:
            return ret
        k.stats["change_pmd_retry"] += 1
        await sched_point("retry", pmdp)


def _page_to_nid(k, paddr: int) -> int:
    from mm_core.mempolicy import page_to_nid
    return page_to_nid(k, paddr)


async def change_huge_pmd(k, vma: VMA, pmdp: int, pmdval, cp_flags: int = 0) -> int:
    """change_huge_pmd(): new protection on a PMD leaf, under pml; MM_CP_UFFD_WP sets the
    pmd's uffd-wp bit and write-protects it, _RESOLVE clears the bit. MM_CP_PROT_NUMA
    (6.6): the huge zero page and a pmd already protnone are left (handled, not counted),
    else the pmd becomes PAGE_NONE (pmdp_invalidate_ad() + pmd_modify(PAGE_NONE)) for
    do_huge_pmd_numa_page(). Returns 0 (no longer this leaf: look again), 1 (handled,
    unchanged), 2 (changed: HPAGE_PMD_NR)."""
    mm, arch = vma.mm, k.arch
    pml = await pgtable.pmd_lockptr(k, mm, pmdp)
    await traps.lock(pml)
    try:
        if await pgtable.get_entry(k, pmdp, arch.pmd_level) != pmdval:
            return 0
        if pmdval.kind is Kind.MIGRATION:
            return await _change_migration_pmd(k, vma, pmdp, pmdval, cp_flags)
        if cp_flags & MM_CP_PROT_NUMA:
            if pmdval.special or memory.pte_protnone(pmdval):    # is_huge_zero_pmd(), pmd_protnone()
                return 1
            await pgtable.set_entry(k, pmdp, arch.pmd_level, pmdval.with_(prot=Access.NONE))
            k.stats["numa_huge_pmd_updates"] += 1
            return 2
        uffd_wp = pmdval.uffd_wp
        if cp_flags & MM_CP_UFFD_WP:
            uffd_wp = True
        elif cp_flags & MM_CP_UFFD_WP_RESOLVE:
            uffd_wp = False
        prot = memory.vm_get_page_prot(vma.flags)
        folio = k.alloc.page_of(pmdval.paddr)
        if (vma.flags & VM_WRITE and pmdval.dirty and folio is not None and folio.use is PageUse.ANON
                and folio.refcount == 1):
            prot |= Access.W
        if uffd_wp:
            prot &= ~Access.W                                        # pmd_wrprotect(pmd_mkuffd_wp())
        await pgtable.set_entry(k, pmdp, arch.pmd_level, pmdval.with_(prot=prot, uffd_wp=uffd_wp))
        return 2
    finally:
        await traps.unlock(pml)


async def _change_migration_pmd(k, vma: VMA, pmdp: int, pmdval, cp_flags: int) -> int:
    """change_huge_pmd()'s is_swap_pmd() branch (under pml, for every cp_flags): "a
    protection check is difficult so just be safe and disable write": a writable migration
    entry becomes a readable (exclusive, for anon) one, which remove_migration_pmd() will
    not make writable again; uffd-wp set or cleared. Handled (1), never counted."""
    typ = pmdval.swp_type
    k.stats["change_huge_pmd_migration"] += 1
    if typ == SWP_MIGRATION_WRITE and "change_huge_pmd_keeps_writable_migration_entry" not in k.bugs:
        page = k.alloc.page_of(pmdval.swp_offset << k.page_shift)
        typ = SWP_MIGRATION_READ_EXCLUSIVE if page is not None and page.use is PageUse.ANON \
            else SWP_MIGRATION_READ
    uffd_wp = True if cp_flags & MM_CP_UFFD_WP else False if cp_flags & MM_CP_UFFD_WP_RESOLVE \
        else pmdval.uffd_wp
    new = swap_entry(typ, pmdval.swp_offset, soft_dirty=pmdval.soft_dirty, uffd_wp=uffd_wp)
    if new != pmdval:
        await pgtable.set_entry(k, pmdp, k.arch.pmd_level, new)
    return 1


async def change_pte_range(k, vma: VMA, pmdp: int, start: int, end: int, cp_flags: int = 0) -> int:
    """change_pte_range(): rewrite present PTEs with the VMA's new protection. Write stays
    only where it needs no fault (can_change_pte_writable(): a dirty exclusive anon page in
    a private mapping, a dirty page in a shared one; never a uffd-wp pte). -EAGAIN when the
    PTE table cannot be mapped.

    MM_CP_PROT_NUMA (change_prot_numa()): PAGE_NONE instead, skipping ptes already
    protnone, special and KSM pages, shared COW pages, dirty file pages, and pages already
    on the node a single-threaded private mapping runs on (node 0: every page, with one
    node).

    uffd-wp (UFFDIO_WRITEPROTECT): MM_CP_UFFD_WP sets the uffd-wp bit (pte_mkuffd_wp, which
    write-protects) on present ptes and swap ptes, and puts PTE_MARKER_UFFD_WP in none
    ptes of marker-using VMAs (file, or anon with WP_UNPOPULATED); MM_CP_UFFD_WP_RESOLVE
    clears the bit and drops uffd-wp markers (the next access faults without trapping).
    Returns the ptes changed."""
    mm, arch = vma.mm, k.arch
    uffd_wp = bool(cp_flags & MM_CP_UFFD_WP)
    uffd_wp_resolve = bool(cp_flags & MM_CP_UFFD_WP_RESOLVE)
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, start)
    if locked is None:
        return -EAGAIN
    ptep, ptl = locked
    level = arch.pte_level
    base = memory.vm_get_page_prot(vma.flags)
    prot_numa = bool(cp_flags & MM_CP_PROT_NUMA)
    single_node_target = prot_numa and not vma.flags & VM_SHARED and mm.users == 1
    pages = 0
    for addr in range(start, end, k.page_size):
        entp = ptep + ((addr - start) >> k.page_shift) * 8
        ent = arch.decode(level, await pgtable.get_raw(k, entp))
        if ent.kind is Kind.LEAF and prot_numa:
            if memory.pte_protnone(ent) or ent.special:
                continue
            page = k.alloc.page_of(ent.paddr)
            if page is None or page.extra.get("ksm"):
                continue
            if vma.flags & VM_MAYWRITE and not vma.flags & VM_SHARED and page.refcount != 1:
                continue                                   # is_cow_mapping() && page_count() != 1
            if page.use is PageUse.FILE and (page.extra.get("dirty") or ent.dirty):
                continue                                   # page_is_file_lru() && PageDirty()
            if single_node_target and _page_to_nid(k, page.paddr) == 0:
                continue                                   # target_node (the CPU's: 0) == page_to_nid(page)
            await pgtable.set_entry(k, entp, level, ent.with_(prot=Access.NONE))
            k.stats["numa_pte_updates"] += 1
            pages += 1
        elif ent.kind is Kind.LEAF:
            wp = True if uffd_wp else False if uffd_wp_resolve else ent.uffd_wp
            prot = base
            if vma.flags & VM_WRITE and ent.dirty and not ent.special and not wp:
                if vma.flags & VM_SHARED:
                    if cp_flags & MM_CP_TRY_CHANGE_WRITABLE:
                        prot |= Access.W
                else:
                    page = k.alloc.page_of(ent.paddr)
                    if page is not None and page.use is PageUse.ANON and page.refcount == 1 \
                            and not page.extra.get("ksm"):
                        prot |= Access.W
            if ent.special or wp:
                prot &= ~Access.W
            if prot != ent.prot or wp != ent.uffd_wp:
                await pgtable.set_entry(k, entp, level, ent.with_(prot=prot, uffd_wp=wp))
                pages += 1
        elif ent.kind is Kind.SWAP or ent.kind is Kind.MIGRATION:
            if is_pte_marker(ent):
                # a poisoned marker stays; a uffd-wp marker goes on un-protect
                if uffd_wp_resolve and pte_marker_uffd_wp(ent):
                    await pgtable.clear_entry(k, entp, level)
                    pages += 1
                continue
            wp = True if uffd_wp else False if uffd_wp_resolve else ent.uffd_wp
            if wp != ent.uffd_wp:                   # pte_swp_mkuffd_wp / pte_swp_clear_uffd_wp
                await pgtable.set_entry(k, entp, level, ent.with_(uffd_wp=wp))
                pages += 1
        elif ent.kind is Kind.NONE and uffd_wp and userfaultfd_wp_use_markers(vma):
            await pgtable.set_entry(k, entp, level, make_pte_marker(PTE_MARKER_UFFD_WP))
            k.stats["uffd_wp_markers"] += 1
            pages += 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return pages
