"""Each sanitizer fires on the bug it exists for, with a kernel-style report."""
from __future__ import annotations

import pytest
from conftest import workload

import emu
from emu.arch import Entry, Kind, table_entry
from emu.scenario import Scenario
from emu.sched import traps
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import huge_memory, khugepaged, pgalloc, pgtable, rmap
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.sanitizers import Finding
from mm_core.tlbflush import flush_tlb_range

RW = emu.PROT_READ | emu.PROT_WRITE


def world(arch: str = "x86_64", kernel: str = "6.6"):
    sc = Scenario(arch=arch, kernel=kernel, mem="8M")
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    a = m.mmap(mm, 0x40000000, huge_memory.hpage_pmd_size(k), RW,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.touch(mm, a, write=True)
    return sc, m, k, mm, a, run_sync(rmap.walk_to_pmd(k, mm, a))


def test_sleeping_inside_rcu_read_lock_is_reported() -> None:
    sc, m, k, mm, a, pmdp = world()

    async def bad():
        ptep = await pgtable.pte_offset_map(k, pmdp, a)
        await mmap_read_lock(mm)                      # may sleep: not under rcu_read_lock()
        await mmap_read_unlock(mm)
        await pgtable.pte_unmap(k, ptep)

    sc.task("bad", bad())
    with pytest.raises(Finding, match="RCU: sleeping on <mm1.mmap_lock> inside rcu_read_lock"):
        sc.run()


def test_rcu_imbalance_at_task_end_is_reported() -> None:
    sc, m, k, mm, a, pmdp = world("s390x")

    async def leaky():
        await pgtable.pte_offset_map(k, pmdp, a)      # no pte_unmap()

    sc.task("leaky", leaky())
    with pytest.raises(Finding, match="RCU: leaky ended inside 1 rcu_read_lock") as found:
        sc.run()
    assert any("mapped in leaky" in line for line in found.value.details)     # where the map came from


def two_tables(kernel: str = "6.6"):
    """Two PTE tables of one mm (two PMD extents, one page faulted in each)."""
    sc = Scenario(arch="arm64", mem="8M", kernel=kernel)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, 0x40000000, 2 * size, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.touch(mm, a, write=True)
    m.touch(mm, a + size, write=True)
    return sc, k, mm, [(run_sync(rmap.walk_to_pmd(k, mm, va)), va) for va in (a, a + size)]


def test_pte_unmap_of_a_pointer_no_map_returned_is_reported() -> None:
    """pte_unmap(&orig_pte), a stack copy: the RCU counts balance, the map does not end."""
    sc, k, mm, maps = two_tables()
    stack_copy = 0xFFFFC90000001F48

    async def wrong_pointer():
        ptep = await pgtable.pte_offset_map(k, *maps[0])
        await pgtable.pte_unmap(k, stack_copy)
        return ptep

    sc.task("walker", wrong_pointer())
    with pytest.raises(Finding) as found:
        sc.run()
    f = found.value
    assert f.sanitizer == "PTEMAP" and f.signature == "PTEMAP:bad-unmap:wrong_pointer"
    assert f"pte_unmap() of {stack_copy:#x} that no pte_offset_map*() of walker returned" in f.title
    assert any("mapped in wrong_pointer" in line for line in f.details)
    assert k.rcu.nesting(next(t for t in sc.sched.tasks if t.name == "walker")) == 1


def test_pte_unmap_out_of_lifo_order_is_reported() -> None:
    sc, k, mm, maps = two_tables()

    async def fifo():
        first = await pgtable.pte_offset_map(k, *maps[0])
        second = await pgtable.pte_offset_map(k, *maps[1])
        await pgtable.pte_unmap(k, first)                 # kmap_local: second must go first
        await pgtable.pte_unmap(k, second)

    async def lifo():
        first = await pgtable.pte_offset_map(k, *maps[0])
        second = await pgtable.pte_offset_map(k, *maps[1])
        await pgtable.pte_unmap(k, second + 8)            # any pointer into the table will do
        await pgtable.pte_unmap(k, first)

    sc.task("lifo", lifo())
    sc.run()                                              # the right order: quiet
    sc.task("fifo", fifo())
    with pytest.raises(Finding, match="PTEMAP: pte_unmap\\(\\) out of LIFO order in fifo") as found:
        sc.run()
    assert found.value.signature == "PTEMAP:lifo:fifo"


def test_a_map_outstanding_at_sleep_or_task_end_is_reported_without_rcu() -> None:
    """Under 6.5 the map holds no RCU read section, so only the map-balance check sees a
    task that sleeps, or ends, with a pte still mapped."""
    sc, k, mm, maps = two_tables("6.5")

    async def sleeper():
        ptep = await pgtable.pte_offset_map(k, *maps[1])
        await mmap_read_lock(mm)
        await mmap_read_unlock(mm)
        await pgtable.pte_unmap(k, ptep)

    sc.task("sleeper", sleeper())
    with pytest.raises(Finding, match="PTEMAP: sleeper sleeps on <mm1.mmap_lock> with 1 pte map") as found:
        sc.run()
    assert found.value.signature == "PTEMAP:sleep:sleeper"

    sc, k, mm, maps = two_tables("6.5")

    async def leaker():
        await pgtable.pte_offset_map(k, *maps[0])

    sc.task("leaker", leaker())
    with pytest.raises(Finding, match="PTEMAP: leaker ended with 1 pte map") as found:
        sc.run()
    assert found.value.signature == "PTEMAP:leak:leaker"
    assert any("mapped in leaker" in line for line in found.value.details)


def test_lock_order_inversion_is_reported_without_a_deadlock() -> None:
    sc, m, k, mm, a, pmdp = world("arm64")
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr]

    async def mmap_then_ptl():
        await mmap_read_lock(mm)
        await traps.lock(table.ptl)
        await traps.unlock(table.ptl)
        await mmap_read_unlock(mm)

    async def ptl_then_mmap():
        await traps.lock(table.ptl)
        await traps.lock(mm.mmap_lock, "r")
        await traps.unlock(mm.mmap_lock, "r")
        await traps.unlock(table.ptl)

    sc.task("a", mmap_then_ptl())
    sc.task("b", ptl_then_mmap())
    with pytest.raises(Finding) as found:
        sc.run("a:* b:*")                              # one after the other: no deadlock happens
    assert found.value.signature == "LOCKDEP:mmap_lock/ptl"
    assert "possible circular locking dependency" in found.value.title


