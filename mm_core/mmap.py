"""mmap, munmap and brk (mm/mmap.c): VMA bookkeeping plus the page-table side."""
from __future__ import annotations

from emu.arch import PAGE_SIZE, Access
from mm_core import memory
from mm_core.locks import mmap_write_lock, mmap_write_unlock
from mm_core.mm import (
    VM_EXEC,
    VM_GROWSDOWN,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    VMA,
    MMStruct,
)

VM_LOCKONFAULT = 0x00080000           # as mm_core.mlock (which imports this module)

# Linux uapi values (asm-generic/mman-common.h; identical on the four arches for these)
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE = 0x1, 0x2, 0x3
MAP_TYPE = 0xF
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_POPULATE = 0x8000
MAP_FIXED_NOREPLACE = 0x100000

EPERM, ENOENT, EBADF, ENOMEM, EACCES, EFAULT, EEXIST, EINVAL, ENOSYS = 1, 2, 9, 12, 13, 14, 17, 22, 38


def page_align(n: int, page_size: int = PAGE_SIZE) -> int:
    """PAGE_ALIGN() for a base page of ``page_size`` bytes."""
    return (n + page_size - 1) & ~(page_size - 1)


def calc_vm_prot_bits(prot: int) -> int:
    return ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
            | (VM_EXEC if prot & PROT_EXEC else 0))


def get_unmapped_area(mm: MMStruct, addr: int, length: int, task_size: int,
                      page_size: int = PAGE_SIZE) -> int | None:
    """arch_get_unmapped_area_topdown(): honour a free hint, else the highest gap below
    mmap_base."""
    if addr and addr + length <= task_size and not mm.overlapping(addr, addr + length):
        return addr
    top = mm.mmap_base
    for vma in sorted(mm.vmas, key=lambda v: v.start, reverse=True):
        if vma.start >= top:
            continue
        if vma.end <= top - length:
            return top - length
        top = vma.start
    return top - length if top - length >= page_size * 16 else None


async def do_mmap(k, mm: MMStruct, addr: int, length: int, prot: int, flags: int,
                  file: object = None, pgoff: int = 0, name: str = "") -> int:
    """vm_mmap_pgoff() -> do_mmap() + mmap_region(): returns the address or -errno. Takes
    mmap_write_lock. A MAP_FIXED mapping over VMAs registered with a userfaultfd asking for
    UFFD_FEATURE_EVENT_UNMAP unmaps them with userfaultfd_unmap_prep() (mmap_region()'s
    do_vmi_munmap(..., uf, false)); the UNMAP events go after mmap_write_unlock()
    (userfaultfd_unmap_complete(), 6.6 vm_mmap_pgoff()), before any populate."""
    from mm_core.userfaultfd import userfaultfd_unmap_complete
    uf: list = []
    await mmap_write_lock(mm)
    try:
        ret = await _do_mmap_locked(k, mm, addr, length, prot, flags, file, pgoff, name, uf)
        vma = mm.vma_lookup(ret) if ret >= 0 else None
        populate = vma is not None and vma.flags & (VM_LOCKED | VM_LOCKONFAULT) == VM_LOCKED
    finally:
        await mmap_write_unlock(mm)
    await userfaultfd_unmap_complete(k, mm, uf)
    if populate:                       # vm_mmap_pgoff(): mm_populate() of a VM_LOCKED mapping
        from mm_core.mlock import mm_populate
        await mm_populate(k, mm, ret, ret + page_align(length, k.page_size))
    return ret


async def _do_mmap_locked(k, mm, addr, length, prot, flags, file, pgoff, name, uf: list | None = None) -> int:
    task_size = k.arch.task_size
    if length <= 0 or length > task_size:
        return -EINVAL
    length = page_align(length, k.page_size)
    if flags & MAP_TYPE not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
        return -EINVAL
    if file is None and not flags & MAP_ANONYMOUS:
        return -EBADF
    fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)
    if fixed:
        if addr % k.page_size or addr + length > task_size or addr < k.page_size:
            return -EINVAL
        if flags & MAP_FIXED_NOREPLACE and mm.overlapping(addr, addr + length):
            return -EEXIST
        await _munmap_locked(k, mm, addr, length, uf)
    else:
        addr = get_unmapped_area(mm, addr & ~(k.page_size - 1), length, task_size, k.page_size)
        if addr is None:
            return -ENOMEM
    vm_flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC | mm.def_flags
    if flags & MAP_TYPE != MAP_PRIVATE:
        vm_flags |= VM_SHARED | VM_MAYSHARE
    if flags & MAP_GROWSDOWN:
        vm_flags |= VM_GROWSDOWN
    vma = VMA(mm, addr, addr + length, vm_flags, name, file, pgoff)
    mm.insert_vma(vma)
    if vm_flags & VM_LOCKED:                     # mmap_region(): mlock_future_ok() + locked_vm
        mm.locked_vm += length >> k.page_shift
    memory.vma_link_file(k, vma)
    mm.merge_adjacent()
    if flags & MAP_POPULATE:
        await populate(k, mm, addr, addr + length, write=bool(prot & PROT_WRITE))
    return addr


