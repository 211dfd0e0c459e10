"""Device memory migration (mm/migrate_device.c, v6.6): migrate_vma_setup() /
migrate_vma_pages() / migrate_vma_finalize(), with a "device" that is just other RAM
(lib/test_hmm.c's dmirror_migrate_alloc_and_copy with system pages as the destination).

    migrate_vma_setup()         checks the range, then migrate_vma_collect() under an
                                MMU_NOTIFY_MIGRATE invalidation and, if anything was
                                collected, migrate_vma_unmap()
    migrate_vma_collect_pmd()   the walk_page_range() pmd_entry: ``again:`` a none pmd is a
                                hole (migrate_vma_collect_hole: MIGRATE for anon VMAs, to be
                                populated); a THP is split (split_huge_page() of an anon
                                folio is not modelled: a failed split, the extent skipped);
                                then pte_offset_map_lock(): **failure -> goto again** (RETRY:
                                the pmd is read again). Under the ptl, per pte: none ->
                                MIGRATE (anon); non-present -> 0 (only device-private entries
                                would be taken); the zero page -> MIGRATE (SELECT_SYSTEM); a
                                normal small page with a mapping, folio_trylock() succeeding
                                -> cleared (ptep_clear_flush for an exclusive anon page,
                                folio_try_share_anon_rmap_pte() failing on a DMA-pinned one
                                puts it back), a migration entry (writable / readable
                                exclusive / readable, young, dirty, soft-dirty, uffd-wp)
                                installed, the rmap and the walk's reference dropped
    migrate_device_unmap()      per collected folio: try_to_migrate() for one still mapped
                                elsewhere (not modelled: such a folio is restored, as when
                                try_to_migrate() cannot unmap it), migrate_vma_check_page()
                                (extra references: pinned -> restored); restored ones get
                                their ptes back (remove_migration_ptes(folio, folio))
    migrate_vma_pages()         per entry with a destination: a hole -> migrate_vma_insert_page()
                                (pte_alloc, pte_offset_map_lock: failure is GIVEUP, the entry
                                is not migrated; only a none or zero-page pte is replaced);
                                an anon page -> migrate_folio(MIGRATE_SYNC_NO_COPY) (the
                                refcount check of folio_migrate_mapping, the anon mapping and
                                index move to the new folio); a page-cache folio: not
                                modelled (left unmigrated)
    migrate_vma_finalize()      remove_migration_ptes(src, dst): the migration entries become
                                ptes of the new page (or of the old one when not migrated),
                                unlock, drop the isolation references: the old page is freed

Not modelled: LRU isolation (the collect reference stands for the isolation reference),
device-private / device-coherent pages, THP migration, the fault_page of a device fault.
Source: torvalds/linux mm/migrate_device.c (the stored file is post-6.6: folio names,
migrate_vma_split_folio(); the 6.6 shape -- page_remove_rmap(), split_huge_page() of a
THP, pte_offset_map_lock() failure into ``goto again`` from the 6.5 series -- kept here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import (
    PAGE_SHIFT,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    Access,
    Kind,
    leaf_entry,
    swap_entry,
)
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import mmu_notifier, pagewalk, pgtable, rmap, shmem
from mm_core.memory import vm_get_page_prot
from mm_core.mm import MM_ANONPAGES, VM_WRITE
from mm_core.page_alloc import OutOfMemory
from mm_core.page_vma_mapped import PVMW_MIGRATION, PageVmaMappedWalk, page_vma_mapped_walk
from mm_core.tlbflush import flush_tlb_range

EINVAL, EFAULT = 22, 14

MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_WRITE = 1 << 3
MIGRATE_PFN_SHIFT = 6
MIGRATE_VMA_SELECT_SYSTEM = 1 << 0

MMU_NOTIFY_MIGRATE = "migrate"
GUP_PIN_COUNTING_BIAS = 1 << 10


def migrate_pfn(pfn: int) -> int:
    return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID


def migrate_pfn_to_page(k, mpfn: int):
    if not mpfn & MIGRATE_PFN_VALID:
        return None
    return k.alloc.page_of((mpfn >> MIGRATE_PFN_SHIFT) << PAGE_SHIFT)


@dataclass
class MigrateVma:
    """struct migrate_vma."""

    vma: object
    start: int
    end: int
    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)
    npages: int = 0
    cpages: int = 0
    flags: int = MIGRATE_VMA_SELECT_SYSTEM


def _anon(folio) -> bool:
    return "anon_vma" in folio.extra


def _has_mapping(folio) -> bool:
    """page->mapping: an anon_vma or an address_space."""
    return _anon(folio) or folio.mapping is not None


def folio_maybe_dma_pinned(folio) -> bool:
    return folio.extra.get("pincount", 0) > 0 or folio.refcount >= GUP_PIN_COUNTING_BIAS


async def migrate_vma_collect_skip(start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """migrate_vma_collect_skip(): nothing to migrate in [start, end)."""
    mig: MigrateVma = walk.private
    for _ in range(start, end, walk.k.page_size):
        mig.dst.append(0)
        mig.src.append(0)
        mig.npages += 1
    return 0


async def migrate_vma_collect_hole(start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """migrate_vma_collect_hole(): only anonymous memory may be populated."""
    mig: MigrateVma = walk.private
    if walk.vma is None or walk.vma.file is not None:
        return await migrate_vma_collect_skip(start, end, walk)
    for _ in range(start, end, walk.k.page_size):
        mig.src.append(MIGRATE_PFN_MIGRATE)
        mig.dst.append(0)
        mig.npages += 1
        mig.cpages += 1
    return 0


async def migrate_vma_collect_pmd(pmdp: int, start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """migrate_vma_collect_pmd(): RETRY (``goto again``) when pte_offset_map_lock() fails."""
    k, arch = walk.k, walk.k.arch
    mig: MigrateVma = walk.private
    vma, mm = walk.vma, walk.mm
    while True:                                                     # again:
        pmd = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        if pmd.kind is Kind.NONE:
            return await migrate_vma_collect_hole(start, end, walk)
        if pmd.kind is Kind.LEAF:                                   # pmd_trans_huge()
            pml = await pgtable.pmd_lock(k, mm, pmdp)
            pmd = await pgtable.get_entry(k, pmdp, arch.pmd_level)
            await traps.unlock(pml)
            if pmd.kind is not Kind.LEAF:
                continue
            # get_page(); trylock_page(); split_huge_page(): not modelled, a failed split
            k.stats["migrate_vma_thp_skipped"] += 1
            return await migrate_vma_collect_skip(start, end, walk)
        locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, start)
        if locked is None:
            k.stats["migrate_vma_collect_again"] += 1
            await sched_point("retry", pmdp)
            continue                                                # goto again
        break
    ptep, ptl = locked
    unmapped = 0
    for a in range(start, end, k.page_size):
        entp = ptep + ((a - start) >> k.page_shift) * 8
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, entp))
        mpfn = 0
        if pte.kind is Kind.NONE:
            if vma.file is None:
                mpfn = MIGRATE_PFN_MIGRATE
                mig.cpages += 1
        elif pte.kind is not Kind.LEAF:
            pass                            # only device-private entries are taken: none here
        elif pte.paddr == k.zero_page.paddr and mig.flags & MIGRATE_VMA_SELECT_SYSTEM:
            mpfn = MIGRATE_PFN_MIGRATE
            mig.cpages += 1
        else:
            page = None if pte.special else k.alloc.page_of(pte.paddr)      # vm_normal_page()
            mpfn = migrate_pfn(pte.paddr >> PAGE_SHIFT) | MIGRATE_PFN_MIGRATE
            if pte.prot & Access.W:
                mpfn |= MIGRATE_PFN_WRITE
            if page is None or not _has_mapping(page) or page.order:   # 6.6: "FIXME support THP"
                mpfn = 0
            else:
                mpfn = await _collect_page(k, mig, vma, a, entp, pte, page, mpfn)
                if mpfn:
                    unmapped += 1
        mig.dst.append(0)
        mig.src.append(mpfn)
        mig.npages += 1
    if unmapped:
        await flush_tlb_range(k, mm, start, end)
    await pgtable.pte_unmap_unlock(k, ptep + ((end - start - k.page_size) >> k.page_shift) * 8, ptl)
    return 0


async def _collect_page(k, mig: MigrateVma, vma, addr: int, entp: int, pte, page, mpfn: int) -> int:
    """The body of the pte loop for a normal page, under the ptl: folio_get(), and with
    folio_trylock() a migration entry in place of the pte."""
    arch = k.arch
    page.refcount += 1                                              # folio_get()
    if not await shmem.folio_trylock(k, page):
        page.refcount -= 1
        k.stats["migrate_vma_trylock_failed"] += 1
        return 0
    anon_exclusive = _anon(page) and not page.extra.get("forked")   # PageAnonExclusive()
    old = arch.decode(arch.pte_level, await pgtable.clear_entry(k, entp, arch.pte_level))
    if anon_exclusive:
        await flush_tlb_range(k, vma.mm, addr, addr + k.page_size)  # ptep_clear_flush()
        if folio_maybe_dma_pinned(page):                            # folio_try_share_anon_rmap_pte()
            await pgtable.set_entry(k, entp, arch.pte_level, old)
            shmem.folio_unlock(page)
            page.refcount -= 1
            k.stats["migrate_vma_pinned"] += 1
            return 0
    mig.cpages += 1
    if old.dirty:
        page.extra["dirty"] = True                                  # folio_mark_dirty()
    if mpfn & MIGRATE_PFN_WRITE:
        typ = SWP_MIGRATION_WRITE
    elif anon_exclusive:
        typ = SWP_MIGRATION_READ_EXCLUSIVE
    else:
        typ = SWP_MIGRATION_READ
    swp = swap_entry(typ, page.paddr >> PAGE_SHIFT, young=old.young, dirty=old.dirty,
                     soft_dirty=old.soft_dirty, uffd_wp=old.uffd_wp, exclusive=anon_exclusive)
    await pgtable.set_entry(k, entp, arch.pte_level, swp)
    page.mapcount -= 1                                              # page_remove_rmap()
    page.refcount -= 1                                              # put_page(): ours holds it
    k.stats["migrate_vma_collected"] += 1
    return mpfn


MIGRATE_VMA_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=migrate_vma_collect_pmd,
                                          pte_hole=migrate_vma_collect_hole)


async def migrate_vma_collect(k, mig: MigrateVma) -> None:
    """migrate_vma_collect(): the walk inside an MMU_NOTIFY_MIGRATE invalidation."""
    mm = mig.vma.mm
    rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, mm, mig.start, mig.end,
                                                                 MMU_NOTIFY_MIGRATE)
    await pagewalk.walk_page_range(k, mm, mig.start, mig.end, MIGRATE_VMA_WALK_OPS, mig)
    await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
    mig.end = mig.start + (mig.npages << k.page_shift)


def migrate_vma_check_page(folio) -> bool:
    """migrate_vma_check_page(): no references beyond the mappings and ours."""
    if folio.order:
        return False
    extra = 1
    if folio.mapping is not None:                                   # a page-cache folio
        extra += 1
    return folio.refcount - extra <= folio.mapcount


async def remove_migration_ptes(k, src, dst, mig: MigrateVma) -> int:
    """remove_migration_ptes(src, dst): rmap_walk(src) (the anon_vma's VMAs: one mm here,
    plus the migrating VMA for a page-cache folio) and, in each, page_vma_mapped_walk()
    with PVMW_MIGRATION: each migration entry of ``src`` becomes a pte of ``dst`` (young,
    dirty and writable as the entry says), with its rmap and reference."""
    arch = k.arch
    vma = mig.vma
    addr = vma.start + ((src.index - vma.pgoff) << k.page_shift) if _anon(src) else None
    if addr is None or not vma.start <= addr < vma.end:
        addr = None
        for i, s in enumerate(mig.src):                 # the address the collect found it at
            if migrate_pfn_to_page(k, s) is src:
                addr = mig.start + (i << k.page_shift)
    if addr is None:
        return 0
    done = 0
    pvmw = PageVmaMappedWalk(src.paddr, 1, vma, addr, PVMW_MIGRATION)
    while await page_vma_mapped_walk(k, pvmw):
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, pvmw.pte))
        prot = vm_get_page_prot(vma.flags) & ~Access.W
        if ent.swp_type == SWP_MIGRATION_WRITE and vma.flags & VM_WRITE:
            prot |= Access.W
        # mk_pte(vm_page_prot) is young; the entry's young/dirty bits are kept only where
        # migration_entry_supports_ad() (not modelled: young, and dirty as the folio is)
        new = leaf_entry(dst.paddr, prot, young=True, dirty=bool(src.extra.get("dirty")),
                         soft_dirty=ent.soft_dirty, uffd_wp=ent.uffd_wp)
        dst.refcount += 1                                           # folio_get()
        dst.mapcount += 1                                           # folio_add_anon_rmap_pte()
        if dst is not src and _anon(src):
            dst.extra["anon_vma"] = src.extra["anon_vma"]
            if not ent.exclusive and ent.swp_type != SWP_MIGRATION_WRITE:
                dst.extra["forked"] = src.extra.get("forked", True)
        await pgtable.set_entry(k, pvmw.pte, arch.pte_level, new)
        done += 1
    return done


async def migrate_device_unmap(k, mig: MigrateVma) -> int:
    """migrate_device_unmap(): keep what can be migrated, restore the rest."""
    unmapped = 0
    restore = []
    for i, mpfn in enumerate(mig.src):
        page = migrate_pfn_to_page(k, mpfn)
        if page is None:
            if mpfn & MIGRATE_PFN_MIGRATE:
                unmapped += 1
            continue
        # folio_isolate_lru() + the put of the collect reference: not modelled (net zero)
        if page.mapcount > 0 or not migrate_vma_check_page(page):   # try_to_migrate(): not modelled
            mig.src[i] &= ~MIGRATE_PFN_MIGRATE
            restore.append(i)
            k.stats["migrate_vma_restored"] += 1
            continue
        unmapped += 1
    for i in restore:
        page = migrate_pfn_to_page(k, mig.src[i])
        await remove_migration_ptes(k, page, page, mig)
        mig.src[i] = 0
        shmem.folio_unlock(page)
        page.refcount -= 1                                          # folio_put()
    return unmapped


async def migrate_vma_setup(k, mig: MigrateVma) -> int:
    """migrate_vma_setup(): 0 (maybe nothing collected), or -EINVAL."""
    vma = mig.vma
    nr = (mig.end - mig.start) >> k.page_shift
    if mig.start & (k.page_size - 1) or mig.end & (k.page_size - 1):
        return -EINVAL
    if vma is None or nr <= 0 or mig.start < vma.start or mig.end > vma.end:
        return -EINVAL
    mig.src, mig.dst, mig.npages, mig.cpages = [], [], 0, 0
    await migrate_vma_collect(k, mig)
    if mig.cpages:
        mig.cpages = await migrate_device_unmap(k, mig)
    return 0


async def migrate_vma_insert_page(k, mig: MigrateVma, addr: int, page, i: int) -> None:
    """migrate_vma_insert_page(): populate a hole with the new (locked) page. GIVEUP on
    any obstacle (``*src &= ~MIGRATE_PFN_MIGRATE``): not anon, a huge pmd, no table
    memory, a failed pte_offset_map_lock(), a pte neither none nor the zero page, a
    missing-mode userfaultfd."""
    vma, arch = mig.vma, k.arch
    mm = vma.mm
    ok = False
    if vma.file is None:
        try:
            pmdp = await pgtable.walk_alloc(k, mm, addr, arch.pmd_level)
        except OutOfMemory:
            pmdp = None
        if pmdp is not None and (await pgtable.get_entry(k, pmdp, arch.pmd_level)).kind is not Kind.LEAF \
                and await pgtable.pte_alloc(k, mm, pmdp):
            prot = vm_get_page_prot(vma.flags)
            entry = leaf_entry(page.paddr, prot, young=True)
            if vma.flags & VM_WRITE:
                entry = pgtable.pte_mkdirty(k, entry.with_(prot=prot | Access.W))
            locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
            if locked is None:
                k.stats["migrate_vma_insert_map_failed"] += 1
            else:
                ptep, ptl = locked
                orig = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
                flush = orig.kind is Kind.LEAF and orig.paddr == k.zero_page.paddr
                if (orig.kind is Kind.NONE or flush) and not vma.uffd_missing:
                    mm.rss[MM_ANONPAGES] += 1
                    vma.anon_vma = True
                    rmap.folio_add_new_anon_rmap(k, page, vma, addr)
                    page.mapcount += 1
                    page.refcount += 1                                  # get_page()
                    if flush:
                        await pgtable.clear_entry(k, ptep, arch.pte_level)   # ptep_clear_flush_notify()
                        await flush_tlb_range(k, mm, addr, addr + k.page_size)
                    await pgtable.set_entry(k, ptep, arch.pte_level, entry)
                    ok = True
                await pgtable.pte_unmap_unlock(k, ptep, ptl)
    if ok:
        mig.src[i] = MIGRATE_PFN_MIGRATE
    else:
        mig.src[i] &= ~MIGRATE_PFN_MIGRATE


async def migrate_vma_pages(k, mig: MigrateVma) -> None:
    """migrate_vma_pages() -> __migrate_device_pages(): move the struct-page state to the
    destinations the driver filled in ``dst`` (the data is already copied: NO_COPY)."""
    rng = None
    for i in range(mig.npages):
        new = migrate_pfn_to_page(k, mig.dst[i])
        page = migrate_pfn_to_page(k, mig.src[i])
        addr = mig.start + (i << k.page_shift)
        if new is None:
            mig.src[i] &= ~MIGRATE_PFN_MIGRATE
            continue
        if page is None:
            if not mig.src[i] & MIGRATE_PFN_MIGRATE:
                continue
            if rng is None:
                rng = await mmu_notifier.mmu_notifier_invalidate_range_start(
                    k, mig.vma.mm, addr, mig.end, MMU_NOTIFY_MIGRATE)
            await migrate_vma_insert_page(k, mig, addr, new, i)
            continue
        if page.mapping is not None:        # folio_migrate_mapping() of a page-cache folio
            mig.src[i] &= ~MIGRATE_PFN_MIGRATE
            continue
        # migrate_folio(NULL, dst, src, MIGRATE_SYNC_NO_COPY): folio_migrate_mapping()'s
        # refcount check (our reference only), then the anon mapping and index move
        if page.refcount != 1:
            mig.src[i] &= ~MIGRATE_PFN_MIGRATE
            continue
        new.index = page.index
        new.extra["anon_vma"] = page.extra["anon_vma"]
        if page.extra.get("dirty"):
            new.extra["dirty"] = True
        k.stats["migrate_vma_pages_moved"] += 1
    if rng is not None:
        await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)


async def migrate_vma_finalize(k, mig: MigrateVma) -> None:
    """migrate_vma_finalize() -> migrate_device_finalize(): the migration entries point at
    the new pages (or back at the old ones), the locks and references go."""
    for i in range(mig.npages):
        new = migrate_pfn_to_page(k, mig.dst[i])
        page = migrate_pfn_to_page(k, mig.src[i])
        if page is None:
            if new is not None:
                shmem.folio_unlock(new)
                _put(k, new)
            continue
        if not mig.src[i] & MIGRATE_PFN_MIGRATE or new is None:
            if new is not None:
                shmem.folio_unlock(new)
                _put(k, new)
            new = page
        await remove_migration_ptes(k, page, new, mig)
        shmem.folio_unlock(page)
        _put(k, page)                                   # putback_lru_page(): the isolation ref
        if new is not page:
            shmem.folio_unlock(new)
            _put(k, new)


def _put(k, page) -> None:
    page.refcount -= 1
    if page.refcount == 0:
        k.alloc.free_pages(page)


# -- the driver ("device" memory is other RAM) -----------------------------------------------

async def dmirror_migrate(k, mm, start: int, end: int) -> list[int] | int:
    """lib/test_hmm.c's dmirror_migrate_to_device() with system pages as the device:
    under mmap_read_lock, migrate_vma_setup(), allocate and copy (locked new pages in
    ``dst``), migrate_vma_pages(), migrate_vma_finalize(). Returns the src array after
    migrate_vma_pages (MIGRATE_PFN_MIGRATE: moved), or -errno."""
    from mm_core.locks import mmap_read_lock, mmap_read_unlock
    from mm_core.page_alloc import PageUse
    await mmap_read_lock(mm)
    try:
        vma = mm.find_vma(start)
        if vma is None or vma.start > start or end > vma.end:
            return -EINVAL
        mig = MigrateVma(vma, start, end)
        ret = await migrate_vma_setup(k, mig)
        if ret:
            return ret
        for i, mpfn in enumerate(mig.src):              # dmirror_migrate_alloc_and_copy()
            if not mpfn & MIGRATE_PFN_MIGRATE:
                continue
            try:
                new = k.alloc.alloc_pages(k.page_order, PageUse.ANON, owner=mm)
            except OutOfMemory:
                continue
            new.locked = True                           # lock_page(dpage)
            old = migrate_pfn_to_page(k, mpfn)
            if old is not None:
                k.physmem.copy(new.paddr, old.paddr, k.page_size)
            mig.dst[i] = migrate_pfn(new.pfn)
        await migrate_vma_pages(k, mig)
        result = list(mig.src)
        await migrate_vma_finalize(k, mig)
        return result
    finally:
        await mmap_read_unlock(mm)
