"""The race explorer: injected historical bugs are found, shrunk, certified and replayed;
their fixed twins run clean; everything is deterministic."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

from emu import explore as ex
from emu.scenarios import BUG_KERNELS, BUGS, SCENARIOS
from emu.sched.schedule import Schedule, ScheduleFormatError
from emu.sched.strategy import PCT, Divergence, RandomWalk, Replay

CASES = [(name, bug, BUG_KERNELS.get(bug, "6.6"))
         for name, spec in SCENARIOS.items() for bug in spec.catches]


def test_every_injectable_bug_has_a_scenario() -> None:
    assert {bug for _, bug, _ in CASES} == set(BUGS)


@pytest.mark.parametrize("scenario, bug, kernel", CASES)
def test_injected_bug_is_found_shrunk_certified_and_replayed(scenario: str, bug: str, kernel: str) -> None:
    spec = SCENARIOS[scenario]
    result = ex.explore(spec, budget=400, seed=1, kernel=kernel, inject=(bug,))
    assert result.outcome is not None, f"{bug} not found in 400 schedules"
    small = ex.shrink(spec, result.outcome)
    small, certified, _ = ex.certify(spec, small)
    assert certified is True and small.preemptions <= result.outcome.preemptions
    assert small.finding.signature == result.outcome.finding.signature
    decoded = Schedule.decode(small.schedule.encode())
    for _ in range(3):                                       # replays: same signature, same events
        again = ex.replay(decoded)
        assert again.finding.signature == small.finding.signature
        assert again.digest == decoded.digest


KERNEL_SCENARIOS = [n for n, s in SCENARIOS.items() if not n.startswith("guest-")]
# scenarios whose schedules are long (ksmd scanning two PMD extents page by page: ~5 000
# steps a schedule) get a smaller budget here; benchmarks/explore.py --full-clean runs
# every twin for 10 000
TWIN_BUDGET = {"ksm-scan-vs-pt-reclaim": 40}


@pytest.mark.parametrize("scenario", KERNEL_SCENARIOS)
def test_fixed_twin_runs_clean_under_the_portfolio(scenario: str) -> None:
    """Under the scenario's own kernel (6.6, or 6.14 for the PT_RECLAIM races)."""
    spec = SCENARIOS[scenario]
    budget = TWIN_BUDGET.get(scenario, 150)
    result = ex.explore(spec, budget=budget, seed=7, kernel=spec.kernel)
    assert result.outcome is None and result.schedules == budget


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_guest_collapse_race_runs_clean_on_four_vcpus_under_the_portfolio(arch: str) -> None:
    """Three guest threads on four vCPUs, khugepaged and rcu_gp, scheduled by PCT and
    random walks; the guest checks its own data and check_mm checks the kernel's."""
    result = ex.explore(SCENARIOS["guest-collapse-race"], budget=2, seed=3, arch=arch)
    assert result.outcome is None and result.schedules == 2


def test_profile_64_with_lockless_retraction_is_caught_and_66_is_clean() -> None:
    spec = SCENARIOS["retract-vs-reader"]
    bad = ex.explore(spec, budget=300, seed=2, kernel="6.4", inject=("retract_without_mmap_lock",))
    assert bad.outcome is not None and bad.outcome.finding.sanitizer == "KASAN"
    assert ex.explore(spec, budget=150, seed=2, kernel="6.6", inject=("retract_without_mmap_lock",)).outcome \
        is None


def test_retract_without_exit_test_is_caught_only_with_the_lockless_exit_of_510() -> None:
    """18e77600f7a1: the exit test matters while exit_mmap() runs without mmap_lock (5.10).
    The fixed 5.10 kernel runs clean; so does the injection under 6.4 and 6.6, where
    exit_mmap() holds mmap_lock (64591e8605d6, 5.17)."""
    spec = SCENARIOS["retract-vs-exit"]
    bad = ex.explore(spec, budget=100, seed=3, kernel="5.10", inject=("retract_without_exit_test",))
    assert bad.outcome is not None and bad.outcome.finding.signature == "UAF:pagetable:read:zap_pte_range"
    fixed = ex.explore(spec, budget=80, seed=3, kernel="5.10")
    assert fixed.outcome is None and fixed.schedules == 80
    for kernel in ("6.4", "6.6"):
        clean = ex.explore(spec, budget=40, seed=3, kernel=kernel, inject=("retract_without_exit_test",))
        assert clean.outcome is None and clean.schedules == 40


def test_the_same_seed_gives_the_same_result() -> None:
    spec = SCENARIOS["retract-vs-zap"]
    runs = [ex.explore(spec, budget=300, seed=5, inject=("walker_ignores_map_failure",)) for _ in range(2)]
    a, b = (r.outcome for r in runs)
    assert a is not None
    assert (a.schedule.encode(), runs[0].found_after) == (b.schedule.encode(), runs[1].found_after)


