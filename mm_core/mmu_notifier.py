"""mmu_interval_notifier (mm/mmu_notifier.c, 6.6): the sequence-count protocol a
mirroring device (HMM, mm/hmm.c) uses to know that what it read from the CPU page tables
is still true.

    struct mmu_notifier_subscriptions   per mm: ``invalidate_seq`` (even: idle, odd: an
                                        invalidation is running), ``active_invalidate_ranges``
                                        and the interval tree (a list here)
    mmu_interval_notifier_insert()      a subscription to [start, start + length); its
                                        seq starts one below the mm's (not invalidating)
    mn_itree_inv_start_range()          from mmu_notifier_invalidate_range_start(): if some
                                        subscription overlaps, the mm's seq becomes odd and
                                        every overlapping subscription's
                                        ``ops.invalidate(sub, start, end, cur_seq)`` runs
                                        (the default sets the subscription's seq to cur_seq,
                                        mmu_interval_set_seq(); a driver also takes its
                                        update lock and drops its device mappings)
    mn_itree_inv_end()                  the last end makes an odd seq even again and wakes
                                        the mmu_interval_read_begin() waiters
    mmu_interval_read_begin()           the subscription's seq; while an invalidation of it
                                        is running (seq == the mm's odd seq) it sleeps
                                        (wait_event) until the invalidation ends
    mmu_interval_read_retry() /         the subscription's seq moved since read_begin:
    mmu_interval_check_retry()          what was read may be stale (RETRY)

The invalidation calls are made from the places that change or drop ptes of a range:
unmap_page_range() (zap, MMU_NOTIFY_CLEAR), retract_page_tables() (MMU_NOTIFY_CLEAR around
pmdp_collapse_flush), change_protection() (MMU_NOTIFY_PROTECTION_VMA, started at the
first populated pmd, as change_pmd_range() does), mremap's move_page_tables()
(MMU_NOTIFY_UNMAP over the old range), and every try_to_unmap_one() (file, anon to swap,
lazyfree discard, hwpoison: MMU_NOTIFY_CLEAR over the page). An mm without subscriptions pays
nothing (mm_has_notifiers() false). The deferred-insert list of an insert made while an
invalidation runs is not modelled: the new subscription is in the list at once with the
(odd) seq, so its read_begin waits for the end, as with the deferred add; it may also get
the running invalidation's callback, which only sets that same seq again.

Source: mm/mmu_notifier.c as of 6.6 (__mmu_interval_notifier_insert, mn_itree_inv_start_range,
mn_itree_inv_end, mmu_interval_read_begin; checked against the stored copies).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from emu.sched import traps
from mm_core.locks import SpinLock

MMU_NOTIFY_UNMAP = "unmap"
MMU_NOTIFY_CLEAR = "clear"
MMU_NOTIFY_PROTECTION_VMA = "protection_vma"


@dataclass
class MmuNotifierRange:
    """struct mmu_notifier_range."""

    mm: object
    start: int
    end: int
    event: str = MMU_NOTIFY_CLEAR
    started: bool = False                   # the mm had subscriptions at range_start


@dataclass(eq=False)
class MmuIntervalNotifier:
    """struct mmu_interval_notifier: [start, last] and its invalidate_seq. ``invalidate``
    is ``ops->invalidate`` (async (sub, range, cur_seq) -> bool); None: set the seq only."""

    mm: object
    start: int
    last: int
    invalidate_seq: int = 0
    invalidate: Callable[..., Awaitable[bool]] | None = None
    invalidations: int = 0                  # how often ops->invalidate ran (tests, stats)

    def overlaps(self, start: int, end: int) -> bool:
        return start <= self.last and end > self.start


class _SeqMoved:
    """wait_event(subscriptions->wq, READ_ONCE(subscriptions->invalidate_seq) != seq)."""

    def __init__(self, subs: MmuNotifierSubscriptions, seq: int) -> None:
        self.subs, self.seq = subs, seq

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        return self.subs.invalidate_seq != self.seq

    def post(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<waitq mmu_notifier seq {self.seq}>"


@dataclass(eq=False)
class MmuNotifierSubscriptions:
    """struct mmu_notifier_subscriptions (the interval-tree half)."""

    mm_id: int
    invalidate_seq: int = 2
    active_invalidate_ranges: int = 0
    itree: list[MmuIntervalNotifier] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = SpinLock(f"mm{self.mm_id}.notifier_subscriptions", "mmu_notifier_subscriptions")

    def is_invalidating(self) -> bool:
        return bool(self.invalidate_seq & 1)


def mm_notifier_subscriptions(mm) -> MmuNotifierSubscriptions:
    """__mmu_notifier_register()'s allocation of mm->notifier_subscriptions."""
    subs = getattr(mm, "notifier_subscriptions", None)
    if subs is None:
        subs = MmuNotifierSubscriptions(mm.id)
        mm.notifier_subscriptions = subs
    return subs


