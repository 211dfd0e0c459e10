"""Walkers against MADV_DONTNEED with 6.14's PT_RECLAIM: the anon-only walkers (MADV_FREE,
KSM's break_ksm) never meet retract_page_tables() (it skips every VMA with an anon_vma), but
under 6.14 a MADV_DONTNEED that empties a whole PMD extent frees its PTE table while they
hold only mmap_read_lock, so their map failure is reachable there. These scenarios run under
``kernel="6.14"`` (ScenarioSpec.kernel; under 6.6 they run clean with nothing freed).

The world: a private anonymous mapping of two PMD extents at BASE, a few pages written in
each; MADV_DONTNEED zaps the whole second extent (PT_RECLAIM frees its table) while the
walker covers both, or the pages of the second extent.
"""
from __future__ import annotations

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios.base import BASE, World, completing, scenario
from emu.sched import traps
from emu.sched.loop import run_sync
from mm_core import huge_memory, madvise, pgtable
from mm_core.locks import Completion
from mm_core.sanitizers import Finding

PT_RECLAIM_KERNEL = "6.14"
KEPT = (1, 2)             # pages written in the first PMD extent (the walker's oracle)
ZAPPED = (3, 4)           # pages written in the second extent (MADV_DONTNEED zaps them)


def _oracle(what: str, detail: str) -> Finding:
    return Finding("ORACLE", f"ORACLE: {what}", f"ORACLE:{what.split()[0]}", [f"  {detail}"])


def two_extents(sc: Scenario) -> tuple[World, int]:
    """An anon private mapping of two PMD extents with KEPT pages written in the first
    and ZAPPED pages in the second (each page holds its address). Returns (world, size
    of one extent); world.addr is the mapping, world.extra["kept_pteps"] the KEPT ptes."""
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in KEPT:
        va = a + i * k.page_size
        k.physmem.write(m.touch(mm, va, write=True), va.to_bytes(8, "little"))
    for i in ZAPPED:
        va = a + size + i * k.page_size
        k.physmem.write(m.touch(mm, va, write=True), va.to_bytes(8, "little"))
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    table = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr
    kept = [pgtable.entry_addr(k, table, k.arch.pte_level, a + i * k.page_size) for i in KEPT]
    return World([mm], [], a, pmdp, extra={"kept_pteps": kept}), size


def zapped_range_gone(m, k, mm, a: int, size: int) -> list[str]:
    """The ZAPPED pages still mapped to something else than the zero page (after both tasks)."""
    left = []
    for i in ZAPPED:
        va = a + size + i * k.page_size
        paddr = m.translate(mm, va)
        if paddr is not None and paddr >> k.page_shift != k.zero_page.pfn:
            left.append(hex(va))
    return left


async def zap_and_check(m, k, w: World, size: int) -> str:
    """The racing MADV_DONTNEED of the second extent; afterwards its written pages must be
    gone (ORACLE otherwise)."""
    ret = await dontneed(k, w, size)
    left = zapped_range_gone(m, k, w.mms[0], w.addr, size)
    if ret or left:
        raise _oracle("madvise_dontneed left pages", f"ret {ret}, still mapped {left}")
    return "zapped"


def dontneed(k, w: World, size: int):
    """MADV_DONTNEED of the whole second extent: zap_pte_range() with PT_RECLAIM."""
    return madvise.do_madvise(k, w.mms[0], w.addr + size, size, madvise.MADV_DONTNEED)


@scenario("madv-free-vs-pt-reclaim",
          "MADV_FREE (madvise_free_pte_range, a failed map is SKIP) over an anon mapping of two "
          "PMD extents racing MADV_DONTNEED of the second, whose PT_RECLAIM (6.14) frees that "
          "PTE table under mmap_read_lock. Oracle: the pages of the first extent end lazyfree, "
          "old and clean (still mapped), the second extent's are gone",
          catches=("madvise_free_ignores_map_failure",), kernel=PT_RECLAIM_KERNEL)