def test_a_run_is_a_pure_function_of_its_schedule() -> None:
    spec = SCENARIOS["collapse-vs-uffdio-copy"]
    first = ex.execute(spec, RandomWalk(seed=11))
    tids = ex._tids_of(spec, first.schedule, ())
    again = ex.execute(spec, Replay([tids[n] for n in first.schedule.picks()]))
    assert (again.digest, again.steps, again.finding) == (first.digest, first.steps, first.finding)


def test_replay_reports_the_first_divergence() -> None:
    spec = SCENARIOS["retract-vs-reader"]
    with pytest.raises(Divergence, match="diverged at step 0"):
        ex.execute(spec, Replay([99]))


def test_pct_is_deterministic_for_a_seed() -> None:
    spec = SCENARIOS["retract-vs-refault"]
    assert ex.execute(spec, PCT(3, 2, 40)).digest == ex.execute(spec, PCT(3, 2, 40)).digest


# -- schedules -----------------------------------------------------------------------------

@given(st.lists(st.sampled_from(["rcu_gp", "walker", "retract", "a:b"]), max_size=60))
def test_schedule_round_trips(picks: list[str]) -> None:
    s = Schedule.from_picks(picks, scenario="x", kernel="6.13", arch="s390x", inject="a,b", digest="d")
    back = Schedule.decode(s.encode())
    assert back.picks() == picks and (back.scenario, back.kernel, back.arch, back.inject) == ("x", "6.13",
                                                                                             "s390x", "a,b")
    assert sum(n for _, n in s.runs) == len(picks)


@pytest.mark.parametrize("text", ["", "mmx1.abc", "emu1.!!!", "emu1.kQ", "emu1." + "A" * 40])
def test_bad_schedules_are_rejected_with_a_reason(text: str) -> None:
    with pytest.raises(ScheduleFormatError):
        Schedule.decode(text)


# -- the commands ----------------------------------------------------------------------------

def emu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_explore_command_reports_a_finding_and_replay_reproduces_it(tmp_path) -> None:
    report = tmp_path / "finding.json"
    r = emu("explore", "retract-vs-reader", "--inject", "pte_offset_map_without_rcu", "--json",
            "--report", str(report))
    assert r.returncode == 1, r.stderr
    j = json.loads(r.stdout)
    assert {"scenario", "schedules", "seconds", "findings"} <= j.keys()
    f = j["findings"][0]
    assert {"signature", "sanitizer", "schedule", "preemptions"} <= f.keys()
    assert f["sanitizer"] == "KASAN" and f["preemptions"] == 1 and f["certified_minimal"] is True
    assert json.loads(report.read_text())["findings"][0]["signature"] == f["signature"]
    r = emu("replay", f["schedule"], "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == {
        "scenario": "retract-vs-reader", "finding": f["signature"], "digest_matches": True,
        "steps": json.loads(r.stdout)["steps"]}


