"""userfaultfd (fs/userfaultfd.c, mm/userfaultfd.c) as far as the page-table rules go.

Registration (userfaultfd_register, under mmap_write_lock): VM_UFFD_MISSING / VM_UFFD_WP /
VM_UFFD_MINOR on whole VMAs (split at the range's ends), vm_userfaultfd_ctx set. WP needs
CONFIG_HAVE_ARCH_USERFAULTFD_WP (x86_64 since 5.7, arm64 since 6.10; never ppc64 or s390x:
their pte formats have no uffd-wp bit), MINOR needs HAVE_ARCH_USERFAULTFD_MINOR and shmem.

The fault side: handle_userfault() queues the faulting task on the context's
fault_pending_wqh, checks userfaultfd_must_wait() (a lockless walk: pmdp_get_lockless(),
pte_offset_map(); a failed map is RETRY, `goto again`), drops mmap_lock and sleeps until a
resolving ioctl (UFFDIO_COPY / ZEROPAGE / CONTINUE / WRITEPROTECT un-protect) wakes the
range; the fault returns VM_FAULT_RETRY and the arch handler retries it.

UFFDIO_COPY / ZEROPAGE / CONTINUE: mfill_atomic() -> mfill_atomic_pte_*() ->
mfill_atomic_install_pte() install one pte holding only mmap_read_lock and the ptl, with no
folio lock (for COPY into a private mapping). That is why collapse_pte_mapped_thp() must
keep the ptl from emptying a table until its pmd is gone. A failed pte_offset_map_lock()
is -EAGAIN to the ioctl caller.

UFFDIO_POISON (6.6): mfill_atomic(MFILL_ATOMIC_POISON) -> mfill_atomic_pte_poison() puts
PTE_MARKER_POISONED in a none pte under the ptl (-EAGAIN on a failed map, -EEXIST on any
other pte or marker); the fault on it is SIGBUS (handle_pte_marker()), with no userfault.
UFFDIO_CONTINUE of a hwpoisoned page-cache page is -EIO.

UFFDIO_WRITEPROTECT: mwriteprotect_range() -> uffd_wp_range() -> change_protection(
MM_CP_UFFD_WP / MM_CP_UFFD_WP_RESOLVE) (mm_core/mprotect.py): the uffd-wp software bit on
present ptes, PTE_MARKER_UFFD_WP on none ptes of file VMAs.

UFFDIO_MOVE (6.8+; the 6.13 code with the 2025 fixes): move_pages() -> move_pages_pte()
moves one present, exclusive anon pte from src to dst, holding mmap_read_lock, both ptes
mapped (pte_offset_map_rw_nolock() in 6.13, pte_offset_map_nolock() in 6.8-6.12) and, for
the move itself, both ptls (double_pt_lock) after pte_same() rechecks of both ptes. Mapped
ptes pin an RCU read section (and a kmap_local slot under HIGHPTE), so on contention for
the folio lock or the anon_vma lock it unmaps both, sleeps on the lock and retries.
Under 6.14 it also rechecks the dst pmd (pmd_same) under the ptls, since PT_RECLAIM may free
the dst table meanwhile and a none dst pte reads the same in a freed table. A swap pte
moves as it is (move_swap_pte(), with a swap-cache folio's rmap moved under its lock).

Non-cooperative events (6.6): REMOVE (MADV_DONTNEED), UNMAP (munmap, mmap(MAP_FIXED),
mremap), REMAP (mremap_userfaultfd_prep() / _complete() around a moving mremap) and FORK
(dup_userfaultfd() / dup_userfaultfd_complete() from dup_mmap(): the child's VMAs on a new
context, an fd for it made by the handler's read()). Each is sent with no mmap_lock held
and the sender waits for the read; ctx->mmap_changing is raised from the prep under the
lock until then, so UFFDIO_COPY / ZEROPAGE / CONTINUE / WRITEPROTECT / POISON are -EAGAIN.

Kernel text relied on: the v6.6 fs/userfaultfd.c and mm/userfaultfd.c as quoted in
spec/kernel_mm.md §2 (rows 14, 15) and the stored mm/userfaultfd.c (a 6.4-era copy: the
6.5 -EAGAIN on a failed map and the 6.6 pmd checks in mfill_atomic() are from the 6.6
tree); mm/mprotect.c change_pte_range() and mm/memory.c handle_pte_marker() of 6.6.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import Access, Kind, leaf_entry
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import huge_memory, memory, pgtable, rmap, shmem, swap_state, swapfile
from mm_core.locks import SpinLock, mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import (
    MM_ANONPAGES,
    VM_ACCESS_FLAGS,
    VM_LOCKED,
    VM_MAYWRITE,
    VM_SHARED,
    VM_UFFD_FLAGS,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
)
from mm_core.page_alloc import OutOfMemory, PageUse
from mm_core.swapops import PTE_MARKER_POISONED, make_pte_marker, pte_none_mostly
from mm_core.tlbflush import flush_tlb_range

EAGAIN, ENOENT, ENOMEM, EEXIST, EINVAL, EBUSY, EPERM, EFAULT = 11, 2, 12, 17, 22, 16, 1, 14

# uffdio_move.mode (include/uapi/linux/userfaultfd.h)
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
# uffdio_register.mode
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
# uffdio_copy / zeropage / writeprotect / continue modes
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0    # 6.6+
# uffdio_api.features
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13   # 6.4+
UFFD_FEATURE_POISON = 1 << 14           # 6.6+
UFFD_FEATURE_MOVE = 1 << 16
# struct uffd_msg
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP = 0x13, 0x14, 0x15, 0x16
UFFD_PAGEFAULT_FLAG_WRITE, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_MINOR = 1 << 0, 1 << 1, 1 << 2
UFFD_MSG_SIZE = 32
# userfaultfd(2) flags
UFFD_USER_MODE_ONLY = 1
# ioctl numbers: the bits of uffdio_register.ioctls
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE, _UFFDIO_COPY, _UFFDIO_ZEROPAGE = 0, 1, 2, 3, 4
_UFFDIO_MOVE, _UFFDIO_WRITEPROTECT, _UFFDIO_CONTINUE, _UFFDIO_POISON = 5, 6, 7, 8

# mfill_atomic() modes (uffd_flags_t) and the WP flag
MFILL_ATOMIC_COPY, MFILL_ATOMIC_ZEROPAGE, MFILL_ATOMIC_CONTINUE = "copy", "zeropage", "continue"
MFILL_ATOMIC_POISON = "poison"                      # 6.6+
EIO = 5


def uffdio_poison_supported(k) -> bool:
    """UFFDIO_POISON and UFFD_FEATURE_POISON exist (6.6, "mm: userfaultfd: add new
    UFFDIO_POISON ioctl", Axel Rasmussen): nothing arch-specific, no #ifndef."""
    return k.profile.version >= (6, 6)

# Where move_pages_pte()'s locals live: kernel stack addresses, never a page table. The
# pre-927e926d72d9 code passed &orig_src_pte / &orig_dst_pte to pte_unmap().
MOVE_PAGES_PTE_FRAME = 0xFFFFC90000A3FD00
STACK_ORIG_SRC_PTE = MOVE_PAGES_PTE_FRAME + 0x48
STACK_ORIG_DST_PTE = MOVE_PAGES_PTE_FRAME + 0x50


def userfaultfd_wp_unpopulated(vma) -> bool:
    """userfaultfd_wp_unpopulated() (fs/userfaultfd.c, 6.4+): the VMA's context asked for
    UFFD_FEATURE_WP_UNPOPULATED (UFFDIO_API offers it only where uffd-wp exists, 6.4+)."""
    ctx = vma.uffd_ctx
    return ctx is not None and bool(ctx.features & UFFD_FEATURE_WP_UNPOPULATED)


def have_arch_userfaultfd(k, what: str) -> bool:
    """CONFIG_HAVE_ARCH_USERFAULTFD_WP / _MINOR for this arch under this kernel profile
    (WP also needs the pte format's uffd-wp software bit)."""
    since = k.arch.kconfig.get(f"HAVE_ARCH_USERFAULTFD_{what}")
    if since is None or k.profile.version < since:
        return False
    return what != "WP" or "uffd_wp" in k.arch.sw_bits


# -- the context and its wait queue --------------------------------------------------------------

@dataclass(eq=False)
class UffdWaitQueue:
    """struct userfaultfd_wait_queue: one faulting task on fault_pending_wqh, with its
    uffd_msg (address, flags, reason); ``waken`` is set by userfaultfd_wake_function()."""

    ctx: UserfaultfdCtx
    address: int
    flags: int
    reason: int
    waken: bool = False
    sleeps = True                       # schedule() in TASK_KILLABLE / INTERRUPTIBLE

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        return self.waken

    def __repr__(self) -> str:
        return f"<uffd{self.ctx.id} fault {self.address:#x}>"


@dataclass(eq=False)
class UffdFdWaitQueue:
    """ctx->fd_wqh: where read() sleeps until a fault is pending (handle_userfault()'s
    wake_up_poll(&ctx->fd_wqh, EPOLLIN) ends the wait; the scheduler polls
    ``try_acquire``). Released contexts end the wait too (read() then sees released)."""

    ctx: UserfaultfdCtx
    sleeps = True                       # schedule() in TASK_INTERRUPTIBLE

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        return bool(self.ctx.fault_pending_wqh) or bool(self.ctx.event_wqh) or self.ctx.released

    def post(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<uffd{self.ctx.id} fd_wqh>"


@dataclass(eq=False)
class UffdEventWaitQueue:
    """The userfaultfd_wait_queue of a non-fault event on ctx->event_wqh: the msg (event;
    REMOVE / UNMAP: arg.remove.start / end; REMAP: arg.remap.from / to / len as ``start``
    / ``end`` / ``length``; FORK: arg.reserved.reserved1, the child's context, as
    ``new_ctx``); read() completes it (userfaultfd_event_complete(): msg.event = 0),
    which ends the sender's wait; so does the release of the context. ``fork_event``:
    the reader's local list a FORK event sits on while read() installs the new fd."""

    ctx: UserfaultfdCtx
    event: int
    start: int
    end: int
    length: int = 0
    new_ctx: UserfaultfdCtx | None = None
    fork_event: list | None = None
    sleeps = True                       # schedule() in TASK_KILLABLE

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        return self.event == 0 or self.ctx.released

    def __repr__(self) -> str:
        return f"<uffd{self.ctx.id} event {self.event:#x} {self.start:#x}-{self.end:#x}>"


@dataclass(eq=False)
class UserfaultfdCtx:
    """struct userfaultfd_ctx: the mm it serves, its features and the faults waiting on it.
    fault_pending_wqh holds the faults no read() has reported yet; read() refiles the one it
    reports to fault_wqh (both under fault_pending_wqh.lock, ``wqh_lock``); a resolving
    ioctl wakes the range on both. fd_wqh is where read() sleeps. ``api_done`` is
    UFFD_STATE_RUNNING (UFFDIO_API done; 6.6 ctx->state)."""

    mm: object
    features: int = 0
    id: int = 0
    released: bool = False
    fault_pending_wqh: list = field(default_factory=list)
    fault_wqh: list = field(default_factory=list)
    api_done: bool = False
    flags: int = 0                      # userfaultfd(2) flags (UFFD_USER_MODE_ONLY, O_NONBLOCK)
    event_wqh: list = field(default_factory=list)
    mmap_changing: int = 0              # atomic_t: non-cooperative events in flight
    file_flags: int = 0                 # the O_NONBLOCK / O_CLOEXEC part of ctx->flags

    def __post_init__(self) -> None:
        self.wqh_lock = SpinLock(f"uffd{self.id}.fault_pending_wqh.lock", "uffd_wqh_lock")
        self.event_lock = SpinLock(f"uffd{self.id}.event_wqh.lock", "uffd_event_wqh_lock")
        self.fd_wqh = UffdFdWaitQueue(self)


def userfaultfd_ctx_new(k, mm, features: int = 0) -> UserfaultfdCtx:
    """userfaultfd(2) + UFFDIO_API: a context for ``mm``."""
    return UserfaultfdCtx(mm, features, k.next_id("uffd"))


def vma_can_userfault(k, vma, vm_flags: int) -> bool:
    """vma_can_userfault() (6.6): MINOR only on shmem (no hugetlb here); any mode on anon
    and shmem (CONFIG_PTE_MARKER_UFFD_WP lets WP cover shmem: markers for none ptes). A
    MAP_SHARED|MAP_ANONYMOUS mapping (shmem_zero_setup in Linux) is not modelled: refused."""
    vm_flags &= VM_UFFD_FLAGS
    shmem_vma = isinstance(vma.file, shmem.ShmemInode)
    if vm_flags & VM_UFFD_MINOR and not shmem_vma:
        return False
    if vma.anonymous and vma.flags & VM_SHARED:
        return False
    return vma.anonymous or shmem_vma


async def userfaultfd_register(k, ctx: UserfaultfdCtx, start: int, length: int, mode: int) -> int:
    """userfaultfd_register() (UFFDIO_REGISTER): set VM_UFFD_* and the context on every VMA
    of [start, start + length), splitting the first and last. Returns uffdio_register.ioctls
    (the ioctls the range supports) or -errno: -EINVAL for a bad mode or range, a VMA that
    cannot userfault, WP or MINOR where the arch lacks them; -ENOMEM where no VMA is in the
    range; -EPERM without VM_MAYWRITE; -EBUSY for a VMA owned by another context."""
    from mm_core.mmap import split_range
    all_modes = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR
    if not mode or mode & ~all_modes:
        return -EINVAL
    vm_flags = 0
    if mode & UFFDIO_REGISTER_MODE_MISSING:
        vm_flags |= VM_UFFD_MISSING
    if mode & UFFDIO_REGISTER_MODE_WP:
        if not have_arch_userfaultfd(k, "WP"):
            return -EINVAL                  # #ifndef CONFIG_HAVE_ARCH_USERFAULTFD_WP goto out
        vm_flags |= VM_UFFD_WP
    if mode & UFFDIO_REGISTER_MODE_MINOR:
        if not have_arch_userfaultfd(k, "MINOR"):
            return -EINVAL
        vm_flags |= VM_UFFD_MINOR
    page = k.page_size
    if start % page or length % page or length <= 0 or start + length > k.arch.task_size:
        return -EINVAL                      # validate_range()
    end = start + length
    mm = ctx.mm
    await mmap_write_lock(mm)
    try:
        vmas = sorted(mm.overlapping(start, end), key=lambda v: v.start)
        if not vmas:
            return -ENOMEM
        for cur in vmas:                    # search for not compatible vmas
            if not vma_can_userfault(k, cur, vm_flags):
                return -EINVAL
            if not cur.flags & VM_MAYWRITE:
                return -EPERM
            if cur.uffd_ctx is not None and cur.uffd_ctx is not ctx:
                return -EBUSY
        for vma in split_range(mm, start, end):
            # userfaultfd_set_vm_flags(): vm_page_prot follows (vma_wants_writenotify())
            vma.flags = (vma.flags & ~VM_UFFD_FLAGS) | vm_flags
            vma.uffd_ctx = ctx
            await sched_point("vma_write", vma)
        mm.merge_adjacent()
        k.stats["uffdio_register"] += 1
        ioctls = sum(1 << n for n in (_UFFDIO_WAKE, _UFFDIO_COPY, _UFFDIO_ZEROPAGE, _UFFDIO_WRITEPROTECT,
                                      _UFFDIO_CONTINUE))
        if uffdio_poison_supported(k):
            ioctls |= 1 << _UFFDIO_POISON          # UFFD_API_RANGE_IOCTLS, every mode (6.6+)
        if k.profile.uffdio_move:
            ioctls |= 1 << _UFFDIO_MOVE
        if not mode & UFFDIO_REGISTER_MODE_WP:
            ioctls &= ~(1 << _UFFDIO_WRITEPROTECT)
        if not mode & UFFDIO_REGISTER_MODE_MINOR:
            ioctls &= ~(1 << _UFFDIO_CONTINUE)
        return ioctls
    finally:
        await mmap_write_unlock(mm)


async def userfaultfd_unregister(k, ctx: UserfaultfdCtx, start: int, length: int) -> int:
    """userfaultfd_unregister() (UFFDIO_UNREGISTER): write-unprotect a WP range first
    (uffd_wp_range(false): markers and uffd-wp bits go), wake its waiters, clear the flags."""
    from mm_core.mmap import split_range
    page = k.page_size
    if start % page or length % page or length <= 0:
        return -EINVAL
    end = start + length
    mm = ctx.mm
    await mmap_write_lock(mm)
    try:
        vmas = mm.overlapping(start, end)
        if not vmas:
            return -ENOMEM
        for cur in vmas:
            if cur.uffd_ctx is not None and cur.uffd_ctx is not ctx:
                return -EBUSY
        for vma in split_range(mm, start, end):
            if vma.uffd_ctx is None:
                continue
            if vma.uffd_wp:
                await uffd_wp_range(k, vma, vma.start, vma.end - vma.start, False)
            await wake_userfault(k, ctx, vma.start, vma.end - vma.start)
            vma.flags &= ~VM_UFFD_FLAGS
            vma.uffd_ctx = None
        mm.merge_adjacent()
        return 0
    finally:
        await mmap_write_unlock(mm)


async def userfaultfd_must_wait(k, ctx: UserfaultfdCtx, address: int, flags: int, reason: int) -> bool:
    """userfaultfd_must_wait() (fs/userfaultfd.c, 6.6): after queueing, is the fault still
    unresolved? A lockless walk (mmap_lock held for read): missing upper tables or a none
    pmd: wait; a non-present (migration) or devmap pmd: do not (the explicit devmap guard
    keeps the retry below from spinning on a pmd that will never be a table; there are no
    devmap pmds here); a THP: wait only for a WP fault on a read-only pmd; a failed
    pte_offset_map() is RETRY (`ret = true; goto again`: the pmd is read again). Then a none
    or marker pte (pte_none_mostly) waits, and so does a read-only pte for a WP fault."""
    arch = k.arch
    pmdp = await rmap.walk_to_pmd(k, ctx.mm, address)
    if pmdp is None:
        return True
    while True:                                                      # again:
        pmdval = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
        if pmdval.kind is Kind.NONE:
            return True
        if pmdval.kind is not Kind.LEAF and pmdval.kind is not Kind.TABLE:   # !pmd_present
            return False
        if pmdval.kind is Kind.LEAF:                                 # pmd_trans_huge
            return not pmdval.prot & Access.W and bool(reason & VM_UFFD_WP)
        ptep = await pgtable.pte_offset_map(k, pmdp, address)
        if ptep is None:
            k.stats["uffd_must_wait_retry"] += 1
            await sched_point("retry", pmdp)
            continue
        ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        ret = False
        if pte_none_mostly(ptent):
            ret = True
        if not (ptent.kind is Kind.LEAF and ptent.prot & Access.W) and reason & VM_UFFD_WP:
            ret = True
        await pgtable.pte_unmap(k, ptep)
        return ret


async def handle_userfault(k, vmf, reason: int) -> int:
    """handle_userfault(): deliver the fault to the userfaultfd and sleep until it is
    resolved. Called with mmap_read_lock held and no pte mapped. Returns VM_FAULT_SIGBUS
    (no context, UFFD_FEATURE_SIGBUS, a kernel-mode fault (no FAULT_FLAG_USER) on a
    UFFD_USER_MODE_ONLY context, or a fault that may not retry), VM_FAULT_NOPAGE (the
    context is being released), or VM_FAULT_RETRY: with FAULT_FLAG_RETRY_NOWAIT at once and
    still holding mmap_lock (a FOLL_NOWAIT GUP), otherwise after dropping mmap_lock and, if
    userfaultfd_must_wait(), sleeping until a resolving ioctl wakes the range."""
    from mm_core.memory import (
        FAULT_FLAG_ALLOW_RETRY,
        FAULT_FLAG_RETRY_NOWAIT,
        FAULT_FLAG_USER,
        VM_FAULT_NOPAGE,
        VM_FAULT_RETRY,
        VM_FAULT_SIGBUS,
    )
    vma = vmf.vma
    mm = vma.mm
    ctx = vma.uffd_ctx
    k.stats[f"handle_userfault_{_REASONS.get(reason, reason)}"] += 1
    if ctx is None or ctx.features & UFFD_FEATURE_SIGBUS:
        return VM_FAULT_SIGBUS
    if ctx.flags & UFFD_USER_MODE_ONLY and not vmf.flags & FAULT_FLAG_USER:
        return VM_FAULT_SIGBUS                                       # a kernel-mode fault
    if ctx.released:
        return VM_FAULT_NOPAGE
    if not vmf.flags & FAULT_FLAG_ALLOW_RETRY:
        return VM_FAULT_SIGBUS
    if vmf.flags & FAULT_FLAG_RETRY_NOWAIT:
        return VM_FAULT_RETRY
    uwq = UffdWaitQueue(ctx, vmf.address, vmf.flags, reason)
    check_first = "handle_userfault_checks_before_queueing" in k.bugs
    if check_first:
        must_wait = await userfaultfd_must_wait(k, ctx, vmf.address, vmf.flags, reason)
    await traps.lock(ctx.wqh_lock)                                   # spin_lock_irq(&wqh.lock)
    ctx.fault_pending_wqh.append(uwq)                                # __add_wait_queue
    await traps.unlock(ctx.wqh_lock)
    # after the __add_wait_queue the waiter is visible to wake_userfault(): a resolution
    # from now on wakes it, one before it shows in the page tables must_wait() reads
    if not check_first:
        must_wait = await userfaultfd_must_wait(k, ctx, vmf.address, vmf.flags, reason)
    await mmap_read_unlock(mm)
    if must_wait and not ctx.released:
        k.stats["uffd_fault_waits"] += 1
        await traps.wait(uwq)                                        # schedule()
    if uwq in ctx.fault_pending_wqh or uwq in ctx.fault_wqh:         # !list_empty_careful()
        await traps.lock(ctx.wqh_lock)
        for wqh in (ctx.fault_pending_wqh, ctx.fault_wqh):          # list_del(&uwq.wq.entry)
            if uwq in wqh:
                wqh.remove(uwq)
        await traps.unlock(ctx.wqh_lock)
    return VM_FAULT_RETRY


_REASONS = {VM_UFFD_MISSING: "missing", VM_UFFD_WP: "wp", VM_UFFD_MINOR: "minor"}


async def wake_userfault(k, ctx: UserfaultfdCtx, start: int, length: int) -> None:
    """wake_userfault() -> __wake_userfault(): wake every fault queued on the context whose
    address lies in [start, start + length) (userfaultfd_wake_function() unlinks it). The
    caller has already changed the page tables: a fault queued after this finds them
    resolved in userfaultfd_must_wait()."""
    await sched_point("uffd_waitqueue_active", ctx)                  # smp_mb(); waitqueue_active()
    if not ctx.fault_pending_wqh and not ctx.fault_wqh:
        return
    await traps.lock(ctx.wqh_lock)
    for wqh in (ctx.fault_pending_wqh, ctx.fault_wqh):
        for uwq in list(wqh):
            if start <= uwq.address < start + length:
                uwq.waken = True
                wqh.remove(uwq)
                k.stats["uffd_woken"] += 1
    await traps.unlock(ctx.wqh_lock)


@dataclass(frozen=True)
class UffdEventMsg:
    """A non-fault uffd_msg as read() copied it (*msg = uwq->msg) before completing it.
    REMAP: from / to / len in ``start`` / ``end`` / ``length``; FORK: ``new_ctx`` (the
    child's context) and ``ufd``, the fd resolve_userfault_fork() installed for it."""

    event: int
    start: int
    end: int
    length: int = 0
    new_ctx: UserfaultfdCtx | None = None
    ufd: int = 0


async def userfaultfd_ctx_read(k, ctx: UserfaultfdCtx, no_wait: bool,
                               resolve_fork=None) -> UffdWaitQueue | UffdEventMsg | int:
    """userfaultfd_ctx_read() (fs/userfaultfd.c, 6.6): page faults first: take the oldest
    fault on fault_pending_wqh (find_userfault(): list_last_entry, the queue is added to
    at its head), refile it to fault_wqh (so it is reported once, and still woken by the
    resolving ioctl) and return it for the uffd_msg. Then events (find_userfault_evt()):
    copy the oldest message and complete it (userfaultfd_event_complete(): msg.event = 0,
    off event_wqh, the sender wakes). A FORK event is instead moved to a local
    ``fork_event`` list; with the locks dropped resolve_userfault_fork() installs an fd for
    the child's context (``resolve_fork(new_ctx)`` -> fd or -errno; None: the Machine API,
    where the context is the handle and the fd 0); then, if the forker did not abort (its
    context released meanwhile), the event goes back on event_wqh and is completed, or left
    there when the fd could not be made (the error is read()'s). With nothing pending:
    -EAGAIN if ``no_wait`` (O_NONBLOCK, or a later message of the same read()), else sleep
    on fd_wqh until a fault or an event is queued. Returns 0 (nothing read) to a reader
    sleeping when the context is released (here only by exit_files(), when another thread
    exits the process; Linux ends that read with the signal that killed the thread)."""
    while True:
        await traps.lock(ctx.wqh_lock)                               # spin_lock(&fault_pending_wqh.lock)
        uwq = ctx.fault_pending_wqh[0] if ctx.fault_pending_wqh else None
        if uwq is not None:
            ctx.fault_pending_wqh.remove(uwq)                        # list_del(&uwq->wq.entry)
            ctx.fault_wqh.append(uwq)                                # add_wait_queue(&ctx->fault_wqh)
        await traps.unlock(ctx.wqh_lock)
        if uwq is not None:
            k.stats["uffd_msgs_read"] += 1
            return uwq
        await traps.lock(ctx.event_lock)                             # spin_lock(&ctx->event_wqh.lock)
        ewq = ctx.event_wqh[0] if ctx.event_wqh else None
        if ewq is not None:
            msg = UffdEventMsg(ewq.event, ewq.start, ewq.end, ewq.length, ewq.new_ctx)   # *msg = uwq->msg
            ctx.event_wqh.remove(ewq)
            if ewq.event == UFFD_EVENT_FORK:
                ewq.fork_event = [ewq]                               # list_move(&uwq->wq.entry, &fork_event)
            else:
                ewq.event = 0                                        # userfaultfd_event_complete()
        await traps.unlock(ctx.event_lock)
        if ewq is not None and msg.event == UFFD_EVENT_FORK:
            return await _read_fork_event(k, ctx, ewq, msg, resolve_fork)
        if ewq is not None:
            k.stats["uffd_events_read"] += 1
            return msg
        if no_wait:
            return -EAGAIN
        if ctx.released:
            return 0
        await traps.wait(ctx.fd_wqh)                                 # schedule()


async def _read_fork_event(k, ctx: UserfaultfdCtx, ewq: UffdEventWaitQueue, msg: UffdEventMsg,
                           resolve_fork) -> UffdEventMsg | int:
    """The tail of userfaultfd_ctx_read() for UFFD_EVENT_FORK: resolve_userfault_fork()
    (anon_inode_getfd() of the child's context; may sleep), then under event_wqh.lock: if
    the event is still on the local fork_event list (the forker did not abort), put it
    back on event_wqh and complete it unless the fd failed (then it stays queued and the
    error goes to read()); if the forker aborted, nothing is put back."""
    await sched_point("uffd_resolve_fork", ctx)
    ret = resolve_fork(msg.new_ctx) if resolve_fork is not None else 0
    await traps.lock(ctx.event_lock)
    if ewq.fork_event:                                               # !list_empty(&fork_event)
        ewq.fork_event = None
        ctx.event_wqh.append(ewq)               # __add_wait_queue(): at the head, so read last
        if ret >= 0:
            ewq.event = 0                                            # userfaultfd_event_complete()
            ctx.event_wqh.remove(ewq)
    await traps.unlock(ctx.event_lock)
    if ret < 0:
        return ret
    k.stats["uffd_events_read"] += 1
    return UffdEventMsg(msg.event, 0, 0, 0, msg.new_ctx, ret)         # arg.fork.ufd = fd


def uffd_msg_pagefault(ctx: UserfaultfdCtx, uwq: UffdWaitQueue, page_size: int, big_endian: bool) -> bytes:
    """userfault_msg(): the 32-byte struct uffd_msg of a page fault, in the guest's byte
    order: event UFFD_EVENT_PAGEFAULT, flags (WRITE, WP for a VM_UFFD_WP reason, MINOR for
    VM_UFFD_MINOR), the address (page-aligned unless UFFD_FEATURE_EXACT_ADDRESS)."""
    from mm_core.memory import FAULT_FLAG_WRITE
    flags = 0
    if uwq.flags & FAULT_FLAG_WRITE:
        flags |= UFFD_PAGEFAULT_FLAG_WRITE
    if uwq.reason & VM_UFFD_WP:
        flags |= UFFD_PAGEFAULT_FLAG_WP
    if uwq.reason & VM_UFFD_MINOR:
        flags |= UFFD_PAGEFAULT_FLAG_MINOR
    address = uwq.address
    if not ctx.features & UFFD_FEATURE_EXACT_ADDRESS:
        address &= ~(page_size - 1)
    order = "big" if big_endian else "little"
    return (bytes([UFFD_EVENT_PAGEFAULT]) + bytes(7) + flags.to_bytes(8, order)
            + address.to_bytes(8, order) + bytes(8))


async def userfaultfd_release(k, ctx: UserfaultfdCtx) -> None:
    """userfaultfd_release() (the last close of the fd, 6.6): ctx->released, then under
    mmap_write_lock drop VM_UFFD_* and the context from every VMA registered with it (the
    uffd-wp bits stay, as in 6.6), and wake every fault of both queues (range len 0: all)
    and fd_wqh. A fault racing with the release sees released and returns VM_FAULT_NOPAGE."""
    ctx.released = True
    mm = ctx.mm
    await mmap_write_lock(mm)
    try:
        for vma in list(mm.vmas):
            if vma.uffd_ctx is ctx:
                vma.flags &= ~VM_UFFD_FLAGS
                vma.uffd_ctx = None
                await sched_point("vma_write", vma)
        mm.merge_adjacent()
    finally:
        await mmap_write_unlock(mm)
    await traps.lock(ctx.wqh_lock)
    for wqh in (ctx.fault_pending_wqh, ctx.fault_wqh):
        for uwq in wqh:
            uwq.waken = True
        wqh.clear()
    await traps.unlock(ctx.wqh_lock)
    # wake_up_all(&ctx->event_wqh): the event senders see released and unqueue themselves


async def userfaultfd_wake(k, ctx: UserfaultfdCtx, start: int, length: int) -> int:
    """userfaultfd_wake() (UFFDIO_WAKE): wake the faults of a range resolved with DONTWAKE."""
    page = k.page_size
    if start % page or length % page or length <= 0:
        return -EINVAL
    await wake_userfault(k, ctx, start, length)
    return 0


# -- UFFDIO_COPY / ZEROPAGE / CONTINUE: mfill_atomic() -------------------------------------------

def find_dst_vma(mm, dst_start: int, length: int, ctx: UserfaultfdCtx | None):
    """find_dst_vma(): the one VMA holding the whole range, registered with ``ctx`` (None:
    the registration is not checked, for the race scenarios that drive the pte install
    without a context)."""
    vma = mm.find_vma(dst_start)
    if vma is None or dst_start < vma.start or dst_start + length > vma.end:
        return None
    if ctx is not None and vma.uffd_ctx is not ctx:
        return None
    return vma


async def mfill_atomic(k, ctx: UserfaultfdCtx | None, mm, dst_start: int, length: int, what: str,
                       data: bytes = b"", wp: bool = False) -> int:
    """mfill_atomic() (6.6; COPY / ZEROPAGE / CONTINUE / POISON): fill [dst_start, +length)
    page by page under mmap_read_lock.
    Per page: mm_alloc_pmd(), allocate the PTE table if the pmd is none, read the pmd again
    and be strict (-EEXIST) if it is not a table now (a THP, or a pmd that went none after
    the allocation: retract_page_tables() may remove tables under us), then
    mfill_atomic_pte(). Returns the bytes filled, or -errno when none were; -EAGAIN (a
    failed pte_offset_map_lock() in the install) goes back to the caller, who retries."""
    page = k.page_size
    if dst_start % page or length % page or length <= 0:
        return -EINVAL
    await mmap_read_lock(mm)
    try:
        if ctx is not None and ctx.mmap_changing:
            # "If memory mappings are changing because of non-cooperative operation
            # (e.g. mremap) running in parallel, bail out and request the user to retry"
            k.stats["uffd_mmap_changing_eagain"] += 1
            return -EAGAIN
        dst_vma = find_dst_vma(mm, dst_start, length, ctx)
        if dst_vma is None:
            return -ENOENT
        if dst_vma.anonymous and dst_vma.flags & VM_SHARED:
            return -EINVAL                                # WARN_ON_ONCE: shmem_zero_setup vmas
        if wp and not dst_vma.uffd_wp:
            return -EINVAL                                # a wrprotect copy needs a WP registration
        shmem_vma = isinstance(dst_vma.file, shmem.ShmemInode)
        if not dst_vma.anonymous and not shmem_vma:
            return -EINVAL
        if not shmem_vma and what == MFILL_ATOMIC_CONTINUE:
            return -EINVAL
        if not dst_vma.flags & VM_SHARED:
            rmap.anon_vma_prepare(k, dst_vma)
        arch = k.arch
        copied, err = 0, 0
        for dst_addr in range(dst_start, dst_start + length, page):
            try:
                dst_pmd = await pgtable.walk_alloc(k, mm, dst_addr, arch.pmd_level)     # mm_alloc_pmd()
            except OutOfMemory:
                dst_pmd = None
            if dst_pmd is None:
                err = -ENOMEM
                break
            dst_pmdval = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, dst_pmd))
            if dst_pmdval.kind is Kind.NONE and not await pgtable.pte_alloc(k, mm, dst_pmd):
                err = -ENOMEM
                break
            dst_pmdval = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, dst_pmd))
            if dst_pmdval.kind is not Kind.TABLE:         # !pmd_present || pmd_trans_huge
                err = -EFAULT if dst_pmdval.kind is Kind.BAD else -EEXIST
                break
            off = dst_addr - dst_start
            err = await mfill_atomic_pte(k, dst_pmd, dst_vma, dst_addr, what, data[off:off + page], wp)
            if err:
                break
            copied += page
        return copied if copied else err
    finally:
        await mmap_read_unlock(mm)


