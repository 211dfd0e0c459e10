"""The /proc/PID page-table walkers (fs/proc/task_mmu.c, Linux 6.6): smaps and
smaps_rollup, pagemap, clear_refs, numa_maps, and the PAGEMAP_SCAN ioctl (6.7+).

All of them are walk_page_range() users whose ``pmd_entry`` first tries
pmd_trans_huge_lock() (a huge pmd *or a swap/migration pmd* is handled whole under the
pmd lock) and otherwise maps the PTE table with pte_offset_map_lock(). The 6.5 series
(patch 09/32, "mm/pagewalkers: ACTION_AGAIN if pte_offset_map_lock() fails") answers a
failed map with ``walk->action = ACTION_AGAIN`` in every one of them: RETRY.
walk_pmd_range() then reads the pmd again; a pmd that became none is a ``pte_hole``, a
pmd that became huge or a migration entry is taken by pmd_trans_huge_lock() on the next
round. So, unlike DAMON's walker (whose lockless pmd_trans_huge() test lets a migration
pmd through to the map, retried forever until the 2025 fix), these retries end.

Source notes: the stored fs/proc/task_mmu.c of torvalds/linux is a 4.19-era file (no
fallible map); the 6.6 behaviour is from spec/kernel_mm.md section 2 (#09) and the 6.5
patch text, cross-checked against later task_mmu.c text (the ACTION_AGAIN blocks are
unchanged since 6.5) and the PAGEMAP_SCAN patch (v30, merged for 6.7).

Not modelled: hugetlb, KSM (the KSM line is always 0), swap devices (a swap pte counts
in Swap/SwapPss with a swap count of 1: there is no swap_map), shmem swap accounting
(smaps_pte_hole), idle-page tracking and PG_referenced (Referenced is the young bit),
VM_SOFTDIRTY on new VMAs (only the soft-dirty bit pte_mkdirty() sets in the entries),
MMF_HAS_PINNED (pte_is_pinned() is always false), mmu notifiers, the huge zero page,
smaps_rollup's mmap_lock contention drop-and-resume, per-subpage _mapcount of a large
folio (page_mapcount() is derived from the folio's total: exact when every mapping
covers the whole folio, see ``page_mapcount``), and the VmHWM bookkeeping that
update_hiwater_rss() does on unmap (only clear_refs 5 sets ``mm.hiwater_rss``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from emu.arch import PAGE_SHIFT, SWP_TYPE_BITS, Access, Kind
from emu.sched import traps
from mm_core import huge_memory, mempolicy, pagewalk, pgtable
from mm_core.locks import mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import (
    MM_ANONPAGES,
    MM_FILEPAGES,
    MM_SHMEMPAGES,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_HUGEPAGE,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    VMA,
)
from mm_core.page_alloc import Page, PageUse
from mm_core.tlbflush import flush_tlb_range

EINVAL, ENOSPC, EPERM = 22, 28, 1
PSS_SHIFT = 12
VM_PFNMAP, VM_LOCKONFAULT, VM_MIXEDMAP = 0x400, 0x00080000, 0x10000000


def _pmd_size(k) -> int:
    return k.arch.levels[k.arch.pmd_level].span


def _folio_bytes(folio: Page) -> int:
    return folio.nr_pages << PAGE_SHIFT


def vm_normal_page(k, ent):
    """vm_normal_page() / vm_normal_page_pmd(): the folio behind a present entry; None for
    special ones (the zero page)."""
    return None if ent.special else k.alloc.page_of(ent.paddr)


def pfn_swap_entry_folio(k, ent):
    """pfn_swap_entry_to_page() of a migration entry (its offset is a 4K frame number)."""
    return k.alloc.page_of(ent.swp_offset << PAGE_SHIFT)


def folio_test_swapbacked(folio: Page) -> bool:
    """PG_swapbacked: anon folios unless MADV_FREE made them lazyfree; shmem always."""
    if folio.use is PageUse.ANON:
        return not folio.extra.get("lazyfree")
    return folio.use is PageUse.SHMEM


def page_mapcount(k, folio: Page) -> int:
    """page_mapcount() of one base page of ``folio``. The model keeps one mapcount per
    folio (each pmd mapping counts 1, each pte mapping 1); for a large folio a page's
    count is taken as q + r with (q, r) = divmod(mapcount, pages): exact when every
    pte mapping set covers all its pages and the pmd mappings are fewer than its pages."""
    nr = _folio_bytes(folio) // k.page_size
    if nr <= 1:
        return folio.mapcount
    q, r = divmod(folio.mapcount, nr)
    return q + r


async def _pmd_trans_huge_lock(k, mm, pmdp: int):
    """pmd_trans_huge_lock(): the inline is_swap_pmd() / pmd_trans_huge() test on a
    lockless read, then __pmd_trans_huge_lock() rechecks under the pmd lock. Returns
    (pml, pmdval) or (None, pmdval). Under ``--inject proc_walker_misses_migration_pmd``
    only pmd_trans_huge() is tested (DAMON's pre-2025 shape): a migration pmd then falls
    through to pte_offset_map_lock(), which fails on it, and ACTION_AGAIN repeats."""
    pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
    huge = (Kind.LEAF, Kind.MIGRATION, Kind.SWAP)
    if "proc_walker_misses_migration_pmd" in k.bugs:
        huge = (Kind.LEAF,)
    if pmdval.kind not in huge:
        return None, pmdval
    return await huge_memory.pmd_trans_huge_lock(k, mm, pmdp)


# =============================================================================================
# smaps
# =============================================================================================

@dataclass
class MemSizeStats:
    """struct mem_size_stats (bytes; the pss fields in PSS_SHIFT fixed point)."""

    resident: int = 0
    shared_clean: int = 0
    shared_dirty: int = 0
    private_clean: int = 0
    private_dirty: int = 0
    referenced: int = 0
    anonymous: int = 0
    lazyfree: int = 0
    anonymous_thp: int = 0
    shmem_thp: int = 0
    file_thp: int = 0
    swap: int = 0
    shared_hugetlb: int = 0
    private_hugetlb: int = 0
    ksm: int = 0
    pss: int = 0
    pss_anon: int = 0
    pss_file: int = 0
    pss_shmem: int = 0
    pss_dirty: int = 0
    pss_locked: int = 0
    swap_pss: int = 0

    def add(self, other: MemSizeStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def show(self, rollup: bool = False) -> str:
        """__show_smap(): the lines common to smaps and smaps_rollup (kB, width 8)."""
        rows = [("Rss", self.resident), ("Pss", self.pss >> PSS_SHIFT),
                ("Pss_Dirty", self.pss_dirty >> PSS_SHIFT)]
        if rollup:
            rows += [("Pss_Anon", self.pss_anon >> PSS_SHIFT), ("Pss_File", self.pss_file >> PSS_SHIFT),
                     ("Pss_Shmem", self.pss_shmem >> PSS_SHIFT)]
        rows += [("Shared_Clean", self.shared_clean), ("Shared_Dirty", self.shared_dirty),
                 ("Private_Clean", self.private_clean), ("Private_Dirty", self.private_dirty),
                 ("Referenced", self.referenced), ("Anonymous", self.anonymous), ("KSM", self.ksm),
                 ("LazyFree", self.lazyfree), ("AnonHugePages", self.anonymous_thp),
                 ("ShmemPmdMapped", self.shmem_thp), ("FilePmdMapped", self.file_thp),
                 ("Shared_Hugetlb", self.shared_hugetlb)]
        out = [_kb_line(name, value) for name, value in rows]
        out.append(f"Private_Hugetlb: {self.private_hugetlb >> 10:7} kB")
        out += [_kb_line("Swap", self.swap), _kb_line("SwapPss", self.swap_pss >> PSS_SHIFT),
                _kb_line("Locked", self.pss_locked >> PSS_SHIFT)]
        return "\n".join(out) + "\n"


def _kb_line(name: str, nbytes: int) -> str:
    """SEQ_PUT_DEC(): the label padded to 16 columns, the kB value right-aligned in 8."""
    return f"{name + ':':<16}{nbytes >> 10:8} kB"


def smaps_page_accumulate(mss: MemSizeStats, folio: Page, size: int, pss: int,
                          dirty: bool, locked: bool, private: bool) -> None:
    """smaps_page_accumulate()."""
    mss.pss += pss
    if folio.use is PageUse.ANON:
        mss.pss_anon += pss
    elif folio_test_swapbacked(folio):
        mss.pss_shmem += pss
    else:
        mss.pss_file += pss
    if locked:
        mss.pss_locked += pss
    if dirty or folio.extra.get("dirty"):
        mss.pss_dirty += pss
        if private:
            mss.private_dirty += size
        else:
            mss.shared_dirty += size
    elif private:
        mss.private_clean += size
    else:
        mss.shared_clean += size


def smaps_account(k, mss: MemSizeStats, folio: Page, compound: bool, young: bool, dirty: bool,
                  locked: bool, migration: bool) -> None:
    """smaps_account() (6.6): size-only quantities first, then Pss and Shared/Private:
    page_count() == 1 (or a migration entry, whose mapcount must not be read) is private
    and whole; otherwise each base page is divided by its mapcount (PSS_SHIFT fixed
    point, integer division as the kernel's)."""
    page = k.page_size
    nr = _folio_bytes(folio) // page if compound else 1
    size = nr * page
    if folio.use is PageUse.ANON:
        mss.anonymous += size
        if not folio_test_swapbacked(folio) and not dirty and not folio.extra.get("dirty"):
            mss.lazyfree += size
    mss.resident += size
    if young:                                   # page_is_young() / PageReferenced(): not modelled
        mss.referenced += size
    if folio.refcount == 1 or migration:
        smaps_page_accumulate(mss, folio, size, size << PSS_SHIFT, dirty, locked, True)
        return
    for _ in range(nr):
        mapcount = page_mapcount(k, folio)
        pss = page << PSS_SHIFT
        if mapcount >= 2:
            pss //= mapcount
        smaps_page_accumulate(mss, folio, page, pss, dirty, locked, mapcount < 2)


def smaps_pte_entry(k, mss: MemSizeStats, vma: VMA, ptent) -> None:
    """smaps_pte_entry(): a present pte's normal page, a swap entry (Swap/SwapPss), or a
    migration entry's page (accounted as private, its mapcount unread)."""
    locked = bool(vma.flags & VM_LOCKED)
    folio, migration, young, dirty = None, False, False, False
    if ptent.kind is Kind.LEAF:
        folio = vm_normal_page(k, ptent)
        young, dirty = ptent.young, ptent.dirty
    elif ptent.kind is Kind.SWAP:
        mss.swap += k.page_size                 # swp_swapcount() == 1: no swap_map here
        mss.swap_pss += k.page_size << PSS_SHIFT
    elif ptent.kind is Kind.MIGRATION:
        migration = True
        folio = pfn_swap_entry_folio(k, ptent)
    if folio is None:
        return
    smaps_account(k, mss, folio, False, young, dirty, locked, migration)


def smaps_pmd_entry(k, mss: MemSizeStats, vma: VMA, pmd) -> None:
    """smaps_pmd_entry(): a PMD-mapped folio (or a THP migration entry's) counted whole,
    plus AnonHugePages / ShmemPmdMapped / FilePmdMapped."""
    locked = bool(vma.flags & VM_LOCKED)
    folio, migration = None, False
    if pmd.kind is Kind.LEAF:
        folio = vm_normal_page(k, pmd)
    elif pmd.kind is Kind.MIGRATION:
        migration = True
        folio = pfn_swap_entry_folio(k, pmd)
    if folio is None:
        return
    if folio.use is PageUse.ANON:
        mss.anonymous_thp += _pmd_size(k)
    elif folio_test_swapbacked(folio):
        mss.shmem_thp += _pmd_size(k)
    else:
        mss.file_thp += _pmd_size(k)
    smaps_account(k, mss, folio, True, pmd.young, pmd.dirty, locked, migration)


async def smaps_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """smaps_pte_range(): a huge or migration pmd under pmd_trans_huge_lock(), else the
    PTE table under its ptl. A failed pte_offset_map_lock() is ACTION_AGAIN (RETRY)."""
    k, vma, mss = walk.k, walk.vma, walk.private
    pml, pmd = await _pmd_trans_huge_lock(k, vma.mm, pmdp)
    if pml is not None:
        smaps_pmd_entry(k, mss, vma, pmd)
        await traps.unlock(pml)
        return 0
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
    if locked is None:
        k.stats["smaps_pte_range_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN                 # RETRY
        return 0
    ptep, ptl = locked
    arch = k.arch
    for raw in await pgtable.get_raws_locked(k, ptep, (end - addr) >> k.page_shift):
        smaps_pte_entry(k, mss, vma, arch.decode(arch.pte_level, raw))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


SMAPS_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=smaps_pte_range)


async def smap_gather_stats(k, vma: VMA, mss: MemSizeStats, start: int = 0) -> None:
    """smap_gather_stats(): walk one VMA (from ``start`` if nonzero) into ``mss``; the
    caller holds mmap_read_lock (m_start)."""
    if start >= vma.end:
        return
    if not start:
        await pagewalk.walk_page_vma(k, vma, SMAPS_WALK_OPS, mss)
    else:
        await pagewalk.walk_page_range(k, vma.mm, start, vma.end, SMAPS_WALK_OPS, mss)


_VM_FLAG_MNEMONICS = ((VM_READ, "rd"), (VM_WRITE, "wr"), (VM_EXEC, "ex"), (VM_SHARED, "sh"),
                      (VM_MAYREAD, "mr"), (VM_MAYWRITE, "mw"), (VM_MAYEXEC, "me"), (VM_MAYSHARE, "ms"),
                      (VM_GROWSDOWN, "gd"), (VM_PFNMAP, "pf"), (VM_LOCKED, "lo"), (VM_LOCKONFAULT, "lf"),
                      (VM_MIXEDMAP, "mm"), (VM_HUGEPAGE, "hg"), (VM_NOHUGEPAGE, "nh"))


def show_vma_header(start: int, end: int, flags: int, pgoff: int, dev: tuple[int, int], ino: int,
                    name: str | None) -> str:
    """show_vma_header_prefix() + the name column (seq_setwidth(25 + 6 * 8 - 1), seq_pad)."""
    perms = "".join(c if flags & bit else "-" for bit, c in ((VM_READ, "r"), (VM_WRITE, "w"), (VM_EXEC, "x")))
    perms += "s" if flags & VM_MAYSHARE else "p"
    line = f"{start:08x}-{end:08x} {perms} {pgoff:08x} {dev[0]:02x}:{dev[1]:02x} {ino} "
    if name:
        line = f"{line:<72} {name}"
    return line


@dataclass
class SmapsRecord:
    """One /proc/PID/smaps entry (or the smaps_rollup one: ``vma`` None)."""

    start: int
    end: int
    mss: MemSizeStats
    vma: VMA | None = None
    page_size: int = 4096
    thp_eligible: bool = False

    def render(self) -> str:
        """show_smap() / show_smaps_rollup() text."""
        if self.vma is None:
            head = show_vma_header(self.start, self.end, 0, 0, (0, 0), 0, "[rollup]")
            return head + "\n" + self.mss.show(rollup=True)
        vma = self.vma
        if vma.file is not None:
            name = f"/{vma.file.name} (deleted)"           # a memfd: shmem, 00:01
            head = show_vma_header(vma.start, vma.end, vma.flags, vma.pgoff * self.page_size, (0, 1),
                                   vma.file.ino, name)
        else:
            head = show_vma_header(vma.start, vma.end, vma.flags, 0, (0, 0), 0, vma.name or None)
        out = [head, _kb_line("Size", vma.end - vma.start), _kb_line("KernelPageSize", self.page_size),
               _kb_line("MMUPageSize", self.page_size)]
        text = "\n".join(out) + "\n" + self.mss.show()
        text += f"THPeligible:    {int(self.thp_eligible):8}\n"
        text += "VmFlags: " + "".join(f"{m} " for bit, m in _VM_FLAG_MNEMONICS if vma.flags & bit) + "\n"
        return text

    def __getitem__(self, key: str) -> int:
        """The number on one line of render(): kB for "Rss", "Pss", ...; 0/1 for
        "THPeligible"."""
        for line in self.render().splitlines():
            label, _, rest = line.partition(":")
            if label == key and rest.split() and rest.split()[0].isdigit():
                return int(rest.split()[0])
        raise KeyError(key)


def _thp_eligible(k, vma: VMA) -> bool:
    """THPeligible: hugepage_vma_check(smaps=true) for anon VMAs (the sysfs mode, the VMA
    flags and room for one aligned PMD); shmem with shmem_enabled=never (the default): 0."""
    size = _pmd_size(k)
    return (vma.anonymous and vma.end - vma.start >= size
            and huge_memory.thp_vma_suitable(k, vma, vma.end - size))


async def show_smaps(k, mm) -> list[SmapsRecord]:
    """/proc/PID/smaps: show_smap() for every VMA, under mmap_read_lock (m_start)."""
    await mmap_read_lock(mm)
    try:
        out = []
        for vma in list(mm.vmas):
            mss = MemSizeStats()
            await smap_gather_stats(k, vma, mss)
            out.append(SmapsRecord(vma.start, vma.end, mss, vma, k.page_size, _thp_eligible(k, vma)))
        return out
    finally:
        await mmap_read_unlock(mm)


async def show_smaps_rollup(k, mm) -> SmapsRecord:
    """/proc/PID/smaps_rollup: the sum over every VMA (the mmap_lock contention
    drop-and-resume of 6.6 is not modelled: the lock is held throughout)."""
    await mmap_read_lock(mm)
    try:
        mss = MemSizeStats()
        for vma in list(mm.vmas):
            await smap_gather_stats(k, vma, mss)
        start = mm.vmas[0].start if mm.vmas else 0
        end = mm.vmas[-1].end if mm.vmas else 0
        return SmapsRecord(start, end, mss, None, k.page_size)
    finally:
        await mmap_read_unlock(mm)


# =============================================================================================
# pagemap
# =============================================================================================

PM_ENTRY_BYTES = 8
PM_PFRAME_BITS = 55
PM_PFRAME_MASK = (1 << PM_PFRAME_BITS) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63
PM_END_OF_BUFFER = 1
MAX_SWAPFILES_SHIFT = SWP_TYPE_BITS


@dataclass
class PagemapRead:
    """struct pagemapread: the bounce buffer of one PAGEMAP_WALK_SIZE chunk."""

    len: int
    show_pfn: bool
    buffer: list[int] = field(default_factory=list)


def make_pme(frame: int, flags: int) -> int:
    return (frame & PM_PFRAME_MASK) | flags


def add_to_pagemap(pme: int, pm: PagemapRead) -> int:
    pm.buffer.append(pme)
    return PM_END_OF_BUFFER if len(pm.buffer) >= pm.len else 0


def _swap_frame(k, ent) -> int:
    """swp_type | offset << MAX_SWAPFILES_SHIFT; a pfn swap entry (migration) keeps its
    offset a pfn in PAGE_SIZE units (swp_offset_pfn)."""
    offset = ent.swp_offset
    if ent.kind is Kind.MIGRATION:
        offset = (offset << PAGE_SHIFT) >> k.page_shift
    return ent.swp_type | (offset << MAX_SWAPFILES_SHIFT)


async def pagemap_pte_hole(addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """pagemap_pte_hole(): non-present entries, split at VMA boundaries (VM_SOFTDIRTY is
    not modelled, so both halves are 0)."""
    pm, mm, page = walk.private, walk.mm, walk.k.page_size
    while addr < end:
        vma = mm.find_vma(addr)
        hole_end = min(end, vma.start) if vma is not None else end
        while addr < hole_end:
            if add_to_pagemap(make_pme(0, 0), pm):
                return PM_END_OF_BUFFER
            addr += page
        if vma is None:
            break
        while addr < min(end, vma.end):
            if add_to_pagemap(make_pme(0, 0), pm):
                return PM_END_OF_BUFFER
            addr += page
    return 0


def pte_to_pagemap_entry(k, pm: PagemapRead, vma: VMA, pte) -> int:
    """pte_to_pagemap_entry()."""
    frame = flags = 0
    folio, migration = None, False
    if pte.kind is Kind.LEAF:
        if pm.show_pfn:
            frame = pte.paddr >> k.page_shift
        flags |= PM_PRESENT
        folio = vm_normal_page(k, pte)
        if pte.soft_dirty:
            flags |= PM_SOFT_DIRTY
        if pte.uffd_wp:
            flags |= PM_UFFD_WP
    elif pte.kind in (Kind.SWAP, Kind.MIGRATION):
        if pte.soft_dirty:
            flags |= PM_SOFT_DIRTY
        if pte.uffd_wp:
            flags |= PM_UFFD_WP
        if pm.show_pfn:
            frame = _swap_frame(k, pte)
        flags |= PM_SWAP
        migration = pte.kind is Kind.MIGRATION
        if migration:
            folio = pfn_swap_entry_folio(k, pte)
    if folio is not None and folio.use is not PageUse.ANON:
        flags |= PM_FILE
    if folio is not None and not migration and page_mapcount(k, folio) == 1:
        flags |= PM_MMAP_EXCLUSIVE
    return make_pme(frame, flags)


async def pagemap_pmd_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """pagemap_pmd_range(): a huge (or migration) pmd expanded page by page (frame++, or
    the swap offset + 1 for a migration entry; no PM_FILE for a PMD-mapped file folio in
    6.6); else the PTE table under its ptl. A failed pte_offset_map_lock() is
    ACTION_AGAIN (RETRY), returning the error so far (0)."""
    k, vma, pm = walk.k, walk.vma, walk.private
    err = 0
    pml, pmd = await _pmd_trans_huge_lock(k, vma.mm, pmdp)
    if pml is not None:
        flags = frame = 0
        folio, migration = None, False
        sub = (addr & (_pmd_size(k) - 1)) >> k.page_shift
        if pmd.kind is Kind.LEAF:
            folio = k.alloc.page_of(pmd.paddr)                # pmd_page()
            flags |= PM_PRESENT
            if pmd.soft_dirty:
                flags |= PM_SOFT_DIRTY
            if pmd.uffd_wp:
                flags |= PM_UFFD_WP
            if pm.show_pfn:
                frame = (pmd.paddr >> k.page_shift) + sub
        else:                                                 # is_swap_pmd(): a migration entry
            if pm.show_pfn:
                frame = _swap_frame(k, pmd) + (sub << MAX_SWAPFILES_SHIFT)
            flags |= PM_SWAP
            if pmd.soft_dirty:
                flags |= PM_SOFT_DIRTY
            if pmd.uffd_wp:
                flags |= PM_UFFD_WP
            migration = pmd.kind is Kind.MIGRATION
            folio = pfn_swap_entry_folio(k, pmd) if migration else None
        if folio is not None and not migration and page_mapcount(k, folio) == 1:
            flags |= PM_MMAP_EXCLUSIVE
        for _ in range(addr, end, k.page_size):
            err = add_to_pagemap(make_pme(frame, flags), pm)
            if err:
                break
            if pm.show_pfn:
                if flags & PM_PRESENT:
                    frame += 1
                elif flags & PM_SWAP:
                    frame += 1 << MAX_SWAPFILES_SHIFT
        await traps.unlock(pml)
        return err
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
    if locked is None:
        k.stats["pagemap_pmd_range_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN                   # RETRY
        return err
    ptep, ptl = locked
    arch = k.arch
    for raw in await pgtable.get_raws_locked(k, ptep, (end - addr) >> k.page_shift):
        err = add_to_pagemap(pte_to_pagemap_entry(k, pm, vma, arch.decode(arch.pte_level, raw)), pm)
        if err:
            break
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return err


PAGEMAP_OPS = pagewalk.MmWalkOps(pmd_entry=pagemap_pmd_range, pte_hole=pagemap_pte_hole)


async def pagemap_read(k, mm, ppos: int, count: int, show_pfn: bool) -> list[int] | int:
    """pagemap_read(): ``count`` bytes of 64-bit entries from file offset ``ppos`` (one
    entry per page, entry i describing virtual page ppos/8 + i). The range is walked in
    PAGEMAP_WALK_SIZE (PMD-sized, PMD-aligned) chunks, each under its own
    mmap_read_lock, into a bounce buffer of one chunk; pfns only with ``show_pfn``
    (CAP_SYS_ADMIN). Returns the entries, or -errno."""
    if ppos % PM_ENTRY_BYTES or count % PM_ENTRY_BYTES:
        return -EINVAL
    out: list[int] = []
    if not count:
        return out
    walk_size = _pmd_size(k)
    task_size = k.arch.task_size
    pm = PagemapRead(walk_size >> k.page_shift, show_pfn)
    svpfn = ppos // PM_ENTRY_BYTES
    end_vaddr = task_size
    start_vaddr = svpfn << k.page_shift
    end = start_vaddr + ((count // PM_ENTRY_BYTES) << k.page_shift)
    if start_vaddr <= end < task_size:
        end_vaddr = end
    if start_vaddr > task_size:
        start_vaddr = end_vaddr
    while count and start_vaddr < end_vaddr:
        pm.buffer = []
        end = (start_vaddr + walk_size) & ~(walk_size - 1)
        if end < start_vaddr or end > end_vaddr:
            end = end_vaddr
        await mmap_read_lock(mm)
        try:
            ret = await pagewalk.walk_page_range(k, mm, start_vaddr, end, PAGEMAP_OPS, pm)
        finally:
            await mmap_read_unlock(mm)
        start_vaddr = end
        n = min(count // PM_ENTRY_BYTES, len(pm.buffer))
        out += pm.buffer[:n]
        count -= n * PM_ENTRY_BYTES
        if ret and ret != PM_END_OF_BUFFER:
            return ret
    return out


# =============================================================================================
# clear_refs
# =============================================================================================

CLEAR_REFS_ALL, CLEAR_REFS_ANON, CLEAR_REFS_MAPPED = 1, 2, 3
CLEAR_REFS_SOFT_DIRTY, CLEAR_REFS_MM_HIWATER_RSS, CLEAR_REFS_LAST = 4, 5, 6


def mem_soft_dirty(k) -> bool:
    """CONFIG_MEM_SOFT_DIRTY: only where the arch has the bit (x86, s390, powerpc; arm64
    has none, and there clear_soft_dirty() is an empty stub)."""
    return "soft_dirty" in k.arch.sw_bits


async def clear_soft_dirty(k, vma: VMA, addr: int, ptep: int, ptent) -> None:
    """clear_soft_dirty(): write-protect and clear soft-dirty on a present pte
    (ptep_modify_prot_start/commit; pinned pages are not modelled), or clear it on a
    swap entry, so that the next write faults and sets it again."""
    if not mem_soft_dirty(k):
        return
    level = k.arch.pte_level
    if ptent.kind is Kind.LEAF:
        await pgtable.clear_entry(k, ptep, level)                        # ptep_modify_prot_start
        new = ptent.with_(prot=ptent.prot & ~Access.W, soft_dirty=False)
        await pgtable.set_entry(k, ptep, level, new)                      # ptep_modify_prot_commit
    elif ptent.kind in (Kind.SWAP, Kind.MIGRATION) and ptent.soft_dirty:
        await pgtable.set_entry(k, ptep, level, ptent.with_(soft_dirty=False))


async def clear_soft_dirty_pmd(k, vma: VMA, addr: int, pmdp: int, pmd) -> None:
    """clear_soft_dirty_pmd(): a huge pmd is invalidated (pmdp_invalidate flushes its
    range), then set write-protected without soft-dirty; a migration pmd loses the bit."""
    if not mem_soft_dirty(k):
        return
    level = k.arch.pmd_level
    if pmd.kind is Kind.LEAF:
        haddr = addr & ~(_pmd_size(k) - 1)
        await pgtable.set_entry(k, pmdp, level, pmd.with_(prot=pmd.prot & ~Access.W,
                                                          soft_dirty=False))
        await flush_tlb_range(k, vma.mm, haddr, haddr + _pmd_size(k))
    elif pmd.kind is Kind.MIGRATION:
        await pgtable.set_entry(k, pmdp, level, pmd.with_(soft_dirty=False))


async def clear_refs_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """clear_refs_pte_range(): young (accessed) cleared on a huge pmd or on each present
    pte with a normal page — in the arch's own format, through Entry encode (x86 A,
    arm64 AF, ppc64 R, s390 the software young bit plus the invalid bit that emulates it)
    — or soft-dirty cleared (type 4). A failed pte_offset_map_lock() is ACTION_AGAIN
    (RETRY)."""
    k, vma, cp_type = walk.k, walk.vma, walk.private
    arch = k.arch
    pml, pmd = await _pmd_trans_huge_lock(k, vma.mm, pmdp)
    if pml is not None:
        if cp_type == CLEAR_REFS_SOFT_DIRTY:
            await clear_soft_dirty_pmd(k, vma, addr, pmdp, pmd)
        elif pmd.kind is Kind.LEAF and pmd.young:
            # pmdp_test_and_clear_young()
            await pgtable.set_entry(k, pmdp, arch.pmd_level, pmd.with_(young=False))
            k.stats["clear_refs_young"] += 1
        await traps.unlock(pml)
        return 0
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
    if locked is None:
        k.stats["clear_refs_pte_range_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN                   # RETRY
        return 0
    ptep, ptl = locked
    for i, raw in enumerate(await pgtable.get_raws_locked(k, ptep, (end - addr) >> k.page_shift)):
        ptent = arch.decode(arch.pte_level, raw)
        entp = ptep + 8 * i
        if cp_type == CLEAR_REFS_SOFT_DIRTY:
            await clear_soft_dirty(k, vma, addr + i * k.page_size, entp, ptent)
            continue
        if ptent.kind is not Kind.LEAF or vm_normal_page(k, ptent) is None:
            continue
        if ptent.young:                                       # ptep_test_and_clear_young()
            await pgtable.set_entry(k, entp, arch.pte_level, ptent.with_(young=False))
            k.stats["clear_refs_young"] += 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


async def clear_refs_test_walk(start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """clear_refs_test_walk(): 2 only anon VMAs, 3 only file-backed ones (1 skips the VMA)."""
    vma, cp_type = walk.vma, walk.private
    if vma.flags & VM_PFNMAP:
        return 1
    if cp_type == CLEAR_REFS_ANON and vma.file is not None:
        return 1
    if cp_type == CLEAR_REFS_MAPPED and vma.file is None:
        return 1
    return 0


CLEAR_REFS_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=clear_refs_pte_range, test_walk=clear_refs_test_walk)


def get_mm_rss(mm) -> int:
    return mm.rss[MM_FILEPAGES] + mm.rss[MM_ANONPAGES] + mm.rss[MM_SHMEMPAGES]


async def clear_refs_write(k, mm, cp_type: int) -> int:
    """clear_refs_write(): under mmap_write_lock (PGWALK_WRLOCK), walk the whole address
    space. 5 resets VmHWM to the current rss and walks nothing. For 4 the TLB is
    flushed for the whole mm after the walk (flush_tlb_mm, inside
    inc/dec_tlb_flush_pending); 1-3 clear young bits with no flush at all (Will
    Deacon's 2021 change: ptep_test_and_clear_young() needs none — a vCPU that still
    caches the translation just does not set the bit again until the entry goes).
    0 or -EINVAL."""
    if not CLEAR_REFS_ALL <= cp_type < CLEAR_REFS_LAST:
        return -EINVAL
    await mmap_write_lock(mm)
    try:
        if cp_type == CLEAR_REFS_MM_HIWATER_RSS:
            mm.hiwater_rss = get_mm_rss(mm)                   # reset_mm_hiwater_rss()
            return 0
        await pagewalk.walk_page_range(k, mm, 0, k.arch.task_size, CLEAR_REFS_WALK_OPS, cp_type)
        if cp_type == CLEAR_REFS_SOFT_DIRTY:
            await flush_tlb_range(k, mm, 0, k.arch.task_size)   # flush_tlb_mm()
        k.stats["clear_refs"] += 1
        return 0
    finally:
        await mmap_write_unlock(mm)


# =============================================================================================
# PAGEMAP_SCAN (the pagemap ioctl, 6.7+)
# =============================================================================================
#
# do_pagemap_scan() walks [start, end) with pagemap_scan_ops and reports page regions by
# category. Its pmd_entry tries pagemap_scan_thp_entry() first, which takes
# pmd_trans_huge_lock(): a huge pmd *and a migration pmd* are categorised there (HUGE |
# PRESENT or HUGE | SWAPPED) and the entry returns without ACTION_AGAIN; only a failed
# pte_offset_map_lock() asks for ACTION_AGAIN (RETRY). spec section 7 wondered whether it
# copied DAMON's endless retry on a persistent migration pmd: it did not (6.7 as merged,
# and the 6.13 text keeps the same structure). Not modelled: PM_SCAN_WP_MATCHING (the
# write-protecting half needs uffd-wp async mode, which the model has no userfaultfd
# registration for: -EINVAL here), hugetlb, PAGE_IS_SOFT_DIRTY (6.10+).

PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PAGE_IS_FILE, PAGE_IS_PRESENT = 1 << 0, 1 << 1, 1 << 2, 1 << 3
PAGE_IS_SWAPPED, PAGE_IS_PFNZERO, PAGE_IS_HUGE = 1 << 4, 1 << 5, 1 << 6
PM_SCAN_CATEGORIES = (PAGE_IS_WPALLOWED | PAGE_IS_WRITTEN | PAGE_IS_FILE | PAGE_IS_PRESENT
                      | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE)
PM_SCAN_WP_MATCHING, PM_SCAN_CHECK_WPASYNC = 1 << 0, 1 << 1
PM_SCAN_FLAGS = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
ENOENT = 2


@dataclass
class PmScanArg:
    """struct pm_scan_arg (``vec`` is whether an output vector was given)."""

    start: int
    end: int
    vec_len: int = 0
    vec: bool = True
    max_pages: int = 0
    category_inverted: int = 0
    category_mask: int = 0
    category_anyof_mask: int = 0
    return_mask: int = PM_SCAN_CATEGORIES
    flags: int = 0
    walk_end: int = 0


@dataclass
class PagemapScanPrivate:
    """struct pagemap_scan_private: the bounce buffer of [start, end, categories] regions."""

    arg: PmScanArg
    masks_of_interest: int = 0
    cur_vma_category: int = 0
    vec_buf: list | None = None
    vec_buf_len: int = 0
    vec_buf_index: int = 0
    found_pages: int = 0
    walk_end_addr: int = 0
    out: list = field(default_factory=list)


def pagemap_page_category(k, p: PagemapScanPrivate, vma: VMA, pte) -> int:
    """pagemap_page_category()."""
    categories = 0
    if pte.kind is Kind.LEAF:
        categories |= PAGE_IS_PRESENT
        if not pte.uffd_wp:
            categories |= PAGE_IS_WRITTEN
        if p.masks_of_interest & PAGE_IS_FILE:
            folio = vm_normal_page(k, pte)
            if folio is not None and folio.use is not PageUse.ANON:
                categories |= PAGE_IS_FILE
        if pte.paddr >> k.page_shift == k.zero_page.paddr >> k.page_shift:
            categories |= PAGE_IS_PFNZERO
    elif pte.kind in (Kind.SWAP, Kind.MIGRATION):
        categories |= PAGE_IS_SWAPPED
        if not pte.uffd_wp:
            categories |= PAGE_IS_WRITTEN
        if p.masks_of_interest & PAGE_IS_FILE and pte.kind is Kind.MIGRATION:
            folio = pfn_swap_entry_folio(k, pte)
            if folio is not None and folio.use is not PageUse.ANON:
                categories |= PAGE_IS_FILE
    return categories


def pagemap_thp_category(k, p: PagemapScanPrivate, pmd) -> int:
    """pagemap_thp_category(): HUGE, plus PRESENT or SWAPPED (a migration pmd)."""
    categories = PAGE_IS_HUGE
    if pmd.kind is Kind.LEAF:
        categories |= PAGE_IS_PRESENT
        if not pmd.uffd_wp:
            categories |= PAGE_IS_WRITTEN
        if p.masks_of_interest & PAGE_IS_FILE:
            folio = vm_normal_page(k, pmd)
            if folio is not None and folio.use is not PageUse.ANON:
                categories |= PAGE_IS_FILE
    else:
        categories |= PAGE_IS_SWAPPED
        if not pmd.uffd_wp:
            categories |= PAGE_IS_WRITTEN
    return categories


def pagemap_scan_is_interesting_page(categories: int, p: PagemapScanPrivate) -> bool:
    categories ^= p.arg.category_inverted
    if categories & p.arg.category_mask != p.arg.category_mask:
        return False
    return not (p.arg.category_anyof_mask and not categories & p.arg.category_anyof_mask)


def pagemap_scan_push_range(categories: int, p: PagemapScanPrivate, addr: int, end: int) -> bool:
    """pagemap_scan_push_range(): extend the last region or start a new one."""
    cur = p.vec_buf[p.vec_buf_index]
    if addr == cur[1] and categories == cur[2]:
        cur[1] = end
        return True
    if cur[1]:
        if p.vec_buf_index >= p.vec_buf_len - 1:
            return False
        p.vec_buf_index += 1
        p.vec_buf.append([0, 0, 0])
        cur = p.vec_buf[p.vec_buf_index]
    cur[:] = [addr, end, categories]
    return True


def pagemap_scan_output(k, categories: int, p: PagemapScanPrivate, addr: int, end: int) -> tuple[int, int]:
    """pagemap_scan_output(): returns (ret, end); -ENOSPC (and a shortened end) when
    max_pages or the bounce buffer runs out."""
    if p.vec_buf is None:
        return 0, end
    categories &= p.arg.return_mask
    n_pages = (end - addr) // k.page_size
    ret = 0
    if p.found_pages + n_pages > p.arg.max_pages:
        too_much = p.found_pages + n_pages - p.arg.max_pages
        end -= too_much * k.page_size
        n_pages -= too_much
        ret = -ENOSPC
    if not pagemap_scan_push_range(categories, p, addr, end):
        end, n_pages, ret = addr, 0, -ENOSPC
    p.found_pages += n_pages
    if ret:
        p.walk_end_addr = end
    return ret, end


async def pagemap_scan_thp_entry(pmdp: int, start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """pagemap_scan_thp_entry(): a huge or migration pmd under pmd_trans_huge_lock();
    -ENOENT when the pmd is neither (the caller goes on to the PTEs)."""
    k, vma, p = walk.k, walk.vma, walk.private
    pml, pmd = await _pmd_trans_huge_lock(k, vma.mm, pmdp)
    if pml is None:
        return -ENOENT
    ret = 0
    categories = p.cur_vma_category | pagemap_thp_category(k, p, pmd)
    if pagemap_scan_is_interesting_page(categories, p):
        ret, _ = pagemap_scan_output(k, categories, p, start, end)
    await traps.unlock(pml)
    return ret


async def pagemap_scan_pmd_entry(pmdp: int, start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """pagemap_scan_pmd_entry(): the THP entry first; then the PTE table under its ptl.
    A failed pte_offset_map_lock() is ACTION_AGAIN (RETRY)."""
    k, vma, p = walk.k, walk.vma, walk.private
    ret = await pagemap_scan_thp_entry(pmdp, start, end, walk)
    if ret != -ENOENT:
        return ret
    ret = 0
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, start)
    if locked is None:
        k.stats["pagemap_scan_pmd_entry_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN                   # RETRY
        return 0
    ptep, ptl = locked
    arch = k.arch
    for i, raw in enumerate(await pgtable.get_raws_locked(k, ptep, (end - start) >> k.page_shift)):
        addr = start + i * k.page_size
        categories = p.cur_vma_category | pagemap_page_category(k, p, vma, arch.decode(arch.pte_level, raw))
        if not pagemap_scan_is_interesting_page(categories, p):
            continue
        ret, nxt = pagemap_scan_output(k, categories, p, addr, addr + k.page_size)
        if nxt == addr:
            break
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return ret


async def pagemap_scan_pte_hole(addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """pagemap_scan_pte_hole(): an empty extent inside a VMA has the VMA's category."""
    p = walk.private
    if walk.vma is None or not pagemap_scan_is_interesting_page(p.cur_vma_category, p):
        return 0
    ret, _ = pagemap_scan_output(walk.k, p.cur_vma_category, p, addr, end)
    return ret


async def pagemap_scan_test_walk(start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """pagemap_scan_test_walk(): no VMA is in uffd-wp async mode here, so none is
    WPALLOWED; PM_SCAN_CHECK_WPASYNC then fails with -EPERM."""
    p = walk.private
    vma_category = 0
    if p.arg.flags & PM_SCAN_CHECK_WPASYNC:
        return -EPERM
    if walk.vma.flags & VM_PFNMAP:
        return 1
    required = p.arg.category_mask & PAGE_IS_WPALLOWED
    if (vma_category ^ p.arg.category_inverted) & required != required:
        return 1
    p.cur_vma_category = vma_category
    return 0


PAGEMAP_SCAN_OPS = pagewalk.MmWalkOps(pmd_entry=pagemap_scan_pmd_entry, pte_hole=pagemap_scan_pte_hole,
                                      test_walk=pagemap_scan_test_walk)


def pagemap_scan_flush_buffer(p: PagemapScanPrivate) -> int:
    """pagemap_scan_flush_buffer(): copy the finished regions out."""
    if p.vec_buf is None:
        return 0
    n = p.vec_buf_index
    if p.vec_buf[n][1] != p.vec_buf[n][0]:
        n += 1
    if not n:
        return 0
    p.out += [tuple(r) for r in p.vec_buf[:n]]
    p.arg.vec_len -= n
    p.vec_buf_index = 0
    p.vec_buf_len = min(p.vec_buf_len, p.arg.vec_len)
    p.vec_buf = [[0, 0, 0]]
    return n


async def do_pagemap_scan(k, mm, arg: PmScanArg) -> tuple[int, list]:
    """do_pagemap_scan(): returns (number of regions or -errno, the regions as
    (start, end, categories)); ``arg.walk_end`` is where the walk stopped. Walks under
    mmap_read_lock; a full bounce buffer (-ENOSPC from the walk) is flushed and the walk
    resumed at walk_end."""
    if arg.flags & ~PM_SCAN_FLAGS or (arg.category_inverted | arg.category_mask | arg.category_anyof_mask
                                      | arg.return_mask) & ~PM_SCAN_CATEGORIES:
        return -EINVAL, []
    if arg.flags & PM_SCAN_WP_MATCHING:
        return -EINVAL, []                                    # not modelled (see above)
    if arg.start % k.page_size or (not arg.vec and arg.vec_len):
        return -EINVAL, []
    arg.end = (arg.end + k.page_size - 1) & ~(k.page_size - 1)
    arg.walk_end = 0
    if not arg.max_pages:
        arg.max_pages = 1 << 64
    p = PagemapScanPrivate(arg, arg.category_mask | arg.category_anyof_mask | arg.return_mask)
    if arg.vec_len:                                           # pagemap_scan_init_bounce_buffer()
        p.vec_buf_len = min(_pmd_size(k) >> k.page_shift, arg.vec_len)
        p.vec_buf = [[0, 0, 0]]
    n_ranges, ret = 0, 0
    walk_start = arg.start
    while walk_start < arg.end:
        p.walk_end_addr = 0
        await mmap_read_lock(mm)
        try:
            ret = await pagewalk.walk_page_range(k, mm, walk_start, arg.end, PAGEMAP_SCAN_OPS, p)
        finally:
            await mmap_read_unlock(mm)
        n_ranges += pagemap_scan_flush_buffer(p)
        arg.walk_end = p.walk_end_addr or arg.end
        if ret != -ENOSPC or arg.vec_len == 0 or p.found_pages == arg.max_pages:
            break
        walk_start = arg.walk_end
    if not ret or ret == -ENOSPC:
        ret = n_ranges
    arg.walk_end = arg.walk_end or walk_start
    return ret, p.out


# =============================================================================================
# numa_maps
# =============================================================================================

@dataclass
class NumaMapsStats:
    """struct numa_maps: page counts of one VMA (base pages)."""

    pages: int = 0
    anon: int = 0
    active: int = 0
    writeback: int = 0
    mapcount_max: int = 0
    dirty: int = 0
    swapcache: int = 0
    node: dict = field(default_factory=dict)


def gather_stats(k, md: NumaMapsStats, folio: Page, pte_dirty: bool, nr_pages: int) -> None:
    """gather_stats(): count ``nr_pages`` pages of ``folio``. PageActive is not modelled:
    active counts the unevictable (mlocked) pages only."""
    count = page_mapcount(k, folio)
    md.pages += nr_pages
    if pte_dirty or folio.extra.get("dirty"):
        md.dirty += nr_pages
    if folio.extra.get("swap") is not None:              # PageSwapCache()
        md.swapcache += nr_pages
    if folio.extra.get("mlock_count"):                   # PageActive() || PageUnevictable()
        md.active += nr_pages
    if folio.use is PageUse.ANON:                         # PageAnon()
        md.anon += nr_pages
    md.mapcount_max = max(md.mapcount_max, count)
    nid = mempolicy.page_to_nid(k, folio.paddr)
    md.node[nid] = md.node.get(nid, 0) + nr_pages


def can_gather_numa_stats(k, ent) -> Page | None:
    """can_gather_numa_stats() / _pmd(): a present entry's normal page (not the zero page,
    not reserved) on a node with memory."""
    if ent.kind is not Kind.LEAF:
        return None
    folio = vm_normal_page(k, ent)
    if folio is None or folio.use is PageUse.ZERO:
        return None
    return folio


async def gather_pte_stats(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """gather_pte_stats() (v6.6): pmd_trans_huge_lock() first (a present huge pmd counts
    HPAGE_PMD_NR pages with pmd_dirty; a migration pmd nothing); a failed
    pte_offset_map_lock() is ACTION_AGAIN (RETRY); else every present pte's page."""
    k, arch, vma = walk.k, walk.k.arch, walk.vma
    md: NumaMapsStats = walk.private
    pml, pmdval = await _pmd_trans_huge_lock(k, vma.mm, pmdp)
    if pml is not None:
        folio = can_gather_numa_stats(k, pmdval)
        if folio is not None:
            gather_stats(k, md, folio, pmdval.dirty, _pmd_size(k) // k.page_size)
        await traps.unlock(pml)
        return 0
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
    if locked is None and "gather_pte_stats_ignores_map_failure" in k.bugs:
        await pgtable.walk_stale_pte_table(k, pmdval, addr, end)   # bug injection: walks on
        return 0
    if locked is None:
        k.stats["numa_maps_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN               # RETRY
        return 0
    ptep, ptl = locked
    for i in range((end - addr) >> k.page_shift):
        ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep + 8 * i))
        folio = can_gather_numa_stats(k, ptent)
        if folio is not None:
            gather_stats(k, md, folio, ptent.dirty, 1)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


SHOW_NUMA_OPS = pagewalk.MmWalkOps(pmd_entry=gather_pte_stats)


def numa_map_line(k, vma: VMA, md: NumaMapsStats) -> str:
    """show_numa_map()'s text for one VMA."""
    pol = vma.policy if vma.policy is not None else vma.mm.mempolicy
    line = f"{vma.start:08x} {pol if pol is not None else 'default'}"
    if vma.file is not None:
        line += f" file=/{vma.file.name} (deleted)"        # a memfd
    elif vma.name == "[heap]":
        line += " heap"
    elif vma.name == "[stack]":
        line += " stack"
    if not md.pages:
        return line
    if md.anon:
        line += f" anon={md.anon}"
    if md.dirty:
        line += f" dirty={md.dirty}"
    if md.pages != md.anon and md.pages != md.dirty:
        line += f" mapped={md.pages}"
    if md.mapcount_max > 1:
        line += f" mapmax={md.mapcount_max}"
    if md.swapcache:
        line += f" swapcache={md.swapcache}"
    if md.active < md.pages:
        line += f" active={md.active}"
    if md.writeback:
        line += f" writeback={md.writeback}"
    for nid in sorted(md.node):
        if md.node[nid]:
            line += f" N{nid}={md.node[nid]}"
    return line + f" kernelpagesize_kB={k.page_size >> 10}"


async def show_numa_maps(k, mm) -> str:
    """/proc/PID/numa_maps: show_numa_map() for every VMA (walk_page_vma() with
    gather_pte_stats), under mmap_read_lock (m_start)."""
    await mmap_read_lock(mm)
    try:
        out = []
        for vma in list(mm.vmas):
            md = NumaMapsStats()
            await pagewalk.walk_page_vma(k, vma, SHOW_NUMA_OPS, md)
            out.append(numa_map_line(k, vma, md) + "\n")
        return "".join(out)
    finally:
        await mmap_read_unlock(mm)
