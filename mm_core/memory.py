"""Faults, zapping and table teardown (mm/memory.c, mm/mmap.c's free_pgtables, kernel/fork.c's
check_mm).

Every function that touches shared state is a coroutine; table entry reads and writes
and lock operations are its scheduling points.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from emu.arch import SWP_HWPOISON, Access, Entry, Kind, leaf_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import filemap, huge_memory, mempolicy, mmu_notifier, pgtable, rmap, userfaultfd
from mm_core.locks import SpinLock, mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import (
    MM_ANONPAGES,
    MM_FILEPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    RSS_NAMES,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_READ,
    VM_SHARED,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    VMA,
    MMStruct,
)
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.pgalloc import pte_frag_destroy
from mm_core.swapops import PTE_MARKER_POISONED, is_pte_marker, pte_marker_get, pte_marker_uffd_wp
from mm_core.tlbflush import flush_tlb_range

# fault flags (include/linux/mm_types.h, enum fault_flag)
FAULT_FLAG_WRITE = 0x1
FAULT_FLAG_ALLOW_RETRY = 0x4
FAULT_FLAG_RETRY_NOWAIT = 0x8
FAULT_FLAG_KILLABLE = 0x10
FAULT_FLAG_TRIED = 0x20
FAULT_FLAG_USER = 0x40
FAULT_FLAG_REMOTE = 0x80
FAULT_FLAG_INSTRUCTION = 0x100
FAULT_FLAG_INTERRUPTIBLE = 0x200
FAULT_FLAG_UNSHARE = 0x400       # break COW of a shared anon page without writing (KSM, GUP pins)
FAULT_FLAG_ORIG_PTE_VALID = 0x800
FAULT_FLAG_DEFAULT = FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE | FAULT_FLAG_INTERRUPTIBLE

# vm_fault_t
VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2
VM_FAULT_SIGSEGV = 0x40
VM_FAULT_NOPAGE = 0x100
VM_FAULT_RETRY = 0x400
VM_FAULT_FALLBACK = 0x800

STACK_GUARD_GAP = 256 * 4096


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
    start without W (copy-on-write); the write fault adds it. A shared mapping registered
    for uffd-wp wants write notification (vma_wants_writenotify(), vma_set_page_prot()):
    no W either, so writes fault and uffd-wp ptes are caught."""
    prot = Access.NONE
    if vm_flags & (VM_READ | VM_WRITE | VM_EXEC):
        prot |= Access.R            # no arch here can express write- or exec-only
    if vm_flags & VM_WRITE and vm_flags & VM_SHARED and not vm_flags & VM_UFFD_WP:
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


async def do_user_addr_fault(k, mm: MMStruct, addr: int, access: Access, user: bool = True) -> FaultResult:
    """do_user_addr_fault() (x86; do_page_fault() on arm64/s390/powerpc): find the VMA
    under mmap_read_lock, check the access, grow the stack, handle_mm_fault(). A
    VM_FAULT_RETRY (handle_userfault() slept on a userfaultfd, mmap_lock already dropped)
    takes the lock again and retries with FAULT_FLAG_TRIED. ``user`` is user_mode(regs):
    False for the kernel's own uaccess faults (copy_{from,to}_user), which then carry no
    FAULT_FLAG_USER (a UFFD_USER_MODE_ONLY userfaultfd answers those with SIGBUS)."""
    k.stats["faults"] += 1
    failures = k.alloc.failures
    flags = FAULT_FLAG_DEFAULT | (FAULT_FLAG_USER if user else 0)
    if access & Access.W:
        flags |= FAULT_FLAG_WRITE
    if access & Access.X:
        flags |= FAULT_FLAG_INSTRUCTION
    while True:                                          # retry:
        await mmap_read_lock(mm)
        locked = True
        try:
            vma = mm.find_vma(addr)
            if vma is not None and vma.start > addr:
                if vma.flags & VM_GROWSDOWN and vma.start - addr <= STACK_GUARD_GAP * 64:
                    vma.start = addr & ~(k.page_size - 1)     # expand_stack()
                else:
                    vma = None
            if vma is None:
                return FaultResult.SEGV_MAPERR
            if access_error(vma, access):
                return FaultResult.SEGV_ACCERR
            ret = await handle_mm_fault(k, vma, addr, flags)
            if ret & VM_FAULT_RETRY:
                locked = False                           # mmap_lock was released for us
                flags |= FAULT_FLAG_TRIED
                k.stats["fault_retry"] += 1
                continue
        finally:
            if locked:
                await mmap_read_unlock(mm)
        break
    if ret & VM_FAULT_OOM:
        return pagefault_out_of_memory(k, k.alloc.failures > failures)
    if ret & VM_FAULT_SIGBUS:
        return FaultResult.SIGBUS
    if ret & VM_FAULT_SIGSEGV:
        return FaultResult.SEGV_ACCERR
    return FaultResult.OK


def pagefault_out_of_memory(k, oom_killed: bool) -> FaultResult:
    """pagefault_out_of_memory() (6.6; since 60e2793d440a, 5.16, the #PF handler no longer
    starts the OOM killer). When an allocation of this fault really failed, the allocator's
    out_of_memory() has chosen a victim, here the faulting task: OOM (SIGKILL). A
    VM_FAULT_OOM with no allocation failure behind it (do_swap_page()'s back-out finding
    the same swap pte after swapin_readahead() gave no folio: the slot was freed by
    another faulter and reused by a swap-out, an ABA pte_same() cannot see) only warns
    and the access is retried (OK: the instruction faults again)."""
    if oom_killed:
        return FaultResult.OOM
    k.stats["pagefault_oom_retry"] += 1
    k.printk("Huh VM_FAULT_OOM leaked out to the #PF handler. Retrying PF")
    return FaultResult.OK


@dataclass
class VmFault:
    """struct vm_fault: what one fault knows as it goes down the levels."""

    vma: VMA
    address: int                 # page-aligned
    flags: int
    pmd: int = 0                 # physical address of the pmd entry
    pte: int | None = None       # mapped pte pointer (holds an RCU read reference in 6.6+)
    ptl: SpinLock | None = None
    orig_pte: int = 0            # raw value read without the lock
    orig_pte_valid: bool = False  # FAULT_FLAG_ORIG_PTE_VALID: orig_pte was read (a marker, say)

    @property
    def write(self) -> bool:
        return bool(self.flags & FAULT_FLAG_WRITE)

    @property
    def unshare(self) -> bool:
        return bool(self.flags & FAULT_FLAG_UNSHARE)


async def handle_mm_fault(k, vma: VMA, addr: int, flags: int) -> int:
    """handle_mm_fault(): account the fault and hand it to __handle_mm_fault()."""
    k.stats["handle_mm_fault"] += 1
    return await __handle_mm_fault(k, vma, addr, flags)


