"""fork's page-table copy (mm_core/fork.py): copy-on-write through the real table bytes,
what is copied and what is left to refault, and copy_pte_range()'s two failure
categories (SKIP when the parent's table cannot be mapped, GIVEUP -ENOMEM when the
child's cannot) forced with hand-written schedules."""
from __future__ import annotations

import pytest
from conftest import collapsed_world, finish, pte_of

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.scenarios import anon_thp
from emu.sched.loop import run_sync
from mm_core import fork, huge_memory, khugepaged, pgtable, rmap
from mm_core.mm import MM_ANONPAGES, MM_SHMEMPAGES

ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]
BASE = 0x40000000
RW = emu.PROT_READ | emu.PROT_WRITE





@pytest.mark.parametrize("arch", ARCHES)
def test_fork_shares_anon_pages_copy_on_write(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    frames = []
    for i in range(4):
        pa = m.touch(mm, a + i * page, write=True)
        m.physmem[pa:pa + 8] = f"parent{i}".encode().ljust(8, b".")
        frames.append(pa)
    m.touch(mm, a + 5 * page)                                  # a zero-page read
    child = m.fork_mm(mm)
    assert [v.start for v in child.vmas] == [v.start for v in mm.vmas] and child.vmas[0].anon_vma
    for i in range(4):                                         # shared, write-protected on both sides
        p, c = pte_of(k, mm, a + i * page, pmd=True), pte_of(k, child, a + i * page, pmd=True)
        assert p.kind is c.kind is Kind.LEAF and p.paddr == c.paddr == frames[i]
        assert not p.prot & Access.W and not c.prot & Access.W and not c.young
        assert m.translate(mm, a + i * page, "w") is None and m.translate(child, a + i * page, "w") is None
        pg = k.alloc.page_of(frames[i])
        assert (pg.mapcount, pg.refcount) == (2, 2)
    zp = pte_of(k, child, a + 5 * page, pmd=True)
    assert zp.kind is Kind.LEAF and zp.paddr == k.zero_page.paddr and zp.special
    assert child.rss[MM_ANONPAGES] == mm.rss[MM_ANONPAGES] == 4
    assert k.stats["copy_pte_range"] == 1 and k.stats["forks"] == 1
    # the parent writes: wp_page_copy gives it a private copy; the child keeps the old data
    new = m.touch(mm, a, write=True)
    assert new != frames[0] and bytes(m.physmem[new:new + 8]) == b"parent0."
    m.physmem[new:new + 8] = b"changed!"
    assert bytes(m.physmem[m.touch(child, a):][:8]) == b"parent0."
    # the child is now the only user of the old frame: its write reuses it in place
    assert m.touch(child, a, write=True) == frames[0] and k.stats["wp_reuse"] == 1
    assert bytes(m.physmem[m.touch(child, a + 2 * page):][:8]) == b"parent2."
    finish(m, mm, child)


@pytest.mark.parametrize("kernel", ["6.5", "6.13"])
def test_fork_under_other_map_rules(kernel: str) -> None:
    """6.5 maps the parent's table with pte_offset_map_nolock(), 6.13 with
    pte_offset_map_rw_nolock() and no pmd_same(): the ptes are read under the ptl before
    the write-protect, which the walker-contract sanitizer accepts."""
    m = emu.Machine(arch="x86_64", mem="32M", prefault=False, kernel=kernel)
    k = m.kernel
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * k.page_size, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    pa = m.touch(mm, a, write=True)
    child = m.fork_mm(mm)
    assert pte_of(k, child, a, pmd=True).paddr == pa and m.touch(mm, a, write=True) != pa
    finish(m, mm, child)


def test_fork_leaves_a_shared_file_mapping_to_refault() -> None:
    m = emu.Machine(arch="s390x", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("f", 16 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 16 * page, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    pa = m.touch(mm, a + 3 * page, write=True)
    m.physmem[pa:pa + 4] = b"file"
    child = m.fork_mm(mm)
    cvma = child.vma_lookup(a)
    # vma_needs_copy(): no anon_vma, so no tables at all; the VMA is in i_mmap behind the parent's
    assert run_sync(rmap.walk_to_pmd(k, child, a)) is None and k.stats["fork_vma_skipped"] == 1
    assert inode.mapping.i_mmap == [mm.vma_lookup(a), cvma] and child.rss == [0, 0, 0, 0]
    # the child's first touch refaults the same page-cache page, through the same bytes
    assert m.touch(child, a + 3 * page, write=True) == pa and bytes(m.physmem[pa:pa + 4]) == b"file"
    assert child.rss[MM_SHMEMPAGES] == 1
    finish(m, mm, child, files=[inode])


def test_fork_copies_a_private_file_mapping_with_anon_pages() -> None:
    m = emu.Machine(arch="arm64", mem="32M", prefault=False)
    k = m.kernel
    page = k.page_size
    inode = m.memfd_create("p", 16 * page)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 16 * page, RW, emu.MAP_PRIVATE | emu.MAP_FIXED, file=inode)
    file_pa = m.touch(mm, a)                                  # a page-cache page, read-only
    anon_pa = m.touch(mm, a + page, write=True)               # do_cow_fault: anon_vma
    assert mm.vma_lookup(a).anon_vma
    child = m.fork_mm(mm)
    f, c = pte_of(k, child, a, pmd=True), pte_of(k, child, a + page, pmd=True)
    assert f.paddr == file_pa and c.paddr == anon_pa and not c.prot & Access.W
    assert k.alloc.page_of(file_pa).mapcount == 2 and child.rss[MM_SHMEMPAGES] == 1
    assert child.rss[MM_ANONPAGES] == 1
    assert m.touch(child, a + page, write=True) != anon_pa    # COW in the child this time
    finish(m, mm, child, files=[inode])


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_fork_shares_an_anon_thp_and_cow_splits_it(arch: str) -> None:
    m = emu.Machine(arch=arch, mem="64M", prefault=False)
    k = m.kernel
    page = k.page_size
    mm, a, thp = anon_thp(m)
    m.physmem[thp + 3 * page:thp + 3 * page + 4] = b"thp3"
    child = m.fork_mm(mm)
    # both pmd leaves of the same folio
    p, c = pte_of(k, mm, a, pmd=True), pte_of(k, child, a, pmd=True)
    assert p.kind is c.kind is Kind.LEAF and p.paddr == c.paddr == thp
    assert not p.prot & Access.W and not c.prot & Access.W and k.stats["copy_huge_pmd"] == 1
    child_pmdp = run_sync(rmap.walk_to_pmd(k, child, a))
    assert len(k.deposits[child_pmdp]) == 1 and child.rss[MM_ANONPAGES] == huge_memory.hpage_pmd_nr(k)
    # the parent writes subpage 3: the shared THP is split, the subpage copied
    new = m.touch(mm, a + 3 * page, write=True)
    assert new != thp + 3 * page and bytes(m.physmem[new:new + 4]) == b"thp3"
    m.physmem[new:new + 4] = b"new!"
    assert pte_of(k, child, a, pmd=True).kind is Kind.LEAF
    assert bytes(m.physmem[m.touch(child, a + 3 * page):][:4]) == b"thp3"
    finish(m, child, mm)


def test_fork_skips_a_file_huge_pmd() -> None:
    """copy_huge_pmd(): a file/shmem PMD leaf in a VMA that is copied (it has anon pages
    elsewhere) is not copied: the child refaults it."""
    m = emu.Machine(arch="x86_64", mem="64M", prefault=False)
    k = m.kernel
    size, page = huge_memory.hpage_pmd_size(k), k.page_size
    inode = m.memfd_create("h", 2 * size)
    tmp = m.new_mm()
    t = m.mmap(tmp, BASE, size, RW, emu.MAP_SHARED | emu.MAP_FIXED, file=inode)
    for off in range(0, size, page):
        m.touch(tmp, t + off, write=True)
    m.madvise(tmp, t, size, emu.MADV_COLLAPSE)                # the page cache now holds a THP
    m.exit_mm(tmp)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, RW, emu.MAP_PRIVATE | emu.MAP_FIXED, file=inode)
    m.touch(mm, a)                                             # do_set_pmd: a file PMD leaf
    assert pte_of(k, mm, a, pmd=True).kind is Kind.LEAF
    m.touch(mm, a + size, write=True)                          # an anon page: anon_vma
    child = m.fork_mm(mm)
    assert k.stats["copy_huge_pmd_file_skipped"] == 1
    assert pte_of(k, child, a, pmd=True).kind is Kind.NONE
    assert pte_of(k, child, a + size, pmd=True).kind is Kind.LEAF
    assert m.touch(child, a) == inode.mapping.i_pages[0].paddr     # refaulted by PMD
    finish(m, mm, child, files=[inode])


# -- the failure categories, forced -------------------------------------------------------------

def fork_world(arch: str, kernel: str, link_child: bool):
    """The parent maps a shmem file whose page cache was just collapsed (its PTE table
    empty, retract_page_tables() about to run); the child has its VMA and tables ready,
    as dup_mmap() would have built them up to copy_pte_range()."""
    sc, m, k, mm, inode, a, pmdp, _ = collapsed_world(arch, kernel, mem="32M", prefault=False)
    size = huge_memory.hpage_pmd_size(k)
    child = m.new_mm()
    src_vma = mm.vma_lookup(a)
    dst_vma = fork.vm_area_dup(child, src_vma)
    child.insert_vma(dst_vma)
    if link_child:                                  # as dup_mmap() links it before copying
        inode.mapping.i_mmap.append(dst_vma)
        inode.refs += 1
    dst_pmdp = run_sync(pgtable.walk_alloc(k, child, a, k.arch.pmd_level))
    assert run_sync(pgtable.pte_alloc(k, child, dst_pmdp))
    src_pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("copy", fork.copy_pte_range(k, dst_vma, src_vma, dst_pmdp, src_pmdp, a, a + size))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    return sc, m, k, mm, child, inode, src_pmdp, dst_pmdp


@pytest.mark.parametrize("kernel", ["6.6", "6.13"])
@pytest.mark.parametrize("arch", ARCHES)
def test_copy_pte_range_skips_a_parent_table_retracted_before_its_map(arch: str, kernel: str) -> None:
    sc, m, k, mm, child, inode, src_pmdp, dst_pmdp = fork_world(arch, kernel, link_child=False)
    # copy holds the child's ptl; retraction of the parent's table needs only its pml + ptl
    sc.run("copy:lock#1 retract:* copy:*")
    assert sc.results["retract"] == 1 and sc.results["copy"] == 0          # SKIP, not an error
    assert k.stats["copy_pte_range_src_map_failed"] == 1 and k.stats["copy_pte_range"] == 0
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(dst_pmdp)).kind is Kind.TABLE
    finish(m, mm, child, files=[inode])