async def mfill_atomic_pte(k, dst_pmd: int, dst_vma, dst_addr: int, what: str, data: bytes, wp: bool) -> int:
    """mfill_atomic_pte(): CONTINUE maps the page cache's page; POISON (6.6) installs a
    poisoned marker in any VMA; a private mapping gets an anon page (COPY) or the zero page
    (ZEROPAGE); a shared shmem mapping fills the page cache (shmem_mfill_atomic_pte)."""
    if what == MFILL_ATOMIC_CONTINUE:
        return await mfill_atomic_pte_continue(k, dst_pmd, dst_vma, dst_addr, wp)
    if what == MFILL_ATOMIC_POISON:
        return await mfill_atomic_pte_poison(k, dst_pmd, dst_vma, dst_addr)
    if not dst_vma.flags & VM_SHARED:
        if what == MFILL_ATOMIC_COPY:
            return await mfill_atomic_pte_copy(k, dst_pmd, dst_vma, dst_addr, data, wp)
        return await mfill_atomic_pte_zeropage(k, dst_pmd, dst_vma, dst_addr)
    return await shmem_mfill_atomic_pte(k, dst_pmd, dst_vma, dst_addr, what, data, wp)


async def mfill_atomic_pte_copy(k, dst_pmd: int, dst_vma, dst_addr: int, data: bytes, wp: bool) -> int:
    """mfill_atomic_pte_copy(): a new anon page with the caller's data, installed by
    mfill_atomic_install_pte() (freed again if that fails)."""
    try:
        page = k.alloc.alloc_pages(k.page_order, PageUse.ANON, owner=dst_vma.mm)
    except OutOfMemory:
        return -ENOMEM
    k.physmem.write(page.paddr, data[:k.page_size])
    ret = await mfill_atomic_install_pte(k, dst_vma, dst_addr, page, pmdp=dst_pmd, wp=wp)
    if ret:
        k.alloc.free_pages(page)
    return ret


