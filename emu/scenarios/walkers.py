"""One scenario per walker entry point (DAMON, /proc, mprotect, mlock, MADV_COLD, numa_maps,
memory-failure) against retraction or a THP migration, each with an oracle on the
walker's user-visible result.
"""
from __future__ import annotations

import emu
from emu.arch import Kind
from emu.scenario import Scenario
from emu.scenarios.base import (
    World,
    anon_thp,
    collapse_file_tail,
    collapsed_shmem,
    completing,
    scenario,
    thp_under_migration,
)
from emu.sched import traps
from emu.sched.loop import run_sync
from mm_core import huge_memory, madvise, pgtable, shmem
from mm_core.sanitizers import Finding


@scenario("damon-vs-thp-migration",
          "a DAMON aging walk (walk_page_range + damon_mkold_pmd_entry) over a THP whose pmd is "
          "a migration entry for as long as the walk runs: spec §6 case 6; the retry loop "
          "must end",
          catches=("damon_endless_again",))
def damon_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import damon
    k = sc.kernel
    mm, a, pmdp = thp_under_migration(sc)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("damon", damon.damon_va_mkold(k, mm, a, a + size))
    return World([mm], [], a, pmdp)


@scenario("proc-walkers-vs-thp-migration",
          "/proc/PID/smaps, pagemap, clear_refs and the PAGEMAP_SCAN ioctl (fs/proc/task_mmu.c) "
          "walking a THP whose pmd is a migration entry for as long as they run: spec §7 asked "
          "whether they share DAMON's endless ACTION_AGAIN; pmd_trans_huge_lock() takes the "
          "migration pmd, so every walk must end",
          catches=("proc_walker_misses_migration_pmd",))
def proc_walkers_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import task_mmu
    k = sc.kernel
    mm, a, pmdp = thp_under_migration(sc)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("smaps", task_mmu.show_smaps(k, mm))
    sc.task("pagemap", task_mmu.pagemap_read(k, mm, (a >> 12) * 8, (size >> 12) * 8, True))
    sc.task("clear_refs", task_mmu.clear_refs_write(k, mm, task_mmu.CLEAR_REFS_ALL))
    sc.task("pagemap_scan", task_mmu.do_pagemap_scan(k, mm, task_mmu.PmScanArg(a, a + size, vec_len=8)))
    return World([mm], [], a, pmdp)


# -- the remaining walker entry points against retract_page_tables() -------------------------
#
# Each is a collapsed_shmem() world two pages longer than the collapsed PMD range (those two
# pages written, so present, dirty and young in the next PTE table): the walker covers the
# whole mapping while collapse_file_tail() retracts the first table. The oracle checks the
# walker's user-visible result on the pages it must have handled; the injected bug is the
# walker going on into the table its pmd named after pte_offset_map_lock() failed.

ENTRY_EXTRA_PAGES = 2


def entry_world(sc: Scenario) -> tuple[World, int, list[int]]:
    """collapsed_shmem() with ENTRY_EXTRA_PAGES written pages after the PMD range.
    Returns (world, whole length, the extra pages' pte addresses)."""
    w = collapsed_shmem(sc, extra_pages=ENTRY_EXTRA_PAGES)
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    extra = w.addr + size
    for i in range(ENTRY_EXTRA_PAGES):
        m.touch(w.mms[0], extra + i * k.page_size, write=True)
    pmdp = run_sync(pgtable.walk_alloc(k, w.mms[0], extra, k.arch.pmd_level))
    table = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp)).paddr
    pteps = [pgtable.entry_addr(k, table, k.arch.pte_level, extra + i * k.page_size)
             for i in range(ENTRY_EXTRA_PAGES)]
    return w, size + ENTRY_EXTRA_PAGES * k.page_size, pteps


def _oracle(what: str, detail: str) -> Finding:
    return Finding("ORACLE", f"ORACLE: {what}", f"ORACLE:{what.split()[0]}", [f"  {detail}"])


