"""The walker entry points raced against retract_page_tables() (emu/scenarios/walkers.py's
mprotect-, mlock-, madv-cold-, madv-pageout-, mbind-, numa-maps-, hwpoison- and perf-vs-retract)
or, for the anon-only walkers, against 6.14's MADV_DONTNEED + PT_RECLAIM (emu/scenarios/
pt_reclaim.py: madv-free-, ksm-unmerge-, ksm-scan-vs-pt-reclaim, mincore-vs-dontneed-reclaim, under their
own kernel, ScenarioSpec.kernel): the race really reaches each
walker's map-failure path under the explorer, the fixed kernel answers it as the kernel
does (RETRY / SKIP) with the user-visible result right, and each injected "goes on into
the stale table" bug is a use-after-free of the retracted table, reported in that walker.
perf's walk maps a stack copy of the pmd, which retraction cannot make fail: there the
injected bug is the walk without IRQs off (the RCU read side that keeps the copy's table)."""
from __future__ import annotations

import dataclasses

import pytest

from emu import explore as ex
from emu.scenarios import SCENARIOS
from emu.sched.strategy import RandomWalk

# scenario -> (the k.stats counter of its map-failure path, the injected bug, the walker)
ENTRY = {
    "mprotect-vs-retract": ("change_pmd_retry", "change_pte_range_ignores_map_failure", "change_pmd_range"),
    "mlock-vs-retract": ("mlock_pte_range_again", "mlock_pte_range_ignores_map_failure", "mlock_pte_range"),
    "madv-cold-vs-retract": ("madv_cold_map_failed", "madvise_cold_uses_stale_pmd",
                             "madvise_cold_or_pageout_pte_range"),
    "numa-maps-vs-retract": ("numa_maps_again", "gather_pte_stats_ignores_map_failure", "gather_pte_stats"),
    "hwpoison-vs-retract": ("hwpoison_pte_range_map_failed", "hwpoison_pte_range_ignores_map_failure",
                            "hwpoison_pte_range"),
    "mbind-vs-retract": ("queue_pages_again", "queue_folios_pte_range_ignores_map_failure",
                         "queue_folios_pte_range"),
    # 6.14 (the scenarios' own kernel): MADV_DONTNEED's PT_RECLAIM frees the table
    "madv-free-vs-pt-reclaim": ("madv_free_map_failed", "madvise_free_ignores_map_failure",
                                "madvise_free_pte_range"),
    "ksm-unmerge-vs-pt-reclaim": ("break_ksm_map_failed", "break_ksm_pmd_entry_ignores_map_failure",
                                  "break_ksm_pmd_entry"),
    # ksmd's scan: follow_page() -> follow_page_pte()'s failed map is NULL, the page skipped
    "ksm-scan-vs-pt-reclaim": ("gup_no_page_table", "follow_page_pte_ignores_map_failure", "follow_page_pte"),
    # ptdump's no-VMA walk_pte_range(): pte_offset_map() fails, ACTION_AGAIN
    "ptdump-vs-retract": ("pte_map_failed", "novma_walk_maps_user_table_as_kernel", "ptdump_pte_entry"),
}
# entry points without an injected bug: only that the failure path is reached, clean
REACHED = {"madv-pageout-vs-retract": "madv_cold_map_failed", "mincore-vs-dontneed-reclaim": "mincore_again",
           # follow_page_pte()'s failed map: only after a FOLL_SPLIT_PMD split (the pmd starts huge)
           "gup-split-pmd-vs-collapse": "gup_no_page_table"}
# the same for the THP migration scenario: change_huge_pmd()'s migration-entry branch
MIGRATION = {"mprotect-vs-thp-migration": ("change_huge_pmd_migration",
                                           "change_huge_pmd_keeps_writable_migration_entry")}


def recording(spec: ex.ScenarioSpec, kernels: list) -> ex.ScenarioSpec:
    def build(sc):
        kernels.append(sc.kernel)
        return spec.build(sc)
    return dataclasses.replace(spec, build=build)


@pytest.mark.parametrize("scenario", list(ENTRY) + list(MIGRATION) + list(REACHED))
def test_the_map_failure_path_is_reached_and_handled(scenario: str) -> None:
    if scenario in REACHED:
        counter, bugs = REACHED[scenario], ()
    else:
        counter, bug = (ENTRY.get(scenario) or MIGRATION[scenario])[:2]
        bugs = (bug,)
    assert SCENARIOS[scenario].catches == bugs
    kernels: list = []
    spec = recording(SCENARIOS[scenario], kernels)
    failed = 0
    for seed in range(40):
        outcome = ex.execute(spec, RandomWalk(seed=seed), kernel=spec.kernel)
        assert outcome.finding is None, outcome.finding
        failed += kernels[-1].stats[counter] > 0
    assert failed, f"no schedule of {scenario} reached the walker's {counter} path"


@pytest.mark.parametrize("scenario", ENTRY)
def test_the_injected_walker_reads_the_freed_table(scenario: str) -> None:
    _, bug, walker = ENTRY[scenario]
    spec = SCENARIOS[scenario]
    result = ex.explore(spec, budget=200, seed=3, kernel=spec.kernel, inject=(bug,))
    assert result.outcome is not None
    assert result.outcome.finding.signature == f"UAF:pagetable:read:{walker}"


def test_mprotect_over_a_migrating_thp_is_caught_by_the_oracle_not_a_sanitizer() -> None:
    """Without change_huge_pmd()'s "just be safe and disable write", remove_migration_pmd()
    maps the THP writable again after mprotect(PROT_READ) returned: only the oracle sees it."""
    result = ex.explore(SCENARIOS["mprotect-vs-thp-migration"], budget=100, seed=3,
                        inject=("change_huge_pmd_keeps_writable_migration_entry",))
    assert result.outcome is not None
    assert result.outcome.finding.signature == "ORACLE:mprotect"
    assert "writable" in result.outcome.finding.title


def test_perf_maps_its_pmd_copy_through_a_retraction_and_samples_right() -> None:
    """perf_get_pgtable_size()'s RETRY (a failed pte_offset_map(&pmd)) is for a bad copy
    only: retraction clears the live pmd, never the copy, so no schedule retries, and the
    oracle (size 0 in the retracted range, one page after it) holds on every one."""
    spec = SCENARIOS["perf-vs-retract"]
    assert spec.catches == ("perf_get_page_size_without_irqs_off",)
    kernels: list = []
    rec = recording(spec, kernels)
    for seed in range(40):
        outcome = ex.execute(rec, RandomWalk(seed=seed))
        assert outcome.finding is None, outcome.finding
        assert kernels[-1].stats["perf_pgtable_again"] == 0
        assert kernels[-1].stats["retracted_tables"] == 1           # the table really went


def test_perf_without_irqs_off_reads_the_freed_table_and_the_fixed_twin_does_not() -> None:
    """Without local_irq_save() the table the stack copy names can be freed between
    pmdp_get_lockless() and pte_offset_map(&pmd)'s rcu_read_lock(): a use-after-free in
    perf_get_pgtable_size. The same exploration of the fixed kernel is clean."""
    spec = SCENARIOS["perf-vs-retract"]
    bad = ex.explore(spec, budget=200, seed=3, inject=("perf_get_page_size_without_irqs_off",))
    assert bad.outcome is not None
    assert bad.outcome.finding.signature == "UAF:pagetable:read:perf_get_pgtable_size"
    assert ex.explore(spec, budget=200, seed=3).outcome is None