def test_pmd_pointing_at_pfn_0_is_reported() -> None:
    sc, m, k, mm, a, pmdp = world("ppc64")
    with pytest.raises(Finding, match="BADPMD: pmd entry pointing at a pfn 0"):
        run_sync(pgtable.set_entry(k, pmdp, k.arch.pmd_level, table_entry(0)))


def _vcpu_with_translation(arch: str = "arm64"):
    import ctypes
    m = emu.Machine(arch=arch, mem="16M")
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4 * 4096, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS)
    m.touch(mm, va, write=True)
    vcpu = m._free_vcpu()
    vcpu.switch_mm(mm)
    entry = (ctypes.c_uint64 * 2)()
    assert vcpu._fill(None, va, 16, entry, None)         # the vCPU's TLB now maps the page
    return m, mm, va, vcpu


def test_munmap_flushes_before_the_page_is_freed() -> None:
    m, mm, va, vcpu = _vcpu_with_translation()
    frame = vcpu.tlb.small[va >> 12][0]
    m.munmap(mm, va, 4 * 4096)              # mmu_gather: flush (an idle vCPU acks at once), then free
    assert vcpu.pending_flush is None and va >> 12 not in vcpu.tlb.small
    assert m.kernel.alloc.page_of(frame) is None and m.kernel.stats["tlb_ipis"] == 1


def test_freeing_a_frame_a_vcpu_still_maps_is_reported() -> None:
    m, mm, va, vcpu = _vcpu_with_translation("s390x")
    page = m.kernel.alloc.page_of(vcpu.tlb.small[va >> 12][0])
    with pytest.raises(Finding, match=r"TLB: vCPU 0 still maps freed frame"):
        m.kernel.alloc.free_pages(page)                   # no zap, no flush: a stale TLB entry


def test_clearing_a_table_pmd_needs_mmap_lock_or_pml_and_ptl() -> None:
    sc, m, k, mm, a, pmdp = world("x86_64")
    table = k.ptdescs[k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr]

    async def pml_only():
        pml = await pgtable.pmd_lock(k, mm, pmdp)         # but not the table's ptl
        await pgtable.clear_entry(k, pmdp, k.arch.pmd_level)
        await traps.unlock(pml)

    async def pml_and_ptl():
        pml = await pgtable.pmd_lock(k, mm, pmdp)
        await traps.lock(table.ptl)
        await pgtable.clear_entry(k, pmdp, k.arch.pmd_level)
        await traps.unlock(table.ptl)
        await traps.unlock(pml)

    sc.task("bad", pml_only())
    with pytest.raises(Finding, match="changed without mmap_lock"):
        sc.run()
    sc2, m2, k2, mm2, a2, pmdp2 = world("x86_64")
    pmdp, k, mm, table = pmdp2, k2, mm2, k2.ptdescs[k2.arch.decode(k2.arch.pmd_level,
                                                                     k2.physmem.read_entry(pmdp2)).paddr]
    sc2.task("good", pml_and_ptl())
    sc2.run()                                              # the retract_page_tables way: fine


# -- TLB shootdowns: the flusher waits for every target vCPU's acknowledgement -------------------