@pytest.mark.parametrize("arch", ARCHES)
def test_copy_pte_range_gives_up_when_the_child_table_is_retracted(arch: str) -> None:
    """Without the anon_vma exclusion (a file VMA without anon_vma copied, and its child
    VMA visible in i_mmap) retract_page_tables() can take the child's fresh table between
    pte_alloc() and the map: pte_alloc_map_lock() fails and fork fails with -ENOMEM."""
    sc, m, k, mm, child, inode, src_pmdp, dst_pmdp = fork_world(arch, "6.6", link_child=True)
    sc.run("copy:pt_read#1 retract:* copy:*")
    assert sc.results["retract"] == 2 and sc.results["copy"] == -fork.ENOMEM   # GIVEUP
    assert k.stats["copy_pte_range_enomem"] == 1
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(dst_pmdp)).kind is Kind.NONE
    finish(m, mm, child, files=[inode])


def test_copy_pte_range_copies_when_retraction_comes_after() -> None:
    sc, m, k, mm, child, inode, src_pmdp, dst_pmdp = fork_world("x86_64", "6.6", link_child=True)
    sc.run("copy:* retract:*")
    assert sc.results["copy"] == 0 and sc.results["retract"] == 2 and k.stats["copy_pte_range"] == 1
    finish(m, mm, child, files=[inode])