def mmu_interval_set_seq(sub: MmuIntervalNotifier, cur_seq: int) -> None:
    """mmu_interval_set_seq(): called by ops->invalidate under the driver's lock."""
    sub.invalidate_seq = cur_seq


async def mmu_interval_notifier_insert(k, mm, start: int, length: int,
                                       invalidate: Callable[..., Awaitable[bool]] | None = None
                                       ) -> MmuIntervalNotifier:
    """mmu_interval_notifier_insert(): subscribe to [start, start + length)."""
    subs = mm_notifier_subscriptions(mm)
    sub = MmuIntervalNotifier(mm, start, start + length - 1, invalidate=invalidate)
    async with subs.lock:
        if subs.active_invalidate_ranges:
            subs.invalidate_seq |= 1                    # read_begin waits for the end
            sub.invalidate_seq = subs.invalidate_seq
        else:
            sub.invalidate_seq = subs.invalidate_seq - 1    # odd, never the mm's idle seq
        subs.itree.append(sub)
    k.stats["mmu_interval_notifier_insert"] += 1
    return sub


async def mmu_interval_notifier_remove(k, sub: MmuIntervalNotifier) -> None:
    """mmu_interval_notifier_remove() (its wait for a running invalidation is not needed
    here: the callbacks run in the invalidating task, which holds no reference after)."""
    subs = mm_notifier_subscriptions(sub.mm)
    async with subs.lock:
        subs.itree.remove(sub)


async def mmu_interval_read_begin(k, sub: MmuIntervalNotifier) -> int:
    """mmu_interval_read_begin(): the seq to hand to read_retry; sleeps while an
    invalidation of this subscription is running."""
    subs = mm_notifier_subscriptions(sub.mm)
    async with subs.lock:
        seq = sub.invalidate_seq
        is_invalidating = seq == subs.invalidate_seq
    if is_invalidating:
        k.stats["mmu_interval_read_begin_wait"] += 1
        await traps.wait(_SeqMoved(subs, seq))
    return seq


def mmu_interval_read_retry(sub: MmuIntervalNotifier, seq: int) -> bool:
    """mmu_interval_read_retry(): true when an invalidation began since read_begin (the
    caller holds the lock its ops->invalidate takes)."""
    return sub.invalidate_seq != seq


def mmu_interval_check_retry(sub: MmuIntervalNotifier, seq: int) -> bool:
    """mmu_interval_check_retry(): the same test without the driver lock (a hint)."""
    return sub.invalidate_seq != seq


async def mmu_notifier_invalidate_range_start(k, mm, start: int, end: int,
                                              event: str = MMU_NOTIFY_CLEAR) -> MmuNotifierRange:
    """mmu_notifier_invalidate_range_start() -> mn_itree_invalidate(): blockable; may
    sleep (the drivers' ops->invalidate take a mutex), so no pte map may be held."""
    rng = MmuNotifierRange(mm, start, end, event)
    subs = getattr(mm, "notifier_subscriptions", None)
    if subs is None:                                    # !mm_has_notifiers()
        return rng
    k.stats["mmu_notifier_invalidate_range_start"] += 1
    async with subs.lock:                               # mn_itree_inv_start_range()
        subs.active_invalidate_ranges += 1
        rng.started = True
        hit = [s for s in subs.itree if s.overlaps(start, end)]
        if hit:                                         # odd only when some interval is hit
            subs.invalidate_seq |= 1
        cur_seq = subs.invalidate_seq
    for sub in hit:
        sub.invalidations += 1
        if sub.invalidate is not None:
            await sub.invalidate(sub, rng, cur_seq)
        else:
            mmu_interval_set_seq(sub, cur_seq)
    return rng


async def mmu_notifier_invalidate_range_end(k, rng: MmuNotifierRange) -> None:
    """mmu_notifier_invalidate_range_end() -> mn_itree_inv_end(): the last one makes the
    seq even and wakes the read_begin waiters."""
    if not rng.started:
        return
    subs = mm_notifier_subscriptions(rng.mm)
    async with subs.lock:
        subs.active_invalidate_ranges -= 1
        if not subs.active_invalidate_ranges and subs.is_invalidating():
            subs.invalidate_seq += 1                    # even again; the waiters see it
