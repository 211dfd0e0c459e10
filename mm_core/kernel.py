"""Machine-wide kernel state shared by mm_core: the arch, guest RAM, the page allocator,
the zero page, page-table descriptors and event counters."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from emu.arch import PAGE_SHIFT, ArchSpec
from emu.physmem import PhysMem
from mm_core.config import Profile, get_profile
from mm_core.page_alloc import PageAllocator, PageUse
from mm_core.rcu import Rcu
from mm_core.sanitizers import Sanitizers


class Kernel:
    def __init__(self, arch: ArchSpec, physmem: PhysMem, profile: str | Profile = "6.6") -> None:
        self.arch = arch
        self.physmem = physmem
        self.profile = profile if isinstance(profile, Profile) else get_profile(profile)
        self.alloc = PageAllocator(physmem)
        # the base page: 4K everywhere but ppc64's 64K geometry; the allocator hands out
        # 4K frames, so a base page is an order-page_order block
        self.page_shift = arch.page_shift
        self.page_size = 1 << arch.page_shift
        self.page_order = arch.page_shift - PAGE_SHIFT
        self.zero_page = self.alloc.alloc_pages(self.page_order, PageUse.ZERO)    # ZERO_PAGE(0)
        self.ptdescs: dict[int, object] = {}     # table paddr -> PageTable (ptdesc), live tables
        self.deferred: list = []                 # tables waiting for a grace period
        self.deposits: dict[int, list] = {}      # pmd entry paddr -> deposited PTE tables
        self.rcu = Rcu()
        self.swap_info = None                    # mm_core.swapfile.SwapInfo after swapon()
        self.mmlist: list = []                   # init_mm.mmlist: mms with swap entries (swapoff)
        self.shmem_swaplist: list = []           # shmem_swaplist: inodes with swapped-out pages
        self.thp_enabled = "madvise"             # /sys/kernel/mm/transparent_hugepage/enabled
        self.bugs: dict[str, object] = {}        # named bug injections (explorer self-tests)
        self.san = Sanitizers(self)
        self.alloc.on_free = self.san.page_freed
        self.vcpus: Callable[[], list] = lambda: []          # set by the machine
        # set by the machine: who is running, and the step number (for reports)
        self.current_task: Callable[[], object] = lambda: None
        self.current_step: Callable[[], int] = lambda: 0
        self.tasks: Callable[[], list] = lambda: []          # set by the machine: every task
        from mm_core.khugepaged import Khugepaged
        self.khugepaged = Khugepaged()
        self.lrugen = None                       # MGLRU's lruvec (mm_core.vmscan.get_lruvec)
        self.numa_nodes = 1                      # RAM split in equal node ranges (mempolicy.set_numa_nodes)
        self.init_mm = None                      # kernel page tables (mm_core.vmalloc.get_init_mm)
        self.stats: Counter[str] = Counter()
        self.log: list[str] = []                 # kernel messages (pmd_ERROR, ...)
        # set by the machine: TLB shootdown of [start, end) for every vCPU using mm
        # the IPI side of a shootdown (the machine's): returns what the flusher waits on,
        # or None when no other CPU needs one (see mm_core/tlbflush.py)
        self.flush_tlb_range: Callable[[object, int, int], object | None] = lambda mm, start, end: None
        self._next_asid = 1

    def next_id(self, kind: str) -> int:
        """Per-kernel counters (mm ids, inode numbers): the same world gets the same ids."""
        self.stats[f"next_id:{kind}"] += 1
        return self.stats[f"next_id:{kind}"]

    def new_asid(self) -> int:
        asid, self._next_asid = self._next_asid, self._next_asid + 1
        return asid

    def printk(self, msg: str) -> None:
        self.log.append(msg)

    def deferred_tables(self) -> list:
        """Tables detached and queued for freeing after a grace period."""
        self.deferred = [pt for pt in self.deferred if pt.state == "deferred"]
        return self.deferred
