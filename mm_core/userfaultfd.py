"""userfaultfd's UFFDIO_COPY and UFFDIO_MOVE cores (mm/userfaultfd.c), as far as the
page-table rules go.

UFFDIO_COPY: mfill_atomic_pte_copy() -> mfill_atomic_install_pte() installs an anon page
into a private mapping holding only mmap_read_lock and the ptl, with no folio lock. That is
why collapse_pte_mapped_thp() must keep the ptl from emptying a table until its pmd is gone.

UFFDIO_MOVE (6.8+; the 6.13 code with the 2025 fixes): move_pages() -> move_pages_pte()
moves one present, exclusive anon pte from src to dst, holding mmap_read_lock, both ptes
mapped (pte_offset_map_rw_nolock() in 6.13, pte_offset_map_nolock() in 6.8-6.12) and, for
the move itself, both ptls (double_pt_lock) after pte_same() rechecks of both ptes. Mapped
ptes pin an RCU read section (and a kmap_local slot under HIGHPTE), so on contention for
the folio lock or the anon_vma lock it unmaps both, sleeps on the lock and retries.
Under 6.14 it also rechecks the dst pmd (pmd_same) under the ptls, since PT_RECLAIM may free
the dst table meanwhile and a none dst pte reads the same in a freed table.
"""
from __future__ import annotations

from emu.arch import Access, Kind, leaf_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import memory, pgtable, rmap, shmem
from mm_core.locks import SpinLock, mmap_read_lock, mmap_read_unlock
from mm_core.mm import MM_ANONPAGES, VM_ACCESS_FLAGS, VM_LOCKED, VM_SHARED, VM_WRITE
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.tlbflush import flush_tlb_range

EAGAIN, ENOENT, ENOMEM, EEXIST, EINVAL, EBUSY = 11, 2, 12, 17, 22, 16

# uffdio_move.mode (include/uapi/linux/userfaultfd.h)
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# Where move_pages_pte()'s locals live: kernel stack addresses, never a page table. The
# pre-927e926d72d9 code passed &orig_src_pte / &orig_dst_pte to pte_unmap().
MOVE_PAGES_PTE_FRAME = 0xFFFFC90000A3FD00
STACK_ORIG_SRC_PTE = MOVE_PAGES_PTE_FRAME + 0x48
STACK_ORIG_DST_PTE = MOVE_PAGES_PTE_FRAME + 0x50


async def mfill_atomic_copy(k, mm, dst: int, data: bytes) -> int:
    """UFFDIO_COPY of one page into a private mapping: 0, or -EAGAIN when the PTE table
    could not be mapped (the caller retries), -EEXIST when a pte is already there."""
    await mmap_read_lock(mm)
    try:
        vma = mm.vma_lookup(dst)
        if vma is None or vma.flags & VM_SHARED:
            return -ENOENT
        dst &= ~(k.page_size - 1)
        rmap.anon_vma_prepare(k, vma)
        try:
            page = k.alloc.alloc_pages(k.page_order, PageUse.ANON, owner=mm)
        except OutOfMemory:
            return -ENOMEM
        k.physmem.write(page.paddr, data[:k.page_size])
        ret = await mfill_atomic_install_pte(k, vma, dst, page)
        if ret:
            k.alloc.free_pages(page)
        return ret
    finally:
        await mmap_read_unlock(mm)


async def mfill_atomic_install_pte(k, vma, dst: int, page) -> int:
    """mfill_atomic_install_pte(): map ``page`` at ``dst`` under the ptl; a failed map is
    -EAGAIN to the caller (RETRY / -EAGAIN category)."""
    mm, arch = vma.mm, k.arch
    pmdp = await pgtable.walk_alloc(k, mm, dst, arch.pmd_level)
    if pmdp is None or not await pgtable.pte_alloc(k, mm, pmdp):
        return -EAGAIN
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, dst)
    if locked is None:
        k.stats["mfill_eagain"] += 1
        return -EAGAIN
    ptep, ptl = locked
    if (await pgtable.get_entry(k, ptep, arch.pte_level)).kind is not Kind.NONE:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return -EEXIST
    prot = Access.R | (Access.W if vma.flags & VM_WRITE else Access.NONE)
    page.mapcount = 1
    rmap.folio_add_new_anon_rmap(k, page, vma, dst)
    mm.rss[MM_ANONPAGES] += 1
    await pgtable.set_entry(k, ptep, arch.pte_level,
                            pgtable.pte_mkdirty(k, leaf_entry(page.paddr, prot, young=True)))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    k.stats["uffdio_copy"] += 1
    return 0