async def __handle_mm_fault(k, vma: VMA, addr: int, flags: int) -> int:
    """__handle_mm_fault(): allocate the upper tables, then the PMD level (huge faults)
    and the PTE level."""
    mm = vma.mm
    vmf = VmFault(vma, addr & ~(k.page_size - 1), flags)
    try:
        pmdp = await pgtable.walk_alloc(k, mm, addr, k.arch.pmd_level)
    except OutOfMemory:
        return VM_FAULT_OOM
    if pmdp is None:
        return VM_FAULT_SIGBUS        # a leaf above the PMD: hugetlb-style mappings are not modelled
    vmf.pmd = pmdp
    pmdval = await pgtable.get_entry(k, pmdp, k.arch.pmd_level)
    if pmdval.kind is Kind.NONE and huge_memory.thp_vma_suitable(k, vma, addr):
        ret = await huge_memory.create_huge_pmd(k, vmf)
        if not ret & VM_FAULT_FALLBACK:
            return ret
    elif pmdval.kind is Kind.LEAF:
        if pte_protnone(pmdval) and vma_is_accessible(vma):      # pmd_protnone()
            return await huge_memory.do_huge_pmd_numa_page(k, vmf, pmdval)
        return await huge_memory.huge_pmd_fault(k, vmf, pmdval)
    elif pmdval.kind is Kind.MIGRATION:
        await pmd_migration_entry_wait(k, mm, pmdp)
        return 0                      # the access (or GUP) looks again
    return await handle_pte_fault(k, vmf)


MIGRATION_WAIT_CYCLES = 1_000_000


async def migration_entry_wait(k, mm, what: str) -> None:
    """migration_entry_wait() / pmd_migration_entry_wait(): the faulting task sleeps until
    the migration is done (Linux sleeps on the locked folio,
    migration_entry_wait_on_locked()); modelled as a sleep of simulated time, after which
    the fault returns 0 and the access (or GUP's retry) looks again."""
    k.stats[f"{what}_wait"] += 1
    await traps.sleep(MIGRATION_WAIT_CYCLES)


async def pmd_migration_entry_wait(k, mm, pmdp: int) -> None:
    """pmd_migration_entry_wait(): under the pmd lock, wait only if it is still a
    migration entry."""
    pml = await pgtable.pmd_lock(k, mm, pmdp)
    still = (await pgtable.get_entry(k, pmdp, k.arch.pmd_level)).kind is Kind.MIGRATION
    await traps.unlock(pml)
    if still:
        await migration_entry_wait(k, mm, "pmd_migration_entry")


async def handle_pte_fault(k, vmf: VmFault) -> int:
    """handle_pte_fault(): map without the lock, then revalidate with pte_same under ptl.
    A map failure is FAULT-RETRY: return 0 and let the access fault again."""
    mm, arch = vmf.vma.mm, k.arch
    pte_level = arch.pte_level
    pmdval = await pgtable.get_entry(k, vmf.pmd, arch.pmd_level)
    if pmdval.kind is Kind.NONE:
        vmf.pte = None
    else:
        mapped = await pgtable.pte_offset_map_for_write_nolock(k, mm, vmf.pmd, vmf.address)
        if mapped is None:
            k.stats["fault_retry_map_failed"] += 1
            return 0
        vmf.pte, vmf.ptl, _ = mapped
        vmf.orig_pte = await pgtable.get_raw(k, vmf.pte)
        if arch.decode(pte_level, vmf.orig_pte).kind is Kind.NONE:
            await pgtable.pte_unmap(k, vmf.pte)
            vmf.pte = None
    if vmf.pte is None:
        return await do_pte_missing(k, vmf)
    entry = arch.decode(pte_level, vmf.orig_pte)
    if entry.kind is Kind.MIGRATION:  # do_swap_page() -> migration_entry_wait()
        await pgtable.pte_unmap(k, vmf.pte)
        await migration_entry_wait(k, mm, "migration_entry")
        return 0
    if entry.kind is not Kind.LEAF:
        if is_pte_marker(entry):
            return await do_swap_page_marker(k, vmf, entry)
        if entry.kind is Kind.SWAP and entry.swp_type == SWP_HWPOISON:
            await pgtable.pte_unmap(k, vmf.pte)
            return VM_FAULT_SIGBUS        # do_swap_page(): is_hwpoison_entry() -> VM_FAULT_HWPOISON
        return await do_swap_page(k, vmf)           # !pte_present()
    if pte_protnone(entry) and vma_is_accessible(vmf.vma):
        return await do_numa_page(k, vmf)
    await traps.lock(vmf.ptl)
    if await pgtable.get_raw(k, vmf.pte) != vmf.orig_pte:
        await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
        return 0                      # someone else changed it: the access retries
    if vmf.write or vmf.unshare:
        if not entry.prot & Access.W:
            return await do_wp_page(k, vmf, entry)
        if vmf.write:
            entry = pgtable.pte_mkdirty(k, entry)
    new = entry.with_(young=True)
    if arch.encode(pte_level, new) != vmf.orig_pte:
        # ptep_set_access_flags(): only ever adds young/dirty, no flush needed
        await pgtable.set_entry(k, vmf.pte, pte_level, new)
    await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
    return 0


async def do_pte_missing(k, vmf: VmFault) -> int:
    """do_pte_missing(): a none pte (or a uffd-wp marker) in an anonymous or a file VMA."""
    if vmf.vma.anonymous:
        return await do_anonymous_page(k, vmf)
    return await filemap.do_fault(k, vmf)


async def do_swap_page_marker(k, vmf: VmFault, entry: Entry) -> int:
    """do_swap_page() of a pte marker: pte_unmap_same() (recheck under the ptl, unmap),
    then handle_pte_marker(): a uffd-wp marker in a uffd-wp VMA (file, or anon since 6.4's
    WP_UNPOPULATED: pte_marker_handle_uffd_wp() no longer clears anon ones) is a missing
    pte whose refault installs the page write-protected (FAULT_FLAG_ORIG_PTE_VALID:
    finish_fault() / do_anonymous_page() compare against the marker); a leftover one (VMA
    no longer uffd-wp) is cleared (pte_marker_clear(): FAULT-RETRY on a failed map or a
    changed pte); an unknown marker is VM_FAULT_SIGBUS. A PTE_MARKER_POISONED one (UFFDIO_POISON,
    6.6; before that PTE_MARKER_SWAPIN_ERROR) comes first ("Higher priority than uffd-wp when
    data corrupted"): VM_FAULT_HWPOISON, folded into VM_FAULT_SIGBUS here as for hwpoison
    entries and __do_fault()'s PageHWPoison (the arch handler's SIGBUS, BUS_MCEERR_AR)."""
    await traps.lock(vmf.ptl)                                        # pte_unmap_same()
    same = await pgtable.get_raw(k, vmf.pte) == vmf.orig_pte
    await traps.unlock(vmf.ptl)
    await pgtable.pte_unmap(k, vmf.pte)
    vmf.pte = None
    if not same:
        return 0
    marker = pte_marker_get(entry)
    if not marker:                                                   # WARN_ON_ONCE(!marker)
        return VM_FAULT_SIGBUS
    if marker & PTE_MARKER_POISONED:
        k.stats["fault_poison_marker"] += 1
        return VM_FAULT_SIGBUS                                       # VM_FAULT_HWPOISON
    if not pte_marker_uffd_wp(entry):
        return VM_FAULT_SIGBUS                                       # an unknown marker
    if not vmf.vma.uffd_wp:                                          # pte_marker_clear()
        locked = await pgtable.pte_offset_map_lock(k, vmf.vma.mm, vmf.pmd, vmf.address)
        if locked is None:
            return 0
        ptep, ptl = locked
        if await pgtable.get_raw(k, ptep) == vmf.orig_pte:
            await pgtable.clear_entry(k, ptep, k.arch.pte_level)
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return 0
    vmf.orig_pte_valid = True
    vmf.flags |= FAULT_FLAG_ORIG_PTE_VALID
    return await do_pte_missing(k, vmf)                             # pte_marker_handle_uffd_wp()