@scenario("mprotect-vs-retract",
          "mprotect(PROT_READ) of a shared shmem mapping (change_protection -> change_pmd_range "
          "-> change_pte_range, -EAGAIN -> RETRY) racing retract_page_tables(). Oracle: no page "
          "of the range is writable afterwards",
          catches=("change_pte_range_ignores_map_failure",))
def mprotect_vs_retract(sc: Scenario) -> World:
    from mm_core import mprotect
    w, length, _ = entry_world(sc)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]

    async def protect():
        ret = await mprotect.do_mprotect(k, mm, w.addr, length, emu.PROT_READ)
        if ret:
            raise _oracle("mprotect failed", f"ret {ret}")
        writable = [hex(va) for va in range(w.addr, w.addr + length, k.page_size)
                    if m.translate(mm, va, "w") is not None]
        if writable:
            raise _oracle("mprotect left pages writable", f"{writable[:4]}")
        if m.translate(mm, w.addr + length - k.page_size, "r") is None:
            raise _oracle("mprotect lost a present page", f"{w.addr + length - k.page_size:#x}")
        return "protected"

    sc.task("mprotect", protect())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("mlock-vs-retract",
          "mlock2(MLOCK_ONFAULT) of a shared shmem mapping (apply_vma_lock_flags -> "
          "mlock_vma_pages_range -> mlock_pte_range, a failed map is ACTION_AGAIN) racing "
          "retract_page_tables(); ONFAULT keeps __mm_populate() from faulting 512 pages per "
          "schedule. Oracle: the VMA is VM_LOCKED, the written pages still present and their "
          "folios mlocked once",
          catches=("mlock_pte_range_ignores_map_failure",))
def mlock_vs_retract(sc: Scenario) -> World:
    from mm_core import mlock
    from mm_core.mm import VM_LOCKED
    w, length, pteps = entry_world(sc)
    m, k = sc.machine, sc.kernel
    mm = w.mms[0]
    extra = [k.alloc.page_of(k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p)).paddr) for p in pteps]

    async def lock():
        ret = await mlock.do_mlock(k, mm, w.addr, length, mlock.MLOCK_ONFAULT)
        if ret:
            raise _oracle("mlock failed", f"ret {ret}")
        vmas = mm.overlapping(w.addr, w.addr + length)
        unlocked = [f"{v.start:#x}" for v in vmas if not v.flags & VM_LOCKED]
        if unlocked:
            raise _oracle("mlock left a VMA without VM_LOCKED", f"{unlocked}")
        tail = w.addr + length - ENTRY_EXTRA_PAGES * k.page_size
        absent = [hex(va) for va in range(tail, w.addr + length, k.page_size) if m.translate(mm, va) is None]
        if absent:
            raise _oracle("mlock lost present pages", f"{absent}")
        counts = [f.extra.get("mlock_count", 0) for f in extra]
        if counts != [1] * ENTRY_EXTRA_PAGES:
            raise _oracle("mlock missed a mapped folio", f"mlock_count {counts}")
        return "locked"

    sc.task("mlock", lock())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("madv-cold-vs-retract",
          "MADV_COLD (madvise_cold_or_pageout_pte_range, a failed map is SKIP) over a shared "
          "shmem mapping racing retract_page_tables(). Oracle: the written pages after the "
          "retracted range end old and deactivated",
          catches=("madvise_cold_uses_stale_pmd",))
