"""fork's address-space copy (kernel/fork.c dup_mmap, mm/memory.c copy_page_range).

    dup_mmap()         under mmap_write_lock of the parent and (nested) of the child: every
                       VMA is duplicated (vm_area_dup), gets the parent's anon_vma
                       (anon_vma_fork), is linked into its file's i_mmap right after the
                       parent's VMA, and then its page tables are copied
    copy_page_range()  only when vma_needs_copy(): a VMA with an anon_vma (or uffd-wp in
                       the child, or VM_PFNMAP/MIXEDMAP); file VMAs without one refault
    copy_pmd_range()   per pmd: huge and migration pmds go to copy_huge_pmd() (file huge
                       pmds are skipped: they refault), -EAGAIN falls through to the PTEs
    copy_pte_range()   the child's table with pte_alloc_map_lock(), the parent's with
                       pte_offset_map_nolock() (6.5-6.12) / pte_offset_map_rw_nolock()
                       (6.13, with a dummy pmdval: no pmd_same) and spin_lock_nested()

Failure handling (the 6.5 series, 3db82b9374ca "mm/memory: allow pte_offset_map[_lock]()
to fail"): a child table that cannot be allocated or mapped is -ENOMEM (GIVEUP: fork
fails); a parent table that cannot be mapped returns 0 (SKIP: that extent stays empty in
the child). Both rest on the exclusion Hugh's comment in copy_pte_range() describes:
exclusive mmap_lock keeps anon THPs stable, and retract_page_tables(), which takes no
mmap_lock, skips VMAs with an anon_vma while vma_needs_copy() skips VMAs without one. Qi
Zheng's 6.13 conversion (v4 of "mm: copy_pte_range() use pte_offset_map_rw_nolock()")
kept that reasoning and added no pmd_same() recheck; the ptes are read under the ptl
before any is written, which is the pte_same-style recheck the walker contract asks for.

Not modelled: the -EAGAIN path for possibly pinned anon pages (copy_present_page with a
preallocated folio: nothing pins pages here), need_resched()/spin_needbreak() breaks of
the loop (the scheduler preempts only at traps), VM_DONTCOPY / VM_WIPEONFORK (no madvise
sets them), the huge zero page. uffd contexts: dup_userfaultfd() (mm_core/userfaultfd.py)
keeps the child's VMAs registered, to a new context, with UFFD_FEATURE_EVENT_FORK (then
uffd-wp bits and markers are copied too: vma_needs_copy()), and drops the registration
without it.
"""
from __future__ import annotations

from emu.arch import SWP_MIGRATION_READ, SWP_MIGRATION_WRITE, Access, Kind, swap_entry
from emu.sched import traps
from mm_core import huge_memory, memory, pgtable, swapfile
from mm_core.locks import mmap_write_lock, mmap_write_unlock
from mm_core.mm import MM_SWAPENTS, VM_LOCKED, VM_MAYWRITE, VM_SHARED, VMA, MMStruct
from mm_core.page_alloc import OutOfMemory
from mm_core.swapops import (
    PTE_MARKER_POISONED,
    PTE_MARKER_UFFD_WP,
    is_pte_marker,
    make_pte_marker,
    pte_marker_get,
)
from mm_core.tlbflush import flush_tlb_range

ENOMEM, EAGAIN = 12, 11
VM_PFNMAP, VM_MIXEDMAP = 0x400, 0x10000000


def is_cow_mapping(flags: int) -> bool:
    """is_cow_mapping(): may write but not shared."""
    return flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE


def vma_needs_copy(k, dst_vma: VMA, src_vma: VMA) -> bool:
    """vma_needs_copy(): copy the page tables only where a fault could not refill them.
    The anon_vma test is half of the exclusion with retract_page_tables()."""
    if dst_vma.uffd_wp:
        return True
    if src_vma.flags & (VM_PFNMAP | VM_MIXEDMAP):
        return True
    if src_vma.anon_vma:
        return True
    return "fork_copies_file_vma_without_anon_vma" in k.bugs


def vm_area_dup(mm: MMStruct, vma: VMA) -> VMA:
    """vm_area_dup() + anon_vma_fork() + vm_flags_clear(VM_LOCKED_MASK): the child's copy
    of ``vma``, still with the parent's uffd context and flags (dup_userfaultfd() decides
    about them next); VM_LOCKED is not inherited."""
    return VMA(mm, vma.start, vma.end, vma.flags & ~VM_LOCKED, vma.name, vma.file,
               vma.pgoff, anon_vma=vma.anon_vma, uffd_ctx=vma.uffd_ctx, policy=vma.policy)  # vma_dup_policy()