async def vmf_pte_changed(k, vmf: VmFault, ptep: int) -> bool:
    """vmf_pte_changed(): under the ptl, the pte is no longer what the fault saw: the
    orig_pte (a marker) if it was read, else "not none"."""
    if vmf.orig_pte_valid:
        return await pgtable.get_raw(k, ptep) != vmf.orig_pte
    return (await pgtable.get_entry(k, ptep, k.arch.pte_level)).kind is not Kind.NONE


def pte_protnone(pte: Entry) -> bool:
    """pte_protnone(): present to Linux but inaccessible (PAGE_NONE: x86 _PAGE_PROTNONE,
    arm64 PTE_PRESENT_INVALID, ...). In an accessible VMA only NUMA hinting makes one."""
    return pte.kind is Kind.LEAF and pte.prot == Access.NONE


def vma_is_accessible(vma: VMA) -> bool:
    return bool(vma.flags & (VM_READ | VM_WRITE | VM_EXEC))


def can_change_pte_writable(k, vma: VMA, pte: Entry) -> bool:
    """can_change_pte_writable(): a private mapping may map an exclusive anon page
    writable without a fault; a shared one a dirty pte (no write-notify here)."""
    if not vma.flags & VM_WRITE or pte_protnone(pte):
        return False
    if not vma.flags & VM_SHARED:
        page = None if pte.special else k.alloc.page_of(pte.paddr)
        return page is not None and page.use is PageUse.ANON and page.refcount == 1 \
            and not page.extra.get("ksm")             # PageAnonExclusive()
    return pte.dirty


async def do_numa_page(k, vmf: VmFault) -> int:
    """do_numa_page() (6.6): a NUMA hinting fault on a PAGE_NONE pte that
    change_prot_numa() made. Entered with the pte mapped (pte_offset_map_nolock() in
    handle_pte_fault()) and the ptl it named: spin_lock(vmf->ptl), then pte_same() against
    orig_pte; a changed pte is ``goto out``: return 0 (FAULT-RETRY: the access faults
    again). numa_migrate_prep() -> mpol_misplaced() (mm_core/mempolicy.py) names a target
    node for a small folio away from the faulting CPU's node under the default policy:
    the pte is unmapped and unlocked, migrate_misplaced_folio() moves it (return 0: the
    refault finds the new pte); if that fails, pte_offset_map_lock() again: a failed map
    or a changed pte is ``goto out`` (FAULT-RETRY), else ``out_map``. ``out_map`` restores
    the VMA's protection (pte_modify(old_pte, vma->vm_page_prot), young, writable if it
    may be, never after a failed migration) in place. Not modelled: task_numa_fault()'s
    statistics beyond counters, memory tiering, large folios (``out_map``, as 6.6)."""
    from mm_core import mempolicy
    vma, arch = vmf.vma, k.arch
    await traps.lock(vmf.ptl)
    if await pgtable.get_raw(k, vmf.pte) != vmf.orig_pte:
        await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
        k.stats["numa_fault_pte_changed"] += 1
        return 0                                              # goto out: FAULT-RETRY
    old = arch.decode(arch.pte_level, vmf.orig_pte)
    pte = old.with_(prot=vm_get_page_prot(vma.flags))         # pte_modify(old_pte, vm_page_prot)
    writable = bool(pte.prot & Access.W)
    if not writable and vma.flags & VM_WRITE and not vma.flags & VM_SHARED \
            and can_change_pte_writable(k, vma, pte):         # vma_wants_manual_pte_write_upgrade()
        writable = True
    folio = None if old.special else k.alloc.page_of(old.paddr)   # vm_normal_folio()
    if folio is not None and folio.order == k.page_order:    # a large folio: out_map
        target = mempolicy.mpol_misplaced(k, folio, vma, vmf.address)
        if target != mempolicy.NUMA_NO_NODE:
            await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
            vmf.pte = None
            writable = False
            if await mempolicy.migrate_misplaced_folio(k, folio, vma, vmf.address, False, target):
                k.stats["numa_hint_faults"] += 1
                return 0
            locked = await pgtable.pte_offset_map_lock(k, vma.mm, vmf.pmd, vmf.address)
            if locked is None:
                k.stats["numa_fault_remap_failed"] += 1
                return 0                                      # goto out: FAULT-RETRY
            vmf.pte, vmf.ptl = locked
            if await pgtable.get_raw(k, vmf.pte) != vmf.orig_pte:
                await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
                k.stats["numa_fault_pte_changed"] += 1
                return 0                                      # goto out
    pte = pte.with_(young=True)                               # out_map: pte_mkyoung()
    if writable:
        pte = pte.with_(prot=pte.prot | Access.W)             # pte_mkwrite()
    # ptep_modify_prot_start() + ptep_modify_prot_commit(): the pte goes from PAGE_NONE to
    # more access, which needs no TLB flush
    await pgtable.set_entry(k, vmf.pte, arch.pte_level, pte)
    await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
    k.stats["numa_hint_faults"] += 1                          # task_numa_fault()
    return 0