# -- UFFDIO_MOVE -------------------------------------------------------------------------------

def validate_move_areas(src_vma, dst_vma) -> int:
    """validate_move_areas(): same access flags (hence the same vm_page_prot), both or
    neither mlocked, writable, both anonymous. (The dst VMA's registration with this
    userfaultfd context is not modelled: there is no uffd context object.)"""
    if (src_vma.flags & VM_ACCESS_FLAGS) != (dst_vma.flags & VM_ACCESS_FLAGS):
        return -EINVAL
    if (src_vma.flags & VM_LOCKED) != (dst_vma.flags & VM_LOCKED):
        return -EINVAL
    if not src_vma.flags & VM_WRITE:
        return -EINVAL
    if not src_vma.anonymous or not dst_vma.anonymous:
        return -EINVAL
    return 0


async def move_pages(k, mm, dst_start: int, src_start: int, length: int, mode: int = 0) -> int:
    """move_pages() (UFFDIO_MOVE): move the anon pages of [src_start, +length) to dst_start
    one pte at a time, under mmap_read_lock (uffd_move_lock without per-VMA locks).

    Returns the bytes moved, or -errno when nothing was. -EAGAIN from move_pages_pte()
    means "look at this page again" (RETRY). Refused here, not modelled: a huge or
    migration src pmd (the kernel splits it or moves it whole with move_pages_huge_pmd())
    is -EBUSY. Per page: find or allocate both pmds, refuse a huge dst (-EEXIST), allocate
    the PTE tables, move_pages_pte(). Before 6.8 there is no such ioctl: -EINVAL, as
    userfaultfd_ioctl() answers an unknown command."""
    if not k.profile.uffdio_move:
        return -EINVAL
    page = k.page_size
    if src_start % page or dst_start % page or length % page or length <= 0 \
            or mode & ~(UFFDIO_MOVE_MODE_DONTWAKE | UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES):
        return -EINVAL
    await mmap_read_lock(mm)
    try:
        dst_vma = mm.vma_lookup(dst_start)               # find_vma_and_prepare_anon()
        if dst_vma is None:
            return -ENOENT
        if not dst_vma.flags & VM_SHARED:
            rmap.anon_vma_prepare(k, dst_vma)
        src_vma = dst_vma if dst_vma.start <= src_start < dst_vma.end else mm.vma_lookup(src_start)
        if src_vma is None:
            return -ENOENT
        if src_vma.flags & VM_SHARED or src_start + length > src_vma.end \
                or dst_vma.flags & VM_SHARED or dst_start + length > dst_vma.end:
            return -EINVAL
        err = validate_move_areas(src_vma, dst_vma)
        if err:
            return err
        arch = k.arch
        src_addr, dst_addr, moved, err = src_start, dst_start, 0, 0
        while src_addr < src_start + length:
            src_pmd = await rmap.walk_to_pmd(k, mm, src_addr)            # mm_find_pmd()
            try:
                if src_pmd is None:
                    if not mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES:
                        err = -ENOENT
                        break
                    src_pmd = await pgtable.walk_alloc(k, mm, src_addr, arch.pmd_level)
                dst_pmd = await pgtable.walk_alloc(k, mm, dst_addr, arch.pmd_level)   # mm_alloc_pmd()
            except OutOfMemory:
                err = -ENOMEM
                break
            if src_pmd is None or dst_pmd is None:
                err = -ENOMEM
                break
            dst_pmdval = await pgtable.pmdp_get_lockless(k, dst_pmd)
            if arch.decode(arch.pmd_level, dst_pmdval).kind is Kind.LEAF:
                err = -EEXIST                                  # a THP at dst: be strict
                break
            src_pmdval = await pgtable.get_entry(k, src_pmd, arch.pmd_level)
            if src_pmdval.kind in (Kind.LEAF, Kind.MIGRATION):   # pmd_trans_huge_lock() succeeds
                k.stats["uffdio_move_huge_refused"] += 1
                err = -EBUSY                                   # not modelled: split / move_pages_huge_pmd
                break
            if src_pmdval.kind is Kind.NONE:
                if not mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES:
                    err = -ENOENT
                    break
                if not await pgtable.pte_alloc(k, mm, src_pmd):
                    err = -ENOMEM
                    break
            if not await pgtable.pte_alloc(k, mm, dst_pmd):
                err = -ENOMEM
                break
            err = await move_pages_pte(k, mm, dst_pmd, src_pmd, dst_vma, src_vma, dst_addr, src_addr, mode)
            if err == -EAGAIN:
                k.stats["uffdio_move_eagain"] += 1
                await sched_point("retry", src_pmd)
                continue
            if err:
                break
            src_addr, dst_addr, moved = src_addr + k.page_size, dst_addr + k.page_size, moved + k.page_size
        return moved if moved else err
    finally:
        await mmap_read_unlock(mm)