def madv_cold_vs_retract(sc: Scenario) -> World:
    w, length, pteps = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]

    async def cold():
        ret = await madvise.do_madvise(k, mm, w.addr, length, madvise.MADV_COLD)
        if ret:
            raise _oracle("madvise_cold failed", f"ret {ret}")
        ptes = [k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p)) for p in pteps]
        if any(p.kind is not Kind.LEAF or p.young for p in ptes):
            raise _oracle("madvise_cold left a pte young or unmapped", f"{ptes}")
        if k.stats["madv_cold_deactivated"] != ENTRY_EXTRA_PAGES:
            raise _oracle("madvise_cold deactivated the wrong folios",
                          f"{k.stats['madv_cold_deactivated']} of {ENTRY_EXTRA_PAGES}")
        return "cold"

    sc.task("cold", cold())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("numa-maps-vs-retract",
          "/proc/PID/numa_maps (show_numa_map -> gather_pte_stats, a failed map is ACTION_AGAIN) "
          "racing retract_page_tables(). Oracle: the shmem VMA's line counts exactly the written "
          "pages (the retracted table is empty, the huge folio not mapped)",
          catches=("gather_pte_stats_ignores_map_failure",))
def numa_maps_vs_retract(sc: Scenario) -> World:
    from mm_core import task_mmu
    w, _, _ = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]
    expect = {f"dirty={ENTRY_EXTRA_PAGES}", f"N0={ENTRY_EXTRA_PAGES}"}

    async def show():
        text = await task_mmu.show_numa_maps(k, mm)
        fields = set(text.split())
        if not expect <= fields or any(f.startswith(("anon=", "mapped=")) for f in fields):
            raise _oracle("numa_maps miscounted", f"{text.strip()!r}, want {sorted(expect)}")
        return text

    sc.task("numa_maps", show())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("hwpoison-vs-retract",
          "memory failure's kill_accessing_process() (walk_page_range + hwpoison_pte_range, a "
          "failed map is SKIP) looking for a poisoned page of a shared shmem mapping racing "
          "retract_page_tables() of the range before it. Oracle: it finds the page's address "
          "(-EHWPOISON, the SIGBUS address)",
          catches=("hwpoison_pte_range_ignores_map_failure",))
def hwpoison_vs_retract(sc: Scenario) -> World:
    from mm_core import memory_failure
    w, length, pteps = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]
    last = w.addr + length - k.page_size
    pfn = k.arch.decode(k.arch.pte_level, k.physmem.read_entry(pteps[-1])).paddr >> k.page_shift

    async def kill():
        ret, tk = await memory_failure.kill_accessing_process(k, mm, pfn, memory_failure.MF_ACTION_REQUIRED)
        if ret != -memory_failure.EHWPOISON or tk.addr != last:
            raise _oracle("hwpoison walk missed the page", f"ret {ret}, addr {tk.addr:#x}, want {last:#x}")
        return "found"

    sc.task("hwpoison", kill())
    sc.task("retract", collapse_file_tail(k, w))
    return w


@scenario("mprotect-vs-thp-migration",
          "mprotect(PROT_READ) of an anonymous THP while migration (rmap-driven, without "
          "mmap_lock) has its pmd as a writable migration entry: change_pmd_range() takes the "
          "swap pmd to change_huge_pmd(), which makes the entry readable so that "
          "remove_migration_pmd() does not map the THP writable again. Oracle: once both are "
          "done, the THP is mapped and not writable",
          catches=("change_huge_pmd_keeps_writable_migration_entry",))
def mprotect_vs_thp_migration(sc: Scenario) -> World:
    from mm_core import mprotect
    from mm_core.locks import Completion
    from mm_core.sched_helpers import stalled_thp_migration
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)                                     # one THP
    pmdp = run_sync(pgtable.walk_alloc(k, mm, a, k.arch.pmd_level))
    migrated = Completion("migrated")

    async def protect():
        ret = await mprotect.do_mprotect(k, mm, a, size, emu.PROT_READ)
        await traps.wait(migrated)
        if ret:
            raise _oracle("mprotect failed", f"ret {ret}")
        if m.translate(mm, a + 3 * k.page_size, "w") is not None:
            raise _oracle("mprotect left the THP writable",
                          f"pmd {k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(pmdp))}")
        if m.translate(mm, a) != thp:
            raise _oracle("mprotect lost the THP", f"{m.translate(mm, a)} != {thp:#x}")
        return "protected"

    sc.task("mprotect", protect())
    sc.task("migrate", completing(stalled_thp_migration(k, mm.vma_lookup(a), pmdp), migrated))
    return World([mm], [], a, pmdp)


