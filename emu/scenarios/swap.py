"""Swap scenarios: do_swap_page, swapoff's unuse walk, MADV_PAGEOUT, khugepaged's swap-in
and shmem swap racing each other, exit and zap.
"""
from __future__ import annotations

import emu
from emu.scenario import Scenario
from emu.scenarios.base import (
    BASE,
    World,
    scenario,
)
from emu.sched.loop import run_sync
from mm_core import huge_memory, madvise, swap_state
from mm_core.sanitizers import Finding

# -- swap ------------------------------------------------------------------------------------

def paged_out(sc: Scenario, written: int, out: int, length: int, shmem: str | None = None):
    """A 4-slot swap area without readahead and a mapping of ``length`` bytes at BASE
    (private anon, or with ``shmem`` a shared memfd of that name and size) whose first
    ``written`` pages hold swap_marker() and whose first ``out`` pages MADV_PAGEOUT sent
    to swap. Returns (mm, address, the memfd or None)."""
    m, k = sc.machine, sc.kernel
    page = k.page_size
    m.swapon(4, readahead=1)
    inode = m.memfd_create(shmem, length) if shmem else None
    mm = m.new_mm()
    flags = (emu.MAP_SHARED if shmem else emu.MAP_PRIVATE | emu.MAP_ANONYMOUS) | emu.MAP_FIXED
    a = m.mmap(mm, BASE, length, emu.PROT_READ | emu.PROT_WRITE, flags, file=inode)
    for i in range(written):
        k.physmem.write(m.touch(mm, a + i * page, write=True), swap_marker(k, a + i * page))
    m.madvise(mm, a, out * page, madvise.MADV_PAGEOUT)
    return mm, a, inode


async def shmem_swapoff_and_check(k, inode) -> str:
    """swapoff() (shmem_unuse first); afterwards no page of ``inode`` may still be swapped
    (ORACLE otherwise)."""
    from mm_core import swapfile
    ret = await swapfile.swapoff(k)
    if ret or inode.swapped or inode.mapping.swap_entries:
        raise Finding("ORACLE", f"ORACLE: swapoff returned {ret} with {inode.swapped} shmem pages "
                      "still swapped", "ORACLE:shmem-swapoff")
    return "off"


def swapped_page(sc: Scenario, cached: bool, pages: int = 1) -> tuple:
    """An mm with ``pages`` anon pages written, swapped out by MADV_PAGEOUT (and, ``cached``,
    the first read back into the swap cache by MADV_WILLNEED): (mm, address, the first
    page's bytes); page i holds swap_marker(k, address + i pages)."""
    m, k = sc.machine, sc.kernel
    mm, a, _ = paged_out(sc, pages, pages, 2 * k.page_size)
    if cached:
        m.madvise(mm, a, k.page_size, madvise.MADV_WILLNEED)
    return mm, a, swap_marker(k, a)


def swap_marker(k, va: int) -> bytes:
    return b"swapped!" + (va >> k.page_shift).to_bytes(8, "little")


async def swapin_and_check(k, m, mm, va: int, write: bool, name: str):
    """Fault ``va`` in (again after each FAULT-RETRY) and check the bytes swapped out."""
    from emu.arch import Access
    from mm_core import memory
    data = swap_marker(k, va)
    for _ in range(8):
        paddr = m.translate(mm, va, "w" if write else "r")
        if paddr is not None:
            seen = k.physmem.read(paddr, len(data))
            if seen != data:
                raise Finding("ORACLE", "ORACLE: a swapped-in page does not hold what was swapped out",
                              "ORACLE:swapin", [f"  {name} reads {seen!r} at {va:#x}, expected {data!r}"])
            return "written" if write else "read"
        ret = await memory.do_user_addr_fault(k, mm, va, Access.W if write else Access.R)
        if ret is not memory.FaultResult.OK:
            raise Finding("ORACLE", f"ORACLE: swap-in fault failed: {ret.value}", "ORACLE:swapin-fault")
    raise Finding("ORACLE", f"ORACLE: {name} kept faulting on a swapped-out page", "ORACLE:swapin-refault")


@scenario("swapin-vs-swapin",
          "two threads fault the same swapped-out anon page (do_swap_page): one maps the swap-cache "
          "folio, the other finds the pte changed under its ptl (pte_same) and refaults; both must "
          "read the bytes written before MADV_PAGEOUT, and rss and the swap counts must balance",
          catches=("do_swap_page_without_pte_same",))