async def dup_mmap(k, mm: MMStruct, oldmm: MMStruct) -> int:
    """dup_mmap(): copy every VMA of ``oldmm`` into the new, empty ``mm`` and copy the page
    tables where vma_needs_copy() says so. 0 or -ENOMEM (the caller then tears ``mm``
    down with exit_mmap, as mmput() does). dup_userfaultfd() per VMA under the locks;
    after both are dropped dup_userfaultfd_complete() sends UFFD_EVENT_FORK to each
    parent context with the feature and waits for the handler's read() (6.6 sends it
    even when the fork failed; 6.12's dup_userfaultfd_fail() sends nothing then)."""
    from mm_core.userfaultfd import dup_userfaultfd, dup_userfaultfd_complete, dup_userfaultfd_fail
    uf: list = []
    await mmap_write_lock(oldmm)
    await mmap_write_lock(mm)              # mmap_write_lock_nested(): same class, no lockdep report
    retval = 0
    copied: list[VMA] = []
    try:
        mm.start_brk, mm.brk, mm.start_stack = oldmm.start_brk, oldmm.brk, oldmm.start_stack
        mm.mmap_base = oldmm.mmap_base
        for mpnt in list(oldmm.vmas):
            tmp = vm_area_dup(mm, mpnt)
            await dup_userfaultfd(k, tmp, uf)                  # cannot fail here (no -ENOMEM)
            if tmp.file is not None:
                mapping = tmp.file.mapping
                tmp.file.refs += 1                             # get_file()
                await traps.lock(mapping.i_mmap_rwsem, "w")
                # vma_interval_tree_insert_after(tmp, mpnt): right behind the parent's VMA
                pos = mapping.i_mmap.index(mpnt) + 1 if mpnt in mapping.i_mmap else len(mapping.i_mmap)
                mapping.i_mmap.insert(pos, tmp)
                await traps.unlock(mapping.i_mmap_rwsem, "w")
            mm.insert_vma(tmp)
            retval = await copy_page_range(k, tmp, mpnt)
            if retval:
                break
            copied.append(mpnt)
        k.stats["forks" if not retval else "fork_failed"] += 1
    finally:
        await mmap_write_unlock(mm)
        for mpnt in copied:                                   # flush_tlb_mm(oldmm)
            if is_cow_mapping(mpnt.flags):
                await flush_tlb_range(k, oldmm, mpnt.start, mpnt.end)
        await mmap_write_unlock(oldmm)
    if retval and k.profile.version >= (6, 12):
        dup_userfaultfd_fail(k, uf)
    else:
        await dup_userfaultfd_complete(k, uf)
    return retval


async def copy_page_range(k, dst_vma: VMA, src_vma: VMA) -> int:
    """copy_page_range(): walk the parent's tables over the VMA (only present upper
    entries are descended into) and copy each pmd; 0 or -ENOMEM."""
    if not vma_needs_copy(k, dst_vma, src_vma):
        k.stats["fork_vma_skipped"] += 1
        return 0
    async for src_pmdp, addr, nxt in memory.for_each_pmd(k, src_vma.mm, src_vma.start, src_vma.end):
        ret = await copy_pmd_range(k, dst_vma, src_vma, src_pmdp, addr, nxt)
        if ret:
            return ret
    return 0