@scenario("perf-vs-retract",
          "perf's sample page size (perf_get_page_size -> perf_get_pgtable_size: IRQs off, "
          "pmdp_get_lockless() into a stack copy, pte_offset_map(&pmd), a failed map is RETRY) "
          "of a shared shmem mapping racing retract_page_tables(). The copy cannot fail to map "
          "(retraction clears the live pmd, not the copy): IRQs off is what keeps the table it "
          "names from being freed. Oracle: the retracted range samples as size 0, the written "
          "page after it as one page",
          catches=("perf_get_page_size_without_irqs_off",))
def perf_vs_retract(sc: Scenario) -> World:
    from mm_core import events_core
    w, length, _ = entry_world(sc)
    k = sc.kernel
    mm = w.mms[0]
    last = w.addr + length - k.page_size
    samples = {w.addr: 0, w.addr + k.page_size: 0, last: k.page_size}

    async def sample():
        sizes = {va: await events_core.perf_get_page_size(k, mm, va) for va in samples}
        if sizes != samples:
            raise _oracle("perf sampled a wrong page size",
                          f"{ {hex(va): s for va, s in sizes.items()} }, want "
                          f"{ {hex(va): s for va, s in samples.items()} }")
        return "sampled"

    sc.task("perf", sample())
    sc.task("retract", collapse_file_tail(k, w))
    return w


def page_marker(k, va: int) -> bytes:
    """What the entry scenarios write at the start of an extra page: recognisable bytes."""
    return b"entrypg!" + (va >> k.page_shift).to_bytes(8, "little")


def written_entry_world(sc: Scenario) -> tuple[World, int, list[int]]:
    """entry_world() with page_marker() written into each extra page (through its pte)."""
    w, length, pteps = entry_world(sc)
    k = sc.kernel
    tail = w.addr + length - ENTRY_EXTRA_PAGES * k.page_size
    for i, p in enumerate(pteps):
        paddr = k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p)).paddr
        k.physmem.write(paddr, page_marker(k, tail + i * k.page_size))
    return w, length, pteps


@scenario("madv-pageout-vs-retract",
          "MADV_PAGEOUT (madvise_cold_or_pageout_pte_range, a failed map is SKIP, then "
          "reclaim_pages -> shrink_folio_list: folio_referenced, try_to_unmap of the file ptes, "
          "pageout = shmem_writepage) over a shared shmem mapping with a swap area, racing "
          "retract_page_tables(). Oracle: the written pages after the retracted range are paged "
          "out (ptes cleared, their indexes hold swap entries whose slots hold the written "
          "bytes); the PMD-order folio stays in the page cache, unmapped, with no swap entry")
