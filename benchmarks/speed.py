"""emu vs plain Unicorn: the same guest ELF on both, per arch.

    python benchmarks/speed.py [--arch A[,B]] [--repeat N] [--quick] [--json]

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

ratio = plain_seconds / emu_seconds (1.0 = as fast). Every figure is the median of
--repeat runs, the configurations interleaved (the VM is noisy, +-30 %).

Steady-state figures subtract a set-up-only run of the same program (stream/alu with 0
iterations, thrash with 1 pass): emu pays a fixed start-up cost (demand faults through
mm_core, about 0.2 ms each) that plain Unicorn does not.

The investigation section (count= cost) runs on stream and alu:
  plain/vtlb with count=0 and count=10**9, emu with quantum 20000 and 10**9, and two
  what-ifs patched into this process only (emu/ is not modified): emu with count=0
  ("nocount": emu_start without count=, as a single-task fast mode would run), and on
  thrash emu with an int-only TLB-hit path in the fill hook ("intfill").
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


def _nocount(m: Machine) -> None:
    """What-if: every emu_start of this machine without count= (no count hook)."""
    for v in m.vcpus:
        start = v.uc.emu_start
        v.uc.emu_start = (lambda begin, until, timeout=0, count=0, _s=start: _s(begin, until, timeout, 0))


def _int_fill(self, _uch, vaddr, access, entry, _user):
    """What-if: emu's VCPU._fill with the TLB-hit test done on plain ints
    (``1 << (access - 16)``) instead of an ``Access`` IntFlag."""
    self.fills += 1
    e = self.tlb.small.get(vaddr >> 12)
    if e is not None and e[1] & (1 << (access - 16)):
        self.tlb_hits += 1
        entry[0] = e[0] | (vaddr & 0xFFF)
        entry[1] = e[1]
        return True
    try:
        return self._fill_slow(vaddr, _VCPU_MOD._ACCESS[access], entry)
    except BaseException as err:  # noqa: BLE001 - never let an exception cross C
        self._hook_error = err
        return False


try:
    from emu import vcpu as _VCPU_MOD
except ImportError:  # pragma: no cover
    _VCPU_MOD = None


def run_emu(arch: str, path: str, argv: list[str], quantum: int = QUANTUM,
            variant: str = "") -> dict[str, Any]:
    orig_fill = None
    if variant == "intfill":
        cls = _VCPU_MOD.VCPU
        if not all(hasattr(cls, n) for n in ("_fill", "_fill_slow")) or not hasattr(_VCPU_MOD, "_ACCESS"):
            raise RuntimeError("emu.vcpu changed: the intfill what-if no longer applies")
        orig_fill, cls._fill = cls._fill, _int_fill      # bound at VCPU creation (spawn)
    try:
        m = Machine(arch=arch, mem=MEM, quantum=quantum)
        m.spawn(path, [os.path.basename(path)] + argv)
    finally:
        if orig_fill is not None:
            _VCPU_MOD.VCPU._fill = orig_fill
    if variant == "nocount":
        _nocount(m)
    r = m.run()
    if r.exit_code != 0:
        raise RuntimeError(f"emu {arch} {argv}: exit {r.exit_code} signal {r.signal}")
    s = r.summary
    return {"seconds": s["seconds"], "stdout": r.stdout, "instructions": s["instructions"],
            "fills": s["tlb_fills"], "hits": s["tlb_hits"], "walks": s["walks"], "faults": s["faults"]}


# -- the plan --------------------------------------------------------------------------------
def plan(arch: str) -> list[tuple[str, str, Callable[[str, list[str]], dict[str, Any]]]]:
    """(workload, config, runner(path, argv)) for one arch, in run order."""
    ppc = arch == "ppc64"
    base = "vtlb" if ppc else "flat"
    off = COUNTER_OFFSET.get(arch)
    steps: list[tuple[str, str, Callable]] = []
    for wl in ("qsort", "stream", "alu"):
        steps.append((wl, "plain", lambda p, a, b=base: run_plain(arch, p, a, b, 0, off)))
        if not ppc:
            steps.append((wl, "vtlb", lambda p, a: run_plain(arch, p, a, "vtlb", 0, off)))
        steps.append((wl, "emu", lambda p, a: run_emu(arch, p, a)))
        if wl == "qsort":
            continue
        # investigation: the count= hook and the quantum
        steps.append((wl, "plain_count", lambda p, a, b=base: run_plain(arch, p, a, b, BIG, off)))
        if not ppc:
            steps.append((wl, "vtlb_count", lambda p, a: run_plain(arch, p, a, "vtlb", BIG, off)))
        steps.append((wl, "emu_bigq", lambda p, a: run_emu(arch, p, a, quantum=BIG)))
        steps.append((wl, "emu_nocount", lambda p, a: run_emu(arch, p, a, quantum=BIG, variant="nocount")))
    for wl in ("stream0", "alu0"):      # start-up/exit costs, subtracted for steady-state ratios
        steps.append((wl, "plain", lambda p, a, b=base: run_plain(arch, p, a, b)))
        if not ppc:
            steps.append((wl, "vtlb", lambda p, a: run_plain(arch, p, a, "vtlb")))
        steps.append((wl, "emu", lambda p, a: run_emu(arch, p, a)))
        steps.append((wl, "emu_nocount", lambda p, a: run_emu(arch, p, a, quantum=BIG, variant="nocount")))
    tbase = "vtlb-nohook" if ppc else "flat"
    for wl in ("thrash", "thrash1"):
        steps.append((wl, "plain", lambda p, a, b=tbase: run_plain(arch, p, a, b)))
        steps.append((wl, "emu", lambda p, a: run_emu(arch, p, a)))
        steps.append((wl, "emu_intfill", lambda p, a: run_emu(arch, p, a, variant="intfill")))
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


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summarize(arch: str, runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    def sec(wl: str, cfg: str) -> float | None:
        rs = runs.get((wl, cfg))
        return med([r["seconds"] for r in rs]) if rs else None

    def first(wl: str, cfg: str, key: str) -> Any:
        rs = runs.get((wl, cfg))
        return rs[0].get(key) if rs else None

    ppc = arch == "ppc64"
    rows: dict[str, Any] = {}
    mismatches = []
    for (wl, cfg), rs in runs.items():
        ref = runs.get((wl, "emu"))
        if ref and rs[0]["stdout"] != ref[0]["stdout"]:
            mismatches.append(f"{wl}/{cfg}")
    for wl in ("qsort", "stream", "alu", "thrash"):
        insns = first(wl, "emu", "instructions")
        plain, emu, vtlb = sec(wl, "plain"), sec(wl, "emu"), sec(wl, "vtlb")
        fills, hits = first(wl, "emu", "fills"), first(wl, "emu", "hits")
        row = {
            "plain_s": plain, "vtlb_s": vtlb, "emu_s": emu,
            "ratio": ratio(plain, emu),
            "ratio_vs_vtlb": ratio(vtlb, emu) if vtlb is not None and wl != "thrash" else None,
            "instructions": insns,
            "mips_plain": insns / plain / 1e6 if plain else None,
            "mips_emu": insns / emu / 1e6 if emu else None,
            "fills": fills, "hits": hits, "walks": first(wl, "emu", "walks"),
            "faults": first(wl, "emu", "faults"),
            "fills_per_s": fills / emu if emu else None,
        }
        if wl == "thrash":
            row["marginal_fills_per_s"] = ratio(hits, emu - plain)
            e1, p1, h1 = sec("thrash1", "emu"), sec("thrash1", "plain"), first("thrash1", "emu", "hits")
            row["setup_emu_s"], row["setup_plain_s"] = e1, p1
            row["steady_fills_per_s"] = ratio(hits - h1, (emu - e1) - (plain - p1))
            row["vtlb_fills"] = first(wl, "vtlb", "fills")
            row["vtlb_floor_fills_per_s"] = ratio(row["vtlb_fills"], vtlb)
            ei, ei1 = sec("thrash", "emu_intfill"), sec("thrash1", "emu_intfill")
            if ei is not None:
                row["intfill_s"] = ei
                row["intfill_marginal_fills_per_s"] = ratio(hits, ei - plain)
                row["intfill_steady_fills_per_s"] = ratio(hits - h1, (ei - ei1) - (plain - p1))
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
            "emu_nocount_s": sec(wl, "emu_nocount"),
            "counter_with_count": first(wl, "plain_count", "counted"),
            "counter_with_count0": first(wl, "plain", "counted"),
        }
        d["count_hook_ns_per_insn"] = (d["vtlb_count1e9_s"] - d["vtlb_count0_s"]) / insns * 1e9
        d["count_hook_ns_per_insn_flat"] = (d["plain_count1e9_s"] - d["plain_count0_s"]) / insns * 1e9
        quanta = insns / QUANTUM
        d["quantum_overhead_us"] = (d["emu_q20000_s"] - d["emu_q1e9_s"]) / quanta * 1e6
        d["ratio_emu_q20000"] = ratio(d["plain_count0_s"], d["emu_q20000_s"])
        d["ratio_emu_q1e9"] = ratio(d["plain_count0_s"], d["emu_q1e9_s"])
        d["ratio_emu_nocount"] = ratio(d["plain_count0_s"], d["emu_nocount_s"])
        # steady state: the same runs minus the 0-iteration run (start-up, faults, exit)
        z = wl + "0"
        p0, v0 = sec(z, "plain"), sec(z, "plain") if ppc else sec(z, "vtlb")
        e0, n0 = sec(z, "emu"), sec(z, "emu_nocount")
        d["fixed_s"] = {"plain": p0, "vtlb": v0, "emu": e0, "emu_nocount": n0}
        dp, dv = d["plain_count0_s"] - p0, d["vtlb_count0_s"] - v0
        de, dn = d["emu_q20000_s"] - e0, d["emu_nocount_s"] - n0
        d["steady_ratio_emu_q20000"] = ratio(dp, de)
        d["steady_ratio_emu_nocount"] = ratio(dp, dn)
        d["steady_ratio_emu_q20000_vs_vtlb"] = ratio(dv, de)
        d["steady_ratio_emu_nocount_vs_vtlb"] = ratio(dv, dn)
        inv[wl] = d
    res_ok = {wl: rows[wl]["ratio"] >= RESIDENT_TARGET for wl in ("stream", "alu")}
    res_ok_v = {wl: (rows[wl]["ratio_vs_vtlb"] or rows[wl]["ratio"]) >= RESIDENT_TARGET
                for wl in ("stream", "alu")}
    targets = {
        "resident_ratio_ge_0.8": all(res_ok.values()),
        "resident_by_workload": res_ok,
        "resident_vs_fastest_plain": res_ok_v,
        "fills_ge_0.7M": rows["thrash"]["marginal_fills_per_s"] >= FILLS_TARGET,
        "fills_steady_ge_0.7M": rows["thrash"]["steady_fills_per_s"] >= FILLS_TARGET,
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


def print_arch(arch: str, s: dict[str, Any]) -> None:
    rows, inv, t = s["rows"], s["investigation"], s["targets"]
    print(f"\n=== {arch}   plain = {s['plain_mode']}; thrash plain = {s['thrash_plain_mode']}"
          f"   (median of {s['repeats']})")
    hdr = (f"{'workload':<8} {'plain s':>8} {'vtlb s':>8} {'emu s':>8} {'ratio':>6} {'r/vtlb':>6} "
           f"{'insns':>11} {'MIPS pl':>8} {'MIPS emu':>8} {'fills':>8} {'hits':>8} "
           f"{'fills/s':>8} {'marg/s':>8}")
    print(hdr)
    print("-" * len(hdr))
    for wl in ("qsort", "stream", "alu", "thrash"):
        r = rows[wl]
        print(f"{wl:<8} {f(r['plain_s']):>8} {f(r['vtlb_s']):>8} {f(r['emu_s']):>8} "
              f"{r2(r['ratio']):>6} {r2(r['ratio_vs_vtlb']):>6} "
              f"{f(r['instructions'], '{:,}'):>11} {f(r['mips_plain'], '{:.0f}'):>8} "
              f"{f(r['mips_emu'], '{:.0f}'):>8} {f(r['fills'], '{:,}'):>8} {f(r['hits'], '{:,}'):>8} "
              f"{mfmt(r['fills_per_s'] if wl == 'thrash' else None):>8} "
              f"{mfmt(r.get('marginal_fills_per_s')):>8}")
    th = rows["thrash"]
    print(f"thrash: set-up run (1 pass) emu {f(th['setup_emu_s'])} s, plain {f(th['setup_plain_s'])} s; "
          f"steady-state fills/s (set-up subtracted) {mfmt(th['steady_fills_per_s'])}; "
          f"Python identity-hook floor (vtlb) {mfmt(th['vtlb_floor_fills_per_s'])}/s")
    if "intfill_s" in th:
        print(f"  what-if int-only hit path in emu's fill hook: emu {f(th['intfill_s'])} s, "
              f"marginal {mfmt(th['intfill_marginal_fills_per_s'])}/s, "
              f"steady {mfmt(th['intfill_steady_fills_per_s'])}/s")

    def ok(b: bool) -> str:
        return "MET" if b else "NOT MET"

    res = ", ".join(f"{wl} {r2(rows[wl]['ratio'])} {ok(v)}" for wl, v in t["resident_by_workload"].items())
    print(f"targets: resident ratio >= {RESIDENT_TARGET} (vs plain above): {res}")
    if arch != "ppc64":
        res = ", ".join(f"{wl} {r2(rows[wl]['ratio_vs_vtlb'])} {ok(v)}"
                        for wl, v in t["resident_vs_fastest_plain"].items())
        print(f"         resident ratio vs the fastest plain setup (vtlb): {res}")
    print(f"         fills >= 0.7 M/s served from emu's TLB: marginal {mfmt(th['marginal_fills_per_s'])} "
          f"{ok(t['fills_ge_0.7M'])}, steady {mfmt(th['steady_fills_per_s'])} "
          f"{ok(t['fills_steady_ge_0.7M'])}")
    print("count= investigation (seconds; ratio = plain count=0 / emu):")
    print(f"  {'workload':<8} {'plain c=0':>9} {'plain c=1e9':>11} {'vtlb c=0':>9} {'vtlb c=1e9':>10} "
          f"{'hook ns/insn':>12} {'emu q=2e4':>9} {'emu q=1e9':>9} {'emu c=0*':>9} {'us/quantum':>10} "
          f"{'ratios q2e4/q1e9/c0':>20}")
    for wl in ("stream", "alu"):
        d = inv[wl]
        ratios = f"{r2(d['ratio_emu_q20000'])}/{r2(d['ratio_emu_q1e9'])}/{r2(d['ratio_emu_nocount'])}"
        print(f"  {wl:<8} {f(d['plain_count0_s']):>9} {f(d['plain_count1e9_s']):>11} "
              f"{f(d['vtlb_count0_s']):>9} {f(d['vtlb_count1e9_s']):>10} "
              f"{f(d['count_hook_ns_per_insn'], '{:.1f}'):>12} "
              f"{f(d['emu_q20000_s']):>9} {f(d['emu_q1e9_s']):>9} {f(d['emu_nocount_s']):>9} "
              f"{f(d['quantum_overhead_us'], '{:.1f}'):>10} {ratios:>20}")
    for wl in ("stream", "alu"):
        d = inv[wl]
        fx = d["fixed_s"]
        print(f"  {wl} steady state (minus a 0-iteration run: plain {f(fx['plain'])}, emu {f(fx['emu'])}, "
              f"emu c=0 {f(fx['emu_nocount'])} s): emu q=2e4 {r2(d['steady_ratio_emu_q20000'])}, "
              f"emu c=0 {r2(d['steady_ratio_emu_nocount'])}; vs vtlb "
              f"{r2(d['steady_ratio_emu_q20000_vs_vtlb'])} / {r2(d['steady_ratio_emu_nocount_vs_vtlb'])}")
    d = inv["alu"]
    print(f"  uc_struct.emu_counter summed over the plain run's emu_starts: count=1e9 -> "
          f"{f(d['counter_with_count'], '{:,}')} (emu counted {d['instructions']:,}); count=0 -> "
          f"{f(d['counter_with_count0'], '{:,}')}")
    if s["output_mismatches"]:
        print(f"  WARNING: guest output differs from emu's in {', '.join(s['output_mismatches'])}")


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
    print("ratio = plain s / emu s (1.0 = as fast); r/vtlb = the same against the fastest plain setup; "
          "marg/s = tlb_hits / (emu s - plain s)")
    for a in arches:
        if a in results:
            print_arch(a, results[a])
    print("\n* emu c=0: emu with emu_start(count=0) patched in (what-if, emu/ unchanged); "
          "its instruction count is not exact.")
    for a, why in skipped.items():
        print(f"skipped {a}: {why}")
    for k, why in failures.items():
        print(f"FAILED {k}: {why}")
    print(f"(wall time {out['wall_seconds']} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