def vm_normal_folio(k, entry):
    """vm_normal_folio(): the folio a present pte maps (None for the zero page)."""
    return None if entry.special else k.alloc.page_of(entry.paddr)


def page_anon_exclusive(folio) -> bool:
    """PageAnonExclusive(): an anon page mapped once (there is no fork or GUP pin here)."""
    return folio.use is PageUse.ANON and folio.mapcount == 1 and "anon_vma" in folio.extra


async def move_pages_pte(k, mm, dst_pmd: int, src_pmd: int, dst_vma, src_vma, dst_addr: int,
                         src_addr: int, mode: int) -> int:
    """move_pages_pte(): move one pte from src_addr to dst_addr (mmap_read_lock held).

    Categories: a failed map of either table is -EAGAIN (the caller looks again: RETRY);
    so is a src pte that changed under us (pte_same), a dst pmd that changed (6.14,
    pmd_same) and a folio whose anon_vma is gone.
    -EEXIST if dst is not none, -ENOENT for a src hole (0 with ALLOW_SRC_HOLES), -EBUSY
    for a folio that is not exclusive anon. Contention on the folio lock or the anon_vma
    lock: unmap both ptes, sleep on the lock, retry from the maps. Refused, not modelled:
    a large folio (the kernel splits it) and swap / migration entries are -EBUSY."""
    arch = k.arch
    level = arch.pte_level
    # pte_offset_map_rw_nolock(mm, pmd, addr, &dummy_pmdval, &ptl) in 6.13 (the pte_same()
    # rechecks under the ptl stand in for pmd_same()), pte_offset_map_nolock() before; 6.14
    # keeps dst's pmdval for a pmd_same() recheck: a none dst pte proves nothing about a
    # table that PT_RECLAIM may free meanwhile
    map_nolock = pgtable.pte_offset_map_rw_nolock if k.profile.rw_nolock else pgtable.pte_offset_map_nolock
    recheck_dst_pmd = k.profile.pt_reclaim and "move_pages_pte_without_dst_pmd_recheck" not in k.bugs
    stack_copy_bug = "move_pages_pte_unmaps_stack_copy" in k.bugs
    src_folio = None
    src_folio_pte = 0
    src_anon_vma = None
    src_pte = dst_pte = None
    err = 0
    while True:                                                    # retry:
        mapped = await map_nolock(k, mm, dst_pmd, dst_addr)
        if mapped is None:                      # a huge pmd materialized from under us
            err = -EAGAIN
            break
        dst_pte, dst_ptl = mapped[0], mapped[1]
        dst_pmdval = mapped[2] if recheck_dst_pmd else None
        mapped = await map_nolock(k, mm, src_pmd, src_addr)
        if mapped is None:                      # MADV_DONTNEED zapped a THP, or a THP fault
            err = -EAGAIN
            break
        src_pte, src_ptl = mapped[0], mapped[1]
        # sanity checks of the live pmds (WARN_ON_ONCE in the kernel)
        live = [arch.decode(arch.pmd_level, await pgtable.get_raw(k, p)).kind for p in (dst_pmd, src_pmd)]
        if any(kind in (Kind.NONE, Kind.LEAF) for kind in live):
            k.printk(f"move_pages_pte: pmd none or huge under a mapped pte ({live}): -EINVAL")
            k.stats["uffdio_move_sanity_einval"] += 1
            err = -EINVAL
            break
        await traps.lock(dst_ptl)
        orig_dst_pte = await pgtable.get_raw(k, dst_pte)
        await traps.unlock(dst_ptl)
        if arch.decode(level, orig_dst_pte).kind is not Kind.NONE:
            err = -EEXIST
            break
        await traps.lock(src_ptl)
        orig_src_pte = await pgtable.get_raw(k, src_pte)
        await traps.unlock(src_ptl)
        src_ent = arch.decode(level, orig_src_pte)
        if src_ent.kind is Kind.NONE:
            err = 0 if mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES else -ENOENT
            break
        if src_folio is not None and src_folio_pte != orig_src_pte:
            err = -EAGAIN                       # the pte changed while we slept on the folio lock
            break
        if src_ent.kind is not Kind.LEAF:
            k.stats["uffdio_move_swap_refused"] += 1
            err = -EBUSY                        # not modelled: move_swap_pte(), migration_entry_wait()
            break
        if src_ent.paddr == k.zero_page.paddr:
            err = await move_zeropage_pte(k, mm, dst_vma, src_vma, dst_addr, src_addr, dst_pte, src_pte,
                                          orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval, dst_ptl, src_ptl)
            break
        if src_folio is None:
            # pin the folio while holding the ptl, so it is not freed under us
            await traps.lock(src_ptl)
            if await pgtable.get_raw(k, src_pte) != orig_src_pte:
                await traps.unlock(src_ptl)
                err = -EAGAIN
                break
            folio = vm_normal_folio(k, src_ent)
            if folio is None or not page_anon_exclusive(folio):
                await traps.unlock(src_ptl)
                err = -EBUSY
                break
            folio.refcount += 1                                          # folio_get()
            src_folio, src_folio_pte = folio, orig_src_pte
            await traps.unlock(src_ptl)
            if not await shmem.folio_trylock(k, src_folio):
                k.stats["uffdio_move_folio_lock_retry"] += 1
                # pte_unmap(src_pte); pte_unmap(dst_pte) (LIFO); before 927e926d72d9 the
                # stack copies: pte_unmap(&orig_src_pte); pte_unmap(&orig_dst_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_SRC_PTE if stack_copy_bug else src_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_DST_PTE if stack_copy_bug else dst_pte)
                src_pte = dst_pte = None
                await shmem.folio_lock(k, src_folio)          # now we can block and wait
                await sched_point("retry", src_pmd)
                continue
        # at this point src_folio is locked
        if src_folio.order != k.page_order:
            err = -EBUSY                        # not modelled: split_folio() of a large folio
            break
        if src_anon_vma is None:
            src_anon_vma = rmap.folio_anon_vma(src_folio)               # folio_get_anon_vma()
            if src_anon_vma is None:
                err = -EAGAIN                   # the page was unmapped from under us
                break
            if not await traps.trylock(src_anon_vma.rwsem, "w"):       # anon_vma_trylock_write()
                k.stats["uffdio_move_anon_vma_retry"] += 1
                # pte_unmap(src_pte); pte_unmap(dst_pte) (LIFO); before 927e926d72d9 the
                # stack copies: pte_unmap(&orig_src_pte); pte_unmap(&orig_dst_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_SRC_PTE if stack_copy_bug else src_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_DST_PTE if stack_copy_bug else dst_pte)
                src_pte = dst_pte = None
                await traps.lock(src_anon_vma.rwsem, "w")               # anon_vma_lock_write()
                await sched_point("retry", src_pmd)
                continue
        err = await move_present_pte(k, mm, dst_vma, src_vma, dst_addr, src_addr, dst_pte, src_pte,
                                     orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval, dst_ptl, src_ptl,
                                     src_folio)
        break
    # out:
    if src_anon_vma is not None:
        await traps.unlock(src_anon_vma.rwsem, "w")
    if src_folio is not None:
        shmem.folio_unlock(src_folio)
        memory.put_page(k, src_folio)                                    # folio_put()
    if "move_pages_pte_unmaps_in_map_order" in k.bugs:
        # before "mm/userfaultfd: fix kmap_local LIFO ordering for CONFIG_HIGHPTE" (2025)
        if dst_pte is not None:
            await pgtable.pte_unmap(k, dst_pte)
        if src_pte is not None:
            await pgtable.pte_unmap(k, src_pte)
    else:                                       # LIFO: src was mapped last
        if src_pte is not None:
            await pgtable.pte_unmap(k, src_pte)
        if dst_pte is not None:
            await pgtable.pte_unmap(k, dst_pte)
    return err