async def copy_pmd_range(k, dst_vma: VMA, src_vma: VMA, src_pmdp: int, addr: int, end: int) -> int:
    """copy_pmd_range() for one pmd: pmd_alloc() in the child, then huge / table."""
    arch = k.arch
    src_pmd = await pgtable.get_entry(k, src_pmdp, arch.pmd_level)
    if src_pmd.kind is Kind.NONE:
        return 0
    try:
        dst_pmdp = await pgtable.walk_alloc(k, dst_vma.mm, addr, arch.pmd_level)
    except OutOfMemory:
        return -ENOMEM
    if dst_pmdp is None:
        return -ENOMEM
    if src_pmd.kind in (Kind.LEAF, Kind.MIGRATION):
        err = await huge_memory.copy_huge_pmd(k, dst_vma, src_vma, dst_pmdp, src_pmdp, addr)
        if err == -ENOMEM:
            return -ENOMEM
        if not err:
            return 0
        k.stats["copy_huge_pmd_eagain"] += 1          # -EAGAIN: fall through to the PTEs
        src_pmd = await pgtable.get_entry(k, src_pmdp, arch.pmd_level)
    # pmd_none_or_clear_bad()
    if src_pmd.kind is Kind.NONE:
        return 0
    if src_pmd.kind is Kind.BAD:
        k.printk(f"pmd_ERROR: bad pmd {src_pmdp:#x}")
        await pgtable.clear_entry(k, src_pmdp, arch.pmd_level)
        return 0
    if await copy_pte_range(k, dst_vma, src_vma, dst_pmdp, src_pmdp, addr, end):
        return -ENOMEM
    return 0


async def copy_pte_range(k, dst_vma: VMA, src_vma: VMA, dst_pmdp: int, src_pmdp: int,
                         addr: int, end: int) -> int:
    """copy_pte_range(): GIVEUP (-ENOMEM) when the child's table cannot be allocated or
    mapped (pte_alloc_map_lock), SKIP (return 0, nothing more copied) when the parent's
    cannot be mapped (pte_offset_map_nolock / _rw_nolock). Every 32 units of progress it
    may stop for need_resched() (a recorded data choice), drop both ptls and go ``again``:
    the maps are then taken afresh and may fail the second time."""
    arch = k.arch
    dst_mm, src_mm = dst_vma.mm, src_vma.mm
    while True:                                             # again:
        rss = [0, 0, 0, 0]
        progress = 0
        # pte_alloc_map_lock(dst_mm, dst_pmd, addr, &dst_ptl)
        if not await pgtable.pte_alloc(k, dst_mm, dst_pmdp):
            k.stats["copy_pte_range_enomem"] += 1
            return -ENOMEM
        locked = await pgtable.pte_offset_map_lock(k, dst_mm, dst_pmdp, addr)
        if locked is None:
            k.stats["copy_pte_range_enomem"] += 1
            return -ENOMEM
        dst_pte, dst_ptl = locked
        # 6.13: pte_offset_map_rw_nolock(src_mm, src_pmd, addr, &dummy_pmdval, &src_ptl)
        mapped = await pgtable.pte_offset_map_for_write_nolock(k, src_mm, src_pmdp, addr)
        if mapped is None:
            await pgtable.pte_unmap_unlock(k, dst_pte, dst_ptl)
            k.stats["copy_pte_range_src_map_failed"] += 1
            return 0                                        # ret == 0: SKIP
        src_pte, src_ptl, _dummy_pmdval = mapped
        await traps.lock(src_ptl)                           # spin_lock_nested(SINGLE_DEPTH_NESTING)
        # the pte pointers are offsets into the two tables from the first address mapped
        first = addr
        while addr != end:
            if progress >= 32:
                progress = 0
                # need_resched() || spin_needbreak(src_ptl) || spin_needbreak(dst_ptl)
                if await traps.choose(2, "need_resched"):
                    k.stats["copy_pte_range_resched"] += 1
                    break
            off = ((addr - first) >> k.page_shift) * 8
            ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, src_pte + off))
            if ptent.kind is Kind.NONE:
                progress += 1
            elif ptent.kind is not Kind.LEAF:
                await copy_nonpresent_pte(k, dst_vma, src_vma, dst_pte + off, src_pte + off, ptent, rss)
                progress += 8
            else:
                await copy_present_pte(k, dst_vma, src_vma, dst_pte + off, src_pte + off, ptent, addr, rss)
                progress += 8
            addr += k.page_size
        await pgtable.pte_unmap_unlock(k, src_pte, src_ptl)
        for j, n in enumerate(rss):                         # add_mm_rss_vec()
            dst_mm.rss[j] += n
        await pgtable.pte_unmap_unlock(k, dst_pte, dst_ptl)
        if addr == end:                                     # else cond_resched(); goto again
            break
    k.stats["copy_pte_range"] += 1
    return 0


def vm_normal_page(k, pte):
    """vm_normal_page(): the struct page behind a pte, None for special ones (zero page)."""
    return None if pte.special else k.alloc.page_of(pte.paddr)


