"""Transparent huge pages at the PMD level (mm/huge_memory.c).

A PMD leaf maps one PMD-order folio (2M on x86-64/arm64/ppc64, 1M on s390x). Anonymous
THPs keep a deposited PTE table (pgtable_trans_huge_deposit) so that a later split never
needs to allocate; zap withdraws and frees it.
"""
from __future__ import annotations

from emu.arch import PAGE_SHIFT, Access, Entry, Kind, leaf_entry, table_entry
from emu.sched import traps
from mm_core import pgtable
from mm_core.mm import VM_HUGEPAGE, VM_NOHUGEPAGE, VM_SHARED, VM_WRITE
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.pgalloc import alloc_table, pte_free
from mm_core.tlbflush import flush_tlb_range


def hpage_pmd_size(k) -> int:
    return k.arch.levels[k.arch.pmd_level].span


def hpage_pmd_order(k) -> int:
    """The allocation order of a PMD-sized folio, in 4K frames."""
    return (hpage_pmd_size(k) >> PAGE_SHIFT).bit_length() - 1


def hpage_pmd_nr(k) -> int:
    """HPAGE_PMD_NR: base pages (PTEs) per PMD."""
    return hpage_pmd_size(k) >> k.page_shift


def thp_vma_suitable(k, vma, addr: int) -> bool:
    """thp_vma_allowable_order() for an anonymous PMD fault: THP "madvise" mode (the
    default of most distributions): only VMAs with MADV_HUGEPAGE, whole aligned PMD."""
    if not vma.anonymous or not k.arch.levels[k.arch.pmd_level].leaf:
        return False
    mode = k.thp_enabled
    if mode == "never" or vma.flags & VM_NOHUGEPAGE:
        return False
    if mode == "madvise" and not vma.flags & VM_HUGEPAGE:
        return False
    size = hpage_pmd_size(k)
    haddr = addr & ~(size - 1)
    return vma.start <= haddr and haddr + size <= vma.end


# -- deposit / withdraw (the spare table lives with the PMD table's lock) ----------------------

def pgtable_trans_huge_deposit(k, mm, pmdp: int, pt) -> None:
    k.deposits.setdefault(pmdp, []).append(pt)


def pgtable_trans_huge_withdraw(k, mm, pmdp: int):
    stack = k.deposits.get(pmdp)
    if not stack:
        return None
    pt = stack.pop()
    if not stack:
        del k.deposits[pmdp]
    return pt


# -- faults ------------------------------------------------------------------------------------

async def create_huge_pmd(k, vmf) -> int:
    """do_huge_pmd_anonymous_page(): allocate a PMD-order folio and map it with one PMD.
    Falls back to PTEs (VM_FAULT_FALLBACK) when no huge folio can be had."""
    from mm_core.memory import VM_FAULT_FALLBACK, vm_get_page_prot
    vma, mm = vmf.vma, vmf.vma.mm
    vma.anon_vma = True                                 # anon_vma_prepare()
    try:
        from mm_core.mempolicy import vma_alloc_folio
        folio = vma_alloc_folio(k, vma, vmf.address & ~(hpage_pmd_size(k) - 1), hpage_pmd_order(k), owner=mm)
    except OutOfMemory:
        k.stats["thp_fault_fallback"] += 1
        return VM_FAULT_FALLBACK
    try:
        deposit = alloc_table(k, mm, k.arch.pte_level)    # pte_alloc_one() for the deposit
    except OutOfMemory:
        k.alloc.free_pages(folio)
        return VM_FAULT_FALLBACK
    prot = vm_get_page_prot(vma.flags) | (Access.W if vma.flags & VM_WRITE else Access.NONE)
    pml = await pgtable.pmd_lockptr(k, mm, vmf.pmd)
    await traps.lock(pml)
    if (await pgtable.get_entry(k, vmf.pmd, k.arch.pmd_level)).kind is not Kind.NONE:
        await traps.unlock(pml)
        pte_free(k, deposit)
        k.alloc.free_pages(folio)
        return 0
    if vma.uffd_missing:                          # deliver the page fault to userland
        await traps.unlock(pml)
        pte_free(k, deposit)
        k.alloc.free_pages(folio)
        from mm_core.mm import VM_UFFD_MISSING
        from mm_core.userfaultfd import handle_userfault
        return await handle_userfault(k, vmf, VM_UFFD_MISSING)
    pgtable_trans_huge_deposit(k, mm, vmf.pmd, deposit)
    folio.mapcount = 1
    from mm_core import rmap
    rmap.folio_add_new_anon_rmap(k, folio, vma, vmf.address & ~(hpage_pmd_size(k) - 1))
    mm.rss[1] += hpage_pmd_nr(k)                        # MM_ANONPAGES
    await pgtable.set_entry(k, vmf.pmd, k.arch.pmd_level,
                            pgtable.pte_mkdirty(k, leaf_entry(folio.paddr, prot, young=True)))
    await traps.unlock(pml)
    k.stats["thp_fault_alloc"] += 1
    return 0


