"""Dynamic partial-order reduction: source-DPOR (Abdulla, Aronis, Jonsson and Sagonas,
POPL'14) with sleep sets, stateless: every execution runs the world from its start,
following a prefix of recorded decisions, then the default policy (keep the current
task, else the lowest tid). After each execution the trace is scanned for races: two
dependent steps of different tasks that no other step orders (vector clocks over step
footprints, see footprint.py). For each race, a task that can start the reversed order
(an *initial* of it) goes into the backtrack set of the earlier step's decision point,
unless one already is there or sleeps there; when an initial could not run there, every
task that could is tried. The next execution branches at the deepest point with an
unexplored backtrack choice. Sleep sets keep a task out of a branch where running it
would only repeat a sibling's trace; an execution whose every runnable task sleeps is
abandoned (``SleepSetBlocked``).

Data choices (``choose`` traps: khugepaged's address, a spurious trylock failure, a
quantum length) are decision points too, and every value is explored. When the search
runs out of backtrack choices, every Mazurkiewicz trace of the scenario has been run at
least once (for the dependency relation the footprints give): ``exhausted``.

    dpor = Dpor()
    while True:
        strategy = dpor.execution()       # None: nothing left
        ... run a fresh world under strategy (strategy.attach(scenario) first) ...
        dpor.finish(strategy)             # race analysis, next branch
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emu.sched import footprint
from emu.sched.strategy import Divergence, Strategy
from emu.sched.task import TaskState

Footprint = dict[Any, bool]


class SleepSetBlocked(Exception):
    """Every runnable task sleeps: this execution can only repeat an explored trace."""


@dataclass
class Node:
    """One decision point of the current path."""
    kind: str                                   # "pick" or "data"
    options: tuple[int, ...]                    # runnable tids, or data values
    chosen: int
    step: int = -1                              # the step a pick decided
    done: set[int] = field(default_factory=set)
    backtrack: set[int] = field(default_factory=set)
    sleep: dict[int, Footprint] = field(default_factory=dict)      # at entry to the node
    explored: dict[int, Footprint] = field(default_factory=dict)   # tid -> its step's footprint


class Dpor:
    """The search state kept across executions."""

    def __init__(self) -> None:
        self.path: list[Node] = []
        self.executions = 0
        self.blocked = 0               # executions abandoned by sleep sets
        self.exhausted = False
        self._started = False

    def execution(self) -> DporRun | None:
        """The strategy for the next execution, or None when the search is complete."""
        if self._started and not self._advance():
            self.exhausted = True
            return None
        self._started = True
        self.executions += 1
        return DporRun(self)

    def _advance(self) -> bool:
        """Branch at the deepest decision point with a choice left; False if none is."""
        while self.path:
            node = self.path[-1]
            if node.kind == "data":
                left = [v for v in node.options if v not in node.done]
            else:
                left = sorted(node.backtrack - node.done - set(node.sleep))
            if left:
                node.chosen = left[0]
                node.done.add(left[0])
                return True
            self.path.pop()
        return False

    def finish(self, run: DporRun) -> None:
        """Race analysis of a finished (or abandoned) execution (source-DPOR, Abdulla et
        al., POPL'14): for every race, two dependent steps of different tasks with no
        step ordered between them, make sure the earlier step's decision point will try
        a task that can start the reversed order."""
        steps = run.steps
        nodes = {n.step: n for n in self.path[:run.decisions] if n.kind == "pick"}
        clocks: list[dict[int, int]] = []           # vector clock after each step
        last: dict[int, dict[int, int]] = {}        # tid -> clock after its latest step
        races: list[tuple[int, int]] = []
        for k, (p, fp) in enumerate(steps):
            vc = dict(last.get(p, {}))
            for j in range(k - 1, -1, -1):
                q, fq = steps[j]
                if q == p or not footprint.dependent(fq, fp):
                    continue
                cj = clocks[j]
                if cj[q] > vc.get(q, 0) and j in nodes:
                    races.append((j, k))            # nothing between them orders j before k
                for t, c in cj.items():             # j happens before k
                    if vc.get(t, 0) < c:
                        vc[t] = c
            vc[p] = vc.get(p, 0) + 1
            clocks.append(vc)
            last[p] = vc
        for j, k in races:
            self._reverse(nodes[j], j, k, steps, clocks)

    @staticmethod
    def _reverse(node: Node, j: int, k: int, steps, clocks) -> None:
        """The reversed order starts from ``node`` with the steps after j that do not
        depend on j, then k; a task is an initial of that sequence when its first step
        in it follows none of the others. One initial in the backtrack set (or asleep:
        then a sibling covered it) is enough; a task that could not run there means
        every task that could is tried."""
        qj = steps[j][0]
        seq = [i for i in range(j + 1, k) if clocks[i].get(qj, 0) < clocks[j][qj]] + [k]
        initials: list[int] = []
        seen_tasks: set[int] = set()
        for n, i in enumerate(seq):
            t = steps[i][0]
            if t in seen_tasks:
                continue
            seen_tasks.add(t)
            ci = clocks[i]
            if not any(clocks[e][steps[e][0]] <= ci.get(steps[e][0], 0) for e in seq[:n]
                       if steps[e][0] != t):
                initials.append(t)
        if not initials or any(t not in node.options for t in initials):
            node.backtrack.update(node.options)
            return
        if any(t in node.backtrack or t in node.sleep for t in initials):
            return
        node.backtrack.add(min(initials))


class DporRun(Strategy):
    """One execution of the search: follows the path's decisions, then the default."""

    name = "dpor"

    def __init__(self, search: Dpor) -> None:
        self.search = search
        self.replayed = len(search.path)        # decisions to follow
        self.decisions = 0                      # decision points passed so far
        self.steps: list[tuple[int, Footprint]] = []
        self.bases: list[int] = []              # objects numbered before each step
        self.sleep: dict[int, Footprint] = {}
        self._pending_sleep: dict[int, Footprint] | None = None
        self._node: Node | None = None

    # -- decisions ------------------------------------------------------------------------
    def _decide(self, kind: str, options: tuple[int, ...], default: int, label: str) -> Node:
        path, i = self.search.path, self.decisions
        self.decisions += 1
        if i < self.replayed:
            node = path[i]
            if node.kind != kind or (kind == "data" and node.options != options):
                raise Divergence(f"DPOR execution diverged at decision {i}: expected a {node.kind} "
                                 f"point, got a {kind} point ({label})")
            return node
        node = Node(kind, options, default, done={default}, backtrack={default})
        path.append(node)
        return node

    def pick(self, runnable, current, step):
        self._step_ended()
        tids = tuple(t.tid for t in runnable)
        awake = [t for t in runnable if t.tid not in self.sleep]
        if not awake:
            raise SleepSetBlocked(f"every runnable task sleeps at step {step}")
        default = current.tid if current in awake else awake[0].tid
        node = self._decide("pick", tids, default, "")
        node.step = step
        node.sleep = dict(self.sleep)
        for t in runnable:
            if t.tid == node.chosen:
                # the child's sleep set: what slept here, and the siblings already explored,
                # minus whatever the chosen step turns out to depend on (see _step_ended)
                pending = dict(node.sleep)
                for tid in node.done:
                    if tid != node.chosen and tid in node.explored:
                        pending[tid] = node.explored[tid]
                self._pending_sleep = pending
                self._node = node
                return t
        raise Divergence(f"DPOR execution diverged at step {step}: task #{node.chosen} cannot run")

    def data(self, n, label):
        node = self._decide("data", tuple(range(n)), 0, label)
        return node.chosen

    def _step_ended(self) -> None:
        """Fold the last step's footprint into the sleep set the next pick starts from."""
        if self._node is None:
            return
        node, self._node = self._node, None
        tid, fp = self.steps[-1] if self.steps else (None, {})
        if tid == node.chosen:
            # kept for the siblings' sleep sets, which another execution will compare: an
            # object first numbered in this step may get another number there
            node.explored[tid] = footprint.for_sibling(fp, self.bases[-1])
        self.sleep = {t: f for t, f in (self._pending_sleep or {}).items()
                      if t != tid and not footprint.dependent_sibling(f, fp)}
        self._pending_sleep = None

    # -- recording --------------------------------------------------------------------------
    def attach(self, sc: Any) -> None:
        record_steps(sc, self.steps, self.bases)


def record_steps(sc: Any, steps: list[tuple[int, Footprint]], bases: list[int] | None = None) -> None:
    """Append (tid, footprint) for every step of ``sc``'s run to ``steps``: wrap the
    scheduler's step and make guest RAM note its accesses. A step that resumes a task
    after it blocked (a lock granted, a wait queue posted) is charged with what it
    blocked on. Objects known by id() are renumbered in the order the run first touches
    them, which is the same in every execution up to where two executions part
    (``bases`` gets how many were numbered before each step)."""
    footprint.recording(sc.kernel.physmem)
    sched = sc.sched
    inner = sched.step
    blocked_on: dict[int, tuple] = {}
    numbers: dict[int, int] = {}

    def step(task):
        event = task.pending
        if event is None:
            event = blocked_on.pop(task.tid, None)
        fp = footprint.of_event(event)
        footprint.ACTIVE = fp
        try:
            inner(task)
        finally:
            footprint.ACTIVE = None
            if bases is not None:
                bases.append(len(numbers))
            steps.append((task.tid, footprint.renumber(fp, numbers)))
        if task.state is TaskState.BLOCKED and event is not None:
            blocked_on[task.tid] = event

    sched.step = step


class FootprintRecorder(Strategy):
    """Another strategy's picks, with every step's footprint and every pick's runnable
    tasks recorded (the commutation audit's view of a run)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = inner.name
        self.fair = inner.fair
        self.steps: list[tuple[int, Footprint]] = []
        self.runnable: dict[int, tuple[int, ...]] = {}      # step -> runnable tids at its pick
        self.events: dict[int, list[str]] = {}              # tid -> its events, in order
        self.ram = ""

    def pick(self, runnable, current, step):
        self.runnable[step] = tuple(t.tid for t in runnable)
        return self.inner.pick(runnable, current, step)

    def data(self, n, label):
        return self.inner.data(n, label)

    def describe(self) -> str:
        return self.inner.describe()

    def attach(self, sc: Any) -> None:
        import hashlib
        record_steps(sc, self.steps)
        events = self.events

        def observe(task, event):
            kind = event[0]
            what = event[1] if kind == "point" else getattr(event[1], "name", "") if len(event) > 1 else ""
            res = event[2] if kind == "point" and isinstance(event[2], (int, str, tuple)) else ""
            events.setdefault(task.tid, []).append(f"{kind}|{what}|{res}")

        sc.sched.observers.append(observe)
        sched, physmem = sc.sched, sc.kernel.physmem
        inner_run = sched.run

        def run(*args, **kwargs):
            try:
                inner_run(*args, **kwargs)
            finally:
                self.ram = hashlib.blake2b(physmem.read(0, physmem.size), digest_size=8).hexdigest()

        sched.run = run
