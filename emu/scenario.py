"""Deterministic interleaving scenarios: kernel tasks plus a hand-written schedule.

    sc = Scenario(arch="x86_64", kernel="6.6")
    m, k = sc.machine, sc.kernel
    ...build processes, mappings and files with the Machine API...
    sc.task("walker", walker(k, ...))
    sc.task("retract", retract_page_tables(k, mapping, 0))
    sc.run("walker:4 retract:* rcu_gp:* walker:*")

Every trap of every task is one step, so a schedule pins the exact interleaving; the same
schedule always gives the same result. ``sc.trace`` lists the traps taken, to find the
step counts when writing a schedule.
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Coroutine, Generator
from typing import Any

from emu.machine import Machine
from emu.sched import traps
from emu.sched.loop import close_coroutine, close_coroutines
from emu.sched.script import run_script
from emu.sched.strategy import Strategy
from emu.sched.task import Task, TaskState
from mm_core.config import Profile, get_profile


class Scenario:
    def __init__(self, arch: str = "x86_64", kernel: str | Profile = "6.6", mem: str = "64M",
                 strategy: Strategy | str = "round-robin", cpus: int = 1, quantum: int = 20000,
                 prefault: bool = True, numa_nodes: int = 1, *, traced: bool = True,
                 **profile_changes: Any) -> None:
        profile = kernel if isinstance(kernel, Profile) else get_profile(kernel)
        if profile_changes:
            profile = dataclasses.replace(profile, name=f"{profile.name}+custom", **profile_changes)
        self.machine = Machine(arch=arch, mem=mem, kernel=profile, policy=strategy, cpus=cpus,
                               quantum=quantum, prefault=prefault, numa_nodes=numa_nodes)
        self.kernel = self.machine.kernel
        self.sched = self.machine.scheduler
        self.trace: list[tuple[str, tuple]] = []
        self.results: dict[str, Any] = {}
        self.traced = traced
        self.machine._start_kthreads()          # rcu_gp and khugepaged, as in any run

    def task(self, name: str, coro: Coroutine[Any, Any, Any]) -> Task:
        """A task running ``coro``; its return value lands in ``results[name]`` and its
        traps in ``trace``. With ``traced=False`` (the explorer, which reads neither) the
        task runs ``coro`` itself, one wrapper less on every step."""
        task = self.sched.spawn(self._traced(name, coro) if self.traced else coro, name)
        task.kstate["coro"] = coro             # the body, for reports
        return task

    @types.coroutine
    def _traced(self, name: str, coro: Coroutine[Any, Any, Any]) -> Generator[tuple, Any, Any]:
        # forward every trap, recording it: the coroutine protocol by hand (a generator-based
        # coroutine, like the traps, delegating to traps.forward())
        value: Any = None
        try:
            while True:
                try:
                    event = coro.send(value)
                except StopIteration as done:
                    self.results[name] = done.value
                    return done.value
                self.trace.append((name, event))
                value = yield from traps.forward(event)
        finally:
            close_coroutine(coro)

    def run(self, schedule: str = "", finish: bool = True) -> None:
        """Follow ``schedule``; then, with ``finish``, run what is left round-robin."""
        if schedule:
            run_script(self.sched, schedule)
        if finish:
            self.sched.run()

    def close(self) -> None:
        """Drop every coroutine that did not finish (a run stopped by a finding)."""
        coros = []
        for t in self.sched.tasks:
            if t.state is not TaskState.DONE:
                coros.append(t.coro)
                inner = t.kstate.get("coro")
                if inner is not None:       # a wrapper that never started leaves its body unstarted
                    coros.append(inner)
        close_coroutines(coros)
        self.machine.ram.close(recycle=True)    # the next scenario reuses the zeroed buffer

    def state(self, name: str) -> TaskState:
        return next(t.state for t in self.sched.tasks if t.name == name)

    def trace_of(self, name: str) -> list[str]:
        """The trap kinds ``name`` took, numbered from 1 (for writing schedules)."""
        return [f"{i}: {ev[0]} {ev[1] if len(ev) > 1 else ''}"
                for i, ev in enumerate((e for n, e in self.trace if n == name), 1)]
