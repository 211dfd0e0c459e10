"""mm_struct and vm_area_struct (include/linux/mm_types.h), with the VMA-tree operations
mmap/munmap/mprotect need (find_vma, split, merge)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mm_core.locks import RwSemaphore, SpinLock

# vm_flags (include/linux/mm.h)
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_MAYREAD = 0x10
VM_MAYWRITE = 0x20
VM_MAYEXEC = 0x40
VM_MAYSHARE = 0x80
VM_GROWSDOWN = 0x100
VM_UFFD_MISSING = 0x200         # userfaultfd: missing-page faults go to the uffd
VM_UFFD_WP = 0x1000             # userfaultfd: write-protect faults go to the uffd
VM_LOCKED = 0x2000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_UFFD_MINOR = 1 << 38         # VM_UFFD_MINOR_BIT (CONFIG_HAVE_ARCH_USERFAULTFD_MINOR)
VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_UFFD_FLAGS = VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR   # __VM_UFFD_FLAGS

# rss counters (enum of mm_counter)
MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES = range(4)
RSS_NAMES = ("MM_FILEPAGES", "MM_ANONPAGES", "MM_SWAPENTS", "MM_SHMEMPAGES")



@dataclass(eq=False)
class VMA:
    """vm_area_struct: [start, end) with vm_flags; anonymous unless ``file`` is set."""

    mm: MMStruct
    start: int
    end: int
    flags: int
    name: str = ""              # "[heap]", "[stack]", ... as /proc/PID/maps shows
    file: object = None
    pgoff: int = 0
    anon_vma: object = None     # rmap.AnonVma once it has private anon pages (anon_vma_prepare)
    uffd_ctx: object = None     # vm_userfaultfd_ctx.ctx: the userfaultfd it is registered with
    policy: object = None       # vm_policy: mempolicy.Mempolicy set by mbind(), None: the task's

    @property
    def anonymous(self) -> bool:
        return self.file is None

    # userfaultfd_wp() / userfaultfd_missing() / userfaultfd_minor() (userfaultfd_k.h): the
    # VM_UFFD_* flags, set by UFFDIO_REGISTER under mmap_write_lock and read locklessly by
    # retract_page_tables()
    @property
    def uffd_wp(self) -> bool:
        return bool(self.flags & VM_UFFD_WP)

    @property
    def uffd_missing(self) -> bool:
        return bool(self.flags & VM_UFFD_MISSING)

    @property
    def uffd_minor(self) -> bool:
        return bool(self.flags & VM_UFFD_MINOR)

    def __repr__(self) -> str:
        return f"<vma {self.start:#x}-{self.end:#x} {vma_flags_str(self.flags)} {self.name}>"


def vma_flags_str(flags: int) -> str:
    return "".join((c if flags & bit else "-") for c, bit in
                   (("r", VM_READ), ("w", VM_WRITE), ("x", VM_EXEC))) + ("s" if flags & VM_SHARED else "p")


@dataclass(eq=False)
class MMStruct:
    """struct mm_struct: the VMA set, the page-table root, locks and counters."""

    kernel: object
    pgd: int                                # physical address of the top-level table
    asid: int = 0
    id: int = 0                             # per kernel, so runs (and their digests) repeat
    vmas: list[VMA] = field(default_factory=list)     # sorted by start, non-overlapping
    rss: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    pgtables_bytes: int = 0
    locked_vm: int = 0                      # pages under VM_LOCKED (mlock)
    def_flags: int = 0                      # VM_LOCKED (| VM_LOCKONFAULT) after mlockall(MCL_FUTURE)
    mempolicy: object = None                # current->mempolicy of the mm's one task (set_mempolicy)
    hiwater_rss: int = 0                    # VmHWM: set by clear_refs 5 (update_hiwater_rss not modelled)
    start_brk: int = 0
    brk: int = 0
    mmap_base: int = 0
    start_stack: int = 0
    users: int = 1                          # mm_users
    frag_pool: list = field(default_factory=list)     # s390: pages with a free 2K half
    pte_frag: dict = field(default_factory=dict)      # powerpc: fragment size -> cursor page
    dead: bool = False
    notifier_subscriptions: object = None   # mmu_notifier.MmuNotifierSubscriptions, on first insert

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.kernel.next_id("mm")
        self.mmap_lock = RwSemaphore(f"mm{self.id}.mmap_lock", "mmap_lock")
        self.page_table_lock = SpinLock(f"mm{self.id}.page_table_lock", "page_table_lock")

    # -- VMA tree ----------------------------------------------------------------------------
    def find_vma(self, addr: int) -> VMA | None:
        """find_vma(): the first VMA with end > addr (it may start above addr)."""
        i = bisect.bisect_right([v.end for v in self.vmas], addr)
        return self.vmas[i] if i < len(self.vmas) else None

    def vma_lookup(self, addr: int) -> VMA | None:
        vma = self.find_vma(addr)
        return vma if vma is not None and vma.start <= addr else None

    def overlapping(self, start: int, end: int) -> list[VMA]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def insert_vma(self, vma: VMA) -> None:
        if self.overlapping(vma.start, vma.end):
            raise RuntimeError(f"inserting {vma} over an existing mapping")
        bisect.insort(self.vmas, vma, key=lambda v: v.start)

    def remove_vma(self, vma: VMA) -> None:
        self.vmas.remove(vma)

    def split_vma(self, vma: VMA, addr: int) -> VMA:
        """__split_vma(): cut ``vma`` at ``addr``; returns the upper part."""
        assert vma.start < addr < vma.end and addr % self.kernel.page_size == 0
        upper = VMA(self, addr, vma.end, vma.flags, vma.name, vma.file,
                    vma.pgoff + ((addr - vma.start) >> self.kernel.page_shift), vma.anon_vma, vma.uffd_ctx,
                    vma.policy)
        vma.end = addr
        bisect.insort(self.vmas, upper, key=lambda v: v.start)
        if vma.file is not None:                  # the new half is a mapping of the file too
            vma.file.mapping.i_mmap.append(upper)
            vma.file.refs += 1
        return upper

    def merge_adjacent(self) -> None:
        """vma_merge(), applied to the whole list: join compatible neighbours."""
        merged: list[VMA] = []
        for v in self.vmas:
            p = merged[-1] if merged else None
            if (p is not None and p.end == v.start and p.flags == v.flags and p.name == v.name
                    and p.file is None and v.file is None and p.uffd_ctx is v.uffd_ctx
                    and p.policy == v.policy):            # mpol_equal()
                p.end = v.end
            else:
                merged.append(v)
        self.vmas = merged

    def get_mm_counter(self, member: int) -> int:
        return self.rss[member]

    def total_vm(self) -> int:
        return sum(v.end - v.start for v in self.vmas) >> self.kernel.page_shift
