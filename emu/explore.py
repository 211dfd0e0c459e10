"""The race explorer: run a scenario under many schedules, report the first finding with a
minimal, replayable schedule.

    outcome = execute(spec, strategy=PCT(seed, 2))        # one schedule, fresh world
    result = explore(spec, strategy="portfolio", budget=1000, seed=1)
    small = shrink(spec, result.finding_outcome)           # fewest switches, same signature
    certify(spec, small)                                    # bounded DFS below its count

A run is a pure function of (scenario, arch, kernel profile, injected bugs, schedule), so
every finding comes with a schedule that reproduces it: ``emu replay emu1...``.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from emu.scenario import Scenario
from emu.scenarios import BUGS, PROFILE_BUGS, SCENARIOS, ScenarioSpec, World
from emu.sched import footprint
from emu.sched.dpor import Dpor, FootprintRecorder, SleepSetBlocked
from emu.sched.loop import Deadlock, Livelock, run_sync
from emu.sched.schedule import Digest, Schedule
from emu.sched.strategy import PCT, Divergence, RandomWalk, Replay, Strategy, make_strategy
from emu.sched.task import TaskState
from emu.snapshot import Snapshot
from mm_core import memory, swapfile
from mm_core.sanitizers import Finding

MAX_STEPS = 20_000
PORTFOLIO = ("pct:2", "pct:3", "random:0.5", "pct:1", "random:0.9")


class ExploreError(ValueError):
    """Bad usage: unknown scenario or bug, impossible combination."""


@dataclass
class Outcome:
    finding: Finding | None
    schedule: Schedule
    preemptions: int
    steps: int
    digest: str


@dataclass
class ExploreResult:
    scenario: str
    schedules: int = 0
    seconds: float = 0.0
    outcome: Outcome | None = None          # the first finding (shrunk if asked)
    original: Outcome | None = None         # as found, before shrinking
    found_by: str = ""
    found_after: int = 0
    certified: bool | None = None           # minimal preemption count proven by DFS
    exhausted: bool = False                 # DPOR ran every trace class: nothing is left
    certify_runs: int = 0
    findings: list[dict] = field(default_factory=list)


def get_spec(name: str) -> ScenarioSpec:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ExploreError(f"unknown scenario {name!r}; `emu explore --list` shows them") from None


def check_bugs(inject: list[str]) -> None:
    for bug in inject:
        if bug not in BUGS:
            raise ExploreError(f"unknown bug {bug!r}; `emu explore --list` shows the injectable bugs")


# -- one schedule ----------------------------------------------------------------------------

# Worlds built once and restored for every later schedule (emu/snapshot.py): by (spec, arch,
# kernel, inject); None for a world that cannot be copied exactly (built fresh every time).
REUSE_WORLDS = True
_WORLDS: OrderedDict[tuple, Snapshot | None] = OrderedDict()
_WORLDS_MAX = 8


def build_world(spec: ScenarioSpec, strategy: Strategy, arch: str = "x86_64", kernel: str = "6.6",
                inject: tuple[str, ...] = ()) -> tuple[Scenario, World]:
    """A fresh Scenario with ``spec``'s world built in it, scheduled by ``strategy``."""
    changes: dict = {}
    for bug in inject:
        changes.update(PROFILE_BUGS.get(bug, {}))
    sc = Scenario(arch=arch, kernel=kernel, mem=spec.mem, strategy=strategy, cpus=spec.cpus,
                  quantum=spec.quantum, prefault=spec.prefault, traced=False, **changes)
    for bug in inject:
        sc.kernel.bugs[bug] = True
    try:
        return sc, spec.build(sc)
    except BaseException:
        sc.close()
        raise


def world_for(spec: ScenarioSpec, strategy: Strategy, arch: str = "x86_64", kernel: str = "6.6",
              inject: tuple[str, ...] = ()) -> tuple[Scenario, World]:
    """``build_world()``'s result: the first time built and snapshotted, then a restored copy
    of that snapshot (every schedule, the first included, runs on a copy). Only for the
    registered scenarios: a spec made elsewhere (a test's wrapper whose build records what
    it built) is built fresh every time."""
    if not REUSE_WORLDS or SCENARIOS.get(spec.name) is not spec:
        return build_world(spec, strategy, arch, kernel, inject)
    key = (spec, arch, kernel, inject)
    if key in _WORLDS:
        _WORLDS.move_to_end(key)
        snap = _WORLDS[key]
    else:
        sc, world = build_world(spec, strategy, arch, kernel, inject)
        snap = Snapshot.take(sc, world, strategy)
        _WORLDS[key] = snap
        if len(_WORLDS) > _WORLDS_MAX:
            _WORLDS.popitem(last=False)
        if snap is None:
            return sc, world
        sc.close()
    if snap is None:
        return build_world(spec, strategy, arch, kernel, inject)
    return snap.restore(strategy)


