"""userfaultfd scenarios: UFFDIO_COPY / REGISTER(WP) / MOVE against collapse, retraction,
reclaim and PT_RECLAIM; spec §6 cases 8, 9, 14.
"""
from __future__ import annotations

import emu
from emu.scenario import Scenario
from emu.scenarios.base import (
    BASE,
    World,
    collapse_file_tail,
    collapsed_shmem,
    completing,
    scenario,
    thp_under_migration,
)
from emu.sched import traps
from mm_core import huge_memory, madvise, userfaultfd
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.sanitizers import Finding


@scenario("retract-vs-uffdio-copy",
          "retract_page_tables() on a private shmem mapping while UFFDIO_COPY puts an anon page "
          "into it (anon_vma_prepare, then the pte): spec §6 case 9, the recheck under the locks",
          catches=("retract_without_anon_vma_recheck",))
def retract_vs_uffdio_copy(sc: Scenario) -> World:
    w = collapsed_shmem(sc, private=True)
    k = sc.kernel
    sc.task("retract", collapse_file_tail(k, w))
    sc.task("uffd", userfaultfd.mfill_atomic_copy(k, w.mms[0], w.addr + 5 * k.page_size, b"\xa5" * 64))
    return w


@scenario("retract-vs-uffd-wp-register",
          "retract_page_tables() on a shared shmem mapping while userfaultfd registers it for WP "
          "(mmap_write_lock, which retract does not take) and UFFDIO_WRITEPROTECT puts uffd-wp "
          "markers in the empty table: spec §6 case 9, the userfaultfd_wp() recheck under the "
          "locks. Oracle: a write (FOLL_NOWAIT-style fault) to a protected page must reach the "
          "userfaultfd. Needs an arch with uffd-wp (x86_64; arm64 from --kernel 6.13)",
          catches=("retract_without_uffd_wp_recheck",))
def retract_vs_uffd_wp_register(sc: Scenario) -> World:
    from mm_core.locks import Completion
    from mm_core.memory import (
        FAULT_FLAG_ALLOW_RETRY,
        FAULT_FLAG_RETRY_NOWAIT,
        FAULT_FLAG_USER,
        FAULT_FLAG_WRITE,
        VM_FAULT_RETRY,
        handle_mm_fault,
    )
    w = collapsed_shmem(sc)
    m, k = sc.machine, sc.kernel
    mm, page = w.mms[0], k.page_size
    size = huge_memory.hpage_pmd_size(k)
    ctx = m.userfaultfd(mm)
    protected = w.addr + 4 * page
    retracted = Completion("retract done")

    async def register_and_protect():
        ret = await userfaultfd.userfaultfd_register(k, ctx, w.addr, size,
                                                     userfaultfd.UFFDIO_REGISTER_MODE_WP)
        if ret == -userfaultfd.EINVAL and not userfaultfd.have_arch_userfaultfd(k, "WP"):
            return "no uffd-wp on this arch/kernel"
        ret = await userfaultfd.userfaultfd_writeprotect(k, ctx, protected, 4 * page,
                                                         userfaultfd.UFFDIO_WRITEPROTECT_MODE_WP)
        if ret:
            raise Finding("ORACLE", f"ORACLE: UFFDIO_WRITEPROTECT failed with {ret}",
                          "ORACLE:uffdio_writeprotect")
        await traps.wait(retracted)
        # a write to a protected page: the first fault may map it (read-only, uffd-wp, from
        # the marker), the next must go to the userfaultfd (VM_FAULT_RETRY, not waiting)
        addr = protected + page
        flags = FAULT_FLAG_WRITE | FAULT_FLAG_USER | FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_RETRY_NOWAIT
        for _ in range(3):
            await mmap_read_lock(mm)
            try:
                ret = await handle_mm_fault(k, mm.vma_lookup(addr), addr, flags)
            finally:
                await mmap_read_unlock(mm)
            if ret & VM_FAULT_RETRY:
                return "protected"
            if m.translate(mm, addr, "w") is not None:
                pmd = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(w.pmdp))
                raise Finding("ORACLE", "ORACLE: a write to a uffd-wp protected page did not reach the "
                              "userfaultfd", "ORACLE:uffd-wp-lost",
                              [f"  {addr:#x} is writable; pmd now {pmd.kind.value}: the table holding "
                               f"the uffd-wp markers of [{protected:#x}, +{4 * page:#x}) is gone",
                               f"  retracted tables: {k.stats['retracted_tables']}"])
        raise Finding("ORACLE", "ORACLE: a write to a uffd-wp protected page neither mapped nor "
                      "reached the userfaultfd", "ORACLE:uffd-wp-fault")

    sc.task("retract", completing(collapse_file_tail(k, w), retracted))
    sc.task("uffd", register_and_protect())
    return w