async def do_swap_page(k, vmf: VmFault) -> int:
    """do_swap_page() (6.6), entered with the pte mapped (pte_offset_map_nolock) and
    ``vmf.orig_pte`` read without the lock. pte_unmap_same() (64-bit: just pte_unmap),
    then: a migration entry waits (FAULT-RETRY: return 0, refault once it is done); a swap
    entry pins the area (get_swap_device(): none once swapoff got past try_to_unuse, then
    return 0 and refault), takes the folio from the swap cache or swapin_readahead(),
    folio_lock_or_retry() (a locked folio with FAULT_FLAG_ALLOW_RETRY on the first try:
    mmap_lock dropped, VM_FAULT_RETRY; else folio_lock(), sleeping: no map held), checks
    it is still the swap cache's folio for the entry (else FAULT-RETRY), and maps it
    under pte_offset_map_lock() if pte_same() still holds: a failed map or a changed pte
    is FAULT-RETRY (``out_nomap``: someone else, another thread or swapoff, faulted it in
    first). swap_free(), folio_free_swap() when should_try_to_free_swap();
    MM_SWAPENTS -> MM_ANONPAGES; writable at once when the
    entry was exclusive (or the folio's only reference is ours), else do_wp_page().

    SWP_SYNCHRONOUS_IO (``si.synchronous_io``) with a swap count of 1 and no swap-cache
    folio: the swap cache is skipped (swapin_skip_swapcache(): a new folio read directly,
    certainly exclusive). 6.6.0 has nothing but pte_same() between two such faulters, and
    pte_same() cannot see an ABA (the winner maps, frees the slot, and a swap-out reuses
    it for the same entry value: the loser maps its stale copy). 13ddaf26be32 (6.8, 6.6.19;
    ``k.profile.swapin_skip_swapcache_prepare``) pins the slot first with
    swapcache_prepare(): on failure schedule_timeout_uninterruptible(1) and FAULT-RETRY
    (``goto out``); the pin goes with swapcache_clear() after the ptl is dropped."""
    from mm_core import shmem, swap_state, swapfile
    mm, arch, vma = vmf.vma.mm, k.arch, vmf.vma
    await pgtable.pte_unmap(k, vmf.pte)             # pte_unmap_same()
    vmf.pte = None
    ent = arch.decode(arch.pte_level, vmf.orig_pte)
    if ent.kind is Kind.MIGRATION:
        k.stats["migration_entry_wait"] += 1        # migration_entry_wait(): refault after it
        return 0
    if not swapfile.is_swap_pte(ent):
        k.printk(f"BUG: Bad page map in process: pte:{vmf.orig_pte:#018x} at {vmf.address:#x}")
        return VM_FAULT_SIGBUS                      # print_bad_pte(): a marker or hwpoison entry
    si = swapfile.get_swap_device(k, ent)
    if si is None:
        k.stats["do_swap_page_no_device"] += 1
        return 0
    need_clear_cache = False
    try:
        off = ent.swp_offset
        folio = await swap_state.swap_cache_get_folio(k, off)
        swapcache = folio
        if folio is None:
            if si.synchronous_io and si.count(off) == 1:
                # skip the swap cache (SWP_SYNCHRONOUS_IO, __swap_count() == 1)
                if k.profile.swapin_skip_swapcache_prepare:
                    # 13ddaf26be32: pin the slot with SWAP_HAS_CACHE so that a parallel
                    # swap-in cannot free it and a swap-out reuse it (ABA for pte_same)
                    if await swapfile.swapcache_prepare(k, ent):
                        k.stats["do_swap_page_skip_swapcache_eexist"] += 1
                        await traps.sleep(1)             # schedule_timeout_uninterruptible(1)
                        return 0                         # goto out: FAULT-RETRY
                    need_clear_cache = True
                folio = await swap_state.swapin_skip_swapcache(k, ent, vma, vmf.address)
            else:
                folio = await swap_state.swapin_readahead(k, ent, vmf)
                swapcache = folio
            if folio is None:
                # back out if somebody else faulted in this pte meanwhile
                ret = 0
                locked = await pgtable.pte_offset_map_lock(k, mm, vmf.pmd, vmf.address)
                if locked is not None:
                    if await pgtable.get_raw(k, locked[0]) == vmf.orig_pte:
                        ret = VM_FAULT_OOM
                    await pgtable.pte_unmap_unlock(k, *locked)
                return ret
            k.stats["swap_major_fault"] += 1        # VM_FAULT_MAJOR
        if not await folio_lock_or_retry(k, folio, vmf):
            put_page(k, folio)                      # out_release (mmap_lock already dropped)
            return VM_FAULT_RETRY
        if swapcache is not None and folio.extra.get("swap") != off:
            # folio_free_swap() or swapoff released the swap cache under us: refault
            k.stats["do_swap_page_not_swapcache"] += 1
            shmem.folio_unlock(folio)
            put_page(k, folio)
            return 0
        locked = await pgtable.pte_offset_map_lock(k, mm, vmf.pmd, vmf.address)
        if locked is not None and "do_swap_page_without_pte_same" in k.bugs:
            pass                                        # bug injection: no pte_same() recheck
        elif locked is None or await pgtable.get_raw(k, locked[0]) != vmf.orig_pte:
            # out_nomap: the table went or the pte changed (faulted in by someone else)
            k.stats["do_swap_page_map_failed" if locked is None else "do_swap_page_pte_changed"] += 1
            if locked is not None:
                await pgtable.pte_unmap_unlock(k, *locked)
            shmem.folio_unlock(folio)
            put_page(k, folio)
            return 0
        vmf.pte, vmf.ptl = locked
        if not folio.extra.get("uptodate"):
            await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
            shmem.folio_unlock(folio)
            put_page(k, folio)
            return VM_FAULT_SIGBUS
        # a fresh folio never exposed in the swap cache is certainly exclusive
        exclusive = ent.exclusive or swapcache is None
        await swapfile.swap_free(k, ent)
        if should_try_to_free_swap(k, folio, vma, vmf.flags):
            await swapfile.folio_free_swap(k, folio)
        mm.rss[MM_ANONPAGES] += 1
        mm.rss[MM_SWAPENTS] -= 1
        prot = vm_get_page_prot(vma.flags)
        dirty = False
        flags = vmf.flags
        # our lookup reference becomes the mapping's: the folio's only one when it is 1
        if exclusive or folio.refcount == 1:
            if vmf.write:
                if vma.flags & VM_WRITE:                # maybe_mkwrite(pte_mkdirty())
                    prot |= Access.W
                dirty = True
                flags &= ~FAULT_FLAG_WRITE
            exclusive = True
        folio.refcount -= 1                             # page_add_anon_rmap() takes it back
        swapfile.page_add_anon_rmap(k, folio, vma, vmf.address, exclusive)
        pte = leaf_entry(folio.paddr, prot, young=True, dirty=dirty, soft_dirty=ent.soft_dirty,
                         uffd_wp=ent.uffd_wp)
        await pgtable.set_entry(k, vmf.pte, arch.pte_level, pte)
        shmem.folio_unlock(folio)
        k.stats["do_swap_page"] += 1
        if flags & FAULT_FLAG_WRITE:
            vmf.orig_pte = arch.encode(arch.pte_level, pte)
            return await do_wp_page(k, vmf, pte)
        await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
        return 0
    finally:
        if need_clear_cache:                            # after the ptl is dropped
            await swapfile.swapcache_clear(k, si, ent)
        swapfile.put_swap_device(si)


async def folio_lock_or_retry(k, folio, vmf: VmFault) -> bool:
    """folio_lock_or_retry() (6.6): folio_trylock(); failing that, with
    fault_flag_allow_retry_first() (FAULT_FLAG_ALLOW_RETRY and not yet FAULT_FLAG_TRIED),
    __folio_lock_or_retry() releases the fault's mmap_read_lock (release_fault_lock()),
    waits for the folio to be unlocked (folio_wait_locked(): not taking it) and returns
    false: the fault returns VM_FAULT_RETRY with mmap_lock dropped (FAULT-RETRY);
    FAULT_FLAG_RETRY_NOWAIT returns false still holding the lock. Without ALLOW_RETRY
    (GUP, KSM), or on the retried fault: folio_lock() (sleeps)."""
    from mm_core import shmem
    flags = vmf.flags
    if not (flags & FAULT_FLAG_ALLOW_RETRY and not flags & FAULT_FLAG_TRIED):
        await shmem.folio_lock(k, folio)
        return True
    if await shmem.folio_trylock(k, folio):
        return True
    k.stats["folio_lock_or_retry_failed"] += 1
    if flags & FAULT_FLAG_RETRY_NOWAIT:
        return False
    await mmap_read_unlock(vmf.vma.mm)                  # release_fault_lock()
    await shmem.folio_lock(k, folio)                    # folio_wait_locked(): wait for the bit,
    shmem.folio_unlock(folio)                           # with no scheduling point in between
    return False


