"""Faults, zapping and table teardown (mm/memory.c, mm/mmap.c's free_pgtables, kernel/fork.c's
check_mm).

Every function that touches shared state is a coroutine; table entry reads and writes
and lock operations are its scheduling points.
"""
from __future__ import annotations

import enum

from emu.arch import PAGE_SIZE, Access, Entry, Kind, leaf_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import pgtable
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mm import (
    MM_ANONPAGES,
    RSS_NAMES,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    VMA,
    MMStruct,
)
from mm_core.page_alloc import OutOfMemory, PageUse

# fault flags (include/linux/mm_types.h, enum fault_flag)
FAULT_FLAG_WRITE = 0x1
FAULT_FLAG_USER = 0x40
FAULT_FLAG_INSTRUCTION = 0x100

# vm_fault_t
VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2
VM_FAULT_SIGSEGV = 0x40
VM_FAULT_RETRY = 0x400

STACK_GUARD_GAP = 256 * PAGE_SIZE


class FaultResult(enum.Enum):
    OK = "ok"
    SEGV_MAPERR = "SEGV_MAPERR"     # no mapping at the address
    SEGV_ACCERR = "SEGV_ACCERR"     # mapping does not allow the access
    SIGBUS = "SIGBUS"
    OOM = "OOM"


class CheckMMError(Exception):
    """check_mm(): an mm torn down with pages, tables or counters left over."""


def vm_get_page_prot(vm_flags: int) -> Access:
    """vm_get_page_prot(): what a fresh PTE of the VMA allows. Private writable mappings
    start without W (copy-on-write); the write fault adds it."""
    prot = Access.NONE
    if vm_flags & (VM_READ | VM_WRITE | VM_EXEC):
        prot |= Access.R            # no arch here can express write- or exec-only
    if vm_flags & VM_WRITE and vm_flags & VM_SHARED:
        prot |= Access.W
    if vm_flags & VM_EXEC:
        prot |= Access.X
    return prot


# -- the arch fault handler's generic part -------------------------------------------------------

def access_error(vma: VMA, access: Access) -> bool:
    """access_error() (arch/x86/mm/fault.c) and its twins on the other arches."""
    if access & Access.W:
        return not vma.flags & VM_WRITE
    if access & Access.X:
        return not vma.flags & VM_EXEC
    return not vma.flags & (VM_READ | VM_WRITE | VM_EXEC)


async def do_user_addr_fault(k, mm: MMStruct, addr: int, access: Access) -> FaultResult:
    """do_user_addr_fault() (x86; do_page_fault() on arm64/s390/powerpc): find the VMA
    under mmap_read_lock, check the access, grow the stack, handle_mm_fault()."""
    k.stats["faults"] += 1
    await mmap_read_lock(mm)
    try:
        vma = mm.find_vma(addr)
        if vma is not None and vma.start > addr:
            if vma.flags & VM_GROWSDOWN and vma.start - addr <= STACK_GUARD_GAP * 64:
                vma.start = addr & ~(PAGE_SIZE - 1)     # expand_stack()
            else:
                vma = None
        if vma is None:
            return FaultResult.SEGV_MAPERR
        if access_error(vma, access):
            return FaultResult.SEGV_ACCERR
        flags = FAULT_FLAG_USER
        if access & Access.W:
            flags |= FAULT_FLAG_WRITE
        if access & Access.X:
            flags |= FAULT_FLAG_INSTRUCTION
        ret = await handle_mm_fault(k, vma, addr, flags)
    finally:
        await mmap_read_unlock(mm)
    if ret & VM_FAULT_OOM:
        return FaultResult.OOM
    if ret & VM_FAULT_SIGBUS:
        return FaultResult.SIGBUS
    if ret & VM_FAULT_SIGSEGV:
        return FaultResult.SEGV_ACCERR
    return FaultResult.OK


