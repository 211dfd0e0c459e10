"""ptdump (mm/ptdump.c): walk_page_range_novma() over init_mm (pte_offset_kernel(), nothing
to fail) and over a user mm (pte_offset_map() without the ptl under mmap_write_lock, which
does not keep retract_page_tables() out: a failed map is ACTION_AGAIN, RETRY)."""
from __future__ import annotations

import pytest
from conftest import ARCHES, BASE, collapsed_world

import emu
from emu.arch import Access, Entry, Kind
from emu.sched.loop import run_sync
from mm_core import huge_memory, khugepaged, pagewalk, ptdump, vmalloc
from mm_core.sanitizers import Finding

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def ranges(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, attributes, level) of each printed range."""
    out = []
    for line in text.splitlines():
        if line.startswith("---["):
            continue
        span, _size, *attrs, level = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        out.append((lo, hi, " ".join(attrs), level))
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_kernel_dump_shows_each_vmalloc_area_at_its_level(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page, span = k.page_size, huge_memory.hpage_pmd_size(k)
    small = run_sync(vmalloc.vmalloc(k, 3 * page))
    huge = run_sync(vmalloc.vmalloc(k, 2 * span, huge=True))
    text = m.ptdump()
    assert text.splitlines()[0] == "---[ vmalloc() Area ]---"
    rw = "KER RW NX" if ptdump.has_user_bit(k) else "RW NX"
    assert ranges(text) == [(small, small + 3 * page, rw, "pte"), (huge, huge + 2 * span, rw, "pmd")]
    assert m.ptdump_check_wx() == 0 and k.log[-1] == "Checked W+X mappings: passed, no W+X pages found."
    run_sync(vmalloc.vfree(k, small))
    assert [r[:2] for r in ranges(m.ptdump())] == [(huge, huge + 2 * span)]
    assert ptdump.has_user_bit(k) == (arch != "s390x")


@pytest.mark.parametrize("arch", ARCHES)
def test_check_wx_counts_writable_executable_kernel_pages(arch: str) -> None:
    """A PAGE_KERNEL_EXEC-style pte (as a careless module_alloc() would leave) written
    into init_mm's table next to a vmalloc area is found by the W+X check."""
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    a = run_sync(vmalloc.vmalloc(k, 2 * k.page_size))
    frame = k.init_mm.vm_areas[a].pages[0].paddr
    ptep = run_sync(vmalloc._entry_of(k, k.init_mm, a + k.page_size, k.arch.pte_level))
    leaf = Entry(Kind.LEAF, paddr=frame, prot=Access.RWX, user=False, young=True, dirty=True)
    k.physmem.write_entry(ptep, k.arch.encode(k.arch.pte_level, leaf))
    assert m.ptdump_check_wx() == 1
    assert k.log[-2] == f"WARNING: Found insecure W+X mapping at address {a + k.page_size:#x}"
    assert k.log[-1] == "Checked W+X mappings: FAILED, 1 W+X pages found."
    attrs = [r[2] for r in ranges(m.ptdump())]
    assert len(attrs) == 2 and attrs[1].endswith("RW x")
    k.physmem.write_entry(ptep, 0)
    run_sync(vmalloc.vfree(k, a))


@pytest.mark.parametrize("arch", ARCHES)
def test_user_dump_shows_ptes_thp_and_protections(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page, span = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, RW, ANON)
    for i in range(3):
        m.touch(mm, a + i * page, write=True)
    m.mprotect(mm, a + 2 * page, page, emu.PROT_READ)
    h = m.mmap(mm, BASE + span, span, RW, ANON)
    m.madvise(mm, h, span, emu.MADV_HUGEPAGE)
    m.touch(mm, h, write=True)
    text = m.ptdump(mm)
    usr = "USR " if ptdump.has_user_bit(k) else ""
    assert text.splitlines()[0] == "---[ User Space ]---"
    got = [r for r in ranges(text) if r[0] >= BASE]
    assert got == [(a, a + 2 * page, usr + "RW NX", "pte"),
                   (a + 2 * page, a + 3 * page, usr + "ro NX", "pte"),
                   (h, h + span, usr + "RW NX", "pmd")]
    m.exit_mm(mm)


def test_a_table_with_swap_entries_prints_them() -> None:
    m = emu.Machine(arch="arm64", mem="64M", prefault=False)
    k = m.kernel
    m.swapon(16)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, RW, ANON)
    m.touch(mm, a, write=True)
    m.touch(mm, a + k.page_size, write=True)
    m.madvise(mm, a + k.page_size, k.page_size, emu.MADV_PAGEOUT)
    got = [r[2:] for r in ranges(m.ptdump(mm)) if r[0] >= BASE]
    assert got == [("USR RW NX", "pte"), ("swap", "pte")]
    m.exit_mm(mm)


def test_novma_walk_of_an_empty_range_is_einval() -> None:
    m = emu.Machine(arch="x86_64", mem="16M", prefault=False)
    mm = m.new_mm()
    ops = pagewalk.MmWalkOps()
    assert run_sync(pagewalk.walk_page_range_novma(m.kernel, mm, BASE, BASE, ops)) == -22
    m.exit_mm(mm)