def swapin_vs_swapin(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    mm, a, _ = swapped_page(sc, cached=False)
    sc.task("t1", swapin_and_check(k, m, mm, a, False, "t1"))
    sc.task("t2", swapin_and_check(k, m, mm, a, False, "t2"))
    return World([mm], [], a, 0)


@scenario("swapoff-vs-swapin",
          "swapoff (try_to_unuse -> unuse_pte_range -> unuse_pte) while two threads fault in the "
          "two swapped-out pages, one of them already in the swap cache: get_swap_device() pins "
          "the area under a fault, do_swap_page rechecks the folio is still the swap cache's and "
          "pte_same, unuse_pte skips a pte faulted in first; the bytes must come back either way")
def swapoff_vs_swapin(sc: Scenario) -> World:
    from mm_core import swapfile
    m, k = sc.machine, sc.kernel
    mm, a, _ = swapped_page(sc, cached=True, pages=2)

    async def swapoff():
        ret = await swapfile.swapoff(k)
        if ret:
            raise Finding("ORACLE", f"ORACLE: swapoff failed with {ret}", "ORACLE:swapoff")
        return "off"

    sc.task("swapoff", swapoff())
    sc.task("t1", swapin_and_check(k, m, mm, a, False, "t1"))
    sc.task("t2", swapin_and_check(k, m, mm, a + k.page_size, True, "t2"))
    return World([mm], [], a, 0)


@scenario("swapoff-vs-exit",
          "swapoff's try_to_unuse() while a process exits: exit_mmap() (mm_users already 0, so "
          "unuse_mm skips it) zaps a swap pte whose slot also has a swap-cache folio, and "
          "free_swap_and_cache() drops the count; swapoff's cache pass can then free the slot, "
          "finish, and free the area: free_swap_and_cache() must hold it with get_swap_device()",
          catches=("free_swap_and_cache_without_get_swap_device",))
def swapoff_vs_exit(sc: Scenario) -> World:
    from mm_core import memory, swapfile
    k = sc.kernel
    mm, a, _ = swapped_page(sc, cached=True)

    async def swapoff():
        ret = await swapfile.swapoff(k)
        if ret:
            raise Finding("ORACLE", f"ORACLE: swapoff failed with {ret}", "ORACLE:swapoff")
        return "off"

    async def exit_mm():
        await memory.exit_mmap(k, mm)            # check_mm() at its end
        return "exited"

    sc.task("exit", exit_mm())
    sc.task("swapoff", swapoff())
    return World([], [], a, 0)


@scenario("pageout-vs-swapin",
          "MADV_PAGEOUT swapping out two anon pages (the walk, then shrink_folio_list: "
          "add_to_swap, try_to_unmap_one under the ptl, pageout, __remove_mapping) while one "
          "thread reads and another writes them, faulting them back in (do_swap_page) when they "
          "are gone: the bytes written before must be read back whatever the interleaving")
def pageout_vs_swapin(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    m.swapon(4, readahead=2)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * k.page_size, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    for i in range(2):
        va = a + i * k.page_size
        k.physmem.write(m.touch(mm, va, write=True), swap_marker(k, va))

    async def pageout():
        for _ in range(2):
            ret = await madvise.do_madvise(k, mm, a, 2 * k.page_size, madvise.MADV_PAGEOUT)
            if ret:
                raise Finding("ORACLE", f"ORACLE: MADV_PAGEOUT failed with {ret}", "ORACLE:pageout")
        return "paged out"

    async def reader():
        for _ in range(2):
            await swapin_and_check(k, m, mm, a, False, "reader")
        return "read"

    sc.task("pageout", pageout())
    sc.task("reader", reader())
    sc.task("writer", swapin_and_check(k, m, mm, a + k.page_size, True, "writer"))
    return World([mm], [], a, 0)


@scenario("khugepaged-swapin-vs-zap",
          "MADV_COLLAPSE of an anon PMD range with two swapped-out pages, one already in the swap "
          "cache: hpage_collapse_scan_pmd() counts them and __collapse_huge_page_swapin() brings "
          "them in through do_swap_page(FAULT_FLAG_ALLOW_RETRY) under mmap_read_lock, while a "
          "thread faults the cached one in (a locked folio: VM_FAULT_RETRY, the collapse gives up "
          "with mmap_lock already dropped) and MADV_DONTNEED zaps the other (its swap pte before "
          "the swap-in, or its page after the collapse): the kept page must read its bytes, the "
          "zapped one zeroes, and rss and the swap counts must balance at exit")
def khugepaged_swapin_vs_zap(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    page, size = k.page_size, huge_memory.hpage_pmd_size(k)
    mm, a, _ = paged_out(sc, 3, 2, size)                 # the third stays: a writable pte
    m.madvise(mm, a, page, madvise.MADV_WILLNEED)

    async def collapse():
        ret = await madvise.do_madvise(k, mm, a, size, madvise.MADV_COLLAPSE)
        if ret not in (0, -11):                          # SCAN_SUCCEED, or SCAN_PAGE_LOCK: -EAGAIN
            raise Finding("ORACLE", f"ORACLE: MADV_COLLAPSE failed with {ret}", "ORACLE:collapse")
        return "collapsed" if ret == 0 else "gave up"

    async def dontneed():
        ret = await madvise.do_madvise(k, mm, a + page, page, madvise.MADV_DONTNEED)
        paddr = m.translate(mm, a + page)
        if ret or (paddr is not None and k.physmem.read(paddr, 16) != bytes(16)):
            raise Finding("ORACLE", "ORACLE: a zapped page still holds its bytes", "ORACLE:zap",
                          [f"  MADV_DONTNEED returned {ret}, pa {paddr}"])
        return "zapped"

    sc.task("collapse", collapse())
    sc.task("reader", swapin_and_check(k, m, mm, a, False, "reader"))
    sc.task("dontneed", dontneed())
    return World([mm], [], a, 0)


@scenario("shmem-swapoff-vs-fault",
          "swapoff's shmem_unuse() (shmem_find_swap_entries, shmem_swapin_folio) while two "
          "threads fault the two swapped-out pages of a shared memfd mapping back in, one "
          "already in the swap cache: whoever locks the folio second finds it no longer the swap "
          "cache's (or the index no longer holding the entry) and looks again (-EEXIST, "
          "goto repeat); the bytes written before MADV_PAGEOUT must come back and every slot go")
def shmem_swapoff_vs_fault(sc: Scenario) -> World:
    from mm_core import swapfile
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm, a, inode = paged_out(sc, 2, 2, 2 * page, shmem="shmem-swap")
    off = inode.mapping.swap_entries[0]
    run_sync(swap_state.read_swap_cache_async(k, swapfile.swp_entry_to_pte(off), None, 0))
    k.swap_info.cache[off].refcount -= 1                # only the swap cache holds it

    sc.task("swapoff", shmem_swapoff_and_check(k, inode))
    sc.task("t1", swapin_and_check(k, m, mm, a, False, "t1"))
    sc.task("t2", swapin_and_check(k, m, mm, a + page, True, "t2"))
    return World([mm], [inode], a, 0)


@scenario("swapin-skip-swapcache",
          "a SWP_SYNCHRONOUS_IO swap area (zram-like): a reader and a writer fault the same "
          "swapped-out anon page (swap count 1: both skip the swap cache and read it into "
          "folios of their own); the writer then writes new bytes and MADV_PAGEOUT swaps them "
          "out again into the same, lowest free, slot. The reader must never map its stale copy: "
          "13ddaf26be32's swapcache_prepare() pin keeps the slot from being freed and reused "
          "before the winner's pte is set (pte_same() alone cannot see the ABA)",
          catches=("do_swap_page_skip_swapcache_without_swapcache_prepare",))
def swapin_skip_swapcache(sc: Scenario) -> World:
    from emu.arch import Access
    from mm_core import memory
    m, k = sc.machine, sc.kernel
    page = k.page_size
    m.swapon(4, readahead=1, synchronous=True)
    mm = m.new_mm()
    a = m.mmap(mm, BASE, page, emu.PROT_READ | emu.PROT_WRITE,
               emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED)
    old, new = b"version1" + bytes(8), b"version2" + bytes(8)
    k.physmem.write(m.touch(mm, a, write=True), old)
    m.madvise(mm, a, page, madvise.MADV_PAGEOUT)
    state = {"written": False}

    def check(name: str, paddr: int) -> None:
        seen, want = k.physmem.read(paddr, len(old)), new if state["written"] else old
        if seen != want:
            raise Finding("ORACLE", "ORACLE: a swap-in mapped a stale copy of the page",
                          "ORACLE:swapin-stale",
                          [f"  {name} reads {seen!r} at {a:#x}, expected {want!r}",
                           f"  the newer bytes were {'written' if state['written'] else 'not yet written'}"])

    async def access(name: str, write: bool) -> int:
        for _ in range(64):
            paddr = m.translate(mm, a, "w" if write else "r")
            if paddr is not None:
                return paddr
            ret = await memory.do_user_addr_fault(k, mm, a, Access.W if write else Access.R)
            if ret is not memory.FaultResult.OK:
                raise Finding("ORACLE", f"ORACLE: swap-in fault failed: {ret.value}", "ORACLE:swapin-fault")
        raise Finding("ORACLE", f"ORACLE: {name} kept faulting on a swapped-out page",
                      "ORACLE:swapin-refault")

    async def reader():
        check("reader", await access("reader", False))
        return "read"

    async def writer():
        paddr = await access("writer", True)
        k.physmem.write(paddr, new)                      # the store, atomic with the flag
        state["written"] = True
        ret = await madvise.do_madvise(k, mm, a, page, madvise.MADV_PAGEOUT)
        if ret:
            raise Finding("ORACLE", f"ORACLE: MADV_PAGEOUT failed with {ret}", "ORACLE:pageout")
        return "written"

    sc.task("reader", reader())
    sc.task("writer", writer())
    return World([mm], [], a, 0)


@scenario("shmem-willneed-race",
          "MADV_WILLNEED of a shared memfd mapping whose three pages are swapped out "
          "(shmem_swapin_range: each swap entry read under RCU, used after rcu_read_unlock) "
          "while a thread reads page 0, another writes page 1, ftruncate drops page 2 and "
          "swapoff brings everything back: a stale entry is skipped (nothing read for a freed "
          "slot), the faults read the bytes written before MADV_PAGEOUT, and no slot, swap-cache "
          "folio or folio reference is left")
def shmem_willneed_race(sc: Scenario) -> World:
    from mm_core import shmem
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm, a, inode = paged_out(sc, 3, 3, 3 * page, shmem="shmem-willneed")

    async def willneed():
        ret = await madvise.do_madvise(k, mm, a, 3 * page, madvise.MADV_WILLNEED)
        if ret:
            raise Finding("ORACLE", f"ORACLE: MADV_WILLNEED failed with {ret}", "ORACLE:willneed")
        return "willneed"

    async def truncate():
        await shmem.shmem_setattr_size(k, inode, 2 * page)
        return "truncated"

    sc.task("willneed", willneed())
    sc.task("reader", swapin_and_check(k, m, mm, a, False, "reader"))
    sc.task("writer", swapin_and_check(k, m, mm, a + page, True, "writer"))
    sc.task("truncate", truncate())
    sc.task("swapoff", shmem_swapoff_and_check(k, inode))
    return World([mm], [inode], a, 0)


@scenario("shmem-willneed-vs-fault",
          "MADV_WILLNEED of a shared memfd mapping's swapped-out page (shmem_swapin_range) while "
          "a thread faults the same index in: whoever sets SWAP_HAS_CACHE first reads the slot, "
          "the other finds the folio in the swap cache, or sleeps a tick on swapcache_prepare()'s "
          "-EEXIST (outside the RCU section), or finds the entry stale; the fault reads the bytes "
          "written before MADV_PAGEOUT",
          catches=("shmem_swapin_range_reads_under_rcu",))
def shmem_willneed_vs_fault(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm, a, inode = paged_out(sc, 1, 1, page, shmem="shmem-willneed")

    async def willneed():
        ret = await madvise.do_madvise(k, mm, a, page, madvise.MADV_WILLNEED)
        if ret:
            raise Finding("ORACLE", f"ORACLE: MADV_WILLNEED failed with {ret}", "ORACLE:willneed")
        return "willneed"

    sc.task("willneed", willneed())
    sc.task("reader", swapin_and_check(k, m, mm, a, False, "reader"))
    return World([mm], [inode], a, 0)
