"""madvise (mm/madvise.c): MADV_DONTNEED, MADV_HUGEPAGE / MADV_NOHUGEPAGE, MADV_COLLAPSE."""
from __future__ import annotations

from mm_core import khugepaged, memory
from mm_core.locks import mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import VM_HUGEPAGE, VM_LOCKED, VM_NOHUGEPAGE
from mm_core.mmap import EINVAL, ENOMEM, page_align, split_range

MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTNEED = 0, 1, 2, 3, 4
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MADV_COLLAPSE = 25
_NO_OPS = (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED)


async def do_madvise(k, mm, start: int, length: int, behavior: int) -> int:
    """do_madvise(): 0 or -errno (-ENOMEM if part of the range is unmapped, after the
    advice was applied to the mapped parts, as Linux does)."""
    if start % k.page_size or length < 0:
        return -EINVAL
    end = start + page_align(length, k.page_size)
    if end == start:
        return 0
    if behavior == MADV_COLLAPSE:
        return await khugepaged.madvise_collapse(k, mm, start, end)
    if behavior == MADV_DONTNEED:
        return await madvise_dontneed(k, mm, start, end)
    if behavior in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
        return await madvise_hugepage(k, mm, start, end, behavior)
    if behavior in _NO_OPS:
        return 0 if _covered(mm, start, end) else -ENOMEM
    return -EINVAL


def _covered(mm, start: int, end: int) -> bool:
    addr = start
    for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
        if vma.start > addr:
            return False
        addr = vma.end
    return addr >= end


async def madvise_dontneed(k, mm, start: int, end: int) -> int:
    """madvise_dontneed_single_vma() -> zap_page_range_single(): drop the mappings (anon
    memory reads back as zero, file memory from the page cache). mmap_read_lock only."""
    await mmap_read_lock(mm)
    try:
        vmas = mm.overlapping(start, end)
        if any(v.flags & VM_LOCKED for v in vmas):
            return -EINVAL
        for vma in vmas:
            # zap_details.reclaim_pt: 6.14's PT_RECLAIM frees the tables this empties
            await memory.unmap_page_range(k, vma, max(start, vma.start), min(end, vma.end), reclaim_pt=True)
        k.stats["madv_dontneed"] += 1
        return 0 if _covered(mm, start, end) else -ENOMEM
    finally:
        await mmap_read_unlock(mm)


async def madvise_hugepage(k, mm, start: int, end: int, behavior: int) -> int:
    """hugepage_madvise(): set VM_HUGEPAGE / VM_NOHUGEPAGE and register with khugepaged."""
    await mmap_write_lock(mm)
    try:
        for vma in split_range(mm, start, end):
            if behavior == MADV_HUGEPAGE:
                vma.flags = (vma.flags | VM_HUGEPAGE) & ~VM_NOHUGEPAGE
                k.khugepaged.enter(mm)
            else:
                vma.flags = (vma.flags | VM_NOHUGEPAGE) & ~VM_HUGEPAGE
        mm.merge_adjacent()
        return 0 if _covered(mm, start, end) else -ENOMEM
    finally:
        await mmap_write_unlock(mm)