async def mfill_atomic_pte_zeropage(k, dst_pmd: int, dst_vma, dst_addr: int) -> int:
    """mfill_atomic_pte_zeropage(): map the zero page (special, read-only) into a none pte
    under the ptl. A failed pte_offset_map_lock() is -EAGAIN; a pte that is not none
    (pte_none(), a marker counts as present here in 6.6) is -EEXIST; a private shmem
    mapping past i_size is -EFAULT."""
    arch = k.arch
    locked = await pgtable.pte_offset_map_lock(k, dst_vma.mm, dst_pmd, dst_addr)
    if locked is None:
        k.stats["mfill_eagain"] += 1
        return -EAGAIN
    ptep, ptl = locked
    ret = 0
    if dst_vma.file is not None and _beyond_eof(k, dst_vma, dst_addr):
        ret = -EFAULT
    elif (await pgtable.get_entry(k, ptep, arch.pte_level)).kind is not Kind.NONE:
        ret = -EEXIST
    else:
        prot = memory.vm_get_page_prot(dst_vma.flags) & ~Access.W
        zero = leaf_entry(k.zero_page.paddr, prot, special=True, young=True)   # pte_mkspecial(pfn_pte())
        await pgtable.set_entry(k, ptep, arch.pte_level, zero)
        k.stats["uffdio_zeropage"] += 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return ret


