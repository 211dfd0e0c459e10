"""The composition root: guest RAM + vCPUs + processes + scheduler + mm_core."""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from emu import plugins
from emu.arch import ACCESS_BY_LETTER, PAGE_SIZE, Access, Translation, run_walk
from emu.linux.futex import Futexes
from emu.linux.process import Process, Thread
from emu.linux.thread import guest_thread
from emu.linux.uaccess import copy_to_user
from emu.loader import PF_R, PF_W, PF_X, LoadError, build_stack, read_elf
from emu.physmem import PhysMem, parse_size
from emu.sched.loop import API_TASK, Scheduler, in_sync, run_sync
from emu.sched.task import TaskState
from emu.vcpu import VCPU, UserStop
from mm_core import (
    events_core,
    fork,
    gup,
    hmm,
    khugepaged,
    ksm,
    madvise,
    memory,
    mempolicy,
    migrate_device,
    pgtable,
    ptdump,
    rcu,
    shmem,
    swapfile,
    task_mmu,
    userfaultfd,
    vmscan,
)
from mm_core import memory_failure as mm_memory_failure
from mm_core import mincore as mm_mincore
from mm_core import mlock as mm_mlock
from mm_core import mmap as mm_mmap
from mm_core import mprotect as mm_mprotect
from mm_core import mremap as mm_mremap
from mm_core.config import Profile
from mm_core.kernel import Kernel
from mm_core.mm import (
    VM_EXEC,
    VM_GROWSDOWN,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_READ,
    VM_WRITE,
    VMA,
    MMStruct,
)

STACK_SIZE = 8 << 20
DEFAULT_QUANTUM = 20000


class GuestAccessError(Exception):
    """The API touched an address the guest could not access (it would get SIGSEGV)."""


