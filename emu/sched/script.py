"""Hand-written schedules: run tasks in exactly the order a test or a report says.

A schedule is a space-separated list of steps:

    NAME:COUNT     run task NAME for COUNT traps
    NAME:*         run it until it finishes, blocks or sleeps
    NAME:KIND#N    run it until it has done its N-th action of KIND (a trap kind such as
                   ``lock``/``unlock``, or a scheduling point such as ``pt_read``,
                   ``pt_write``, ``rcu_read_lock``), stopping at its next trap; ``#N``
                   defaults to 1

A task is always parked at a trap, just before the action the trap names (the table read,
the lock acquisition); one step carries the action out and runs to the next trap. So
``walker:pt_read#1`` leaves the walker holding the value of its first table read, parked
before whatever it does next.

Example::

    retract:lock#3 walker:* retract:* rcu_gp:* walker:*

Names match a task's name exactly or its prefix before ``:``. A step naming a task
that cannot run is an error that says where the schedule went wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

from emu.sched.loop import Scheduler
from emu.sched.task import Task, TaskState


class ScheduleError(Exception):
    """The schedule cannot be followed (unknown task, task blocked or done)."""


@dataclass(frozen=True)
class Step:
    name: str
    count: int | None          # None = until it stops being runnable (or until ``kind``)
    kind: str | None = None    # run until the nth trap of this kind
    nth: int = 1

    def __str__(self) -> str:
        if self.kind is not None:
            return f"{self.name}:{self.kind}#{self.nth}"
        return f"{self.name}:{'*' if self.count is None else self.count}"

    def matches(self, event: tuple) -> bool:
        return event[0] == self.kind or (event[0] == "point" and event[1] == self.kind)


def parse_schedule(text: str) -> list[Step]:
    steps = []
    for word in text.split():
        name, sep, count = word.rpartition(":")
        if not sep or not name:
            raise ScheduleError(f"bad schedule step {word!r}: use NAME:COUNT or NAME:*")
        if count == "*":
            steps.append(Step(name, None))
        elif count.isdigit() and int(count) > 0:
            steps.append(Step(name, int(count)))
        elif count and not count[0].isdigit():
            kind, _, nth = count.partition("#")
            if nth and not (nth.isdigit() and int(nth) > 0):
                raise ScheduleError(f"bad occurrence in {word!r}: KIND#N with N >= 1")
            steps.append(Step(name, None, kind, int(nth or 1)))
        else:
            raise ScheduleError(f"bad count in {word!r}: a positive number, * or a trap kind")
    return steps


def find_task(sched: Scheduler, name: str) -> Task:
    for t in sched.tasks:
        if t.name == name or t.name.split(":")[0] == name:
            return t
    raise ScheduleError(f"no task named {name!r} (tasks: {', '.join(t.name for t in sched.tasks)})")


def run_script(sched: Scheduler, schedule: str | list[Step]) -> None:
    """Follow ``schedule`` step by step; tasks left over are not run."""
    steps = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    for i, step in enumerate(steps):
        task = find_task(sched, step.name)
        done = seen = 0
        while step.count is None or done < step.count:
            sched._poll_waiters()
            sched._wake_sleepers()
            if task.state is not TaskState.RUNNABLE:
                if step.count is None and step.kind is None:
                    if not done and task.state is TaskState.SLEEPING and sched._advance_time():
                        continue
                    break
                where = " ".join(str(s) for s in steps[:i]) or "(start)"
                raise ScheduleError(f"step {i + 1} ({step}): {task.name} is {task.state.value}"
                                    f"{' on ' + repr(task.blocked_on[0]) if task.blocked_on else ''}"
                                    f" after {done} trap(s); schedule so far: {where}")
            sched.current = task
            action = task.pending
            sched.step(task)
            done += 1
            if step.kind is not None and action is not None and step.matches(action):
                seen += 1
                if seen == step.nth:
                    break