def _beyond_eof(k, vma, addr: int) -> bool:
    """offset >= DIV_ROUND_UP(i_size_read(inode), PAGE_SIZE): checked under the ptl to
    serialize against truncation."""
    inode = vma.file
    return rmap.linear_page_index(k, vma, addr) >= -(-inode.size // k.page_size)


async def mfill_atomic_pte_poison(k, dst_pmd: int, dst_vma, dst_addr: int) -> int:
    """mfill_atomic_pte_poison() (UFFDIO_POISON, 6.6, mm/userfaultfd.c): under the ptl,
    make_pte_marker(PTE_MARKER_POISONED) in a none pte. Failure categories: a failed
    pte_offset_map_lock() is -EAGAIN to the ioctl caller (who retries: EAGAIN, as the
    other mfill paths); mfill_file_over_size() (a shmem index past i_size, checked under
    the ptl against truncation) is -EFAULT; any other pte is -EEXIST, a uffd-wp marker
    included ("Refuse to overwrite any PTE, even a PTE marker (e.g. UFFD WP)": pte_none(),
    not pte_none_mostly()). No page, no rmap, no rss counter: the marker is the whole
    state. Nothing was present before, so nothing to flush."""
    arch = k.arch
    locked = await pgtable.pte_offset_map_lock(k, dst_vma.mm, dst_pmd, dst_addr)
    if locked is None:
        k.stats["mfill_eagain"] += 1
        return -EAGAIN
    ptep, ptl = locked
    ret = 0
    if dst_vma.file is not None and _beyond_eof(k, dst_vma, dst_addr):   # mfill_file_over_size()
        ret = -EFAULT
    elif (await pgtable.get_entry(k, ptep, arch.pte_level)).kind is not Kind.NONE:
        ret = -EEXIST
    else:
        await pgtable.set_entry(k, ptep, arch.pte_level, make_pte_marker(PTE_MARKER_POISONED))
        k.stats["uffdio_poison"] += 1
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return ret


async def mfill_atomic_pte_continue(k, dst_pmd: int, dst_vma, dst_addr: int, wp: bool) -> int:
    """mfill_atomic_pte_continue() (UFFDIO_CONTINUE, resolving a minor fault): look the page
    up in the page cache without allocating (shmem_get_folio(SGP_NOALLOC): a hole is
    -EFAULT), lock it; a hwpoisoned page (memory_failure() keeps a small shmem page in the
    page cache, poisoned) is -EIO (``if (PageHWPoison(page)) { ret = -EIO; goto
    out_release; }``: GIVEUP, the caller gets the error); else map it with
    mfill_atomic_install_pte() (-EAGAIN / -EEXIST pass up), unlock it."""
    inode = dst_vma.file
    index = rmap.linear_page_index(k, dst_vma, dst_addr)
    if index << k.page_shift >= inode.size:
        return -EFAULT
    folio = shmem.filemap_get_folio(inode.mapping, index)
    if folio is None and index in inode.mapping.swap_entries:
        folio = await shmem.shmem_get_folio(k, inode, index, noalloc=True)    # swapped in
    if folio is None:
        return -EFAULT
    folio.refcount += 1                                               # the lookup's reference
    await shmem.folio_lock(k, folio)
    if folio.mapping is not inode.mapping:                            # truncated meanwhile
        shmem.folio_unlock(folio)
        memory.put_page(k, folio)
        return -EFAULT
    # PageHWPoison(folio_file_page(folio, pgoff)): the model keeps the flag per folio and
    # poisons only small ones (memory_failure() of a THP is -EBUSY before its split)
    if folio.order == k.page_order and folio.extra.get("hwpoison"):
        shmem.folio_unlock(folio)                                     # out_release:
        memory.put_page(k, folio)
        k.stats["uffdio_continue_hwpoison"] += 1
        return -EIO
    ret = await mfill_atomic_install_pte(k, dst_vma, dst_addr, folio, pmdp=dst_pmd, wp=wp,
                                         paddr=shmem.folio_page_paddr(folio, index), newly_allocated=False)
    shmem.folio_unlock(folio)
    memory.put_page(k, folio)           # on success the mapping took its own reference
    if not ret:
        k.stats["uffdio_continue"] += 1
    return ret


async def shmem_mfill_atomic_pte(k, dst_pmd: int, dst_vma, dst_addr: int, what: str, data: bytes,
                                 wp: bool) -> int:
    """shmem_mfill_atomic_pte() (COPY / ZEROPAGE into a shared shmem mapping): a new folio
    (the data, or zeroes) added to the page cache (-EEXIST if the index is filled already,
    -EFAULT beyond i_size), then mapped by mfill_atomic_install_pte(); on failure it leaves
    the cache again."""
    inode = dst_vma.file
    index = rmap.linear_page_index(k, dst_vma, dst_addr)
    if index << k.page_shift >= inode.size:
        return -EFAULT
    try:
        folio = k.alloc.alloc_pages(k.page_order, PageUse.SHMEM, owner=inode.mapping)
    except OutOfMemory:
        return -ENOMEM
    if what == MFILL_ATOMIC_COPY:
        k.physmem.write(folio.paddr, data[:k.page_size])
    folio.locked = True                                               # __folio_set_locked()
    await sched_point("page_cache_insert", (inode.ino, index))
    if shmem.filemap_get_folio(inode.mapping, index) is not None or index in inode.mapping.swap_entries:
        k.alloc.free_pages(folio)
        return -EEXIST
    shmem.add_to_page_cache(inode.mapping, folio, index)
    ret = await mfill_atomic_install_pte(k, dst_vma, dst_addr, folio, pmdp=dst_pmd, wp=wp)
    shmem.folio_unlock(folio)
    if ret:
        shmem.delete_from_page_cache(k, folio)                       # filemap_remove_folio()
    else:
        k.stats["shmem_mfill"] += 1
    return ret


async def mfill_atomic_copy(k, mm, dst: int, data: bytes) -> int:
    """UFFDIO_COPY of one page into a private mapping: 0, or -EAGAIN when the PTE table
    could not be mapped (the caller retries), -EEXIST when a pte is already there."""
    await mmap_read_lock(mm)
    try:
        vma = mm.vma_lookup(dst)
        if vma is None or vma.flags & VM_SHARED:
            return -ENOENT
        dst &= ~(k.page_size - 1)
        rmap.anon_vma_prepare(k, vma)
        try:
            page = k.alloc.alloc_pages(k.page_order, PageUse.ANON, owner=mm)
        except OutOfMemory:
            return -ENOMEM
        k.physmem.write(page.paddr, data[:k.page_size])
        ret = await mfill_atomic_install_pte(k, vma, dst, page)
        if ret:
            k.alloc.free_pages(page)
        return ret
    finally:
        await mmap_read_unlock(mm)


async def mfill_atomic_install_pte(k, vma, dst: int, page, pmdp: int | None = None, wp: bool = False,
                                   paddr: int | None = None, newly_allocated: bool = True) -> int:
    """mfill_atomic_install_pte(): map ``page`` at ``dst`` under the ptl; a failed map is
    -EAGAIN to the caller (RETRY / -EAGAIN category). A page-cache page (CONTINUE, shared
    shmem COPY) gets a file rmap and is writable only in a shared writable mapping; an anon
    page a new anon rmap. A pte that is not none is -EEXIST, except a uffd-wp marker
    (pte_none_mostly: both MISSING and WP registered, a none pte write-protected first).
    ``wp`` (MFILL_ATOMIC_WP) installs the pte write-protected with the uffd-wp bit; a
    shmem mapping past i_size is -EFAULT."""
    mm, arch = vma.mm, k.arch
    if pmdp is None:
        pmdp = await pgtable.walk_alloc(k, mm, dst, arch.pmd_level)
        if pmdp is None or not await pgtable.pte_alloc(k, mm, pmdp):
            return -EAGAIN
    page_in_cache = page.use is PageUse.SHMEM
    writable = bool(vma.flags & VM_WRITE) and not (page_in_cache and not vma.flags & VM_SHARED)
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, dst)
    if locked is None:
        k.stats["mfill_eagain"] += 1
        return -EAGAIN
    ptep, ptl = locked
    if isinstance(vma.file, shmem.ShmemInode) and _beyond_eof(k, vma, dst):
        await pgtable.pte_unmap_unlock(k, ptep, ptl)      # serialize against truncate
        return -EFAULT
    if not pte_none_mostly(await pgtable.get_entry(k, ptep, arch.pte_level)):
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return -EEXIST
    prot = memory.vm_get_page_prot(vma.flags) & ~Access.W
    if writable and not wp:
        prot |= Access.W                                   # pte_mkwrite(); pte_mkuffd_wp() clears it
    if page_in_cache:
        memory.add_mapped_page(k, mm, page)                # folio_add_file_rmap_pte() + get
    else:
        page.mapcount = 1
        rmap.folio_add_new_anon_rmap(k, page, vma, dst)
        mm.rss[MM_ANONPAGES] += 1
    await pgtable.set_entry(k, ptep, arch.pte_level,
                            pgtable.pte_mkdirty(k, leaf_entry(page.paddr if paddr is None else paddr, prot,
                                                          young=True, uffd_wp=wp)))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    k.stats["uffdio_copy" if newly_allocated and not page_in_cache else "uffd_install_pte"] += 1
    return 0