def _dup_page(page) -> None:
    """folio_get() + page_try_dup_anon_rmap() / page_dup_file_rmap(): one more mapping.
    A page shared with a child outlives the parent's check_mm ownership audit."""
    page.mapcount += 1
    page.refcount += 1
    page.extra["forked"] = True


async def copy_present_pte(k, dst_vma: VMA, src_vma: VMA, dst_ptep: int, src_ptep: int, pte,
                           addr: int, rss: list[int]) -> int:
    """copy_present_pte(): share the page with the child (anon: dup the anon rmap; file:
    dup the file rmap), write-protect both ptes of a writable COW mapping, a clean pte
    for a shared mapping, an old one always; uffd-wp only if the child keeps it."""
    arch = k.arch
    page = vm_normal_page(k, pte)
    if page is not None:
        _dup_page(page)
        rss[memory.mm_counter(page)] += 1
    if is_cow_mapping(src_vma.flags) and pte.prot & Access.W:
        # ptep_set_wrprotect(src_mm, addr, src_pte): the parent's TLB is flushed at the
        # end of dup_mmap (flush_tlb_mm), still under its mmap_write_lock
        await pgtable.set_entry(k, src_ptep, arch.pte_level, pte.with_(prot=pte.prot & ~Access.W))
        pte = pte.with_(prot=pte.prot & ~Access.W)
    if src_vma.flags & VM_SHARED:
        pte = pte.with_(dirty=False)                        # pte_mkclean()
    pte = pte.with_(young=False)                            # pte_mkold()
    if not dst_vma.uffd_wp:
        pte = pte.with_(uffd_wp=False)
    await pgtable.set_entry(k, dst_ptep, arch.pte_level, pte)
    return 0


async def copy_nonpresent_pte(k, dst_vma: VMA, src_vma: VMA, dst_ptep: int, src_ptep: int, pte,
                              rss: list[int]) -> int:
    """copy_nonpresent_pte(): a swap entry is duplicated (swap_duplicate(): one more count
    in the slot's swap_map; the child joins swapoff's mmlist; an exclusive entry is made
    shared in the parent too; MM_SWAPENTS), a writable migration entry becomes readable in
    both for a COW mapping, and the entry goes to the child. swap_duplicate() cannot fail
    here (no count continuations to allocate: -EIO and add_swap_count_continuation() are
    not modelled); a stale entry is reported as a bad pte and copied as it is. A pte
    marker is copied as far as copy_pte_marker() keeps it: a poison marker always, a
    uffd-wp one only into a uffd-wp VMA (never here: the child loses its registration),
    else nothing. A hwpoison entry is copied as it is."""
    arch = k.arch
    if is_pte_marker(pte):
        marker = pte_marker_get(pte) & PTE_MARKER_POISONED
        if dst_vma.uffd_wp:
            marker |= pte_marker_get(pte) & PTE_MARKER_UFFD_WP
        if marker:
            await pgtable.set_entry(k, dst_ptep, arch.pte_level, make_pte_marker(marker))
        return 0
    if swapfile.is_swap_pte(pte):                       # !non_swap_entry(): not hwpoison
        if await swapfile.swap_duplicate(k, pte) < 0:
            k.printk(f"swap_dup: bad swap entry {pte.swp_type}:{pte.swp_offset:#x}")
        swapfile.add_to_mmlist(k, dst_vma.mm)
        if pte.exclusive:                               # pte_swp_clear_exclusive(): now shared
            pte = pte.with_(exclusive=False)
            await pgtable.set_entry(k, src_ptep, arch.pte_level, pte)
        rss[MM_SWAPENTS] += 1
    elif pte.kind is Kind.MIGRATION:
        page = k.alloc.page_of(pte.swp_offset << 12)
        if page is not None:
            rss[memory.mm_counter(page)] += 1
        if pte.swp_type == SWP_MIGRATION_WRITE and is_cow_mapping(src_vma.flags):
            pte = swap_entry(SWP_MIGRATION_READ, pte.swp_offset, soft_dirty=pte.soft_dirty,
                             uffd_wp=pte.uffd_wp)
            await pgtable.set_entry(k, src_ptep, arch.pte_level, pte)
    if not dst_vma.uffd_wp:
        pte = pte.with_(uffd_wp=False)
    await pgtable.set_entry(k, dst_ptep, arch.pte_level, pte)
    return 0