@pytest.mark.parametrize("arch", ["x86_64", "ppc64"])
def test_copy_huge_pmd_eagain_falls_through_to_the_ptes(arch: str) -> None:
    """The THP is split between copy_pmd_range()'s read of the pmd and copy_huge_pmd()'s
    recheck under both pmd locks: -EAGAIN, and the PTE table is copied instead."""
    sc = Scenario(arch=arch, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    size, page = huge_memory.hpage_pmd_size(k), k.page_size
    mm, a, thp = anon_thp(m)
    child = m.new_mm()
    src_vma = mm.vma_lookup(a)
    dst_vma = fork.vm_area_dup(child, src_vma)
    child.insert_vma(dst_vma)
    src_pmdp = run_sync(rmap.walk_to_pmd(k, mm, a))
    sc.task("copy", fork.copy_pmd_range(k, dst_vma, src_vma, src_pmdp, a, a + size))
    sc.task("split", huge_memory.split_huge_pmd(k, src_vma, src_pmdp, a))
    sc.run("copy:pt_read#1 split:* copy:*")
    assert sc.results["copy"] == 0
    assert k.stats["copy_huge_pmd_eagain"] == 1 and k.stats["copy_pte_range"] == 1
    for i in (0, 3):
        p, c = pte_of(k, mm, a + i * page, pmd=True), pte_of(k, child, a + i * page, pmd=True)
        assert p.kind is c.kind is Kind.LEAF and p.paddr == c.paddr == thp + i * page
        assert not p.prot & Access.W and not c.prot & Access.W
    nr = huge_memory.hpage_pmd_nr(k)
    folio = k.alloc.page_of(thp)
    assert (folio.mapcount, folio.refcount) == (2 * nr, 2 * nr) and child.rss[MM_ANONPAGES] == nr
    finish(m, mm, child)


def test_copy_pte_range_stops_for_need_resched_and_goes_again() -> None:
    """need_resched() is a recorded data choice: when it says yes, copy_pte_range() drops
    both ptls and maps the two tables afresh from where it stopped; every pte is copied
    exactly once."""
    from emu.sched.strategy import RoundRobin

    class ReschedEvery(RoundRobin):
        def data(self, n, label):
            return 1 if label == "need_resched" else 0

    sc = Scenario(arch="arm64", kernel="6.6", mem="64M", strategy=ReschedEvery())
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 64 * page, RW, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(0, 64, 3):
        pa = m.touch(mm, a + i * page, write=True)
        m.physmem[pa:pa + 8] = i.to_bytes(8, "little")
    child_mm = m.new_mm()
    sc.task("fork", fork.dup_mmap(k, child_mm, mm))
    sc.run("fork:*")
    assert sc.results["fork"] == 0
    assert k.stats["copy_pte_range_resched"] >= 2              # 22 ptes * 8 progress / 32
    assert sc.sched.data_log and all(label == "need_resched" for _, label, _ in sc.sched.data_log)
    for i in range(64):
        p, c = pte_of(k, mm, a + i * page, pmd=True), pte_of(k, child_mm, a + i * page, pmd=True)
        if i % 3:
            assert c.kind is Kind.NONE
        else:
            assert c.kind is Kind.LEAF and c.paddr == p.paddr and not c.prot & Access.W
    assert child_mm.rss[MM_ANONPAGES] == len(range(0, 64, 3))
    finish(m, mm, child_mm)