async def handle_mm_fault(k, vma: VMA, addr: int, flags: int) -> int:
    """handle_mm_fault() -> __handle_mm_fault(): allocate the upper tables, then the PTE level."""
    mm = vma.mm
    try:
        pmdp = await pgtable.walk_alloc(k, mm, addr, k.arch.pmd_level)
    except OutOfMemory:
        return VM_FAULT_OOM
    if pmdp is None:
        return VM_FAULT_SIGBUS        # a leaf above the PMD: hugetlb-style mappings are not modelled
    pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
    if pmdval.kind is Kind.LEAF:
        return VM_FAULT_SIGBUS        # PMD-mapped THP faults arrive with huge_memory.py
    return await handle_pte_fault(k, vma, addr, flags, pmdp)


async def handle_pte_fault(k, vma: VMA, addr: int, flags: int, pmdp: int) -> int:
    """handle_pte_fault(): map without the lock, then revalidate with pte_same under ptl.
    A map failure is FAULT-RETRY: return 0 and let the access fault again."""
    mm, arch = vma.mm, k.arch
    pte_level = arch.pte_level
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    ptep = None
    if pmdval.kind is not Kind.NONE:
        mapped = await pgtable.pte_offset_map_nolock(k, mm, pmdp, addr)
        if mapped is None:
            return 0
        ptep, ptl, _ = mapped
        orig = await pgtable.get_raw(k, ptep)
        entry = arch.decode(pte_level, orig)
        if entry.kind is Kind.NONE:
            ptep = None
    if ptep is None:
        if vma.anonymous:
            return await do_anonymous_page(k, vma, addr, flags, pmdp)
        return VM_FAULT_SIGBUS        # file-backed faults arrive with filemap.py
    if entry.kind is not Kind.LEAF:
        return VM_FAULT_SIGBUS        # swap and migration entries: do_swap_page (swapfile.py)
    await traps.lock(ptl)
    if await pgtable.get_raw(k, ptep) != orig:
        await traps.unlock(ptl)
        return 0                      # someone else changed it: the access retries
    if flags & FAULT_FLAG_WRITE:
        if not entry.prot & Access.W:
            return await do_wp_page(k, vma, addr, ptep, ptl, entry)
        entry = entry.with_(dirty=True)
    new = entry.with_(young=True)
    if arch.encode(pte_level, new) != orig:
        # ptep_set_access_flags(): only ever adds young/dirty, no flush needed
        await pgtable.set_entry(k, ptep, pte_level, new)
    await traps.unlock(ptl)
    return 0


async def do_anonymous_page(k, vma: VMA, addr: int, flags: int, pmdp: int) -> int:
    """do_anonymous_page(): the zero page for a read, a fresh zeroed page for a write.
    pte_alloc() is called separately so OOM is told apart from a map failure."""
    mm, arch = vma.mm, k.arch
    addr &= ~(PAGE_SIZE - 1)
    if not await pgtable.pte_alloc(k, mm, pmdp):
        return VM_FAULT_OOM
    prot = vm_get_page_prot(vma.flags)
    page = None
    if not flags & FAULT_FLAG_WRITE:
        entry = leaf_entry(k.zero_page.paddr, prot & ~Access.W, special=True, young=True)
    else:
        try:
            page = k.alloc.alloc_pages(0, PageUse.ANON, owner=mm)
        except OutOfMemory:
            return VM_FAULT_OOM
        if vma.flags & VM_WRITE:
            prot |= Access.W
        entry = leaf_entry(page.paddr, prot, young=True, dirty=True)
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        if page is not None:
            k.alloc.free_pages(page)
        return 0
    ptep, ptl = locked
    if (await pgtable.get_entry(k, ptep, arch.pte_level)).kind is not Kind.NONE:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        if page is not None:
            k.alloc.free_pages(page)
        return 0
    if page is not None:
        page.mapcount = 1
        mm.rss[MM_ANONPAGES] += 1
        k.stats["anon_pages_faulted"] += 1
    else:
        k.stats["zero_page_mapped"] += 1
    await pgtable.set_entry(k, ptep, arch.pte_level, entry)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


