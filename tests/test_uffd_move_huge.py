"""UFFDIO_MOVE's huge-pmd path (6.8 mm/userfaultfd.c move_pages(), mm/huge_memory.c
move_pages_huge_pmd()): a PMD-mapped anon THP moves whole when both addresses are
PMD-aligned and a whole PMD is moved into a none dst pmd; otherwise it is split first
(or refused when not exclusive). The -EAGAIN cases are forced by hand-written schedules:
a src THP zapped or split, or a THP faulted at dst, while the move sleeps on the folio
lock, and a src migration pmd the move waits on. The pmd bytes in guest RAM, the
deposited table, the folio's rmap and the counters are checked; check_mm at exit."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Access, Kind
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from mm_core import huge_memory, madvise, memory, rmap, shmem, userfaultfd
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mm import MM_ANONPAGES
from mm_core.sched_helpers import stalled_thp_migration

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED
BASE = 0x40000000
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]


def pmd_of(k, mm, va: int):
    pmdp = run_sync(rmap.walk_to_pmd(k, mm, va))
    return pmdp, (None if pmdp is None else k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)))


def thp_world(arch: str = "x86_64", kernel: str = "6.8"):
    """Four PMD extents of private anon memory (MADV_HUGEPAGE), a THP written at the first
    with a tag in each of a few subpages; the scenario is there for hand schedules."""
    sc = Scenario(arch=arch, kernel=kernel, mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    size, page = huge_memory.hpage_pmd_size(k), k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * size, RW, ANON)
    m.madvise(mm, a, 4 * size, emu.MADV_HUGEPAGE)
    pa = m.touch(mm, a, write=True)
    for i in (0, 1, 100, size // page - 1):
        m.physmem[pa + i * page:pa + i * page + 8] = b"thp%05d" % i
    pmdp, pmd = pmd_of(k, mm, a)
    assert pmd.kind is Kind.LEAF
    folio = k.alloc.page_of(pmd.paddr)
    assert folio.order == huge_memory.hpage_pmd_order(k)
    return sc, m, k, mm, a, size, folio


def read_tags(m, mm, va: int, size: int, page: int) -> list[bytes]:
    return [m.read_user(mm, va + i * page, 8) for i in (0, 1, 100, size // page - 1)]


@pytest.mark.parametrize("kernel", ["6.8", "6.13"])
@pytest.mark.parametrize("arch", ARCHES)
def test_an_aligned_whole_pmd_move_moves_the_thp_itself(arch: str, kernel: str) -> None:
    sc, m, k, mm, a, size, folio = thp_world(arch, kernel)
    page = k.page_size
    src, dst = a, a + 2 * size
    src_pmdp, _ = pmd_of(k, mm, src)
    dst_pmdp = run_sync(userfaultfd.pgtable.walk_alloc(k, mm, dst, k.arch.pmd_level))
    assert k.deposits.get(src_pmdp) and not k.deposits.get(dst_pmdp)
    rss, tables = list(mm.rss), mm.pgtables_bytes
    assert m.uffdio_move(mm, dst, src, size) == size
    assert k.stats["uffdio_move_huge_pmd"] == 1 and k.stats["uffdio_move"] == 0   # no pte moved
    assert k.physmem.read_entry(src_pmdp) == k.arch.empty_value(k.arch.pmd_level)
    dst_pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(dst_pmdp))
    assert dst_pmd.kind is Kind.LEAF and dst_pmd.paddr == folio.paddr and dst_pmd.dirty
    assert dst_pmd.prot & Access.W
    # the deposited PTE table went along with the pmd (pgtable_trans_huge_withdraw/deposit)
    assert not k.deposits.get(src_pmdp) and len(k.deposits[dst_pmdp]) == 1
    assert read_tags(m, mm, dst, size, page) == [b"thp%05d" % i for i in (0, 1, 100, size // page - 1)]
    assert m.translate(mm, src) is None and m.translate(mm, dst + 100 * page, "w") == folio.paddr + 100 * page
    assert mm.rss == rss and mm.rss[MM_ANONPAGES] == size // page and mm.pgtables_bytes == tables
    assert (folio.mapcount, folio.refcount, folio.locked) == (1, 1, False)
    assert folio.index == rmap.linear_page_index(k, mm.vma_lookup(dst), dst)
    assert rmap.folio_anon_vma(folio) is mm.vma_lookup(dst).anon_vma
    assert not k.rcu.readers and not k.san.pte_maps
    m.exit_mm(mm)                                   # zap_huge_pmd of dst frees the deposit: check_mm
    sc.close()


def test_a_move_that_would_split_the_thp_splits_the_pmd_first() -> None:
    """Not PMD-aligned (one page, or dst misaligned): split_huge_pmd() and `continue`; the
    PTE path then meets the PTE-mapped large folio, whose split_folio() is not modelled
    (-EBUSY). The data stays where it was, now mapped by a PTE table."""
    sc, m, k, mm, a, size, folio = thp_world()
    page = k.page_size
    with pytest.raises(OSError) as err:
        m.uffdio_move(mm, a + 2 * size, a, page)
    assert err.value.errno == userfaultfd.EBUSY
    assert k.stats["uffdio_move_split_huge_pmd"] == 1 and k.stats["uffdio_move_split_folio_unmodelled"] == 1
    assert pmd_of(k, mm, a)[1].kind is Kind.TABLE
    assert m.read_user(mm, a + 100 * page, 8) == b"thp00100" and folio.mapcount == size // page
    assert not k.rcu.readers and not k.san.pte_maps and not folio.locked
    m.exit_mm(mm)
    sc.close()


def test_a_dst_pmd_holding_a_table_splits_the_src_thp() -> None:
    """Aligned and whole, but dst's pmd is not none (a table): move_pages() splits too."""
    sc, m, k, mm, a, size, folio = thp_world()
    m.madvise(mm, a + 2 * size, size, emu.MADV_NOHUGEPAGE)
    m.touch(mm, a + 2 * size + 5 * k.page_size, write=True)      # a PTE table at dst
    with pytest.raises(OSError):
        m.uffdio_move(mm, a + 2 * size, a, size)
    assert k.stats["uffdio_move_split_huge_pmd"] == 1 and k.stats["uffdio_move_huge_pmd"] == 0
    m.exit_mm(mm)
    sc.close()


