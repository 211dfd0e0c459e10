"""Built-in race scenarios for ``emu explore`` (spec/kernel_mm.md §6-7).

A scenario builds a small world with the Machine API and spawns the concurrent kernel
tasks; the explorer runs it under many schedules. Each world is built fresh for every
schedule. Every scenario also says which injectable bugs it is meant to catch; under the
6.6 rules with no injection it must run clean.

The world most of them share is the moment inside collapse_file() just before
retract_page_tables(): a shmem file whose page cache holds one PMD-order folio, mapped by
a process whose PTE table for that range is still there but already empty.

    base.py     the registry (``scenario``, ``SCENARIOS``, ``World``) and the shared worlds
    bugs.py     ``BUGS`` (``--inject``), ``BUG_KERNELS``, ``PROFILE_BUGS``
    retract.py, walkers.py, pt_reclaim.py, uffd.py, gup_hmm.py, swap.py, thp.py, guest.py: the
    scenarios by theme
"""
# importing each theme registers its scenarios, in this order (emu explore --list)
import emu.scenarios.retract  # noqa: E402, F401, I001
import emu.scenarios.walkers  # noqa: E402, F401, I001
import emu.scenarios.pt_reclaim  # noqa: E402, F401, I001
import emu.scenarios.uffd  # noqa: E402, F401, I001
import emu.scenarios.gup_hmm  # noqa: E402, F401, I001
import emu.scenarios.swap  # noqa: E402, F401, I001
import emu.scenarios.thp  # noqa: E402, F401, I001
import emu.scenarios.guest  # noqa: E402, F401, I001
from emu.scenarios.base import (  # noqa: F401  (the package's API)
    BASE,
    SCENARIOS,
    ScenarioSpec,
    World,
    anon_thp,
    collapse_file_tail,
    collapsed_shmem,
    completing,
    huge_refault,
    locked_collapse,
    lockless_reader,
    madvise_collapse_tail,
    read_fault,
    scenario,
    thp_under_migration,
)
from emu.scenarios.bugs import BUG_KERNELS, BUGS, PROFILE_BUGS  # noqa: F401
