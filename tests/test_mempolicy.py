"""NUMA memory policy (mm_core/mempolicy.py, v6.6 mm/mempolicy.c): a machine with RAM split
into nodes, mbind(2) setting VMA policies (splits, merges, fork), the queue_pages_range()
walk over the real tables with MPOL_MF_STRICT / MPOL_MF_MOVE, migration of misplaced pages
(checked through translate() and the pte bytes), and the walk's failure categories forced
by schedules: a retracted table is ACTION_AGAIN (RETRY) then a hole; a migration pmd is
-EIO with no retry."""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish, pte_of

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, madvise, memory, rmap, task_mmu
from mm_core import mempolicy as mp
from mm_core.sched_helpers import stalled_thp_migration

BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def _nodes(m, mm, a: int, n: int) -> list[int | None]:
    out = []
    for i in range(n):
        pa = m.translate(mm, a + i * m.kernel.page_size)
        out.append(None if pa is None else m.page_to_nid(pa))
    return out




def test_nodes_split_ram_in_equal_ranges() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, numa_nodes=4)
    k = m.kernel
    assert [mp.node_pfn_range(k, n) for n in range(4)] == [(i * 2048, (i + 1) * 2048) for i in range(4)]
    assert m.page_to_nid(2047 << 12) == 0 and m.page_to_nid(2048 << 12) == 1
    assert m.page_to_nid((8192 << 12) - 1) == 3
    with pytest.raises(ValueError):
        emu.Machine(arch="x86_64", mem="32M", prefault=False, numa_nodes=3)


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_mbind_move_migrates_misplaced_pages_and_new_faults_follow_the_policy(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False, numa_nodes=2)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    old = {}
    for i in range(6):                                          # pages 6, 7 stay unfaulted
        old[i] = m.touch(mm, a + i * page, write=True)
        k.physmem.write(old[i] + 8, f"page {i}".encode())
    before = {i: pte_of(m, mm, a + i * page) for i in range(6)}
    assert _nodes(m, mm, a, 8) == [0, 0, 0, 0, 0, 0, None, None]
    m.mbind(mm, a + 2 * page, 6 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE | mp.MPOL_MF_STRICT)
    assert [(v.start - a) // page for v in mm.vmas] == [0, 2]  # split once: the range reaches the end
    assert mm.vmas[0].policy is None and str(mm.vmas[1].policy) == "bind:1"
    assert _nodes(m, mm, a, 8) == [0, 0, 1, 1, 1, 1, None, None]
    assert k.stats["numa_pages_migrated"] == 4
    for i in range(6):
        assert m.read_user(mm, a + i * page + 8, 6) == f"page {i}".encode()
        after = pte_of(m, mm, a + i * page)                      # the pte bytes: same bits, new frame
        assert after.kind is Kind.LEAF and after.with_(paddr=0) == before[i].with_(paddr=0)
        assert (after.paddr == old[i]) == (i < 2)
    for i in range(2, 6):                                       # the old frames are free again
        assert k.alloc.page_of(old[i]) is None
        folio = k.alloc.page_of(m.translate(mm, a + i * page))
        assert folio.mapcount == 1 and rmap.folio_anon_vma(folio) is not None
    m.touch(mm, a + 7 * page, write=True)                       # vma_alloc_folio() under bind:1
    assert _nodes(m, mm, a, 8)[7] == 1
    assert m.get_mempolicy(mm, a + 7 * page, mp.MPOL_F_ADDR) == (mp.MPOL_BIND, frozenset({1}))
    assert m.get_mempolicy(mm, a, mp.MPOL_F_ADDR) == (mp.MPOL_DEFAULT, frozenset())
    assert m.get_mempolicy(mm, a + 3 * page, mp.MPOL_F_ADDR | mp.MPOL_F_NODE)[0] == 1
    child = m.fork_mm(mm)                                       # vma_dup_policy()
    assert [str(v.policy) for v in child.vmas] == ["None", "bind:1"]
    m.mbind(mm, a + 2 * page, 6 * page, mp.MPOL_DEFAULT)        # equal policies merge again
    assert len(mm.vmas) == 1 and mm.vmas[0].policy is None
    finish(m, mm, child)


def test_strict_alone_fails_on_a_misplaced_page_and_leaves_the_policy() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, numa_nodes=2)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    m.touch(mm, a + 3 * page, write=True)
    with pytest.raises(OSError) as err:
        m.mbind(mm, a, 4 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_STRICT)
    assert err.value.errno == 5 and len(mm.vmas) == 1 and mm.vmas[0].policy is None
    m.mbind(mm, a, 4 * page, mp.MPOL_BIND, [0], mp.MPOL_MF_STRICT)   # nothing misplaced
    assert str(mm.vmas[0].policy) == "bind:0"
    m.mbind(mm, a, 4 * page, mp.MPOL_BIND, [1])                      # no flags: no walk, no move
    assert str(mm.vmas[0].policy) == "bind:1" and _nodes(m, mm, a, 4)[3] == 0
    finish(m, mm)