def madv_pageout_vs_retract(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    si = m.swapon(4, readahead=1)
    w, length, pteps = written_entry_world(sc)
    mm, mapping = w.mms[0], w.inode.mapping
    size = huge_memory.hpage_pmd_size(k)
    tail = w.addr + size
    first_index = size >> k.page_shift

    async def pageout():
        ret = await madvise.do_madvise(k, mm, w.addr, length, madvise.MADV_PAGEOUT)
        if ret:
            raise _oracle("madvise_pageout failed", f"ret {ret}")
        mapped = [hex(va) for va in range(tail, w.addr + length, k.page_size)
                  if m.translate(mm, va) is not None]
        if mapped or k.stats["pageout_reclaimed"] != ENTRY_EXTRA_PAGES:
            raise _oracle("madvise_pageout kept written pages",
                          f"still mapped {mapped}, reclaimed {k.stats['pageout_reclaimed']} of "
                          f"{ENTRY_EXTRA_PAGES}, kept {k.stats['pageout_kept']}")
        for i in range(ENTRY_EXTRA_PAGES):
            off = mapping.swap_entries.get(first_index + i)
            want = page_marker(k, tail + i * k.page_size)
            got = None if off is None else bytes(si.slots[off][:len(want)])
            if got != want:
                raise _oracle("madvise_pageout lost a page's bytes",
                              f"index {first_index + i}: slot {off} holds {got!r}, want {want!r}")
        if any(index < first_index for index in mapping.swap_entries) or \
                shmem.filemap_get_folio(mapping, 0) is not w.extra["folio"]:
            raise _oracle("madvise_pageout touched the retracted range",
                          f"swap entries {sorted(mapping.swap_entries)}, index 0 "
                          f"{shmem.filemap_get_folio(mapping, 0)}")
        return "paged out"

    sc.task("pageout", pageout())
    sc.task("retract", collapse_file_tail(k, w))
    return w


MBIND_NODE = 1          # mbind-vs-retract's target node; the file's pages are on node 0


@scenario("mbind-vs-retract",
          "mbind(MPOL_BIND, node 1, MPOL_MF_MOVE) of a shared shmem mapping on a two-node machine "
          "(do_mbind under mmap_write_lock, which retract does not take: queue_pages_range -> "
          "queue_folios_pte_range, a failed map is ACTION_AGAIN) racing retract_page_tables(). "
          "Oracle: 0, the VMA's policy bind:1, and each written page (on node 0, mapped once) "
          "seen by the walk exactly once: migrated to node 1 with its bytes, as 6.6 does for a "
          "shmem folio, or, as the model does (it migrates no shmem folios, docs/walkers.md), "
          "left in place as an isolation failure",
          catches=("queue_folios_pte_range_ignores_map_failure",))
def mbind_vs_retract(sc: Scenario) -> World:
    from mm_core import mempolicy
    m, k = sc.machine, sc.kernel
    mempolicy.set_numa_nodes(k, 2)          # before the world's allocations: RAM in two nodes
    w, length, pteps = written_entry_world(sc)
    mm = w.mms[0]
    frames = [k.arch.decode(k.arch.pte_level, k.physmem.read_entry(p)).paddr for p in pteps]
    if any(mempolicy.page_to_nid(k, f) == MBIND_NODE for f in frames):
        raise ValueError("mbind-vs-retract: a written page is already on the target node")
    tail = w.addr + length - ENTRY_EXTRA_PAGES * k.page_size

    async def bind():
        ret = await mempolicy.do_mbind(k, mm, w.addr, length, mempolicy.MPOL_BIND, {MBIND_NODE},
                                       mempolicy.MPOL_MF_MOVE)
        if ret:
            raise _oracle("mbind failed", f"ret {ret}")
        seen = k.stats["mbind_isolate_failed"] + k.stats["numa_pages_migrated"]
        wrong = []
        for i, frame in enumerate(frames):
            va = tail + i * k.page_size
            now = m.translate(mm, va)
            moved = now is not None and mempolicy.page_to_nid(k, now) == MBIND_NODE \
                and k.physmem.read(now, 16) == page_marker(k, va)
            if now != frame and not moved:
                wrong.append(f"{va:#x}: {frame:#x} -> {now}")
        if wrong or seen != ENTRY_EXTRA_PAGES:
            raise _oracle("mbind mishandled the written pages",
                          f"{wrong}; seen {seen} times (isolation failures + migrated), want "
                          f"{ENTRY_EXTRA_PAGES}")
        policies = {str(v.policy) for v in mm.overlapping(w.addr, w.addr + length)}
        if policies != {f"bind:{MBIND_NODE}"}:
            raise _oracle("mbind set the wrong policy", f"{policies}")
        return "bound"

    sc.task("mbind", bind())
    sc.task("retract", collapse_file_tail(k, w))
    return w