def _guest_and_flusher(arch: str = "x86_64"):
    sc = Scenario(arch=arch, kernel="6.6", mem="32M")
    proc = sc.machine.spawn(workload(arch, "bench_loop"))
    thread = proc.threads[0]
    thread.vcpu.switch_mm(proc.mm)                       # the vCPU is running this mm
    done: list[str] = []

    async def flusher():
        await flush_tlb_range(sc.kernel, proc.mm, 0, 1 << 30)
        done.append("returned")

    sc.task("flusher", flusher())
    return sc, thread, done


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_shootdown_waits_until_the_target_vcpu_acknowledges(arch: str) -> None:
    sc, thread, done = _guest_and_flusher(arch)
    vcpu, flusher = thread.vcpu, sc.sched.tasks[-1]
    sc.run("flusher:2", finish=False)                   # IPI sent; the guest thread is runnable
    assert vcpu.pending_flush and flusher.state is TaskState.BLOCKED and not done
    assert sc.kernel.stats["tlb_ack_waits"] == 1
    sc.run(f"{thread.task.name}:2", finish=False)       # start, then its next scheduling point: the ack
    assert vcpu.pending_flush is None
    sc.run("flusher:*", finish=False)
    assert done == ["returned"]


def test_a_vcpu_in_the_middle_of_a_hardware_walk_acknowledges_after_it() -> None:
    sc, thread, done = _guest_and_flusher()
    vcpu = thread.vcpu
    sc.run("flusher:1", finish=False)
    vcpu.in_walk = True                                 # hw_walk_stepped() is between two reads
    sc.machine._ipi_point(thread.task, ("point", "hw_walk", 0))
    assert vcpu.pending_flush                            # interrupts wait for the instruction
    vcpu.in_walk = False
    sc.machine._ipi_point(thread.task, ("user", thread, 1))
    assert vcpu.pending_flush is None


def test_an_idle_vcpu_acknowledges_at_once() -> None:
    sc, thread, done = _guest_and_flusher()
    thread.task.state = TaskState.BLOCKED                # its only thread sleeps (futex, ...)
    sc.run("flusher:*", finish=False)
    assert done == ["returned"] and thread.vcpu.pending_flush is None
    assert sc.kernel.stats["tlb_ack_waits"] == 0
    thread.task.state = TaskState.RUNNABLE
@pytest.mark.parametrize("kernel", ["6.4", "6.6"])
def test_taking_the_ptl_of_a_pmd_that_names_no_table_is_reported_under_the_65_rules(kernel: str) -> None:
    """pte_lockptr() of a none pmd value is pfn 0's "lock". From 6.5 on pte_lockptr() is
    only ever given a validated snapshot, so taking such a lock is a bug even with no race;
    the 6.4 map takes the live pmd's ptl by design (its callers vouch for the pmd)."""
    sc, m, k, mm, a, pmdp = world("arm64", kernel)

    async def lock_none_pmd():
        ptl = pgtable.pte_lockptr(k, mm, Entry(Kind.NONE), pmdp=pmdp)
        await traps.lock(ptl)
        await traps.unlock(ptl)
        return ptl

    sc.task("locker", lock_none_pmd())
    if kernel == "6.4":
        sc.run()
        assert isinstance(sc.results["locker"], pgtable.NotAPtl) and k.stats["bogus_ptl"] == 1
        return
    with pytest.raises(Finding) as found:
        sc.run()
    assert found.value.signature == "SPINLOCK:bad-ptl:lock_none_pmd"
    report = found.value.report()
    assert "BUG: SPINLOCK: bad magic: locker takes the ptl of pfn 0, not of a page table" in report
    assert "no validated snapshot" in report and f"pmd {pmdp:#x} now" in report


def test_a_retracted_table_keeps_its_own_ptl_until_its_grace_period() -> None:
    """The ptlock lives in the table's ptdesc: a snapshot naming a table already queued by
    pte_free_defer still gives that table's lock (not mm->page_table_lock, not a bogus one)."""
    sc = Scenario(arch="s390x", mem="8M")
    m, k = sc.machine, sc.kernel
    mm = m.new_mm()
    a = m.mmap(mm, 0x40000000, huge_memory.hpage_pmd_size(k), RW,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    assert run_sync(pgtable.pte_alloc(k, mm, pmdp))                    # an empty PTE table
    snapshot = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    table = k.ptdescs[snapshot.paddr]
    assert pgtable.pte_lockptr(k, mm, snapshot) is table.ptl
    run_sync(pgtable.clear_entry(k, pmdp, k.arch.pmd_level))          # what retract_page_tables does
    khugepaged._detached(k, table, "the test")
    run_sync(pgalloc.pte_free_defer(k, table))
    assert table.state == "deferred" and snapshot.paddr not in k.ptdescs
    assert pgtable.pte_lockptr(k, mm, snapshot) is table.ptl and k.stats["bogus_ptl"] == 0
    m.rcu_barrier()
    assert table.state == "freed"
    lock = pgtable.pte_lockptr(k, mm, snapshot)                        # after the grace period
    assert isinstance(lock, pgtable.NotAPtl) and "freed" in lock.what
