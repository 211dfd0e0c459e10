"""SWP_SYNCHRONOUS_IO swap-in (6.6 do_swap_page's "skip swapcache" branch): an entry one pte
names is read straight into a new folio; an entry with more counts (fork) still goes
through the swap cache. 13ddaf26be32 ("mm/swap: fix race when skipping swapcache", 6.8
and 6.6.19; ``Profile.swapin_skip_swapcache_prepare``) pins the slot with
swapcache_prepare(): a second faulter sleeps a tick and refaults. Without it (6.4/6.5, or
the switch off) the ABA the fix closed is forced by hand: the loser maps a stale copy."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from mm_core import madvise
from mm_core.config import get_profile
from mm_core.memory import FaultResult
from mm_core.mm import MM_ANONPAGES, MM_SWAPENTS
from mm_core.swapfile import SWAP_HAS_CACHE
from tests.test_swap import ANON, ARCHES, BASE, RW, fault, fill, finish, pattern, pte, read_back


def sync_world(arch: str = "x86_64", pages: int = 1, **changes):
    sc = Scenario(arch=arch, mem="32M", prefault=False, **changes)
    m, k = sc.machine, sc.kernel
    si = m.swapon(8, readahead=4, synchronous=True)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * k.page_size, RW, ANON)
    for i in range(pages):
        fill(m, mm, a + i * k.page_size, i)
    m.madvise(mm, a, pages * k.page_size, emu.MADV_PAGEOUT)
    return sc, m, k, mm, a, si


@pytest.mark.parametrize("arch", ARCHES)
def test_a_synchronous_device_swaps_in_without_the_swap_cache(arch: str) -> None:
    sc, m, k, mm, a, si = sync_world(arch, pages=2)
    page = k.page_size
    offs = [pte(k, mm, a + i * page).swp_offset for i in range(2)]
    assert si.synchronous_io and si.inuse_pages == 2
    assert read_back(m, mm, a) == pattern(0, page)
    # read directly: no swap-cache folio, the slot freed at once, no readahead of the other
    assert k.stats["swapin_skip_swapcache"] == 1 and k.stats["swap_readpage"] == 1
    assert si.cache == {} and si.swap_map[offs[0]] == 0 and si.swap_map[offs[1]] == 1
    folio = k.alloc.page_of(pte(k, mm, a).paddr)
    assert (folio.mapcount, folio.refcount) == (1, 1) and "swap" not in folio.extra
    assert mm.rss[MM_ANONPAGES] == 1 and mm.rss[MM_SWAPENTS] == 1
    # certainly exclusive: a write reuses the page, no copy
    m.touch(mm, a, write=True)
    assert pte(k, mm, a).paddr == folio.paddr and k.stats["wp_copy"] == 0
    # a write fault on the other: writable at once
    pa = m.touch(mm, a + page, write=True)
    assert bytes(m.physmem[pa:pa + page]) == pattern(1, page) and si.inuse_pages == 0
    finish(m, mm)


def test_a_shared_entry_goes_through_the_swap_cache_even_on_a_synchronous_device() -> None:
    sc, m, k, mm, a, si = sync_world()
    off = pte(k, mm, a).swp_offset
    child = m.fork_mm(mm)                               # copy_nonpresent_pte: swap count 2
    assert si.swap_map[off] == 2
    assert read_back(m, child, a) == pattern(0, k.page_size)
    assert k.stats["swapin_skip_swapcache"] == 0 and off in si.cache   # swapin_readahead()
    assert read_back(m, mm, a) == pattern(0, k.page_size)
    assert k.stats["swap_cache_hit"] >= 1
    finish(m, child, mm)


def test_the_pin_makes_a_parallel_faulter_sleep_a_tick_and_refault() -> None:
    sc, m, k, mm, a, si = sync_world()
    off = pte(k, mm, a).swp_offset
    sc.task("t1", fault(k, mm, a))
    sc.task("t2", fault(k, mm, a))
    sc.run("t1:swap_map#1 t2:*", finish=False)          # t1 holds SWAP_HAS_CACHE, reading
    assert si.swap_map[off] == 1 | SWAP_HAS_CACHE and si.cache == {}
    assert k.stats["do_swap_page_skip_swapcache_eexist"] == 1 and "t2" not in sc.results
    sc.run("t1:*", finish=False)
    assert sc.results["t1"] is FaultResult.OK and si.swap_map[off] == 0     # swapcache_clear()
    sc.run("t2:*")
    assert sc.results["t2"] is FaultResult.OK                              # goto out: refault
    assert k.stats["swapin_skip_swapcache"] == 1 and k.stats["swap_readpage"] == 1
    assert read_back(m, mm, a) == pattern(0, k.page_size) and k.stats["do_swap_page"] == 1
    assert si.inuse_pages == 0 and mm.rss[MM_ANONPAGES] == 1 and mm.rss[MM_SWAPENTS] == 0
    finish(m, mm)


async def write_and_pageout(k, m, mm, va: int, data: bytes):
    paddr = m.translate(mm, va, "w")
    while paddr is None:
        assert await fault(k, mm, va, write=True) is FaultResult.OK
        paddr = m.translate(mm, va, "w")
    k.physmem.write(paddr, data)
    return await madvise.do_madvise(k, mm, va, k.page_size, emu.MADV_PAGEOUT)


@pytest.mark.parametrize("fixed", [True, False])
def test_the_aba_of_a_reused_slot_and_how_the_pin_closes_it(fixed: bool) -> None:
    """t1 reads the entry into its own folio; t2 swaps the page in, writes new bytes and
    MADV_PAGEOUT puts them in the same slot (the lowest free): the pte holds the same
    entry again. Without the pin t1's pte_same() passes and it maps its stale copy (the
    6.6.0 code); with it t1 never read (swapcache_prepare() failed): it refaults."""
    sc, m, k, mm, a, si = sync_world(swapin_skip_swapcache_prepare=fixed)
    page = k.page_size
    orig = pte(k, mm, a)
    new = b"newer bytes!" + bytes(page - 12)
    sc.task("t1", fault(k, mm, a))
    sc.task("t2", write_and_pageout(k, m, mm, a, new))
    if fixed:
        sc.run("t1:swap_map#1 t2:*", finish=False)      # t1 holds the pin: t2 waits it out
        assert k.stats["do_swap_page_skip_swapcache_eexist"] >= 1 and "t2" not in sc.results
        sc.run("t1:* t2:*", finish=False)
    else:
        sc.run("t1:swap_io#1 t2:*", finish=False)       # t1 read the old bytes, not mapped yet
    assert sc.results["t2"] == 0
    again = pte(k, mm, a)
    assert again.kind is Kind.SWAP and again.swp_offset == orig.swp_offset       # the same entry
    sc.run("t1:*")
    assert sc.results["t1"] is FaultResult.OK
    if fixed:
        assert read_back(m, mm, a) == new
    else:
        assert pte(k, mm, a).kind is Kind.LEAF and read_back(m, mm, a) == pattern(0, page)   # stale
    assert si.inuse_pages == 0
    finish(m, mm)


def test_the_pin_is_a_later_fix_than_the_6_6_0_text() -> None:
    versions = ("5.10", "6.4", "6.5", "6.6", "6.8", "6.14")
    assert [get_profile(v).swapin_skip_swapcache_prepare for v in versions] == [False] * 3 + [True] * 3


def test_the_explorers_scenario_reaches_the_pin_and_runs_clean_only_with_it() -> None:
    """emu explore swapin-skip-swapcache: under 6.6 (the pin) random schedules are clean and
    some meet a held pin (FAULT-RETRY); under 6.5 (no pin) the explorer finds the stale copy."""
    import dataclasses

    from emu import explore as ex
    from emu.scenarios import SCENARIOS
    from emu.sched.strategy import RandomWalk
    kernels: list = []

    def build(sc):
        kernels.append(sc.kernel)
        return SCENARIOS["swapin-skip-swapcache"].build(sc)
    spec = dataclasses.replace(SCENARIOS["swapin-skip-swapcache"], build=build)
    pinned = 0
    for seed in range(40):
        outcome = ex.execute(spec, RandomWalk(seed=seed))
        assert outcome.finding is None, outcome.finding
        pinned += kernels[-1].stats["do_swap_page_skip_swapcache_eexist"] > 0
        assert kernels[-1].stats["swapin_skip_swapcache"] >= 1
    assert pinned
    stale = ex.explore(SCENARIOS["swapin-skip-swapcache"], budget=400, seed=1, kernel="6.5")
    assert stale.outcome is not None and stale.outcome.finding.signature == "ORACLE:swapin-stale"


# the schedule benchmarks/explore.py's full-clean run found (swapin-skip-swapcache, 6.6):
# the writer faults the page in and frees the slot, the reader (orig_pte read before)
# finds no swap-cache folio and a swap count of 0, so swapin_readahead() gives no folio;
# the writer's MADV_PAGEOUT reuses the slot, and the reader's back-out sees the same swap
# pte again: VM_FAULT_OOM with no allocation failure behind it
SPURIOUS_OOM = ("emu1.mwG1c3dhcGluLXNraXAtc3dhcGNhY2hlozYuNqZ4ODZfNjSgk6praHVnZXBhZ2VkpnJlYWRlcqZ3cml0ZXLc"
                "ABgAAgEBAgUBBAIBAQECCQEGAgcBAgI4AQmwYjEwNzU4NmE0ZGU2ODU0M7ZyYW5kb20oc3RpY2tpbmVzcz0wLjUpAJA")


def test_a_spurious_vm_fault_oom_is_retried_not_fatal() -> None:
    """pagefault_out_of_memory() (5.16+): a VM_FAULT_OOM that no failed allocation caused
    warns "Huh VM_FAULT_OOM leaked out to the #PF handler. Retrying PF" and the access
    faults again; the reader then reads the bytes the writer swapped out last."""
    import dataclasses

    from emu import explore as ex
    from emu.scenarios import SCENARIOS
    from emu.sched.schedule import Schedule
    from emu.sched.strategy import Replay
    schedule = Schedule.decode(SPURIOUS_OOM)
    spec = SCENARIOS[schedule.scenario]
    kernels: list = []

    def build(sc):
        kernels.append(sc.kernel)
        return spec.build(sc)

    recorded = dataclasses.replace(spec, build=build)        # built fresh: its kernel stays readable
    tids = ex._tids_of(spec, schedule, ())
    strategy = Replay([tids[n] for n in schedule.picks()], lenient=True, data=schedule.data)
    outcome = ex.execute(recorded, strategy, schedule.arch, schedule.kernel)
    k = kernels[-1]
    assert outcome.finding is None, outcome.finding
    assert k.stats["pagefault_oom_retry"] == 1 and k.alloc.failures == 0
    assert "Huh VM_FAULT_OOM leaked out to the #PF handler. Retrying PF" in k.log


def test_a_real_out_of_memory_fault_is_still_fatal() -> None:
    """The other side of pagefault_out_of_memory(): when the fault's own allocation failed
    (the OOM killer's victim is the faulting task here) the access ends in OOM."""
    m = emu.Machine(arch="x86_64", mem="4M", prefault=False)
    mm = m.new_mm()
    a = m.mmap(mm, 0x40000000, 8 << 20, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    with pytest.raises(emu.GuestAccessError, match="OOM"):
        for off in range(0, 8 << 20, 4096):
            m.touch(mm, a + off, write=True)
    assert m.kernel.alloc.failures >= 1 and m.kernel.stats["pagefault_oom_retry"] == 0