def test_a_thp_shared_with_a_child_is_ebusy_and_stays_whole() -> None:
    sc, m, k, mm, a, size, folio = thp_world()
    child = m.fork_mm(mm)
    for length in (size, k.page_size):                # whole: in move_pages_huge_pmd; split path: before it
        with pytest.raises(OSError) as err:
            m.uffdio_move(mm, a + 2 * size, a, length)
        assert err.value.errno == userfaultfd.EBUSY
    assert pmd_of(k, mm, a)[1].kind is Kind.LEAF and k.stats["uffdio_move_split_huge_pmd"] == 0
    m.exit_mm(child)
    m.exit_mm(mm)
    sc.close()


# -- hand-scheduled: the -EAGAIN cases --------------------------------------------------------

def locked_folio_race(kernel: str = "6.8"):
    """The move sleeps on the src folio's lock (held by ``holder``) after it dropped the
    src pml with a reference taken; ``holder`` changes the world, then unlocks."""
    sc, m, k, mm, a, size, folio = thp_world(kernel=kernel)
    sc.task("move", userfaultfd.move_pages(k, mm, a + 2 * size, a, size))
    return sc, m, k, mm, a, size, folio


def holder_task(k, mm, folio, change):
    async def body():
        await shmem.folio_lock(k, folio)
        await mmap_read_lock(mm)
        try:
            await change()
        finally:
            await mmap_read_unlock(mm)
        shmem.folio_unlock(folio)
        return "changed"
    return body()


def test_src_thp_zapped_while_the_move_sleeps_on_the_folio_lock_is_eagain_then_enoent() -> None:
    """The folio is no longer mapped when the move has its lock: folio_get_anon_vma() finds
    no anon_vma, -EAGAIN; move_pages() looks again and finds the src pmd none: -ENOENT (no
    ALLOW_SRC_HOLES). The reference the move held kept the folio alive until its
    folio_put(); nothing leaks."""
    sc, m, k, mm, a, size, folio = locked_folio_race()
    vma = mm.vma_lookup(a)

    async def zap():
        await memory.unmap_page_range(k, vma, a, a + size)            # MADV_DONTNEED of the THP

    sc.task("holder", holder_task(k, mm, folio, zap))
    sc.run("holder:wait#1 move:*", finish=False)        # holder has the folio lock; move sleeps on it
    assert folio.locked and folio.refcount == 2          # the map's reference + the move's
    sc.run("holder:* move:*")
    assert sc.results == {"holder": "changed", "move": -userfaultfd.ENOENT}
    assert k.stats["uffdio_move_huge_anon_vma_gone"] == 1 and k.stats["uffdio_move_eagain"] == 1
    assert k.stats["uffdio_move_huge_pmd"] == 0 and pmd_of(k, mm, a + 2 * size)[1].kind is Kind.NONE
    assert k.alloc.page_of(folio.paddr) is None or k.alloc.page_of(folio.paddr) is not folio
    m.exit_mm(mm)
    sc.close()


def test_a_thp_faulted_at_dst_while_the_move_sleeps_is_eagain_then_eexist() -> None:
    """"If dst_pmd changes into THP after this check, move_pages_huge_pmd() will detect the
    change and retry": pmd_same(dst) fails (-EAGAIN), the retry sees a huge dst: -EEXIST."""
    sc, m, k, mm, a, size, folio = locked_folio_race()
    dst = a + 2 * size

    async def thp_fault():
        vma = mm.vma_lookup(dst)
        await memory.handle_mm_fault(k, vma, dst, memory.FAULT_FLAG_WRITE | memory.FAULT_FLAG_USER)

    sc.task("holder", holder_task(k, mm, folio, thp_fault))
    sc.run("holder:wait#1 move:* holder:* move:*")
    assert sc.results["move"] == -userfaultfd.EEXIST
    assert k.stats["uffdio_move_huge_pmd_changed"] == 1 and k.stats["thp_fault_alloc"] == 2
    assert pmd_of(k, mm, a)[1].paddr == folio.paddr                # src untouched
    assert m.read_user(mm, a + 100 * k.page_size, 8) == b"thp00100"
    m.exit_mm(mm)
    sc.close()


