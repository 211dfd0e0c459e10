"""mlock(2) / munlock(2) / mlockall(2) / munlockall(2) (mm/mlock.c, v6.6): VM_LOCKED on
the VMAs, then a walk that marks the mapped folios mlocked (or munlocked), then (mlock,
mlockall(MCL_CURRENT)) __mm_populate() faults the rest in. mlockall(MCL_FUTURE) puts
VM_LOCKED (| VM_LOCKONFAULT with MCL_ONFAULT) in mm->def_flags: every later mmap() and
brk() VMA is born locked, accounted in locked_vm and populated (unless on-fault).

``mlock_pte_range`` is a walk_page_range() pmd_entry. A huge pmd (or a THP migration
entry, which pmd_trans_huge_lock() also returns locked) is handled under the pmd lock; a
PTE table is mapped with pte_offset_map_lock(), and a failed map asks for ACTION_AGAIN
(RETRY: the walker reads the pmd again; a retracted pmd then is a hole). Because the
swap-pmd case is caught by pmd_trans_huge_lock() first, a migration entry that stays
there cannot make the retry endless (DAMON's 2025 soft lockup cannot happen here).

Not modelled: RLIMIT_MEMLOCK and can_do_mlock() (mlockall is always allowed),
MLOCK_ONFAULT's VM_LOCKONFAULT beyond not populating, mlock of a folio a COW fault
copies into a VM_LOCKED VMA (mlock_new_folio()), locked_vm on munmap, the transient
VM_IO of mlock_vma_pages_range(), the unevictable LRU (a
folio's mlock state is ``extra["mlock_count"]``), and munlock on unmap
(page_remove_rmap()'s munlock_vma_folio: a page freed by a zap simply goes).
"""
from __future__ import annotations

from emu.arch import Kind
from emu.sched import traps
from mm_core import huge_memory, memory, pagewalk, pgtable
from mm_core.locks import mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import VM_EXEC, VM_LOCKED, VM_READ, VM_SHARED, VM_WRITE, VMA
from mm_core.mmap import EINVAL, ENOMEM, split_range

MLOCK_ONFAULT = 0x01
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
VM_LOCKONFAULT = 0x00080000
VM_LOCKED_MASK = VM_LOCKED | VM_LOCKONFAULT
EAGAIN = 11


def mlock_folio(k, folio) -> None:
    """mlock_folio(): one more mlock of the folio (it becomes unevictable)."""
    folio.extra["mlock_count"] = folio.extra.get("mlock_count", 0) + 1
    k.stats["mlock_folio"] += 1


def munlock_folio(k, folio) -> None:
    """munlock_folio(): one mlock fewer; at zero the folio is evictable again."""
    n = folio.extra.get("mlock_count", 0)
    if n > 1:
        folio.extra["mlock_count"] = n - 1
    else:
        folio.extra.pop("mlock_count", None)
    k.stats["munlock_folio"] += 1


async def mlock_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """mlock_pte_range(): (m)unlock each small folio mapped in [addr, end), or the THP of
    a huge pmd. A failed pte_offset_map_lock() is ACTION_AGAIN (RETRY)."""
    k, arch, vma = walk.k, walk.k.arch, walk.vma
    locked_vma = bool(vma.flags & VM_LOCKED)
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind in (Kind.LEAF, Kind.MIGRATION, Kind.SWAP):
        pml, cur = await huge_memory.pmd_trans_huge_lock(k, vma.mm, pmdp)
        if pml is not None:
            if cur.kind is not Kind.LEAF:                      # !pmd_present(): goto out
                k.stats["mlock_pmd_not_present"] += 1
            else:
                folio = k.alloc.page_of(cur.paddr)
                if folio is not None:
                    (mlock_folio if locked_vma else munlock_folio)(k, folio)
            await traps.unlock(pml)
            return 0
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
    if locked is None and "mlock_pte_range_ignores_map_failure" in k.bugs:
        await pgtable.walk_stale_pte_table(k, pmdval, addr, end)   # bug injection: walks on
        return 0
    if locked is None:
        k.stats["mlock_pte_range_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN                   # RETRY
        return 0
    ptep, ptl = locked
    for i in range((end - addr) >> k.page_shift):
        ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep + 8 * i))
        if ptent.kind is not Kind.LEAF or ptent.special:      # !pte_present() / no normal folio
            continue
        folio = k.alloc.page_of(ptent.paddr)
        if folio is None or folio.order != k.page_order:      # folio_test_large(): skipped
            continue
        (mlock_folio if locked_vma else munlock_folio)(k, folio)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


MLOCK_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=mlock_pte_range)


async def mlock_vma_pages_range(k, vma: VMA, start: int, end: int, newflags: int) -> None:
    """mlock_vma_pages_range(): set the new flags, then walk the range with mlock_pte_range
    (under mmap_write_lock: PGWALK_WRLOCK_VERIFY)."""
    vma.flags = newflags
    await pagewalk.walk_page_range(k, vma.mm, start, end, MLOCK_WALK_OPS)


async def mlock_fixup(k, mm, vma: VMA, start: int, end: int, newflags: int) -> int:
    """mlock_fixup(): the VMA is already split to [start, end); account locked_vm, and
    walk unless it was locked already ("mlocking twice would be wrong")."""
    oldflags = vma.flags
    if newflags == oldflags:
        return 0
    nr = (end - start) >> k.page_shift
    if not newflags & VM_LOCKED:
        nr = -nr
    elif oldflags & VM_LOCKED:
        nr = 0
    mm.locked_vm += nr
    if newflags & VM_LOCKED and oldflags & VM_LOCKED:
        vma.flags = newflags
    else:
        await mlock_vma_pages_range(k, vma, start, end, newflags)
    return 0