async def huge_pmd_fault(k, vmf, pmdval: Entry) -> int:
    """A fault on a PMD leaf: set young/dirty (huge_pmd_set_accessed), reuse an exclusive
    anon THP on write (do_huge_pmd_wp_page), or split and let the PTE level handle it."""
    mm, arch = vmf.vma.mm, k.arch
    pml = await pgtable.pmd_lockptr(k, mm, vmf.pmd)
    await traps.lock(pml)
    cur = await pgtable.get_entry(k, vmf.pmd, arch.pmd_level)
    if cur != pmdval:
        await traps.unlock(pml)
        return 0
    if vmf.write and not cur.prot & Access.W:
        if vmf.vma.anonymous and vmf.vma.uffd_wp and cur.uffd_wp:   # userfaultfd_huge_pmd_wp()
            await traps.unlock(pml)
            from mm_core.mm import VM_UFFD_WP
            from mm_core.userfaultfd import handle_userfault
            return await handle_userfault(k, vmf, VM_UFFD_WP)
        folio = k.alloc.page_of(cur.paddr)
        exclusive_anon = folio is not None and folio.use is PageUse.ANON and folio.refcount == 1
        if not (exclusive_anon and vmf.vma.flags & VM_WRITE):
            await traps.unlock(pml)
            await split_huge_pmd(k, vmf.vma, vmf.pmd, vmf.address)
            from mm_core.memory import handle_pte_fault
            return await handle_pte_fault(k, vmf)
        cur = cur.with_(prot=cur.prot | Access.W)
    new = cur.with_(young=True)
    if vmf.write:
        new = pgtable.pte_mkdirty(k, new)                  # pmd_mkdirty()
    if new != cur or new != pmdval:
        await pgtable.set_entry(k, vmf.pmd, arch.pmd_level, new)
    await traps.unlock(pml)
    return 0


async def do_huge_pmd_numa_page(k, vmf, oldpmd: Entry) -> int:
    """do_huge_pmd_numa_page() (6.6): a NUMA hinting fault on a PAGE_NONE PMD leaf that
    change_huge_pmd(MM_CP_PROT_NUMA) made. Under the pmd lock: !pmd_same() is ``goto out``
    (return 0: FAULT-RETRY). pmd_modify(oldpmd, vm_page_prot), writable if it may be
    (can_change_pmd_writable()); numa_migrate_prep() -> mpol_misplaced() names a target
    node: unlock, migrate_misplaced_folio() of the whole THP (set_pmd_migration_entry,
    copy, remove_migration_pmd: the refault finds the new pmd, return 0); on failure
    pmd_lock() again and !pmd_same() is ``goto out``, else ``out_map`` (not writable). No
    target: ``out_map``: the pmd back with the VMA's protection, young."""
    from mm_core import mempolicy
    from mm_core.memory import vm_get_page_prot
    vma, mm, arch = vmf.vma, vmf.vma.mm, k.arch
    haddr = vmf.address & ~(hpage_pmd_size(k) - 1)
    pml = await pgtable.pmd_lock(k, mm, vmf.pmd)
    if await pgtable.get_entry(k, vmf.pmd, arch.pmd_level) != oldpmd:
        await traps.unlock(pml)
        k.stats["numa_fault_pmd_changed"] += 1
        return 0                                             # goto out: FAULT-RETRY
    pmd = oldpmd.with_(prot=vm_get_page_prot(vma.flags))     # pmd_modify(oldpmd, vm_page_prot)
    writable = bool(pmd.prot & Access.W)
    folio = None if oldpmd.special else k.alloc.page_of(oldpmd.paddr)   # vm_normal_page_pmd()
    if not writable and vma.flags & VM_WRITE and folio is not None and folio.use is PageUse.ANON \
            and folio.refcount == 1 and not vma.flags & VM_SHARED:   # can_change_pmd_writable()
        writable = True
    if folio is not None:
        target = mempolicy.mpol_misplaced(k, folio, vma, haddr)
        if target != mempolicy.NUMA_NO_NODE:
            await traps.unlock(pml)
            writable = False
            if await mempolicy.migrate_misplaced_folio(k, folio, vma, haddr, True, target):
                k.stats["numa_hint_faults_huge"] += 1
                return 0
            pml = await pgtable.pmd_lock(k, mm, vmf.pmd)
            if await pgtable.get_entry(k, vmf.pmd, arch.pmd_level) != oldpmd:
                await traps.unlock(pml)
                k.stats["numa_fault_pmd_changed"] += 1
                return 0                                     # goto out
    pmd = pmd.with_(young=True)                              # out_map: pmd_mkyoung()
    if writable:
        pmd = pmd.with_(prot=pmd.prot | Access.W)            # pmd_mkwrite()
    await pgtable.set_entry(k, vmf.pmd, arch.pmd_level, pmd)
    await traps.unlock(pml)
    k.stats["numa_hint_faults_huge"] += 1                    # task_numa_fault(HPAGE_PMD_NR)
    return 0


