"""Traps: the only place in emu that yields to the scheduler.

Kernel code (mm_core) and guest-thread tasks are ``async def`` coroutines. Every racy
action awaits one of the functions below; each yields one event tuple
``(kind, *args)`` to the scheduler loop and returns what the loop sends back. Code
between two awaits runs atomically, so every preemption point is visible as an
``await`` in the source (the curio model). The traps are generator-based coroutines
(``types.coroutine``): the event goes straight from the awaited trap to the scheduler,
with no coroutine frame of its own in between (they are on every step's path).

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
from collections.abc import Generator
from typing import Any

Trap = Generator[tuple, Any, Any]


@types.coroutine
def sched_point(what: str, resource: object = None, cost: int = 0) -> Trap:
    """A plain preemption point (e.g. a page-table entry read or write)."""
    yield ("point", what, resource, cost)


@types.coroutine
def lock(lock: object, mode: str = "x") -> Trap:
    yield ("lock", lock, mode)


@types.coroutine
def trylock(lock: object, mode: str = "x") -> Trap:
    return (yield ("trylock", lock, mode))


@types.coroutine
def unlock(lock: object, mode: str = "x") -> Trap:
    yield ("unlock", lock, mode)


@types.coroutine
def run_user(vcpu: object, quantum: int) -> Trap:
    """Run guest user code on ``vcpu`` for at most ``quantum`` instructions."""
    return (yield ("user", vcpu, quantum))


@types.coroutine
def sleep(cycles: int) -> Trap:
    yield ("sleep", cycles)


@types.coroutine
def wait(waitq: object) -> Trap:
    """wait_event(): block until ``waitq.try_acquire(task)`` succeeds."""
    yield ("wait", waitq, "wait")


@types.coroutine
def wake(waitq: object) -> Trap:
    """wake_up(): post an event and let the waiters retry."""
    yield ("wake", waitq)


@types.coroutine
def forward(event: tuple) -> Trap:
    """Pass an event from a wrapped coroutine on to the scheduler (tracing wrappers)."""
    return (yield event)


@types.coroutine
def choose(n: int, label: str) -> Trap:
    """A nondeterministic data choice among ``n`` options (0 is the ordinary one): the
    strategy decides, and the schedule records it."""
    return (yield ("choose", n, label))


@types.coroutine
def current_task() -> Trap:
    """``current``: the task running this coroutine."""
    return (yield ("self",))
