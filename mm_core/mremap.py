"""mremap (mm/mremap.c): move a mapping by moving its page tables.

    move_page_tables()  per PMD extent: whole-table moves (move_normal_pmd), huge moves
                        (move_huge_pmd), else PTE by PTE (move_ptes); -EAGAIN from
                        move_ptes means "look at this extent again" (RETRY / EAGAIN)
    move_normal_pmd()   under the rmap locks and both pmd locks, recheck that the old pmd
                        still points to a table (the 2024 fix for the race with
                        retract_page_tables(), which needs no mmap_lock)
"""
from __future__ import annotations

from emu.arch import Kind, table_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import huge_memory, memory, mmu_notifier, pgtable, rmap
from mm_core.locks import mmap_write_lock, mmap_write_unlock
from mm_core.mm import VMA
from mm_core.mmap import EINVAL, ENOMEM, _munmap_locked, get_unmapped_area, page_align, split_range
from mm_core.tlbflush import flush_tlb_range

MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
EAGAIN, EFAULT = 11, 14


async def do_mremap(k, mm, addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0) -> int:
    """mremap(2): shrink in place, grow in place when the space is free, else (with
    MREMAP_MAYMOVE) move. Returns the new address or -errno. userfaultfd events (6.6
    SYSCALL_DEFINE5(mremap)), sent after mmap_write_unlock() in this order: UFFD_EVENT_UNMAP
    of a MREMAP_FIXED target that was mapped (uf_unmap_early), UFFD_EVENT_REMAP {addr, ret,
    old_len} of a move, UFFD_EVENT_UNMAP of the range a shrink or a move unmapped (uf_unmap;
    the old VMA of a move keeps its registration until it is unmapped)."""
    from mm_core.userfaultfd import VmUffdCtx, mremap_userfaultfd_complete, userfaultfd_unmap_complete
    page = k.page_size
    if addr % page or flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED) or (flags & MREMAP_FIXED
                                                                   and not flags & MREMAP_MAYMOVE):
        return -EINVAL
    old_len, new_len = page_align(old_len, page), page_align(new_len, page)
    if not new_len or not old_len:
        return -EINVAL
    uf = VmUffdCtx()
    uf_unmap_early: list = []
    uf_unmap: list = []
    await mmap_write_lock(mm)
    try:
        ret = await _do_mremap_locked(k, mm, addr, old_len, new_len, flags, new_addr, uf, uf_unmap_early,
                                      uf_unmap)
    finally:
        await mmap_write_unlock(mm)
    await userfaultfd_unmap_complete(k, mm, uf_unmap_early)
    await mremap_userfaultfd_complete(k, uf, addr, ret, old_len)
    await userfaultfd_unmap_complete(k, mm, uf_unmap)
    return ret


async def _do_mremap_locked(k, mm, addr: int, old_len: int, new_len: int, flags: int, new_addr: int,
                            uf, uf_unmap_early: list, uf_unmap: list) -> int:
    page = k.page_size
    vma = mm.vma_lookup(addr)
    if vma is None or addr + old_len > vma.end:
        return -EFAULT
    if flags & MREMAP_FIXED:                        # mremap_to()
        if new_addr % page or new_addr < addr + old_len and addr < new_addr + new_len:
            return -EINVAL
        await _munmap_locked(k, mm, new_addr, new_len, uf_unmap_early)
        return await move_vma(k, mm, vma, addr, old_len, new_len, new_addr, uf, uf_unmap)
    if new_len <= old_len:
        if new_len < old_len:
            await _munmap_locked(k, mm, addr + new_len, old_len - new_len, uf_unmap)
        return addr
    if addr + old_len == vma.end and not mm.overlapping(vma.end, addr + new_len):
        vma.end = addr + new_len                    # vma_expand()
        return addr
    if not flags & MREMAP_MAYMOVE:
        return -ENOMEM
    target = get_unmapped_area(mm, 0, new_len, k.arch.task_size, page)
    if target is None:
        return -ENOMEM
    return await move_vma(k, mm, vma, addr, old_len, new_len, target, uf, uf_unmap)