@scenario("uffd-fault-vs-copy",
          "a write fault on a userfaultfd-registered (MISSING) anon page racing the monitor's "
          "UFFDIO_COPY of that page: the fault is queued on fault_pending_wqh before "
          "userfaultfd_must_wait() looks at the page tables, the copy changes them before "
          "wake_userfault() looks at the queue, so the fault either sees the page or is woken",
          catches=("handle_userfault_checks_before_queueing",))
def uffd_fault_vs_copy(sc: Scenario) -> World:
    from emu.arch import Access
    from mm_core.memory import FaultResult, do_user_addr_fault
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 4 * page, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    ctx = m.userfaultfd(mm)
    m.uffdio_register(ctx, a, 4 * page, userfaultfd.UFFDIO_REGISTER_MODE_MISSING)
    va = a + page
    data = b"uffdcopy" + va.to_bytes(8, "little")

    async def fault():
        ret = await do_user_addr_fault(k, mm, va, Access.W)
        seen = m.read_user(mm, va, len(data))
        if ret is not FaultResult.OK or seen != data:
            raise Finding("ORACLE", "ORACLE: the faulting task did not get the copied page",
                          "ORACLE:uffd-fault", [f"  fault {ret}, reads {seen!r}"])
        return "resolved"

    async def monitor():
        return await userfaultfd.userfaultfd_mfill(k, ctx, userfaultfd.MFILL_ATOMIC_COPY, va, page, 0, data)

    sc.task("fault", fault())
    sc.task("uffd", monitor())
    return World([mm], [], va)


@scenario("uffd-move-vs-folio-lock",
          "UFFDIO_MOVE of an anon page while reclaim (shrink_folio_list, no swap) holds its folio "
          "lock: move_pages_pte()'s folio_trylock() fails, so it unmaps both ptes, sleeps in "
          "folio_lock() and retries; spec §6 case 14 (map/unmap balance). Needs --kernel 6.8 or "
          "later (under older profiles the ioctl is -EINVAL and only reclaim runs)",
          catches=("move_pages_pte_unmaps_stack_copy", "move_pages_pte_unmaps_in_map_order"))
def uffd_move_vs_folio_lock(sc: Scenario) -> World:
    from mm_core import vmscan
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    src, dst = a + 2 * page, a + size + 5 * page            # dst in another PTE table
    paddr = m.touch(mm, src, write=True)
    marker = b"uffdmove" + (src >> k.page_shift).to_bytes(8, "little")
    k.physmem.write(paddr, marker)
    folio = k.alloc.page_of(paddr)                          # isolated from the LRU by reclaim

    async def move():
        ret = await userfaultfd.move_pages(k, mm, dst, src, page)
        if not k.profile.uffdio_move and ret == -userfaultfd.EINVAL:
            return "no UFFDIO_MOVE"
        moved = m.read_user(mm, dst, len(marker))
        if ret != page or moved != marker or m.translate(mm, src) is not None:
            raise Finding("ORACLE", "ORACLE: UFFDIO_MOVE did not move the page", "ORACLE:uffdio_move",
                          [f"  returned {ret}, dst reads {moved!r}, src still mapped: "
                           f"{m.translate(mm, src) is not None}"])
        return "moved"

    async def reclaim():
        [res] = await vmscan.shrink_folio_list(k, [folio])
        if not res.kept_locked and res.mappings_found != res.mapcount:
            raise Finding("ORACLE", "ORACLE: folio_referenced() missed a mapping of a locked anon folio",
                          "ORACLE:folio_referenced",
                          [f"  found {res.mappings_found} of mapcount {res.mapcount}: the anon rmap "
                           f"(anon_vma, index {folio.index}) does not lead to the pte"])
        return "kept" if res.kept_locked else "activated"

    sc.task("uffd", move())
    sc.task("reclaim", reclaim())
    return World([mm], [], src, 0, extra={"folio": folio, "dst": dst})