def should_try_to_free_swap(k, folio, vma, fault_flags: int) -> bool:
    """should_try_to_free_swap(): free the slot at swap-in when swap is more than half
    full, the VMA is mlocked, or a write fault holds the only other reference (cache + ours)."""
    from mm_core.mm import VM_LOCKED
    from mm_core.swapfile import vm_swap_full
    if "swap" not in folio.extra:
        return False
    if vm_swap_full(k.swap_info) or vma.flags & VM_LOCKED:
        return True
    return bool(fault_flags & FAULT_FLAG_WRITE) and folio.refcount == 2


def vmf_orig_pte_uffd_wp(k, vmf: VmFault) -> bool:
    """vmf_orig_pte_uffd_wp() (6.4+): the fault came through a uffd-wp marker
    (FAULT_FLAG_ORIG_PTE_VALID and orig_pte a uffd-wp marker)."""
    return vmf.orig_pte_valid and pte_marker_uffd_wp(k.arch.decode(k.arch.pte_level, vmf.orig_pte))


async def do_anonymous_page(k, vmf: VmFault) -> int:
    """do_anonymous_page(): the zero page for a read, a fresh zeroed page for a write.
    pte_alloc() is called separately so OOM is told apart from a map failure. A fault
    through a uffd-wp marker (WP_UNPOPULATED, 6.4+: vmf_orig_pte_uffd_wp()) maps either
    write-protected with the uffd-wp bit, so a write faults again and goes to the
    userfaultfd; the recheck under the ptl is vmf_pte_changed() (against the marker)."""
    vma, arch = vmf.vma, k.arch
    mm = vma.mm
    uffd_wp = vmf_orig_pte_uffd_wp(k, vmf)
    if not await pgtable.pte_alloc(k, mm, vmf.pmd):
        return VM_FAULT_OOM
    prot = vm_get_page_prot(vma.flags)
    page = None
    if not vmf.write:
        entry = leaf_entry(k.zero_page.paddr, prot & ~Access.W, special=True, young=True)
    else:
        vma.anon_vma = True                                # anon_vma_prepare()
        try:
            page = mempolicy.vma_alloc_folio(k, vma, vmf.address, k.page_order, owner=mm)
        except OutOfMemory:
            return VM_FAULT_OOM
        if vma.flags & VM_WRITE:
            prot |= Access.W
        entry = pgtable.pte_mkdirty(k, leaf_entry(page.paddr, prot, young=True))
    locked = await pgtable.pte_offset_map_lock(k, mm, vmf.pmd, vmf.address)
    if locked is None:                 # FAULT-RETRY
        if page is not None:
            k.alloc.free_pages(page)
        return 0
    ptep, ptl = locked
    if await vmf_pte_changed(k, vmf, ptep):
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        if page is not None:
            k.alloc.free_pages(page)
        return 0
    if vma.uffd_missing:                # deliver the page fault to userland, checked inside the ptl
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        if page is not None:
            k.alloc.free_pages(page)
        return await userfaultfd.handle_userfault(k, vmf, VM_UFFD_MISSING)
    if page is not None:
        page.mapcount = 1
        rmap.folio_add_new_anon_rmap(k, page, vma, vmf.address)
        mm.rss[MM_ANONPAGES] += 1
        k.stats["anon_pages_faulted"] += 1
    else:
        k.stats["zero_page_mapped"] += 1
    if uffd_wp:                                     # setpte: pte_mkuffd_wp() (write-protects)
        entry = entry.with_(prot=entry.prot & ~Access.W, uffd_wp=True)
        k.stats["anon_uffd_wp_refault"] += 1
    await pgtable.set_entry(k, ptep, arch.pte_level, entry)
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


async def do_wp_page(k, vmf: VmFault, entry: Entry) -> int:
    """do_wp_page(): a write to a present, write-protected PTE; called with the pte mapped
    and ptl held, returns with both released. An exclusive anon page is reused in place;
    the zero page, a page-cache page in a private mapping or a shared page is copied. A
    uffd-wp pte in a uffd-wp VMA goes to the userfaultfd instead (handle_userfault(
    VM_UFFD_WP)), after the pte is unmapped and unlocked."""
    arch = k.arch
    if vmf.vma.uffd_wp and entry.uffd_wp:                           # userfaultfd_pte_wp()
        await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
        return await userfaultfd.handle_userfault(k, vmf, VM_UFFD_WP)
    page = None if entry.special else k.alloc.page_of(entry.paddr)
    if vmf.vma.flags & VM_SHARED and page is not None and page.use is not PageUse.ANON:
        # wp_page_shared(): a shared file page just becomes writable and dirty
        k.stats["wp_shared"] += 1
        await pgtable.set_entry(k, vmf.pte, arch.pte_level,
                                pgtable.pte_mkdirty(k, entry.with_(prot=entry.prot | Access.W, young=True)))
        await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
        return 0
    if page is not None and page.use is PageUse.ANON and not page.extra.get("ksm") \
            and await wp_can_reuse_anon_folio(k, page):   # never a KSM folio
        if vmf.unshare:                                 # exclusive already: nothing to unshare
            await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
            return 0
        # wp_page_reuse()
        k.stats["wp_reuse"] += 1
        await pgtable.set_entry(k, vmf.pte, arch.pte_level,
                                pgtable.pte_mkdirty(k, entry.with_(prot=entry.prot | Access.W, young=True)))
        await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
        return 0
    await pgtable.pte_unmap_unlock(k, vmf.pte, vmf.ptl)
    return await wp_page_copy(k, vmf, entry, page)


async def wp_can_reuse_anon_folio(k, folio) -> bool:
    """wp_can_reuse_anon_folio(): ours alone (one reference), or ours and the swap
    cache's: then, if folio_trylock() succeeds, folio_free_swap() and look again."""
    if folio.refcount == 1:
        return True
    if "swap" not in folio.extra or folio.refcount != 2:
        return False
    from mm_core import shmem, swapfile
    if not await shmem.folio_trylock(k, folio):
        return False
    await swapfile.folio_free_swap(k, folio)
    shmem.folio_unlock(folio)
    return folio.refcount == 1


async def wp_page_copy(k, vmf: VmFault, orig: Entry, old_page) -> int:
    """wp_page_copy(): copy into a new page outside the lock, then re-map with
    pte_offset_map_lock and install it if pte_same still holds (a map failure or a
    changed pte is FAULT-RETRY)."""
    mm, arch = vmf.vma.mm, k.arch
    rmap.anon_vma_prepare(k, vmf.vma)
    try:
        new_page = mempolicy.vma_alloc_folio(k, vmf.vma, vmf.address, k.page_order, owner=mm,
                                             zero=orig.special)
    except OutOfMemory:
        return VM_FAULT_OOM
    if not orig.special:
        k.physmem.copy(new_page.paddr, orig.paddr, k.page_size)
    locked = await pgtable.pte_offset_map_lock(k, mm, vmf.pmd, vmf.address)
    if locked is None or await pgtable.get_raw(k, locked[0]) != vmf.orig_pte:
        if locked is not None:
            await pgtable.pte_unmap_unlock(k, *locked)
        k.alloc.free_pages(new_page)
        return 0
    ptep, ptl = locked
    # FAULT_FLAG_UNSHARE: the copy gets vm_page_prot as it is (no write, not dirty)
    prot = vm_get_page_prot(vmf.vma.flags) | (Access.NONE if vmf.unshare else Access.W)
    new_page.mapcount = 1
    rmap.folio_add_new_anon_rmap(k, new_page, vmf.vma, vmf.address)
    # ptep_clear_flush() + set_pte_at()
    await pgtable.set_entry(k, ptep, arch.pte_level,
                            pgtable.pte_mkdirty(k, leaf_entry(new_page.paddr, prot, young=True))
                            if not vmf.unshare else leaf_entry(new_page.paddr, prot, young=True))
    await flush_tlb_range(k, mm, vmf.address, vmf.address + k.page_size)
    mm.rss[MM_ANONPAGES] += 1
    if old_page is not None:
        _put_mapped_page(k, mm, old_page)
    k.stats["wp_copy"] += 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