def test_explore_command_exit_codes() -> None:
    assert emu("explore", "retract-vs-refault", "--budget", "20").returncode == 0
    for args in (["no-such-scenario"], ["retract-vs-reader", "--inject", "nope"],
                 ["retract-vs-reader", "--strategy", "psychic"]):
        r = emu("explore", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
    r = emu("explore", "--list")
    assert r.returncode == 0 and all(name in r.stdout for name in list(SCENARIOS) + list(BUGS))
    r = emu("replay", "emu1.nonsense")
    assert r.returncode == 2 and "corrupt schedule" in r.stderr


def test_explore_runs_an_injected_bug_under_its_own_kernel_unless_told_otherwise() -> None:
    r = emu("explore", "retract-vs-reader", "--inject", "retract_without_mmap_lock", "--json", "--no-shrink")
    assert r.returncode == 1 and json.loads(r.stdout)["kernel"] == "6.4"
    assert "note: kernel 6.4, the one retract_without_mmap_lock lives in" in r.stderr
    r = emu("explore", "retract-vs-reader", "--inject", "retract_without_mmap_lock", "--kernel", "6.6",
            "--budget", "20", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["kernel"] == "6.6"
    assert "is a 6.4 bug; under kernel 6.6" in r.stderr
    r = emu("explore", "retract-vs-reader", "--inject", "retract_without_mmap_lock",
            "--inject", "move_ptes_without_pmd_same")
    assert r.returncode == 2 and "live in different kernels" in r.stderr and "Traceback" not in r.stderr
    r = emu("explore", "mincore-vs-dontneed-reclaim", "--budget", "5", "--json")     # a 6.14 race
    assert SCENARIOS["mincore-vs-dontneed-reclaim"].kernel == "6.14"
    assert r.returncode == 0 and json.loads(r.stdout)["kernel"] == "6.14"
    assert "note: kernel 6.14, the scenario's own" in r.stderr


def test_workers_do_not_change_the_result() -> None:
    spec = SCENARIOS["retract-vs-zap"]
    one = ex.explore(spec, budget=200, seed=5, inject=("walker_ignores_map_failure",), workers=1)
    two = ex.explore(spec, budget=200, seed=5, inject=("walker_ignores_map_failure",), workers=2)
    assert one.outcome is not None
    assert one.found_after == two.found_after
    assert one.outcome.schedule.encode() == two.outcome.schedule.encode()


def test_data_choices_come_from_the_strategy_and_replay() -> None:
    from emu.scenario import Scenario
    from emu.sched import traps

    async def chooser():
        return [await traps.choose(5, "demo") for _ in range(6)]

    first = Scenario(mem="4M", strategy=RandomWalk(seed=4))
    first.task("c", chooser())
    first.run()
    values = first.results["c"]
    assert [v for _, _, v in first.sched.data_log] == values and len(set(values)) > 1
    again = Scenario(mem="4M", strategy=Replay(first.sched.picks, data=values))
    again.task("c", chooser())
    again.run()
    assert again.results["c"] == values
    s = Schedule.from_picks(["c"] * 3, scenario="x", data=values)
    assert Schedule.decode(s.encode()).data == values and "[data" in s.text()


def test_dfs_finds_the_bug_with_the_fewest_preemptions_and_the_fixed_kernel_is_clean() -> None:
    """Preemption-bounded depth-first search (CHESS) is systematic: its first finding has
    the lowest preemption count there is, and replay reproduces it."""
    spec = SCENARIOS["retract-vs-reader"]
    bug = "retract_without_pte_free_defer"
    found = ex.explore(spec, "dfs:1", budget=300, inject=(bug,))
    assert found.outcome is not None and found.outcome.preemptions <= 1
    assert found.found_by.startswith("dfs(pb=")
    assert ex.replay(Schedule.decode(found.outcome.schedule.encode())).finding.signature \
        == found.outcome.finding.signature
    clean = ex.explore(spec, "dfs:1", budget=120)
    assert clean.outcome is None and clean.schedules > 0


@pytest.mark.parametrize("scenario", ["mremap-move-ptes", "retract-vs-refault", "mremap-vs-retract"])
def test_rw_nolock_callers_keep_their_contract_under_613(scenario: str) -> None:
    """Under 6.13 move_ptes and handle_pte_fault map with pte_offset_map_rw_nolock(); the
    walker-contract check watches that they recheck under the ptl before writing."""
    result = ex.explore(SCENARIOS[scenario], budget=80, seed=4, kernel="6.13")
    assert result.outcome is None and result.schedules == 80


@pytest.mark.parametrize("scenario, kernel", [("uffd-move-vs-folio-lock", "6.8"),
                                              ("uffd-move-vs-folio-lock", "6.13"),
                                              ("uffd-move-vs-pt-reclaim", "6.14")])
def test_uffd_move_twins_run_clean_where_uffdio_move_exists(scenario: str, kernel: str) -> None:
    """UFFDIO_MOVE exists from 6.8 (pte_offset_map_nolock), in 6.13 (_rw_nolock, under the
    walker contract) and in 6.14 (with PT_RECLAIM freeing tables under it, and the dst
    pmd_same recheck): with the 2025 fixes its retries keep every map balanced, the racing
    reclaim's rmap walk finds the moved page, no pte lands in a freed table; under the
    default 6.6 the ioctl is -EINVAL (the generic twin test above)."""
    result = ex.explore(SCENARIOS[scenario], budget=60, seed=7, kernel=kernel)
    assert result.outcome is None and result.schedules == 60


def test_the_uffd_wp_marker_window_of_the_66_model_replays() -> None:
    """The one finding of --full-clean in a fixed twin (docs/explore.md): UFFDIO_WRITEPROTECT's
    change_pmd_prepare() sees the table, retract_page_tables() (past its uffd-wp recheck)
    clears the pmd, and change_pmd_range()'s pmd_none() test skips the markers. The schedule
    replays to it exactly; if the model changes here, this test says so."""
    sched = Schedule.decode(
        "emu1.mwG7cmV0cmFjdC12cy11ZmZkLXdwLXJlZ2lzdGVyozYuNqZ4ODZfNjSgk6praHVnZXBhZ2Vkp3JldHJhY3Sk"
        "dWZmZJoAAgEIAgoBBQIPsDdlMDAxZTAyNTk5MWEwY2a2cmFuZG9tKHN0aWNraW5lc3M9MC41KQCQ")
    out = ex.replay(sched)
    assert out.finding is not None and out.finding.signature == "ORACLE:uffd-wp-lost"
    assert out.preemptions == 2
