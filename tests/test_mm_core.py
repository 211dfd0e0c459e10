"""mm_core invariants: the leak audit, table fragments, the buddy allocator, and random
mmap/munmap/mprotect/access sequences checked against a plain dict model."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import emu
from emu.physmem import PhysMem
from mm_core import pgtable
from mm_core.memory import CheckMMError
from mm_core.mm import MM_ANONPAGES
from mm_core.page_alloc import OutOfMemory, PageAllocator, PageUse

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS
PAGE = 4096


def test_check_mm_catches_a_leaked_page() -> None:
    m = emu.Machine(arch="x86_64", mem="16M")
    mm = m.new_mm()
    m.kernel.alloc.alloc_pages(0, PageUse.ANON, owner=mm)
    with pytest.raises(CheckMMError, match="still owned by mm"):
        m.exit_mm(mm)


def test_check_mm_catches_a_bad_rss_counter() -> None:
    m = emu.Machine(arch="arm64" if "arm64" in emu.plugins.arches() else "x86_64", mem="16M")
    mm = m.new_mm()
    mm.rss[MM_ANONPAGES] += 1
    with pytest.raises(CheckMMError, match="Bad rss-counter state .* type:MM_ANONPAGES val:1"):
        m.exit_mm(mm)


def test_check_mm_catches_an_unlinked_page_table() -> None:
    m = emu.Machine(arch="ppc64", mem="16M")
    mm = m.new_mm()
    pgtable.alloc_table(m.kernel, mm, m.arch.pte_level)
    with pytest.raises(CheckMMError, match="page table"):
        m.exit_mm(mm)


def test_s390x_pte_tables_are_2k_fragments_sharing_a_page() -> None:
    m = emu.Machine(arch="s390x", mem="16M")
    mm = m.new_mm()
    a = m.mmap(mm, 0x10000000, PAGE, RW, ANON | emu.MAP_FIXED)
    b = m.mmap(mm, 0x10100000, PAGE, RW, ANON | emu.MAP_FIXED)      # next 1M segment
    m.touch(mm, a, write=True)
    pages_before = m.kernel.stats["pt_pages_allocated"]
    m.touch(mm, b, write=True)
    pte_tables = sorted(pt.paddr for pt in m.kernel.ptdescs.values() if pt.level == m.arch.pte_level)
    assert len(pte_tables) == 2
    assert pte_tables[1] - pte_tables[0] == 2048 and pte_tables[0] % 4096 == 0
    assert m.kernel.stats["pt_pages_allocated"] == pages_before      # the second half was free
    m.munmap(mm, a, PAGE)
    assert m.translate(mm, b, "w") is not None                        # the other half lives on
    m.exit_mm(mm)


def test_ppc64_pgd_is_one_64k_block() -> None:
    m = emu.Machine(arch="ppc64", mem="16M")
    mm = m.new_mm()
    root = m.kernel.ptdescs[mm.pgd]
    assert root.page.order == 4 and mm.pgd % (64 << 10) == 0


def test_buddy_allocator_merges_and_reports_oom() -> None:
    pm = PhysMem(4 << 20, big_endian=False)
    alloc = PageAllocator(pm)
    free0 = alloc.nr_free
    pages = [alloc.alloc_pages(0, PageUse.ANON) for _ in range(100)]
    big = alloc.alloc_pages(4, PageUse.PAGETABLE)
    assert big.pfn % 16 == 0
    for p in pages + [big]:
        alloc.free_pages(p)
    assert alloc.nr_free == free0
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free_pages(big)
    with pytest.raises(OutOfMemory):
        alloc.alloc_pages(10, PageUse.ANON)
    assert pm.read(pages[0].paddr, 4) == b"\x6b" * 4        # freed memory is poisoned


class AddressSpaceModel(RuleBasedStateMachine):
    """Random syscalls against one mm, compared with a dict of page -> (prot, byte)."""

    arch_name = "x86_64"
    BASE = 0x40000000
    NPAGES = 48

    @initialize()
    def setup(self) -> None:
        self.m = emu.Machine(arch=self.arch_name, mem="32M")
        self.mm = self.m.new_mm()
        self.pages: dict[int, list] = {}      # va -> [prot, byte]

    def teardown(self) -> None:
        if hasattr(self, "m"):
            self.m.exit_mm(self.mm)          # check_mm must be clean after any sequence
            self.m.ram.close()

    pages_st = st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 8))

    @rule(span=pages_st, prot=st.sampled_from([emu.PROT_READ, RW, emu.PROT_NONE]))
    def mmap_fixed(self, span, prot) -> None:
        first, n = span
        va = self.BASE + first * PAGE
        assert self.m.mmap(self.mm, va, n * PAGE, prot, ANON | emu.MAP_FIXED) == va
        for i in range(n):
            self.pages[va + i * PAGE] = [prot, 0]

    @rule(span=pages_st)
    def munmap(self, span) -> None:
        first, n = span
        va = self.BASE + first * PAGE
        self.m.munmap(self.mm, va, n * PAGE)
        for i in range(n):
            self.pages.pop(va + i * PAGE, None)

    @rule(span=pages_st, prot=st.sampled_from([emu.PROT_READ, RW, emu.PROT_NONE]))
    def mprotect(self, span, prot) -> None:
        first, n = span
        va = self.BASE + first * PAGE
        covered = all(va + i * PAGE in self.pages for i in range(n))
        try:
            self.m.mprotect(self.mm, va, n * PAGE, prot)
        except OSError as err:
            assert not covered and err.errno == 12
            return
        assert covered
        for i in range(n):
            self.pages[va + i * PAGE][0] = prot

    @precondition(lambda self: self.pages)
    @rule(data=st.data(), byte=st.integers(1, 255))
    def write(self, data, byte) -> None:
        va = data.draw(st.sampled_from(sorted(self.pages)))
        prot = self.pages[va][0]
        if not prot & emu.PROT_WRITE:
            with pytest.raises(emu.GuestAccessError):
                self.m.touch(self.mm, va, write=True)
            return
        pa = self.m.touch(self.mm, va, write=True)
        self.m.physmem[pa] = byte
        self.pages[va][1] = byte

    @precondition(lambda self: self.pages)
    @rule(data=st.data())
    def read(self, data) -> None:
        va = data.draw(st.sampled_from(sorted(self.pages)))
        prot, byte = self.pages[va]
        if not prot & emu.PROT_READ:
            with pytest.raises(emu.GuestAccessError):
                self.m.touch(self.mm, va)
            return
        pa = self.m.touch(self.mm, va)
        assert self.m.physmem[pa] == byte

    @invariant()
    def unmapped_pages_do_not_translate(self) -> None:
        if not hasattr(self, "m"):
            return
        for i in range(0, self.NPAGES, 7):
            va = self.BASE + i * PAGE
            if va not in self.pages:
                assert self.m.translate(self.mm, va, "r") is None

    @invariant()
    def rss_matches_private_pages(self) -> None:
        if hasattr(self, "m"):
            owned = [p for p in self.m.kernel.alloc.owned_by(self.mm) if p.use is PageUse.ANON]
            assert self.mm.rss[MM_ANONPAGES] == len(owned)


@pytest.mark.parametrize("arch_name", ["x86_64", "arm64", "s390x", "ppc64"])
def test_random_address_space_operations_match_the_model(arch_name: str) -> None:
    if arch_name not in emu.plugins.arches():
        pytest.skip(f"{arch_name} plugin not installed")
    machine = type(f"Model_{arch_name}", (AddressSpaceModel,), {"arch_name": arch_name})
    machine.TestCase.settings = settings(max_examples=12, stateful_step_count=25, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_ppc64_64k_pte_tables_are_256_byte_fragments() -> None:
    m = emu.Machine(arch="ppc64", mem="64M", page_size="64K")
    k = m.kernel
    assert k.page_size == 64 << 10 and m.arch.levels[-1].index_bits == 5
    mm = m.new_mm()
    pmd_span = m.arch.levels[m.arch.pmd_level].span
    base = m.mmap(mm, 0x40000000, 3 * pmd_span, RW, ANON | emu.MAP_FIXED)
    for i in range(3):
        m.touch(mm, base + i * pmd_span, write=True)
    ptes = sorted(pt.paddr for pt in k.ptdescs.values() if pt.level == m.arch.pte_level)
    assert [b - ptes[0] for b in ptes] == [0, 256, 512]            # one 64K page, 256 fragments
    assert k.ptdescs[ptes[0]].frag.nr_frags == 256
    pmds = [pt for pt in k.ptdescs.values() if pt.level == m.arch.pmd_level]
    assert pmds[0].frag is not None and pmds[0].frag.nr_frags == 16   # 4K PMD tables: 16 a page
    m.exit_mm(mm)
    assert k.alloc.pages.keys() == {k.zero_page.pfn}


def test_ppc64_64k_deferred_fragment_keeps_its_page_until_rcu() -> None:
    """pte_free_defer on one fragment marks the page Active: it is never handed out again
    and goes back through RCU once every fragment is free and the mm's cursor dropped."""
    from emu.sched.loop import run_sync
    from mm_core.pgalloc import alloc_table, pte_free, pte_free_defer
    m = emu.Machine(arch="ppc64", mem="64M", page_size="64K")
    k = m.kernel
    mm = m.new_mm()
    a, b = alloc_table(k, mm, 3), alloc_table(k, mm, 3)
    assert a.frag is b.frag
    run_sync(pte_free_defer(k, a))
    page = a.frag
    assert page.active and a.state == "deferred"
    pte_free(k, b)
    c = alloc_table(k, mm, 3)
    assert c.frag is page                     # the cursor still hands out fresh fragments
    assert c.paddr not in (a.paddr, b.paddr)  # freed fragments are never reused
    pte_free(k, c)
    m.exit_mm(mm)                             # pte_frag_destroy drops the cursor
    assert k.alloc.page_of(page.page.paddr) is page.page      # still waiting for the grace period
    m.rcu_barrier()
    assert k.alloc.page_of(page.page.paddr) is None and a.state == "freed"
    assert k.stats["pt_pages_rcu_freed"] == 16                # one 64K page, in 4K frames


def test_ppc64_64k_runs_guest_programs_and_collapses() -> None:
    from conftest import expected, workload
    for name in ("hello", "shmem_collapse"):
        m = emu.Machine(arch="ppc64", mem="64M", page_size="64K")
        m.spawn(workload("ppc64", name), [name])
        r = m.run()
        assert r.stdout == expected(name)[0] and r.exit_code == 0
    assert b"collapse returned 0" in r.stderr and r.summary["pt_pages_rcu_freed"] >= 16
