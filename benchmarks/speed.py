"""emu vs plain Unicorn: the same guest ELF on both, per arch, emu in both of its modes.

    python benchmarks/speed.py [--arch A[,B]] [--repeat N] [--quick] [--json]

Modes of emu, shown side by side:
  emu      the default: every quantum is emu_start(count=quantum), so instruction counts
           are exact and user code is preempted, at the price of Unicorn's internal
           per-instruction count hook
  fast     Machine(count_instructions=False), `emu run --fast`: emu_start(count=0), full
           Unicorn speed, no preemption inside user mode, summary["instructions"] is None

Workloads (workloads/bin/<arch>/...; see benchmarks/README.md):
  qsort    the existing qsort guest: short, dominated by start-up and 40 demand faults
           (informational, not part of the targets)
  stream   bench_loop stream 64 pages, stride 8: load/add/store over a working set that
           stays resident in Unicorn's 256-entry TLB            -> target ratio >= 0.8
  alu      bench_loop alu: register-only loop, no memory traffic  -> target ratio >= 0.8
  thrash   bench_loop stream 2048 pages, stride 4096: one word per page, every access
           misses Unicorn's TLB and is served by emu's TLB model -> target >= 0.7 M fills/s

Baselines ("plain", benchmarks/plainrun.py, count=0 = no instruction-count hook):
  flat     plain mem_map at the VAs, Unicorn's own MMU (x86_64, arm64, s390x)
  vtlb     UC_TLB_VIRTUAL + identity fill hook (raw ctypes, per-region R/W/X); ppc64's
           baseline (flat does not work there); for the others the fastest plain setup
  ppc64 thrash uses UC_TLB_VIRTUAL with no hook (identity in C) as its plain baseline.

ratio = plain_seconds / emu_seconds (1.0 = as fast), for each mode. Every figure is the
median of --repeat runs, the configurations interleaved (the VM is noisy, +-30 %).
MIPS of the fast mode use the exact instruction count of the counted run (same guest,
same output; the fast run counts nothing).

Steady-state figures subtract a set-up-only run of the same program (stream/alu with 0
iterations, thrash with 1 pass): emu pays a fixed start-up cost (demand faults through
mm_core, about 0.2 ms each) that plain Unicorn does not.

The investigation section (what count= costs) runs on stream and alu: plain/vtlb with
count=0 and count=10**9 (the hook's ns/instruction), emu with quantum 20000 and 10**9
(the per-quantum round trip), and emu --fast (no count hook at all).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import plainrun  # noqa: E402
import unicorn  # noqa: E402

from emu import plugins  # noqa: E402
from emu.machine import Machine  # noqa: E402

ALL_ARCHES = ("x86_64", "arm64", "s390x", "ppc64")
MODES = ("emu", "fast")                 # emu's configurations: exact counts / count_instructions=False
MODE_LABEL = {"emu": "emu (exact counts)", "fast": "emu --fast"}
BIG = 10**9
QUANTUM = 20000
RESIDENT_TARGET = 0.8
FILLS_TARGET = 0.7e6
MEM = "64M"

SIZES = {
    #           stream passes, alu iters, thrash pages, thrash passes
    "default": dict(stream=400, alu=6_000_000, thrash_pages=2048, thrash=300),
    "quick": dict(stream=80, alu=1_200_000, thrash_pages=2048, thrash=80),
}


def workloads(sz: dict[str, int]) -> dict[str, tuple[str, list[str]]]:
    tp = str(sz["thrash_pages"])
    return {
        "qsort": ("qsort", []),
        "stream": ("bench_loop", ["stream", "64", str(sz["stream"]), "8"]),
        "alu": ("bench_loop", ["alu", str(sz["alu"])]),
        "thrash": ("bench_loop", ["stream", tp, str(sz["thrash"]), "4096"]),
        "thrash1": ("bench_loop", ["stream", tp, "1", "4096"]),   # set-up only: 1 pass
        "stream0": ("bench_loop", ["stream", "64", "0", "8"]),      # fixed costs only
        "alu0": ("bench_loop", ["alu", "0"]),
    }


# -- one run of each kind ----------------------------------------------------------------------
def run_plain(arch: str, path: str, argv: list[str], mode: str, count: int = 0,
              counter_offset: int | None = None) -> dict[str, Any]:
    p = plainrun.PlainRunner(arch, path, [os.path.basename(path)] + argv, count=count, mode=mode,
                             counter_offset=counter_offset)
    r = p.run()
    if r.exit_code != 0:
        raise RuntimeError(f"plain {arch} {argv}: exit {r.exit_code}")
    return {"seconds": r.seconds, "stdout": r.stdout, "fills": r.fills, "counted": r.counted}


def run_emu(arch: str, path: str, argv: list[str], quantum: int = QUANTUM,
            count_instructions: bool = True) -> dict[str, Any]:
    m = Machine(arch=arch, mem=MEM, quantum=quantum, count_instructions=count_instructions)
    m.spawn(path, [os.path.basename(path)] + argv)
    r = m.run()
    if r.exit_code != 0:
        raise RuntimeError(f"emu {arch} {argv}: exit {r.exit_code} signal {r.signal}")
    s = r.summary
    if count_instructions != (s["instructions"] is not None):
        raise RuntimeError(f"emu {arch} {argv}: count_instructions={count_instructions} but "
                           f"summary['instructions'] = {s['instructions']!r}")
    return {"seconds": s["seconds"], "stdout": r.stdout, "instructions": s["instructions"],
            "fills": s["tlb_fills"], "hits": s["tlb_hits"], "walks": s["walks"], "faults": s["faults"]}


# -- the plan --------------------------------------------------------------------------------
def plan(arch: str) -> list[tuple[str, str, Callable[[str, list[str]], dict[str, Any]]]]:
    """(workload, config, runner(path, argv)) for one arch, in run order."""
    ppc = arch == "ppc64"
    base = "vtlb" if ppc else "flat"
    off = COUNTER_OFFSET.get(arch)
    steps: list[tuple[str, str, Callable]] = []

    def emu_modes(wl: str) -> None:
        steps.append((wl, "emu", lambda p, a: run_emu(arch, p, a)))
        steps.append((wl, "fast", lambda p, a: run_emu(arch, p, a, count_instructions=False)))

    for wl in ("qsort", "stream", "alu"):
        steps.append((wl, "plain", lambda p, a, b=base: run_plain(arch, p, a, b, 0, off)))
        if not ppc:
            steps.append((wl, "vtlb", lambda p, a: run_plain(arch, p, a, "vtlb", 0, off)))
        emu_modes(wl)
        if wl == "qsort":
            continue
        # investigation: the count= hook and the quantum
        steps.append((wl, "plain_count", lambda p, a, b=base: run_plain(arch, p, a, b, BIG, off)))
        if not ppc:
            steps.append((wl, "vtlb_count", lambda p, a: run_plain(arch, p, a, "vtlb", BIG, off)))
        steps.append((wl, "emu_bigq", lambda p, a: run_emu(arch, p, a, quantum=BIG)))
    for wl in ("stream0", "alu0"):      # start-up/exit costs, subtracted for steady-state ratios
        steps.append((wl, "plain", lambda p, a, b=base: run_plain(arch, p, a, b)))
        if not ppc:
            steps.append((wl, "vtlb", lambda p, a: run_plain(arch, p, a, "vtlb")))
        emu_modes(wl)
    tbase = "vtlb-nohook" if ppc else "flat"
    for wl in ("thrash", "thrash1"):
        steps.append((wl, "plain", lambda p, a, b=tbase: run_plain(arch, p, a, b)))
        emu_modes(wl)
    steps.append(("thrash", "vtlb", lambda p, a: run_plain(arch, p, a, "vtlb")))   # Python-fill floor
    return steps


COUNTER_OFFSET: dict[str, int | None] = {}


def locate_counter(arch: str, path: str) -> int | None:
    """uc_struct.emu_counter's offset, from a plain run with a distinctive count."""
    mode = "vtlb" if arch == "ppc64" else "flat"
    p = plainrun.PlainRunner(arch, path, [os.path.basename(path)], count=BIG + 7, mode=mode)
    p.run()
    return plainrun.find_counter_offset(p.uc, BIG + 7)


