"""HMM: hmm_range_fault() (mm/hmm.c, v6.6), and the mirroring driver pattern around it
(lib/test_hmm.c's dmirror, the reference user).

hmm_range_fault() snapshots the CPU page tables of [start, end) into ``hmm_pfns`` (one
``pfn | HMM_PFN_VALID [| HMM_PFN_WRITE]`` word per page, 0 for nothing there,
HMM_PFN_ERROR for what a device may not map), faulting pages in first when the caller
asks (HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE through ``default_flags``). It holds only
mmap_read_lock and reads the tables locklessly: what it returns is only a guess until the
driver, under the lock its mmu_interval_notifier callback takes, sees
mmu_interval_read_retry() false. The walk:

    hmm_range_fault()     do { -EBUSY if mmu_interval_check_retry(); walk_page_range(
                          hmm_vma_walk.last, end) } while (ret == -EBUSY): every fault and
                          every migration wait is -EBUSY, and the walk restarts from the
                          first address not yet stored (``last``)
    hmm_vma_walk_test()   a VMA without VM_READ (or VM_IO/VM_PFNMAP/VM_MIXEDMAP): -EFAULT
                          when a fault is wanted, else HMM_PFN_ERROR and skip the VMA
    hmm_vma_walk_hole()   no VMA: -EFAULT or HMM_PFN_ERROR; a none pmd: fault, or 0
    hmm_vma_walk_pmd()    ``again:`` pmdp_get_lockless(); none -> hole; migration ->
                          pmd_migration_entry_wait() + -EBUSY when a fault is needed, else
                          0; other non-present -> -EFAULT / HMM_PFN_ERROR; trans huge ->
                          re-read (not huge any more: goto again) and hmm_vma_handle_pmd();
                          bad -> -EFAULT / HMM_PFN_ERROR; then pte_offset_map(pmdp, addr)
                          without the ptl: **failure -> goto again** (RETRY: the pmd is
                          read again, and a retracted table is a hole the second time)
    hmm_vma_handle_pte()  none (or a marker) -> fault or 0; a swap entry -> fault or 0; a
                          migration entry -> pte_unmap, migration_entry_wait, -EBUSY (when
                          a fault is needed) or 0; anything else non-present -> -EFAULT; a
                          present pte -> cpu flags (VALID, WRITE if pte_write, 0 if
                          PROT_NONE), fault if not enough, HMM_PFN_ERROR for a special pfn
                          that is not the zero page
    hmm_vma_fault()       pte_unmap done by the caller; -EPERM for a write fault on a VMA
                          without VM_WRITE; handle_mm_fault(FAULT_FLAG_REMOTE [| WRITE])
                          for every page of [addr, end): -EFAULT on VM_FAULT_ERROR, else
                          -EBUSY (go round again)

Source: the torvalds/linux mm/hmm.c held by the search index is a 5.2-era file (hmm_mirror,
``range->values[]``); the 6.6 shape modelled here (``hmm_pfns``, HMM_PFN_REQ_*,
``pte_offset_map()`` failing into ``goto again``, from the 6.5 series "mm/hmm: retry if
pte_offset_map() fails") is written from the 6.6 source as remembered, not re-read.

Not modelled: device-private / device-exclusive entries (no ZONE_DEVICE here), devmap
pmds, hugetlb (hmm_vma_walk_hugetlb_entry), PUD leaves, the order bits of huge
mappings (HMM_PFN_ORDER_SHIFT: hmm_pfn_to_map_order() is 0 here), ``pfn_flags_mask``
requests per page (only ``default_flags``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import SWP_HWPOISON, Access, Kind
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import memory, mmu_notifier, pagewalk, pgtable
from mm_core.locks import RwSemaphore, mmap_read_lock, mmap_read_unlock
from mm_core.mm import VM_READ, VM_WRITE
from mm_core.swapops import pte_none_mostly

EBUSY, EFAULT, EPERM = 16, 14, 1

# enum hmm_pfn_flags (include/linux/hmm.h, 6.6; BITS_PER_LONG == 64)
HMM_PFN_VALID = 1 << 63
HMM_PFN_WRITE = 1 << 62
HMM_PFN_ERROR = 1 << 61
HMM_PFN_ORDER_SHIFT = 56
HMM_PFN_FLAGS = 0xFF << HMM_PFN_ORDER_SHIFT
HMM_PFN_REQ_FAULT = HMM_PFN_VALID
HMM_PFN_REQ_WRITE = HMM_PFN_WRITE

HMM_NEED_FAULT = 1 << 0
HMM_NEED_WRITE_FAULT = 1 << 1
HMM_NEED_ALL_BITS = HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT

VM_FAULT_ERROR = memory.VM_FAULT_OOM | memory.VM_FAULT_SIGBUS | memory.VM_FAULT_SIGSEGV


def hmm_pfn_to_pfn(hmm_pfn: int) -> int:
    return hmm_pfn & ~HMM_PFN_FLAGS


@dataclass
class HmmRange:
    """struct hmm_range."""

    notifier: mmu_notifier.MmuIntervalNotifier
    start: int
    end: int
    hmm_pfns: list[int]
    notifier_seq: int = 0
    default_flags: int = 0
    pfn_flags_mask: int = 0


@dataclass
class HmmVmaWalk:
    """struct hmm_vma_walk."""

    range: HmmRange
    last: int


def hmm_pte_need_fault(w: HmmVmaWalk, pfn_req_flags: int, cpu_flags: int) -> int:
    """hmm_pte_need_fault(): what fault (none, read, write) the request needs given what
    the CPU page table gives."""
    rng = w.range
    pfn_req_flags = (pfn_req_flags & rng.pfn_flags_mask) | rng.default_flags
    if not pfn_req_flags & HMM_PFN_REQ_FAULT:
        return 0
    if pfn_req_flags & HMM_PFN_REQ_WRITE and not cpu_flags & HMM_PFN_WRITE:
        return HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT
    if not cpu_flags & HMM_PFN_VALID:
        return HMM_NEED_FAULT
    return 0


def hmm_range_need_fault(w: HmmVmaWalk, i: int, npages: int, cpu_flags: int) -> int:
    """hmm_range_need_fault() over hmm_pfns[i:i + npages]."""
    rng = w.range
    if not (rng.default_flags | rng.pfn_flags_mask) & HMM_PFN_REQ_FAULT:
        return 0
    required = 0
    for j in range(i, i + npages):
        required |= hmm_pte_need_fault(w, rng.hmm_pfns[j], cpu_flags)
        if required == HMM_NEED_ALL_BITS:
            break
    return required


def _index(k, w: HmmVmaWalk, addr: int) -> int:
    return (addr - w.range.start) >> k.page_shift


def hmm_pfns_fill(k, w: HmmVmaWalk, addr: int, end: int, cpu_flags: int) -> int:
    """hmm_pfns_fill()."""
    for a in range(addr, end, k.page_size):
        w.range.hmm_pfns[_index(k, w, a)] = cpu_flags
    return 0


async def hmm_vma_fault(k, addr: int, end: int, required_fault: int, walk: pagewalk.MmWalk) -> int:
    """hmm_vma_fault(): fault every page of [addr, end) in; -EBUSY makes
    hmm_range_fault() walk again from ``last`` (RETRY), -EFAULT / -EPERM end it."""
    w: HmmVmaWalk = walk.private
    vma = walk.vma
    w.last = addr
    flags = memory.FAULT_FLAG_REMOTE
    if required_fault & HMM_NEED_WRITE_FAULT:
        if not vma.flags & VM_WRITE:
            return -EPERM
        flags |= memory.FAULT_FLAG_WRITE
    for a in range(addr, end, k.page_size):
        k.stats["hmm_vma_fault"] += 1
        if await memory.handle_mm_fault(k, vma, a, flags) & VM_FAULT_ERROR:
            return -EFAULT
    return -EBUSY


async def hmm_vma_walk_hole(addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """hmm_vma_walk_hole(): the pte_hole callback (no VMA, or a none pmd)."""
    k, w = walk.k, walk.private
    required = hmm_range_need_fault(w, _index(k, w, addr), (end - addr) >> k.page_shift, 0)
    if walk.vma is None:
        if required:
            return -EFAULT
        return hmm_pfns_fill(k, w, addr, end, HMM_PFN_ERROR)
    if required:
        return await hmm_vma_fault(k, addr, end, required, walk)
    return hmm_pfns_fill(k, w, addr, end, 0)


def pmd_to_hmm_pfn_flags(pmd) -> int:
    """pmd_to_hmm_pfn_flags() (without the order bits)."""
    if memory.pte_protnone(pmd):
        return 0
    return HMM_PFN_VALID | (HMM_PFN_WRITE if pmd.prot & Access.W else 0)


async def hmm_vma_handle_pmd(k, walk: pagewalk.MmWalk, addr: int, end: int, pmd) -> int:
    """hmm_vma_handle_pmd(): a THP, read without the pmd lock ("we will get that event
    through mmu_notifier callback")."""
    w: HmmVmaWalk = walk.private
    npages = (end - addr) >> k.page_shift
    cpu_flags = pmd_to_hmm_pfn_flags(pmd)
    required = hmm_range_need_fault(w, _index(k, w, addr), npages, cpu_flags)
    if required:
        return await hmm_vma_fault(k, addr, end, required, walk)
    span = k.arch.levels[k.arch.pmd_level].span
    pfn = (pmd.paddr >> k.page_shift) + ((addr & (span - 1)) >> k.page_shift)
    for i in range(npages):
        w.range.hmm_pfns[_index(k, w, addr) + i] = (pfn + i) | cpu_flags
    return 0


def pte_to_hmm_pfn_flags(pte) -> int:
    """pte_to_hmm_pfn_flags()."""
    if pte.kind is not Kind.LEAF or memory.pte_protnone(pte):
        return 0
    return HMM_PFN_VALID | (HMM_PFN_WRITE if pte.prot & Access.W else 0)


async def hmm_vma_handle_pte(k, walk: pagewalk.MmWalk, addr: int, end: int, pmdp: int,
                             ptep: int) -> int:
    """hmm_vma_handle_pte(): one pte of the lockless map. Every nonzero return has
    done pte_unmap() (the caller unmaps after the last pte otherwise)."""
    w: HmmVmaWalk = walk.private
    i = _index(k, w, addr)
    pte = k.arch.decode(k.arch.pte_level, await pgtable.get_raw(k, ptep))     # ptep_get()
    req = w.range.hmm_pfns[i]
    if pte_none_mostly(pte):
        required = hmm_pte_need_fault(w, req, 0)
        if required:
            return await _fault(k, walk, ptep, addr, end, required)
        w.range.hmm_pfns[i] = 0
        return 0
    if pte.kind is not Kind.LEAF:                       # !pte_present()
        required = hmm_pte_need_fault(w, req, 0)
        if not required:
            w.range.hmm_pfns[i] = 0
            return 0
        if pte.kind is Kind.SWAP and pte.swp_type != SWP_HWPOISON:     # !non_swap_entry()
            return await _fault(k, walk, ptep, addr, end, required)
        if pte.kind is Kind.MIGRATION:
            await pgtable.pte_unmap(k, ptep)
            w.last = addr
            await memory.migration_entry_wait(k, walk.mm, "hmm_migration_entry")
            return -EBUSY
        await pgtable.pte_unmap(k, ptep)                # "Report error for everything else"
        return -EFAULT
    cpu_flags = pte_to_hmm_pfn_flags(pte)
    required = hmm_pte_need_fault(w, req, cpu_flags)
    if required:
        return await _fault(k, walk, ptep, addr, end, required)
    if pte.special and pte.paddr != k.zero_page.paddr:  # !vm_normal_page() && !is_zero_pfn()
        if hmm_pte_need_fault(w, req, 0):
            await pgtable.pte_unmap(k, ptep)
            return -EFAULT
        w.range.hmm_pfns[i] = HMM_PFN_ERROR
        return 0
    w.range.hmm_pfns[i] = (pte.paddr >> k.page_shift) | cpu_flags
    return 0


async def _fault(k, walk: pagewalk.MmWalk, ptep: int, addr: int, end: int, required: int) -> int:
    """hmm_vma_handle_pte()'s ``fault:`` label: pte_unmap(), then hmm_vma_fault()."""
    await pgtable.pte_unmap(k, ptep)
    return await hmm_vma_fault(k, addr, end, required, walk)


async def hmm_vma_walk_pmd(pmdp: int, start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """hmm_vma_walk_pmd(): the pmd_entry callback. A failed pte_offset_map() is
    ``goto again`` (RETRY: read the pmd again)."""
    k, arch = walk.k, walk.k.arch
    w: HmmVmaWalk = walk.private
    npages = (end - start) >> k.page_shift
    i0 = _index(k, w, start)
    addr = start
    while True:                                                     # again:
        pmd = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
        if pmd.kind is Kind.NONE:
            return await hmm_vma_walk_hole(start, end, walk)
        if pmd.kind is Kind.MIGRATION:                              # is_pmd_migration_entry()
            if hmm_range_need_fault(w, i0, npages, 0):
                w.last = addr
                await memory.pmd_migration_entry_wait(k, walk.mm, pmdp)
                return -EBUSY
            return hmm_pfns_fill(k, w, start, end, 0)
        if pmd.kind is Kind.SWAP:                                   # !pmd_present()
            if hmm_range_need_fault(w, i0, npages, 0):
                return -EFAULT
            return hmm_pfns_fill(k, w, start, end, HMM_PFN_ERROR)
        if pmd.kind is Kind.LEAF:                                   # pmd_trans_huge()
            pmd = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
            if pmd.kind is not Kind.LEAF:
                k.stats["hmm_pmd_again"] += 1
                await sched_point("retry", pmdp)
                continue
            return await hmm_vma_handle_pmd(k, walk, addr, end, pmd)
        if pmd.kind is Kind.BAD:                                    # pmd_bad()
            if hmm_range_need_fault(w, i0, npages, 0):
                return -EFAULT
            return hmm_pfns_fill(k, w, start, end, HMM_PFN_ERROR)
        ptep = await pgtable.pte_offset_map(k, pmdp, addr)
        if ptep is None:
            k.stats["hmm_pmd_again"] += 1
            await sched_point("retry", pmdp)
            continue                                                # goto again
        break
    first = ptep
    for a in range(addr, end, k.page_size):
        r = await hmm_vma_handle_pte(k, walk, a, end, pmdp, first + ((a - addr) >> k.page_shift) * 8)
        if r:
            return r                                                # hmm_vma_handle_pte() unmapped
    await pgtable.pte_unmap(k, first + ((end - addr - k.page_size) >> k.page_shift) * 8)
    return 0


async def hmm_vma_walk_test(start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """hmm_vma_walk_test(): a readable VMA is walked; else -EFAULT if a fault is wanted,
    or HMM_PFN_ERROR and the VMA is skipped."""
    k, w = walk.k, walk.private
    if walk.vma.flags & VM_READ:
        return 0
    if hmm_range_need_fault(w, _index(k, w, start), (end - start) >> k.page_shift, 0):
        return -EFAULT
    hmm_pfns_fill(k, w, start, end, HMM_PFN_ERROR)
    return 1


HMM_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=hmm_vma_walk_pmd, pte_hole=hmm_vma_walk_hole,
                                  test_walk=hmm_vma_walk_test)


async def hmm_range_fault(k, rng: HmmRange) -> int:
    """hmm_range_fault(): the caller holds mmap_read_lock. 0, or -EBUSY (the notifier's
    seq moved: the caller starts again with a new mmu_interval_read_begin()), -EFAULT,
    -EPERM."""
    w = HmmVmaWalk(rng, rng.start)
    mm = rng.notifier.mm
    assert mm.mmap_lock.readers or mm.mmap_lock.writer, "mmap_assert_locked()"
    while True:
        if mmu_notifier.mmu_interval_check_retry(rng.notifier, rng.notifier_seq):
            k.stats["hmm_range_fault_seq_busy"] += 1
            return -EBUSY
        ret = await pagewalk.walk_page_range(k, mm, w.last, rng.end, HMM_WALK_OPS, w)
        if ret != -EBUSY:
            return ret
        k.stats["hmm_range_fault_again"] += 1
        await sched_point("retry", rng)


# -- the mirroring driver (lib/test_hmm.c's dmirror) ------------------------------------------

@dataclass(eq=False)
class Dmirror:
    """struct dmirror: a device page table (``pt``: addr -> hmm_pfn) kept in step with the
    CPU's through an mmu_interval_notifier, and the mutex its invalidate callback takes."""

    k: object
    mm: object
    notifier: mmu_notifier.MmuIntervalNotifier | None = None
    pt: dict[int, int] = field(default_factory=dict)
    retries: int = 0

    def __post_init__(self) -> None:
        self.mutex = RwSemaphore(f"dmirror{self.k.next_id('dmirror')}.mutex", "dmirror_mutex")

    async def interval_invalidate(self, sub, rng: mmu_notifier.MmuNotifierRange, cur_seq: int) -> bool:
        """dmirror_interval_invalidate(): under the mutex, set the seq and drop the
        device mappings of the range (dmirror_do_update)."""
        await self.mutex_lock()
        mmu_notifier.mmu_interval_set_seq(sub, cur_seq)
        for a in [a for a in self.pt if rng.start <= a < rng.end]:
            del self.pt[a]
        await self.mutex_unlock()
        return True

    async def mutex_lock(self) -> None:
        await traps.lock(self.mutex, "w")

    async def mutex_unlock(self) -> None:
        await traps.unlock(self.mutex, "w")


async def dmirror_new(k, mm, start: int, length: int) -> Dmirror:
    """dmirror_fops_open() + mmu_interval_notifier_insert() over [start, start + length)."""
    dm = Dmirror(k, mm)
    dm.notifier = await mmu_notifier.mmu_interval_notifier_insert(k, mm, start, length,
                                                                  dm.interval_invalidate)
    return dm


async def dmirror_range_fault(k, dm: Dmirror, start: int, end: int, fault: bool = False,
                              write: bool = False) -> list[int] | int:
    """dmirror_fault() -> dmirror_range_fault() + dmirror_do_fault(): the driver loop

        again: seq = mmu_interval_read_begin(); mmap_read_lock(); hmm_range_fault();
               mmap_read_unlock(); -EBUSY: goto again;
               mutex_lock(); if mmu_interval_read_retry(seq): unlock, goto again;
               program the device page table; mutex_unlock()

    Returns the hmm_pfns (what the device now maps), or -errno. Bug injection
    ``hmm_driver_skips_read_retry``: the device is programmed without the retry check,
    so a zap / retract / mprotect between the walk and the mutex leaves it stale."""
    npages = (end - start) >> k.page_shift
    flags = 0
    if fault:
        flags |= HMM_PFN_REQ_FAULT
    if write:
        flags |= HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
    while True:
        rng = HmmRange(dm.notifier, start, end, [0] * npages, default_flags=flags)
        rng.notifier_seq = await mmu_notifier.mmu_interval_read_begin(k, dm.notifier)
        await mmap_read_lock(dm.mm)
        ret = await hmm_range_fault(k, rng)
        await mmap_read_unlock(dm.mm)
        if ret:
            if ret == -EBUSY:
                dm.retries += 1
                continue
            return ret
        await dm.mutex_lock()
        if "hmm_driver_skips_read_retry" not in k.bugs \
                and mmu_notifier.mmu_interval_read_retry(dm.notifier, rng.notifier_seq):
            await dm.mutex_unlock()
            dm.retries += 1
            k.stats["hmm_driver_read_retry"] += 1
            continue
        break
    for i, pfn in enumerate(rng.hmm_pfns):                    # dmirror_do_fault()
        a = start + (i << k.page_shift)
        if pfn & HMM_PFN_VALID:
            dm.pt[a] = pfn
        else:
            dm.pt.pop(a, None)
    await dm.mutex_unlock()
    return rng.hmm_pfns


async def hmm_range_fault_once(k, mm, start: int, end: int, fault: bool = False,
                               write: bool = False) -> list[int] | int:
    """A mirror of [start, end) made, faulted and torn down (Machine.hmm_range_fault)."""
    dm = await dmirror_new(k, mm, start, end - start)
    try:
        return await dmirror_range_fault(k, dm, start, end, fault, write)
    finally:
        await mmu_notifier.mmu_interval_notifier_remove(k, dm.notifier)
