"""Scheduling strategies: who runs next among the runnable tasks.

Every strategy is deterministic given its seed: all randomness comes from one
``random.Random`` it owns. The scheduler records every pick, so any run (whatever the
strategy) can be replayed with ``Replay``.

  round-robin   one trap each, in spawn order
  timed         the task with the smallest simulated cycle clock (performance runs)
  random        uniform over runnable tasks, keeping the current one with probability
                ``stickiness`` (Coyote's probabilistic strategy)
  pct           PCT(d): random task priorities, d-1 priority change points
  replay        follow a recorded pick sequence; report the first divergence
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from emu.sched.task import Task


class Divergence(Exception):
    """A replayed schedule asks for a task that cannot run at that step."""


class Strategy:
    name = "strategy"
    fair = True          # the scheduler may override a pick to end a busy-wait (see loop.py)

    def pick(self, runnable: Sequence[Task], current: Task | None, step: int) -> Task:
        raise NotImplementedError

    def data(self, n: int, label: str) -> int:
        """A nondeterministic data choice (0..n-1); 0 is the default."""
        return 0

    def describe(self) -> str:
        return self.name

    def attach(self, sc: object) -> None:
        """Called with the scenario before its run (DPOR instruments the world here)."""


class RoundRobin(Strategy):
    name = "round-robin"

    def __init__(self) -> None:
        self._last = 0

    def pick(self, runnable, current, step):
        later = [t for t in runnable if t.tid > self._last]
        task = later[0] if later else runnable[0]
        self._last = task.tid
        return task


class Timed(Strategy):
    name = "timed"

    def pick(self, runnable, current, step):
        return min(runnable, key=lambda t: (t.clock, t.tid))


class RandomWalk(Strategy):
    name = "random"

    def __init__(self, seed: int = 0, stickiness: float = 0.5) -> None:
        self.rng = random.Random(seed)
        self.stickiness = stickiness

    def pick(self, runnable, current, step):
        if current in runnable and self.rng.random() < self.stickiness:
            return current
        return runnable[self.rng.randrange(len(runnable))]

    def data(self, n, label):
        return self.rng.randrange(n)

    def describe(self) -> str:
        return f"random(stickiness={self.stickiness})"


class PCT(Strategy):
    """Probabilistic concurrency testing (Burckhardt et al.): each task gets a random
    priority; the highest-priority runnable task runs; at d-1 random steps the running
    task drops below everyone. Finds any bug of depth d with probability >= 1/(n k^(d-1))."""

    name = "pct"

    def __init__(self, seed: int = 0, depth: int = 2, expected_steps: int = 200) -> None:
        self.rng = random.Random(seed)
        self.depth = depth
        self.k = max(1, expected_steps)
        self.change_points = sorted(self.rng.sample(range(1, self.k + 1), min(depth - 1, self.k)))
        self.prio: dict[int, float] = {}
        self.steps = 0

    def _priority(self, task: Task) -> float:
        if task.tid not in self.prio:
            self.prio[task.tid] = self.depth + self.rng.random()     # above every change point
        return self.prio[task.tid]

    def pick(self, runnable, current, step):
        prio = self.prio
        if len(runnable) > 1:
            self.steps += 1
            for t in runnable:                  # new tasks get theirs in runnable order
                if t.tid not in prio:
                    self._priority(t)
            # the highest priority; on a tie the lowest tid (runnable is in tid order)
            best = runnable[0]
            top = prio[best.tid]
            for t in runnable:
                if prio[t.tid] > top:
                    best, top = t, prio[t.tid]
        else:
            best = runnable[0]
            self._priority(best)
        if self.change_points and self.steps == self.change_points[0]:
            self.change_points.pop(0)
            prio[best.tid] = len(self.change_points) + self.rng.random() * 0.5
            best = max(runnable, key=lambda t: (self._priority(t), -t.tid))
        return best

    def data(self, n, label):
        return self.rng.randrange(n)

    def describe(self) -> str:
        return f"pct(d={self.depth})"


class Replay(Strategy):
    """Follow recorded picks (task indices, one per step). ``lenient``: when a pick is
    impossible or the record runs out, keep the current task (else the lowest tid), as
    the shrinker needs; otherwise raise Divergence."""

    name = "replay"
    fair = False         # the recorded picks already include every fairness override

    def __init__(self, picks: Sequence[int], lenient: bool = False, data: Sequence[int] = ()) -> None:
        self.picks = list(picks)
        self.lenient = lenient
        self.diverged_at: int | None = None
        self.data_values = list(data)
        self._data_i = 0

    def data(self, n, label):
        """The recorded data choices, in order (0 once they run out, as lenient replay
        needs)."""
        if self._data_i < len(self.data_values):
            value = self.data_values[self._data_i]
            self._data_i += 1
            if value < n:
                return value
            if not self.lenient:
                raise Divergence(f"data choice {self._data_i} ({label}) recorded as {value}, "
                                 f"but only {n} options exist now")
        return 0

    def pick(self, runnable, current, step):
        if step < len(self.picks):
            want = self.picks[step]
            for t in runnable:
                if t.tid == want:
                    return t
            if not self.lenient:
                names = ", ".join(t.name for t in runnable)
                raise Divergence(f"schedule diverged at step {step}: task #{want} cannot run "
                                 f"(runnable: {names})")
            if self.diverged_at is None:
                self.diverged_at = step
        elif not self.lenient and self.picks:
            raise Divergence(f"schedule ended at step {step} but tasks are still runnable")
        return current if current in runnable else runnable[0]


def make_strategy(name: str, seed: int = 0, expected_steps: int = 200) -> Strategy:
    """A strategy by name: round-robin, timed, random, random:STICKINESS, pct, pct:D.
    ``expected_steps`` is PCT's k: how long runs are (learned from earlier runs)."""
    base, _, arg = name.partition(":")
    if base == "round-robin":
        return RoundRobin()
    if base == "timed":
        return Timed()
    if base == "random":
        return RandomWalk(seed, float(arg) if arg else 0.5)
    if base == "pct":
        return PCT(seed, int(arg) if arg else 2, expected_steps)
    raise ValueError(f"unknown strategy {name!r}: round-robin, timed, random[:STICKINESS], pct[:DEPTH]")
