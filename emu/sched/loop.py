"""The deterministic run loop: receive a trap from the current task, act on it, pick who
runs next.

Policies (who runs next among the runnable tasks):
  round-robin  rotate through the tasks in spawn order, one trap each
  timed        the task with the smallest simulated cycle clock (performance runs)
Everything is a pure function of the tasks and the policy: no threads, no wall clock.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Coroutine
from typing import Any

from emu.sched.strategy import Strategy, make_strategy
from emu.sched.task import Task, TaskState

POLICIES = ("round-robin", "timed")
RUNNABLE, BLOCKED, SLEEPING, DONE = (TaskState.RUNNABLE, TaskState.BLOCKED, TaskState.SLEEPING,
                                     TaskState.DONE)
FAIR_QUANTA = 8              # user quanta in a row before another runnable thread must run


class Deadlock(Exception):
    """Every live task is blocked."""


class Livelock(Exception):
    """The run does not end: some retry loop never makes progress."""


class Scheduler:
    def __init__(self, policy: str | Strategy = "round-robin",
                 run_user: Callable[[Any, int], Any] | None = None) -> None:
        if isinstance(policy, str) and policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.strategy = make_strategy(policy) if isinstance(policy, str) else policy
        self.policy = self.strategy.name
        self.picks: list[int] = []          # the tid run at every step: the schedule
        self.data_log: list[tuple[int, str, int]] = []   # (step, label, value) of data choices
        self.observers: list[Callable[[Task, tuple], None]] = []    # sanitizers, digests
        self.on_task_end: list[Callable[[Task], None]] = []
        self.on_task_end: list[Callable[[Task], None]] = []
        self.tasks: list[Task] = []
        self.run_user = run_user
        self.current: Task | None = None
        self._rr = 0
        self.switches = 0
        self.preemptions = 0        # switches away from a task that could have gone on
        self._user_streak = 0
        self._streak_task: Task | None = None
        self._last_ran: dict[int, int] = {}
        self.traps = 0
        self._time_floor = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, daemon: bool = False) -> Task:
        task = Task(len(self.tasks) + 1, name, coro)
        task.daemon = daemon
        self.tasks.append(task)
        return task

    # -- picking ---------------------------------------------------------------------------
    def _runnable(self) -> list[Task]:
        return [t for t in self.tasks if t.state is TaskState.RUNNABLE]

    def _pick(self, runnable: list[Task]) -> Task:
        task = self.strategy.pick(runnable, self.current, len(self.picks))
        if self.strategy.fair and task.pending is not None and task.pending[0] == "user" \
                and len(runnable) > 1:
            task = self._fair(task, runnable)
        self._last_ran[task.tid] = len(self.picks)
        return task

    def _fair(self, task: Task, runnable: list[Task]) -> Task:
        """Fairness for guest code: a thread that keeps running user quanta while others
        could run (a busy-wait on a flag another thread must set) is preempted after
        FAIR_QUANTA of them, in favour of the runnable task that ran least recently.
        Strategies stay adversarial inside that bound (CHESS's fair scheduling)."""
        self._user_streak = self._user_streak + 1 if task is self._streak_task else 1
        self._streak_task = task
        if self._user_streak > FAIR_QUANTA:
            others = [t for t in runnable if t is not task]
            task = min(others, key=lambda t: (self._last_ran.get(t.tid, -1), t.tid))
            self._user_streak, self._streak_task = 0, task
        return task

    # -- the loop --------------------------------------------------------------------------
    def run(self, stop: Callable[[], bool] | None = None, max_steps: int | None = None) -> None:
        """Run until every task is done (or ``stop()`` says so). More than ``max_steps``
        steps is a livelock."""
        while True:
            if stop is not None and stop():
                return
            if max_steps is not None and len(self.picks) > max_steps:
                raise Livelock(f"no end after {max_steps} steps: " + ", ".join(
                    f"{t.name} ({t.steps} traps)" for t in self.tasks if t.state is not TaskState.DONE))
            # one pass over the tasks: the runnable ones, is a non-daemon left, does anyone
            # sleep or wait on a wait queue (the polls below are no-ops otherwise, and this
            # loop is hot)
            live = sleeping = False
            runnable, waiting = [], []
            for t in self.tasks:
                state = t.state
                if state is RUNNABLE:
                    runnable.append(t)
                elif state is DONE:
                    continue
                elif state is SLEEPING:
                    sleeping = True
                elif state is BLOCKED and t.blocked_on and t.blocked_on[1] == "wait":
                    waiting.append(t)
                if not t.daemon:
                    live = True
            # wait queues posted to without a wake trap (call_rcu never sleeps)
            woken = False
            for t in waiting:
                if t.blocked_on[0].try_acquire(t, "wait"):
                    t.state, t.blocked_on = RUNNABLE, None
                    woken = True
            if not live:
                # only kernel threads are left: let them finish what they started, so
                # no lock, folio lock or RCU section is left half-way
                if woken:
                    runnable = self._runnable()
                if not runnable:
                    return
                self.current = runnable[0]
                self.step(runnable[0])
                continue
            if sleeping and self._wake_sleepers():
                woken = True
            if woken:
                runnable = self._runnable()
            if not runnable and self._advance_time():
                continue
            if not runnable:
                blocked = [t for t in self.tasks if t.state is TaskState.BLOCKED]
                if blocked:
                    raise Deadlock("deadlock: " + ", ".join(
                        f"{t.name} waits for {t.blocked_on[0]!r}" for t in blocked if t.blocked_on))
                return
            # _pick(), inline
            current, strategy, n = self.current, self.strategy, len(self.picks)
            task = strategy.pick(runnable, current, n)
            if strategy.fair and task.pending is not None and task.pending[0] == "user" \
                    and len(runnable) > 1:
                task = self._fair(task, runnable)
            self._last_ran[task.tid] = n
            if task is not current:
                self.switches += 1
                if current is not None and current in runnable:
                    self.preemptions += 1
            self.current = task
            self.step(task)

    def step(self, task: Task) -> None:
        """One step of ``task``: carry out the trap it is parked at (the table access, the
        lock acquisition, the guest quantum, ...), then resume it until its next trap,
        where it parks again. A task that blocks on a lock stays parked."""
        self.picks.append(task.tid)
        if task.pending is not None:
            event, task.pending = task.pending, None
            for observe in self.observers:
                observe(task, event)
            if event[0] == "point":          # handle()'s commonest case, inline
                task.clock += event[3]
            else:
                self.handle(task, event)
                if task.state is not RUNNABLE:
                    return
        value, task.send_value = task.send_value, None
        try:
            if task.throw is not None:
                exc, task.throw = task.throw, None
                event = task.coro.throw(exc)
            else:
                event = task.coro.send(value)
        except StopIteration as done:
            task.state, task.result = TaskState.DONE, done.value
            for hook in self.on_task_end:
                hook(task)
            return
        except BaseException as err:  # a bug or a sanitizer report inside the task
            task.state, task.error = TaskState.DONE, err
            raise
        task.steps += 1
        self.traps += 1
        task.pending = task.last_event = event

    def handle(self, task: Task, event: tuple) -> None:
        kind = event[0]
        if kind == "point":
            task.clock += event[3]
        elif kind == "user":
            stop = self.run_user(event[1], event[2])
            task.clock += stop.cycles
            task.send_value = stop
        elif kind == "lock":
            lock, mode = event[1], event[2]
            if lock.try_acquire(task, mode):
                task.held.append(lock)
            else:
                task.state, task.blocked_on = TaskState.BLOCKED, (lock, mode)
        elif kind == "trylock":
            # a read trylock of an rw_semaphore also fails when a writer is queued somewhere:
            # the strategy decides (a recorded data choice)
            spurious = getattr(event[1], "sleeps", False) and event[2] == "r" \
                and self.choose(2, f"trylock:{getattr(event[1], 'cls', '?')}") == 1
            ok = not spurious and event[1].try_acquire(task, event[2])
            if ok:
                task.held.append(event[1])
            task.send_value = ok
        elif kind == "unlock":
            lock = event[1]
            lock.release(task, event[2])
            task.held.remove(lock)
            self._wake(lock)
        elif kind == "sleep":
            task.wake_at = self.now + event[1]
            task.state = TaskState.SLEEPING
        elif kind == "wait":
            if not event[1].try_acquire(task, "wait"):
                task.state, task.blocked_on = TaskState.BLOCKED, (event[1], "wait")
        elif kind == "wake":
            event[1].post()
            self._wake(event[1])
        elif kind == "self":
            task.send_value = task
        elif kind == "choose":
            task.send_value = self.choose(event[1], event[2])
        else:
            raise RuntimeError(f"unknown trap {event!r}")

    @property
    def now(self) -> int:
        """Simulated time: how far the busiest non-daemon task has got (cycles)."""
        return max([t.clock for t in self.tasks if not t.daemon] + [self._time_floor])

    def _wake_sleepers(self) -> bool:
        """Sleepers whose time has come become runnable; True if any did."""
        now = self.now
        woken = False
        for t in self.tasks:
            if t.state is TaskState.SLEEPING and t.wake_at <= now:
                t.state = TaskState.RUNNABLE
                t.clock = max(t.clock, t.wake_at)
                woken = True
        return woken

    def _advance_time(self) -> bool:
        """Nothing can run: jump the clock to the first sleeper's wake-up (if any)."""
        sleepers = [t.wake_at for t in self.tasks if t.state is TaskState.SLEEPING]
        if not sleepers:
            return False
        self._time_floor = max(self._time_floor, min(sleepers))
        self._wake_sleepers()
        return True

    def choose(self, n: int, label: str) -> int:
        """A nondeterministic data choice (0 = the ordinary case), recorded for replay."""
        if n <= 1:
            return 0
        value = self.strategy.data(n, label)
        self.data_log.append((len(self.picks), label, value))
        return value

    def _poll_waiters(self) -> bool:
        """Wait queues posted to without a wake trap (call_rcu never sleeps); True if a
        waiter became runnable. (run() does the same for the waiters its scan found.)"""
        woken = False
        for t in self.tasks:
            if t.state is TaskState.BLOCKED and t.blocked_on and t.blocked_on[1] == "wait":
                if t.blocked_on[0].try_acquire(t, "wait"):
                    t.state, t.blocked_on = TaskState.RUNNABLE, None
                    woken = True
        return woken

    def _wake(self, lock: object) -> None:
        """Waiters retry in tid order; the first whose acquire succeeds gets the lock."""
        for t in self.tasks:
            if t.state is TaskState.BLOCKED and t.blocked_on and t.blocked_on[0] is lock:
                mode = t.blocked_on[1]
                if lock.try_acquire(t, mode):
                    if mode != "wait":
                        t.held.append(lock)
                    t.state, t.blocked_on = TaskState.RUNNABLE, None


class SyncTask:
    """The stand-in ``current`` for kernel code driven outside a run."""

    name = "api"
    tid = 0
    daemon = False

    def __init__(self) -> None:
        self.kstate: dict[str, object] = {}
        self.held: list[object] = []

    def __repr__(self) -> str:
        return "<api caller>"


def close_coroutine(coro: Coroutine[Any, Any, Any]) -> None:
    """Abandon a task that will never run again (a run stopped by a finding). Each await
    in a ``finally:`` (an unlock) stops one close(); keep closing until it is done."""
    if getattr(coro, "cr_frame", getattr(coro, "gi_frame", False)) is None:
        return                  # finished or closed already: nothing to do
    with warnings.catch_warnings():      # closing one that never started is fine here
        warnings.simplefilter("ignore", RuntimeWarning)
        _close(coro)


def close_coroutines(coros: list[Coroutine[Any, Any, Any]]) -> None:
    """close_coroutine() of each (one warnings context for all: it costs more than a close)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for coro in coros:
            _close(coro)


def _close(coro: Coroutine[Any, Any, Any]) -> None:
    for _ in range(64):
        try:
            coro.close()
            return
        except RuntimeError:
            continue


API_TASK = SyncTask()     # every API call is one caller: locks and RCU sections carry over
_sync_depth = 0           # > 0 while run_sync() drives kernel code


def in_sync() -> bool:
    """True while kernel code runs through run_sync(): ``current`` is then API_TASK."""
    return _sync_depth > 0


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a kernel coroutine to completion outside any run (API calls, loading).

    Only uncontended traps are allowed: with no other task alive, a lock that is taken
    is a bug, and guest code cannot run here.
    """
    global _sync_depth
    _sync_depth += 1
    try:
        return _drive(coro)
    finally:
        _sync_depth -= 1


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    value: Any = None
    task = API_TASK
    while True:
        try:
            event = coro.send(value)
        except StopIteration as done:
            return done.value
        value = None
        kind = event[0]
        if kind in ("point", "sleep", "wake"):
            if kind == "wake":
                event[1].post()
            continue
        if kind == "choose":
            value = 0
            continue
        if kind == "self":
            value = task
            continue
        if kind in ("lock", "trylock", "wait"):
            ok = event[1].try_acquire(task, event[2])
            if not ok and kind != "trylock":
                coro.close()
                raise Deadlock(f"{event[1]!r} is not available; cannot wait outside a run")
            value = ok if kind == "trylock" else None
            if ok and kind != "wait":
                task.held.append(event[1])
        elif kind == "unlock":
            event[1].release(task, event[2])
            task.held.remove(event[1])
        else:
            coro.close()
            raise RuntimeError(f"trap {kind!r} cannot be served outside a run")
