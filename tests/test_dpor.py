"""DPOR (emu/sched/dpor.py): sound against brute force on small programs, a real
reduction, and on the kernel scenarios: exhausts the fixed twins, finds the injected
bugs, and its dependency relation survives the commutation audit."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu.explore import BoundedDFS, audit_commutation, explore, explore_dfs, explore_dpor, get_spec, replay
from emu.sched import footprint, traps
from emu.sched.dpor import Dpor, SleepSetBlocked
from emu.sched.loop import Scheduler
from mm_core.locks import SpinLock

# -- toy programs: tasks reading and writing named cells, some of it under a lock ---------------


class _Toy:
    """A world of cells: ``program`` is one list of ops per task, ("x", True) writes x,
    ("x", False) reads it, ("lock", "A") / ("unlock", "A") take and drop a spinlock. The
    outcome is every cell's write history and what every read saw."""

    def __init__(self, program, strategy) -> None:
        self.cells: dict[str, tuple] = {}
        self.seen: dict[int, list] = {}
        self.locks = {name: SpinLock(name) for name in "AB"}
        self.sched = Scheduler(strategy)
        for tid, ops in enumerate(program):
            self.sched.spawn(self._task(tid, ops), f"t{tid}")

    async def _task(self, tid, ops):
        for res, arg in ops:
            if res == "lock":
                await traps.lock(self.locks[arg])
            elif res == "unlock":
                await traps.unlock(self.locks[arg])
            else:
                await traps.sched_point("op")
                footprint.touch(res, arg)
                if arg:
                    self.cells[res] = self.cells.get(res, ()) + (tid,)
                else:
                    self.seen.setdefault(tid, []).append(self.cells.get(res, ()))

    def outcome(self):
        return (tuple(sorted(self.cells.items())), tuple(sorted((t, tuple(v)) for t, v in self.seen.items())))


class _ToyScenario:
    """What DporRun.attach() needs of a scenario, for a toy world (no guest RAM)."""

    def __init__(self, sched) -> None:
        self.sched = sched
        self.kernel = types.SimpleNamespace(physmem=None)


def dpor_outcomes(program):
    search, outcomes = Dpor(), set()
    while (run := search.execution()) is not None:
        toy = _Toy(program, run)
        run.attach(_ToyScenario(toy.sched))
        try:
            toy.sched.run()
            outcomes.add(toy.outcome())
        except SleepSetBlocked:
            pass
        search.finish(run)
    return outcomes, search.executions


def all_outcomes(program):
    outcomes, prefix, runs = set(), [], 0
    while prefix is not None:
        dfs = BoundedDFS(prefix, 10 ** 6)
        toy = _Toy(program, dfs)
        toy.sched.run()
        outcomes.add(toy.outcome())
        runs += 1
        prefix = dfs.next_prefix()
    return outcomes, runs


_op = st.tuples(st.sampled_from("xyz"), st.booleans())


@st.composite
def _task_ops(draw):
    ops = draw(st.lists(_op, min_size=1, max_size=3))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(ops) - 1))
        j = draw(st.integers(i, len(ops) - 1))
        lock = draw(st.sampled_from("AB"))
        ops[i:j + 1] = [("lock", lock), *ops[i:j + 1], ("unlock", lock)]
    return ops


@settings(max_examples=60, deadline=None)
@given(st.lists(_task_ops(), min_size=2, max_size=2) | st.lists(st.lists(_op, min_size=1, max_size=2),
                                                              min_size=3, max_size=3))
def test_dpor_reaches_every_outcome_brute_force_does(program):
    expected, runs = all_outcomes(program)
    got, executions = dpor_outcomes(program)
    assert got == expected
    assert executions <= runs


def test_independent_tasks_take_one_execution():
    assert dpor_outcomes([[("x", True)], [("y", True)], [("z", True)]])[1] == 1


def test_conflicting_writers_take_one_execution_per_order():
    outcomes, executions = dpor_outcomes([[("x", True)], [("x", True)], [("x", True)]])
    assert len(outcomes) == 6 and executions == 6


def test_readers_commute():
    assert dpor_outcomes([[("x", False)], [("x", False)], [("x", False)]])[1] == 1


def test_critical_sections_under_one_lock_are_ordered_both_ways():
    outcomes, executions = dpor_outcomes([[("lock", "A"), ("x", True), ("unlock", "A")],
                                          [("lock", "A"), ("x", True), ("unlock", "A")]])
    assert len(outcomes) == 2 and executions >= 2


def test_footprint_dependence():
    assert footprint.dependent({1: True}, {1: False})
    assert not footprint.dependent({1: False}, {1: False})
    assert not footprint.dependent({1: True}, {2: True})
    assert footprint.dependent({footprint.GLOBAL: True}, {5: False})
    assert not footprint.dependent({footprint.GLOBAL: True}, {})