async def do_set_pmd(k, vmf, folio) -> bool:
    """do_set_pmd(): map a PMD-order page-cache folio with one PMD leaf (file/shmem
    refault after a collapse). Returns False when the pmd is no longer none."""
    from mm_core.memory import add_mapped_page, vm_get_page_prot
    vma, mm, arch = vmf.vma, vmf.vma.mm, k.arch
    size = hpage_pmd_size(k)
    haddr = vmf.address & ~(size - 1)
    if haddr < vma.start or haddr + size > vma.end or (vma.pgoff + ((haddr - vma.start) >> k.page_shift)) \
            % hpage_pmd_nr(k) or not arch.levels[arch.pmd_level].leaf:
        return False
    pml = await pgtable.pmd_lockptr(k, mm, vmf.pmd)
    await traps.lock(pml)
    if (await pgtable.get_entry(k, vmf.pmd, arch.pmd_level)).kind is not Kind.NONE:
        await traps.unlock(pml)
        return False
    prot = vm_get_page_prot(vma.flags)
    if vmf.write and vma.flags & VM_WRITE:
        prot |= Access.W                          # maybe_pmd_mkwrite(pmd_mkdirty())
    add_mapped_page(k, mm, folio, hpage_pmd_nr(k))
    dirty = bool(vmf.write and prot & Access.W)
    huge = leaf_entry(folio.paddr, prot, young=True, dirty=dirty)
    await pgtable.set_entry(k, vmf.pmd, arch.pmd_level, huge)
    await traps.unlock(pml)
    k.stats["thp_file_mapped"] += 1
    return True


# -- zap and split ------------------------------------------------------------------------------

async def zap_huge_pmd(k, vma, pmdp: int, tlb: list | None = None) -> bool:
    """zap_huge_pmd(): clear a PMD leaf under pml, drop the folio, free the deposit."""
    from mm_core.memory import _put_mapped_page
    mm, arch = vma.mm, k.arch
    pml = await pgtable.pmd_lockptr(k, mm, pmdp)
    await traps.lock(pml)
    cur = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if cur.kind is not Kind.LEAF:
        await traps.unlock(pml)
        return False
    await pgtable.clear_entry(k, pmdp, arch.pmd_level)
    deposit = pgtable_trans_huge_withdraw(k, mm, pmdp)
    await traps.unlock(pml)
    if deposit is not None:
        pte_free(k, deposit)
    folio = k.alloc.page_of(cur.paddr)
    if folio is not None:
        _put_mapped_page(k, mm, folio, hpage_pmd_nr(k), tlb)
    k.stats["thp_zapped"] += 1
    return True


