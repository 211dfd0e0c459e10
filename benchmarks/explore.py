"""The race explorer's speed: schedules/s, time to first detection, determinism, clean runs.

    python benchmarks/explore.py [--quick] [--json] [--seeds N] [--budget N]
                                 [--detect-budget N] [--strategies S,S] [--scenarios A,B]
    python benchmarks/explore.py --full-clean [--clean-budget N]     # only the clean check
    python benchmarks/explore.py --throughput [--scenarios A,B]      # only section 1
    python benchmarks/explore.py --profile SCENARIO [--budget N]     # cProfile, top functions
    python benchmarks/explore.py --dpor [--dpor-budget N] [--dpor-seconds T]   # only section 5

Sections (the default run does 1-3; --full-clean does only 4):

  1 throughput   each small scenario's fixed twin (kernel 6.6, nothing injected) under the
                 default portfolio for --budget schedules (default 500): schedules/s in one
                 process (the verdict) and with explore(workers=--workers); then where a
                 schedule's time goes: the real execute() with its phases wrapped and timed
                 (machine + RAM, world build, run, teardown and audit, close, other).
                 Target: >= 2000 schedules/s on the small scenarios.
  2 detection    every (scenario, injectable bug) pair, every strategy (portfolio, pct:1-3,
                 random:0.5, random:0.9), --seeds seeds (default 10, seeds 0..N-1), each an
                 explore() with --detect-budget schedules (default 2000): how many seeds found
                 the bug, median and max time to the first detection in seconds and schedules.
                 A seed that found nothing counts as "more than the budget" (so a median is a
                 miss when half the seeds or more missed). Target: portfolio median < 10 s.
  3 determinism  every bug, the portfolio run twice with the same seed, against section 2's
                 run of that seed and with --workers processes: the found schedule
                 (Schedule.encode()), found_after, found_by and the signature must be
                 identical; the schedule must replay to the same signature.
  4 full clean   every fixed twin for --clean-budget schedules (default 10000): the 6.6 rules
                 for every scenario, plus the scenario under the bug's kernel for each bug
                 that needs another one (retract-vs-reader under 6.4 for
                 retract_without_mmap_lock, ...). Target: no finding.

  5 dpor         (--dpor only) every scenario's fixed twin under DPOR (emu/sched/dpor.py) until
                 it has run every trace class or spent --dpor-budget executions (default
                 20000) or --dpor-seconds (default 60): executions, seconds, whether it
                 finished ("exhausted"), against bounded DFS with <= 1 and <= 2 preemptions
                 under the same caps (which cover less); every (scenario, bug) pair under
                 DPOR: found or not, executions and seconds to the finding; and the
                 commutation audit (5 random schedules each: adjacent independent steps
                 swapped, the run must not change). Target: every bug found, every audit
                 clean, and an exhausted twin means no finding in any interleaving.

Bugs run under kernel 6.6, except those in emu.scenarios.BUG_KERNELS (retract_without_mmap_lock:
6.4 rules + lockless retraction; move_ptes_without_pmd_same: 6.13).
Times are wall-clock on this VM (2 vCPUs, shared with other jobs): read differences under
~20 % as noise. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from emu import explore as ex  # noqa: E402
from emu import scenarios as scenarios_mod  # noqa: E402
from emu.physmem import PhysMem  # noqa: E402
from emu.scenario import Scenario  # noqa: E402
from emu.scenarios import BUGS, PROFILE_BUGS, SCENARIOS  # noqa: E402
from emu.sched.schedule import Schedule  # noqa: E402

STRATEGIES = ("portfolio", "pct:1", "pct:2", "pct:3", "random:0.5", "random:0.9")
TARGET_RATE = 2000.0          # schedules/s
TARGET_DETECT = 10.0          # seconds, portfolio median
ARCH = "x86_64"
PHASES = ("world", "run", "teardown", "close", "other")


# the small scenarios: kernel tasks only, one vCPU, no prefaulted RAM (a guest-program scenario
# such as guest-collapse-race runs a whole ELF on several vCPUs, ~1 s a schedule)
SMALL = [name for name, spec in SCENARIOS.items() if not spec.guest]


# bugs that exist only under another kernel profile than 6.6 (emu.scenarios.BUG_KERNELS when
# the tree has it)
BUG_KERNELS: dict[str, str] = getattr(scenarios_mod, "BUG_KERNELS", {"retract_without_mmap_lock": "6.4"})


def kernel_for(bug: str) -> str:
    return BUG_KERNELS.get(bug, "6.6")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pairs(scenarios: list[str]) -> list[tuple[str, str, str]]:
    """(scenario, bug, kernel) for every bug a chosen scenario catches."""
    return [(name, bug, kernel_for(bug)) for name in scenarios for bug in SCENARIOS[name].catches]


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


# -- 1. throughput --------------------------------------------------------------------------

def split_execute(spec, strategy, kernel: str, times: dict[str, float]):
    """The real emu.explore.execute(), with its phases timed: world_for (the world: restored
    from the scenario's snapshot, or built and snapshotted the first time), the scheduler's
    run, _teardown and Scenario.close are wrapped for this one call; "other" is the rest of
    execute() (digest, finding handling, the Schedule record)."""
    before = sum(times.values())
    orig_world_for, orig_teardown = ex.world_for, ex._teardown

    def add(phase: str, t0: float) -> None:
        times[phase] += time.perf_counter() - t0

    def timed_world_for(*a, **kw):
        t0 = time.perf_counter()
        sc, world = orig_world_for(*a, **kw)
        add("world", t0)
        run, close = sc.sched.run, sc.close

        def timed_run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return run(*a, **kw)
            finally:
                add("run", t0)

        def timed_close() -> None:
            t0 = time.perf_counter()
            try:
                close()
            finally:
                add("close", t0)
        sc.sched.run, sc.close = timed_run, timed_close
        return sc, world

    def timed_teardown(sc, world) -> None:
        t0 = time.perf_counter()
        try:
            orig_teardown(sc, world)
        finally:
            add("teardown", t0)

    ex.world_for, ex._teardown = timed_world_for, timed_teardown
    try:
        t0 = time.perf_counter()
        out = ex.execute(spec, strategy, ARCH, kernel)
        total = time.perf_counter() - t0
    finally:
        ex.world_for, ex._teardown = orig_world_for, orig_teardown
    times["other"] += total - (sum(times.values()) - before)
    return out


def physmem_cost(size: int, prefault: bool, n: int = 50) -> tuple[float, float]:
    """Seconds to create and to close one guest RAM of ``size`` bytes, as the scenario
    makes it (MAP_POPULATE only for a prefaulted one)."""
    new = close = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        mem = PhysMem(size, False, prefault)
        t1 = time.perf_counter()
        mem.close()
        new, close = new + t1 - t0, close + time.perf_counter() - t1
    return new / n, close / n


def throughput(scenarios: list[str], budget: int, split_budget: int, workers: int) -> list[dict[str, Any]]:
    rows = []
    for name in scenarios:
        spec = SCENARIOS[name]
        ex.explore(spec, budget=5, seed=99)                               # warm-up
        r = ex.explore(spec, strategy="portfolio", budget=budget, seed=0, kernel="6.6")
        rate = r.schedules / r.seconds
        rate_w = None
        if workers > 1:
            rw = ex.explore(spec, strategy="portfolio", budget=budget, seed=0, kernel="6.6", workers=workers)
            rate_w = rw.schedules / rw.seconds
        # schedules of the same portfolio stream (seed 0) again, timed phase by phase
        times = dict.fromkeys(PHASES, 0.0)
        steps: list[int] = []
        gen = ex.strategies("portfolio", 0, steps)
        split_findings = 0
        t0 = time.perf_counter()
        for _ in range(split_budget):
            _, strat = next(gen)
            out = split_execute(spec, strat, "6.6", times)
            steps.append(out.steps)
            split_findings += out.finding is not None
        split_total = time.perf_counter() - t0
        sc = Scenario(arch=ARCH, kernel="6.6", mem=spec.mem, cpus=spec.cpus, quantum=spec.quantum,
                      prefault=spec.prefault)
        ram_bytes = sc.machine.ram.size
        sc.close()
        ram_new, ram_close = physmem_cost(ram_bytes, spec.prefault)
        rows.append({
            "scenario": name, "schedules": r.schedules, "seconds": r.seconds, "rate": rate,
            "workers": workers, "rate_workers": rate_w,
            "clean": r.outcome is None,
            "finding": None if r.outcome is None else r.outcome.finding.signature,
            "split_schedules": split_budget, "split_seconds": split_total,
            "split_findings": split_findings,
            "us_per_schedule": 1e6 * r.seconds / r.schedules,
            "split_us": {k: 1e6 * v / split_budget for k, v in times.items()},
            "steps_mean": statistics.mean(steps),
            "ram_bytes": ram_bytes, "prefault": spec.prefault,
            "ram_new_us": 1e6 * ram_new, "ram_close_us": 1e6 * ram_close,
            "target_met": rate >= TARGET_RATE,
        })
        log(f"throughput {name}: {rate:.0f} schedules/s")
    return rows


def print_throughput(rows: list[dict[str, Any]], budget: int) -> None:
    print(f"1. THROUGHPUT: fixed twins (kernel 6.6, nothing injected), portfolio, seed 0, "
          f"{budget} schedules")
    workers = rows[0]["workers"] if rows else 1
    print(f"{'scenario':<24} {'sched':>5} {'secs':>5} {'sched/s':>7} {f'w={workers} /s':>8} {'us/sch':>6} "
          f"{'steps':>5} {'us/st':>5} {'clean':>5}  target >= {TARGET_RATE:.0f}/s")
    for r in rows:
        clean = "yes" if r["clean"] else "NO"
        verdict = "MET" if r["target_met"] else f"NOT MET ({r['rate'] / TARGET_RATE:.0%})"
        rw = "-" if r["rate_workers"] is None else f"{r['rate_workers']:.0f}"
        print(f"{r['scenario']:<24} {r['schedules']:>5} {r['seconds']:>5.2f} {r['rate']:>7.0f} {rw:>8} "
              f"{r['us_per_schedule']:>6.0f} {r['steps_mean']:>5.1f} "
              f"{r['us_per_schedule'] / r['steps_mean']:>5.0f} {clean:>5}  {verdict}")
        if not r["clean"]:
            print(f"    FINDING on a fixed twin: {r['finding']}")
    n = rows[0]["split_schedules"] if rows else 0
    print(f"   sched/s: one process (the verdict); w={workers} /s: explore(workers={workers}), the same")
    print("   schedules; us/sch: microseconds a schedule; steps: mean scheduler steps a schedule;")
    print("   us/st = us/sch / steps")
    print()
    print(f"   where a schedule's time goes, us/schedule by phase ({n} schedules of the same "
          "portfolio stream):")
    print(f"{'scenario':<23} " + " ".join(f"{p:>8}" for p in PHASES)
          + f" {'total':>7} {'RAMnew':>6} {'RAMcls':>6}")
    for r in rows:
        s = r["split_us"]
        total = sum(s.values())
        print(f"{r['scenario']:<23} " + " ".join(f"{s[p]:>8.0f}" for p in PHASES)
              + f" {total:>7.0f} {r['ram_new_us']:>6.0f} {r['ram_close_us']:>6.0f}")
        print(f"{'':<23} " + " ".join(f"{s[p] / total:>8.0%}" for p in PHASES))
        if r["split_findings"]:
            print(f"    ({r['split_findings']} of these schedules ended in a finding)")
    print("   world = explore.world_for(): the scenario's world restored from its snapshot (built")
    print("   and snapshotted by the first schedule: Machine, kernel, RAM, kthreads, spec.build);")
    print("   run = the scheduler; teardown = exit_mm, close files, rcu_barrier, leak audit; close =")
    print("   dropping coroutines, giving the RAM back; other = the rest of execute() (digest,")
    print("   Schedule record). RAMnew / RAMcls = creating / closing a PhysMem of the scenario's")
    print("   size alone (part of world / close; MAP_POPULATE only if the scenario prefaults)")
    print()


# -- 2. detection ---------------------------------------------------------------------------

def schedule_hash(outcome) -> str:
    return hashlib.sha256(outcome.schedule.encode().encode()).hexdigest()[:12]


def one_search(spec, strategy: str, budget: int, seed: int, kernel: str, bug: str,
               workers: int = 1) -> dict[str, Any]:
    r = ex.explore(spec, strategy=strategy, budget=budget, seed=seed, kernel=kernel, inject=(bug,),
                   workers=workers)
    found = r.outcome is not None
    return {
        "seed": seed, "found": found, "schedules": r.schedules, "seconds": r.seconds,
        "found_after": r.found_after if found else None, "found_by": r.found_by if found else None,
        "signature": r.outcome.finding.signature if found else None,
        "schedule_hash": schedule_hash(r.outcome) if found else None,
        "encoded": r.outcome.schedule.encode() if found else None,
    }


def summarize(runs: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Median/max over all seeds, a miss counting as +inf (more than the budget)."""
    inf = float("inf")
    secs = [r["seconds"] if r["found"] else inf for r in runs]
    scheds = [r["found_after"] if r["found"] else inf for r in runs]
    miss_secs = [r["seconds"] for r in runs if not r["found"]]
    total_s = sum(r["seconds"] for r in runs)
    return {
        "found": sum(r["found"] for r in runs), "seeds": len(runs),
        "median_s": statistics.median(secs), "max_s": max(secs),
        "median_sched": statistics.median(scheds), "max_sched": max(scheds),
        "longest_miss_s": max(miss_secs, default=None),
        "rate": sum(r["schedules"] for r in runs) / total_s if total_s else 0.0,
        "by": dict(Counter(r["found_by"] for r in runs if r["found"])),
        "signatures": dict(Counter(r["signature"] for r in runs if r["found"])),
        "budget": budget,
    }


def detection(todo: list[tuple[str, str, str]], strategies: list[str], seeds: int,
              budget: int) -> list[dict[str, Any]]:
    cells = []
    for name, bug, kernel in todo:
        spec = SCENARIOS[name]
        for strat in strategies:
            t0 = time.perf_counter()
            runs = [one_search(spec, strat, budget, seed, kernel, bug) for seed in range(seeds)]
            s = summarize(runs, budget)
            cells.append({"scenario": name, "bug": bug, "kernel": kernel, "strategy": strat,
                          "runs": runs, **s})
            log(f"detection {name} {bug} {strat}: {s['found']}/{seeds} found "
                f"({time.perf_counter() - t0:.1f} s)")
    return cells


def _med(x: float, budget: int, secs: bool, miss: float | None = None) -> str:
    if x == float("inf"):
        if secs:
            return f">{miss:.1f}" if miss is not None else "miss"
        return f">{budget}"
    return fmt_s(x) if secs else f"{x:.0f}"


def print_detection(cells: list[dict[str, Any]], seeds: int, budget: int) -> None:
    print(f"2. DETECTION: time to the first finding, {seeds} seeds (0..{seeds - 1}), budget {budget} "
          "schedules a seed")
    print("   a miss counts as more than the budget; '>X' for seconds = the longest search that")
    print("   found nothing; sched/s = all schedules of the cell / all its seconds")
    key = None
    for c in cells:
        if (c["scenario"], c["bug"]) != key:
            key = (c["scenario"], c["bug"])
            sigs = ", ".join(c2 for c2 in sorted({s for d in cells if (d["scenario"], d["bug"]) == key
                                                  for s in d["signatures"]}))
            print()
            print(f"{c['bug']}  on {c['scenario']}, kernel {c['kernel']}")
            print(f"   signature(s): {sigs or '-'}")
            print(f"   {'strategy':<11} {'found':>6} {'med s':>7} {'max s':>7} {'med #':>6} {'max #':>6} "
                  f"{'sched/s':>7}  found by (portfolio)")
        by = " ".join(f"{k} {v}" for k, v in sorted(c["by"].items(), key=lambda kv: -kv[1])) \
            if c["strategy"] == "portfolio" else ""
        print(f"   {c['strategy']:<11} {c['found']:>3}/{c['seeds']:<2} "
              f"{_med(c['median_s'], budget, True, c['longest_miss_s']):>7} "
              f"{_med(c['max_s'], budget, True, c['longest_miss_s']):>7} "
              f"{_med(c['median_sched'], budget, False):>6} {_med(c['max_sched'], budget, False):>6} "
              f"{c['rate']:>7.0f}  {by}".rstrip())
    print()


# -- 3. determinism -------------------------------------------------------------------------

def determinism(todo: list[tuple[str, str, str]], budget: int, seed: int,
                cells: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    rows = []
    for name, bug, kernel in todo:
        spec = SCENARIOS[name]
        a = one_search(spec, "portfolio", budget, seed, kernel, bug)
        b = one_search(spec, "portfolio", budget, seed, kernel, bug)
        w = one_search(spec, "portfolio", budget, seed, kernel, bug, workers) if workers > 1 else None
        earlier = next((r for c in cells if (c["scenario"], c["bug"], c["strategy"]) ==
                        (name, bug, "portfolio") for r in c["runs"] if r["seed"] == seed), None)
        fields = ("found", "found_after", "found_by", "signature", "encoded")
        same = all(a[f] == b[f] for f in fields)
        same_earlier = None if earlier is None else all(a[f] == earlier[f] for f in fields)
        same_workers = None if w is None else all(a[f] == w[f] for f in fields)
        replayed = None
        if a["found"]:
            out = ex.replay(Schedule.decode(a["encoded"]))
            replayed = out.finding is not None and out.finding.signature == a["signature"]
        rows.append({"scenario": name, "bug": bug, "kernel": kernel, "seed": seed, "a": a, "b": b,
                     "identical": same, "identical_to_detection_run": same_earlier,
                     "workers": workers, "identical_with_workers": same_workers,
                     "replay_same_signature": replayed})
        log(f"determinism {bug}: {'identical' if same else 'DIFFERENT'}")
    return rows


def print_determinism(rows: list[dict[str, Any]]) -> None:
    seed = rows[0]["seed"] if rows else 0
    print(f"3. DETERMINISM: portfolio, seed {seed}, run twice (and against section 2's run of "
          "that seed)")
    workers = rows[0]["workers"] if rows else 1
    print(f"{'bug':<41} {'found_after':>11} {'by':<10} {'schedule':<12} {'same':>4} {'as 2.':>5} "
          f"{f'w={workers}':>4} {'replay':>6}")

    def yn(v) -> str:
        return "-" if v is None else ("yes" if v else "NO")

    for r in rows:
        a, b = r["a"], r["b"]
        fa = f"{a['found_after']}/{b['found_after']}" if a["found"] else "not found"
        print(f"{r['bug']:<41} {fa:>11} {a['found_by'] or '-':<10} {a['schedule_hash'] or '-':<12} "
              f"{yn(r['identical']):>4} {yn(r['identical_to_detection_run']):>5} "
              f"{yn(r['identical_with_workers']):>4} {yn(r['replay_same_signature']):>6}")
    print("   found_after = run 1/run 2; schedule = sha256 of Schedule.encode(), first 12 hex;")
    print("   same = found, found_after, found_by, signature and encoded schedule all equal;")
    print(f"   w={workers} = the same with explore(workers={workers}) (schedules in {workers} processes);")
    print("   replay = emu.explore.replay() of the encoded schedule gives the same signature")
    print()


# -- 4. full clean --------------------------------------------------------------------------

def twins(scenarios: list[str]) -> list[tuple[str, str, str]]:
    """(scenario, kernel, why) for every fixed twin."""
    rows = [(name, SCENARIOS[name].kernel, f"{SCENARIOS[name].kernel} rules") for name in scenarios]
    rows += sorted({(name, kernel, f"twin of {bug}") for name, bug, kernel in pairs(scenarios)
                    if kernel != SCENARIOS[name].kernel})
    return rows


def full_clean(scenarios: list[str], budget: int) -> list[dict[str, Any]]:
    rows = []
    for name, kernel, why in twins(scenarios):
        spec = SCENARIOS[name]
        t0 = time.perf_counter()

        last = [0]

        def progress(n: int, name=name, kernel=kernel, t0=t0, last=last) -> None:
            if n // 1000 > last[0]:                  # explore() reports once per batch
                last[0] = n // 1000
                log(f"  clean {name} {kernel}: {n} schedules, {time.perf_counter() - t0:.0f} s")

        r = ex.explore(spec, strategy="portfolio", budget=budget, seed=0, kernel=kernel,
                       progress=progress)
        rows.append({
            "scenario": name, "kernel": kernel, "why": why, "schedules": r.schedules,
            "seconds": r.seconds, "rate": r.schedules / r.seconds, "clean": r.outcome is None,
            "finding": None if r.outcome is None else r.outcome.finding.title,
            "found_by": r.found_by or None, "found_after": r.found_after or None,
            "schedule": None if r.outcome is None else r.outcome.schedule.encode(),
        })
        log(f"clean {name} {kernel}: {'clean' if r.outcome is None else 'FINDING'}")
    return rows


def print_clean(rows: list[dict[str, Any]], budget: int) -> None:
    print(f"4. FULL CLEAN: every fixed twin, portfolio, seed 0, budget {budget} schedules")
    print(f"{'scenario':<24} {'kernel':<6} {'twin':<36} {'sched':>6} {'secs':>6} {'sched/s':>7}  result")
    for r in rows:
        res = "clean" if r["clean"] else f"FINDING after {r['found_after']} ({r['found_by']})"
        print(f"{r['scenario']:<24} {r['kernel']:<6} {r['why']:<36} {r['schedules']:>6} "
              f"{r['seconds']:>6.1f} {r['rate']:>7.0f}  {res}")
        if not r["clean"]:
            print(f"    {r['finding']}")
            print(f"    {r['schedule']}")
    print()


# -- 5. DPOR ---------------------------------------------------------------------------------

def dpor_section(scenarios: list[str], budget: int, seconds: float) -> dict[str, Any]:
    from emu.sched.dpor import Dpor
    twins_rows, bug_rows, audit_rows = [], [], []
    for name in scenarios:
        spec = SCENARIOS[name]
        search = Dpor()
        r = ex.explore_dpor(spec, budget, seconds, ARCH, spec.kernel, (), search=search)
        row = {"scenario": name, "kernel": spec.kernel, "executions": r.schedules, "seconds": r.seconds,
               "exhausted": r.exhausted, "sleep_blocked": search.blocked,
               "finding": None if r.outcome is None else r.outcome.finding.signature}
        for bound in (1, 2):
            d = ex.explore_dfs(spec, bound, budget, seconds, ARCH, spec.kernel, ())
            row[f"dfs{bound}"] = d.schedules
            row[f"dfs{bound}_done"] = d.schedules < budget and d.seconds <= seconds and d.outcome is None
        twins_rows.append(row)
        log(f"dpor {name}: {r.schedules} executions, exhausted={r.exhausted}")
        a = ex.audit_commutation(spec, runs=5, seed=0, arch=ARCH, kernel=spec.kernel)
        audit_rows.append({"scenario": name, "runs": a.runs, "pairs": a.pairs, "problems": a.problems[:3],
                           "clean": not a.problems})
    for name, bug, kernel in pairs(scenarios):
        r = ex.explore_dpor(SCENARIOS[name], budget, seconds, ARCH, kernel, (bug,))
        bug_rows.append({"scenario": name, "bug": bug, "kernel": kernel, "found": r.outcome is not None,
                         "executions": r.schedules, "seconds": r.seconds, "exhausted": r.exhausted,
                         "signature": None if r.outcome is None else r.outcome.finding.signature})
        log(f"dpor {name} {bug}: {'found' if r.outcome else 'MISSED'} after {r.schedules}")
    return {"budget": budget, "seconds": seconds, "twins": twins_rows, "bugs": bug_rows, "audit": audit_rows}


def print_dpor(out: dict[str, Any]) -> None:
    print(f"5. DPOR: fixed twins until exhausted (caps: {out['budget']} executions, {out['seconds']:.0f} s "
          "each), against bounded DFS under the same caps")
    print(f"{'scenario':<30} {'kernel':<6} {'dpor':>7} {'secs':>6} {'done':>5} {'blocked':>7} "
          f"{'dfs<=1':>8} {'dfs<=2':>8}  result")
    for r in out["twins"]:
        dfs = [f"{r[f'dfs{b}']}{'' if r[f'dfs{b}_done'] else '+'}" for b in (1, 2)]
        print(f"{r['scenario']:<30} {r['kernel']:<6} {r['executions']:>7} {r['seconds']:>6.1f} "
              f"{'yes' if r['exhausted'] else 'no':>5} {r['sleep_blocked']:>7} {dfs[0]:>8} {dfs[1]:>8}  "
              f"{r['finding'] or 'clean'}")
    print("  (dfs N+ = the cap ran out first)")
    print()
    print(f"{'scenario':<30} {'bug':<48} {'kernel':<6} {'execs':>6} {'secs':>6}  result")
    for r in out["bugs"]:
        res = r["signature"] if r["found"] else "MISSED (exhausted)" if r["exhausted"] else "not found (cap)"
        print(f"{r['scenario']:<30} {r['bug']:<48} {r['kernel']:<6} {r['executions']:>6} "
              f"{r['seconds']:>6.2f}  {res}")
    print()
    print(f"{'scenario':<30} {'runs':>4} {'pairs':>6}  commutation audit")
    for r in out["audit"]:
        print(f"{r['scenario']:<30} {r['runs']:>4} {r['pairs']:>6}  "
              f"{'clean' if r['clean'] else 'PROBLEMS: ' + '; '.join(r['problems'])}")
    print()


# -- summary --------------------------------------------------------------------------------

def targets(out: dict[str, Any]) -> list[str]:
    lines = []
    for r in out.get("throughput", []):
        extra = "" if r["rate_workers"] is None else \
            f"  ({r['rate_workers']:.0f} with {r['workers']} workers: " \
            f"{'MET' if r['rate_workers'] >= TARGET_RATE else 'NOT MET'})"
        lines.append(f"throughput {r['scenario']:<24} {r['rate']:>4.0f} sched/s >= {TARGET_RATE:.0f}: "
                     + ("MET" if r["target_met"] else "NOT MET") + extra)
    for c in out.get("detection", []):
        if c["strategy"] != "portfolio":
            continue
        med = c["median_s"]
        ok = med < TARGET_DETECT
        all_found = c["found"] == c["seeds"]
        lines.append(f"detect {c['bug']:<41} median {_med(med, c['budget'], True, c['longest_miss_s']):>6} s "
                     f"< {TARGET_DETECT:.0f} s: {'MET' if ok else 'NOT MET'}"
                     f"  ({c['found']}/{c['seeds']} seeds{'' if all_found else ' - SOME MISSED'})")
    for r in out.get("determinism", []):
        ok = (r["identical"] and r["identical_to_detection_run"] is not False
              and r["identical_with_workers"] is not False)
        verdict = "MET" if ok else "NOT MET"
        if ok and not r["a"]["found"]:
            verdict = "n/a (nothing found within the budget)"
        lines.append(f"same seed, same result {r['bug']:<41} {verdict}")
    for r in out.get("clean", []):
        ok = r["clean"] and r["schedules"] >= out["config"]["clean_budget"]
        lines.append(f"clean for {r['schedules']} {r['scenario']} ({r['kernel']}): "
                     + ("MET" if ok else "NOT MET"))
    dpor = out.get("dpor")
    if dpor:
        found = sum(r["found"] for r in dpor["bugs"])
        lines.append(f"dpor finds every injected bug: {found}/{len(dpor['bugs'])} "
                     + ("MET" if found == len(dpor["bugs"]) else "NOT MET"))
        clean = sum(r["clean"] for r in dpor["audit"])
        lines.append(f"commutation audit clean: {clean}/{len(dpor['audit'])} "
                     + ("MET" if clean == len(dpor["audit"]) else "NOT MET"))
        done = [r for r in dpor["twins"] if r["exhausted"]]
        lines.append(f"dpor exhausted {len(done)}/{len(dpor['twins'])} fixed twins within the caps; "
                     f"findings in exhausted twins: {sum(1 for r in done if r['finding'])}")
    return lines


def profile(name: str, budget: int) -> str:
    spec = SCENARIOS[name]
    ex.explore(spec, budget=5, seed=99)
    plain = ex.explore(spec, strategy="portfolio", budget=budget, seed=0)
    pr = cProfile.Profile()
    pr.enable()
    r = ex.explore(spec, strategy="portfolio", budget=budget, seed=0)
    pr.disable()
    buf = io.StringIO()
    buf.write(f"cProfile: {name}, portfolio, seed 0, {r.schedules} schedules in {r.seconds:.2f} s "
              f"profiled, {plain.seconds:.2f} s without the profiler\n")
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("cumulative").print_stats(30)
    st.sort_stats("tottime").print_stats(20)
    return buf.getvalue()


def commit() -> str:
    """HEAD of the repository, '+dirty' when emu/ or mm_core/ have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "emu", "mm_core", "arch_plugins"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small budgets and 2 seeds (< 60 s): a smoke test, not numbers to quote")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--seeds", type=int, help="seeds per (bug, strategy) (default 10; --quick 2)")
    ap.add_argument("--budget", type=int,
                    help="throughput: schedules per scenario (default 500; --quick 60); --profile: 200")
    ap.add_argument("--detect-budget", type=int,
                    help="detection: schedules per seed (default 2000; --quick 150)")
    ap.add_argument("--clean-budget", type=int, default=10_000, help="--full-clean: schedules per twin")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all six)")
    ap.add_argument("--scenarios", default=",".join(SMALL),
                    help="comma-separated (default: the small ones: kernel tasks, not guest programs)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="also measure explore(workers=N): throughput and determinism (default: CPUs)")
    ap.add_argument("--det-seed", type=int, default=0, help="seed of the determinism check (default 0)")
    ap.add_argument("--full-clean", action="store_true", help="only section 4: every fixed twin, full budget")
    ap.add_argument("--throughput", action="store_true", help="only section 1: schedules/s, time by phase")
    ap.add_argument("--dpor", action="store_true", help="only section 5: DPOR against bounded DFS")
    ap.add_argument("--dpor-budget", type=int, default=20_000, help="--dpor: executions per search")
    ap.add_argument("--dpor-seconds", type=float, default=60.0, help="--dpor: seconds per search")
    ap.add_argument("--profile", metavar="SCENARIO",
                    help="only cProfile --budget (200) schedules of one scenario")
    args = ap.parse_args(argv)

    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}: {', '.join(SCENARIOS)}")
    strategies = [s for s in args.strategies.split(",") if s]
    if args.profile:
        if args.profile not in SCENARIOS:
            ap.error(f"unknown scenario {args.profile!r}: {', '.join(SCENARIOS)}")
        print(profile(args.profile, args.budget or 200))
        return 0
    seeds = args.seeds or (2 if args.quick else 10)
    budget = args.budget or (60 if args.quick else 500)
    detect_budget = args.detect_budget or (150 if args.quick else 2000)
    split_budget = min(budget, 200)
    todo = pairs(scenarios)
    uncovered = sorted(set(BUGS) - {bug for _, bug, _ in pairs(list(SCENARIOS))})
    left_out = [name for name in SCENARIOS if name not in scenarios]

    out: dict[str, Any] = {"config": {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "arch": ARCH, "workers": args.workers, "seeds": seeds, "budget": budget,
        "detect_budget": detect_budget,
        "clean_budget": args.clean_budget, "strategies": strategies, "scenarios": scenarios,
        "quick": args.quick, "full_clean": args.full_clean, "profile_bugs": sorted(PROFILE_BUGS),
        "bugs_without_scenario": uncovered, "scenarios_left_out": left_out, "commit": commit()}}
    t_start = time.perf_counter()
    if args.full_clean:
        out["clean"] = full_clean(scenarios, args.clean_budget)
    elif args.dpor:
        out["dpor"] = dpor_section(scenarios, args.dpor_budget, args.dpor_seconds)
    else:
        out["throughput"] = throughput(scenarios, budget, split_budget, args.workers)
        if not args.throughput:
            out["detection"] = detection(todo, strategies, seeds, detect_budget)
            out["determinism"] = determinism(todo, detect_budget, args.det_seed, out["detection"],
                                             args.workers)
    out["targets"] = targets(out)
    out["config"]["wall_seconds"] = time.perf_counter() - t_start

    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"emu explorer benchmark: Python {out['config']['python']}, {out['config']['cpus']} CPUs, "
          f"arch {ARCH}, commit {out['config']['commit']}{', --quick' if args.quick else ''}")
    if left_out:
        print(textwrap.fill(f"scenarios not run (see --scenarios): {', '.join(left_out)}", 96,
                            subsequent_indent="    "))
    if uncovered:
        print(f"bugs no scenario catches (not measured): {', '.join(uncovered)}")
    print()
    if args.full_clean:
        print_clean(out["clean"], args.clean_budget)
    elif args.dpor:
        print_dpor(out["dpor"])
    else:
        print_throughput(out["throughput"], budget)
        if not args.throughput:
            print_detection(out["detection"], seeds, detect_budget)
            print_determinism(out["determinism"])
    print("TARGETS")
    for line in out["targets"]:
        print(f"  {line}")
    print(f"\n(wall time {out['config']['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
