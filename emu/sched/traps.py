"""Traps: the only place in emu that yields to the scheduler.

Kernel code (mm_core) and guest-thread tasks are ``async def`` coroutines. Every racy
action awaits one of the functions below; each yields one event tuple
``(kind, *args)`` to the scheduler loop and returns what the loop sends back. Code
between two awaits runs atomically, so every preemption point is visible as an
``await`` in the source (the curio model).

Event kinds:
    ("point", what, resource, cost)    a scheduling point: table read/write, retry, ...
    ("lock", lock, mode)               acquire; the task blocks until it is granted
    ("trylock", lock, mode)            acquire if free; returns bool
    ("unlock", lock, mode)             release; wakes waiters
    ("user", vcpu, quantum)            run guest code on a vCPU; returns a UserStop
    ("sleep", cycles)                  let simulated time pass (daemons)
    ("wait", waitq)                    block until the wait queue has an event for us
    ("wake", waitq)                    post an event to a wait queue and wake its waiters
    ("self",)                          returns the current task (per-task kernel state: RCU)
    ("choose", n, label)               a data choice 0..n-1 made by the strategy, recorded
"""
from __future__ import annotations

import types
from typing import Any


@types.coroutine
def _trap(*event: Any) -> Any:
    return (yield event)


async def sched_point(what: str, resource: object = None, cost: int = 0) -> None:
    """A plain preemption point (e.g. a page-table entry read or write)."""
    await _trap("point", what, resource, cost)


async def lock(lock: object, mode: str = "x") -> None:
    await _trap("lock", lock, mode)


async def trylock(lock: object, mode: str = "x") -> bool:
    return await _trap("trylock", lock, mode)


async def unlock(lock: object, mode: str = "x") -> None:
    await _trap("unlock", lock, mode)


async def run_user(vcpu: object, quantum: int) -> Any:
    """Run guest user code on ``vcpu`` for at most ``quantum`` instructions."""
    return await _trap("user", vcpu, quantum)


async def sleep(cycles: int) -> None:
    await _trap("sleep", cycles)


async def wait(waitq: object) -> None:
    """wait_event(): block until ``waitq.try_acquire(task)`` succeeds."""
    await _trap("wait", waitq, "wait")


async def wake(waitq: object) -> None:
    """wake_up(): post an event and let the waiters retry."""
    await _trap("wake", waitq)


async def forward(event: tuple) -> Any:
    """Pass an event from a wrapped coroutine on to the scheduler (tracing wrappers)."""
    return await _trap(*event)


async def choose(n: int, label: str) -> int:
    """A nondeterministic data choice among ``n`` options (0 is the ordinary one): the
    strategy decides, and the schedule records it."""
    return await _trap("choose", n, label)


async def current_task() -> object:
    """``current``: the task running this coroutine."""
    return await _trap("self")