async def split_huge_pmd(k, vma, pmdp: int, addr: int) -> None:
    """split_huge_pmd() -> __split_huge_pmd_locked(): replace a PMD leaf by a PTE table
    mapping the same subpages. Anon THPs use their deposited table; a file THP's mapping
    is simply dropped (the next fault maps PTEs from the page cache)."""
    mm, arch = vma.mm, k.arch
    nr = hpage_pmd_nr(k)
    pml = await pgtable.pmd_lockptr(k, mm, pmdp)
    await traps.lock(pml)
    cur = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if cur.kind is not Kind.LEAF:
        await traps.unlock(pml)
        return
    folio = k.alloc.page_of(cur.paddr)
    deposit = pgtable_trans_huge_withdraw(k, mm, pmdp)
    if deposit is not None and folio is not None and folio.use is PageUse.ANON \
            and "split_huge_pmd_clears_pmd" not in k.bugs:
        # pmdp_invalidate(): the pmd stays a huge leaf to Linux (pmd_present() and
        # pmd_trans_huge() still true, as pmd_mkinvalid() keeps _PAGE_PSE) but not to the
        # MMU, so lockless walkers see a THP and wait in pmd_trans_huge_lock() instead of
        # taking the range for a hole; then the table is filled and populated
        await pgtable.set_entry(k, pmdp, arch.pmd_level, cur.with_(prot=Access.NONE))
    else:
        # a file THP: pmdp_huge_clear_flush(), the mapping is simply dropped
        await pgtable.clear_entry(k, pmdp, arch.pmd_level)
    haddr = addr & ~(hpage_pmd_size(k) - 1)
    await flush_tlb_range(k, mm, haddr, haddr + hpage_pmd_size(k))
    if deposit is None or folio is None or folio.use is not PageUse.ANON:
        await traps.unlock(pml)
        if deposit is not None:
            pte_free(k, deposit)
        if folio is not None:
            from mm_core.memory import _put_mapped_page
            _put_mapped_page(k, mm, folio, nr)
        k.stats["thp_split_pmd"] += 1
        return
    # fill the withdrawn table (pte_offset_map on a stack copy: must not fail)
    pte_level = arch.pte_level
    for i in range(nr):
        sub = cur.with_(paddr=cur.paddr + i * k.page_size)
        k.physmem.write_entry(deposit.paddr + i * 8, arch.encode(pte_level, sub))
    await traps.sched_point("pt_write", pmdp)
    folio.mapcount += nr - 1                   # the pmd mapping becomes nr pte mappings
    folio.refcount += nr - 1
    await pgtable.set_entry(k, pmdp, arch.pmd_level, table_entry(deposit.paddr))
    await traps.unlock(pml)
    k.stats["thp_split_pmd"] += 1


# -- fork -------------------------------------------------------------------------------------

