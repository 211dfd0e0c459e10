"""World snapshots (emu/snapshot.py): the explorer builds a scenario's world once and runs
every schedule on a restored copy; a copy must behave exactly as a fresh build."""
from __future__ import annotations

import pytest

from emu import explore as ex
from emu.scenario import Scenario
from emu.scenarios import SCENARIOS
from emu.sched.strategy import PCT, RandomWalk
from emu.snapshot import Snapshot

# (scenario, kernel, injected bugs): kernel tasks only, with and without a finding
CASES = [
    ("retract-vs-reader", "6.6", ()),
    ("retract-vs-reader", "6.6", ("pte_offset_map_without_rcu",)),
    ("damon-vs-thp-migration", "6.6", ("damon_endless_again",)),
    ("uffd-move-vs-folio-lock", "6.13", ("move_pages_pte_unmaps_in_map_order",)),
    ("collapse-vs-uffdio-copy", "6.6", ()),
    ("mremap-vs-retract", "6.6", ("move_normal_pmd_without_recheck",)),
    ("fork-vs-retract", "6.6", ()),
    ("swapin-vs-swapin", "6.6", ("do_swap_page_without_pte_same",)),
    ("hmm-vs-retract", "6.6", ()),
]


def _outcomes(name: str, kernel: str, inject: tuple[str, ...], reuse: bool, n: int = 24) -> list[tuple]:
    ex.REUSE_WORLDS = reuse
    try:
        rows = []
        for i in range(n):
            _, strategy = ex.strategy_for("portfolio", 0, i, 200)
            out = ex.execute(SCENARIOS[name], strategy, "x86_64", kernel, inject)
            rows.append((out.digest, out.steps, out.preemptions,
                         out.finding.signature if out.finding else None, out.schedule.encode()))
        return rows
    finally:
        ex.REUSE_WORLDS = True


@pytest.mark.parametrize(("name", "kernel", "inject"), CASES)
def test_restored_worlds_run_as_fresh_ones(name: str, kernel: str, inject: tuple[str, ...]) -> None:
    ex._WORLDS.clear()
    fresh = _outcomes(name, kernel, inject, reuse=False)
    restored = _outcomes(name, kernel, inject, reuse=True)
    assert isinstance(ex._WORLDS[(SCENARIOS[name], "x86_64", kernel, inject)], Snapshot)
    assert restored == fresh
    if inject:
        assert any(row[3] for row in fresh), "the bug should show in a few schedules"


def _built(name: str, strategy) -> tuple[Scenario, object]:
    spec = SCENARIOS[name]
    sc = Scenario(arch="x86_64", kernel="6.6", mem=spec.mem, strategy=strategy, cpus=spec.cpus,
                  quantum=spec.quantum, prefault=spec.prefault)
    return sc, spec.build(sc)


def test_a_copy_is_its_own_world() -> None:
    strategy = PCT(1, 2)
    sc, world = _built("retract-vs-reader", strategy)
    snap = Snapshot.take(sc, world, strategy)
    sc.close()
    assert snap is not None
    other = RandomWalk(5)
    a, wa = snap.restore(other)
    b, wb = snap.restore(strategy)
    try:
        assert a.kernel is not b.kernel and wa.mms[0] is not wb.mms[0]
        assert a.sched.strategy is other and b.sched.strategy is strategy
        # the machine's hooks (closures) name the copy's scheduler, not the original's
        assert a.kernel.tasks() is a.sched.tasks and b.kernel.tasks() is b.sched.tasks
        # every task is a new, unstarted coroutine over the copy's objects
        assert {t.name for t in a.sched.tasks} == {t.name for t in b.sched.tasks}
        assert not {id(t.coro) for t in a.sched.tasks} & {id(t.coro) for t in b.sched.tasks}
        assert a.kernel.physmem is a.machine.ram is not b.machine.ram
        assert a.kernel.physmem.read(world.extra["folio"].paddr, 16) == \
            b.kernel.physmem.read(world.extra["folio"].paddr, 16) != bytes(16)
        a.sched.run()                                   # running one copy leaves the other alone
        assert all(t.steps == 0 for t in b.sched.tasks)
    finally:
        a.close()
        b.close()


def test_worlds_that_cannot_be_copied_are_refused() -> None:
    strategy = PCT(1, 2)
    sc, world = _built("retract-vs-reader", strategy)
    try:
        sc.sched.step(sc.sched.tasks[-1])                # a task that already ran
        assert Snapshot.take(sc, world, strategy) is None
    finally:
        sc.close()
    sc, world = _built("retract-vs-reader", strategy)
    try:
        sc.machine.physmem[0x1000] = 1                   # RAM written behind PhysMem's back
        assert Snapshot.take(sc, world, strategy) is None
    finally:
        sc.close()


def test_every_kernel_task_scenario_has_a_snapshot() -> None:
    """A world that cannot be copied is built fresh every time (correct, ~2x slower): a new
    scenario should not fall back without anyone noticing."""
    refused = []
    for name, spec in SCENARIOS.items():
        if spec.guest:                                    # guest programs: vCPUs, built fresh
            continue
        sc, world = _built(name, PCT(0, 2))
        try:
            if Snapshot.take(sc, world, sc.sched.strategy) is None:
                refused.append(name)
        finally:
            sc.close()
    assert not refused, f"worlds built fresh for every schedule: {refused}"