def execute(spec: ScenarioSpec, strategy: Strategy, arch: str = "x86_64", kernel: str = "6.6",
            inject: tuple[str, ...] = (), max_steps: int | None = None) -> Outcome:
    """Run the world's tasks under ``strategy`` (a world as built fresh: world_for()),
    tear down, audit."""
    sc, world = world_for(spec, strategy, arch, kernel, tuple(inject))
    private = SCENARIOS.get(spec.name) is spec      # a registered build keeps no reference to it
    digest = Digest()
    finding: Finding | None = None
    try:
        sc.sched.observers.append(digest.observe)
        strategy.attach(sc)
        try:
            sc.sched.run(max_steps=max_steps or spec.max_steps)
            _teardown(sc, world)
        except Finding as f:
            finding = f
        except Deadlock as err:
            finding = Finding("DEADLOCK", f"DEADLOCK: {err}", "DEADLOCK:" + str(err).split(":")[1].strip()
                              .split(" ")[0])
        except Livelock as err:
            finding = Finding("LIVELOCK", f"LIVELOCK: {err}", "LIVELOCK")
        except memory.CheckMMError as err:
            first = str(err).split(";")[0]
            finding = Finding("CHECK_MM", first, "CHECK_MM:" + first.split(" mm:")[0].replace("BUG: ", ""),
                              [f"  {line.strip()}" for line in str(err).split(";")])
        names = {t.tid: t.name for t in sc.sched.tasks}
        picks = [names[tid] for tid in sc.sched.picks]
        schedule = Schedule.from_picks(picks, scenario=spec.name, kernel=kernel, arch=arch,
                                       inject=",".join(inject), digest=digest.hexdigest(),
                                       strategy=strategy.describe(),
                                       data=[v for _, _, v in sc.sched.data_log])
        return Outcome(finding, schedule, sc.sched.preemptions, len(picks), digest.hexdigest())
    finally:
        sc.close()
        if private:
            _dismantle(sc, world)


def _dismantle(sc: Scenario, world: World) -> None:
    """Break the reference cycles of a world that is done with and that nobody else holds
    (machine, kernel and scheduler refer to each other), so reference counting frees it now:
    left to the cycle collector, dead worlds cost ~10% of a small schedule."""
    k = sc.kernel
    # a shmem inode and its address_space refer to each other too
    files = [obj for f in world.files for obj in (f, getattr(f, "mapping", None)) if hasattr(obj, "__dict__")]
    for obj in (*sc.sched.tasks, *files, k.san, k.alloc, k.rcu, k, sc.sched, sc.machine, world, sc):
        vars(obj).clear()


