"""UFFD_FEATURE_WP_UNPOPULATED (6.4+, 2bad466cc9d9 "mm/uffd: UFFD_FEATURE_WP_UNPOPULATED"):
UFFDIO_WRITEPROTECT of anonymous memory puts PTE_MARKER_UFFD_WP in none ptes too
(userfaultfd_wp_use_markers(), pgtable_populate_needed() allocating the tables), a fault
through such a marker maps the zero page or a fresh page write-protected with the uffd-wp
bit (do_anonymous_page(): vmf_orig_pte_uffd_wp()), so the write goes to the userfaultfd;
un-protect drops the markers; zapping anon memory drops them. The pte bytes in guest RAM
are checked each time."""
from __future__ import annotations

import pytest
from conftest import pte_of

import emu
from emu.arch import Access, Kind
from emu.linux import uffd as guest_uffd
from emu.scenario import Scenario
from emu.sched.loop import run_sync
from emu.sched.task import TaskState
from mm_core import userfaultfd
from mm_core.memory import FaultResult, do_user_addr_fault
from mm_core.mm import MM_ANONPAGES, VM_UFFD_WP
from tests.test_uffd_wp_zap import marker_raw
from tests.test_userfaultfd import ANON, BASE, RW, WP, WP_WORLDS

UNPOP = userfaultfd.UFFD_FEATURE_WP_UNPOPULATED