def _dump_vs_retract(arch: str, n: int, kernel: str = "6.6"):
    """A user dump preempted at its n-th page-table read by retract_page_tables() of the
    collapsed shmem range; an anon page mapped after it must still be in the dump."""
    sc, m, k, mm, inode, a, pmdp, table = collapsed_world(arch, kernel, mem="32M", prefault=False)
    span = huge_memory.hpage_pmd_size(k)
    b = m.mmap(mm, a + span, k.page_size, RW, ANON)
    m.touch(mm, b, write=True)
    sc.task("ptdump", ptdump.ptdump_show(k, mm))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"ptdump:pt_read#{n} retract:* ptdump:*")
    return sc, m, k, mm, inode, a, b, table


@pytest.mark.parametrize("arch", ["x86_64", "s390x", "ppc64"])      # arm64's geometry is x86's
def test_user_dump_racing_retract_retries_and_stays_right(arch: str) -> None:
    """Whatever page-table read of the dump retract_page_tables() comes after, the dump
    is right (the empty table and the retracted pmd both show nothing there, the anon
    page after it is shown) and no sanitizer fires; at the reads between the walk's pmd
    read and its map, the map fails and the pmd is read again (RETRY)."""
    reads = _dump_reads(arch)
    sc, m, k, mm, inode, a, pmdp, table = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    first = reads.index(pmdp) + 1                   # the walk's first read of the pmd
    inside = next(i for i, r in enumerate(reads, 1) if table.paddr <= r < table.paddr + k.page_size)
    sc.close()
    failed_at = []
    for n in range(first - 1, inside + 1):
        sc, m, k, mm, inode, a, b, table = _dump_vs_retract(arch, n)
        usr = "USR " if ptdump.has_user_bit(k) else ""
        shown = [r for r in ranges("\n".join(sc.results["ptdump"])) if r[0] >= BASE]
        assert shown == [(b, b + k.page_size, usr + "RW NX", "pte")]
        assert sc.results["retract"] == 1              # (a sanitizer finding would have raised)
        if k.stats["pte_map_failed"]:
            failed_at.append(n)
        m.exit_mm(mm)
        m.close_file(inode)
        m.rcu_barrier()
        assert table.state == "freed"
    assert failed_at, "no preemption point fell between the pmd read and the map"


def _world(bugs: set, arch: str = "x86_64"):
    sc, m, k, mm, inode, a, pmdp, table = collapsed_world(arch, "6.6", mem="32M", prefault=False)
    k.bugs.update(dict.fromkeys(bugs, True))
    return sc, m, k, mm, inode, a, pmdp, table


def _dump_reads(arch: str, bugs: set = frozenset()) -> list[int]:
    """The addresses of the dump's page-table reads, in order (a dry run of the dump
    alone on the same, deterministic world)."""
    sc, m, k, mm, inode, a, pmdp, table = _world(bugs, arch)
    sc.task("ptdump", ptdump.ptdump_show(k, mm))
    sc.run()
    return [ev[2] for name, ev in sc.trace if name == "ptdump" and ev[:2] == ("point", "pt_read")]


def _first_read_inside(bugs: set) -> int:
    """The number of the dump's first page-table read inside the collapsed range's PTE
    table."""
    sc, m, k, mm, inode, a, pmdp, table = _world(bugs)
    sc.close()
    return next(i for i, r in enumerate(_dump_reads("x86_64", bugs), 1)
                if table.paddr <= r < table.paddr + k.page_size)


def test_user_dump_without_rcu_reads_a_freed_table() -> None:
    """With the map's RCU read section taken away (pte_offset_map_without_rcu), the
    retracted table is freed while the dump reads it: the table-lifetime sanitizer."""
    bugs = {"pte_offset_map_without_rcu"}
    n = _first_read_inside(bugs)
    sc, m, k, mm, inode, a, pmdp, table = _world(bugs)
    sc.task("ptdump", ptdump.ptdump_show(k, mm))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    with pytest.raises(Finding) as exc:
        sc.run(f"ptdump:pt_read#{n - 1} retract:* rcu_gp:* ptdump:*")
    assert exc.value.sanitizer == "KASAN" and table.state == "freed"
    sc.close()


def test_user_dump_with_rcu_keeps_the_table_until_it_is_done() -> None:
    """The same interleaving under 6.6: the table is only detached (RCU-deferred) while
    the dump reads it, and freed after the dump's pte_unmap() and a grace period."""
    n = _first_read_inside(set())
    sc, m, k, mm, inode, a, pmdp, table = _world(set())
    sc.task("ptdump", ptdump.ptdump_show(k, mm))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"ptdump:pt_read#{n - 1} retract:* rcu_gp:*", finish=False)
    assert table.state == "deferred" and sc.results["retract"] == 1
    sc.run("ptdump:* rcu_gp:*")
    assert table.state == "freed"