async def copy_huge_pmd(k, dst_vma, src_vma, dst_pmdp: int, src_pmdp: int, addr: int) -> int:
    """copy_huge_pmd(): share an anon THP with the child (both pmds write-protected and
    old, a deposited table for the child). A file huge pmd is skipped (0: the child
    refaults it); a pmd that is no longer huge under the locks is -EAGAIN (the caller
    falls through to copy_pte_range); no table for the deposit is -ENOMEM."""
    from emu.arch import SWP_MIGRATION_READ, SWP_MIGRATION_WRITE, swap_entry
    from mm_core.mm import MM_ANONPAGES
    arch = k.arch
    dst_mm, src_mm = dst_vma.mm, src_vma.mm
    if not dst_vma.anonymous:
        k.stats["copy_huge_pmd_file_skipped"] += 1
        return 0                                  # "Skip if can be re-fill on fault"
    try:
        pgtable_ = alloc_table(k, dst_mm, arch.pte_level)     # pte_alloc_one()
    except OutOfMemory:
        return -12
    dst_ptl = await pgtable.pmd_lock(k, dst_mm, dst_pmdp)
    src_ptl = await pgtable.pmd_lockptr(k, src_mm, src_pmdp)
    await traps.lock(src_ptl)                     # spin_lock_nested()
    pmd = await pgtable.get_entry(k, src_pmdp, arch.pmd_level)
    nr = hpage_pmd_nr(k)
    ret = 0
    if pmd.kind is Kind.MIGRATION:
        if pmd.swp_type == SWP_MIGRATION_WRITE:   # make_readable_migration_entry()
            pmd = swap_entry(SWP_MIGRATION_READ, pmd.swp_offset, soft_dirty=pmd.soft_dirty,
                             uffd_wp=pmd.uffd_wp)
            await pgtable.set_entry(k, src_pmdp, arch.pmd_level, pmd)
        dst_mm.rss[MM_ANONPAGES] += nr
        pgtable_trans_huge_deposit(k, dst_mm, dst_pmdp, pgtable_)
        if not dst_vma.uffd_wp:
            pmd = pmd.with_(uffd_wp=False)
        await pgtable.set_entry(k, dst_pmdp, arch.pmd_level, pmd)
    elif pmd.kind is not Kind.LEAF:
        pte_free(k, pgtable_)
        ret = -11                                 # -EAGAIN
    else:
        folio = k.alloc.page_of(pmd.paddr)
        if folio is not None:                     # get_page() + page_try_dup_anon_rmap()
            folio.mapcount += 1
            folio.refcount += 1
            folio.extra["forked"] = True
        dst_mm.rss[MM_ANONPAGES] += nr
        pgtable_trans_huge_deposit(k, dst_mm, dst_pmdp, pgtable_)
        pmd = pmd.with_(prot=pmd.prot & ~Access.W)
        await pgtable.set_entry(k, src_pmdp, arch.pmd_level, pmd)    # pmdp_set_wrprotect()
        pmd = pmd.with_(young=False)
        if not dst_vma.uffd_wp:
            pmd = pmd.with_(uffd_wp=False)
        await pgtable.set_entry(k, dst_pmdp, arch.pmd_level, pmd)
        k.stats["copy_huge_pmd"] += 1
    await traps.unlock(src_ptl)
    await traps.unlock(dst_ptl)
    return ret


# -- madvise ----------------------------------------------------------------------------------

async def pmd_trans_huge_lock(k, mm, pmdp: int):
    """pmd_trans_huge_lock(): the pml if the pmd is (still) huge or a swap pmd, else None."""
    pml = await pgtable.pmd_lock(k, mm, pmdp)
    cur = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
    if cur.kind in (Kind.LEAF, Kind.MIGRATION, Kind.SWAP):
        return pml, cur
    await traps.unlock(pml)
    return None, cur


async def madvise_free_huge_pmd(k, vma, pmdp: int, addr: int, nxt: int) -> bool:
    """madvise_free_huge_pmd(): a whole, exclusively mapped anon THP becomes lazyfree (pmd
    old and clean). True when done; False sends the caller on to the PTE level (whose map
    then fails on a huge pmd). A partial range wants split_folio(), which the model does
    not have: it behaves as a failed split (the THP stays as it is)."""
    mm, arch = vma.mm, k.arch
    pml, orig = await pmd_trans_huge_lock(k, mm, pmdp)
    if pml is None:
        return False
    try:
        if orig.kind is not Kind.LEAF:
            return False                                  # a migration entry
        folio = k.alloc.page_of(orig.paddr)
        if folio is None or folio.mapcount != 1:          # folio_estimated_sharers() != 1
            return False
        if folio.locked:                                  # !folio_trylock()
            return False
        if nxt - addr != hpage_pmd_size(k):
            k.stats["madv_free_split_folio_unmodelled"] += 1
            return False
        folio.extra.pop("dirty", None)                    # folio_clear_dirty()
        if orig.young or orig.dirty:
            # pmdp_invalidate() + set_pmd_at(pmd_mkold(pmd_mkclean()))
            await pgtable.set_entry(k, pmdp, arch.pmd_level, orig.with_(young=False, dirty=False))
            await flush_tlb_range(k, mm, addr, nxt)
        folio.extra["lazyfree"] = True                    # folio_mark_lazyfree()
        k.stats["madv_free_thp"] += 1
        return True
    finally:
        await traps.unlock(pml)


# -- THP migration entries --------------------------------------------------------------------

