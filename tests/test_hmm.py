"""hmm_range_fault() (mm/hmm.c 6.6), the mmu_interval_notifier seq protocol, and the
dmirror driver loop (lib/test_hmm.c)."""
from __future__ import annotations

import pytest
from conftest import BASE, collapsed_world, finish

import emu
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import hmm, huge_memory, khugepaged, mmu_notifier
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mmu_notifier import (
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
)

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def check_against_translate(m, mm, start: int, pfns: list[int]) -> None:
    """Every hmm_pfn says what the CPU page tables say."""
    page = m.kernel.page_size
    for i, pfn in enumerate(pfns):
        va = start + i * page
        pa = m.translate(mm, va)
        if pa is None:
            assert pfn == 0, hex(va)
            continue
        assert pfn & hmm.HMM_PFN_VALID and hmm.hmm_pfn_to_pfn(pfn) == pa // page, hex(va)
        assert bool(pfn & hmm.HMM_PFN_WRITE) == (m.translate(mm, va, "w") is not None), hex(va)


def anon_world(arch: str):
    sc = Scenario(arch=arch)
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    size = huge_memory.hpage_pmd_size(k)
    addr = m.mmap(mm, BASE, 2 * size, RW, ANON)
    return sc, m, k, mm, addr, size


def test_hmm_pfns_match_the_cpu_page_tables(arch: str) -> None:
    sc, m, k, mm, addr, size = anon_world(arch)
    page = k.page_size
    m.touch(mm, addr, write=True)                  # a written anon page
    m.touch(mm, addr + page)                       # the zero page, read-only
    m.mprotect(mm, addr + 3 * page, page, emu.PROT_READ)
    m.touch(mm, addr + 3 * page)
    m.madvise(mm, addr + size, size, emu.MADV_HUGEPAGE)
    m.touch(mm, addr + size, write=True)           # an anon THP: hmm_vma_handle_pmd
    pfns = m.hmm_range_fault(mm, addr, addr + 2 * size)
    assert pfns[0] & hmm.HMM_PFN_WRITE and not pfns[1] & hmm.HMM_PFN_WRITE
    assert pfns[1] == hmm.HMM_PFN_VALID | k.zero_page.paddr // page
    assert pfns[2] == 0 and pfns[3] & hmm.HMM_PFN_VALID
    assert all(p & hmm.HMM_PFN_WRITE for p in pfns[size // page:])
    check_against_translate(m, mm, addr, pfns)
    assert k.stats["hmm_vma_fault"] == 0           # a snapshot: nothing faulted in
    # HMM_PFN_REQ_FAULT: the holes are faulted in (-EBUSY, walk again from ``last``)
    pfns = m.hmm_range_fault(mm, addr, addr + 8 * page, fault=True)
    assert all(p & hmm.HMM_PFN_VALID for p in pfns) and k.stats["hmm_vma_fault"] == 5   # 2, 4-7 (3: own VMA)
    assert k.stats["hmm_range_fault_again"] >= 1
    check_against_translate(m, mm, addr, pfns)
    # HMM_PFN_REQ_WRITE: the zero page is COW-broken, every page now writable
    before = hmm.hmm_pfn_to_pfn(pfns[1])
    with pytest.raises(OSError) as err:             # the read-only VMA: -EPERM
        m.hmm_range_fault(mm, addr, addr + 8 * page, write=True)
    assert err.value.errno == 1
    pfns = m.hmm_range_fault(mm, addr, addr + 3 * page, write=True)
    assert all(p & hmm.HMM_PFN_WRITE for p in pfns) and hmm.hmm_pfn_to_pfn(pfns[1]) != before
    check_against_translate(m, mm, addr, pfns)
    finish(m, mm)


def test_unreadable_vma_and_no_vma_are_errors_or_efault() -> None:
    sc, m, k, mm, addr, size = anon_world("x86_64")
    page = k.page_size
    m.mprotect(mm, addr, page, emu.PROT_NONE)
    m.munmap(mm, addr + 2 * page, page)
    pfns = m.hmm_range_fault(mm, addr, addr + 3 * page)
    assert pfns == [hmm.HMM_PFN_ERROR, 0, hmm.HMM_PFN_ERROR]
    for lo in (addr, addr + 2 * page):              # hmm_vma_walk_test / the no-VMA hole
        with pytest.raises(OSError) as err:
            m.hmm_range_fault(mm, lo, lo + page, fault=True)
        assert err.value.errno == 14
    finish(m, mm)


def _hmm_task(k, mm, sub, rng_out: list):
    async def run():
        await mmap_read_lock(mm)
        rng = hmm.HmmRange(sub, sub.start, sub.last + 1, [0] * ((sub.last + 1 - sub.start) >> k.page_shift))
        rng.notifier_seq = await mmu_interval_read_begin(k, sub)
        ret = await hmm.hmm_range_fault(k, rng)
        await mmap_read_unlock(mm)
        rng_out.append(rng)
        return ret
    return run()


def test_table_retracted_between_the_pmd_read_and_the_map_is_again_then_a_hole(arch: str) -> None:
    """hmm_vma_walk_pmd(): pmdp_get_lockless() saw the table, retract_page_tables() took
    it, pte_offset_map() fails: ``goto again``, and the pmd read again is none: a hole
    (0 for every page, no fault asked). The notifier saw the retraction: the driver's
    read_retry says the snapshot is stale."""
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    size = huge_memory.hpage_pmd_size(k)
    sub = run_sync(mmu_interval_notifier_insert(k, mm, addr, size))
    before = m.hmm_range_fault(mm, addr, addr + size)      # collapse_file() emptied the table
    assert before == [0] * (size // k.page_size) and k.stats["hmm_pmd_again"] == 0
    out: list = []
    sc.task("hmm", _hmm_task(k, mm, sub, out))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # the walk's pt_reads: walk_to_pmd()'s upper levels, walk_pmd_range()'s pmd, then
    # hmm_vma_walk_pmd()'s pmdp_get_lockless(): stop right after that one
    sc.run(f"hmm:pt_read#{k.arch.pmd_level + 2} retract:* hmm:* rcu_gp:*", finish=False)
    assert sc.results["hmm"] == 0
    assert k.stats["hmm_pmd_again"] == 1 and k.stats["pte_map_failed"] >= 1
    assert out[0].hmm_pfns == [0] * (size // k.page_size)
    check_against_translate(m, mm, addr, out[0].hmm_pfns)
    assert mmu_interval_read_retry(sub, out[0].notifier_seq)          # stale: go again
    assert table.state == "freed"
    sc.run()
    finish(m, mm, files=[inode])


def test_seq_moves_only_for_invalidations_that_overlap() -> None:
    sc, m, k, mm, addr, size = anon_world("x86_64")
    page = k.page_size
    for off in range(0, 8 * page, page):
        m.touch(mm, addr + off, write=True)
    a = run_sync(mmu_interval_notifier_insert(k, mm, addr, 4 * page))
    b = run_sync(mmu_interval_notifier_insert(k, mm, addr + 4 * page, 4 * page))
    far = run_sync(mmu_interval_notifier_insert(k, mm, addr + size, page))
    seq_a, seq_b, seq_far = (run_sync(mmu_interval_read_begin(k, s)) for s in (a, b, far))
    m.madvise(mm, addr, 2 * page, emu.MADV_DONTNEED)              # zap: a only
    assert mmu_interval_read_retry(a, seq_a) and not mmu_interval_read_retry(b, seq_b)
    seq_a = run_sync(mmu_interval_read_begin(k, a))
    m.mprotect(mm, addr + 6 * page, page, emu.PROT_READ)          # change_protection: b only
    assert mmu_interval_read_retry(b, seq_b) and not mmu_interval_read_retry(a, seq_a)
    m.mprotect(mm, addr + size + page, page, emu.PROT_READ)       # no populated pmd there: none
    assert not mmu_interval_read_retry(far, seq_far)
    assert not mm.notifier_subscriptions.is_invalidating()
    assert (a.invalidations, b.invalidations, far.invalidations) == (1, 1, 0)
    finish(m, mm)



def test_mremap_and_reclaim_invalidate_a_mirror_of_what_they_unmap() -> None:
    """mremap's move_page_tables() is one MMU_NOTIFY_UNMAP invalidation of the old range;
    try_to_unmap_one() (MADV_PAGEOUT to swap, and a lazyfree MADV_FREE page discarded)
    invalidates the page it unmaps: a mirror of those ranges must read again."""
    sc, m, k, mm, addr, size = anon_world("arm64")
    page = k.page_size
    m.swapon(16)
    for off in range(0, 6 * page, page):
        m.touch(mm, addr + off, write=True)
    old = run_sync(mmu_interval_notifier_insert(k, mm, addr, 2 * page))
    swap = run_sync(mmu_interval_notifier_insert(k, mm, addr + 2 * page, page))
    free = run_sync(mmu_interval_notifier_insert(k, mm, addr + 3 * page, page))
    new = run_sync(mmu_interval_notifier_insert(k, mm, addr + 4 * size, 2 * page))   # no VMA there
    seqs = [run_sync(mmu_interval_read_begin(k, s)) for s in (old, swap, free, new)]
    m.madvise(mm, addr + 2 * page, page, emu.MADV_PAGEOUT)        # anon try_to_unmap_one
    assert mmu_interval_read_retry(swap, seqs[1]) and swap.invalidations == 1
    m.madvise(mm, addr + 3 * page, page, emu.MADV_FREE)
    m.madvise(mm, addr + 3 * page, page, emu.MADV_PAGEOUT)        # the lazyfree discard
    assert k.stats["lazyfree_discarded"] == 1 and mmu_interval_read_retry(free, seqs[2])
    assert old.invalidations == 0
    moved = m.mremap(mm, addr, 2 * page, 2 * page, 3, addr + 4 * size)   # MAYMOVE | FIXED
    assert moved == addr + 4 * size and m.translate(mm, addr) is None and m.translate(mm, moved)
    # move_page_tables(), then move_vma()'s munmap of the (now empty) old range
    assert mmu_interval_read_retry(old, seqs[0]) and old.invalidations == 2
    assert not mmu_interval_read_retry(new, seqs[3]) and new.invalidations == 0
    assert not mm.notifier_subscriptions.is_invalidating()
    finish(m, mm)


def test_retract_moves_the_seq_of_a_notifier_on_its_pmd_only(arch: str) -> None:
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    size = huge_memory.hpage_pmd_size(k)
    on = run_sync(mmu_interval_notifier_insert(k, mm, addr + size - k.page_size, k.page_size))
    off = run_sync(mmu_interval_notifier_insert(k, mm, addr + size, k.page_size))
    seq_on, seq_off = run_sync(mmu_interval_read_begin(k, on)), run_sync(mmu_interval_read_begin(k, off))
    assert run_sync(khugepaged.retract_page_tables(k, inode.mapping, 0)) == 1
    assert mmu_interval_read_retry(on, seq_on) and not mmu_interval_read_retry(off, seq_off)
    sc.run()
    finish(m, mm, files=[inode])


def _driver_vs_zap(bugs: set[str]):
    """The dmirror loop against MADV_DONTNEED landing after the walk, before the mutex."""
    def world():
        sc, m, k, mm, addr, size = anon_world("x86_64")
        k.bugs.update(dict.fromkeys(bugs, True))
        for off in range(0, 4 * k.page_size, k.page_size):
            m.touch(mm, addr + off, write=True)
        dm = run_sync(hmm.dmirror_new(k, mm, addr, 4 * k.page_size))
        sc.task("driver", hmm.dmirror_range_fault(k, dm, addr, addr + 4 * k.page_size))
        return sc, m, k, mm, addr, dm
    # find how many steps the driver takes up to its mmap_read_unlock (a dry run)
    sc, m, k, mm, addr, dm = world()
    sc.run("driver:*", finish=False)
    trace = sc.trace_of("driver")
    steps = next(i for i, ev in enumerate(trace) if "unlock" in ev and "mmap_lock" in ev) + 1
    sc.run()
    sc, m, k, mm, addr, dm = world()
    from mm_core import madvise
    sc.task("zap", madvise.do_madvise(k, mm, addr, 4 * k.page_size, emu.MADV_DONTNEED))
    sc.run(f"driver:{steps} zap:* driver:*", finish=False)
    sc.run()
    return m, k, mm, addr, dm, sc.results["driver"]


def test_driver_retries_when_a_zap_lands_between_the_walk_and_its_mutex() -> None:
    m, k, mm, addr, dm, pfns = _driver_vs_zap(set())
    assert k.stats["hmm_driver_read_retry"] == 1 and dm.retries == 1
    assert pfns == [0, 0, 0, 0] and dm.pt == {}          # the second walk saw the zap
    for a, pfn in dm.pt.items():
        assert hmm.hmm_pfn_to_pfn(pfn) == m.translate(mm, a) // k.page_size
    finish(m, mm)


def test_driver_without_read_retry_keeps_stale_pfns() -> None:
    m, k, mm, addr, dm, pfns = _driver_vs_zap({"hmm_driver_skips_read_retry"})
    assert k.stats["hmm_driver_read_retry"] == 0
    assert len(dm.pt) == 4 and all(m.translate(mm, a) is None for a in dm.pt)   # stale mirror
    finish(m, mm)


def test_read_begin_waits_while_an_invalidation_of_its_interval_runs() -> None:
    sc, m, k, mm, addr, size = anon_world("x86_64")
    sub = run_sync(mmu_interval_notifier_insert(k, mm, addr, k.page_size))

    async def invalidator():
        rng = await mmu_notifier.mmu_notifier_invalidate_range_start(k, mm, addr, addr + k.page_size)
        await mmu_notifier.traps.sleep(1000)
        await mmu_notifier.mmu_notifier_invalidate_range_end(k, rng)

    sc.task("inv", invalidator())
    sc.task("reader", mmu_interval_read_begin(k, sub))
    sc.run("inv:sleep#1 reader:*", finish=False)
    assert sc.state("reader").name == "BLOCKED" and k.stats["mmu_interval_read_begin_wait"] == 1
    sc.run()
    assert sc.results["reader"] % 2 == 1 and not mmu_interval_read_retry(sub, sc.results["reader"])
    finish(m, mm)
