"""shmem / memfd (mm/shmem.c) with a page cache of small and PMD-order folios
(mm/filemap.c's address_space), the file rmap (i_mmap) and truncation."""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import PAGE_SHIFT
from emu.sched import traps
from mm_core.locks import RwSemaphore, WaitQueue
from mm_core.page_alloc import OutOfMemory, Page, PageUse


@dataclass(eq=False)
class AddressSpace:
    """struct address_space: the page cache and the file's reverse map."""

    host: ShmemInode
    i_pages: dict[int, Page] = field(default_factory=dict)   # index -> folio (a huge folio at
                                                             # every index it covers)
    i_mmap: list = field(default_factory=list)               # VMAs mapping the file

    def __post_init__(self) -> None:
        self.i_mmap_rwsem = RwSemaphore(f"i_mmap@{self.host.ino}", "i_mmap_rwsem")

    @property
    def nrpages(self) -> int:
        return len(self.i_pages)

    def folios(self) -> list[Page]:
        seen, out = set(), []
        for f in self.i_pages.values():
            if id(f) not in seen:
                seen.add(id(f))
                out.append(f)
        return out


@dataclass(eq=False)
class ShmemInode:
    """A shmem inode (what memfd_create returns a file for)."""

    name: str
    page_shift: int = PAGE_SHIFT      # the kernel's base page (4K, or 64K on ppc64-64K)
    size: int = 0
    ino: int = 0
    refs: int = 0                    # open files + mapping VMAs
    mapping: AddressSpace = None     # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mapping = AddressSpace(self)
        self.folio_wait = WaitQueue(f"folio_wait@{self.ino}")

    def __repr__(self) -> str:
        return f"<shmem {self.name!r} ino {self.ino} size {self.size:#x}>"


def memfd_create(k, name: str) -> ShmemInode:
    inode = ShmemInode(name, k.page_shift, ino=k.next_id("ino"))
    k.stats["memfd_created"] += 1
    return inode


def folio_page_paddr(folio: Page, index: int) -> int:
    """folio_page(): the physical address of page ``index`` of the file inside ``folio``."""
    return folio.paddr + ((index - folio.index) << folio.mapping.host.page_shift)


def filemap_get_folio(mapping: AddressSpace, index: int) -> Page | None:
    return mapping.i_pages.get(index)


def add_to_page_cache(mapping: AddressSpace, folio: Page, index: int) -> None:
    """filemap_add_folio(): the cache holds one reference on the folio."""
    folio.mapping, folio.index = mapping, index
    for i in range(index, index + folio_nr_pages(folio, mapping)):
        mapping.i_pages[i] = folio


def folio_nr_pages(folio: Page, mapping: AddressSpace) -> int:
    """folio_nr_pages(): base pages in the folio (a base page may be several 4K frames)."""
    return max(1, folio.nr_pages >> (mapping.host.page_shift - PAGE_SHIFT))


def delete_from_page_cache(k, folio: Page) -> None:
    mapping = folio.mapping
    for i in range(folio.index, folio.index + folio_nr_pages(folio, mapping)):
        if mapping.i_pages.get(i) is folio:
            del mapping.i_pages[i]
    folio.mapping = None
    folio.refcount -= 1
    if folio.refcount == 0:
        k.alloc.free_pages(folio)


class _FolioLock:
    """PG_locked as a scheduler resource: a waiter sleeps (is not runnable) until the bit
    is clear, then takes it."""

    __slots__ = ("folio",)
    cls = "folio_lock"
    sleeps = True

    def __init__(self, folio: Page) -> None:
        self.folio = folio

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        if self.folio.locked:
            return False
        self.folio.locked = True
        return True

    def __repr__(self) -> str:
        return f"<folio lock pfn {self.folio.pfn:#x}>"


async def folio_lock(k, folio: Page) -> None:
    """folio_lock(): sleep until PG_locked is clear, then take it."""
    await traps.wait(_FolioLock(folio))


async def folio_trylock(k, folio: Page) -> bool:
    """folio_trylock(): test_and_set PG_locked, never sleeping (an atomic: one scheduling
    point before it)."""
    await traps.sched_point("folio_trylock", folio.pfn)
    if folio.locked:
        return False
    folio.locked = True
    return True


def folio_unlock(folio: Page) -> None:
    folio.locked = False


async def shmem_get_folio(k, inode: ShmemInode, index: int) -> Page | None:
    """shmem_get_folio(SGP_CACHE): find the folio for ``index``, allocating a zeroed
    small folio for a hole inside i_size. None beyond EOF."""
    if index << inode.page_shift >= inode.size:
        return None
    folio = filemap_get_folio(inode.mapping, index)
    if folio is None:
        try:
            folio = k.alloc.alloc_pages(k.page_order, PageUse.SHMEM, owner=inode.mapping)
        except OutOfMemory:
            return None
        await traps.sched_point("page_cache_insert", (inode.ino, index))
        raced = filemap_get_folio(inode.mapping, index)
        if raced is not None:
            k.alloc.free_pages(folio)
            return raced
        add_to_page_cache(inode.mapping, folio, index)
        k.stats["shmem_pages_allocated"] += 1
    return folio


async def shmem_setattr_size(k, inode: ShmemInode, size: int) -> None:
    """ftruncate(): shrinking unmaps the tail from every mapping and drops it from the
    cache (truncate_pagecache); growing only moves i_size."""
    from mm_core.memory import unmap_mapping_range
    old = inode.size
    inode.size = size
    if size < old:
        first = (size + k.page_size - 1) >> k.page_shift
        await unmap_mapping_range(k, inode.mapping, first, (old + k.page_size - 1) >> k.page_shift)
        for folio in inode.mapping.folios():
            if folio.index + folio_nr_pages(folio, inode.mapping) > first:
                delete_from_page_cache(k, folio)


def iput(k, inode: ShmemInode) -> None:
    """Drop a reference; the last one frees the whole page cache (evict)."""
    inode.refs -= 1
    if inode.refs == 0:
        for folio in inode.mapping.folios():
            delete_from_page_cache(k, folio)
        k.stats["shmem_inodes_freed"] += 1