def mm_counter(page) -> int:
    """mm_counter(): which rss counter a mapped page is accounted to."""
    return {PageUse.ANON: MM_ANONPAGES, PageUse.SHMEM: MM_SHMEMPAGES}.get(page.use, MM_FILEPAGES)


def add_mapped_page(k, mm: MMStruct, page, nr: int = 1) -> None:
    """folio_add_*_rmap() + get_page(): one more mapping (of ``nr`` pages) and reference."""
    page.mapcount += 1
    page.refcount += 1
    mm.rss[mm_counter(page)] += nr


def _put_mapped_page(k, mm: MMStruct, page, nr: int = 1, tlb: list | None = None) -> None:
    """folio_remove_rmap() + put_page(): drop one mapping (of ``nr`` pages) and reference."""
    page.mapcount -= 1
    mm.rss[mm_counter(page)] -= nr
    put_page(k, page, tlb)


def put_page(k, page, tlb: list | None = None) -> None:
    """Drop a reference; the last one frees the page, or, under an mmu_gather (``tlb``),
    queues it to be freed after the TLB flush (tlb_finish_mmu): until every vCPU has
    dropped its translation the frame must not be reused."""
    page.refcount -= 1
    if page.refcount == 0:
        if tlb is not None:
            tlb.append(page)
        else:
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

    try:
        async for item in down(mm.pgd, 0, start, end):
            yield item
    finally:
        down = None     # it reaches itself through its closure: a cycle only the collector frees


# zap_flags_t (include/linux/mm_types.h) and struct zap_details (mm/memory.c, 6.6)
ZAP_FLAG_DROP_MARKER = 1 << 0       # drop uffd-wp markers of file VMAs too
ZAP_FLAG_UNMAP = 1 << 1             # the VMA is going away (unmap_vmas: munmap, exit)


@dataclass
class ZapDetails:
    """struct zap_details: ``even_cows`` (zap private COWed pages too), ``zap_flags``.
    A NULL ``details`` (MADV_DONTNEED in 6.6: zap_page_range_single(..., NULL)) zaps COWs
    and keeps file uffd-wp markers. 6.14's MADV_DONTNEED passes {reclaim_pt, even_cows},
    which keeps them as well; ``reclaim_pt`` is the ``reclaim_pt`` argument here."""

    even_cows: bool = False
    zap_flags: int = 0


# unmap_vmas() (6.6): munmap's unmap_region() and exit_mmap()
ZAP_UNMAP_DETAILS = ZapDetails(even_cows=True, zap_flags=ZAP_FLAG_DROP_MARKER | ZAP_FLAG_UNMAP)


def should_zap_cows(details: ZapDetails | None) -> bool:
    """should_zap_cows(): by default (NULL details) zap all pages, COWed anon ones too."""
    return details is None or details.even_cows


def should_zap_folio(details: ZapDetails | None, page) -> bool:
    """should_zap_folio(): with even_cows off only page-cache folios go (the zero page,
    no folio, goes too)."""
    if should_zap_cows(details) or page is None:
        return True
    return page.use is not PageUse.ANON


def zap_drop_file_uffd_wp(details: ZapDetails | None) -> bool:
    """zap_drop_file_uffd_wp() (6.6; zap_drop_markers() later): NULL details keep the
    markers, only ZAP_FLAG_DROP_MARKER (unmap_vmas, unmap_mapping_folio) drops them."""
    return details is not None and bool(details.zap_flags & ZAP_FLAG_DROP_MARKER)


def pte_swp_uffd_wp_any(pte: Entry) -> bool:
    """pte_swp_uffd_wp_any(): a swap pte with the uffd-wp bit, or a uffd-wp marker."""
    return (pte.kind in (Kind.SWAP, Kind.MIGRATION) and pte.uffd_wp) or pte_marker_uffd_wp(pte)


async def pte_install_uffd_wp_if_needed(k, vma: VMA, ptep: int, pteval: Entry) -> bool:
    """pte_install_uffd_wp_if_needed() (include/linux/mm_inline.h; void in 6.6, bool "a
    marker was installed" later, for PT_RECLAIM): after a pte of a uffd-wp file VMA was
    cleared under its ptl, put PTE_MARKER_UFFD_WP in its place when the old value was
    write-protected by uffd-wp (a present pte with the bit, a swap pte with it, or a
    marker), so the next access faults and a write goes to the userfaultfd. Anonymous
    VMAs never get one here (zapping anon memory drops the data; with WP_UNPOPULATED the
    refault of a none pte traps anyway). The pte is already cleared, in a table the caller
    has mapped: nothing to allocate, and no TLB flush (none -> marker). Cannot fail."""
    from mm_core.swapops import PTE_MARKER_UFFD_WP, make_pte_marker
    arch = k.arch
    if vma.anonymous or not vma.uffd_wp:
        return False
    # WARN_ON_ONCE(!pte_none(ptep_get(pte))): read under the ptl the caller holds
    assert arch.decode(arch.pte_level, k.physmem.read_entry(ptep)).kind is Kind.NONE
    if not ((pteval.kind is Kind.LEAF and pteval.uffd_wp) or pte_swp_uffd_wp_any(pteval)):
        return False
    await pgtable.set_entry(k, ptep, arch.pte_level, make_pte_marker(PTE_MARKER_UFFD_WP))
    k.stats["uffd_wp_markers_kept"] += 1
    return True


async def zap_install_uffd_wp_if_needed(k, vma: VMA, ptep: int, details: ZapDetails | None,
                                        pteval: Entry) -> bool:
    """zap_install_uffd_wp_if_needed() (mm/memory.c, 6.6): zapping a file-backed range may
    need to leave a uffd-wp marker; zap on anonymous memory always drops everything, and
    ZAP_FLAG_DROP_MARKER (the VMA or the page goes) drops it. Cannot fail."""
    if vma.anonymous or zap_drop_file_uffd_wp(details):
        return False
    return await pte_install_uffd_wp_if_needed(k, vma, ptep, pteval)


