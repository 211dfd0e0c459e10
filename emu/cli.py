"""The ``emu`` command."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from emu import plugins
from emu.loader import LoadError, read_elf
from emu.physmem import parse_size
from mm_core.config import DEFAULT_PROFILE, PROFILES
from mm_core.memory import CheckMMError

ARCH_CHOICES_HELP = "x86_64, arm64, s390x, ppc64 or any plugin's arch"
DEMO_WORKLOADS = (("hello", []), ("pagetouch", []), ("qsort", []), ("segv", []), ("shmem_collapse", []),
                  ("forktest", []), ("vmops", []))


class UsageError(click.ClickException):
    exit_code = 2


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"emu: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="emu-mmu")
def cli() -> None:
    """emu: run guest programs on pluggable MMUs with a Linux mm model."""


# -- emu run ---------------------------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--arch", help=f"guest architecture ({ARCH_CHOICES_HELP}); default: from the ELF")
@click.option("--cpus", default=1, show_default=True, help="number of vCPUs")
@click.option("--mem", default="256M", show_default=True, help="guest RAM size (K/M/G suffix)")
@click.option("--kernel", "profile", default=DEFAULT_PROFILE, show_default=True,
              type=click.Choice(list(PROFILES)), help="mm semantics profile (kernel version)")
@click.option("--quantum", default=20000, show_default=True, help="instructions per scheduling quantum")
@click.option("--policy", default="round-robin", show_default=True,
              type=click.Choice(["round-robin", "timed"]), help="scheduling policy")
@click.option("--walks", default="inline", show_default=True, type=click.Choice(["inline", "stepped"]),
              help="hardware walks inline (fast) or as scheduled tasks (each table read a scheduling point)")
@click.option("-O", "--arch-option", "arch_options", multiple=True, metavar="KEY=VALUE",
              help="arch plugin option, e.g. page_size=64K (ppc64), la57=true (x86_64), hafdbs=true "
                   "(arm64), full_page_pte=true (s390x)")
@click.option("--fast", is_flag=True,
              help="no instruction counting: guest code at full Unicorn speed, no preemption in user mode")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def run(program: str, args: tuple[str, ...], arch: str | None, cpus: int, mem: str, profile: str,
        quantum: int, policy: str, walks: str, arch_options: tuple[str, ...], fast: bool,
        as_json: bool) -> None:
    """Run PROGRAM (a static ELF) with ARGS; exits with the guest's exit status."""
    from emu.machine import Machine
    try:
        parse_size(mem)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        image = read_elf(program)
        owner = plugins.arch_for_elf(image.e_machine, image.big_endian)
        if arch is None:
            if owner is None:
                _fail(f"{program}: no arch plugin runs {image.e_machine} executables")
            arch = owner
        if arch not in plugins.arches():
            raise UsageError(f"unknown arch {arch!r}; known: {', '.join(plugins.arches())}")
        live = None if as_json else _live_output
        m = Machine(arch=arch, mem=mem, cpus=cpus, kernel=profile, quantum=quantum, policy=policy,
                    walks=walks, count_instructions=not fast, **_parse_options(arch_options))
        m.spawn(program, [program, *args], on_output=live)
        result = m.run()
    except LoadError as err:
        _fail(str(err))
    except CheckMMError as err:
        _fail(f"mm audit failed at exit: {err}", 70)
    except (ValueError, plugins.PluginError) as err:
        _fail(str(err), 2)
    summary = result.summary
    if as_json:
        out = {"program": program, "stdout": result.stdout.decode(errors="replace"),
               "stderr": result.stderr.decode(errors="replace"), "exit_code": result.exit_code,
               "signal": _signal_json(result.signal), **summary}
        click.echo(json.dumps(out, indent=2))
    else:
        sys.stdout.flush()
        if result.signal is not None:
            click.echo(f"emu: guest killed by {result.signal.name}", err=True)
            click.echo(result.signal.format(), err=True)
        _print_summary(summary, result.exit_code)
    sys.exit(result.exit_code if result.exit_code is not None else 1)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, object]:
    """KEY=VALUE strings -> keyword arguments; true/false become booleans."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"arch option {pair!r}: use KEY=VALUE")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _live_output(fd: int, data: bytes) -> None:
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.buffer.write(data)
    stream.flush()


def _signal_json(sig: Any) -> dict | None:
    if sig is None:
        return None
    return {"signal": sig.name, "code": sig.code, "address": sig.address, "pc": sig.pc,
            "access": sig.access, "instruction": sig.instruction, "detail": sig.detail}


def _print_summary(s: dict[str, Any], exit_code: int | None) -> None:
    console = Console(stderr=True)
    t = Table(title=f"emu run summary ({s['arch']}, kernel {s['kernel']})", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    faults = ", ".join(f"{k} {v}" for k, v in s["faults_by_kind"].items() if v) or "none"
    counted = s["instructions"] is not None
    rows = [("exit code", exit_code),
            ("instructions", f"{s['instructions']:,}" if counted else "not counted (--fast)"),
            ("TLB fills (hits)", f"{s['tlb_fills']:,} ({s['tlb_hits']:,})"),
            ("page walks (table reads)", f"{s['walks']:,} ({s['walk_reads']:,})"),
            ("faults", f"{s['faults']:,}: {faults}"),
            ("pages allocated / freed", f"{s['pages_allocated']:,} / {s['pages_freed']:,}"),
            ("page-table pages allocated / freed", f"{s['pt_pages_allocated']} / {s['pt_pages_freed']}"),
            ("unknown syscalls", ", ".join(f"{k}x{v}" for k, v in s["unknown_syscalls"].items()) or "none"),
            ("page tables RCU-deferred / pages RCU-freed",
             f"{s['pt_tables_rcu_deferred']} / {s['pt_pages_rcu_freed']}"),
            ("run time", f"{s['seconds']:.3f} s"),
            ("guest MIPS", f"{s['mips']:.2f}" if counted else "-")]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)


# -- emu demo --------------------------------------------------------------------------------
def _workload(arch: str, name: str) -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (os.getcwd(), here):
        p = os.path.join(base, "workloads", "bin", arch, name)
        if os.path.isfile(p):
            return p
    return None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
def demo(as_json: bool) -> None:
    """Run the built-in workloads on all four arches and compare them side by side."""
    from emu.machine import Machine
    arches = ["x86_64", "arm64", "s390x", "ppc64"]
    results: dict[str, dict[str, Any]] = {}
    console = Console()
    with console.status("running workloads") as status:
        for name, args in DEMO_WORKLOADS:
            for arch in arches:
                status.update(f"{name} on {arch}")
                path = _workload(arch, name)
                if path is None:
                    results.setdefault(name, {})[arch] = {"error": "workload ELF not found"}
                    continue
                m = Machine(arch=arch)
                m.spawn(path, [name, *args])
                r = m.run()
                results.setdefault(name, {})[arch] = {
                    "stdout": r.stdout.decode(errors="replace"), "exit_code": r.exit_code,
                    "signal": r.signal.name if r.signal else None, **r.summary}
    agree = {n: len({(v.get("stdout"), v.get("exit_code")) for v in per.values()}) == 1
             for n, per in results.items()}
    if as_json:
        click.echo(json.dumps({"results": results, "same_output": agree}, indent=2))
        return
    for name, per in results.items():
        t = Table(title=f"{name}: output identical on all arches: {'yes' if agree[name] else 'NO'}")
        t.add_column("")
        for arch in arches:
            t.add_column(arch, justify="right")
        keys = [("exit code", "exit_code"), ("instructions", "instructions"), ("TLB fills", "tlb_fills"),
                ("walks", "walks"), ("faults", "faults"), ("PT pages alloc", "pt_pages_allocated"),
                ("PT pages freed", "pt_pages_freed"), ("PT tables RCU-deferred", "pt_tables_rcu_deferred"),
                ("seconds", "seconds"), ("MIPS", "mips")]
        for label, key in keys:
            t.add_row(label, *[str(per[a].get(key, per[a].get("error", ""))) for a in arches])
        console.print(t)
        first = next(iter(per.values()))
        console.print("[dim]" + (first.get("stdout") or "").rstrip().replace("[", r"\[") + "[/dim]\n")
    if not all(agree.values()):
        sys.exit(1)


# -- emu plugins ---------------------------------------------------------------------------------
@cli.group(name="plugins")
def plugins_cmd() -> None:
    """Arch plugins: list them, check one against the contract."""


@plugins_cmd.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def plugins_list(as_json: bool) -> None:
    """Show every arch plugin, where it comes from, and its page-table geometry."""
    try:
        found = plugins.arches()
    except plugins.PluginError as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps({n: {"source": i.source, "plugin": i.plugin,
                                   "geometry": i.cls().describe()} for n, i in found.items()}, indent=2))
        return
    t = Table(title="emu arch plugins")
    for col in ("arch", "source", "levels (Linux name:index bits)", "VA bits", "root register"):
        t.add_column(col)
    for name, info in found.items():
        spec = info.cls()
        t.add_row(name, info.source, spec.describe(), str((spec.task_size - 1).bit_length()),
                  spec.root_register_name)
    for name, why in plugins.broken.items():
        t.add_row(name, "[red]broken[/red]", why, "", "")
    Console().print(t)


# -- emu explore / emu replay ----------------------------------------------------------------------
@cli.command(name="explore")
@click.argument("scenario", required=False)
@click.option("--list", "list_", is_flag=True, help="list scenarios and injectable bugs")
@click.option("--strategy", default="portfolio", show_default=True,
              help="portfolio, pct[:DEPTH], random[:STICKINESS], round-robin, dfs[:MAX_PREEMPTIONS], "
                   "dpor (every interleaving, partial-order reduced)")
@click.option("--budget", default=1000, show_default=True, help="schedules to try")
@click.option("--seconds", type=float, default=None, help="stop after this many seconds")
@click.option("--seed", default=0, show_default=True)
@click.option("--kernel", "profile", default=None, type=click.Choice(list(PROFILES)),
              help=f"mm semantics profile [default: {DEFAULT_PROFILE}, or the injected bug's kernel]")
@click.option("--arch", default="x86_64", show_default=True)
@click.option("--inject", multiple=True, metavar="BUG", help="re-create a historical bug (repeatable)")
@click.option("--workers", default=1, show_default=True, help="processes exploring in parallel")
@click.option("--no-shrink", is_flag=True, help="report the schedule as found")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="also write the finding as JSON to this file")
@click.option("--json", "as_json", is_flag=True)
def explore_cmd(scenario: str | None, list_: bool, strategy: str, budget: int, seconds: float | None,
                seed: int, profile: str, arch: str, inject: tuple[str, ...], workers: int,
                no_shrink: bool, report_path: str | None, as_json: bool) -> None:
    """Search SCENARIO's interleavings for a race; exit 1 with a report if one is found."""
    from emu import explore as ex
    if list_:
        _list_scenarios(as_json)
        return
    if scenario is None:
        raise UsageError("name a scenario (emu explore --list shows them)")
    try:
        spec = ex.get_spec(scenario)
        ex.check_bugs(list(inject))
        from emu.sched.strategy import make_strategy
        if strategy not in ("portfolio", "dpor") and not strategy.startswith("dfs"):
            make_strategy(strategy)
        if arch not in plugins.arches():
            raise ex.ExploreError(f"unknown arch {arch!r}")
        if strategy == "dpor":
            ex.check_dpor(spec)
    except (ex.ExploreError, ValueError) as err:
        raise UsageError(str(err)) from None
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    profile = _explore_kernel(profile, inject, spec.kernel)
    if as_json:
        result = ex.explore(spec, strategy, budget, seconds, seed, arch, profile, inject, workers=workers)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
            job = bar.add_task(f"{scenario} ({strategy})", total=budget)
            result = ex.explore(spec, strategy, budget, seconds, seed, arch, profile, inject,
                                progress=lambda n: bar.update(job, completed=n), workers=workers)
    if result.outcome is not None and not no_shrink:
        result.outcome = ex.shrink(spec, result.outcome)
        result.outcome, result.certified, result.certify_runs = ex.certify(spec, result.outcome)
    out = _explore_json(result, profile, arch, inject, seed, strategy)
    if report_path and result.outcome is not None:
        _write_atomic(report_path, json.dumps(out, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif result.outcome is None:
        click.echo(f"{scenario}: {result.schedules} schedules in {result.seconds:.1f} s, no finding "
                   f"(kernel {profile}{', injected ' + ', '.join(inject) if inject else ''})"
                   + ("; DPOR explored every interleaving" if result.exhausted else ""))
    else:
        click.echo(_explore_text(result))
    sys.exit(1 if result.outcome is not None else 0)


def _explore_kernel(profile: str | None, inject: tuple[str, ...], home: str = DEFAULT_PROFILE) -> str:
    """--kernel, or else the kernel the injected bugs live in (emu.scenarios.BUG_KERNELS),
    or else the scenario's own (``home``: ScenarioSpec.kernel, the default for most); a bug
    injected under another kernel than its own gets a note."""
    from emu.scenarios import BUG_KERNELS
    homes = {bug: BUG_KERNELS.get(bug, DEFAULT_PROFILE) for bug in inject}
    if profile is None:
        kernels = sorted(set(homes.values()))
        if len(kernels) > 1:
            raise UsageError("the injected bugs live in different kernels ("
                             + ", ".join(f"{b}: {v}" for b, v in homes.items()) + "); pick one with --kernel")
        profile = kernels[0] if kernels else home
        if profile != DEFAULT_PROFILE:
            why = f"the one {', '.join(inject)} lives in" if inject else "the scenario's own"
            click.echo(f"note: kernel {profile}, {why} (--kernel to change)", err=True)
        return profile
    for bug, home in homes.items():
        if home != profile:
            click.echo(f"note: {bug} is a {home} bug; under kernel {profile} the code it breaks may not run",
                       err=True)
    return profile


def _list_scenarios(as_json: bool) -> None:
    from emu.scenarios import BUGS, SCENARIOS
    if as_json:
        click.echo(json.dumps({"scenarios": {n: {"description": s.description, "catches": list(s.catches),
                                                 "kernel": s.kernel}
                                             for n, s in SCENARIOS.items()}, "bugs": BUGS}, indent=2))
        return
    import textwrap
    click.echo("Scenarios (emu explore NAME):")
    for name, spec in SCENARIOS.items():
        click.echo(f"  {name}" + (f"  (kernel {spec.kernel})" if spec.kernel != DEFAULT_PROFILE else ""))
        click.echo(textwrap.indent(textwrap.fill(spec.description, 84), "      "))
        if spec.catches:
            click.echo(f"      catches: {', '.join(spec.catches)}")
    click.echo("\nInjectable bugs (--inject NAME):")
    for name, what in BUGS.items():
        click.echo(f"  {name}")
        click.echo(textwrap.indent(textwrap.fill(what, 84), "      "))


def _explore_json(result: Any, profile: str, arch: str, inject: tuple[str, ...], seed: int,
                  strategy: str) -> dict:
    findings = []
    o = result.outcome
    if o is not None:
        findings.append({
            "signature": o.finding.signature, "sanitizer": o.finding.sanitizer, "title": o.finding.title,
            "details": o.finding.details, "schedule": o.schedule.encode(), "text": o.schedule.text(),
            "preemptions": o.preemptions, "certified_minimal": result.certified,
            "certify_runs": result.certify_runs, "steps": o.steps,
            "original_preemptions": result.original.preemptions, "found_by": result.found_by,
            "schedules_to_detection": result.found_after,
            "replay": f"emu replay {o.schedule.encode()}"})
    return {"scenario": result.scenario, "kernel": profile, "arch": arch, "inject": list(inject),
            "seed": seed, "strategy": strategy, "schedules": result.schedules,
            "seconds": round(result.seconds, 3), "exhausted": result.exhausted, "findings": findings}


def _explore_text(result: Any) -> str:
    o = result.outcome
    certified = {True: "certified minimal by bounded DFS", False: "not minimal",
                 None: "not certified (DFS budget spent)"}[result.certified]
    lines = o.finding.report().splitlines()
    bar = lines.pop()
    lines += ["Interleaving (task: steps, in order; one step = one trap):",
              f"  {o.schedule.text()}",
              f"  {o.preemptions} preemption(s), {certified}; found with "
              f"{result.original.preemptions} by {result.found_by} after {result.found_after} schedule(s), "
              f"{result.seconds:.2f} s",
              f"Replay:  emu replay {o.schedule.encode()}", f"Signature: {o.finding.signature}", bar]
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename, so an existing file is never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@cli.command(name="replay")
@click.argument("schedule")
@click.option("--json", "as_json", is_flag=True)
def replay_cmd(schedule: str, as_json: bool) -> None:
    """Re-run a schedule printed by `emu explore` exactly; exit 1 if it still fails."""
    from emu import explore as ex
    from emu.sched.schedule import Schedule, ScheduleFormatError
    from emu.sched.strategy import Divergence
    try:
        sched = Schedule.decode(schedule)
        out = ex.replay(sched)
    except (ScheduleFormatError, ex.ExploreError) as err:
        raise UsageError(str(err)) from None
    except Divergence as err:
        _fail(f"replay diverged: {err} (the code changed since the schedule was recorded?)", 2)
    same = out.digest == sched.digest
    if as_json:
        click.echo(json.dumps({"scenario": sched.scenario, "finding": out.finding.signature if out.finding
                               else None, "digest_matches": same, "steps": out.steps}, indent=2))
    elif out.finding is None:
        click.echo(f"{sched.scenario}: the schedule ran clean ({out.steps} steps)")
    else:
        click.echo(out.finding.report())
        click.echo(f"replayed {out.steps} steps; event digest {'matches' if same else 'DIFFERS from'} "
                   "the recording")
    sys.exit(1 if out.finding is not None else 0)


@plugins_cmd.command(name="check")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def plugins_check(name: str, as_json: bool) -> None:
    """Run the conformance kit against the arch plugin NAME."""
    from emu.testing import run_checks
    try:
        arch = plugins.get_arch(name)
    except plugins.PluginError as err:
        raise UsageError(str(err)) from None
    results = run_checks(arch)
    if as_json:
        click.echo(json.dumps({"arch": name, "ok": all(r.ok for r in results),
                               "checks": {r.name: list(r.problems) for r in results}}, indent=2))
    else:
        for r in results:
            click.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.name}")
            for problem in r.problems:
                click.echo(f"       {problem}")
        failed = sum(not r.ok for r in results)
        click.echo(f"{name}: {len(results) - failed} passed, {failed} failed")
    sys.exit(0 if all(r.ok for r in results) else 1)


def main() -> None:
    for hook in plugins.manager().hook.emu_register_commands.get_hookimpls():
        hook.function(cli=cli)
    cli(prog_name="emu")


if __name__ == "__main__":
    main()
