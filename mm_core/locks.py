"""Kernel locks as scheduler resources: spinlocks (ptl, pml, page_table_lock) and the
mmap_lock rw-semaphore.

Acquisition always goes through a trap, so a contended lock is a scheduling point and
lock hand-offs are visible to strategies and to the cycle model.
"""
from __future__ import annotations

from emu.sched import footprint, traps


class SpinLock:
    """spinlock_t: one holder at a time. ``cls`` is the lockdep class (ptl, pml, ...)."""

    sleeps = False

    def __init__(self, name: str, cls: str = "") -> None:
        self.name = name
        self.cls = cls or name
        self.holder: object = None

    def try_acquire(self, task: object, mode: str = "x") -> bool:
        if self.holder is None:
            self.holder = task
            return True
        return False

    def release(self, task: object, mode: str = "x") -> None:
        if self.holder is not task:
            raise RuntimeError(f"{self.name}: released by {task!r} but held by {self.holder!r}")
        self.holder = None

    @property
    def locked(self) -> bool:
        return self.holder is not None

    def __repr__(self) -> str:
        return f"<{self.name}>"

    async def __aenter__(self) -> SpinLock:
        await traps.lock(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await traps.unlock(self)


class RwSemaphore:
    """rw_semaphore (mmap_lock): many readers ("r") or one writer ("w"). It sleeps."""

    sleeps = True

    def __init__(self, name: str, cls: str = "") -> None:
        self.name = name
        self.cls = cls or name
        self.readers: list[object] = []
        self.writer: object = None

    def try_acquire(self, task: object, mode: str = "r") -> bool:
        if mode == "w":
            if self.writer is None and not self.readers:
                self.writer = task
                return True
            return False
        if self.writer is None:
            self.readers.append(task)
            return True
        return False

    def release(self, task: object, mode: str = "r") -> None:
        if mode == "w":
            if self.writer is not task:
                raise RuntimeError(f"{self.name}: write-unlocked by a non-owner")
            self.writer = None
        else:
            self.readers.remove(task)

    def __repr__(self) -> str:
        return f"<{self.name}>"


async def mmap_read_lock(mm) -> None:
    await traps.lock(mm.mmap_lock, "r")


async def mmap_read_unlock(mm) -> None:
    await traps.unlock(mm.mmap_lock, "r")


async def mmap_write_lock(mm) -> None:
    await traps.lock(mm.mmap_lock, "w")


async def mmap_write_unlock(mm) -> None:
    await traps.unlock(mm.mmap_lock, "w")


class WaitQueue:
    """wait_queue_head_t for one waiter kind: ``wake`` posts an event, a waiter consumes
    it (the rcu_gp daemon waiting for callbacks, khugepaged waiting for work)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events = 0

    def post(self) -> None:
        if footprint.ACTIVE is not None:        # a DPOR run records (the scheduler polls these)
            footprint.touch(footprint.lock_key(self))
        self.events += 1

    def try_acquire(self, task: object, mode: str = "w") -> bool:
        if footprint.ACTIVE is not None:
            footprint.touch(footprint.lock_key(self))
        if self.events:
            self.events = 0
            return True
        return False

    def __repr__(self) -> str:
        return f"<waitq {self.name}>"


class Completion:
    """struct completion: waiters pass once ``complete()`` has been called."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.done = False

    def complete(self) -> None:
        if footprint.ACTIVE is not None:
            footprint.touch(footprint.lock_key(self))
        self.done = True

    def post(self) -> None:
        self.complete()

    def try_acquire(self, task: object, mode: str = "w") -> bool:
        if footprint.ACTIVE is not None:
            footprint.touch(footprint.lock_key(self), False)
        return self.done

    def __repr__(self) -> str:
        return f"<completion {self.name}>"