async def move_vma(k, mm, vma: VMA, old_addr: int, old_len: int, new_len: int, new_addr: int,
                   uf=None, uf_unmap: list | None = None) -> int:
    """move_vma(): a new VMA at new_addr (copy_vma(): the old one's flags and uffd context),
    the page tables moved under it, mremap_userfaultfd_prep() for it, the old range
    unmapped (do_vmi_munmap() with ``uf_unmap``: an UNMAP event for the old range)."""
    from mm_core.userfaultfd import VmUffdCtx, mremap_userfaultfd_prep
    split_range(mm, old_addr, old_addr + old_len)
    vma = mm.vma_lookup(old_addr)
    new = VMA(mm, new_addr, new_addr + new_len, vma.flags, vma.name, vma.file,
              vma.pgoff, vma.anon_vma, vma.uffd_ctx, vma.policy)  # copy_vma(): vma_dup_policy()
    mm.insert_vma(new)
    memory.vma_link_file(k, new)
    moved = await move_page_tables(k, vma, old_addr, new, new_addr, min(old_len, new_len))
    if moved < min(old_len, new_len):
        return -ENOMEM
    await mremap_userfaultfd_prep(k, new, uf if uf is not None else VmUffdCtx())
    await _munmap_locked(k, mm, old_addr, old_len, uf_unmap)
    mm.merge_adjacent()
    k.stats["mremap_moves"] += 1
    return new_addr


async def move_page_tables(k, vma: VMA, old_addr: int, new_vma: VMA, new_addr: int, length: int) -> int:
    """move_page_tables(): returns how many bytes were moved. The whole move is one
    MMU_NOTIFY_UNMAP invalidation of the old range (a mirror must drop what it had
    there; the new range had nothing to invalidate)."""
    arch, mm = k.arch, vma.mm
    size = huge_memory.hpage_pmd_size(k)
    done = 0
    rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, mm, old_addr, old_addr + length,
                                                                 mmu_notifier.MMU_NOTIFY_UNMAP)
    while done < length:
        old, new = old_addr + done, new_addr + done
        extent = min(length - done, size - (old & (size - 1)), size - (new & (size - 1)))
        old_pmdp = await rmap.walk_to_pmd(k, mm, old)
        if old_pmdp is None:
            done += extent
            continue
        old_pmd = await pgtable.get_entry(k, old_pmdp, arch.pmd_level)
        if old_pmd.kind is Kind.NONE:             # "mm/mremap: retry if either map fails"
            done += extent
            continue
        new_pmdp = await pgtable.walk_alloc(k, mm, new, arch.pmd_level)
        if new_pmdp is None:
            break
        if extent == size and old_pmd.kind is Kind.TABLE:
            if await move_normal_pmd(k, vma, old, new, old_pmdp, new_pmdp):
                done += extent
                continue
        elif extent == size and old_pmd.kind is Kind.LEAF:
            if await move_huge_pmd(k, vma, old_pmdp, new_pmdp):
                done += extent
                continue
        if old_pmd.kind is Kind.LEAF:
            await huge_memory.split_huge_pmd(k, vma, old_pmdp, old)
        if not await pgtable.pte_alloc(k, mm, new_pmdp):
            break
        if await move_ptes(k, vma, old_pmdp, old, old + extent, new_pmdp, new) == -EAGAIN:
            k.stats["move_ptes_eagain"] += 1
            await sched_point("retry", old_pmdp)
            continue                                 # again: look at this extent anew
        done += extent
    await flush_tlb_range(k, mm, old_addr, old_addr + length)
    await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
    return done


async def take_rmap_locks(k, vma: VMA) -> None:
    if vma.file is not None:
        await traps.lock(vma.file.mapping.i_mmap_rwsem, "w")


async def drop_rmap_locks(k, vma: VMA) -> None:
    if vma.file is not None:
        await traps.unlock(vma.file.mapping.i_mmap_rwsem, "w")