# -- the kernel scenarios ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["retract-vs-zap", "retract-vs-reader", "mremap-vs-retract"])
def test_dpor_exhausts_the_fixed_twin_clean(name):
    result = explore_dpor(get_spec(name), 2000, None, "x86_64", "6.6", ())
    assert result.exhausted and result.outcome is None
    assert result.schedules < 2000


@pytest.mark.parametrize("name,bug,kernel", [
    ("retract-vs-zap", "walker_ignores_map_failure", "6.6"),
    ("retract-vs-reader", "retract_without_pte_free_defer", "6.6"),
    ("mremap-vs-retract", "move_normal_pmd_without_recheck", "6.6"),
    ("swapoff-vs-exit", "free_swap_and_cache_without_get_swap_device", "6.6"),
    ("gup-fast-vs-collapse", "gup_fast_without_pmd_recheck", "6.6"),
    ("retract-vs-uffdio-copy", "retract_without_anon_vma_recheck", "6.6"),
    ("retract-vs-exit", "retract_without_exit_test", "5.10"),
])
def test_dpor_finds_the_injected_bug(name, bug, kernel):
    result = explore_dpor(get_spec(name), 3000, None, "x86_64", kernel, (bug,))
    assert result.outcome is not None, f"{bug}: {result.schedules} executions, exhausted={result.exhausted}"
    portfolio = explore(get_spec(name), "portfolio", 3000, seed=1, kernel=kernel, inject=(bug,))
    assert result.outcome.finding.signature == portfolio.outcome.finding.signature


def test_dpor_needs_fewer_executions_than_bounded_dfs():
    """Both cover every schedule with up to one preemption; DPOR covers them all."""
    spec = get_spec("retract-vs-zap")
    dfs = explore_dfs(spec, 1, 100_000, None, "x86_64", "6.6", ())
    dpor = explore_dpor(spec, 100_000, None, "x86_64", "6.6", ())
    assert dpor.exhausted
    assert dpor.schedules < dfs.schedules


@pytest.mark.parametrize("name", ["retract-vs-zap", "retract-vs-uffdio-copy", "swapoff-vs-exit",
                                  "gup-fast-vs-collapse", "mincore-vs-retract"])
def test_commutation_audit_is_clean(name):
    result = audit_commutation(get_spec(name), runs=6, seed=3)
    assert result.pairs > 0
    assert result.problems == []


def test_the_audit_catches_a_missing_dependency(monkeypatch):
    """Forget what the allocator and RAM tell: the audit must notice."""
    monkeypatch.setattr(footprint, "recording", lambda physmem: None)
    result = audit_commutation(get_spec("retract-vs-zap"), runs=6, seed=3)
    assert result.problems


def test_cli_dpor():
    def emu(*args):
        return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                              timeout=300)
    r = emu("explore", "retract-vs-zap", "--strategy", "dpor", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["exhausted"] is True and out["findings"] == []
    r = emu("explore", "retract-vs-zap", "--strategy", "dpor", "--inject", "walker_ignores_map_failure",
            "--json")
    assert r.returncode == 1, r.stderr
    found = json.loads(r.stdout)["findings"][0]
    assert found["signature"].startswith("UAF") and found["found_by"] == "dpor"
    r = emu("explore", "retract-vs-zap", "--strategy", "dpor")
    assert r.returncode == 0 and "every interleaving" in r.stdout
    r = emu("explore", "guest-collapse-race", "--strategy", "dpor")
    assert r.returncode == 2 and "guest program" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_dpor_on_every_arch(arch):
    spec = get_spec("retract-vs-zap")
    clean = explore_dpor(spec, 3000, None, arch, "6.6", ())
    assert clean.exhausted and clean.outcome is None
    found = explore_dpor(spec, 3000, None, arch, "6.6", ("walker_ignores_map_failure",))
    assert found.outcome.finding.signature.startswith("UAF:pagetable")


def test_dpor_is_deterministic_and_replayable():
    spec = get_spec("mremap-vs-retract")
    a = explore_dpor(spec, 3000, None, "x86_64", "6.6", ("move_normal_pmd_without_recheck",))
    b = explore_dpor(spec, 3000, None, "x86_64", "6.6", ("move_normal_pmd_without_recheck",))
    assert (a.schedules, a.outcome.schedule.encode()) == (b.schedules, b.outcome.schedule.encode())
    again = replay(a.outcome.schedule)
    assert again.finding.signature == a.outcome.finding.signature


def test_every_interleaving_of_the_6_6_rules_is_clean_and_6_4_lockless_retraction_is_not():
    spec = get_spec("retract-vs-reader")
    assert explore_dpor(spec, 3000, None, "x86_64", "6.6", ()).exhausted
    old = explore_dpor(spec, 3000, None, "x86_64", "6.4", ("retract_without_mmap_lock",))
    assert old.outcome is not None and old.outcome.finding.signature.startswith("UAF")
