"""The page allocator: a buddy allocator over guest RAM with struct-page state.

Models ``mm/page_alloc.c`` closely enough for the rest of mm_core: ``alloc_pages`` /
``__free_pages`` by order, per-page state (what the page is used for, refcount,
mapcount, owning mm) and poisoning of freed memory, so that a stale mapping of a freed
page reads garbage instead of plausible data.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from emu.arch import PAGE_SHIFT, PAGE_SIZE
from emu.physmem import PhysMem
from emu.sched import footprint

MAX_ORDER = 10
PAGE_POISON = 0x6B          # the byte a freed page is filled with (mm/debug: PAGE_POISON_PATTERN-like)
QUARANTINE_BLOCKS = 32      # freed page-table blocks held back before reuse (KASAN quarantine)


class PageUse(enum.Enum):
    ANON = "anon"
    PAGETABLE = "pagetable"
    ZERO = "zero"            # the shared zero page
    KERNEL = "kernel"        # emu's own: sentinel code page, ...
    FILE = "file"
    SHMEM = "shmem"

    # members are singletons: hash by identity, a C slot (Enum.__hash__ is Python code, and
    # the allocator's counters and mm_counter() hash a use on every allocation and free)
    __hash__ = object.__hash__


class OutOfMemory(Exception):
    """No free block of the requested order (the guest's -ENOMEM / OOM)."""


@dataclass(eq=False, slots=True)
class Page:
    """struct page / struct folio head: state of one allocated block of 2^order pages."""

    pfn: int
    order: int
    use: PageUse
    owner: object = None            # the mm (or file) that allocated it, for the leak audit
    refcount: int = 1
    mapcount: int = 0
    private: object = None          # ptdesc for page tables, ...
    mapping: object = None          # page cache: the address_space and index
    index: int = 0
    locked: bool = False            # PG_locked (folio_lock)
    extra: dict = field(default_factory=dict)

    @property
    def paddr(self) -> int:
        return self.pfn << PAGE_SHIFT

    @property
    def nr_pages(self) -> int:
        return 1 << self.order


class PageAllocator:
    """Buddy allocator over ``physmem``; pfn 0 is never handed out (a pfn of 0 in a table
    entry is always a bug)."""

    def __init__(self, physmem: PhysMem, poison: bool = True) -> None:
        self.physmem = physmem
        self.poison = poison
        self.free_area: list[set[int]] = [set() for _ in range(MAX_ORDER + 1)]
        self.pages: dict[int, Page] = {}       # head pfn -> Page, allocated blocks only
        self.nr_free = 0
        self.allocated = {use: 0 for use in PageUse}   # pages (not blocks) handed out, by use
        self.freed = {use: 0 for use in PageUse}
        self.failures = 0                       # allocations that found no memory (the OOM path)
        # freed page-table blocks stay poisoned and unused for a while, so a stale access
        # finds poison (and the sanitizer finds it freed) rather than a reused page
        self.quarantine: list[tuple[int, int]] = []
        # frames never handed out are still zero (fresh anonymous host memory): zeroing
        # them again would only fault the host pages in
        self.used = bytearray(physmem.nr_pages)
        self.on_free = None                        # sanitizer hook: called with each freed block
        pfn, end = 1, physmem.nr_pages
        while pfn < end:
            order = MAX_ORDER
            while order and (pfn & ((1 << order) - 1) or pfn + (1 << order) > end):
                order -= 1
            self.free_area[order].add(pfn)
            self.nr_free += 1 << order
            pfn += 1 << order

    def alloc_pages(self, order: int, use: PageUse, owner: object = None, zero: bool = True,
                    pfn_range: tuple[int, int] | None = None) -> Page:
        """alloc_pages(gfp, order): the lowest free block of 2^order pages; ``pfn_range``
        (one NUMA node's frames, __alloc_pages_node() without fallback) limits the search."""
        footprint.touch(footprint.ALLOC)
        for o in range(order, MAX_ORDER + 1):
            area = self.free_area[o]
            if pfn_range is not None:
                lo, hi = pfn_range
                area = {p for p in area if lo <= p and p + (1 << o) <= hi}
            if area:
                pfn = min(area)                   # lowest first: deterministic layouts
                self.free_area[o].discard(pfn)
                break
        else:
            if self.quarantine:                   # out of memory: give the quarantine back first
                while self.quarantine:
                    self._merge_free(*self.quarantine.pop(0))
                return self.alloc_pages(order, use, owner, zero, pfn_range)
            self.failures += 1
            raise OutOfMemory(f"out of guest memory allocating an order-{order} block")
        while o > order:                          # split, returning the upper halves
            o -= 1
            self.free_area[o].add(pfn + (1 << o))
        page = Page(pfn, order, use, owner)
        self.pages[pfn] = page
        self.nr_free -= 1 << order
        self.allocated[use] += 1 << order
        n = 1 << order
        if zero and self.used.find(1, pfn, pfn + n) != -1:
            self.physmem.zero(pfn << PAGE_SHIFT, PAGE_SIZE << order)
        self.used[pfn:pfn + n] = b"\x01" * n
        return page

    def free_pages(self, page: Page) -> None:
        """__free_pages(): poison, then merge with free buddies."""
        footprint.touch(footprint.ALLOC)
        if self.pages.get(page.pfn) is not page:
            raise RuntimeError(f"freeing pfn {page.pfn:#x} that is not allocated (double free?)")
        if self.on_free is not None:
            self.on_free(page)
        del self.pages[page.pfn]
        self.nr_free += page.nr_pages
        self.freed[page.use] += page.nr_pages
        if self.poison:
            self.physmem.fill(page.paddr, PAGE_SIZE << page.order, PAGE_POISON)
        if page.use is PageUse.PAGETABLE and QUARANTINE_BLOCKS:
            self.quarantine.append((page.pfn, page.order))
            if len(self.quarantine) <= QUARANTINE_BLOCKS:
                return
            self._merge_free(*self.quarantine.pop(0))
            return
        self._merge_free(page.pfn, page.order)

    def _merge_free(self, pfn: int, order: int) -> None:
        """Return a block to the free lists, merging with free buddies."""
        while order < MAX_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy not in self.free_area[order]:
                break
            self.free_area[order].discard(buddy)
            pfn &= ~(1 << order)
            order += 1
        self.free_area[order].add(pfn)

    def page_of(self, paddr: int) -> Page | None:
        """The allocated block containing ``paddr`` (pfn_to_page + compound_head)."""
        pfn = paddr >> PAGE_SHIFT
        page = self.pages.get(pfn)
        if page is not None:
            return page
        for order in range(1, MAX_ORDER + 1):
            head = self.pages.get(pfn & ~((1 << order) - 1))
            if head is not None and head.order >= order:
                return head
        return None

    def owned_by(self, owner: object) -> list[Page]:
        return [p for p in self.pages.values() if p.owner is owner]