def test_holes_and_bad_arguments() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, numa_nodes=2)
    page = m.kernel.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    m.mmap(mm, BASE + 3 * page, page, RW, ANON)
    for args, errno in (((a, 4 * page, mp.MPOL_BIND, [1]), 14),          # the hole at page 2
                        ((a, 2 * page, mp.MPOL_BIND, []), 22),           # empty nodemask
                        ((a, 2 * page, mp.MPOL_BIND, [5]), 22),          # no such node
                        ((a, 2 * page, mp.MPOL_DEFAULT, [1]), 22),
                        ((a + 1, page, mp.MPOL_BIND, [1]), 22)):
        with pytest.raises(OSError) as err:
            m.mbind(mm, *args)
        assert err.value.errno == errno
    assert all(v.policy is None for v in mm.vmas)
    with pytest.raises(OSError) as err:
        m.mbind(mm, a, 2 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE_ALL)
    assert err.value.errno == 1
    m.mbind(mm, a, 4 * page, mp.MPOL_DEFAULT)                    # default: holes are fine
    m.mbind(mm, a, page, mp.MPOL_PREFERRED, [])                  # empty preferred is local
    assert str(mm.vmas[0].policy) == "local"
    finish(m, mm)


def test_interleave_and_the_task_policy() -> None:
    m = emu.Machine(arch="arm64", mem="64M", prefault=False, numa_nodes=2)
    page = m.kernel.page_size
    mm = m.new_mm()
    m.set_mempolicy(mm, mp.MPOL_BIND, [1])
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    b = m.mmap(mm, BASE + 8 * page, 4 * page, RW, ANON)
    m.mbind(mm, b, 4 * page, mp.MPOL_INTERLEAVE, [0, 1])
    for i in range(4):
        m.touch(mm, a + i * page, write=True)
        m.touch(mm, b + i * page, write=True)
    assert _nodes(m, mm, a, 4) == [1, 1, 1, 1]                   # the task's bind:1
    assert _nodes(m, mm, b, 4) == [0, 1, 0, 1]                   # interleave by page offset
    assert m.get_mempolicy(mm) == (mp.MPOL_BIND, frozenset({1}))
    finish(m, mm)


def test_shared_folios_stay_and_pinned_ones_fail_the_migration() -> None:
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, numa_nodes=2)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    shared = m.touch(mm, a, write=True)
    pinned = m.touch(mm, a + page, write=True)
    child = m.fork_mm(mm)                                         # page 0 now mapped twice
    m.exit_mm(child)
    child = m.fork_mm(mm)
    assert m.get_user_pages(mm, a + page, 1, write=True, pin=True) == [m.translate(mm, a + page)]
    pinned = m.translate(mm, a + page)
    m.mbind(mm, a, 2 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE)  # no STRICT: nothing reported
    assert m.translate(mm, a) == shared and m.translate(mm, a + page) == pinned
    assert k.stats["migrate_failed_eagain"] == mp.NR_MAX_MIGRATE_PAGES_RETRY   # pinned: retried, restored
    assert pte_of(m, mm, a + page).kind is Kind.LEAF
    with pytest.raises(OSError) as err:                           # STRICT: the failure is -EIO
        m.mbind(mm, a, 2 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE | mp.MPOL_MF_STRICT)
    assert err.value.errno == 5 and str(mm.vmas[0].policy) == "bind:1"
    m.unpin_user_pages([pinned])
    m.mbind(mm, a, 2 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE | mp.MPOL_MF_STRICT)
    assert _nodes(m, mm, a, 2) == [0, 1]                          # the shared one is left (6.6)
    finish(m, mm, child)