# -- UFFDIO_WRITEPROTECT -----------------------------------------------------------------------

async def uffd_wp_range(k, vma, start: int, length: int, enable_wp: bool) -> int:
    """uffd_wp_range(): change_protection(MM_CP_UFFD_WP or MM_CP_UFFD_WP_RESOLVE, the latter
    with MM_CP_TRY_CHANGE_WRITABLE where the VMA wants a manual write upgrade)."""
    from mm_core import mprotect
    flags = mprotect.MM_CP_UFFD_WP if enable_wp else mprotect.MM_CP_UFFD_WP_RESOLVE
    if not enable_wp and vma.flags & VM_WRITE:
        flags |= mprotect.MM_CP_TRY_CHANGE_WRITABLE
    return await mprotect.change_protection(k, vma, start, start + length, flags)


async def mwriteprotect_range(k, ctx: UserfaultfdCtx, start: int, length: int, enable_wp: bool) -> int:
    """mwriteprotect_range() (UFFDIO_WRITEPROTECT) under mmap_read_lock: every VMA of the
    range must be registered for WP (else -ENOENT: also where the arch has no uffd-wp and
    the registration was refused); uffd_wp_range() on each part. 0 or -errno (-ENOMEM when
    a PTE table for the markers could not be allocated)."""
    page = k.page_size
    if start % page or length % page or length <= 0:
        return -EINVAL
    mm, end = ctx.mm, start + length
    await mmap_read_lock(mm)
    try:
        if ctx.mmap_changing:
            k.stats["uffd_mmap_changing_eagain"] += 1
            return -EAGAIN
        err = -ENOENT
        for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
            if not vma.uffd_wp or vma.uffd_ctx is not ctx:
                err = -ENOENT
                break
            lo, hi = max(vma.start, start), min(vma.end, end)
            err = await uffd_wp_range(k, vma, lo, hi - lo, enable_wp)
            if err < 0:
                break
            err = 0
        return err
    finally:
        await mmap_read_unlock(mm)