def _teardown(sc: Scenario, world: World) -> None:
    """Every mm exits (check_mm), every file closes, RCU callbacks run, nothing is left."""
    m, k = sc.machine, sc.kernel
    # nothing runs after the teardown that could read a freed page, and the sanitizers
    # know freed tables by their descriptors: skip filling every freed page with poison
    k.alloc.poison = False
    for t in sc.sched.tasks:
        if t.state is not TaskState.DONE and not t.daemon:
            raise Finding("DEADLOCK", f"DEADLOCK: {t.name} never finished", f"STUCK:{t.name}")
    proc = world.extra.get("proc")
    if proc is not None:                          # a guest program: its own checks, then exit
        if proc.exit_code != 0 or world.extra["expect"] not in proc.stdout:
            raise Finding("ORACLE", f"ORACLE: guest {proc.path.rsplit('/', 1)[-1]} exited {proc.exit_code}"
                          f"{' (' + proc.signal.name + ')' if proc.signal else ''}", "ORACLE:guest",
                          [f"  stdout: {proc.stdout.decode(errors='replace')!r}"])
    for mm in world.mms:
        if not mm.dead:                           # a scenario task may have exited it already
            m.exit_mm(mm)
    for f in world.files:
        m.close_file(f)
    k.rcu.barrier_now()
    if k.swap_info is not None:
        # swap-cache folios nobody maps or needs are what later reclaim frees; any slot
        # still counted, or folio still cached after that, has lost its owner
        run_sync(swapfile.drain_swap_cache(k))
        leaked = swapfile.swap_leaks(k)
        if leaked:
            raise Finding("LEAK", f"LEAK: {len(leaked)} swap slot(s) or swap-cache folio(s) left after "
                          "exit", "LEAK:swap", [f"  {what}" for what in leaked[:4]])
    left = list(k.ptdescs.values()) + k.deferred_tables()
    if left:
        raise Finding("LEAK", f"LEAK: {len(left)} page table(s) left after exit and rcu_barrier",
                      "LEAK:pagetable", [f"  {pt!r}" for pt in left[:4]])
    pages = set(k.alloc.pages) - {k.zero_page.pfn}
    if pages:
        raise Finding("LEAK", f"LEAK: {len(pages)} page block(s) left after exit", "LEAK:page",
                      [f"  pfn {pfn:#x} ({k.alloc.pages[pfn].use.value})" for pfn in sorted(pages)[:4]])


def replay(schedule: Schedule, lenient: bool = False) -> Outcome:
    """Run ``schedule`` again (strict: a divergence raises)."""
    spec = get_spec(schedule.scenario)
    inject = tuple(b for b in schedule.inject.split(",") if b)
    check_bugs(list(inject))
    tids = _tids_of(spec, schedule, inject)
    return execute(spec, Replay([tids[n] for n in schedule.picks()], lenient, schedule.data),
                   schedule.arch, schedule.kernel, inject)


def _tids_of(spec: ScenarioSpec, schedule: Schedule, inject: tuple[str, ...]) -> dict[str, int]:
    """Task name -> tid in a fresh build of the scenario (tids follow spawn order)."""
    sc = Scenario(arch=schedule.arch, kernel=schedule.kernel, mem=spec.mem, cpus=spec.cpus,
                  quantum=spec.quantum, prefault=False)
    try:
        spec.build(sc)
        return {t.name: t.tid for t in sc.sched.tasks}
    finally:
        sc.close()


@contextlib.contextmanager
def _frozen_heap():
    """Many schedules in a row: what exists already (modules, code, the snapshots) goes to
    the garbage collector's permanent generation, so the full collections the dead worlds
    cause do not walk it again and again (gc.freeze; undone at the end, unless the caller
    had frozen objects itself)."""
    mine = gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()


# -- search ----------------------------------------------------------------------------------

BATCH = 32      # schedules per batch; PCT's k is learned between batches


def strategy_for(name: str, seed: int, index: int, expected_steps: int) -> tuple[str, Strategy]:
    """The strategy of schedule ``index`` (portfolio: round-robin over PORTFOLIO)."""
    pick = PORTFOLIO[index % len(PORTFOLIO)] if name == "portfolio" else name
    return pick, make_strategy(pick, seed * 1_000_003 + index, expected_steps)


def strategies(name: str, seed: int, steps_seen: list[int]):
    """An endless stream of (label, strategy), one per schedule; PCT's k follows the
    longest run in ``steps_seen`` so far (for callers that drive execute() themselves)."""
    i = 0
    while True:
        yield strategy_for(name, seed, i, max(steps_seen, default=200))
        i += 1


def _job(args: tuple) -> Outcome:
    """One schedule in a worker process (everything by name: worlds do not pickle)."""
    scenario, name, seed, index, k_steps, arch, kernel, inject = args
    _, strat = strategy_for(name, seed, index, k_steps)
    return execute(SCENARIOS[scenario], strat, arch, kernel, inject)