async def apply_vma_lock_flags(k, mm, start: int, end: int, flags: int) -> int:
    """apply_vma_lock_flags(): VMA by VMA from the one holding ``start``; a gap is -ENOMEM
    (the VMAs before it keep their new flags, as in Linux)."""
    vma = mm.vma_lookup(start)
    if vma is None:
        return -ENOMEM
    split_range(mm, start, end)
    pos = start
    for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
        if vma.start != pos:
            break
        err = await mlock_fixup(k, mm, vma, vma.start, vma.end, (vma.flags & ~VM_LOCKED_MASK) | flags)
        if err:
            return err
        pos = vma.end
    mm.merge_adjacent()
    return 0 if pos >= end else -ENOMEM


async def mm_populate(k, mm, start: int, end: int) -> int:
    """__mm_populate() -> populate_vma_page_range() -> faultin_page(): fault every page in
    under mmap_read_lock, writing where the mapping is private and writable (breaking
    COW); VM_LOCKONFAULT and PROT_NONE VMAs are left alone."""
    await mmap_read_lock(mm)
    try:
        for va in range(start, end, k.page_size):
            vma = mm.vma_lookup(va)
            if vma is None or vma.flags & VM_LOCKONFAULT or not vma.flags & (VM_READ | VM_WRITE | VM_EXEC):
                continue
            write = vma.flags & (VM_WRITE | VM_SHARED) == VM_WRITE
            ret = await memory.handle_mm_fault(k, vma, va, memory.FAULT_FLAG_WRITE if write else 0)
            if ret & memory.VM_FAULT_OOM:
                return -EAGAIN                      # __mlock_posix_error_return(-ENOMEM)
    finally:
        await mmap_read_unlock(mm)
    return 0


def _range(k, start: int, length: int) -> tuple[int, int]:
    length += start & (k.page_size - 1)
    start &= ~(k.page_size - 1)
    return start, start + ((length + k.page_size - 1) & ~(k.page_size - 1))


async def do_mlock(k, mm, start: int, length: int, flags: int = 0) -> int:
    """do_mlock() (mlock, mlock2): 0 or -errno."""
    if flags & ~MLOCK_ONFAULT or length < 0:
        return -EINVAL
    start, end = _range(k, start, length)
    if end == start:
        return 0
    vm_flags = VM_LOCKED | (VM_LOCKONFAULT if flags & MLOCK_ONFAULT else 0)
    await mmap_write_lock(mm)
    try:
        err = await apply_vma_lock_flags(k, mm, start, end, vm_flags)
    finally:
        await mmap_write_unlock(mm)
    if err:
        return err
    return await mm_populate(k, mm, start, end)


async def do_munlock(k, mm, start: int, length: int) -> int:
    """munlock(2): clear VM_LOCKED (and VM_LOCKONFAULT), munlocking the mapped folios."""
    if length < 0:
        return -EINVAL
    start, end = _range(k, start, length)
    if end == start:
        return 0
    await mmap_write_lock(mm)
    try:
        return await apply_vma_lock_flags(k, mm, start, end, 0)
    finally:
        await mmap_write_unlock(mm)


async def apply_mlockall_flags(k, mm, flags: int) -> int:
    """apply_mlockall_flags(): mm->def_flags from MCL_FUTURE (| MCL_ONFAULT); with
    MCL_CURRENT (or none: munlockall) every VMA goes through mlock_fixup(), whose errors
    are ignored. Called under mmap_write_lock."""
    mm.def_flags &= ~VM_LOCKED_MASK
    if flags & MCL_FUTURE:
        mm.def_flags |= VM_LOCKED
        if flags & MCL_ONFAULT:
            mm.def_flags |= VM_LOCKONFAULT
        if not flags & MCL_CURRENT:
            return 0
    to_add = 0
    if flags & MCL_CURRENT:
        to_add = VM_LOCKED | (VM_LOCKONFAULT if flags & MCL_ONFAULT else 0)
    for vma in list(mm.vmas):
        await mlock_fixup(k, mm, vma, vma.start, vma.end, (vma.flags & ~VM_LOCKED_MASK) | to_add)
    mm.merge_adjacent()
    return 0


async def do_mlockall(k, mm, flags: int) -> int:
    """mlockall(2): 0 or -errno; MCL_CURRENT then populates every VMA (__mm_populate(0,
    TASK_SIZE), VMA by VMA)."""
    if not flags or flags & ~(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) or flags == MCL_ONFAULT:
        return -EINVAL
    await mmap_write_lock(mm)
    try:
        ret = await apply_mlockall_flags(k, mm, flags)
        ranges = [(v.start, v.end) for v in mm.vmas]
    finally:
        await mmap_write_unlock(mm)
    if not ret and flags & MCL_CURRENT:
        for start, end in ranges:
            err = await mm_populate(k, mm, start, end)
            if err:
                return err
    return ret


async def do_munlockall(k, mm) -> int:
    """munlockall(2): clear def_flags and unlock every VMA."""
    await mmap_write_lock(mm)
    try:
        return await apply_mlockall_flags(k, mm, 0)
    finally:
        await mmap_write_unlock(mm)