def test_mbind_moves_a_thp_through_its_pmd() -> None:
    m = emu.Machine(arch="arm64", mem="64M", prefault=False, numa_nodes=2)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)
    k.physmem.write(thp + size - 16, b"thp tail")
    m.mbind(mm, a, size, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE | mp.MPOL_MF_STRICT)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.LEAF and pmd.paddr != thp and m.page_to_nid(pmd.paddr) == 1
    assert k.alloc.page_of(pmd.paddr).order == huge_memory.hpage_pmd_order(k)
    assert m.read_user(mm, a + size - 16, 8) == b"thp tail" and k.alloc.page_of(thp) is None
    assert k.stats["numa_pages_migrated"] == size // k.page_size
    finish(m, mm)


# -- the walk's failure categories, forced ------------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_queue_pages_walk_retries_a_retracted_table_and_then_sees_a_hole(arch: str) -> None:
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, "6.6", mem="32M", prefault=False, numa_nodes=2)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("mbind", mp.do_mbind(k, mm, a, size, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    # mbind: the walk's reads down to the pmd, then queue_folios_pte_range's own read of it
    sc.run(f"mbind:pt_read#{k.arch.pmd_level + 2} retract:* mbind:*")
    assert sc.results == {"retract": 1, "mbind": 0}
    assert k.stats["queue_pages_again"] == 1                     # RETRY, once: then a hole
    assert sum(" retry" in t for t in sc.trace_of("mbind")) == 1
    assert k.stats["mbind_isolate_failed"] == 0 and str(mm.vmas[0].policy) == "bind:1"
    finish(m, mm, files=[inode])


def test_queue_pages_walk_without_the_race_maps_the_emptied_table() -> None:
    """The twin of the above without the retraction: the collapse left the table empty,
    the walk maps it at once (no retry) and finds nothing."""
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world("x86_64", mem="32M", prefault=False, numa_nodes=2)
    size = huge_memory.hpage_pmd_size(k)
    assert run_sync(mp.do_mbind(k, mm, a, size, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE | mp.MPOL_MF_STRICT)) == 0
    assert k.stats["queue_pages_again"] == 0 and str(mm.vmas[0].policy) == "bind:1"
    finish(m, mm, files=[inode])


def test_file_folios_are_not_migrated() -> None:
    """A misplaced shmem folio is an isolation failure in the model (only anon folios
    migrate): STRICT reports it as -EIO, without STRICT it stays where it is."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, numa_nodes=2)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("f", 2 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    m.touch(mm, a, write=True)
    m.mbind(mm, a, 2 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE)
    assert _nodes(m, mm, a, 1) == [0] and k.stats["mbind_isolate_failed"] == 1
    with pytest.raises(OSError) as err:
        m.mbind(mm, a, 2 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE | mp.MPOL_MF_STRICT)
    assert err.value.errno == 5
    finish(m, mm, files=[inode])


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])          # s390x has no THP migration entries
def test_queue_pages_walk_over_a_migration_pmd_ends_with_eio(arch: str) -> None:
    """pmd_trans_huge_lock() returns a migration pmd locked and queue_folios_pmd() answers
    -EIO (6.6): the walk ends at once, no ACTION_AGAIN, and mbind fails before touching
    the policy."""
    sc = Scenario(arch=arch, mem="32M", prefault=False, numa_nodes=2)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("mbind", mp.do_mbind(k, mm, a, size, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE))
    sc.run("migrate:* mbind:*", finish=False)
    assert sc.results["mbind"] == -5 and k.stats["queue_pages_again"] == 0
    assert k.stats["mbind_pmd_migration"] == 1 and mm.vmas[0].policy is None
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.MIGRATION
    sc.run()
    assert m.translate(mm, a) == thp
    m.mbind(mm, a, size, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE)   # after it: moved
    assert m.page_to_nid(m.translate(mm, a)) == 1
    finish(m, mm)


# -- /proc/PID/numa_maps ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_numa_maps_counts_the_touched_pages_per_node(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False, numa_nodes=2)
    k = m.kernel
    page = k.page_size
    kb = page >> 10
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    inode = m.memfd_create("shm", 4 * page)
    f = m.mmap(mm, BASE + 16 * page, 4 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for i in range(5):
        m.touch(mm, a + i * page, write=True)
    m.touch(mm, a + 6 * page)                                    # the zero page: not counted
    for i in range(3):
        m.touch(mm, f + i * page)                                # read: mapped, clean
    m.mbind(mm, a + 3 * page, 5 * page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE)
    nodes = _nodes(m, mm, a, 5)                                  # independently: the software walk
    assert nodes == [0, 0, 0, 1, 1]
    m.mlock(mm, a, page)                                         # unevictable: "active"
    child = m.fork_mm(mm)
    lines = m.numa_maps(mm).splitlines()
    assert lines == [
        f"{a:08x} default anon=1 dirty=1 mapmax=2 N0=1 kernelpagesize_kB={kb}",
        f"{a + page:08x} default anon=2 dirty=2 mapmax=2 active=0 N0=2 kernelpagesize_kB={kb}",
        f"{a + 3 * page:08x} bind:1 anon=2 dirty=2 mapmax=2 active=0 N1=2 kernelpagesize_kB={kb}",
        f"{f:08x} default file=/memfd:shm (deleted) mapped=3 active=0 N0=3 kernelpagesize_kB={kb}",
    ]
    assert m.numa_maps(child).splitlines()[:2] == [                # the child's VMAs as split; no policy
        f"{a:08x} default anon=1 dirty=1 mapmax=2 N0=1 kernelpagesize_kB={kb}",   # the folio is mlocked
        f"{a + page:08x} default anon=2 dirty=2 mapmax=2 active=0 N0=2 kernelpagesize_kB={kb}"]
    m.exit_mm(child)
    lines = m.numa_maps(mm).splitlines()                         # mapmax goes with the child
    assert lines[2] == f"{a + 3 * page:08x} bind:1 anon=2 dirty=2 active=0 N1=2 kernelpagesize_kB={kb}"
    finish(m, mm, files=[inode])


def test_numa_maps_counts_a_thp_through_its_pmd() -> None:
    m = emu.Machine(arch="x86_64", mem="64M", prefault=False, numa_nodes=2)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    nr = size // k.page_size
    assert m.numa_maps(mm) == f"{a:08x} default anon={nr} dirty={nr} active=0 N0={nr} kernelpagesize_kB=4\n"
    m.mbind(mm, a, size, mp.MPOL_PREFERRED, [1], mp.MPOL_MF_MOVE)
    assert m.numa_maps(mm) == f"{a:08x} prefer:1 anon={nr} dirty={nr} active=0 N1={nr} kernelpagesize_kB=4\n"
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_numa_maps_walk_retries_a_retracted_table(arch: str) -> None:
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, mem="32M", prefault=False, numa_nodes=2)
    sc.task("numa_maps", task_mmu.show_numa_maps(k, mm))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"numa_maps:pt_read#{k.arch.pmd_level + 2} retract:* numa_maps:*")
    assert sc.results == {"retract": 1, "numa_maps": f"{a:08x} default file=/memfd:race (deleted)\n"}
    assert k.stats["numa_maps_again"] == 1                       # RETRY, once: then a hole
    assert sum(" retry" in t for t in sc.trace_of("numa_maps")) == 1
    finish(m, mm, files=[inode])


def test_numa_maps_over_a_migration_pmd_ends() -> None:
    sc = Scenario(arch="arm64", mem="32M", prefault=False, numa_nodes=2)
    m, k = sc.machine, sc.kernel
    mm, a, _ = anon_thp(m)
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("numa_maps", task_mmu.show_numa_maps(k, mm))
    sc.run("migrate:* numa_maps:*", finish=False)
    assert sc.results["numa_maps"] == f"{a:08x} default\n" and k.stats["numa_maps_again"] == 0
    sc.run()
    assert "N0=" in m.numa_maps(mm)
    finish(m, mm)


# -- NUMA hinting faults that migrate: do_numa_page, do_huge_pmd_numa_page ---------------------

def _thp_on_node1(arch: str, **kw):
    """A THP placed on node 1 by mbind, whose VMA then goes back to the default policy."""
    sc = Scenario(arch=arch, mem="64M", prefault=False, numa_nodes=2, **kw)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, _ = anon_thp(m)
    m.mbind(mm, a, size, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE)
    m.mbind(mm, a, size, mp.MPOL_DEFAULT)
    thp = m.translate(mm, a)
    k.physmem.write(thp + size - 8, b"thp-data")
    assert m.page_to_nid(thp) == 1 and mm.vmas[0].policy is None
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    return sc, m, k, mm, a, size, thp, pmdp


def _pmd(k, pmdp):
    return k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "ppc64"])
def test_a_hinting_fault_on_a_huge_pmd_migrates_the_thp_to_the_cpu_node(arch: str) -> None:
    sc, m, k, mm, a, size, thp, pmdp = _thp_on_node1(arch)
    assert m.numa_scan(mm) == size // k.page_size               # change_huge_pmd(MM_CP_PROT_NUMA)
    pmd = _pmd(k, pmdp)
    assert pmd.kind is Kind.LEAF and pmd.prot == Access.NONE and pmd.paddr == thp
    assert m.translate(mm, a) is None                          # the MMU faults on PAGE_NONE
    assert m.numa_scan(mm) == 0                                # already protnone: handled, not counted
    m.touch(mm, a + 5 * k.page_size)                            # do_huge_pmd_numa_page -> migrate
    pmd = _pmd(k, pmdp)
    assert pmd.kind is Kind.LEAF and pmd.prot != Access.NONE and m.page_to_nid(pmd.paddr) == 0
    assert k.alloc.page_of(pmd.paddr).order == huge_memory.hpage_pmd_order(k)
    assert m.read_user(mm, a + size - 8, 8) == b"thp-data" and k.alloc.page_of(thp) is None
    assert k.stats["numa_migrate_ok"] == 1 and k.stats["numa_hint_faults_huge"] == 1
    m.touch(mm, a, write=True)                                 # exclusive anon: reused, not copied
    assert m.translate(mm, a, "w") == pmd.paddr
    finish(m, mm)


def test_a_failed_thp_migration_restores_the_pmd_not_writable() -> None:
    sc, m, k, mm, a, size, thp, pmdp = _thp_on_node1("x86_64")
    pinned = m.get_user_pages(mm, a, 1, pin=True)               # an extra reference: -EAGAIN
    m.numa_scan(mm)
    m.touch(mm, a)
    pmd = _pmd(k, pmdp)
    assert pmd.paddr == thp and pmd.prot != Access.NONE and not pmd.prot & Access.W and pmd.young
    assert k.stats["numa_migrate_failed"] == 1
    assert k.stats["migrate_failed_eagain"] == mp.NR_MAX_MIGRATE_PAGES_RETRY
    m.unpin_user_pages(pinned)
    finish(m, mm)


def test_a_hinting_fault_under_an_mbind_policy_does_not_migrate() -> None:
    """mpol_misplaced(): a policy without MPOL_F_MOF (any mbind()) names no target node."""
    m = emu.Machine(arch="arm64", mem="64M", prefault=False, numa_nodes=2)
    k = m.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, size, RW, ANON)
    m.mbind(mm, a, size, mp.MPOL_BIND, [1])
    m.madvise(mm, a, size, emu.MADV_HUGEPAGE)
    thp = m.touch(mm, a, write=True)
    assert m.page_to_nid(thp) == 1
    m.numa_scan(mm)
    m.touch(mm, a)
    assert m.translate(mm, a) == thp and k.stats["numa_migrate_ok"] == 0
    assert k.stats["numa_hint_faults_huge"] == 1
    finish(m, mm)


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "s390x", "ppc64"])
def test_a_hinting_fault_on_a_pte_migrates_the_page_to_the_cpu_node(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False, numa_nodes=2)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    m.touch(mm, a, write=True)
    m.touch(mm, a + page, write=True)
    m.mbind(mm, a + page, page, mp.MPOL_BIND, [1], mp.MPOL_MF_MOVE)
    m.mbind(mm, a, 2 * page, mp.MPOL_DEFAULT)
    far = m.translate(mm, a + page)
    k.physmem.write(far, b"far away")
    assert _nodes(m, mm, a, 2) == [0, 1] and len(mm.vmas) == 1
    assert m.numa_scan(mm) == 1                                # single-threaded: the node-0 page is skipped
    assert pte_of(m, mm, a + page).prot == Access.NONE and m.translate(mm, a + page) is None
    m.touch(mm, a + page)                                      # do_numa_page -> migrate_misplaced_folio
    assert _nodes(m, mm, a, 2) == [0, 0] and m.read_user(mm, a + page, 8) == b"far away"
    pte = pte_of(m, mm, a + page)
    assert pte.prot != Access.NONE and pte.paddr != far and k.alloc.page_of(far) is None
    assert k.stats["numa_migrate_ok"] == 1
    finish(m, mm)


def test_a_pmd_changed_while_the_migration_failed_is_fault_retry() -> None:
    """do_huge_pmd_numa_page() after a failed migrate_misplaced_folio(): pmd_lock() again
    and !pmd_same() is ``goto out`` (return 0, the access faults again). Forced: the fault
    is parked after its last unlock before that lock (the first pmd lock's, then
    set_pmd_migration_entry's and remove_migration_pmd's per attempt) while MADV_DONTNEED
    zaps the THP."""
    sc, m, k, mm, a, size, thp, pmdp = _thp_on_node1("x86_64")
    pinned = m.get_user_pages(mm, a, 1, pin=True)
    m.numa_scan(mm)
    unlocks = 1 + 2 * mp.NR_MAX_MIGRATE_PAGES_RETRY
    sc.task("fault", memory.handle_mm_fault(k, mm.vma_lookup(a), a, 0))
    sc.task("zap", madvise.do_madvise(k, mm, a, size, emu.MADV_DONTNEED))
    sc.run(f"fault:unlock#{unlocks} zap:* fault:*", finish=False)
    assert sc.results == {"fault": 0, "zap": 0}
    assert k.stats["numa_migrate_failed"] == 1 and k.stats["numa_fault_pmd_changed"] == 1
    assert k.stats["numa_hint_faults_huge"] == 0                # out_map never ran
    assert _pmd(k, pmdp).kind is Kind.NONE                      # nothing written over the zap
    m.unpin_user_pages(pinned)
    sc.run()
    assert k.alloc.page_of(thp) is None
    finish(m, mm)


def test_the_same_fault_without_the_zap_restores_the_pmd() -> None:
    sc, m, k, mm, a, size, thp, pmdp = _thp_on_node1("x86_64")
    pinned = m.get_user_pages(mm, a, 1, pin=True)
    m.numa_scan(mm)
    sc.task("fault", memory.handle_mm_fault(k, mm.vma_lookup(a), a, 0))
    sc.run("fault:*", finish=False)
    assert k.stats["numa_fault_pmd_changed"] == 0 and k.stats["numa_hint_faults_huge"] == 1
    assert _pmd(k, pmdp).paddr == thp
    m.unpin_user_pages(pinned)
    sc.run()
    finish(m, mm)