@dataclass
class RunResult:
    """What ``Machine.run()`` reports for the first spawned process, plus machine totals."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: Any
    summary: dict[str, Any] = field(default_factory=dict)


class Machine:
    """An emulated machine of one architecture.

    >>> m = Machine(arch="arm64", mem="256M")
    >>> p = m.spawn("workloads/bin/arm64/hello")
    >>> result = m.run()
    """

    def __init__(self, arch: str = "x86_64", mem: str | int = "256M", cpus: int = 1,
                 kernel: str | Profile = "6.6", policy: Any = "round-robin", quantum: int = DEFAULT_QUANTUM,
                 walks: str = "inline", count_instructions: bool = True, prefault: bool = True,
                 numa_nodes: int = 1, **arch_options: Any) -> None:
        if cpus < 1 or cpus > 64:
            raise ValueError("cpus must be between 1 and 64")
        if quantum < 1:
            raise ValueError("quantum must be positive")
        if walks not in ("inline", "stepped"):
            raise ValueError("walks must be 'inline' (fast) or 'stepped' (each table read is a "
                             "scheduling point)")
        self.stepped_walks = walks == "stepped"
        # False: guest code runs without Unicorn's count hook (3-11 ns an instruction):
        # full speed, but no instruction counts and no preemption inside user mode
        self.count_instructions = count_instructions
        self.arch = plugins.get_arch(arch, **arch_options)
        # prefault: guest code runs faster on RAM the host already backs (~9 us a page on
        # first touch otherwise); kernel-only scenarios skip it to start in microseconds
        self.ram = PhysMem(parse_size(mem), self.arch.big_endian, prefault)
        self.kernel = Kernel(self.arch, self.ram, kernel)
        mempolicy.set_numa_nodes(self.kernel, numa_nodes)
        self.kernel.flush_tlb_range = self._shootdown
        self.ncpus = cpus
        self.quantum = quantum
        self.vcpus: list[VCPU] = []
        self.scheduler = Scheduler(policy, run_user=self._run_user)
        sched = self.scheduler
        # outside a run, API calls are the caller (run_sync's API_TASK), not the task the
        # scheduler ran last
        self.kernel.current_task = lambda: API_TASK if in_sync() else sched.current
        self.kernel.current_step = lambda: len(sched.picks)
        self.kernel.tasks = lambda: sched.tasks           # spin_is_contended() looks at waiters
        sched.on_task_end.append(self.kernel.san.task_ended)
        sched.observers.append(self.kernel.san.on_trap)
        sched.observers.append(self._ipi_point)
        self._thread_of_task: dict[Any, Thread] = {}
        self.kernel.vcpus = lambda: self.vcpus
        self.processes: list[Process] = []
        page = self.kernel.page_size
        task_top = self.arch.task_size & ~(page - 1)
        self.stack_top = task_top - page
        self.sentinel_va = self.stack_top - STACK_SIZE - 2 * page
        self.mmap_base = (self.sentinel_va - (16 << 20)) & ~((2 << 20) - 1)
        self.wall_seconds = 0.0
        self._kthreads = False
        self._tids = 1000
        self.futexes = Futexes()

    # -- public properties ------------------------------------------------------------------
    @property
    def physmem(self) -> memoryview:
        """All guest RAM, physical address 0 first."""
        return self.ram.view

    # -- address spaces -----------------------------------------------------------------------
    def new_mm(self) -> MMStruct:
        """mm_alloc() + pgd_alloc(): an empty address space."""
        k = self.kernel
        mm = MMStruct(k, 0, asid=k.new_asid())
        mm.pgd = pgtable.pgd_alloc(k, mm).paddr
        mm.mmap_base = self.mmap_base
        return mm

    def mmap(self, mm: MMStruct, addr: int, length: int, prot: int, flags: int,
             file: Any = None, offset: int = 0) -> int:
        """mmap(2) in ``mm`` (Linux PROT_*/MAP_* values), of anonymous memory or of a
        ``file`` from memfd_create(); raises OSError on failure."""
        if offset % self.kernel.page_size:
            raise OSError(22, "offset must be page aligned")
        return _check(run_sync(mm_mmap.do_mmap(self.kernel, mm, addr, length, prot, flags, file,
                                               offset // self.kernel.page_size)))

    def mremap(self, mm: MMStruct, addr: int, old_len: int, new_len: int, flags: int,
               new_addr: int = 0) -> int:
        """mremap(2) (MREMAP_MAYMOVE = 1, MREMAP_FIXED = 2); returns the new address."""
        return _check(run_sync(mm_mremap.do_mremap(self.kernel, mm, addr, old_len, new_len, flags,
                                                   new_addr)))

    def mincore(self, mm: MMStruct, addr: int, length: int) -> list[int]:
        """mincore(2): one entry per page, 1 where it is resident."""
        result = run_sync(mm_mincore.do_mincore(self.kernel, mm, addr, length))
        return result if isinstance(result, list) else _check(result)

    def memfd_create(self, name: str = "emu", size: int = 0) -> Any:
        """memfd_create() + ftruncate(): a shmem file; release it with close_file()."""
        inode = shmem.memfd_create(self.kernel, f"memfd:{name}")
        inode.refs += 1
        if size:
            run_sync(shmem.shmem_setattr_size(self.kernel, inode, size))
        return inode

    def close_file(self, inode: Any) -> None:
        shmem.iput(self.kernel, inode)

    def madvise(self, mm: MMStruct, addr: int, length: int, advice: int) -> None:
        """madvise(2): MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_HUGEPAGE,
        MADV_NOHUGEPAGE, MADV_COLLAPSE, ..."""
        _check(run_sync(madvise.do_madvise(self.kernel, mm, addr, length, advice)))

    def mlock(self, mm: MMStruct, addr: int, length: int, flags: int = 0) -> None:
        """mlock2(2) (flags 0: mlock(2); 1: MLOCK_ONFAULT): VM_LOCKED, the mapped folios
        mlocked, the rest faulted in."""
        _check(run_sync(mm_mlock.do_mlock(self.kernel, mm, addr, length, flags)))

    def mlockall(self, mm: MMStruct, flags: int) -> None:
        """mlockall(2): MCL_CURRENT (1) locks and populates every VMA, MCL_FUTURE (2)
        every later mmap/brk, MCL_ONFAULT (4) without populating."""
        _check(run_sync(mm_mlock.do_mlockall(self.kernel, mm, flags)))

    def munlockall(self, mm: MMStruct) -> None:
        """munlockall(2)."""
        _check(run_sync(mm_mlock.do_munlockall(self.kernel, mm)))

    def munlock(self, mm: MMStruct, addr: int, length: int) -> None:
        """munlock(2)."""
        _check(run_sync(mm_mlock.do_munlock(self.kernel, mm, addr, length)))

    def munmap(self, mm: MMStruct, addr: int, length: int) -> None:
        _check(run_sync(mm_mmap.do_munmap(self.kernel, mm, addr, length)))

    def mprotect(self, mm: MMStruct, addr: int, length: int, prot: int) -> None:
        _check(run_sync(mm_mprotect.do_mprotect(self.kernel, mm, addr, length, prot)))

    def fork_mm(self, mm: MMStruct) -> MMStruct:
        """fork()'s dup_mm(): a new mm with a copy of every VMA of ``mm``; page tables are
        copied where the kernel copies them (anon memory: both sides write-protected,
        copy-on-write on the next write), file mappings without anon pages refault.
        Raises OSError(ENOMEM) (after tearing the half-built child down) on failure. A
        range registered with a userfaultfd asking for UFFD_FEATURE_EVENT_FORK makes
        fork wait for the handler's read() of UFFD_EVENT_FORK: run fork.dup_mmap() as a
        task (emu.scenario) for that, as nothing here reads it."""
        child = self.new_mm()
        ret = run_sync(fork.dup_mmap(self.kernel, child, mm))
        if ret < 0:
            self.exit_mm(child)          # mmput() of the half-built child
            _check(ret)
        return child
    def swapon(self, slots: int, readahead: int = 4, synchronous: bool = False) -> Any:
        """swapon(2) of a swap area of ``slots`` pages kept in host memory; MADV_PAGEOUT then
        swaps anonymous pages out and faults bring them back (``readahead``: the
        swap_vma_readahead window in pages; ``synchronous``: a SWP_SYNCHRONOUS_IO device,
        like zram, whose faults skip the swap cache for an entry one pte names). Returns
        the area (mm_core.swapfile.SwapInfo)."""
        return swapfile.swapon(self.kernel, slots, readahead, synchronous)

    def swapoff(self) -> None:
        """swapoff(2): bring every swapped-out page back (try_to_unuse) and remove the area."""
        _check(run_sync(swapfile.swapoff(self.kernel)))

    def uffdio_move(self, mm: MMStruct, dst: int, src: int, length: int, mode: int = 0) -> int:
        """ioctl(UFFDIO_MOVE) (kernel profiles 6.8 and later): move the private anonymous
        pages of [src, src + length) to dst without copying them. Returns the bytes moved
        (uffdio_move.move); raises OSError when nothing was (EEXIST, ENOENT, EBUSY, ...).
        ``mode`` takes UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES (2)."""
        return _check(run_sync(userfaultfd.move_pages(self.kernel, mm, dst, src, length, mode)))

    # -- /proc/PID (fs/proc/task_mmu.c) ------------------------------------------------------
    def smaps(self, mm: MMStruct) -> list[task_mmu.SmapsRecord]:
        """/proc/PID/smaps: one record per VMA (``rec["Rss"]`` in kB, ``rec.mss`` in bytes,
        ``rec.render()`` the kernel's text)."""
        return run_sync(task_mmu.show_smaps(self.kernel, mm))

    def ptdump(self, mm: MMStruct | None = None) -> str:
        """The page-table dump (mm/ptdump.c): init_mm's kernel tables as
        /sys/kernel/debug/kernel_page_tables shows them, or with ``mm`` a process's user
        tables (x86's page_tables/current_user), one line per range of equal attributes."""
        return "".join(line + "\n" for line in run_sync(ptdump.ptdump_show(self.kernel, mm)))

    def ptdump_check_wx(self) -> int:
        """CONFIG_DEBUG_WX's check of init_mm: the number of writable+executable kernel
        pages (0: passed); the verdict goes to the kernel log."""
        return run_sync(ptdump.ptdump_check_wx(self.kernel))

    def numa_maps(self, mm: MMStruct) -> str:
        """/proc/PID/numa_maps: one line per VMA (policy, anon/dirty/mapped/mapmax/active,
        per-node page counts N<nid>=, kernelpagesize_kB) in the kernel's format."""
        return run_sync(task_mmu.show_numa_maps(self.kernel, mm))

    def smaps_rollup(self, mm: MMStruct) -> task_mmu.SmapsRecord:
        """/proc/PID/smaps_rollup: the sums over every VMA."""
        return run_sync(task_mmu.show_smaps_rollup(self.kernel, mm))

    def pagemap(self, mm: MMStruct, start: int, end: int, show_pfn: bool = True) -> list[int]:
        """/proc/PID/pagemap read for the pages of [start, end): one 64-bit entry per page
        (PM_PRESENT bit 63, PM_SWAP 62, PM_FILE 61, PM_MMAP_EXCLUSIVE 56, PM_SOFT_DIRTY
        55, the pfn or swap type/offset in bits 0-54 when ``show_pfn``, i.e. CAP_SYS_ADMIN)."""
        page = self.kernel.page_size
        first, last = start // page, (end + page - 1) // page
        result = run_sync(task_mmu.pagemap_read(self.kernel, mm, first * task_mmu.PM_ENTRY_BYTES,
                                                (last - first) * task_mmu.PM_ENTRY_BYTES, show_pfn))
        return result if isinstance(result, list) else [_check(result)]

    def pagemap_scan(self, mm: MMStruct, start: int, end: int, **arg: Any) -> list[tuple[int, int, int]]:
        """The PAGEMAP_SCAN ioctl (6.7+) over [start, end): (start, end, categories) regions
        (PAGE_IS_* bits); keyword arguments are the other pm_scan_arg fields (vec_len,
        max_pages, category_mask, category_anyof_mask, category_inverted, return_mask,
        flags). Raises OSError on -errno."""
        arg.setdefault("vec_len", 1 << 20)
        scan = task_mmu.do_pagemap_scan(self.kernel, mm, task_mmu.PmScanArg(start, end, **arg))
        ret, regions = run_sync(scan)
        _check(ret)
        return regions

    def clear_refs(self, mm: MMStruct, type: int) -> None:
        """A write of ``type`` to /proc/PID/clear_refs: 1 all, 2 anon, 3 file-mapped (clear
        the young bits), 4 soft-dirty, 5 reset VmHWM; raises OSError(EINVAL) otherwise."""
        _check(run_sync(task_mmu.clear_refs_write(self.kernel, mm, type)))

    # -- userfaultfd --------------------------------------------------------------------------
    def userfaultfd(self, mm: MMStruct, features: int = 0) -> userfaultfd.UserfaultfdCtx:
        """userfaultfd(2) + UFFDIO_API for ``mm``: the context the other uffdio_* calls take.
        ``features`` takes UFFD_FEATURE_SIGBUS (faults get SIGBUS instead of waiting),
        UFFD_FEATURE_WP_UNPOPULATED (6.4+, where uffd-wp exists: WRITEPROTECT puts markers
        in none anon ptes), ...; one UFFDIO_API does not offer is EINVAL (OSError)."""
        from emu.linux.uffd import uffd_api_features
        if features & ~uffd_api_features(self.kernel):
            _check(-userfaultfd.EINVAL)
        return userfaultfd.userfaultfd_ctx_new(self.kernel, mm, features)

    def uffdio_register(self, ctx: userfaultfd.UserfaultfdCtx, start: int, length: int, mode: int) -> int:
        """ioctl(UFFDIO_REGISTER): ``mode`` is a mix of UFFDIO_REGISTER_MODE_MISSING (1), _WP
        (2), _MINOR (4). Returns uffdio_register.ioctls (a bit per supported ioctl); raises
        OSError: EINVAL (WP where the arch has no uffd-wp bit, MINOR off shmem, ...), EPERM,
        EBUSY, ENOMEM (no VMA in the range)."""
        return _check(run_sync(userfaultfd.userfaultfd_register(self.kernel, ctx, start, length, mode)))

    def uffdio_unregister(self, ctx: userfaultfd.UserfaultfdCtx, start: int, length: int) -> None:
        """ioctl(UFFDIO_UNREGISTER): a WP range is un-protected first (markers dropped)."""
        _check(run_sync(userfaultfd.userfaultfd_unregister(self.kernel, ctx, start, length)))

    def uffdio_copy(self, ctx: userfaultfd.UserfaultfdCtx, dst: int, data: bytes, mode: int = 0) -> int:
        """ioctl(UFFDIO_COPY) of ``data`` (whole pages) to ``dst``: the bytes copied
        (uffdio_copy.copy). ``mode``: UFFDIO_COPY_MODE_DONTWAKE (1), _WP (2). OSError:
        EEXIST, ENOENT (not registered), EAGAIN (the PTE table vanished: retry), ..."""
        length = -(-len(data) // self.kernel.page_size) * self.kernel.page_size
        return _check(run_sync(userfaultfd.userfaultfd_mfill(
            self.kernel, ctx, userfaultfd.MFILL_ATOMIC_COPY, dst, length, mode, data)))

    def uffdio_zeropage(self, ctx: userfaultfd.UserfaultfdCtx, dst: int, length: int, mode: int = 0) -> int:
        """ioctl(UFFDIO_ZEROPAGE): the zero page (private mappings) or zeroed page-cache pages
        (shared shmem) over [dst, dst + length); the bytes done (uffdio_zeropage.zeropage)."""
        return _check(run_sync(userfaultfd.userfaultfd_mfill(
            self.kernel, ctx, userfaultfd.MFILL_ATOMIC_ZEROPAGE, dst, length, mode)))

    def uffdio_continue(self, ctx: userfaultfd.UserfaultfdCtx, dst: int, length: int, mode: int = 0) -> int:
        """ioctl(UFFDIO_CONTINUE) (resolving minor faults on shmem): map the page-cache
        pages of [dst, dst + length); the bytes mapped (uffdio_continue.mapped). OSError:
        EFAULT (a hole in the file), EEXIST, EAGAIN, ..."""
        return _check(run_sync(userfaultfd.userfaultfd_mfill(
            self.kernel, ctx, userfaultfd.MFILL_ATOMIC_CONTINUE, dst, length, mode)))

    def uffdio_poison(self, ctx: userfaultfd.UserfaultfdCtx, dst: int, length: int, mode: int = 0) -> int:
        """ioctl(UFFDIO_POISON) (kernel profiles 6.6 and later): PTE_MARKER_POISONED in the none
        ptes of [dst, dst + length), so that an access gets SIGBUS (VM_FAULT_HWPOISON) and
        no userfault; the faults waiting there are woken unless UFFDIO_POISON_MODE_DONTWAKE
        (1). Returns the bytes poisoned (uffdio_poison.updated). OSError: EEXIST (a pte or
        any marker already there), EAGAIN (the PTE table vanished, or mmap_changing: retry),
        ENOENT (not registered), EFAULT (past EOF), EINVAL (before 6.6, bad range or mode)."""
        return _check(run_sync(userfaultfd.userfaultfd_poison(self.kernel, ctx, dst, length, mode)))

    def uffdio_wake(self, ctx: userfaultfd.UserfaultfdCtx, start: int, length: int) -> None:
        """ioctl(UFFDIO_WAKE): wake the faults waiting in a range resolved with DONTWAKE."""
        _check(run_sync(userfaultfd.userfaultfd_wake(self.kernel, ctx, start, length)))

    def uffdio_writeprotect(self, ctx: userfaultfd.UserfaultfdCtx, start: int, length: int,
                            mode: int) -> None:
        """ioctl(UFFDIO_WRITEPROTECT): ``mode`` UFFDIO_WRITEPROTECT_MODE_WP (1) protects (the
        uffd-wp bit on present ptes, markers in none ptes of shmem VMAs), 0 un-protects and
        wakes the waiting faults (unless _DONTWAKE, 2). OSError(ENOENT) for a range not
        registered for WP."""
        _check(run_sync(userfaultfd.userfaultfd_writeprotect(self.kernel, ctx, start, length, mode)))

    def lru_gen_age(self, mm: MMStruct, force_scan: bool = True, can_swap: bool = True) -> Any:
        """One MGLRU aging walk over ``mm`` (mm/vmscan.c walk_mm(), then inc_max_seq()):
        young bits cleared in the real tables, young folios moved to the youngest
        generation. Returns the walk (mm_stats, skipped pmds); see mm_core.vmscan."""
        return run_sync(vmscan.lru_gen_age_mm(self.kernel, mm, force_scan, can_swap))

    def ksm_merge(self, mm: MMStruct, addr: int, other_mm: MMStruct, other_addr: int) -> None:
        """What ksmd does once its unstable tree matched two identical pages of
        MADV_MERGEABLE memory (mm/ksm.c try_to_merge_two_pages()): the page at ``addr``
        becomes a write-protected KSM page and replaces the one at ``other_addr``.
        Raises OSError(EFAULT) when the merge fails (see mm_core.ksm)."""
        _check(run_sync(ksm.ksm_merge_pages(self.kernel, mm, addr, other_mm, other_addr)))

    def ksm_scan(self, pages: int = 100) -> int:
        """One ksmd wakeup (mm/ksm.c ksm_do_scan(ksm_thread_pages_to_scan)): scan up to
        ``pages`` anon pages of the MADV_MERGEABLE mms from where the last wakeup stopped,
        merging through the stable and unstable trees (a page is only compared in the
        unstable tree once its checksum held for a whole round, so identical pages merge
        in the second round). Returns the pages scanned: fewer than ``pages`` when the
        round ended (the next call starts a new one). State: ``machine.kernel.ksm``."""
        return run_sync(ksm.ksm_do_scan(self.kernel, pages))

    def memory_failure(self, pfn: int, mm: MMStruct | None = None,
                       action_required: bool = True) -> int | None:
        """memory_failure(pfn, MF_ACTION_REQUIRED) as the machine-check handler of a task
        running ``mm`` calls it (mm/memory-failure.c; ``pfn`` in base pages). The first
        report poisons the page (a small anon or shmem page is unmapped: hwpoison entries;
        a shmem page stays in the page cache, poisoned) and returns None; a report on a
        poisoned page walks ``mm`` (kill_accessing_process()) and returns the address
        SIGBUS would carry. Raises OSError: EFAULT (``mm`` does not map it), EBUSY
        (poisoned but not recovered: a THP, whose split is not modelled, or a page with
        extra references such as a GUP pin), EHWPOISON (poisoned, no action required),
        ENXIO."""
        flags = mm_memory_failure.MF_ACTION_REQUIRED if action_required else 0
        ret, tk = run_sync(mm_memory_failure.memory_failure(self.kernel, pfn, flags, mm))
        if ret == -mm_memory_failure.EHWPOISON and tk is not None and tk.addr:
            return tk.addr
        _check(ret)
        return None

    def mbind(self, mm: MMStruct, addr: int, length: int, mode: int, nodes=(), flags: int = 0) -> None:
        """mbind(2): set the NUMA policy of [addr, addr + length) (``mode`` one of
        mm_core.mempolicy.MPOL_*, ``nodes`` an iterable of node ids, ``flags``
        MPOL_MF_STRICT / MPOL_MF_MOVE); with MPOL_MF_MOVE the misplaced pages migrate."""
        _check(run_sync(mempolicy.do_mbind(self.kernel, mm, addr, length, mode, nodes, flags)))

    def set_mempolicy(self, mm: MMStruct, mode: int, nodes=()) -> None:
        """set_mempolicy(2) for the mm's task: the policy of VMAs without their own."""
        _check(mempolicy.do_set_mempolicy(self.kernel, mm, mode, nodes))

    def get_mempolicy(self, mm: MMStruct, addr: int = 0, flags: int = 0) -> tuple[int, frozenset]:
        """get_mempolicy(2): (mode, nodes); MPOL_F_ADDR: the VMA's; MPOL_F_NODE |
        MPOL_F_ADDR: (node of the page at addr, empty)."""
        ret = run_sync(mempolicy.do_get_mempolicy(self.kernel, mm, addr, flags))
        if isinstance(ret, int):
            _check(ret)
        return ret

    def page_to_nid(self, paddr: int) -> int:
        """The NUMA node a guest physical address lies in."""
        return mempolicy.page_to_nid(self.kernel, paddr)

    def numa_scan(self, mm: MMStruct) -> int:
        """One NUMA-balancing scan of ``mm`` (task_numa_work() -> change_prot_numa()):
        present ptes become PAGE_NONE, and the next access takes a NUMA hinting fault
        (do_numa_page()), which on this one-node machine restores the protection.
        Returns the ptes changed (none for a single-threaded private mapping, whose pages
        are all on its node; set ``mm.users`` for a multi-threaded process)."""
        return run_sync(mempolicy.task_numa_work(self.kernel, mm))

    def perf_page_size(self, addr: int, mm: MMStruct | None = None) -> int:
        """The page size perf would record for a sample at ``addr`` taken in a task
        running ``mm`` (None: a kernel thread, init_mm's tables): kernel/events/core.c
        perf_get_page_size(). 0 where nothing is mapped."""
        return run_sync(events_core.perf_get_page_size(self.kernel, mm, addr))

    def exit_mm(self, mm: MMStruct) -> None:
        """exit_mm() (mmput, exit_mmap, check_mm): raises CheckMMError on any leak and
        ValueError for an mm that has already exited."""
        run_sync(memory.exit_mm(self.kernel, mm))

    def get_user_pages(self, mm: MMStruct, addr: int, nr: int, write: bool = False, *,
                       pin: bool = False, fast: bool = False, split_pmd: bool = False) -> list[int]:
        """get_user_pages_unlocked() (``fast``: get_user_pages_fast(); ``pin``: the
        pin_user_pages variants, FOLL_PIN): take a reference on (or pin) ``nr`` pages
        from ``addr``, faulting them in as a kernel access would (``write`` breaks COW);
        returns their physical addresses (fewer than ``nr`` if GUP stopped early).
        Release them with put_page() or, if pinned, unpin_user_pages(). ``split_pmd``
        (FOLL_SPLIT_PMD, as uprobes asks) splits a PMD-mapped THP and takes the page
        through its new PTE; GUP-fast refuses it (-EINVAL). Raises OSError when no page
        could be taken."""
        k = self.kernel
        pages: list[int] = []
        flags = (gup.FOLL_WRITE if write else 0) | (gup.FOLL_SPLIT_PMD if split_pmd else 0)
        if fast and split_pmd:
            raise OSError(22, "GUP-fast takes no FOLL_SPLIT_PMD")
        if fast:
            fn = gup.pin_user_pages_fast if pin else gup.get_user_pages_fast
            ret = run_sync(fn(k, mm, addr, nr, flags, pages))
        else:
            fn = gup.pin_user_pages_unlocked if pin else gup.get_user_pages_unlocked
            ret = run_sync(fn(k, mm, addr, nr, pages, flags))
        _check(ret)
        return pages

    def hmm_range_fault(self, mm: MMStruct, start: int, end: int, fault: bool = False,
                        write: bool = False) -> list[int]:
        """hmm_range_fault() as a mirroring driver calls it (mm/hmm.c, lib/test_hmm.c):
        an mmu_interval_notifier on [start, end), ``seq = mmu_interval_read_begin()``,
        the walk under mmap_read_lock, again on -EBUSY or when mmu_interval_read_retry()
        says the seq moved. One word per page: ``pfn | HMM_PFN_VALID [| HMM_PFN_WRITE]``
        (mm_core.hmm), 0 for nothing mapped, HMM_PFN_ERROR for an unreadable VMA or no
        VMA. ``fault`` (HMM_PFN_REQ_FAULT) faults missing pages in first, ``write``
        (HMM_PFN_REQ_WRITE) breaks COW / write-faults read-only ones. Raises OSError
        (EFAULT, EPERM) as the kernel returns it."""
        ret = run_sync(hmm.hmm_range_fault_once(self.kernel, mm, start, end, fault, write))
        if isinstance(ret, int):
            _check(ret)
        return ret

    def migrate_vma(self, mm: MMStruct, start: int, end: int) -> list[int]:
        """Device migration of [start, end) (one VMA) with other RAM as the "device"
        (mm/migrate_device.c via lib/test_hmm.c's driver pattern): migrate_vma_setup(),
        allocate + copy, migrate_vma_pages(), migrate_vma_finalize(). Returns the src array
        (``MIGRATE_PFN_MIGRATE`` set: the page moved, or a hole was populated)."""
        ret = run_sync(migrate_device.dmirror_migrate(self.kernel, mm, start, end))
        if isinstance(ret, int):
            _check(ret)
        return ret

    def put_page(self, paddr: int) -> None:
        """put_page() of a page get_user_pages() returned."""
        gup.put_user_page(self.kernel, paddr)

    def unpin_user_pages(self, paddrs: list[int]) -> None:
        """unpin_user_pages(): release pages get_user_pages(..., pin=True) returned."""
        gup.unpin_user_pages(self.kernel, paddrs)

    def touch(self, mm: MMStruct, va: int, write: bool = False) -> int:
        """Access ``va`` as the guest would (hardware walk, then the fault handler);
        returns the physical address. Raises GuestAccessError where the guest would die."""
        access = Access.W if write else Access.R
        for _ in range(4):
            t = self.walk(mm, va, access)
            if type(t) is Translation:
                return t.paddr
            result = run_sync(memory.do_user_addr_fault(self.kernel, mm, va, access))
            if result is not memory.FaultResult.OK:
                raise GuestAccessError(f"{'write' if write else 'read'} of {va:#x}: {result.value}")
        raise GuestAccessError(f"access to {va:#x} keeps faulting")

    def translate(self, mm: MMStruct, va: int, access: str = "r") -> int | None:
        """Software walk through the plugin, without side effects: the physical address,
        or None where the hardware would fault."""
        try:
            acc = ACCESS_BY_LETTER[access]
        except KeyError:
            raise ValueError(f"access must be 'r', 'w' or 'x', not {access!r}") from None
        t = run_walk(self.arch.walk(self.root_register(mm), va, acc), self.ram.read_entry,
                     lambda paddr, old, new: True)
        return t.paddr if type(t) is Translation else None

    def walk(self, mm: MMStruct, va: int, access: Access):
        """The hardware walk with its side effects (A/D updates): Translation or Fault."""
        return run_walk(self.arch.walk(self.root_register(mm), va, access), self.ram.read_entry,
                        self.ram.cmpxchg_entry)

    def pgtable_root(self, mm: MMStruct) -> int:
        return mm.pgd

    def root_register(self, mm: MMStruct) -> int:
        if mm.dead:
            raise ValueError(f"mm {mm.id} has exited: its page tables are gone")
        return self.arch.root_register(mm.pgd, mm.asid)

    def read_user(self, mm: MMStruct, va: int, n: int) -> bytes:
        """Read user memory without faulting anything in (b'' where unmapped)."""
        out = bytearray()
        while n > 0:
            pa = self.translate(mm, va, "r")
            if pa is None:
                break
            chunk = min(n, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            out += self.ram.read(pa, chunk)
            va, n = va + chunk, n - chunk
        return bytes(out)

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, path: str, argv: list[str] | None = None, env: list[str] | None = None,
              on_output: Any = None) -> Process:
        """execve(): load a static ELF into a new mm and make its first thread runnable."""
        image = read_elf(path)
        owner = plugins.arch_for_elf(image.e_machine, image.big_endian)
        if owner != self.arch.name:
            what = f"an {owner} executable" if owner else f"an executable for {image.e_machine}"
            raise LoadError(f"{path}: {what}, but this machine is {self.arch.name}"
                            + (f" (use --arch {owner})" if owner else ""))
        vcpu = self._vcpu_for_new_thread()
        mm = self.new_mm()
        pid = self._next_tid()
        argv = [path] if argv is None else list(argv)
        proc = Process(pid, path, argv, mm, on_output=on_output)
        thread = Thread(pid, proc, vcpu)
        self._unbind(vcpu)
        run_sync(self._exec(mm, image, argv, env if env is not None else ["PATH=/bin", "HOME=/"], vcpu))
        vcpu.loaded = thread
        proc.threads.append(thread)
        thread.task = self.scheduler.spawn(guest_thread(self, thread), f"{os.path.basename(path)}:{pid}")
        self._thread_of_task[thread.task] = thread
        self.processes.append(proc)
        self._start_kthreads()
        return proc

    def _start_kthreads(self) -> None:
        """The kernel's daemons: rcu_gp (grace periods); they end with the run."""
        if not self._kthreads:
            self._kthreads = True
            self.scheduler.spawn(rcu.rcu_gp_kthread(self.kernel), "rcu_gp", daemon=True)
            self.scheduler.spawn(khugepaged.khugepaged(self.kernel), "khugepaged", daemon=True)

    def rcu_barrier(self) -> None:
        """rcu_barrier() from outside a run: every queued RCU callback runs now."""
        self.kernel.rcu.barrier_now()

    async def _exec(self, mm: MMStruct, image, argv: list[str], env: list[str], vcpu: VCPU) -> None:
        """load_elf_binary(): map the segments, the stack and the sentinel page."""
        may = VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
        for seg in image.segments:
            flags = ((VM_READ if seg.flags & PF_R else 0) | (VM_WRITE if seg.flags & PF_W else 0)
                     | (VM_EXEC if seg.flags & PF_X else 0))
            start = seg.vaddr & ~(self.kernel.page_size - 1)
            end = mm_mmap.page_align(seg.vaddr + seg.memsz, self.kernel.page_size)
            if end > self.mmap_base:
                raise LoadError(f"{image.path}: segment at {seg.vaddr:#x} is above the mmap area")
            for vma in mm_mmap.split_range(mm, start, end):   # segments sharing a page
                vma.flags |= flags
            pos = start
            for vma in sorted(mm.overlapping(start, end), key=lambda v: v.start):
                if vma.start > pos:
                    mm.insert_vma(VMA(mm, pos, vma.start, flags | may))
                pos = vma.end
            if pos < end:
                mm.insert_vma(VMA(mm, pos, end, flags | may))
        for seg in image.segments:
            if seg.data:
                await copy_to_user(self, mm, seg.vaddr, seg.data, force=True)
        mm.start_brk = mm.brk = mm_mmap.page_align(image.end, self.kernel.page_size)
        mm.insert_vma(VMA(mm, self.stack_top - STACK_SIZE, self.stack_top,
                          VM_READ | VM_WRITE | VM_GROWSDOWN | may, "[stack]"))
        mm.insert_vma(VMA(mm, self.sentinel_va, self.sentinel_va + self.kernel.page_size,
                          VM_READ | VM_EXEC | VM_MAYREAD | VM_MAYEXEC, "[emu-sentinel]"))
        await copy_to_user(self, mm, self.sentinel_va, self.arch.sentinel_code(), force=True)
        random_bytes = bytes((i * 37 + 11) & 0xFF for i in range(16))   # AT_RANDOM, deterministic
        sp, blob = build_stack(image, argv, env, self.stack_top, self.arch.uname_machine or self.arch.name,
                               random_bytes, self.arch.big_endian)
        await copy_to_user(self, mm, sp, blob)
        mm.start_stack = sp
        vcpu.sentinel = self.sentinel_va + 0x100
        vcpu.switch_mm(mm)
        vcpu.flush_code_cache()
        vcpu.pc = image.entry
        self.arch.start_registers(vcpu.uc, image.entry, sp)

    def _free_vcpu(self) -> VCPU:
        """A vCPU for kernel-side tests: the first idle one, or a new one."""
        return self._vcpu_for_new_thread()

    def _vcpu_for_new_thread(self) -> VCPU:
        """A new vCPU while fewer than ``cpus`` exist, else the one with the fewest live
        threads: threads beyond the vCPU count share them (context switched)."""
        if len(self.vcpus) < self.ncpus:
            v = VCPU(len(self.vcpus), self.arch, self.ram, stepped_walks=self.stepped_walks,
                     counting=self.count_instructions)
            v.loaded = None
            self.vcpus.append(v)
            return v
        load = {v: 0 for v in self.vcpus}
        for p in self.processes:
            for t in p.threads:
                if not t.exited:
                    load[t.vcpu] += 1
        return min(self.vcpus, key=lambda v: (load[v], v.index))

    def _next_tid(self) -> int:
        self._tids += 1
        return self._tids

    def _unbind(self, vcpu: VCPU) -> None:
        """Save the registers of the thread holding ``vcpu``."""
        held = vcpu.loaded
        if held is not None and not held.exited:
            held.ctx = vcpu.uc.context_save()
        vcpu.loaded = None

    def bind(self, thread: Thread) -> VCPU:
        """Give ``thread`` its vCPU's registers (a context switch if another thread of
        the same or another process was running there)."""
        vcpu = thread.vcpu
        if vcpu.loaded is thread:
            return vcpu
        self._unbind(vcpu)
        if thread.ctx is not None:
            vcpu.uc.context_restore(thread.ctx)
            thread.ctx = None
        if vcpu.mm is not thread.process.mm:
            vcpu.switch_mm(thread.process.mm)
        vcpu.loaded = thread
        self.kernel.stats["context_switches"] += 1
        return vcpu

    def clone_thread(self, parent: Thread, newsp: int, tls: int | None) -> Thread:
        """The vCPU side of clone(CLONE_VM|CLONE_THREAD): a new thread with a copy of the
        parent's registers, returning 0 from the syscall on its own stack."""
        return self._copy_thread(parent, parent.process, self._next_tid(), newsp, tls)

    def _copy_thread(self, parent: Thread, proc: Process, tid: int, newsp: int,
                     tls: int | None = None) -> Thread:
        """copy_thread(): thread ``tid`` of ``proc`` on a vCPU, with the parent's registers
        (optionally another stack and TLS), returning 0 from the syscall; runnable."""
        vcpu = self._vcpu_for_new_thread()
        self.bind(parent)
        regs = parent.vcpu.uc.context_save()
        child = Thread(tid, proc, vcpu)
        self._unbind(vcpu)
        vcpu.uc.context_restore(regs)
        vcpu.sentinel = parent.vcpu.sentinel
        if vcpu.mm is not proc.mm:
            vcpu.switch_mm(proc.mm)
        vcpu.loaded = child
        if newsp:
            vcpu.uc.reg_write(self.arch.sp_reg, newsp)
        if tls is not None:
            self.arch.set_tls(vcpu.uc, tls)
        self.arch.set_syscall_result(vcpu.uc, 0)
        proc.threads.append(child)
        name = f"{os.path.basename(proc.path)}:{child.tid}"
        child.task = self.scheduler.spawn(guest_thread(self, child), name)
        self._thread_of_task[child.task] = child
        return child

    async def fork_process(self, parent: Thread, newsp: int = 0) -> Process | int:
        """The process side of fork(): a new mm from dup_mmap(), a process sharing the
        parent's open files and output, and its first thread: the parent's registers on a
        vCPU, returning 0 from the syscall. -ENOMEM (the half-built mm torn down) on failure."""
        from mm_core.locks import WaitQueue
        k, proc = self.kernel, parent.process
        child_mm = self.new_mm()
        ret = await fork.dup_mmap(k, child_mm, proc.mm)
        if ret < 0:
            await memory.exit_mmap(k, child_mm)
            return ret
        pid = self._next_tid()
        child = Process(pid, proc.path, list(proc.argv), child_mm, parent=proc)
        child.stdout, child.stderr, child.on_output = proc.stdout, proc.stderr, proc.on_output
        for fd, f in proc.files.items():                 # dup_fd(): the same open files
            child.files[fd] = f
            if hasattr(f, "refs"):
                f.refs += 1
        if proc.child_exit is None:
            proc.child_exit = WaitQueue(f"wait_chldexit@{proc.pid}")
        proc.children.append(child)
        self.processes.append(child)
        self._copy_thread(parent, child, pid, newsp)
        return child

    def _run_user(self, thread: Thread, quantum: int) -> UserStop:
        return self.bind(thread).run(quantum)

    def _shootdown(self, mm: MMStruct, start: int, end: int) -> TlbShootdown | None:
        """flush_tlb_range(): an IPI to every vCPU running ``mm``. The flusher's own vCPU
        flushes before it next runs guest code; the others acknowledge at their next
        scheduling point, and the flusher waits for that (mm_core/tlbflush.py)."""
        k = self.kernel
        k.stats["tlb_shootdowns"] += 1
        me = self._thread_of_task.get(k.current_task())
        remote = []
        for v in self.vcpus:
            if v.mm is mm:
                v.request_flush(start, end)
                if me is None or v is not me.vcpu:
                    remote.append(v)
        k.stats["tlb_ipis"] += len(remote)
        return TlbShootdown(self, remote) if remote else None

    def _ipi_acked(self, vcpu: VCPU) -> bool:
        """Has ``vcpu`` run the flushes queued for it? An idle vCPU (no runnable thread
        on it, or no run going on) takes the IPI at once."""
        if vcpu.pending_flush is None:
            return True
        busy = not in_sync() and any(
            t.vcpu is vcpu and not t.exited and t.task is not None and t.task.state is TaskState.RUNNABLE
            for p in self.processes for t in p.threads)
        if busy:
            return False
        vcpu.apply_flushes()
        return True

    def _ipi_point(self, task: Any, event: tuple) -> None:
        """A step of a thread on a vCPU is that vCPU's scheduling point: it runs the queued
        flushes (acknowledging the IPIs), unless it is in the middle of a hardware walk —
        interrupts are taken between instructions, after the walk has filled the TLB."""
        thread = self._thread_of_task.get(task)
        if thread is not None and thread.vcpu.pending_flush and not thread.vcpu.in_walk:
            thread.vcpu.apply_flushes()

    # -- running --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run every spawned process to its end."""
        t0 = time.perf_counter()
        try:
            self.scheduler.run()
            self.kernel.rcu.barrier_now()       # the run is over: no reader is left
            self.audit_page_tables()
        finally:
            self.wall_seconds += time.perf_counter() - t0
        if not self.processes:
            raise RuntimeError("nothing to run: spawn a program first")
        p = self.processes[0]
        return RunResult(bytes(p.stdout), bytes(p.stderr), p.exit_code, p.signal, self.summary())

    def audit_page_tables(self) -> None:
        """After every process exited and rcu_barrier: no page-table page may be left."""
        live = {id(p.mm) for p in self.processes if not p.mm.dead}
        left = [pt for pt in self.kernel.ptdescs.values() if id(pt.mm) not in live]
        left += [pt for pt in self.kernel.deferred_tables() if id(pt.mm) not in live]
        if left:
            raise memory.CheckMMError(f"BUG: {len(left)} page table(s) of exited processes still "
                                      f"allocated after rcu_barrier: {left[:4]}")

    def summary(self) -> dict[str, Any]:
        k, alloc = self.kernel, self.kernel.alloc
        insns = sum(v.instructions for v in self.vcpus)
        hw_faults: Counter[str] = Counter()
        for v in self.vcpus:
            hw_faults.update(v.faults_by_kind)
        unknown: Counter[str] = Counter()
        for p in self.processes:
            unknown.update(p.unknown_syscalls)
        secs = self.wall_seconds
        return {
            "arch": self.arch.name,
            "kernel": k.profile.name,
            "instructions": insns if self.count_instructions else None,
            "tlb_fills": sum(v.fills for v in self.vcpus),
            "tlb_hits": sum(v.tlb_hits for v in self.vcpus),
            "walks": sum(v.walks for v in self.vcpus),
            "walk_reads": sum(v.walk_reads for v in self.vcpus),
            "faults": k.stats["faults"],
            "faults_by_kind": {
                **{f"hw:{name}": n for name, n in sorted(hw_faults.items())},
                "anon": k.stats["anon_pages_faulted"],
                "zero_page": k.stats["zero_page_mapped"],
                "cow_copy": k.stats["wp_copy"],
                "cow_reuse": k.stats["wp_reuse"],
            },
            "pages_allocated": sum(alloc.allocated.values()),
            "pages_freed": sum(alloc.freed.values()),
            "pt_pages_allocated": k.stats["pt_pages_allocated"],
            "pt_pages_freed": k.stats["pt_pages_freed"],
            "pt_tables_allocated": k.stats["pt_tables_allocated"],
            "pt_tables_freed": k.stats["pt_tables_freed"],
            "pt_tables_rcu_deferred": k.stats["pt_tables_deferred"],
            "pt_pages_rcu_freed": k.stats["pt_pages_rcu_freed"],
            "rcu_grace_periods": k.stats["rcu_grace_periods"],
            "tlb_shootdowns": k.stats["tlb_shootdowns"],
            "unknown_syscalls": dict(unknown),
            "seconds": round(secs, 4),
            "mips": round(insns / secs / 1e6, 2) if secs > 0 and self.count_instructions else None,
        }


class TlbShootdown:
    """One round of shootdown IPIs, as the flusher waits on it: it passes once every
    target vCPU has acknowledged."""

    sleeps = False          # csd_lock_wait() spins: allowed under spinlocks and in RCU sections

    def __init__(self, machine: Machine, vcpus: list[VCPU]) -> None:
        self.machine = machine
        self.pending = vcpus

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        self.pending = [v for v in self.pending if not self.machine._ipi_acked(v)]
        return not self.pending

    def __repr__(self) -> str:
        return f"<tlb shootdown waiting for vCPU {', '.join(str(v.index) for v in self.pending)}>"


def _check(ret: int) -> int:
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret
