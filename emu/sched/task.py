"""Tasks: a coroutine plus the state the scheduler keeps for it."""
from __future__ import annotations

import enum
from collections.abc import Coroutine
from typing import Any


class TaskState(enum.Enum):
    RUNNABLE = "runnable"
    BLOCKED = "blocked"
    SLEEPING = "sleeping"          # until the simulated clock reaches wake_at
    DONE = "done"


class Task:
    """One schedulable activity: a guest thread, a kernel daemon, a scenario step."""

    def __init__(self, tid: int, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        self.tid = tid
        self.name = name
        self.coro = coro
        self.state = TaskState.RUNNABLE
        self.send_value: Any = None
        self.throw: BaseException | None = None
        self.blocked_on: tuple[object, str] | None = None
        self.clock = 0             # simulated cycles consumed
        self.wake_at = 0
        self.last_event: tuple | None = None
        self.pending: tuple | None = None     # the trap it is parked at, not yet carried out
        self.steps = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.held: list[object] = []   # locks held, in acquisition order
        self.daemon = False            # kernel threads: the run ends without them
        self.kstate: dict[str, object] = {}   # per-task kernel state (RCU nesting, ...)

    def __repr__(self) -> str:
        return f"<task {self.tid} {self.name} {self.state.value}>"