def test_src_thp_split_while_the_move_sleeps_is_eagain_then_the_pte_path() -> None:
    """A partial MADV_DONTNEED splits the src THP (zap_pmd_range() -> split_huge_pmd())
    while the move sleeps: pmd_same(src) fails (-EAGAIN); the retry finds a PTE table and
    takes the PTE path, where the large folio wants split_folio() (not modelled: -EBUSY;
    the kernel would split it and move page by page)."""
    sc, m, k, mm, a, size, folio = locked_folio_race()
    page = k.page_size

    async def split():
        await madvise_zap(k, mm, a + 7 * page, a + 8 * page)

    sc.task("holder", holder_task(k, mm, folio, split))
    sc.run("holder:wait#1 move:* holder:* move:*")
    assert sc.results["move"] == -userfaultfd.EBUSY
    assert k.stats["uffdio_move_huge_pmd_changed"] == 1 and k.stats["thp_split_pmd"] == 1
    assert k.stats["uffdio_move_split_folio_unmodelled"] == 1
    assert pmd_of(k, mm, a)[1].kind is Kind.TABLE and m.read_user(mm, a + page, 8) == b"thp00001"
    m.exit_mm(mm)
    sc.close()


async def madvise_zap(k, mm, start: int, end: int) -> None:
    vma = mm.vma_lookup(start)
    await memory.unmap_page_range(k, vma, start, end)


@pytest.mark.parametrize("whole", [True, False])
def test_a_src_migration_pmd_is_waited_on_and_the_move_goes_on_after_it(whole: bool) -> None:
    """A stalled THP migration holds the src pmd as a migration entry: the whole move sees
    it in move_pages_huge_pmd() (pmd_migration_entry_wait(), -EAGAIN); the splitting move
    waits in move_pages() (the split of a migration pmd is not modelled). When the
    migration puts the pmd back, the whole move moves the THP; the splitting one splits it."""
    sc, m, k, mm, a, size, folio = thp_world()
    vma = mm.vma_lookup(a)
    pmdp, _ = pmd_of(k, mm, a)
    length = size if whole else k.page_size
    sc.task("migrate", stalled_thp_migration(k, vma, pmdp))
    sc.task("move", userfaultfd.move_pages(k, mm, a + 2 * size, a, length))
    sc.run("migrate:*", finish=False)                   # the migration entry is in, the copy stalls
    assert pmd_of(k, mm, a)[1].kind is Kind.MIGRATION
    sc.run("move:*", finish=False)                      # the move sleeps in pmd_migration_entry_wait()
    assert k.stats["pmd_migration_entry_wait"] == 1
    assert pmd_of(k, mm, a + 2 * size)[1] is None or pmd_of(k, mm, a + 2 * size)[1].kind is Kind.NONE
    sc.run()
    assert sc.results["migrate"] is True
    if whole:
        assert sc.results["move"] == size and k.stats["uffdio_move_huge_pmd"] == 1
        assert k.stats["uffdio_move_eagain"] >= 1
        assert m.read_user(mm, a + 2 * size + 100 * k.page_size, 8) == b"thp00100"
        assert pmd_of(k, mm, a)[1].kind is Kind.NONE
    else:
        assert sc.results["move"] == -userfaultfd.EBUSY and k.stats["uffdio_move_split_huge_pmd"] == 1
    m.exit_mm(mm)
    sc.close()


def test_madvise_module_is_the_zap_path_used() -> None:
    """The partial zap above is MADV_DONTNEED's own path (unmap_page_range with NULL
    details): a THP partly zapped is split and one pte cleared."""
    sc, m, k, mm, a, size, folio = thp_world()
    page = k.page_size
    run_sync(madvise.do_madvise(k, mm, a + 7 * page, page, madvise.MADV_DONTNEED))
    assert pmd_of(k, mm, a)[1].kind is Kind.TABLE and m.translate(mm, a + 7 * page) is None
    assert k.stats["thp_split_pmd"] == 1
    m.exit_mm(mm)
    sc.close()


def test_the_pre_fix_split_path_takes_the_folio_of_a_migration_pmd() -> None:
    """Bug injection move_pages_reads_folio_of_non_present_pmd (the 6.8 code before the 2025
    fix): the splitting move reads pmd_folio() of the migration pmd: the oops."""
    from mm_core.sanitizers import Finding
    sc, m, k, mm, a, size, folio = thp_world()
    k.bugs["move_pages_reads_folio_of_non_present_pmd"] = True
    pmdp, _ = pmd_of(k, mm, a)
    sc.task("migrate", stalled_thp_migration(k, mm.vma_lookup(a), pmdp))
    sc.task("move", userfaultfd.move_pages(k, mm, a + 2 * size, a, k.page_size))
    sc.run("migrate:*", finish=False)
    with pytest.raises(Finding) as found:
        sc.run("move:*", finish=False)
    assert found.value.signature == "BUG:pmd_folio:non-present:move_pages"