# -- statistics --------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b is not None and b > 0 else float("nan")


def ge(x: float | None, target: float) -> bool | None:
    """x >= target; None when x could not be measured (a difference at or below zero: noise)."""
    if x is None or x != x:
        return None
    return x >= target


def summarize(arch: str, runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    def sec(wl: str, cfg: str) -> float | None:
        rs = runs.get((wl, cfg))
        return med([r["seconds"] for r in rs]) if rs else None

    def first(wl: str, cfg: str, key: str) -> Any:
        rs = runs.get((wl, cfg))
        return rs[0].get(key) if rs else None

    def sub(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    ppc = arch == "ppc64"
    rows: dict[str, Any] = {}
    mismatches = []
    for (wl, cfg), rs in runs.items():
        ref = runs.get((wl, "emu"))
        if ref and any(r["stdout"] != ref[0]["stdout"] for r in rs):
            mismatches.append(f"{wl}/{cfg}")
    for wl in ("qsort", "stream", "alu", "thrash"):
        insns = first(wl, "emu", "instructions")       # exact; the fast run counts nothing
        plain, vtlb = sec(wl, "plain"), sec(wl, "vtlb")
        row: dict[str, Any] = {"plain_s": plain, "vtlb_s": vtlb, "instructions": insns,
                               "mips_plain": ratio(insns, plain) / 1e6 if insns else None}
        for m in MODES:
            t = sec(wl, m)
            row[f"{m}_s"] = t
            row[f"ratio_{m}"] = ratio(plain, t)
            row[f"ratio_{m}_vs_vtlb"] = ratio(vtlb, t) if vtlb is not None and wl != "thrash" else None
            row[f"mips_{m}"] = ratio(insns, t) / 1e6 if insns else None
            for k in ("fills", "hits", "walks", "faults"):
                row[f"{m}_{k}"] = first(wl, m, k)
        if wl == "thrash":
            p1 = sec("thrash1", "plain")
            row["setup_plain_s"] = p1
            for m in MODES:
                t, t1 = row[f"{m}_s"], sec("thrash1", m)
                hits, h1 = row[f"{m}_hits"], first("thrash1", m, "hits")
                row[f"{m}_setup_s"] = t1
                row[f"{m}_fills_per_s"] = ratio(row[f"{m}_fills"], t)
                row[f"{m}_marginal_fills_per_s"] = ratio(hits, sub(t, plain))
                row[f"{m}_steady_fills_per_s"] = ratio(sub(hits, h1), sub(sub(t, t1), sub(plain, p1)))
            row["vtlb_fills"] = first(wl, "vtlb", "fills")
            row["vtlb_floor_fills_per_s"] = ratio(row["vtlb_fills"], vtlb)
        rows[wl] = row
    inv: dict[str, Any] = {}
    for wl in ("stream", "alu"):
        insns = first(wl, "emu", "instructions")
        d = {
            "instructions": insns,
            "plain_count0_s": sec(wl, "plain"), "plain_count1e9_s": sec(wl, "plain_count"),
            "vtlb_count0_s": sec(wl, "plain") if ppc else sec(wl, "vtlb"),
            "vtlb_count1e9_s": sec(wl, "plain_count") if ppc else sec(wl, "vtlb_count"),
            "emu_q20000_s": sec(wl, "emu"), "emu_q1e9_s": sec(wl, "emu_bigq"),
            "emu_fast_s": sec(wl, "fast"),
            "counter_with_count": first(wl, "plain_count", "counted"),
            "counter_with_count0": first(wl, "plain", "counted"),
        }
        d["count_hook_ns_per_insn"] = ratio(sub(d["vtlb_count1e9_s"], d["vtlb_count0_s"]), insns) * 1e9
        d["count_hook_ns_per_insn_flat"] = ratio(sub(d["plain_count1e9_s"], d["plain_count0_s"]), insns) * 1e9
        # emu's own cost of counting: the same machine with and without the count hook
        d["emu_count_ns_per_insn"] = ratio(sub(d["emu_q1e9_s"], d["emu_fast_s"]), insns) * 1e9
        d["emu_total_count_ns_per_insn"] = ratio(sub(d["emu_q20000_s"], d["emu_fast_s"]), insns) * 1e9
        quanta = insns / QUANTUM if insns else None
        d["quantum_overhead_us"] = ratio(sub(d["emu_q20000_s"], d["emu_q1e9_s"]), quanta) * 1e6
        d["ratio_emu_q20000"] = ratio(d["plain_count0_s"], d["emu_q20000_s"])
        d["ratio_emu_q1e9"] = ratio(d["plain_count0_s"], d["emu_q1e9_s"])
        d["ratio_emu_fast"] = ratio(d["plain_count0_s"], d["emu_fast_s"])
        # steady state: the same runs minus the 0-iteration run (start-up, faults, exit)
        z = wl + "0"
        p0, v0 = sec(z, "plain"), sec(z, "plain") if ppc else sec(z, "vtlb")
        e0, f0 = sec(z, "emu"), sec(z, "fast")
        d["fixed_s"] = {"plain": p0, "vtlb": v0, "emu": e0, "fast": f0}
        dp, dv = sub(d["plain_count0_s"], p0), sub(d["vtlb_count0_s"], v0)
        de, df = sub(d["emu_q20000_s"], e0), sub(d["emu_fast_s"], f0)
        d["steady_ratio_emu"] = ratio(dp, de)
        d["steady_ratio_fast"] = ratio(dp, df)
        d["steady_ratio_emu_vs_vtlb"] = ratio(dv, de)
        d["steady_ratio_fast_vs_vtlb"] = ratio(dv, df)
        inv[wl] = d
    targets: dict[str, Any] = {}
    for m in MODES:
        res = {wl: bool(ge(rows[wl][f"ratio_{m}"], RESIDENT_TARGET)) for wl in ("stream", "alu")}
        # on ppc64 the plain baseline already is vtlb
        res_v = {wl: bool(ge(rows[wl][f"ratio_{m}_vs_vtlb"] if not ppc else rows[wl][f"ratio_{m}"],
                             RESIDENT_TARGET)) for wl in ("stream", "alu")}
        res_s = {wl: ge(inv[wl][f"steady_ratio_{m}"], RESIDENT_TARGET) for wl in ("stream", "alu")}
        th = rows["thrash"]
        targets[m] = {
            "resident_ratio_ge_0.8": all(res.values()),
            "resident_by_workload": res,
            "resident_vs_fastest_plain": res_v,
            "resident_steady_state": res_s,
            "fills_ge_0.7M": bool(ge(th[f"{m}_marginal_fills_per_s"], FILLS_TARGET)),
            "fills_steady_ge_0.7M": ge(th[f"{m}_steady_fills_per_s"], FILLS_TARGET),
        }
    return {
        "plain_mode": "UC_TLB_VIRTUAL + identity fill hook (raw ctypes, region R/W/X)" if ppc
        else "flat: mem_map at the VAs, UC_TLB_CPU",
        "thrash_plain_mode": "UC_TLB_VIRTUAL, no fill hook (identity in C)" if ppc else "flat",
        "rows": rows, "investigation": inv, "targets": targets, "output_mismatches": mismatches,
        "repeats": len(runs.get(("stream", "emu"), [])),
    }


# -- printing ------------------------------------------------------------------------------------
def f(x: Any, fmt: str = "{:.3f}", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return none
    return fmt.format(x)


def mfmt(x: Any) -> str:
    return f(x / 1e6 if x is not None else None, "{:.2f}M")


def r2(x: Any) -> str:
    return f(x, "{:.2f}")


def ok(b: bool | None) -> str:
    return "n/a" if b is None else "MET" if b else "NOT MET"


def print_arch(arch: str, s: dict[str, Any]) -> None:
    rows, inv, t = s["rows"], s["investigation"], s["targets"]
    ppc = arch == "ppc64"
    print(f"\n=== {arch}   plain = {s['plain_mode']}; thrash plain = {s['thrash_plain_mode']}"
          f"   (median of {s['repeats']})")
    hdr = (f"{'workload':<8} {'plain s':>8} {'vtlb s':>8} {'emu s':>8} {'fast s':>8} "
           f"{'ratio':>6} {'r fast':>6} {'r/vtlb':>6} {'rf/vtlb':>7} "
           f"{'insns':>11} {'MIPS pl':>7} {'MIPS emu':>8} {'MIPS fst':>8} {'fills':>8} {'hits':>8}")
    print(hdr)
    print("-" * len(hdr))
    for wl in ("qsort", "stream", "alu", "thrash"):
        r = rows[wl]
        print(f"{wl:<8} {f(r['plain_s']):>8} {f(r['vtlb_s']):>8} {f(r['emu_s']):>8} {f(r['fast_s']):>8} "
              f"{r2(r['ratio_emu']):>6} {r2(r['ratio_fast']):>6} "
              f"{r2(r['ratio_emu_vs_vtlb']):>6} {r2(r['ratio_fast_vs_vtlb']):>7} "
              f"{f(r['instructions'], '{:,}'):>11} {f(r['mips_plain'], '{:.0f}'):>7} "
              f"{f(r['mips_emu'], '{:.0f}'):>8} {f(r['mips_fast'], '{:.0f}'):>8} "
              f"{f(r['emu_fills'], '{:,}'):>8} {f(r['emu_hits'], '{:,}'):>8}")
    th = rows["thrash"]
    print(f"thrash, fills served from emu's TLB (plain {f(th['plain_s'])} s, its 1-pass set-up run "
          f"{f(th['setup_plain_s'])} s; Python identity-hook floor (vtlb) "
          f"{mfmt(th['vtlb_floor_fills_per_s'])}/s):")
    print(f"  {'mode':<19} {'seconds':>8} {'set-up s':>8} {'fills':>9} {'hits':>9} "
          f"{'fills/s':>8} {'marg/s':>8} {'steady/s':>8}")
    for m in MODES:
        print(f"  {MODE_LABEL[m]:<19} {f(th[f'{m}_s']):>8} {f(th[f'{m}_setup_s']):>8} "
              f"{f(th[f'{m}_fills'], '{:,}'):>9} {f(th[f'{m}_hits'], '{:,}'):>9} "
              f"{mfmt(th[f'{m}_fills_per_s']):>8} {mfmt(th[f'{m}_marginal_fills_per_s']):>8} "
              f"{mfmt(th[f'{m}_steady_fills_per_s']):>8}")

    print(f"{'targets (the verdict is on each unindented line; indented lines are context)':<75} "
          f"{MODE_LABEL['emu']:<20} {MODE_LABEL['fast']}")

    def line(label: str, vals: dict[str, tuple[Any, bool | None]], fmt: Callable[[Any], str] = r2,
             verdict: bool = True) -> None:
        cells = [f"{fmt(v)} {ok(b)}" if verdict else fmt(v) for v, b in (vals[m] for m in MODES)]
        print(f"  {label:<73} {cells[0]:<20} {cells[1]}")

    for wl in ("stream", "alu"):
        line(f"{wl}: ratio >= {RESIDENT_TARGET} (whole run vs plain)",
             {m: (rows[wl][f"ratio_{m}"], t[m]["resident_by_workload"][wl]) for m in MODES})
        line("    steady state (0-iteration run subtracted from both sides) vs plain",
             {m: (inv[wl][f"steady_ratio_{m}"], t[m]["resident_steady_state"][wl]) for m in MODES})
        if not ppc:
            line("    whole run vs the fastest plain setup (vtlb)",
                 {m: (rows[wl][f"ratio_{m}_vs_vtlb"], t[m]["resident_vs_fastest_plain"][wl]) for m in MODES})
            line("    steady state vs vtlb",
                 {m: (inv[wl][f"steady_ratio_{m}_vs_vtlb"], None) for m in MODES}, verdict=False)
    line("thrash: >= 0.7 M fills/s served from emu's TLB (marginal, whole run)",
         {m: (th[f"{m}_marginal_fills_per_s"], t[m]["fills_ge_0.7M"]) for m in MODES}, mfmt)
    line("    steady state (1-pass run subtracted from both sides)",
         {m: (th[f"{m}_steady_fills_per_s"], t[m]["fills_steady_ge_0.7M"]) for m in MODES}, mfmt)

    print("count= investigation (seconds; ratio = plain count=0 / emu):")
    print(f"  {'workload':<8} {'plain c=0':>9} {'plain c=1e9':>11} {'vtlb c=0':>9} {'vtlb c=1e9':>10} "
          f"{'hook ns/i':>9} {'emu q=2e4':>9} {'emu q=1e9':>9} {'emu fast':>8} {'emu ns/i':>8} "
          f"{'us/quantum':>10} {'ratios q2e4/q1e9/fast':>21}")
    for wl in ("stream", "alu"):
        d = inv[wl]
        ratios = f"{r2(d['ratio_emu_q20000'])}/{r2(d['ratio_emu_q1e9'])}/{r2(d['ratio_emu_fast'])}"
        print(f"  {wl:<8} {f(d['plain_count0_s']):>9} {f(d['plain_count1e9_s']):>11} "
              f"{f(d['vtlb_count0_s']):>9} {f(d['vtlb_count1e9_s']):>10} "
              f"{f(d['count_hook_ns_per_insn'], '{:.1f}'):>9} "
              f"{f(d['emu_q20000_s']):>9} {f(d['emu_q1e9_s']):>9} {f(d['emu_fast_s']):>8} "
              f"{f(d['emu_count_ns_per_insn'], '{:.1f}'):>8} "
              f"{f(d['quantum_overhead_us'], '{:.1f}'):>10} {ratios:>21}")
    for wl in ("stream", "alu"):
        d = inv[wl]
        fx = d["fixed_s"]
        print(f"  {wl} fixed cost (0-iteration run): plain {f(fx['plain'])}, emu {f(fx['emu'])}, "
              f"fast {f(fx['fast'])} s")
    d = inv["alu"]
    print(f"  uc_struct.emu_counter summed over the plain run's emu_starts: count=1e9 -> "
          f"{f(d['counter_with_count'], '{:,}')} (emu counted {f(d['instructions'], '{:,}')}); "
          f"count=0 -> {f(d['counter_with_count0'], '{:,}')}")
    if s["output_mismatches"]:
        print(f"  WARNING: guest output differs from emu's in {', '.join(s['output_mismatches'])}")


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    """One line per arch and mode: each target's whole-run verdict, the steady state in brackets."""
    print(f"\nsummary of the targets (whole run; steady state in brackets)\n"
          f"{'arch':<7} {'mode':<19} {'stream ratio >= 0.8':<27} {'alu ratio >= 0.8':<27} "
          f"{'thrash >= 0.7 M fills/s'}")
    for a, s in results.items():
        rows, inv, t = s["rows"], s["investigation"], s["targets"]
        for m in MODES:
            cells = [f"{r2(rows[wl][f'ratio_{m}'])} {ok(t[m]['resident_by_workload'][wl])} "
                     f"({r2(inv[wl][f'steady_ratio_{m}'])} {ok(t[m]['resident_steady_state'][wl])})"
                     for wl in ("stream", "alu")]
            th = rows["thrash"]
            cells.append(f"{mfmt(th[f'{m}_marginal_fills_per_s'])} {ok(t[m]['fills_ge_0.7M'])} "
                         f"({mfmt(th[f'{m}_steady_fills_per_s'])} {ok(t[m]['fills_steady_ge_0.7M'])})")
            print(f"{a:<7} {MODE_LABEL[m]:<19} {cells[0]:<27} {cells[1]:<27} {cells[2]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=",".join(ALL_ARCHES), help="comma-separated arches (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (median; default 3)")
    ap.add_argument("--quick", action="store_true", help="small sizes (whole script < 60 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    size_name = "quick" if args.quick else "default"
    sz = SIZES[size_name]
    wls = workloads(sz)
    known = plugins.arches()
    arches, skipped = [], {}
    for a in [x.strip() for x in args.arch.split(",") if x.strip()]:
        if a not in ALL_ARCHES and a not in known:
            skipped[a] = "unknown arch"
        elif a not in known:
            skipped[a] = "arch plugin not installed"
        elif not all(os.path.exists(os.path.join(ROOT, "workloads", "bin", a, p)) for p, _ in wls.values()):
            skipped[a] = f"workloads/bin/{a}/ lacks qsort or bench_loop (make -C workloads)"
        else:
            arches.append(a)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    for a in arches:
        COUNTER_OFFSET[a] = locate_counter(a, os.path.join(ROOT, "workloads", "bin", a, "hello"))
    plans = {a: plan(a) for a in arches}
    runs: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {a: {} for a in arches}
    failures: dict[str, str] = {}
    for rep in range(args.repeat):
        for a in list(arches):
            log(f"[{time.perf_counter() - t_start:6.1f}s] run {rep + 1}/{args.repeat} {a}")
            for wl, cfg, fn in plans[a]:
                prog, wargs = wls[wl]
                path = os.path.join(ROOT, "workloads", "bin", a, prog)
                try:
                    r = fn(path, wargs)
                except Exception as err:  # noqa: BLE001 - report, keep the other configs
                    failures[f"{a}/{wl}/{cfg}"] = f"{type(err).__name__}: {err}"
                    continue
                finally:
                    gc.collect()
                runs[a].setdefault((wl, cfg), []).append(r)
    results = {}
    for a in arches:
        try:
            results[a] = summarize(a, runs[a])
        except Exception as err:  # noqa: BLE001
            failures[a] = f"summary failed: {type(err).__name__}: {err}"
    out = {
        "sizes": size_name, "size_params": sz, "repeat": args.repeat, "quantum": QUANTUM,
        "modes": MODE_LABEL,
        "targets": {"resident_ratio": RESIDENT_TARGET, "fills_per_s": FILLS_TARGET},
        "unicorn": unicorn.__version__, "python": platform.python_version(),
        "workloads": {k: [v[0]] + v[1] for k, v in wls.items()},
        "arches": results, "skipped": skipped, "failures": failures,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 1 if failures else 0
    print(f"emu speed vs plain Unicorn {unicorn.__version__} ({size_name} sizes, median of {args.repeat}, "
          f"emu quantum {QUANTUM}, guest RAM {MEM})")
    print("emu = exact instruction counts (emu_start(count=quantum)); fast = emu --fast "
          "(count_instructions=False: emu_start(count=0), no counts, no preemption in user mode)")
    print("ratio / r fast = plain s / emu s, fast s (1.0 = as fast); r/vtlb, rf/vtlb = the same against "
          "the fastest plain setup;\nMIPS fst uses emu's exact count; fills, hits = emu's tlb_fills, "
          "tlb_hits; marg/s = tlb_hits / (mode s - plain s)")
    for a in arches:
        if a in results:
            print_arch(a, results[a])
    if results:
        print_summary(results)
    for a, why in skipped.items():
        print(f"skipped {a}: {why}")
    for k, why in failures.items():
        print(f"FAILED {k}: {why}")
    print(f"(wall time {out['wall_seconds']} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