@scenario("uffd-move-vs-pt-reclaim",
          "UFFDIO_MOVE into a PTE table whose only other page MADV_DONTNEED zaps, and whose "
          "table 6.14's PT_RECLAIM then frees (pml + ptl, pmd_clear, RCU free), all under "
          "mmap_read_lock: move_pages_pte() must recheck the dst pmd under the ptl; spec §7 "
          "(6.14). Needs --kernel 6.14 (before it the table stays and the move just happens)",
          catches=("move_pages_pte_without_dst_pmd_recheck",))
def uffd_move_vs_pt_reclaim(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    src, dst = a + 2 * page, a + size + 5 * page
    paddr = m.touch(mm, src, write=True)
    marker = b"uffdmove" + (src >> k.page_shift).to_bytes(8, "little")
    k.physmem.write(paddr, marker)
    m.touch(mm, a + size + page, write=True)                # the dst table's only other page

    async def move():
        ret = await userfaultfd.move_pages(k, mm, dst, src, page)
        if not k.profile.uffdio_move and ret == -userfaultfd.EINVAL:
            return "no UFFDIO_MOVE"
        intact = m.read_user(mm, src, len(marker)) == marker
        if ret == -userfaultfd.EINVAL and k.profile.pt_reclaim and intact:
            return "EINVAL (the dst table went between the map and the sanity check)"
        moved = m.read_user(mm, dst, len(marker))          # b"": MADV_DONTNEED dropped it since
        if ret != page or moved not in (marker, b"") or m.translate(mm, src) is not None:
            raise Finding("ORACLE", "ORACLE: UFFDIO_MOVE did not move the page", "ORACLE:uffdio_move",
                          [f"  returned {ret}, dst reads {moved!r}, src still mapped: "
                           f"{m.translate(mm, src) is not None}"])
        return "moved"

    sc.task("uffd", move())
    sc.task("dontneed", madvise.madvise_dontneed(k, mm, a + size, a + 2 * size))
    return World([mm], [], src, 0, extra={"dst": dst})


@scenario("uffd-move-vs-thp-migration",
          "UFFDIO_MOVE of one page of an anon THP (the move must split it: not PMD-aligned) "
          "while the THP is being migrated (a stalled migration holds a migration pmd): "
          "move_pages() takes pmd_trans_huge_lock() and must test pmd_present() before "
          "pmd_folio(). Oracle: the THP's bytes stay readable at src and nothing lands at dst "
          "(after the split the PTE-mapped large folio's split_folio() is not modelled: the "
          "move is -EBUSY). Needs --kernel 6.8 or later",
          catches=("move_pages_reads_folio_of_non_present_pmd",))
def uffd_move_vs_thp_migration(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm, a, pmdp = thp_under_migration(sc)                       # the "migrate" task
    src = a + 3 * page
    paddr = m.translate(mm, src, "r")
    marker = b"thpmove!" + (src >> k.page_shift).to_bytes(8, "little")
    k.physmem.write(paddr, marker)
    dst = m.mmap(mm, BASE + 2 * size, size, emu.PROT_READ | emu.PROT_WRITE,
                 emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)

    async def move():
        ret = await userfaultfd.move_pages(k, mm, dst, src, page)
        if not k.profile.uffdio_move and ret == -userfaultfd.EINVAL:
            return "no UFFDIO_MOVE"
        kept = m.read_user(mm, src, len(marker))
        if ret != -userfaultfd.EBUSY or kept != marker or m.translate(mm, dst) is not None:
            raise Finding("ORACLE", "ORACLE: UFFDIO_MOVE of a page of a THP under migration went wrong",
                          "ORACLE:uffdio_move_thp",
                          [f"  returned {ret}, src reads {kept!r}, "
                           f"dst mapped: {m.translate(mm, dst) is not None}"])
        return "split, EBUSY"

    sc.task("uffd", move())
    return World([mm], [], src, pmdp, extra={"dst": dst})