def anon_wp(arch: str, kernel: str, pages: int = 8, features: int = UNPOP, touched=(0,)):
    sc = Scenario(arch=arch, kernel=kernel, mem="32M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, pages * page, RW, ANON)
    for i in touched:
        pa = m.touch(mm, a + i * page, write=True)
        m.physmem[pa:pa + 8] = b"anon%04d" % i
    ctx = m.userfaultfd(mm, features)
    m.uffdio_register(ctx, a, pages * page, WP)
    return sc, m, k, mm, a, ctx


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_writeprotect_puts_markers_in_none_anon_ptes_only_with_the_feature(arch: str, kernel: str) -> None:
    page = None
    for features, want in ((UNPOP, True), (0, False)):
        sc, m, k, mm, a, ctx = anon_wp(arch, kernel, features=features)
        page, marker = k.page_size, marker_raw(k)
        m.uffdio_writeprotect(ctx, a, 4 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
        assert pte_of(k, mm, a).uffd_wp                               # the present one: the bit
        for i in (1, 2, 3):
            assert (pte_of(k, mm, a + i * page, raw=True) == marker) is want, (features, i)
        assert pte_of(k, mm, a + 4 * page, raw=True) == k.arch.empty_value(k.arch.pte_level)
        assert k.stats["uffd_wp_markers"] == (3 if want else 0)
        m.uffdio_writeprotect(ctx, a, 4 * page, 0)                    # un-protect drops them
        empty = k.arch.empty_value(k.arch.pte_level)
        assert all(pte_of(k, mm, a + i * page, raw=True) == empty for i in (1, 2, 3))
        assert not pte_of(k, mm, a).uffd_wp
        m.exit_mm(mm)
        sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_writeprotect_allocates_the_table_for_anon_markers(arch: str, kernel: str) -> None:
    """pgtable_populate_needed(): no table under the pmd yet (nothing touched): one is
    allocated to hold the markers (-ENOMEM otherwise)."""
    sc, m, k, mm, a, ctx = anon_wp(arch, kernel, touched=())
    page = k.page_size
    assert pte_of(k, mm, a, raw=True) is None
    m.uffdio_writeprotect(ctx, a + page, 2 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert pte_of(k, mm, a + page, raw=True) == pte_of(k, mm, a + 2 * page, raw=True) == marker_raw(k)
    assert pte_of(k, mm, a, raw=True) == k.arch.empty_value(k.arch.pte_level)
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_a_write_through_an_anon_marker_goes_to_the_uffd(arch: str, kernel: str) -> None:
    """handle_pte_marker() -> do_pte_missing() -> do_anonymous_page() with the marker as
    orig_pte: a fresh zeroed page mapped read-only with the uffd-wp bit; the write,
    executed again, sleeps in handle_userfault(VM_UFFD_WP); read() reports it; the
    un-protect wakes it and the page is written in place (no copy)."""
    sc, m, k, mm, a, ctx = anon_wp(arch, kernel)
    page = k.page_size
    va = a + 3 * page
    m.uffdio_writeprotect(ctx, a, 8 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert pte_of(k, mm, va, raw=True) == marker_raw(k)
    assert run_sync(do_user_addr_fault(k, mm, va, Access.W)) is FaultResult.OK
    ent = pte_of(k, mm, va)
    assert ent.kind is Kind.LEAF and ent.uffd_wp and not ent.prot & Access.W and not ent.special
    assert mm.rss[MM_ANONPAGES] == 2 and k.stats["anon_uffd_wp_refault"] == 1
    assert k.stats["handle_userfault_wp"] == 0
    sc.task("writer", do_user_addr_fault(k, mm, va + 8, Access.W))
    sc.run("writer:*", finish=False)
    assert sc.state("writer") is TaskState.BLOCKED and k.stats["handle_userfault_wp"] == 1
    uwq = run_sync(userfaultfd.userfaultfd_ctx_read(k, ctx, True))
    assert uwq.reason == VM_UFFD_WP and uwq.address & ~(page - 1) == va
    m.uffdio_writeprotect(ctx, va, page, 0)
    sc.run()
    assert sc.results["writer"] is FaultResult.OK and m.translate(mm, va, "w") == ent.paddr
    assert m.read_user(mm, va, 16) == bytes(16) and k.stats["wp_copy"] == 0
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_a_read_through_an_anon_marker_maps_the_zero_page_protected(arch: str, kernel: str) -> None:
    """A read fault on the marker maps the zero page with the uffd-wp bit (setpte:
    pte_mkuffd_wp()); the following write is a WP fault, not a silent COW."""
    sc, m, k, mm, a, ctx = anon_wp(arch, kernel)
    page = k.page_size
    va = a + 5 * page
    m.uffdio_writeprotect(ctx, a, 8 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    assert run_sync(do_user_addr_fault(k, mm, va, Access.R)) is FaultResult.OK
    ent = pte_of(k, mm, va)
    assert ent.kind is Kind.LEAF and ent.special and ent.paddr == k.zero_page.paddr and ent.uffd_wp
    sc.task("writer", do_user_addr_fault(k, mm, va, Access.W))
    sc.run("writer:*", finish=False)
    assert sc.state("writer") is TaskState.BLOCKED and k.stats["handle_userfault_wp"] == 1
    m.uffdio_writeprotect(ctx, va, page, 0)
    sc.run()
    assert sc.results["writer"] is FaultResult.OK and k.stats["wp_copy"] == 1   # the zero page is copied
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel"), WP_WORLDS)
def test_dontneed_drops_anon_markers(arch: str, kernel: str) -> None:
    """Zap on anonymous memory always drops everything (zap_pte_range(), 6.6): the markers
    and the protected page go, and a later write does not trap (the data is gone anyway)."""
    sc, m, k, mm, a, ctx = anon_wp(arch, kernel)
    page = k.page_size
    m.uffdio_writeprotect(ctx, a, 4 * page, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    m.madvise(mm, a, 4 * page, emu.MADV_DONTNEED)
    empty = k.arch.empty_value(k.arch.pte_level)
    assert all(pte_of(k, mm, a + i * page, raw=True) == empty for i in range(4))
    assert run_sync(do_user_addr_fault(k, mm, a + page, Access.W)) is FaultResult.OK
    assert k.stats["handle_userfault_wp"] == 0 and m.translate(mm, a + page, "w") is not None
    m.exit_mm(mm)
    sc.close()


def test_an_anon_thp_range_gets_a_table_of_markers_instead_of_a_thp() -> None:
    """With WP_UNPOPULATED a none pmd of a THP-enabled range gets a PTE table of markers
    (pgtable_populate_needed()), so the later fault maps a small page, uffd-wp, and no THP;
    an existing anon THP is protected in place as a pmd (pgtable_split_needed() is false
    for anon memory)."""
    sc = Scenario(arch="x86_64", kernel="6.6", mem="64M", prefault=False)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    span = k.arch.levels[k.arch.pmd_level].span
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * span, RW, ANON)
    m.madvise(mm, a, 2 * span, emu.MADV_HUGEPAGE)
    m.touch(mm, a, write=True)                                       # a THP in the first extent
    pmdp = run_sync(userfaultfd.rmap.walk_to_pmd(k, mm, a))
    assert k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).kind is Kind.LEAF
    ctx = m.userfaultfd(mm, UNPOP)
    m.uffdio_register(ctx, a, 2 * span, WP)
    m.uffdio_writeprotect(ctx, a, 2 * span, emu.UFFDIO_WRITEPROTECT_MODE_WP)
    pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))
    assert pmd.kind is Kind.LEAF and pmd.uffd_wp and not pmd.prot & Access.W
    assert all(pte_of(k, mm, a + span + i * page, raw=True) == marker_raw(k)
               for i in range(0, span // page, 97))
    assert run_sync(do_user_addr_fault(k, mm, a + span, Access.W)) is FaultResult.OK
    ent = pte_of(k, mm, a + span)
    assert ent.kind is Kind.LEAF and ent.uffd_wp and k.stats["thp_fault_alloc"] == 1
    m.exit_mm(mm)
    sc.close()


@pytest.mark.parametrize(("arch", "kernel", "offered"), [("x86_64", "6.6", True), ("x86_64", "6.4", True),
                                                          ("x86_64", "5.10", False), ("arm64", "6.6", False),
                                                          ("arm64", "6.13", True), ("ppc64", "6.6", False)])
def test_the_feature_is_offered_where_uffd_wp_markers_exist(arch: str, kernel: str, offered: bool) -> None:
    """UFFDIO_API: WP_UNPOPULATED since 6.4, cleared without CONFIG_PTE_MARKER_UFFD_WP (no
    HAVE_ARCH_USERFAULTFD_WP); asking for it where it is not offered is EINVAL."""
    m = emu.Machine(arch=arch, mem="16M", kernel=kernel, prefault=False)
    assert bool(guest_uffd.uffd_api_features(m.kernel) & UNPOP) is offered
    mm = m.new_mm()
    if offered:
        assert m.userfaultfd(mm, UNPOP).features == UNPOP
    else:
        with pytest.raises(OSError) as err:
            m.userfaultfd(mm, UNPOP)
        assert err.value.errno == 22
    m.exit_mm(mm)
