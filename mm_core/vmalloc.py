"""vmalloc (mm/vmalloc.c) on init_mm's kernel page tables, reduced to what its walkers need.

    vmalloc()          pages mapped at a vmalloc address with PAGE_KERNEL ptes (or one
                       PMD leaf per PMD_SIZE for a huge mapping, as vmalloc_huge() makes),
                       the kernel tables allocated as needed (__pte_alloc_kernel)
    vfree()            the ptes cleared (vunmap_range), the pages freed; kernel page tables
                       are never freed (nor retracted: nothing here ever clears a pmd of
                       init_mm)
    vmalloc_to_page()  the lockless walk down init_mm's tables: none is NULL, a leaf at
                       any level gives its page, a bad entry WARNs and gives NULL, and the
                       PTE table is reached with pte_offset_kernel(): no validation, no
                       RCU, no unmap, and so no failure to handle (a kernel table is never
                       retracted)

init_mm here has its own table tree, apart from every user mm (as on s390x, arm64's TTBR1
or powerpc's kernel quadrant; x86 shares the kernel half of every pgd, which is not
modelled). The vmalloc area starts at the upper half of the root table's reach. Not
modelled: vmap_area trees, guard pages beyond one unmapped page between areas, lazy
purging, KASAN shadow, vmalloc_sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import Access, Kind, leaf_entry
from mm_core import pgtable
from mm_core.mm import MMStruct
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.tlbflush import flush_tlb_range


@dataclass
class VmArea:
    """struct vm_struct: one vmalloc area."""

    addr: int
    size: int
    pages: list = field(default_factory=list)
    huge: bool = False


def VMALLOC_START(k) -> int:  # noqa: N802 - the kernel's name
    top = k.arch.levels[0]
    return 1 << (top.shift + top.index_bits - 1)


def get_init_mm(k) -> MMStruct:
    """init_mm: the kernel's address space (created on first use)."""
    if k.init_mm is None:
        mm = MMStruct(k, 0, id=-1)
        mm.mmap_lock.name, mm.page_table_lock.name = "init_mm.mmap_lock", "init_mm.page_table_lock"
        mm.pgd = pgtable.alloc_table(k, mm, 0).paddr
        mm.vm_areas = {}                       # addr -> VmArea
        mm.vmalloc_next = VMALLOC_START(k)
        k.init_mm = mm
    return k.init_mm


async def vmalloc(k, size: int, huge: bool = False) -> int:
    """vmalloc(size) / vmalloc_huge(size): 0 on failure, else the kernel address."""
    mm = get_init_mm(k)
    arch = k.arch
    unit = arch.levels[arch.pmd_level].span if huge else k.page_size
    size = (size + unit - 1) & ~(unit - 1)
    addr = (mm.vmalloc_next + unit - 1) & ~(unit - 1)
    area = VmArea(addr, size, huge=huge)
    order = (unit >> 12).bit_length() - 1
    try:
        for off in range(0, size, unit):
            page = k.alloc.alloc_pages(order, PageUse.KERNEL, owner=None)
            area.pages.append(page)
            level = arch.pmd_level if huge else arch.pte_level
            entp = await pgtable.walk_alloc(k, mm, addr + off, level)   # __pte_alloc_kernel()
            await pgtable.set_entry(k, entp, level, leaf_entry(page.paddr, Access.RW, user=False,
                                                              young=True, dirty=True))  # PAGE_KERNEL
    except OutOfMemory:
        await _unmap(k, mm, area)
        return 0
    mm.vm_areas[addr] = area
    mm.vmalloc_next = addr + size + k.page_size                # a guard page between areas
    k.stats["vmalloc_areas"] += 1
    return addr


async def _unmap(k, mm, area: VmArea) -> None:
    arch = k.arch
    unit = arch.levels[arch.pmd_level].span if area.huge else k.page_size
    level = arch.pmd_level if area.huge else arch.pte_level
    for i in range(len(area.pages)):
        entp = await _entry_of(k, mm, area.addr + i * unit, level)
        if entp is not None:
            await pgtable.clear_entry(k, entp, level)          # vunmap_range()
    await flush_tlb_range(k, mm, area.addr, area.addr + area.size)   # flush_tlb_kernel_range()
    for page in area.pages:
        k.alloc.free_pages(page)


async def _entry_of(k, mm, addr: int, target: int) -> int | None:
    """The entry pointer at level ``target`` for ``addr``, without allocating."""
    table = mm.pgd
    for level in range(target):
        ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, addr), level)
        if ent.kind is not Kind.TABLE:
            return None
        table = ent.paddr
    return pgtable.entry_addr(k, table, target, addr)


async def vfree(k, addr: int) -> None:
    """vfree(): unmap the area and free its pages; the tables stay."""
    mm = get_init_mm(k)
    area = mm.vm_areas.pop(addr)
    await _unmap(k, mm, area)


async def vmalloc_to_pfn(k, addr: int) -> int | None:
    """vmalloc_to_page() as a pfn (base pages): None where nothing is mapped."""
    mm = get_init_mm(k)
    arch = k.arch
    table = mm.pgd
    for level in range(arch.pmd_level + 1):                   # pgd, p4d, pud, pmd
        ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, addr), level)
        if ent.kind is Kind.NONE:
            return None
        if ent.kind is Kind.LEAF:                             # p?d_leaf(): p?d_page() + index
            span = arch.levels[level].span
            return (ent.paddr + (addr & (span - 1))) >> k.page_shift
        if ent.kind is not Kind.TABLE:                        # WARN_ON_ONCE(p?d_bad())
            k.printk(f"WARNING: vmalloc_to_page: bad {arch.levels[level].name} for {addr:#x}")
            return None
        if level == arch.pmd_level:
            ptep = pgtable.pte_offset_kernel(k, ent, addr)    # no failure, no unmap
            pte = await pgtable.get_entry(k, ptep, arch.pte_level)
            if pte.kind is not Kind.LEAF:                     # !pte_present()
                return None
            return pte.paddr >> k.page_shift
        table = ent.paddr
    return None


async def vmalloc_to_page(k, addr: int):
    """vmalloc_to_page(): the page block (struct page's folio here) mapped at ``addr``."""
    pfn = await vmalloc_to_pfn(k, addr)
    return None if pfn is None else k.alloc.page_of(pfn << k.page_shift)