def madv_free_vs_pt_reclaim(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    w, size = two_extents(sc)
    mm = w.mms[0]
    async def free():
        ret = await madvise.do_madvise(k, mm, w.addr, 2 * size, madvise.MADV_FREE)
        if ret:
            raise _oracle("madvise_free failed", f"ret {ret}")
        for i, p in zip(KEPT, w.extra["kept_pteps"], strict=True):
            pte = k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p))
            folio = k.alloc.page_of(pte.paddr) if pte.kind is Kind.LEAF else None
            if folio is None or pte.young or pte.dirty or not folio.extra.get("lazyfree"):
                raise _oracle("madvise_free missed a page",
                              f"{w.addr + i * k.page_size:#x}: {pte}, lazyfree "
                              f"{folio is not None and folio.extra.get('lazyfree')}")
        return "freed"

    sc.task("free", free())
    sc.task("dontneed", zap_and_check(m, k, w, size))
    return w


@scenario("mincore-vs-dontneed-reclaim",
          "mincore() (mincore_pte_range, a failed map is ACTION_AGAIN, then pte_hole) over an anon "
          "mapping of two PMD extents racing MADV_DONTNEED of the second with PT_RECLAIM (6.14) "
          "freeing its table. Oracle: the first extent's written pages are resident, the second "
          "extent's written pages are both resident or both not (one zap under one ptl), "
          "nothing else is",
          kernel=PT_RECLAIM_KERNEL)
def mincore_vs_dontneed_reclaim(sc: Scenario) -> World:
    from mm_core import mincore
    m, k = sc.machine, sc.kernel
    w, size = two_extents(sc)
    mm = w.mms[0]
    pages = 2 * size >> k.page_shift
    first = size >> k.page_shift

    async def residency():
        vec = await mincore.do_mincore(k, mm, w.addr, 2 * size)
        if isinstance(vec, int):
            raise _oracle("mincore failed", f"ret {vec}")
        want = [0] * pages
        for i in KEPT:
            want[i] = 1
        second = {vec[first + i] for i in ZAPPED}
        if len(second) == 1:
            for i in ZAPPED:
                want[first + i] = vec[first + i]
        if vec != want:
            wrong = [(hex(w.addr + (i << k.page_shift)), vec[i]) for i in range(pages) if vec[i] != want[i]]
            raise _oracle("mincore misreported residency", f"{wrong[:6]}")
        return "all zapped" if second == {0} else "none zapped"

    sc.task("mincore", residency())
    sc.task("dontneed", zap_and_check(m, k, w, size))
    return w


@scenario("ksm-unmerge-vs-pt-reclaim",
          "KSM unmerging of a KSM page mapped at two addresses in the second PMD extent and one in "
          "the first (break_ksm at each: walk_page_range_vma + break_ksm_pmd_entry, a failed map "
          "is SKIP, \"no KSM page here\"; a KSM page found: a FAULT_FLAG_UNSHARE fault), as "
          "ksmd's break_cow() does under mmap_read_lock, racing MADV_DONTNEED of the second extent "
          "with PT_RECLAIM (6.14) freeing its table (MADV_UNMERGEABLE holds mmap_write_lock: it "
          "cannot meet MADV_DONTNEED). Oracle: no address maps a KSM page any more, the first "
          "extent's holds a private copy with the bytes, the KSM page is freed",
          catches=("break_ksm_pmd_entry_ignores_map_failure",), kernel=PT_RECLAIM_KERNEL)
def ksm_unmerge_vs_pt_reclaim(sc: Scenario) -> World:
    from mm_core import ksm
    m, k = sc.machine, sc.kernel
    page = k.page_size
    w, size = two_extents(sc)
    mm, a = w.mms[0], w.addr
    m.madvise(mm, a, 2 * size, emu.MADV_MERGEABLE)
    data = b"\x5a" * page
    targets = [a + size + i * page for i in ZAPPED]
    kva = a + KEPT[0] * page                                # becomes the KSM page
    for va in [kva] + targets:
        k.physmem.write(m.translate(mm, va), data)
    for va in targets:
        m.ksm_merge(mm, kva, mm, va)
    kpage = k.alloc.page_of(m.translate(mm, kva))
    zapped = Completion("zapped")

    async def unmerge():
        for va in targets + [kva]:
            ret = await ksm.break_cow(k, mm, va)
            if ret:
                raise _oracle("break_cow failed", f"{va:#x}: ret {ret}")
        await traps.wait(zapped)
        # after both (read directly: nothing else runs now)
        still = [hex(va) for va in targets + [kva] if m.translate(mm, va) is not None
                 and ksm.folio_test_ksm(k.alloc.page_of(m.translate(mm, va)))]
        if still or k.alloc.pages.get(kpage.pfn) is kpage:
            raise _oracle("KSM unmerge left a KSM page mapped",
                          f"still mapping it: {still}; the KSM page {kpage.paddr:#x} mapcount "
                          f"{kpage.mapcount}")
        if m.read_user(mm, kva, len(data)) != data:
            raise _oracle("KSM unmerge lost the bytes", f"{kva:#x} reads {m.read_user(mm, kva, 16)!r}...")
        return "unmerged"

    async def zap():
        ret = await dontneed(k, w, size)
        if ret:
            raise _oracle("madvise_dontneed failed", f"ret {ret}")
        return "zapped"

    sc.task("ksmd", unmerge())
    sc.task("dontneed", completing(zap(), zapped))
    return w