async def double_pt_lock(k, ptl1: SpinLock, pte1: int, ptl2: SpinLock, pte2: int) -> None:
    """double_pt_lock(): both ptls in address order (the ptl lives in the table's ptdesc,
    so the table's address stands for the lock's), once if they are the same lock."""
    arch = k.arch
    if arch.levels[arch.pte_level].table_base(pte1) > arch.levels[arch.pte_level].table_base(pte2):
        ptl1, ptl2 = ptl2, ptl1
    await traps.lock(ptl1)
    if ptl2 is not ptl1:
        await traps.lock(ptl2)                 # spin_lock_nested(SINGLE_DEPTH_NESTING)


async def double_pt_unlock(k, ptl1: SpinLock, ptl2: SpinLock) -> None:
    """double_pt_unlock()."""
    await traps.unlock(ptl1)
    if ptl2 is not ptl1:
        await traps.unlock(ptl2)


async def is_pte_pages_stable(k, dst_pte: int, src_pte: int, orig_dst_pte: int, orig_src_pte: int,
                              dst_pmd: int, dst_pmdval) -> bool:
    """is_pte_pages_stable() (6.14; open-coded pte_same() pairs before): both ptes
    unchanged, and (6.14, ``dst_pmdval`` given) dst's pmd still names the mapped table."""
    if await pgtable.get_raw(k, src_pte) != orig_src_pte or await pgtable.get_raw(k, dst_pte) != orig_dst_pte:
        return False
    return dst_pmdval is None or pgtable.pmd_same(k, dst_pmdval, await pgtable.pmdp_get_lockless(k, dst_pmd))