async def do_wp_page(k, vma: VMA, addr: int, ptep: int, ptl, entry: Entry) -> int:
    """do_wp_page(): called with ptl held on a write to a present, write-protected PTE;
    returns with it released. An exclusive anon page is reused in place; the zero page or
    a shared page is copied."""
    arch = k.arch
    addr &= ~(PAGE_SIZE - 1)
    page = None if entry.special else k.alloc.page_of(entry.paddr)
    if page is not None and page.use is PageUse.ANON and page.refcount == 1:
        # wp_page_reuse()
        k.stats["wp_reuse"] += 1
        await pgtable.set_entry(k, ptep, arch.pte_level,
                                entry.with_(prot=entry.prot | Access.W, dirty=True, young=True))
        await traps.unlock(ptl)
        return 0
    return await wp_page_copy(k, vma, addr, ptep, ptl, entry, page)


async def wp_page_copy(k, vma: VMA, addr: int, ptep: int, ptl, orig: Entry, old_page) -> int:
    """wp_page_copy(): copy into a new page and replace the PTE (ptep_clear_flush),
    rechecking pte_same after the allocation. Called with ptl held; releases it."""
    mm, arch = vma.mm, k.arch
    orig_raw = arch.encode(arch.pte_level, orig)
    try:
        new_page = k.alloc.alloc_pages(0, PageUse.ANON, owner=mm, zero=orig.special)
    except OutOfMemory:
        await traps.unlock(ptl)
        return VM_FAULT_OOM
    if not orig.special:
        k.physmem.copy(new_page.paddr, orig.paddr)
    if await pgtable.get_raw(k, ptep) != orig_raw:
        await traps.unlock(ptl)
        k.alloc.free_pages(new_page)
        return 0
    prot = vm_get_page_prot(vma.flags) | Access.W
    new_page.mapcount = 1
    await pgtable.set_entry(k, ptep, arch.pte_level, leaf_entry(new_page.paddr, prot, young=True, dirty=True))
    k.flush_tlb_range(mm, addr, addr + PAGE_SIZE)
    if old_page is not None:
        _put_mapped_page(k, mm, old_page)
    else:
        mm.rss[MM_ANONPAGES] += 1          # the zero page was never counted
    k.stats["wp_copy"] += 1
    await traps.unlock(ptl)
    return 0


def _put_mapped_page(k, mm: MMStruct, page) -> None:
    """page_remove_rmap() + put_page(): drop one mapping and one reference."""
    page.mapcount -= 1
    page.refcount -= 1
    if page.use is PageUse.ANON:
        mm.rss[MM_ANONPAGES] -= 1
    if page.refcount == 0:
        k.alloc.free_pages(page)


# -- tearing down ------------------------------------------------------------------------------

async def for_each_pmd(k, mm: MMStruct, start: int, end: int):
    """Yield (pmdp, pmd_start, pmd_end) for every PMD entry slot reached by present tables."""
    arch = k.arch

    async def down(table: int, level: int, lo: int, hi: int):
        lv = arch.levels[level]
        addr = lo
        while addr < hi:
            nxt = min(hi, (addr | (lv.span - 1)) + 1)
            entp = pgtable.entry_addr(k, table, level, addr)
            if level == arch.pmd_level:
                yield entp, addr, nxt
            else:
                ent = await pgtable.get_entry(k, entp, level)
                if ent.kind is Kind.TABLE:
                    async for item in down(ent.paddr, level + 1, addr, nxt):
                        yield item
            addr = nxt

    async for item in down(mm.pgd, 0, start, end):
        yield item