async def userfaultfd_writeprotect(k, ctx: UserfaultfdCtx, start: int, length: int, mode: int) -> int:
    """userfaultfd_writeprotect(): WP and DONTWAKE together are -EINVAL; protect or
    un-protect the range; an un-protect wakes the faults waiting in it unless DONTWAKE."""
    if mode & ~(UFFDIO_WRITEPROTECT_MODE_WP | UFFDIO_WRITEPROTECT_MODE_DONTWAKE):
        return -EINVAL
    mode_wp = bool(mode & UFFDIO_WRITEPROTECT_MODE_WP)
    mode_dontwake = bool(mode & UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    if mode_wp and mode_dontwake:
        return -EINVAL
    ret = await mwriteprotect_range(k, ctx, start, length, mode_wp)
    if ret:
        return ret
    k.stats["uffdio_writeprotect"] += 1
    if not mode_wp and not mode_dontwake:
        await wake_userfault(k, ctx, start, length)
    return 0


async def userfaultfd_mfill(k, ctx: UserfaultfdCtx, what: str, dst: int, length: int, mode: int,
                            data: bytes = b"") -> int:
    """userfaultfd_copy() / _zeropage() / _continue(): mfill_atomic(), then wake the range
    filled (unless DONTWAKE). Returns the bytes filled (uffdio_*.copy / zeropage / mapped)
    or -errno."""
    dontwake = 1 << 0                   # the DONTWAKE bit of every mode
    wp_bit = {MFILL_ATOMIC_COPY: UFFDIO_COPY_MODE_WP, MFILL_ATOMIC_CONTINUE: UFFDIO_CONTINUE_MODE_WP,
              MFILL_ATOMIC_ZEROPAGE: 0}[what]
    if mode & ~(dontwake | wp_bit):
        return -EINVAL
    ret = await mfill_atomic(k, ctx, ctx.mm, dst, length, what, data, wp=bool(mode & wp_bit))
    if ret > 0 and not mode & dontwake:
        await wake_userfault(k, ctx, dst, ret)
    return ret


def validate_range(k, start: int, length: int) -> int:
    """validate_range() (fs/userfaultfd.c): page-aligned, non-empty, inside TASK_SIZE;
    -EINVAL otherwise (mmap_min_addr is not modelled)."""
    page, task_size = k.page_size, k.arch.task_size
    if start % page or length % page or length <= 0 or start >= task_size or length > task_size - start:
        return -EINVAL
    return 0


async def userfaultfd_poison(k, ctx: UserfaultfdCtx, start: int, length: int, mode: int) -> int:
    """userfaultfd_poison() (fs/userfaultfd.c, 6.6): -EAGAIN while mmap_changing (checked
    here and again by mfill_atomic() under mmap_read_lock), validate_range() (-EINVAL),
    only UFFDIO_POISON_MODE_DONTWAKE in ``mode`` (-EINVAL), then mfill_atomic_poison() ->
    mfill_atomic(MFILL_ATOMIC_POISON), and wake the faults of the range done unless
    DONTWAKE: a fault sleeping in handle_userfault() retries and meets the marker
    (handle_pte_marker(): VM_FAULT_HWPOISON, SIGBUS). Returns uffdio_poison.updated: the
    bytes poisoned, or -errno when none were (a short count: the caller sees -EAGAIN).
    The ioctl does not look at ctx->features: UFFD_FEATURE_POISON only advertises it.
    Before 6.6 there is no such ioctl: -EINVAL, userfaultfd_ioctl()'s answer to an unknown
    command."""
    if not uffdio_poison_supported(k):
        return -EINVAL
    if ctx.mmap_changing:
        k.stats["uffd_mmap_changing_eagain"] += 1
        return -EAGAIN
    err = validate_range(k, start, length)
    if err:
        return err
    if mode & ~UFFDIO_POISON_MODE_DONTWAKE:
        return -EINVAL
    ret = await mfill_atomic(k, ctx, ctx.mm, start, length, MFILL_ATOMIC_POISON)
    if ret > 0 and not mode & UFFDIO_POISON_MODE_DONTWAKE:
        await wake_userfault(k, ctx, start, ret)
    return ret


# -- UFFDIO_MOVE -------------------------------------------------------------------------------

def validate_move_areas(src_vma, dst_vma) -> int:
    """validate_move_areas(): same access flags (hence the same vm_page_prot), both or
    neither mlocked, writable, both anonymous. (The dst VMA's registration with this
    userfaultfd context is not modelled: there is no uffd context object.)"""
    if (src_vma.flags & VM_ACCESS_FLAGS) != (dst_vma.flags & VM_ACCESS_FLAGS):
        return -EINVAL
    if (src_vma.flags & VM_LOCKED) != (dst_vma.flags & VM_LOCKED):
        return -EINVAL
    if not src_vma.flags & VM_WRITE:
        return -EINVAL
    if not src_vma.anonymous or not dst_vma.anonymous:
        return -EINVAL
    return 0


async def move_pages(k, mm, dst_start: int, src_start: int, length: int, mode: int = 0) -> int:
    """move_pages() (UFFDIO_MOVE): move the anon pages of [src_start, +length) to dst_start
    one pte at a time, under mmap_read_lock (uffd_move_lock without per-VMA locks).

    Returns the bytes moved, or -errno when nothing was. -EAGAIN from move_pages_pte() or
    move_pages_huge_pmd() means "look at this address again" (RETRY). Per step: find or
    allocate both pmds, refuse a huge dst (-EEXIST), then pmd_trans_huge_lock() on the src
    pmd (6.8): a THP or migration pmd is moved whole by move_pages_huge_pmd() when both
    addresses are PMD-aligned, a whole PMD is left and the dst pmd is none; otherwise a THP
    that is not exclusive anon is -EBUSY and an exclusive one is split (split_huge_pmd(),
    `continue`: the PTE path then meets the PTE-mapped large folio, whose split_folio() is
    not modelled: -EBUSY). A migration pmd that would be split is waited on instead
    (splitting it into migration ptes is not modelled). Else allocate the PTE tables and
    move_pages_pte(). Before 6.8 there is no such ioctl: -EINVAL, as userfaultfd_ioctl()
    answers an unknown command."""
    if not k.profile.uffdio_move:
        return -EINVAL
    page = k.page_size
    if src_start % page or dst_start % page or length % page or length <= 0 \
            or mode & ~(UFFDIO_MOVE_MODE_DONTWAKE | UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES):
        return -EINVAL
    await mmap_read_lock(mm)
    try:
        dst_vma = mm.vma_lookup(dst_start)               # find_vma_and_prepare_anon()
        if dst_vma is None:
            return -ENOENT
        if not dst_vma.flags & VM_SHARED:
            rmap.anon_vma_prepare(k, dst_vma)
        src_vma = dst_vma if dst_vma.start <= src_start < dst_vma.end else mm.vma_lookup(src_start)
        if src_vma is None:
            return -ENOENT
        if src_vma.flags & VM_SHARED or src_start + length > src_vma.end \
                or dst_vma.flags & VM_SHARED or dst_start + length > dst_vma.end:
            return -EINVAL
        err = validate_move_areas(src_vma, dst_vma)
        if err:
            return err
        arch = k.arch
        src_addr, dst_addr, moved, err = src_start, dst_start, 0, 0
        while src_addr < src_start + length:
            src_pmd = await rmap.walk_to_pmd(k, mm, src_addr)            # mm_find_pmd()
            try:
                if src_pmd is None:
                    if not mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES:
                        err = -ENOENT
                        break
                    src_pmd = await pgtable.walk_alloc(k, mm, src_addr, arch.pmd_level)
                dst_pmd = await pgtable.walk_alloc(k, mm, dst_addr, arch.pmd_level)   # mm_alloc_pmd()
            except OutOfMemory:
                err = -ENOMEM
                break
            if src_pmd is None or dst_pmd is None:
                err = -ENOMEM
                break
            dst_pmdval = await pgtable.pmdp_get_lockless(k, dst_pmd)
            if arch.decode(arch.pmd_level, dst_pmdval).kind is Kind.LEAF:
                err = -EEXIST                                  # a THP at dst: be strict
                break
            # pmd_trans_huge_lock(): a lockless look first, the pml only for a huge or swap pmd
            src_pmdval = await pgtable.get_entry(k, src_pmd, arch.pmd_level)
            ptl = None
            if src_pmdval.kind in (Kind.LEAF, Kind.MIGRATION, Kind.SWAP):
                ptl, src_pmdval = await huge_memory.pmd_trans_huge_lock(k, mm, src_pmd)
            if ptl is not None:
                if move_splits_huge_pmd(k, dst_addr, src_addr, src_start + length) \
                        or arch.decode(arch.pmd_level, dst_pmdval).kind is not Kind.NONE:
                    if src_pmdval.kind is Kind.LEAF:              # "Can be a migration entry"
                        folio = k.alloc.page_of(src_pmdval.paddr)
                        if folio is None or not page_anon_exclusive(folio, k):
                            await traps.unlock(ptl)
                            err = -EBUSY
                            break
                    elif "move_pages_reads_folio_of_non_present_pmd" in k.bugs:
                        pmd_folio_of_non_present_pmd(k, src_pmd, src_pmdval)
                    await traps.unlock(ptl)
                    if src_pmdval.kind is Kind.MIGRATION:
                        # split_huge_pmd() of a migration pmd (into migration ptes, on
                        # which move_pages_pte() would wait) is not modelled: wait here
                        await memory.pmd_migration_entry_wait(k, mm, src_pmd)
                        continue
                    if src_pmdval.kind is not Kind.LEAF:
                        err = -EBUSY                    # a swap pmd: none in anon memory here
                        break
                    k.stats["uffdio_move_split_huge_pmd"] += 1
                    await huge_memory.split_huge_pmd(k, src_vma, src_pmd, src_addr)
                    continue                    # the folio will be split by move_pages_pte()
                err = await huge_memory.move_pages_huge_pmd(k, mm, dst_pmd, src_pmd, dst_pmdval, dst_vma,
                                                            src_vma, dst_addr, src_addr, ptl)
                if err == -EAGAIN:
                    k.stats["uffdio_move_eagain"] += 1
                    await sched_point("retry", src_pmd)
                    continue
                if err:
                    break
                step = huge_memory.hpage_pmd_size(k)
                src_addr, dst_addr, moved = src_addr + step, dst_addr + step, moved + step
                continue
            if src_pmdval.kind is Kind.NONE:
                if not mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES:
                    err = -ENOENT
                    break
                if not await pgtable.pte_alloc(k, mm, src_pmd):
                    err = -ENOMEM
                    break
            if not await pgtable.pte_alloc(k, mm, dst_pmd):
                err = -ENOMEM
                break
            err = await move_pages_pte(k, mm, dst_pmd, src_pmd, dst_vma, src_vma, dst_addr, src_addr, mode)
            if err == -EAGAIN:
                k.stats["uffdio_move_eagain"] += 1
                await sched_point("retry", src_pmd)
                continue
            if err:
                break
            src_addr, dst_addr, moved = src_addr + k.page_size, dst_addr + k.page_size, moved + k.page_size
        return moved if moved else err
    finally:
        await mmap_read_unlock(mm)


def pmd_folio_of_non_present_pmd(k, pmdp: int, pmdval) -> None:
    """Bug injection ``move_pages_reads_folio_of_non_present_pmd``: move_pages() before
    "userfaultfd: fix a crash when UFFDIO_MOVE handles a THP hole" (Suren Baghdasaryan,
    2025, Fixes: adef440691ba) took pmd_folio(*src_pmd) on its split path without testing
    pmd_present(): for a migration entry pmd_pfn() decodes swap bits, and the
    PageAnonExclusive() of that "page" faults (syzbot). Reported as the kernel's oops."""
    from mm_core.sanitizers import Finding
    cur = k.current_task()
    raise Finding("BUG", "BUG: unable to handle page fault in move_pages: pmd_folio() of a "
                  f"non-present ({pmdval.kind.value}) pmd", "BUG:pmd_folio:non-present:move_pages",
                  [f"  pmd at {pmdp:#x} is {k.physmem.read_entry(pmdp):#x} ({pmdval.kind.value}), "
                   f"read by {cur.name if cur is not None else 'the API caller'} under "
                   "pmd_trans_huge_lock()",
                   "  the fix tests pmd_present() first (a migration entry is split, or moved "
                   "whole by move_pages_huge_pmd(), which waits for it)"])


def move_splits_huge_pmd(k, dst_addr: int, src_addr: int, src_end: int) -> bool:
    """move_splits_huge_pmd(): moving from src_addr would split the THP: either address is
    not PMD-aligned, or less than a PMD is left to move."""
    size = huge_memory.hpage_pmd_size(k)
    return bool(src_addr & (size - 1) or dst_addr & (size - 1)) or src_end - src_addr < size


def vm_normal_folio(k, entry):
    """vm_normal_folio(): the folio a present pte maps (None for the zero page)."""
    return None if entry.special else k.alloc.page_of(entry.paddr)


def page_anon_exclusive(folio, k=None) -> bool:
    """PageAnonExclusive(): an anon page mapped once (the model tracks a folio's mappings,
    not each page's: a PMD-mapped THP has one; with ``k``, a THP whose pmd was split, never
    shared with a child and with each page mapped at most once by a pte counts as
    exclusive too)."""
    if folio.use is not PageUse.ANON or "anon_vma" not in folio.extra:
        return False
    pages = 1 if k is None else max(1, 1 << (folio.order - k.page_order))
    if pages == 1 or folio.mapcount == 1:
        return folio.mapcount == 1
    return not folio.extra.get("forked") and 1 <= folio.mapcount <= pages


async def move_pages_pte(k, mm, dst_pmd: int, src_pmd: int, dst_vma, src_vma, dst_addr: int,
                         src_addr: int, mode: int) -> int:
    """move_pages_pte(): move one pte from src_addr to dst_addr (mmap_read_lock held).

    Categories: a failed map of either table is -EAGAIN (the caller looks again: RETRY);
    so is a src pte that changed under us (pte_same), a dst pmd that changed (6.14,
    pmd_same) and a folio whose anon_vma is gone.
    -EEXIST if dst is not none, -ENOENT for a src hole (0 with ALLOW_SRC_HOLES), -EBUSY
    for a folio that is not exclusive anon. Contention on the folio lock or the anon_vma
    lock: unmap both ptes, sleep on the lock, retry from the maps. A swap pte (the 2025
    code): -EBUSY unless pte_swp_exclusive(), -EAGAIN without the swap device
    (get_swap_device(), held to the end), a folio for it in the swap cache is locked (on
    contention: unmap both, put the device, folio_lock(), retry; a large one is -EBUSY),
    then move_swap_pte(); a marker or hwpoison entry is -EFAULT. Refused, not modelled: a
    large folio (the kernel split_folio()s it, e.g. after move_pages() split a THP's pmd)
    and migration entries (migration_entry_wait(), -EAGAIN) are -EBUSY."""
    arch = k.arch
    level = arch.pte_level
    # pte_offset_map_rw_nolock(mm, pmd, addr, &dummy_pmdval, &ptl) in 6.13 (the pte_same()
    # rechecks under the ptl stand in for pmd_same()), pte_offset_map_nolock() before; 6.14
    # keeps dst's pmdval for a pmd_same() recheck: a none dst pte proves nothing about a
    # table that PT_RECLAIM may free meanwhile
    map_nolock = pgtable.pte_offset_map_rw_nolock if k.profile.rw_nolock else pgtable.pte_offset_map_nolock
    recheck_dst_pmd = k.profile.pt_reclaim and "move_pages_pte_without_dst_pmd_recheck" not in k.bugs
    stack_copy_bug = "move_pages_pte_unmaps_stack_copy" in k.bugs
    src_folio = None
    src_folio_pte = 0
    src_anon_vma = None
    src_pte = dst_pte = None
    si = None
    err = 0
    while True:                                                    # retry:
        mapped = await map_nolock(k, mm, dst_pmd, dst_addr)
        if mapped is None:                      # a huge pmd materialized from under us
            err = -EAGAIN
            break
        dst_pte, dst_ptl = mapped[0], mapped[1]
        dst_pmdval = mapped[2] if recheck_dst_pmd else None
        mapped = await map_nolock(k, mm, src_pmd, src_addr)
        if mapped is None:                      # MADV_DONTNEED zapped a THP, or a THP fault
            err = -EAGAIN
            break
        src_pte, src_ptl = mapped[0], mapped[1]
        # sanity checks of the live pmds (WARN_ON_ONCE in the kernel)
        live = [arch.decode(arch.pmd_level, await pgtable.get_raw(k, p)).kind for p in (dst_pmd, src_pmd)]
        if any(kind in (Kind.NONE, Kind.LEAF) for kind in live):
            k.printk(f"move_pages_pte: pmd none or huge under a mapped pte ({live}): -EINVAL")
            k.stats["uffdio_move_sanity_einval"] += 1
            err = -EINVAL
            break
        await traps.lock(dst_ptl)
        orig_dst_pte = await pgtable.get_raw(k, dst_pte)
        await traps.unlock(dst_ptl)
        if arch.decode(level, orig_dst_pte).kind is not Kind.NONE:
            err = -EEXIST
            break
        await traps.lock(src_ptl)
        orig_src_pte = await pgtable.get_raw(k, src_pte)
        await traps.unlock(src_ptl)
        src_ent = arch.decode(level, orig_src_pte)
        if src_ent.kind is Kind.NONE:
            err = 0 if mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES else -ENOENT
            break
        if src_folio is not None and src_folio_pte != orig_src_pte:
            err = -EAGAIN                       # the pte changed while we slept on the folio lock
            break
        if src_ent.kind is Kind.MIGRATION:
            k.stats["uffdio_move_migration_refused"] += 1
            err = -EBUSY                        # not modelled: migration_entry_wait(), -EAGAIN
            break
        if src_ent.kind is not Kind.LEAF:       # !pte_present()
            if not swapfile.is_swap_pte(src_ent):
                err = -EFAULT                   # a marker or hwpoison entry: !is_swap_entry
                break
            if not src_ent.exclusive:
                err = -EBUSY                    # !pte_swp_exclusive(): fork shared the entry
                break
            if si is None:
                si = swapfile.get_swap_device(k, src_ent)
                if si is None:
                    err = -EAGAIN               # swapoff got past try_to_unuse()
                    break
            if src_folio is None:
                # the folio may still sit in the swap cache (readahead, a swap-in that lost
                # its pte_same(), reclaim that kept it): its rmap must follow the entry
                folio = await swap_state.swap_cache_get_folio(k, src_ent.swp_offset)
                if folio is not None:
                    if folio.order != k.page_order:
                        memory.put_page(k, folio)
                        err = -EBUSY            # split_folio() of a cached large folio fails too
                        break
                    src_folio, src_folio_pte = folio, orig_src_pte
                    if not await shmem.folio_trylock(k, src_folio):
                        k.stats["uffdio_move_swap_folio_lock_retry"] += 1
                        await pgtable.pte_unmap(k, src_pte)
                        await pgtable.pte_unmap(k, dst_pte)
                        src_pte = dst_pte = None
                        swapfile.put_swap_device(si)
                        si = None
                        await shmem.folio_lock(k, src_folio)  # now we can block and wait
                        await sched_point("retry", src_pmd)
                        continue
            err = await move_swap_pte(k, mm, dst_vma, dst_addr, src_addr, dst_pte, src_pte, orig_dst_pte,
                                      orig_src_pte, dst_pmd, dst_pmdval, dst_ptl, src_ptl, src_folio, src_ent)
            break
        if src_ent.paddr == k.zero_page.paddr:
            err = await move_zeropage_pte(k, mm, dst_vma, src_vma, dst_addr, src_addr, dst_pte, src_pte,
                                          orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval, dst_ptl, src_ptl)
            break
        if src_folio is None:
            # pin the folio while holding the ptl, so it is not freed under us
            await traps.lock(src_ptl)
            if await pgtable.get_raw(k, src_pte) != orig_src_pte:
                await traps.unlock(src_ptl)
                err = -EAGAIN
                break
            folio = vm_normal_folio(k, src_ent)
            if folio is None or not page_anon_exclusive(folio, k):
                await traps.unlock(src_ptl)
                err = -EBUSY
                break
            folio.refcount += 1                                          # folio_get()
            src_folio, src_folio_pte = folio, orig_src_pte
            await traps.unlock(src_ptl)
            if not await shmem.folio_trylock(k, src_folio):
                k.stats["uffdio_move_folio_lock_retry"] += 1
                # pte_unmap(src_pte); pte_unmap(dst_pte) (LIFO); before 927e926d72d9 the
                # stack copies: pte_unmap(&orig_src_pte); pte_unmap(&orig_dst_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_SRC_PTE if stack_copy_bug else src_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_DST_PTE if stack_copy_bug else dst_pte)
                src_pte = dst_pte = None
                await shmem.folio_lock(k, src_folio)          # now we can block and wait
                await sched_point("retry", src_pmd)
                continue
        # at this point src_folio is locked
        if src_folio.order != k.page_order:
            k.stats["uffdio_move_split_folio_unmodelled"] += 1
            err = -EBUSY                        # not modelled: split_folio() of a large folio
            break
        if src_anon_vma is None:
            src_anon_vma = rmap.folio_anon_vma(src_folio)               # folio_get_anon_vma()
            if src_anon_vma is None:
                err = -EAGAIN                   # the page was unmapped from under us
                break
            if not await traps.trylock(src_anon_vma.rwsem, "w"):       # anon_vma_trylock_write()
                k.stats["uffdio_move_anon_vma_retry"] += 1
                # pte_unmap(src_pte); pte_unmap(dst_pte) (LIFO); before 927e926d72d9 the
                # stack copies: pte_unmap(&orig_src_pte); pte_unmap(&orig_dst_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_SRC_PTE if stack_copy_bug else src_pte)
                await pgtable.pte_unmap(k, STACK_ORIG_DST_PTE if stack_copy_bug else dst_pte)
                src_pte = dst_pte = None
                await traps.lock(src_anon_vma.rwsem, "w")               # anon_vma_lock_write()
                await sched_point("retry", src_pmd)
                continue
        err = await move_present_pte(k, mm, dst_vma, src_vma, dst_addr, src_addr, dst_pte, src_pte,
                                     orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval, dst_ptl, src_ptl,
                                     src_folio)
        break
    # out:
    if src_anon_vma is not None:
        await traps.unlock(src_anon_vma.rwsem, "w")
    if src_folio is not None:
        shmem.folio_unlock(src_folio)
        memory.put_page(k, src_folio)                                    # folio_put()
    if "move_pages_pte_unmaps_in_map_order" in k.bugs:
        # before "mm/userfaultfd: fix kmap_local LIFO ordering for CONFIG_HIGHPTE" (2025)
        if dst_pte is not None:
            await pgtable.pte_unmap(k, dst_pte)
        if src_pte is not None:
            await pgtable.pte_unmap(k, src_pte)
    else:                                       # LIFO: src was mapped last
        if src_pte is not None:
            await pgtable.pte_unmap(k, src_pte)
        if dst_pte is not None:
            await pgtable.pte_unmap(k, dst_pte)
    if si is not None:
        swapfile.put_swap_device(si)
    return err


async def double_pt_lock(k, ptl1: SpinLock, pte1: int, ptl2: SpinLock, pte2: int) -> None:
    """double_pt_lock(): both ptls in address order (the ptl lives in the table's ptdesc,
    so the table's address stands for the lock's), once if they are the same lock."""
    arch = k.arch
    if arch.levels[arch.pte_level].table_base(pte1) > arch.levels[arch.pte_level].table_base(pte2):
        ptl1, ptl2 = ptl2, ptl1
    await traps.lock(ptl1)
    if ptl2 is not ptl1:
        await traps.lock(ptl2)                 # spin_lock_nested(SINGLE_DEPTH_NESTING)


async def double_pt_unlock(k, ptl1: SpinLock, ptl2: SpinLock) -> None:
    """double_pt_unlock()."""
    await traps.unlock(ptl1)
    if ptl2 is not ptl1:
        await traps.unlock(ptl2)


async def is_pte_pages_stable(k, dst_pte: int, src_pte: int, orig_dst_pte: int, orig_src_pte: int,
                              dst_pmd: int, dst_pmdval) -> bool:
    """is_pte_pages_stable() (6.14; open-coded pte_same() pairs before): both ptes
    unchanged, and (6.14, ``dst_pmdval`` given) dst's pmd still names the mapped table."""
    if await pgtable.get_raw(k, src_pte) != orig_src_pte or await pgtable.get_raw(k, dst_pte) != orig_dst_pte:
        return False
    return dst_pmdval is None or pgtable.pmd_same(k, dst_pmdval, await pgtable.pmdp_get_lockless(k, dst_pmd))


async def move_present_pte(k, mm, dst_vma, src_vma, dst_addr: int, src_addr: int, dst_pte: int, src_pte: int,
                           orig_dst_pte: int, orig_src_pte: int, dst_pmd: int, dst_pmdval,
                           dst_ptl: SpinLock, src_ptl: SpinLock, src_folio) -> int:
    """move_present_pte(): under both ptls, recheck both ptes (pte_same; -EAGAIN), clear and
    flush the src pte, move the folio's rmap to dst (anon_vma, index), set the dst pte
    writable and dirty (like mremap). The folio stays mapped once in the same mm: mapcount
    and rss counters do not change."""
    arch = k.arch
    level = arch.pte_level
    await double_pt_lock(k, dst_ptl, dst_pte, src_ptl, src_pte)
    err = 0
    if not await is_pte_pages_stable(k, dst_pte, src_pte, orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval):
        err = -EAGAIN
    elif src_folio.order != k.page_order or src_folio.extra.get("pinned") \
            or not page_anon_exclusive(src_folio, k):                # folio_maybe_dma_pinned()
        err = -EBUSY
    else:
        await pgtable.clear_entry(k, src_pte, level)                     # ptep_clear_flush()
        await flush_tlb_range(k, mm, src_addr, src_addr + k.page_size)
        rmap.folio_move_anon_rmap(k, src_folio, dst_vma)
        src_folio.index = rmap.linear_page_index(k, dst_vma, dst_addr)
        prot = memory.vm_get_page_prot(dst_vma.flags) | Access.W        # pte_mkwrite(pte_mkdirty())
        await pgtable.set_entry(k, dst_pte, level, pgtable.pte_mkdirty(k, leaf_entry(src_folio.paddr, prot,
                                                                                     young=True)))
        k.stats["uffdio_move"] += 1
    await double_pt_unlock(k, dst_ptl, src_ptl)
    return err


async def move_swap_pte(k, mm, dst_vma, dst_addr: int, src_addr: int, dst_pte: int, src_pte: int,
                        orig_dst_pte: int, orig_src_pte: int, dst_pmd: int, dst_pmdval,
                        dst_ptl: SpinLock, src_ptl: SpinLock, src_folio, entry) -> int:
    """move_swap_pte() (6.8 with the 2025 swap-cache fixes: Barry Song's "mm: userfaultfd:
    fix race of userfaultfd_move and swap cache" series, Kairui Song's recheck): the swap
    entry itself moves, with its swap count (one reference, one mm: MM_SWAPENTS does not
    change), marked soft-dirty. A locked swap-cache ``src_folio`` that is no longer the
    cache's folio for the entry is -EAGAIN; under both ptls is_pte_pages_stable() (-EAGAIN),
    then the cached folio's rmap moves to dst (folio_move_anon_rmap(), the index: a swap-in
    at dst hits the cache with dst's anon_vma and index; no anon_vma lock: the entry is
    exclusive and the folio unmapped, so no rmap walk finds it); with no folio, one that
    appeared in the cache meanwhile (a swap-in, swapped out again to the same entry) is
    -EAGAIN."""
    arch = k.arch
    level = arch.pte_level
    off = entry.swp_offset
    if src_folio is not None and src_folio.extra.get("swap") != off:
        return -EAGAIN                          # !folio_test_swapcache() || entry != folio->swap
    await double_pt_lock(k, dst_ptl, dst_pte, src_ptl, src_pte)
    if not await is_pte_pages_stable(k, dst_pte, src_pte, orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval):
        await double_pt_unlock(k, dst_ptl, src_ptl)
        return -EAGAIN
    if src_folio is not None:
        rmap.folio_move_anon_rmap(k, src_folio, dst_vma)
        src_folio.index = rmap.linear_page_index(k, dst_vma, dst_addr)
    elif k.swap_info is not None and off in k.swap_info.cache:     # swap_cache_has_folio()
        await double_pt_unlock(k, dst_ptl, src_ptl)
        k.stats["uffdio_move_swap_cache_appeared"] += 1
        return -EAGAIN
    ent = arch.decode(level, await pgtable.get_raw(k, src_pte))
    await pgtable.clear_entry(k, src_pte, level)                         # ptep_get_and_clear()
    await pgtable.set_entry(k, dst_pte, level, ent.with_(soft_dirty=True))   # pte_swp_mksoft_dirty()
    await double_pt_unlock(k, dst_ptl, src_ptl)
    k.stats["uffdio_move_swap"] += 1
    return 0


async def move_zeropage_pte(k, mm, dst_vma, src_vma, dst_addr: int, src_addr: int, dst_pte: int,
                            src_pte: int, orig_dst_pte: int, orig_src_pte: int, dst_pmd: int, dst_pmdval,
                            dst_ptl: SpinLock, src_ptl: SpinLock) -> int:
    """move_zeropage_pte(): the zero page is not moved but mapped afresh at dst."""
    arch = k.arch
    level = arch.pte_level
    await double_pt_lock(k, dst_ptl, dst_pte, src_ptl, src_pte)
    if not await is_pte_pages_stable(k, dst_pte, src_pte, orig_dst_pte, orig_src_pte, dst_pmd, dst_pmdval):
        await double_pt_unlock(k, dst_ptl, src_ptl)
        return -EAGAIN
    prot = memory.vm_get_page_prot(dst_vma.flags) & ~Access.W
    await pgtable.clear_entry(k, src_pte, level)                         # ptep_clear_flush()
    await flush_tlb_range(k, mm, src_addr, src_addr + k.page_size)
    await pgtable.set_entry(k, dst_pte, level, leaf_entry(k.zero_page.paddr, prot, special=True, young=True))
    await double_pt_unlock(k, dst_ptl, src_ptl)
    k.stats["uffdio_move_zeropage"] += 1
    return 0


# -- non-cooperative events: UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP --------------------------------

async def userfaultfd_event_wait_completion(k, ctx: UserfaultfdCtx, ewq: UffdEventWaitQueue) -> None:
    """userfaultfd_event_wait_completion() (fs/userfaultfd.c, 6.6): queue the event on
    event_wqh, wake read() (fd_wqh) and sleep (TASK_KILLABLE) until a read() completes it
    (msg.event = 0) or the context is released (then unqueue it, from event_wqh or a
    reader's fork_event list; for a FORK event the child's context is dropped: under the
    child's mmap_write_lock its VMAs lose the registration); finally drop mmap_changing.
    Called with no mmap_lock held. Cannot fail: the sender waits."""
    release_new_ctx = None
    await traps.lock(ctx.event_lock)                                 # spin_lock_irq(&event_wqh.lock)
    ctx.event_wqh.append(ewq)                                        # __add_wait_queue()
    while True:
        if ewq.event == 0:
            break
        if ctx.released:
            # &ewq->wq may be queued in a reader's fork_event: __remove_wait_queue()
            # ignores the head
            if ewq in ctx.event_wqh:
                ctx.event_wqh.remove(ewq)                            # __remove_wait_queue()
            if ewq.fork_event:
                ewq.fork_event.remove(ewq)
            if ewq.event == UFFD_EVENT_FORK:
                release_new_ctx = ewq.new_ctx
            break
        await traps.unlock(ctx.event_lock)
        k.stats["uffd_event_waits"] += 1
        await traps.wait(ewq)                                        # wake_up_poll(fd_wqh); schedule()
        await traps.lock(ctx.event_lock)
    await traps.unlock(ctx.event_lock)
    if release_new_ctx is not None:
        # the child's VMAs still point to the context no one will get an fd for
        new_mm = release_new_ctx.mm
        await mmap_write_lock(new_mm)
        for vma in list(new_mm.vmas):
            if vma.uffd_ctx is release_new_ctx:
                vma.flags &= ~VM_UFFD_FLAGS                          # userfaultfd_set_vm_flags()
                vma.uffd_ctx = None
                await sched_point("vma_write", vma)
        await mmap_write_unlock(new_mm)
        release_new_ctx.released = True                              # userfaultfd_ctx_put()
        k.stats["uffd_fork_ctx_dropped"] += 1
    ctx.mmap_changing -= 1                                           # atomic_dec(&ctx->mmap_changing)
    assert ctx.mmap_changing >= 0


async def userfaultfd_remove(k, vma, start: int, end: int) -> bool:
    """userfaultfd_remove() (6.6, from madvise_dontneed_free() and madvise_remove()): with
    UFFD_FEATURE_EVENT_REMOVE on the VMA's context, raise mmap_changing, DROP mmap_lock
    (read), send UFFD_EVENT_REMOVE {start, end} and wait until the handler read it. Returns
    True when nothing was sent (mmap_lock still held), False when mmap_lock was dropped:
    the caller takes it again and looks the VMA up afresh (it may have changed)."""
    ctx = vma.uffd_ctx
    if ctx is None or not ctx.features & UFFD_FEATURE_EVENT_REMOVE:
        return True
    mm = vma.mm
    ctx.mmap_changing += 1                                           # atomic_inc(&ctx->mmap_changing)
    await mmap_read_unlock(mm)
    k.stats["uffd_event_remove"] += 1
    await userfaultfd_event_wait_completion(k, ctx, UffdEventWaitQueue(ctx, UFFD_EVENT_REMOVE, start, end))
    return False


def userfaultfd_unmap_prep(k, vma, start: int, end: int, unmaps: list) -> int:
    """userfaultfd_unmap_prep() (6.6, under mmap_write_lock, per VMA of a range munmap,
    mmap(MAP_FIXED) or mremap (shrink, move, MREMAP_FIXED target) unmaps):
    with UFFD_FEATURE_EVENT_UNMAP, note (ctx, start, end) once per context and range and
    raise mmap_changing (UFFDIO_COPY & co. answer -EAGAIN from now until the handler has
    read the event). 0 (-ENOMEM for the allocation cannot happen here)."""
    ctx = vma.uffd_ctx
    if ctx is None or not ctx.features & UFFD_FEATURE_EVENT_UNMAP \
            or any(c is ctx and s == start and e == end for c, s, e in unmaps):   # has_unmap_ctx()
        return 0
    ctx.mmap_changing += 1
    unmaps.append((ctx, start, end))
    return 0


async def userfaultfd_unmap_complete(k, mm, unmaps: list) -> None:
    """userfaultfd_unmap_complete() (after mmap_write_unlock()): send UFFD_EVENT_UNMAP
    {start, end} for each noted range and wait for each to be read."""
    for ctx, start, end in unmaps:
        k.stats["uffd_event_unmap"] += 1
        await userfaultfd_event_wait_completion(k, ctx, UffdEventWaitQueue(ctx, UFFD_EVENT_UNMAP, start, end))
    unmaps.clear()


def uffd_msg_event(msg: UffdEventMsg, big_endian: bool) -> bytes:
    """The 32-byte struct uffd_msg of an event, in the guest's byte order: event (__u8),
    then at offset 8 the arg union: REMOVE / UNMAP arg.remove {__u64 start, end}; REMAP
    arg.remap {__u64 from, to, len}; FORK arg.fork {__u32 ufd} (msg_init() zeroed the
    rest, and resolve_userfault_fork() cleared reserved1, the context pointer)."""
    order = "big" if big_endian else "little"
    if msg.event == UFFD_EVENT_FORK:
        arg = msg.ufd.to_bytes(4, order) + bytes(20)
    elif msg.event == UFFD_EVENT_REMAP:
        arg = msg.start.to_bytes(8, order) + msg.end.to_bytes(8, order) + msg.length.to_bytes(8, order)
    else:
        arg = msg.start.to_bytes(8, order) + msg.end.to_bytes(8, order) + bytes(8)
    return bytes([msg.event]) + bytes(7) + arg


# -- UFFD_EVENT_FORK: dup_userfaultfd() / dup_userfaultfd_complete() (from dup_mmap) ------------

@dataclass(eq=False)
class UffdForkCtx:
    """struct userfaultfd_fork_ctx: the parent's context and the child's new one."""

    orig: UserfaultfdCtx
    new: UserfaultfdCtx


async def dup_userfaultfd(k, vma, fcs: list) -> int:
    """dup_userfaultfd() (fs/userfaultfd.c, 6.6; from dup_mmap() under both mmap write
    locks, for the child's copy ``vma``): without a context, or one without
    UFFD_FEATURE_EVENT_FORK, the copy loses the registration (vm_userfaultfd_ctx =
    NULL_VM_UFFD_CTX, userfaultfd_set_vm_flags(vma, vm_flags & ~__VM_UFFD_FLAGS)). With
    it, the child's VMAs of one parent context share one new context (UFFD_STATE_RUNNING,
    the parent's flags and features, ctx->mm the child's), noted in ``fcs`` once with
    the parent's mmap_changing raised: UFFDIO_COPY & co. on the parent's context are
    -EAGAIN until the handler has read the FORK event. 0 (-ENOMEM for the allocations
    cannot happen here)."""
    octx = vma.uffd_ctx
    if octx is None:
        return 0
    if not octx.features & UFFD_FEATURE_EVENT_FORK:
        vma.uffd_ctx = None
        vma.flags &= ~VM_UFFD_FLAGS
        await sched_point("vma_write", vma)
        return 0
    fctx = next((f for f in fcs if f.orig is octx), None)
    if fctx is None:
        new = UserfaultfdCtx(vma.mm, octx.features, k.next_id("uffd"), flags=octx.flags, api_done=True)
        new.file_flags = octx.file_flags
        octx.mmap_changing += 1                                      # atomic_inc(&octx->mmap_changing)
        fctx = UffdForkCtx(octx, new)
        fcs.append(fctx)
        k.stats["uffd_fork_ctx_created"] += 1
    vma.uffd_ctx = fctx.new
    await sched_point("vma_write", vma)
    return 0


async def dup_userfaultfd_complete(k, fcs: list) -> None:
    """dup_userfaultfd_complete() -> dup_fctx() (after dup_mmap() dropped both mmap
    locks): send UFFD_EVENT_FORK (the child's context in arg.reserved.reserved1) to each
    parent context and wait until the handler's read() turned it into an fd."""
    for fctx in fcs:
        k.stats["uffd_event_fork"] += 1
        await userfaultfd_event_wait_completion(
            k, fctx.orig, UffdEventWaitQueue(fctx.orig, UFFD_EVENT_FORK, 0, 0, new_ctx=fctx.new))
    fcs.clear()


def dup_userfaultfd_fail(k, fcs: list) -> None:
    """dup_userfaultfd_fail() (6.12, "fork: do not invoke uffd on fork if error occurs",
    Lorenzo Stoakes): a fork that failed sends no FORK event: the parents' mmap_changing
    drops back and the new contexts go (the child mm's teardown drops its VMAs)."""
    for fctx in fcs:
        fctx.orig.mmap_changing -= 1
        assert fctx.orig.mmap_changing >= 0
        fctx.new.released = True
    fcs.clear()


# -- UFFD_EVENT_REMAP: mremap_userfaultfd_prep() / mremap_userfaultfd_complete() ----------------

@dataclass(eq=False)
class VmUffdCtx:
    """struct vm_userfaultfd_ctx: mremap's ``uf``, the context to send REMAP to (or None)."""

    ctx: UserfaultfdCtx | None = None


async def mremap_userfaultfd_prep(k, vma, vm_ctx: VmUffdCtx) -> None:
    """mremap_userfaultfd_prep() (6.6; from move_vma() under mmap_write_lock, after the
    page tables moved, for the new VMA, which copy_vma() gave the old one's context and
    flags): with UFFD_FEATURE_EVENT_REMAP note the context and raise its mmap_changing
    (UFFDIO_COPY & co. are -EAGAIN from now until the handler read the event); without,
    drop the registration from the new VMA ("Drop uffd context if remap feature not
    enabled")."""
    ctx = vma.uffd_ctx
    if ctx is None:
        return
    if ctx.features & UFFD_FEATURE_EVENT_REMAP:
        vm_ctx.ctx = ctx
        ctx.mmap_changing += 1                                       # atomic_inc(&ctx->mmap_changing)
    else:
        vma.uffd_ctx = None
        vma.flags &= ~VM_UFFD_FLAGS                                  # userfaultfd_set_vm_flags()
        await sched_point("vma_write", vma)


async def mremap_userfaultfd_complete(k, vm_ctx: VmUffdCtx, start: int, to: int, length: int) -> None:
    """mremap_userfaultfd_complete() (6.6; after mmap_write_unlock()): send UFFD_EVENT_REMAP
    {from, to, len} and wait until the handler read it. ``to`` is mremap's return value:
    an error (not page-aligned) sends nothing (and, as in 6.6, leaves mmap_changing
    raised: prep only runs once the move has succeeded, so mremap cannot fail after it)."""
    ctx = vm_ctx.ctx
    if ctx is None:
        return
    vm_ctx.ctx = None
    if to % k.page_size:
        return                                                       # userfaultfd_ctx_put()
    k.stats["uffd_event_remap"] += 1
    await userfaultfd_event_wait_completion(
        k, ctx, UffdEventWaitQueue(ctx, UFFD_EVENT_REMAP, start, to, length))