async def move_present_pte(k, mm, dst_vma, src_vma, dst_addr: int, src_addr: int, dst_pte: int, src_pte: int,
                           orig_dst_pte: int, orig_src_pte: int, dst_pmd: int, dst_pmdval,
                           dst_ptl: SpinLock, src_ptl: SpinLock, src_folio) -> int:
    """move_present_pte(): under both ptls, recheck both ptes (pte_same; -EAGAIN), clear and
    flush the src pte, move the folio's rmap to dst (anon_vma, index), set the dst pte
    writable and dirty (like mremap). The folio stays mapped once in the same mm: mapcount
    and rss counters do not change."""
    arch = k.arch
    level = arch.pte_level
    await double_pt_lock(k, dst_ptl, dst_pte, src_ptl, src_pte)
    err = 0
    if not await is_pte_pages_stable(k, dst_pte, src_pte, orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval):
        err = -EAGAIN
    elif src_folio.order != k.page_order or src_folio.extra.get("pinned") \
            or not page_anon_exclusive(src_folio):                # folio_maybe_dma_pinned()
        err = -EBUSY
    else:
        await pgtable.clear_entry(k, src_pte, level)                     # ptep_clear_flush()
        await flush_tlb_range(k, mm, src_addr, src_addr + k.page_size)
        rmap.folio_move_anon_rmap(k, src_folio, dst_vma)
        src_folio.index = rmap.linear_page_index(k, dst_vma, dst_addr)
        prot = memory.vm_get_page_prot(dst_vma.flags) | Access.W        # pte_mkwrite(pte_mkdirty())
        await pgtable.set_entry(k, dst_pte, level, leaf_entry(src_folio.paddr, prot, young=True, dirty=True))
        k.stats["uffdio_move"] += 1
    await double_pt_unlock(k, dst_ptl, src_ptl)
    return err


async def move_zeropage_pte(k, mm, dst_vma, src_vma, dst_addr: int, src_addr: int, dst_pte: int,
                            src_pte: int, orig_dst_pte: int, orig_src_pte: int, dst_pmd: int, dst_pmdval,
                            dst_ptl: SpinLock, src_ptl: SpinLock) -> int:
    """move_zeropage_pte(): the zero page is not moved but mapped afresh at dst."""
    arch = k.arch
    level = arch.pte_level
    await double_pt_lock(k, dst_ptl, dst_pte, src_ptl, src_pte)
    if not await is_pte_pages_stable(k, dst_pte, src_pte, orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval):
        await double_pt_unlock(k, dst_ptl, src_ptl)
        return -EAGAIN
    prot = memory.vm_get_page_prot(dst_vma.flags) & ~Access.W
    await pgtable.clear_entry(k, src_pte, level)                         # ptep_clear_flush()
    await flush_tlb_range(k, mm, src_addr, src_addr + k.page_size)
    await pgtable.set_entry(k, dst_pte, level, leaf_entry(k.zero_page.paddr, prot, special=True, young=True))
    await double_pt_unlock(k, dst_ptl, src_ptl)
    k.stats["uffdio_move_zeropage"] += 1
    return 0