async def set_pmd_migration_entry(k, vma, pmdp: int) -> Entry | None:
    """set_pmd_migration_entry(): replace a PMD leaf by a migration entry while the folio
    is copied: a writable one for a writable pmd (pmd_write()), else a readable (exclusive,
    for anon) one, keeping soft-dirty and uffd-wp. Returns the leaf it replaced (None if
    the pmd was not a leaf)."""
    from emu.arch import SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, SWP_MIGRATION_WRITE, swap_entry
    pml = await pgtable.pmd_lock(k, vma.mm, pmdp)
    try:
        cur = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
        if cur.kind is not Kind.LEAF:
            return None
        typ = SWP_MIGRATION_WRITE if cur.prot & Access.W else \
            SWP_MIGRATION_READ_EXCLUSIVE if vma.anonymous else SWP_MIGRATION_READ
        await pgtable.set_entry(k, pmdp, k.arch.pmd_level,
                                swap_entry(typ, cur.paddr >> PAGE_SHIFT, soft_dirty=cur.soft_dirty,
                                           uffd_wp=cur.uffd_wp))
        await flush_tlb_range(k, vma.mm, vma.start, vma.end)
        return cur
    finally:
        await traps.unlock(pml)


async def remove_migration_pmd(k, vma, pmdp: int, leaf: Entry) -> None:
    """remove_migration_pmd(): the copy is done; ``leaf`` is the pmd of the new folio the
    caller built (mk_huge_pmd(new, vma->vm_page_prot) + what the old pmd had; after a
    failed copy the old pmd itself). Writable only if the migration entry still is:
    pmd_mkwrite() is ``if (is_writable_migration_entry(entry))``, and an mprotect() that
    ran meanwhile made the entry readable (change_huge_pmd()); uffd-wp from the entry."""
    from emu.arch import SWP_MIGRATION_WRITE
    pml = await pgtable.pmd_lock(k, vma.mm, pmdp)
    try:
        cur = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
        if cur.kind is Kind.MIGRATION:
            if cur.swp_type != SWP_MIGRATION_WRITE or cur.uffd_wp:
                leaf = leaf.with_(prot=leaf.prot & ~Access.W)
            await pgtable.set_entry(k, pmdp, k.arch.pmd_level, leaf.with_(uffd_wp=cur.uffd_wp))
    finally:
        await traps.unlock(pml)


# -- UFFDIO_MOVE of a whole THP ----------------------------------------------------------------

async def double_pmd_lock(k, ptl1, pmdp1: int, ptl2, pmdp2: int) -> None:
    """double_pt_lock() of two pmd locks: in address order (the split pmd lock lives in
    the PMD table's ptdesc: the table's address stands for the lock's), once if they are
    the same lock (both pmds in one PMD table, or mm->page_table_lock)."""
    lv = k.arch.levels[k.arch.pmd_level]
    if lv.table_base(pmdp1) > lv.table_base(pmdp2):
        ptl1, ptl2 = ptl2, ptl1
    await traps.lock(ptl1)
    if ptl2 is not ptl1:
        await traps.lock(ptl2)                       # spin_lock_nested(SINGLE_DEPTH_NESTING)