async def populate(k, mm: MMStruct, start: int, end: int, write: bool) -> None:
    """__mm_populate() / faultin_page(): fault every page in, as get_user_pages would."""
    access = Access.W if write else Access.R
    for va in range(start, end, k.page_size):
        vma = mm.vma_lookup(va)
        if vma is None:
            continue
        flags = memory.FAULT_FLAG_WRITE if write and vma.flags & VM_WRITE else 0
        if not memory.access_error(vma, access if flags else Access.R):
            await memory.handle_mm_fault(k, vma, va, flags)


async def do_munmap(k, mm: MMStruct, start: int, length: int) -> int:
    """do_munmap() / __vm_munmap(): 0 or -errno. Takes mmap_write_lock. VMAs registered
    with a userfaultfd asking for UFFD_FEATURE_EVENT_UNMAP: userfaultfd_unmap_prep() under
    the lock, userfaultfd_unmap_complete() (UFFD_EVENT_UNMAP, waiting for the handler's
    read()) after mmap_write_unlock()."""
    from mm_core.userfaultfd import userfaultfd_unmap_complete
    if start % k.page_size or length <= 0 or start + length > k.arch.task_size:
        return -EINVAL
    uf: list = []
    await mmap_write_lock(mm)
    try:
        await _munmap_locked(k, mm, start, page_align(length, k.page_size), uf)
    finally:
        await mmap_write_unlock(mm)
    await userfaultfd_unmap_complete(k, mm, uf)
    return 0


async def _munmap_locked(k, mm: MMStruct, start: int, length: int, uf: list | None = None) -> None:
    """do_vmi_align_munmap(): split, userfaultfd_unmap_prep() per VMA (when ``uf``, the
    list userfaultfd_unmap_complete() is handed after the unlock: munmap, mmap(MAP_FIXED),
    mremap's shrink, move and MREMAP_FIXED target), detach, zap, free the tables."""
    from mm_core.userfaultfd import userfaultfd_unmap_prep
    end = start + length
    victims = split_range(mm, start, end)
    if not victims:
        return
    if uf is not None:
        for vma in victims:
            userfaultfd_unmap_prep(k, vma, start, end, uf)
    for vma in victims:
        mm.remove_vma(vma)
    for vma in victims:                          # unmap_region(): zap (unmap_vmas), then free tables
        await memory.unmap_page_range(k, vma, vma.start, vma.end, details=memory.ZAP_UNMAP_DETAILS)
    for vma in victims:
        await memory.unlink_file_vma(k, vma)
    for vma in victims:
        await memory.free_pgtables(k, mm, vma.start, vma.end)
        memory.remove_vma(k, vma)


def split_range(mm: MMStruct, start: int, end: int) -> list[VMA]:
    """Split VMAs at start and end; return the VMAs now lying inside [start, end)."""
    for vma in mm.overlapping(start, end):
        if vma.start < start:
            vma = mm.split_vma(vma, start)
        if vma.end > end:
            mm.split_vma(vma, end)
    return mm.overlapping(start, end)


async def do_brk(k, mm: MMStruct, brk: int) -> int:
    """sys_brk(): move the program break; returns the new (or unchanged) break."""
    populate = False
    await mmap_write_lock(mm)
    try:
        if brk < mm.start_brk:
            return mm.brk
        new_end, old_end = page_align(brk, k.page_size), page_align(mm.brk, k.page_size)
        if new_end < old_end:
            await _munmap_locked(k, mm, new_end, old_end - new_end)
        elif new_end > old_end:
            if mm.overlapping(old_end, new_end + k.page_size):
                return mm.brk
            flags = VM_READ | VM_WRITE | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC | mm.def_flags
            mm.insert_vma(VMA(mm, old_end, new_end, flags, "[heap]"))
            if flags & VM_LOCKED:                # do_brk_flags()
                mm.locked_vm += (new_end - old_end) >> k.page_shift
            mm.merge_adjacent()
            populate = bool(mm.def_flags & VM_LOCKED)
        mm.brk = brk
    finally:
        await mmap_write_unlock(mm)
    if populate:                                 # sys_brk(): mm_populate(oldbrk, newbrk - oldbrk)
        from mm_core.mlock import mm_populate
        await mm_populate(k, mm, old_end, new_end)
    return brk