async def zap_pte_range(k, mm: MMStruct, pmdp: int, start: int, end: int, tlb: list | None = None,
                        reclaim_pt: bool = False, vma: VMA | None = None,
                        details: ZapDetails | None = None) -> bool:
    """zap_pte_range(): clear every PTE in [start, end) under ptl and drop the pages.
    Returns False without progress when the PTE table could not be mapped; the caller
    (zap_pmd_range) then looks at the same pmd again (RETRY). With ``reclaim_pt``
    (6.14 PT_RECLAIM, reclaim_pt_is_enabled(): MADV_DONTNEED over a whole PMD extent) the
    emptied table goes too: the fast path try_get_and_clear_pmd() under the ptl, then
    free_pte(); its pml trylock failing is the slow path try_to_free_pte().

    uffd-wp (6.6, ``vma`` and ``details``): in a uffd-wp file VMA a write-protected pte
    (present, or swap, with the bit) is replaced by PTE_MARKER_UFFD_WP and an existing
    uffd-wp marker stays, unless ``details`` has ZAP_FLAG_DROP_MARKER (unmap_vmas, the
    VMA goes); anon VMAs drop their markers. A pte skipped or a marker left makes the table
    not empty: 6.14 does not reclaim it (``any_skipped``). With even_cows off (not used by
    the callers modelled) anon folios and swap ptes are skipped."""
    from mm_core.swapfile import free_swap_and_cache, is_swap_pte
    arch = k.arch
    can_reclaim_pt = reclaim_pt and k.profile.pt_reclaim and end - start >= arch.levels[arch.pmd_level].span
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, start)
    if locked is None:
        return False
    ptep, ptl = locked
    empty = arch.empty_value(arch.pte_level)
    raws = await pgtable.get_raws_locked(k, ptep, (end - start) >> k.page_shift)
    any_skipped = False
    for i in pgtable.nonempty(raws, empty):
        raw = raws[i]
        entp = ptep + i * 8
        ent = arch.decode(arch.pte_level, raw)
        if ent.kind is Kind.LEAF:
            page = None if ent.special else k.alloc.page_of(ent.paddr)
            if not should_zap_folio(details, page):
                any_skipped = True
                continue
            await pgtable.clear_entry(k, entp, arch.pte_level)      # ptep_get_and_clear_full()
            if vma is not None and await zap_install_uffd_wp_if_needed(k, vma, entp, details, ent):
                any_skipped = True
            if page is not None:
                _put_mapped_page(k, mm, page, tlb=tlb)
                if "swap" in page.extra and not page.mapcount:     # free_pages_and_swap_cache()
                    from mm_core.swap_state import free_swap_cache
                    await free_swap_cache(k, page, tlb)
            k.stats["ptes_zapped"] += 1
            continue
        if ent.kind is Kind.NONE:
            continue
        if pte_marker_uffd_wp(ent):
            # for anon: always drop the marker; for file: only if explicitly requested
            if vma is not None and not vma.anonymous and not zap_drop_file_uffd_wp(details):
                any_skipped = True
                continue
        elif is_pte_marker(ent) or (ent.kind is Kind.SWAP and ent.swp_type == SWP_HWPOISON):
            if not should_zap_cows(details):
                any_skipped = True
                continue
        elif ent.kind is Kind.SWAP:                                  # a genuine swap entry
            if not should_zap_cows(details):
                any_skipped = True
                continue
            if is_swap_pte(ent):
                mm.rss[MM_SWAPENTS] -= 1
                await free_swap_and_cache(k, ent)
            k.stats["swap_ptes_zapped"] += 1
        await pgtable.clear_entry(k, entp, arch.pte_level)          # pte_clear_not_present_full()
        if vma is not None and await zap_install_uffd_wp_if_needed(k, vma, entp, details, ent):
            any_skipped = True
    if any_skipped:
        can_reclaim_pt = False
    from mm_core import pt_reclaim
    pmdval = None
    if can_reclaim_pt:
        pmdval = await pt_reclaim.try_get_and_clear_pmd(k, mm, pmdp)     # direct_reclaim
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    if can_reclaim_pt:
        if pmdval is not None:
            await pt_reclaim.free_pte(k, mm, start, pmdval)
        else:
            await pt_reclaim.try_to_free_pte(k, mm, pmdp, start)
    return True


async def zap_pmd_range(k, vma: VMA, pmdp: int, start: int, end: int, tlb: list | None = None,
                        reclaim_pt: bool = False, details: ZapDetails | None = None) -> None:
    """zap_pmd_range() for one pmd: a PMD leaf is zapped whole (or split first when only
    part of it goes); a table goes to zap_pte_range, retried while its map fails and the
    pmd still holds something."""
    arch, mm = k.arch, vma.mm
    size = arch.levels[arch.pmd_level].span
    first = None
    while True:
        pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
        first = first or pmdval
        if "walker_ignores_map_failure" in k.bugs and first.kind is Kind.TABLE \
                and pmdval.kind is not Kind.TABLE:
            # bug injection: trust the first snapshot and walk its (now detached) table
            for addr in range(start, end, k.page_size):
                await pgtable.get_raw(k, pgtable.entry_addr(k, first.paddr, arch.pte_level, addr))
            return
        if pmdval.kind in (Kind.NONE, Kind.BAD, Kind.SWAP):
            return
        if pmdval.kind is Kind.LEAF:
            if start & (size - 1) == 0 and end - start == size:
                if await huge_memory.zap_huge_pmd(k, vma, pmdp, tlb):
                    return
            else:
                await huge_memory.split_huge_pmd(k, vma, pmdp, start)
            continue
        if pmdval.kind is Kind.MIGRATION:
            return
        if await zap_pte_range(k, mm, pmdp, start, end, tlb, reclaim_pt, vma=vma, details=details):
            return                        # (6.14 PT_RECLAIM freed the emptied table there)
        k.stats["zap_pmd_retry"] += 1
        await sched_point("retry", pmdp)


async def unmap_page_range(k, vma: VMA, start: int, end: int, reclaim_pt: bool = False,
                           details: ZapDetails | None = None) -> None:
    """unmap_page_range() under an mmu_gather: zap every pmd of [start, end), flush the
    TLBs, and only then free the pages (tlb_finish_mmu). ``details`` is the caller's
    struct zap_details: None for MADV_DONTNEED (6.6 passes NULL), ZAP_UNMAP_DETAILS for
    munmap and exit (unmap_vmas), even_cows for truncation (unmap_mapping_range)."""
    tlb: list = []
    rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, vma.mm, start, end)
    async for pmdp, lo, hi in for_each_pmd(k, vma.mm, start, end):
        await zap_pmd_range(k, vma, pmdp, lo, hi, tlb, reclaim_pt, details)
    await flush_tlb_range(k, vma.mm, start, end)
    await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)
    for page in tlb:
        k.alloc.free_pages(page)


async def unmap_mapping_range(k, mapping, first: int, last: int) -> None:
    """unmap_mapping_range(..., even_cows=1) (truncate_pagecache(), 6.6): zap file pages
    [first, last) from every VMA mapping them. unmap_mapping_pages() passes no
    ZAP_FLAG_DROP_MARKER: uffd-wp markers stay (a marker past EOF refaults to SIGBUS)."""
    from mm_core.locks import RwSemaphore  # noqa: F401 - the lock type, for readers of this code
    await traps.lock(mapping.i_mmap_rwsem, "r")
    try:
        for vma in list(mapping.i_mmap):
            lo = max(vma.start, vma.start + ((first - vma.pgoff) << k.page_shift))
            hi = min(vma.end, vma.start + ((last - vma.pgoff) << k.page_shift))
            if lo < hi:
                await unmap_page_range(k, vma, lo, hi, details=ZapDetails(even_cows=True))
    finally:
        await traps.unlock(mapping.i_mmap_rwsem, "r")