async def zap_pte_range(k, mm: MMStruct, pmdp: int, start: int, end: int) -> None:
    """zap_pte_range(): clear every PTE in [start, end) under ptl and drop the pages.
    A failed map retries the same pmd (RETRY); a pmd that is none has nothing to zap."""
    arch = k.arch
    while True:
        locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, start)
        if locked is not None:
            break
        pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        if pmdval.kind in (Kind.NONE, Kind.BAD):
            return
        if pmdval.kind is Kind.LEAF:
            return                    # zap_huge_pmd() arrives with huge_memory.py
        await sched_point("retry", pmdp)
    ptep, ptl = locked
    addr = start
    while addr < end:
        entp = ptep + (((addr - start) >> arch.page_shift) * 8)
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, entp))
        if ent.kind is Kind.LEAF:
            await pgtable.clear_entry(k, entp, arch.pte_level)
            page = None if ent.special else k.alloc.page_of(ent.paddr)
            if page is not None:
                _put_mapped_page(k, mm, page)
            k.stats["ptes_zapped"] += 1
        elif ent.kind is not Kind.NONE:
            await pgtable.clear_entry(k, entp, arch.pte_level)
        addr += PAGE_SIZE
    await pgtable.pte_unmap_unlock(k, ptep, ptl)


async def unmap_page_range(k, mm: MMStruct, start: int, end: int) -> None:
    """unmap_page_range() -> zap_pmd_range() -> zap_pte_range(), then flush the TLBs."""
    async for pmdp, lo, hi in for_each_pmd(k, mm, start, end):
        pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
        if pmdval.kind is Kind.NONE:
            continue
        await zap_pte_range(k, mm, pmdp, lo, hi)
    k.flush_tlb_range(mm, start, end)


async def free_pgtables(k, mm: MMStruct, start: int, end: int) -> None:
    """free_pgtables() / free_pgd_range(): free every table below the root whose whole VA
    span is now outside any VMA (the floor/ceiling rule), clearing its parent entry."""
    arch = k.arch

    async def down(table: int, level: int, lo: int, hi: int) -> None:
        lv = arch.levels[level]
        addr = lo
        while addr < hi:
            base = addr & ~(lv.span - 1)
            nxt = min(hi, base + lv.span)
            entp = pgtable.entry_addr(k, table, level, addr)
            ent = await pgtable.get_entry(k, entp, level)
            if ent.kind is Kind.TABLE:
                unused = not mm.overlapping(base, base + lv.span)
                if level + 1 < arch.pte_level:     # a table about to go must be emptied whole
                    await down(ent.paddr, level + 1, *((base, base + lv.span) if unused else (addr, nxt)))
                if unused:
                    child = k.ptdescs[ent.paddr]
                    await pgtable.clear_entry(k, entp, level)
                    pgtable.free_table(k, child)
            addr = nxt

    await down(mm.pgd, 0, start, end)


async def exit_mmap(k, mm: MMStruct) -> None:
    """exit_mmap(): unmap every VMA, free every table and the root, then check_mm()."""
    for vma in list(mm.vmas):
        await unmap_page_range(k, mm, vma.start, vma.end)
    spans = [(v.start, v.end) for v in mm.vmas]
    mm.vmas.clear()
    for lo, hi in spans:
        await free_pgtables(k, mm, lo, hi)
    root = k.ptdescs.get(mm.pgd)
    if root is not None:
        pgtable.free_table(k, root)
    mm.dead = True
    check_mm(k, mm)


def check_mm(k, mm: MMStruct) -> None:
    """check_mm() (kernel/fork.c) plus a leak audit of the page allocator: any rss
    counter not back at zero, page-table bytes left, or page still owned by the mm."""
    problems = [f"BUG: Bad rss-counter state mm:{mm.id} type:{RSS_NAMES[i]} val:{v}"
                for i, v in enumerate(mm.rss) if v]
    if mm.pgtables_bytes:
        problems.append(f"BUG: non-zero pgtables_bytes on freeing mm: {mm.pgtables_bytes}")
    leaked = k.alloc.owned_by(mm)
    if leaked:
        kinds = sorted({p.use.value for p in leaked})
        problems.append(f"BUG: {len(leaked)} page block(s) still owned by mm {mm.id} ({', '.join(kinds)})")
    leaked_tables = [pt for pt in k.ptdescs.values() if pt.mm is mm]
    if leaked_tables:
        problems.append(f"BUG: {len(leaked_tables)} page table(s) of mm {mm.id} never freed")
    if problems:
        raise CheckMMError("; ".join(problems))