async def move_normal_pmd(k, vma: VMA, old_addr: int, new_addr: int, old_pmdp: int, new_pmdp: int) -> bool:
    """move_normal_pmd(): move a whole PTE table from one pmd to another. The old pmd is
    read again under the locks: retract_page_tables() may have cleared it meanwhile,
    holding only i_mmap_lock_read (Jann Horn's 2024 fix)."""
    mm, arch = vma.mm, k.arch
    if (await pgtable.get_entry(k, new_pmdp, arch.pmd_level)).kind is not Kind.NONE:
        return False
    await take_rmap_locks(k, vma)
    old_ptl = await pgtable.pmd_lock(k, mm, old_pmdp)
    new_ptl = await pgtable.pmd_lockptr(k, mm, new_pmdp)
    if new_ptl is not old_ptl:
        await traps.lock(new_ptl)
    pmd = await pgtable.get_entry(k, old_pmdp, arch.pmd_level)
    moved = False
    if pmd.kind is Kind.TABLE or "move_normal_pmd_without_recheck" in k.bugs:
        await pgtable.clear_entry(k, old_pmdp, arch.pmd_level)
        # pmd_populate(new, pmd_pgtable(pmd)): with a none pmd that is pfn 0
        await pgtable.set_entry(k, new_pmdp, arch.pmd_level, table_entry(pmd.paddr))
        await flush_tlb_range(k, mm, old_addr, old_addr + huge_memory.hpage_pmd_size(k))
        moved = True
        k.stats["move_normal_pmd"] += 1
    if new_ptl is not old_ptl:
        await traps.unlock(new_ptl)
    await traps.unlock(old_ptl)
    await drop_rmap_locks(k, vma)
    return moved


async def move_huge_pmd(k, vma: VMA, old_pmdp: int, new_pmdp: int) -> bool:
    """move_huge_pmd(): move a PMD leaf (and its deposited table); a non-none new pmd
    means no (it is no longer a WARN since the 2023 syzbot fix)."""
    mm, arch = vma.mm, k.arch
    old_ptl = await pgtable.pmd_lock(k, mm, old_pmdp)
    new_ptl = await pgtable.pmd_lockptr(k, mm, new_pmdp)
    if new_ptl is not old_ptl:
        await traps.lock(new_ptl)
    pmd = await pgtable.get_entry(k, old_pmdp, arch.pmd_level)
    ok = pmd.kind is Kind.LEAF and (await pgtable.get_entry(k, new_pmdp, arch.pmd_level)).kind is Kind.NONE
    if ok:
        await pgtable.clear_entry(k, old_pmdp, arch.pmd_level)
        deposit = huge_memory.pgtable_trans_huge_withdraw(k, mm, old_pmdp)
        if deposit is not None:
            huge_memory.pgtable_trans_huge_deposit(k, mm, new_pmdp, deposit)
        await pgtable.set_entry(k, new_pmdp, arch.pmd_level, pmd)
    if new_ptl is not old_ptl:
        await traps.unlock(new_ptl)
    await traps.unlock(old_ptl)
    return ok


async def move_ptes(k, vma: VMA, old_pmdp: int, old_addr: int, old_end: int, new_pmdp: int,
                    new_addr: int) -> int:
    """move_ptes(): -EAGAIN if either table cannot be mapped (old with its lock, new
    without: its ptl is taken nested)."""
    mm, arch = vma.mm, k.arch
    locked = await pgtable.pte_offset_map_lock(k, mm, old_pmdp, old_addr)
    if locked is None:
        return -EAGAIN
    old_ptep, old_ptl = locked
    mapped = await pgtable.pte_offset_map_for_write_nolock(k, mm, new_pmdp, new_addr)
    if mapped is None:
        await pgtable.pte_unmap_unlock(k, old_ptep, old_ptl)
        return -EAGAIN
    new_ptep, new_ptl, new_pmdval = mapped
    if new_ptl is not old_ptl:
        await traps.lock(new_ptl)
    if k.profile.rw_nolock and "move_ptes_without_pmd_same" not in k.bugs \
            and not pgtable.pmd_same(k, new_pmdval, await pgtable.get_raw(k, new_pmdp)):
        ret = -EAGAIN                              # 6.13: the new table changed under us
    else:
        for i in range((old_end - old_addr) >> k.page_shift):
            value = await pgtable.get_raw(k, old_ptep + 8 * i)
            if arch.decode(arch.pte_level, value).kind is Kind.NONE:
                continue
            await pgtable.clear_entry(k, old_ptep + 8 * i, arch.pte_level)
            await pgtable.set_entry(k, new_ptep + 8 * i, arch.pte_level, arch.decode(arch.pte_level, value))
        ret = 0
    if new_ptl is not old_ptl:
        await traps.unlock(new_ptl)
    await pgtable.pte_unmap(k, new_ptep)
    await pgtable.pte_unmap_unlock(k, old_ptep, old_ptl)
    return ret