def vma_link_file(k, vma: VMA) -> None:
    if vma.file is not None:
        vma.file.mapping.i_mmap.append(vma)
        vma.file.refs += 1


async def unlink_file_vma(k, vma: VMA) -> None:
    """unlink_file_vma(): take the VMA out of the file's i_mmap under i_mmap_rwsem, before
    free_pgtables() frees its tables without any ptl: after this, rmap walkers such as
    retract_page_tables() can no longer reach them."""
    if vma.file is not None and vma in vma.file.mapping.i_mmap:
        rwsem = vma.file.mapping.i_mmap_rwsem
        await traps.lock(rwsem, "w")
        vma.file.mapping.i_mmap.remove(vma)
        await traps.unlock(rwsem, "w")


def remove_vma(k, vma: VMA) -> None:
    """remove_vma(): drop the file reference (the VMA is already out of i_mmap)."""
    if vma.file is not None:
        if vma in vma.file.mapping.i_mmap:
            vma.file.mapping.i_mmap.remove(vma)
        from mm_core.shmem import iput
        iput(k, vma.file)


async def free_pgtables(k, mm: MMStruct, start: int, end: int) -> None:
    """free_pgtables() / free_pgd_range(): free every table below the root whose whole VA
    span is now outside any VMA (the floor/ceiling rule), clearing its parent entry.
    The VMAs are gone, so nobody else can reach these tables: pte_free() at once."""
    arch = k.arch

    async def down(table: int, level: int, lo: int, hi: int) -> None:
        lv = arch.levels[level]
        first, last = lv.index(lo), lv.index(hi - 1)
        table_va = lo & ~((lv.span << lv.index_bits) - 1)
        # one scan of the raw entries: only non-empty ones are visited (each visit is a
        # table read with its scheduling point, as before)
        raws = k.physmem.read_entries(table + first * 8, last - first + 1)
        empty = arch.empty_value(level)
        for i in pgtable.nonempty(raws, empty):
            if arch.decode(level, raws[i]).kind is Kind.NONE:
                continue
            base = table_va + (first + i) * lv.span
            addr, nxt = max(lo, base), min(hi, base + lv.span)
            entp = table + (first + i) * 8
            ent = await pgtable.get_entry(k, entp, level)
            if ent.kind is Kind.TABLE:
                unused = not mm.overlapping(base, base + lv.span)
                if level + 1 < arch.pte_level:     # a table about to go must be emptied whole
                    await down(ent.paddr, level + 1, *((base, base + lv.span) if unused else (addr, nxt)))
                if unused:
                    child = k.ptdescs[ent.paddr]
                    await pgtable.clear_entry(k, entp, level)
                    child.state = "detached"
                    child.note(k, "detached by free_pgtables")
                    pgtable.pte_free(k, child)

    try:
        await down(mm.pgd, 0, start, end)
    finally:
        down = None     # it reaches itself through its closure: a cycle only the collector frees


async def exit_mm(k, mm: MMStruct) -> None:
    """exit_mm() (kernel/exit.c) + mmput() (kernel/fork.c): the last thread leaves the mm.
    It clears current->mm between mmap_read_lock() and mmap_read_unlock(); mmput() then
    drops mm_users to 0 (hpage_collapse_test_exit() is true from here on) and __mmput()
    runs exit_mmap(). Failure handling: none, it must not fail (check_mm() reports leaks).

    Here mm_users drops in the same step as mmap_read_unlock(): a retract_page_tables()
    that got mmap_write_trylock() while mm_users was still 1 is done before the exit gets
    its read lock. (In Linux a few statements separate the two, and a last mmput() from
    an mmget() holder takes no mmap_lock at all: that window is not modelled.)"""
    if mm.dead:
        raise ValueError(f"mm {mm.id} has already exited")
    await mmap_read_lock(mm)
    await mmap_read_unlock(mm)
    mm.users = 0                                   # mmput(): atomic_dec_and_test(&mm_users)
    await exit_mmap(k, mm)


async def exit_mmap(k, mm: MMStruct) -> None:
    """exit_mmap(): unmap every VMA (unmap_vmas), then free_pgtables(), which takes each
    file VMA out of i_mmap (unlink_file_vma) before freeing its tables; free the root,
    then check_mm(). Must not fail: a zap that cannot map a table retries (RETRY).

    Since 5.17 (64591e8605d6) this runs under mmap_write_lock. Before (profile
    exit_mmap_lock off, 5.10) it takes no mmap_lock: the zap of a file VMA runs while the
    VMA is still in i_mmap, where retract_page_tables() can find it; only mm_users == 0,
    tested under mmap_write_trylock(), keeps retraction away."""
    mm.users = 0                                   # mmput(): hpage_collapse_test_exit()
    locked = k.profile.exit_mmap_lock
    if locked:
        await mmap_write_lock(mm)                  # exit_mmap() frees tables under it
    for vma in list(mm.vmas):
        await unmap_page_range(k, vma, vma.start, vma.end, details=ZAP_UNMAP_DETAILS)   # unmap_vmas()
    vmas = list(mm.vmas)
    mm.vmas.clear()
    for vma in vmas:
        await unlink_file_vma(k, vma)
    for vma in vmas:
        await free_pgtables(k, mm, vma.start, vma.end)
    for vma in vmas:
        remove_vma(k, vma)
    pte_frag_destroy(k, mm)
    if locked:
        await mmap_write_unlock(mm)
    root = k.ptdescs.get(mm.pgd)
    if root is not None:
        pgtable.pte_free(k, root)
    mm.dead = True
    if mm in k.mmlist:                             # mmput(): list_del(&mm->mmlist)
        k.mmlist.remove(mm)
    check_mm(k, mm)


def check_mm(k, mm: MMStruct) -> None:
    """check_mm() (kernel/fork.c) plus a leak audit of the page allocator: any rss
    counter not back at zero, page-table bytes left, or page still owned by the mm."""
    problems = [f"BUG: Bad rss-counter state mm:{mm.id} type:{RSS_NAMES[i]} val:{v}"
                for i, v in enumerate(mm.rss) if v]
    if mm.pgtables_bytes:
        problems.append(f"BUG: non-zero pgtables_bytes on freeing mm: {mm.pgtables_bytes}")
    deferred = {id(pt.page) for pt in k.deferred_tables() if pt.mm is mm}
    # RCU frees come later; a page fork shared with a child that still maps it is not ours
    leaked = [p for p in k.alloc.owned_by(mm) if id(p) not in deferred
              and not (p.extra.get("forked") and p.mapcount > 0)]
    if leaked:
        kinds = sorted({p.use.value for p in leaked})
        problems.append(f"BUG: {len(leaked)} page block(s) still owned by mm {mm.id} ({', '.join(kinds)})")
    leaked_tables = [pt for pt in k.ptdescs.values() if pt.mm is mm]
    if leaked_tables:
        problems.append(f"BUG: {len(leaked_tables)} page table(s) of mm {mm.id} never freed")
    if problems:
        raise CheckMMError("; ".join(problems))