async def move_pages_huge_pmd(k, mm, dst_pmd: int, src_pmd: int, dst_pmdval: int, dst_vma, src_vma,
                              dst_addr: int, src_addr: int, src_ptl) -> int:
    """move_pages_huge_pmd() (mm/huge_memory.c, 6.8; called by move_pages() with the src
    pml held from pmd_trans_huge_lock(), which it drops): move a whole PMD-mapped anon THP
    from src_addr to dst_addr (both PMD-aligned, dst pmd none). The folio itself moves:
    its rmap (anon_vma, index) follows, the deposited PTE table moves with the pmd.

    Categories: a src migration pmd is waited on (pmd_migration_entry_wait()) and -EAGAIN
    (the caller looks again: RETRY); so is a folio whose anon_vma is gone and a src or dst
    pmd that changed (pmd_same) between dropping the src pml and taking both pmd locks (a
    split, a zap, a THP fault at dst). -EBUSY: not exclusive anon, or pinned
    (folio_maybe_dma_pinned(), checked before and after pmdp_huge_clear_flush(); a pin
    that came in between puts the pmd back). -ENOENT: the src pmd is no THP now. -EINVAL
    for the WARN_ON_ONCE sanity checks (dst not none, misaligned). The folio lock and the
    anon_vma lock are taken sleeping (folio_lock(), anon_vma_lock_write(): "split_huge_page
    walks the anon_vma chain without the page lock"), with a reference held and no pml.

    Order of the rmap move: after the clear and the second pin check, as Lokesh Gidra's
    2024 fix ("userfaultfd: change src_folio after ensuring it's unpinned in UFFDIO_MOVE",
    Fixes: adef440691ba) has it. The huge zero page branch (moved as a fresh huge zero
    pmd) does not exist here: the model has no huge zero page."""
    from mm_core import memory, mmu_notifier, rmap, shmem
    from mm_core.userfaultfd import EAGAIN, EBUSY, EINVAL, ENOENT, page_anon_exclusive
    arch = k.arch
    level = arch.pmd_level
    size = hpage_pmd_size(k)
    src_raw = await pgtable.get_raw(k, src_pmd)
    src_pmdval = arch.decode(level, src_raw)
    if arch.decode(level, dst_pmdval).kind is not Kind.NONE or src_addr & (size - 1) or dst_addr & (size - 1):
        await traps.unlock(src_ptl)
        return -EINVAL
    if src_pmdval.kind is not Kind.LEAF:                              # !pmd_trans_huge()
        await traps.unlock(src_ptl)
        if src_pmdval.kind is Kind.MIGRATION:
            await memory.pmd_migration_entry_wait(k, mm, src_pmd)
            return -EAGAIN
        return -ENOENT
    folio = k.alloc.page_of(src_pmdval.paddr)
    if folio is None or not page_anon_exclusive(folio, k):
        await traps.unlock(src_ptl)
        return -EBUSY
    folio.refcount += 1                                               # folio_get()
    await traps.unlock(src_ptl)
    rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, mm, src_addr, src_addr + size)
    err = 0
    anon_vma = None
    await shmem.folio_lock(k, folio)
    dst_ptl = None
    try:
        anon_vma = rmap.folio_anon_vma(folio)                        # folio_get_anon_vma()
        if anon_vma is None:                                         # unmapped meanwhile
            k.stats["uffdio_move_huge_anon_vma_gone"] += 1
            return -EAGAIN
        await traps.lock(anon_vma.rwsem, "w")                        # anon_vma_lock_write()
        dst_ptl = await pgtable.pmd_lockptr(k, mm, dst_pmd)
        await double_pmd_lock(k, src_ptl, src_pmd, dst_ptl, dst_pmd)
        if await pgtable.get_raw(k, src_pmd) != src_raw or await pgtable.get_raw(k, dst_pmd) != dst_pmdval:
            k.stats["uffdio_move_huge_pmd_changed"] += 1
            err = -EAGAIN
        elif folio.extra.get("pinned") or not page_anon_exclusive(folio, k):
            err = -EBUSY
        else:
            old = await pgtable.clear_entry(k, src_pmd, level)           # pmdp_huge_clear_flush()
            await flush_tlb_range(k, mm, src_addr, src_addr + size)
            if folio.extra.get("pinned"):            # pinned from under us: put it back
                k.physmem.write_entry(src_pmd, old)
                await traps.sched_point("pt_write", src_pmd)             # set_pmd_at()
                err = -EBUSY
            else:
                rmap.folio_move_anon_rmap(k, folio, dst_vma)
                folio.index = rmap.linear_page_index(k, dst_vma, dst_addr)
                prot = memory_prot(dst_vma) | Access.W                   # pmd_mkwrite(pmd_mkdirty())
                await pgtable.set_entry(k, dst_pmd, level,
                                        pgtable.pte_mkdirty(k, leaf_entry(folio.paddr, prot, young=True)))
                deposit = pgtable_trans_huge_withdraw(k, mm, src_pmd)
                if deposit is not None:
                    pgtable_trans_huge_deposit(k, mm, dst_pmd, deposit)
                k.stats["uffdio_move_huge_pmd"] += 1
        await traps.unlock(src_ptl)                                  # double_pt_unlock()
        if dst_ptl is not src_ptl:
            await traps.unlock(dst_ptl)
        return err
    finally:
        if anon_vma is not None:
            await traps.unlock(anon_vma.rwsem, "w")
        shmem.folio_unlock(folio)                                    # unblock rmap walks
        await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
        memory.put_page(k, folio)                                    # folio_put()


def memory_prot(vma) -> Access:
    """vma->vm_page_prot of an anon VMA (vm_get_page_prot())."""
    from mm_core.memory import vm_get_page_prot
    return vm_get_page_prot(vma.flags)
