"""RCU (kernel/rcu/tree.c, reduced to what page-table freeing needs).

Read-side critical sections are per task (``rcu_read_lock`` nests); a grace period
started at time T ends once every task that was inside a read-side section at T has
left it at least once. Grace periods are driven by the ``rcu_gp`` daemon task
(``rcu_gp_kthread``); ``call_rcu`` callbacks queued before a grace period started run
when it ends. ``synchronize_rcu`` waits for one; ``rcu_barrier`` for every queued
callback.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from emu.sched import footprint, traps
from mm_core.locks import Completion, WaitQueue

GP_POLL_CYCLES = 1000        # how often the gp kthread re-checks readers (simulated cycles)


class RcuError(Exception):
    """RCU discipline broken: unlock without lock, ..."""


@dataclass
class Rcu:
    started: int = 0                       # grace periods started
    completed: int = 0                     # grace periods completed
    callbacks: list[tuple[int, Callable[[], None], str]] = field(default_factory=list)
    readers: dict[object, int] = field(default_factory=dict)      # task -> nesting depth
    quiescent: dict[object, int] = field(default_factory=dict)    # task -> times it left a section
    invoked: int = 0

    def __post_init__(self) -> None:
        self.wq = WaitQueue("rcu_gp")

    def nesting(self, task: object) -> int:
        return self.readers.get(task, 0)

    def pending(self) -> int:
        return len(self.callbacks)

    def _invoke_upto(self, gp: int) -> None:
        ready = [cb for cb in self.callbacks if cb[0] < gp]
        self.callbacks = [cb for cb in self.callbacks if cb[0] >= gp]
        for _, fn, _label in ready:
            self.invoked += 1
            fn()

    def barrier_now(self) -> None:
        """rcu_barrier() with no reader left anywhere: end a grace period at once.
        Used outside a run (API calls, the end of a run)."""
        if any(self.readers.values()):
            holders = ", ".join(repr(t) for t, n in self.readers.items() if n)
            raise RcuError(f"rcu_barrier with readers still inside rcu_read_lock: {holders}")
        while self.callbacks:
            self.started += 1
            self.completed = self.started
            self._invoke_upto(self.completed)


async def rcu_read_lock(k) -> None:
    """rcu_read_lock(): enter (or nest) a read-side critical section."""
    task = await traps.current_task()
    rcu = k.rcu
    footprint.touch(footprint.RCU, False)      # readers commute; a grace period does not
    rcu.readers[task] = rcu.readers.get(task, 0) + 1
    await traps.sched_point("rcu_read_lock", task)


async def rcu_read_unlock(k) -> None:
    """rcu_read_unlock(): leaving the outermost section is a quiescent state."""
    task = await traps.current_task()
    rcu = k.rcu
    footprint.touch(footprint.RCU, False)
    depth = rcu.readers.get(task, 0)
    if depth <= 0:
        raise RcuError(f"rcu_read_unlock() without rcu_read_lock() in {task!r}")
    if depth == 1:
        del rcu.readers[task]
        rcu.quiescent[task] = rcu.quiescent.get(task, 0) + 1
    else:
        rcu.readers[task] = depth - 1
    await traps.sched_point("rcu_read_unlock", task)


def call_rcu(k, fn: Callable[[], None], what: str = "") -> None:
    """call_rcu(): run ``fn`` after a grace period that starts after now. Never sleeps;
    the rcu_gp kthread notices the queued callback at its next scheduling point."""
    footprint.touch(footprint.RCU)
    k.rcu.callbacks.append((k.rcu.started, fn, what))
    k.rcu.wq.post()
    k.stats["call_rcu"] += 1


async def synchronize_rcu(k) -> None:
    done = Completion("synchronize_rcu")
    call_rcu(k, done.complete, "synchronize_rcu")
    await traps.wait(done)


async def rcu_barrier(k) -> None:
    """rcu_barrier(): wait until every callback queued so far has run."""
    done = Completion("rcu_barrier")
    call_rcu(k, done.complete, "rcu_barrier")
    await traps.wait(done)


async def rcu_gp_kthread(k) -> None:
    """The grace-period kthread: start a grace period when callbacks wait, poll until
    every reader of the snapshot has passed a quiescent state, run the callbacks."""
    rcu = k.rcu
    while True:
        footprint.touch(footprint.RCU)
        if not rcu.callbacks:
            await traps.wait(rcu.wq)
            continue
        rcu.started += 1
        gp = rcu.started
        snapshot = {t: rcu.quiescent.get(t, 0) for t, n in rcu.readers.items() if n}
        while any(rcu.readers.get(t, 0) and rcu.quiescent.get(t, 0) == q for t, q in snapshot.items()):
            await traps.sleep(GP_POLL_CYCLES)
            footprint.touch(footprint.RCU)
        rcu.completed = gp
        k.stats["rcu_grace_periods"] += 1
        rcu._invoke_upto(gp)
        await traps.sched_point("rcu_gp_end", gp)