@scenario("ksm-scan-vs-pt-reclaim",
          "ksmd's scan (ksm_do_scan: scan_get_next_rmap_item's follow_page(FOLL_GET) page by page "
          "under mmap_read_lock, a NULL from follow_page_pte()'s failed map is SKIP; "
          "cmp_and_merge_page through the stable and unstable trees, write_protect_page + "
          "replace_page) in its second round over two PMD extents of MADV_MERGEABLE pages, two "
          "pairs of identical contents spread over both, racing MADV_DONTNEED of the first extent "
          "(scanned first) with PT_RECLAIM (6.14) freeing its table; then a third round. Oracle: "
          "every address still mapped reads its own bytes, no two addresses with different bytes "
          "share a frame, the second extent's identical pair is one write-protected KSM page after "
          "round 3, the first extent is gone",
          catches=("follow_page_pte_ignores_map_failure",), kernel=PT_RECLAIM_KERNEL)
def ksm_scan_vs_pt_reclaim(sc: Scenario) -> World:
    from mm_core import ksm
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    m.madvise(mm, a, 2 * size, emu.MADV_MERGEABLE)
    x, y = b"\x5a" * page, b"\xa5" * page
    gone = {a + ZAPPED[0] * page: x, a + ZAPPED[1] * page: y}             # the zapped extent
    kept = {a + size + KEPT[0] * page: x, a + size + KEPT[1] * page: x, a + size + 5 * page: y}
    for va, data in (gone | kept).items():
        k.physmem.write(m.touch(mm, va, write=True), data)
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    state = ksm.ksm_state(k)
    while state.seqnr == 0:                                 # round 1: the checksums
        m.ksm_scan(pages=8)
    zapped = Completion("zapped")

    async def scan():
        await ksm.ksm_do_scan(k, 100)                       # round 2
        await traps.wait(zapped)
        # the pair may have missed each other in round 2: an unstable tree node of the
        # zapped extent whose get_mergeable_page() fails ends the search with nothing
        # inserted (as in the kernel); round 3, after the zap, must merge them
        await ksm.ksm_do_scan(k, 100)
        # after both (read directly: nothing else runs now)
        left = [hex(va) for va in gone if m.translate(mm, va) is not None
                and m.translate(mm, va) >> k.page_shift != k.zero_page.pfn]
        if left:
            raise _oracle("madvise_dontneed left a page", f"{left}")
        frames: dict[int, bytes] = {}
        for va, data in kept.items():
            got = m.read_user(mm, va, page)
            if got != data:
                raise _oracle("KSM scan changed a mapped page",
                              f"{va:#x} reads {got[:8]!r}..., wrote {data[:8]!r}...")
            frame = m.translate(mm, va) & ~(page - 1)
            if frames.setdefault(frame, data) != data:
                raise _oracle("KSM merged pages that differ", f"frame {frame:#x} at {va:#x}")
        pair = [m.translate(mm, a + size + i * page) for i in KEPT]
        if pair[0] != pair[1] or not ksm.folio_test_ksm(k.alloc.page_of(pair[0])) \
                or m.translate(mm, a + size + KEPT[0] * page, "w") is not None:
            raise _oracle("KSM scan missed the identical pair", f"{[hex(p) for p in pair]}")
        return "merged"

    async def zap():
        ret = await madvise.do_madvise(k, mm, a, size, madvise.MADV_DONTNEED)
        if ret:
            raise _oracle("madvise_dontneed failed", f"ret {ret}")
        return "zapped"

    sc.task("ksmd", scan())
    sc.task("dontneed", completing(zap(), zapped))
    return World([mm], [], a, pmdp)