@_frozen_heap()
def explore(spec: ScenarioSpec, strategy: str = "portfolio", budget: int = 1000,
            seconds: float | None = None, seed: int = 0, arch: str = "x86_64", kernel: str = "6.6",
            inject: tuple[str, ...] = (), progress: Callable[[int], None] | None = None,
            workers: int = 1) -> ExploreResult:
    """Run schedules until a finding, the budget or the time runs out.

    Schedules go in batches; within a batch the finding with the lowest index wins, and
    PCT learns run lengths only between batches, so the result depends on the seed and
    not on ``workers`` or timing."""
    if strategy == "dpor":
        return explore_dpor(spec, budget, seconds, arch, kernel, inject, progress)
    if strategy.startswith("dfs"):
        return explore_dfs(spec, int(strategy.partition(":")[2] or 2), budget, seconds, arch, kernel,
                           inject, progress)
    result = ExploreResult(spec.name)
    t0 = time.perf_counter()
    steps_seen: list[int] = []
    pool = None
    if workers > 1:
        import concurrent.futures
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        index = 0
        while index < budget and (seconds is None or time.perf_counter() - t0 <= seconds):
            batch = range(index, min(index + BATCH, budget))
            k_steps = max(steps_seen, default=200)
            jobs = [(spec.name, strategy, seed, i, k_steps, arch, kernel, inject) for i in batch]
            outs = (pool.map(_job, jobs, chunksize=max(1, len(jobs) // workers)) if pool is not None
                    else map(_job, jobs))
            for i, out in zip(batch, outs, strict=True):
                steps_seen.append(out.steps)
                result.schedules = i + 1
                if out.finding is not None:
                    result.outcome = result.original = out
                    result.found_by = strategy_for(strategy, seed, i, k_steps)[0]
                    result.found_after = i + 1
                    break
            if progress is not None:
                progress(result.schedules)
            if result.outcome is not None:
                break
            index = batch.stop
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    result.seconds = time.perf_counter() - t0
    return result


@_frozen_heap()
def explore_dfs(spec: ScenarioSpec, max_bound: int, budget: int, seconds: float | None, arch: str,
                kernel: str, inject: tuple[str, ...],
                progress: Callable[[int], None] | None = None) -> ExploreResult:
    """Systematic search (CHESS): every schedule with 0 preemptions, then 1, ... up to
    ``max_bound``, depth first; the first finding has the fewest preemptions there are."""
    result = ExploreResult(spec.name)
    t0 = time.perf_counter()
    for bound in range(max_bound + 1):
        prefix: list[int] | None = []
        while prefix is not None:
            if result.schedules >= budget or (seconds is not None and time.perf_counter() - t0 > seconds):
                result.seconds = time.perf_counter() - t0
                return result
            dfs = BoundedDFS(prefix, bound)
            out = execute(spec, dfs, arch, kernel, inject)
            result.schedules += 1
            if progress is not None:
                progress(result.schedules)
            if out.finding is not None:
                out.schedule.strategy = f"dfs(pb={bound})"
                result.outcome = result.original = out
                result.found_by, result.found_after = f"dfs(pb={bound})", result.schedules
                result.certified = True
                result.seconds = time.perf_counter() - t0
                return result
            prefix = dfs.next_prefix()
    result.seconds = time.perf_counter() - t0
    return result


def check_dpor(spec: ScenarioSpec) -> None:
    """DPOR is offered for kernel-task scenarios only (ExploreError otherwise)."""
    if spec.guest:
        raise ExploreError(f"--strategy dpor searches kernel-task scenarios; {spec.name} runs a guest "
                           "program, whose quanta depend on every other step, so DPOR would only be a "
                           "slow DFS (use the portfolio or dfs[:N])")


@_frozen_heap()
def explore_dpor(spec: ScenarioSpec, budget: int, seconds: float | None, arch: str, kernel: str,
                 inject: tuple[str, ...], progress: Callable[[int], None] | None = None,
                 search: Dpor | None = None) -> ExploreResult:
    """Systematic search with dynamic partial-order reduction (emu/sched/dpor.py): one
    execution per Mazurkiewicz trace at most, with no preemption bound. A clean result
    with ``exhausted`` set means every interleaving of the scenario (every data choice
    too) was covered. Kernel-task scenarios only (check_dpor)."""
    check_dpor(spec)
    result = ExploreResult(spec.name)
    search = search or Dpor()
    t0 = time.perf_counter()
    with footprint.tracking(_tracked_classes()):
        while result.schedules < budget and (seconds is None or time.perf_counter() - t0 <= seconds):
            run = search.execution()
            if run is None:
                result.exhausted = True
                break
            try:
                out = execute(spec, run, arch, kernel, inject)
            except SleepSetBlocked:
                out = None              # a sibling already ran every trace this one could
                search.blocked += 1
            search.finish(run)
            result.schedules += 1
            if progress is not None:
                progress(result.schedules)
            if out is not None and out.finding is not None:
                out.schedule.strategy = "dpor"
                result.outcome = result.original = out
                result.found_by, result.found_after = "dpor", result.schedules
                break
    result.seconds = time.perf_counter() - t0
    return result


def _tracked_classes() -> list[type]:
    """The model objects whose attributes DPOR's footprints follow (footprint.tracking)."""
    from mm_core import (
        hmm,
        khugepaged,
        ksm,
        mm,
        mmu_notifier,
        page_alloc,
        pgalloc,
        rmap,
        shmem,
        userfaultfd,
        vmscan,
    )
    return [page_alloc.Page, mm.VMA, mm.MMStruct, pgalloc.PageTable, pgalloc.FragPage, shmem.AddressSpace,
            shmem.ShmemInode, swapfile.SwapInfo, rmap.AnonVma, userfaultfd.UserfaultfdCtx,
            userfaultfd.UffdWaitQueue, userfaultfd.UffdFdWaitQueue, userfaultfd.UffdEventWaitQueue,
            ksm.RmapItem, ksm.StableNode, ksm.KsmMmSlot, ksm.Ksm, vmscan.LruGenFolio, khugepaged.Khugepaged,
            mmu_notifier.MmuNotifierSubscriptions, mmu_notifier.MmuIntervalNotifier, hmm.Dmirror]


@dataclass
class AuditResult:
    runs: int = 0
    pairs: int = 0                           # adjacent independent pairs swapped and re-run
    problems: list[str] = field(default_factory=list)


@_frozen_heap()
def audit_commutation(spec: ScenarioSpec, runs: int = 10, seed: int = 0, arch: str = "x86_64",
                      kernel: str = "6.6", inject: tuple[str, ...] = (),
                      strategy: str = "random:0.5") -> AuditResult:
    """Check DPOR's dependency relation on real runs. For each of ``runs`` schedules, every
    two adjacent steps of different tasks that the footprints call independent (where the
    second task could have run first) are swapped and the run is replayed: each task must
    see the same events, and the run must end the same way (finding signature, guest
    RAM, data choices). A difference means some state the two steps share is missing from
    their footprints, and DPOR would miss the traces it leads to."""
    result = AuditResult()
    with footprint.tracking(_tracked_classes()):
        for i in range(runs):
            base = FootprintRecorder(make_strategy(strategy, seed * 1_000_003 + i))
            out = execute(spec, base, arch, kernel, inject)
            result.runs += 1
            picks = [tid for tid, _ in base.steps]
            data = list(out.schedule.data)
            for j in range(len(picks) - 1):
                a, b = base.steps[j], base.steps[j + 1]
                if a[0] == b[0] or j not in base.runnable or j + 1 not in base.runnable \
                        or b[0] not in base.runnable[j] or footprint.dependent(a[1], b[1]):
                    continue
                swapped = picks[:j] + [b[0], a[0]] + picks[j + 2:]
                again = FootprintRecorder(Replay(swapped, data=data))
                result.pairs += 1
                try:
                    out2 = execute(spec, again, arch, kernel, inject)
                except Divergence as err:
                    result.problems.append(f"run {i} steps {j},{j + 1}: swapped schedule diverged: {err}")
                    continue
                why = _differs(base, out, again, out2)
                if why:
                    result.problems.append(f"run {i} steps {j},{j + 1} (#{a[0]} then #{b[0]}): {why}")
    return result


def _differs(base, out: Outcome, again, out2: Outcome) -> str:
    sig = out.finding.signature if out.finding else None
    sig2 = out2.finding.signature if out2.finding else None
    if sig != sig2:
        return f"outcome {sig} became {sig2}"
    for tid in sorted(set(base.events) | set(again.events)):
        e1, e2 = base.events.get(tid, []), again.events.get(tid, [])
        if e1 != e2:
            k = next((n for n, (x, y) in enumerate(zip(e1, e2, strict=False)) if x != y),
                     min(len(e1), len(e2)))
            return (f"task #{tid}'s event {k} was {e1[k] if k < len(e1) else 'none'}, "
                    f"now {e2[k] if k < len(e2) else 'none'}")
    if list(out.schedule.data) != list(out2.schedule.data):
        return "different data choices"
    if sig is None and base.ram != again.ram:
        return "guest RAM differs at the end"
    return ""


# -- shrinking and certification ---------------------------------------------------------------

def _same(out: Outcome, signature: str) -> bool:
    return out.finding is not None and out.finding.signature == signature


@_frozen_heap()
def shrink(spec: ScenarioSpec, found: Outcome, max_runs: int = 400) -> Outcome:
    """Fewer task switches, same failure signature. Candidates are replayed leniently
    (where a pick is impossible, or the schedule ends, the current task keeps running):
    (a) cut the schedule after each run, shortest first; (b) drop single runs; repeat."""
    sched = found.schedule
    signature = found.finding.signature
    inject = tuple(b for b in sched.inject.split(",") if b)
    tids = _tids_of(spec, sched, inject)
    best, runs_done = found, 0

    def attempt(runs: list[tuple[int, int]]) -> Outcome | None:
        nonlocal runs_done
        runs_done += 1
        picks = [tids[best.schedule.tasks[i]] for i, n in runs for _ in range(n)]
        out = execute(spec, Replay(picks, lenient=True, data=best.schedule.data), sched.arch,
                      sched.kernel, inject)
        return out if _same(out, signature) else None

    improved = True
    while improved and runs_done < max_runs:
        improved = False
        runs = best.schedule.runs
        for cut in range(1, len(runs)):
            out = attempt(runs[:cut])
            if out is not None and out.preemptions < best.preemptions:
                best, improved = out, True
                break
        if improved:
            continue
        for j in range(len(runs) - 1, 0, -1):
            if runs_done >= max_runs:
                break
            out = attempt(runs[:j] + runs[j + 1:])
            if out is not None and (out.preemptions, out.steps) < (best.preemptions, best.steps):
                best, improved = out, True
                break
    best.schedule.strategy = found.schedule.strategy
    return best


class BoundedDFS(Strategy):
    """Stateless depth-first search over schedules with at most ``bound`` preemptions
    (CHESS). Option 0 at a choice point keeps the current task; one execution follows
    ``prefix`` and then always option 0."""

    name = "dfs"

    def __init__(self, prefix: list[int], bound: int) -> None:
        self.prefix = prefix
        self.bound = bound
        self.trace: list[tuple[int, int, bool]] = []     # (choice, options, current runnable)

    def pick(self, runnable, current, step):
        keep = current in runnable
        options = ([current] if keep else []) + sorted((t for t in runnable if t is not current),
                                                       key=lambda t: t.tid)
        if len(options) == 1:
            return options[0]
        i = len(self.trace)
        choice = self.prefix[i] if i < len(self.prefix) else 0
        choice = min(choice, len(options) - 1)
        self.trace.append((choice, len(options), keep))
        return options[choice]

    def next_prefix(self) -> list[int] | None:
        used = [0]
        for choice, _, keep in self.trace:
            used.append(used[-1] + (1 if choice and keep else 0))
        for j in range(len(self.trace) - 1, -1, -1):
            choice, options, keep = self.trace[j]
            if choice + 1 < options and used[j] + (1 if keep else 0) <= self.bound:
                return [c for c, _, _ in self.trace[:j]] + [choice + 1]
        return None


@_frozen_heap()
def certify(spec: ScenarioSpec, found: Outcome, cap: int = 2000) -> tuple[Outcome, bool | None, int]:
    """The fewest preemptions that reproduce ``found``'s signature, by bounded DFS with
    bounds 0, 1, ... below ``found.preemptions`` (iterative deepening: the first bound
    that reproduces it is the minimum). Returns (minimal outcome, certified, runs):
    certified is None when ``cap`` runs were not enough to search every smaller bound."""
    sched = found.schedule
    inject = tuple(b for b in sched.inject.split(",") if b)
    runs = 0
    for bound in range(found.preemptions):
        prefix: list[int] | None = []
        while prefix is not None:
            if runs >= cap:
                return found, None, runs
            dfs = BoundedDFS(prefix, bound)
            out = execute(spec, dfs, sched.arch, sched.kernel, inject)
            runs += 1
            if _same(out, found.finding.signature):
                out.schedule.strategy = f"dfs(pb={bound})"
                return out, True, runs
            prefix = dfs.next_prefix()
    return found, True, runs


__all__ = ["execute", "explore", "replay", "shrink", "certify", "Outcome", "ExploreResult", "BUGS",
           "SCENARIOS", "PCT", "RandomWalk"]
