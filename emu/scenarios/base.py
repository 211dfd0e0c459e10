"""The scenario registry and the worlds and tasks the scenarios share: a shmem file whose page
cache holds one PMD-order folio, mapped with its (empty) PTE table still there
(collapsed_shmem), the end of collapse_file() (collapse_file_tail), faults and walkers
that race it, an anonymous THP under migration.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import emu
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, pgtable, shmem
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.page_alloc import PageUse
from mm_core.sanitizers import Finding

BASE = 0x40000000


@dataclass
class World:
    """What a scenario built, for its tasks, its checks and the teardown."""

    mms: list = field(default_factory=list)
    files: list = field(default_factory=list)
    addr: int = 0
    pmdp: int = 0
    inode: object = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    description: str
    build: Callable[[Scenario], World]
    catches: tuple[str, ...] = ()       # injectable bugs this scenario is meant to find
    mem: str = "8M"
    cpus: int = 1
    quantum: int = 20000
    max_steps: int = 20000
    prefault: bool = False          # guest programs want prefaulted RAM; kernel tasks don't
    kernel: str = "6.6"             # the profile it runs under unless told otherwise (emu explore
                                    # without --kernel; a 6.14 PT_RECLAIM race needs 6.14)

    @property
    def guest(self) -> bool:
        """Does it run a guest program (vCPUs, prefaulted RAM) rather than kernel tasks?"""
        return self.prefault or self.cpus > 1


SCENARIOS: dict[str, ScenarioSpec] = {}


def scenario(name: str, description: str, catches: tuple[str, ...] = (), **settings):
    def register(build: Callable[[Scenario], World]) -> Callable[[Scenario], World]:
        SCENARIOS[name] = ScenarioSpec(name, description, build, catches, **settings)
        return build
    return register


# -- shared world --------------------------------------------------------------------------


def collapsed_shmem(sc: Scenario, private: bool = False, locked: bool = True, extra_pages: int = 0) -> World:
    """A PMD-order folio in a shmem file's page cache; the file mapped at BASE with an
    empty PTE table still in place (collapse_file() has unmapped the small pages). With
    ``locked`` the folio is still locked, as collapse_file() holds it across
    retract_page_tables(); ``collapse_file_tail`` unlocks it. ``extra_pages`` makes the
    file and the mapping that many pages longer than the collapsed PMD range."""
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    inode = m.memfd_create("race", size + extra_pages * k.page_size)
    folio = k.alloc.alloc_pages(huge_memory.hpage_pmd_order(k), PageUse.SHMEM, owner=inode.mapping)
    write_file_data(k, folio.paddr, size)
    shmem.add_to_page_cache(inode.mapping, folio, 0)
    folio.locked = locked
    mm = m.new_mm()
    flags = (emu.MAP_PRIVATE if private else emu.MAP_SHARED) | emu.MAP_FIXED
    length = size + extra_pages * k.page_size
    addr = m.mmap(mm, BASE, length, emu.PROT_READ | emu.PROT_WRITE, flags, file=inode)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, addr, k.arch.pmd_level))
    run_sync(pgtable.pte_alloc(k, mm, pmdp))
    return World([mm], [inode], addr, pmdp, inode, {"folio": folio})


@functools.cache
def file_data(size: int) -> bytes:
    """Recognisable file contents: every 8K, the 4K-page number + 1 as a little-endian
    u64 (a THP misread as a page table shows up as small bogus entries)."""
    data = bytearray(size)
    for i in range(0, size, 8 << 10):
        data[i:i + 8] = (i // 4096 + 1).to_bytes(8, "little")
    return bytes(data)


def write_file_data(k, paddr: int, size: int) -> None:
    """file_data(size) at ``paddr``, into a block fresh from alloc_pages() (zeroed): only
    its non-zero words are written (one strided copy instead of 2 MiB)."""
    k.physmem.scatter(paddr, 8 << 10, _file_words(size), 8)


@functools.cache
def _file_words(size: int) -> bytes:
    """The non-zero u64 words of file_data(size), one every 8K."""
    return b"".join((i // 4096 + 1).to_bytes(8, "little") for i in range(0, size, 8 << 10))


async def collapse_file_tail(k, w: World):
    """The end of collapse_file(): retract the page tables, then unlock the huge folio."""
    n = await khugepaged.retract_page_tables(k, w.inode.mapping, 0)
    shmem.folio_unlock(w.extra["folio"])
    return n


# -- tasks ---------------------------------------------------------------------------------


async def lockless_reader(k, mm, pmdp: int, addr: int, reads: int = 4):
    """A /proc/PID/pagemap-style walker: pte_offset_map() without the ptl, peek, unmap.
    Oracle: a table it mapped holds only empty entries (the file's pages are unmapped)."""
    await mmap_read_lock(mm)
    try:
        ptep = await pgtable.pte_offset_map(k, pmdp, addr)
        if ptep is None:
            return "no table"
        empty = k.arch.empty_value(k.arch.pte_level)
        for i in range(reads):
            value = await pgtable.get_raw(k, ptep + 8 * i)
            if value != empty:
                await pgtable.pte_unmap(k, ptep)
                raise Finding("ORACLE", f"ORACLE: lockless_reader saw {value:#x} in an empty table",
                              "ORACLE:lockless_reader", [f"  entry {i} at {ptep + 8 * i:#x}"])
        await pgtable.pte_unmap(k, ptep)
        return "read"
    finally:
        await mmap_read_unlock(mm)


async def locked_collapse(k, mm, addr: int):
    await mmap_read_lock(mm)
    try:
        return (await khugepaged.collapse_pte_mapped_thp(k, mm, addr, install_pmd=True)).value
    finally:
        await mmap_read_unlock(mm)


async def madvise_collapse_tail(k, w: World):
    """The end of MADV_COLLAPSE on the shmem range: collapse_file() retracts the PTE table
    and unlocks the huge folio, then madvise_collapse() maps the folio in the caller's mm
    (collapse_pte_mapped_thp(install_pmd=true) under mmap_read_lock): the collapser itself
    takes the pmd TABLE -> NONE -> HUGE."""
    await collapse_file_tail(k, w)
    mm = w.mms[0]
    await mmap_read_lock(mm)
    try:
        return (await khugepaged.collapse_pte_mapped_thp(k, mm, w.addr, install_pmd=True)).value
    finally:
        await mmap_read_unlock(mm)


async def read_fault(k, w: World, addr: int):
    """A read fault on the file mapping under mmap_read_lock: do_read_fault() maps what
    the page cache has around it (filemap_map_pages() under pte_offset_map_lock()), then
    finish_fault() installs the pte, or the whole PMD-order folio by one PMD
    (do_set_pmd) once the pmd is none and the folio unlocked."""
    from mm_core.memory import handle_mm_fault
    mm = w.mms[0]
    await mmap_read_lock(mm)
    try:
        return await handle_mm_fault(k, mm.vma_lookup(addr), addr, 0)
    finally:
        await mmap_read_unlock(mm)


def huge_refault(k, w: World):
    """The refault at the start of the mapping that turns a retracted pmd huge: the
    TABLE -> NONE -> HUGE sequence of spec §6 case 5."""
    return read_fault(k, w, w.addr)


def anon_thp(m, mm=None, addr: int = BASE):
    """One anonymous THP mapped by a PMD at ``addr`` (MADV_HUGEPAGE, then a write fault)
    in ``mm`` (a new mm by default). Returns (mm, addr, the THP's physical address)."""
    size = huge_memory.hpage_pmd_size(m.kernel)
    mm = mm or m.new_mm()
    a = m.mmap(mm, addr, size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    return mm, a, m.touch(mm, a, write=True)


def thp_under_migration(sc: Scenario):
    """An anonymous THP at BASE and a "migrate" task that turns its pmd into a migration
    entry for a long while (migrate_pages() copying the folio). Returns (mm, addr, pmdp)."""
    from mm_core.sched_helpers import stalled_thp_migration
    k = sc.kernel
    mm, a, _ = anon_thp(sc.machine)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    return mm, a, pmdp


async def completing(coro, done):
    """Run ``coro``, then complete ``done`` (whatever happens)."""
    try:
        return await coro
    finally:
        done.complete()
