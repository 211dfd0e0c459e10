"""NUMA memory policy (mm/mempolicy.c, v6.6) and NUMA hinting (kernel/sched/fair.c
task_numa_work()).

    task_numa_work()    under mmap_read_lock, every VMA that NUMA balancing may migrate:
                        change_prot_numa() over it
    change_prot_numa()  change_protection(MM_CP_PROT_NUMA): present ptes become PAGE_NONE
                        (the arch's PROT_NONE encoding: present to Linux, inaccessible to
                        the MMU), so that the next access takes a NUMA hinting fault,
                        do_numa_page() (mm_core/memory.py)
    do_mbind()          mbind(2): under mmap_write_lock, queue_pages_range() (a
                        walk_page_range() with queue_folios_pte_range as pmd_entry) checks
                        the mapped folios' nodes and isolates the misplaced ones
                        (MPOL_MF_MOVE), mbind_range() splits the VMAs and sets vm_policy,
                        then migrate_pages() moves the queued folios to the new policy's
                        nodes
    vma_alloc_folio()   the fault paths' allocation under the VMA's (else the task's) policy

NUMA nodes: ``Machine(numa_nodes=N)`` splits guest RAM into N equal pfn ranges (node i is
frames [i * size, (i + 1) * size)); node 0 is the CPUs' local node, and node distances grow
with the node number, so "nearest first" is "lowest nid first". page_to_nid() is the range
a frame lies in. User pages (vma_alloc_folio()) under the default policy come from node 0,
falling back upward; kernel allocations (page tables, page cache) keep taking the lowest
free block of the smallest order on any node. A one-node machine behaves as before.

NUMA hinting faults (do_numa_page(), do_huge_pmd_numa_page()) migrate a folio away from
node 0 (the CPUs' node) under the default policy (mpol_misplaced()). Not modelled: the
scan window and period (numa_scan_offset, scan size, the rate limits: one
call scans the whole mm), vma_is_accessed()'s per-VMA access history, NUMA groups and
the cpupid filter beyond one task, memory tiering; for
mbind: shared (shmem) policies (a file VMA gets a vm_policy but shmem allocation ignores
it), MPOL_F_STATIC_NODES / RELATIVE_NODES, MPOL_MF_MOVE_ALL (-EPERM: the caller has no
CAP_SYS_NICE), cpusets, hugetlb, migration of file / shmem folios (the model migrates
exclusive anon folios; a misplaced file folio is an isolation failure: counted unmovable;
a THP where the arch has no pmd migration entries, s390x, is not split: it stays),
the LRU isolation itself (``extra["isolated"]`` marks a queued folio).
"""
from __future__ import annotations

from dataclasses import dataclass

from emu.arch import PAGE_SHIFT, SWP_MIGRATION_READ_EXCLUSIVE, SWP_MIGRATION_WRITE, Access, Kind, swap_entry
from emu.sched import traps
from mm_core import huge_memory, memory, mprotect, pagewalk, pgtable, rmap, shmem
from mm_core.locks import mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import VM_READ, VM_WRITE, VMA
from mm_core.page_alloc import MAX_ORDER, OutOfMemory, PageUse
from mm_core.tlbflush import flush_tlb_range

VM_IO, VM_PFNMAP = 0x4000, 0x400


async def change_prot_numa(k, vma: VMA, start: int, end: int) -> int:
    """change_prot_numa(): change_protection(MM_CP_PROT_NUMA): make the present ptes of
    [start, end) PAGE_NONE (RETRY on a failed map, as change_pmd_range() does for
    mprotect); returns how many changed. The TLB is flushed only if some did."""
    updated = 0
    async for pmdp, lo, hi in memory.for_each_pmd(k, vma.mm, start, end):
        ret = await mprotect.change_pmd_range(k, vma, pmdp, lo, hi, mprotect.MM_CP_PROT_NUMA)
        updated += max(ret, 0)
    if updated:
        await flush_tlb_range(k, vma.mm, start, end)       # tlb_finish_mmu()
    return updated


def vma_migratable(vma: VMA) -> bool:
    return not vma.flags & (VM_IO | VM_PFNMAP)


async def task_numa_work(k, mm) -> int:
    """task_numa_work() reduced to one full scan: every migratable, accessible VMA but
    read-only file mappings (shared libraries, expected to be cache-replicated) gets
    change_prot_numa(). Returns the ptes changed."""
    total = 0
    await mmap_read_lock(mm)
    try:
        for vma in list(mm.vmas):
            if not vma_migratable(vma) or not memory.vma_is_accessible(vma):
                continue
            if vma.file is not None and vma.flags & (VM_READ | VM_WRITE) == VM_READ:
                continue
            total += await change_prot_numa(k, vma, vma.start, vma.end)
    finally:
        await mmap_read_unlock(mm)
    k.stats["numa_scans"] += 1
    return total


# -- nodes ------------------------------------------------------------------------------------

def set_numa_nodes(k, n: int) -> None:
    """The machine's node count: RAM split into ``n`` equal pfn ranges, each a whole number
    of MAX_ORDER blocks (so no buddy block straddles two nodes)."""
    size = k.physmem.nr_pages // n if n >= 1 else 0
    if n < 1 or n > MAX_NUMNODES or n > 1 and (size % (1 << MAX_ORDER) or size * n != k.physmem.nr_pages):
        raise ValueError(f"numa_nodes={n}: RAM of {k.physmem.nr_pages} pages does not split into "
                         f"{n} nodes of whole {1 << MAX_ORDER}-page blocks")
    k.numa_nodes = n


def node_pfn_range(k, nid: int) -> tuple[int, int]:
    """pgdat->node_start_pfn .. node_end_pfn."""
    size = k.physmem.nr_pages // k.numa_nodes
    return nid * size, (nid + 1) * size


def page_to_nid(k, paddr: int) -> int:
    """page_to_nid() / folio_nid(): the node a physical address lies in."""
    return min((paddr >> PAGE_SHIFT) // (k.physmem.nr_pages // k.numa_nodes), k.numa_nodes - 1)


# -- policies ---------------------------------------------------------------------------------

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL, MPOL_PREFERRED_MANY = range(6)
POLICY_MODES = ("default", "prefer", "bind", "interleave", "local", "prefer (many)")
MAX_NUMNODES = 64

MPOL_MF_STRICT = 1 << 0          # verify existing pages in the mapping
MPOL_MF_MOVE = 1 << 1            # move pages owned by this process to conform
MPOL_MF_MOVE_ALL = 1 << 2        # move every page to conform (CAP_SYS_NICE)
MPOL_MF_LAZY = 1 << 3
MPOL_MF_INTERNAL = 1 << 4
MPOL_MF_DISCONTIG_OK = MPOL_MF_INTERNAL << 0
MPOL_MF_INVERT = MPOL_MF_INTERNAL << 1
MPOL_MF_VALID = MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL

MPOL_F_NODE, MPOL_F_ADDR = 1 << 0, 1 << 1       # get_mempolicy() flags

EINVAL, EFAULT, EIO, EPERM, ENOMEM, EAGAIN, EBUSY = 22, 14, 5, 1, 12, 11, 16
NR_MAX_MIGRATE_PAGES_RETRY = 10


@dataclass(frozen=True)
class Mempolicy:
    """struct mempolicy: mode and nodes (mpol_equal() is ==)."""

    mode: int
    nodes: frozenset = frozenset()

    def __str__(self) -> str:
        """mpol_to_str(): "bind:0-1", "prefer:1", "local", "interleave:0,2"."""
        text = POLICY_MODES[self.mode]
        if self.mode in (MPOL_DEFAULT, MPOL_LOCAL):
            return text
        return f"{text}:{nodelist_str(self.nodes)}"


def nodelist_str(nodes) -> str:
    """The %*pbl bitmap list format: ranges joined with commas."""
    out, run = [], []
    for n in sorted(nodes):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def mpol_new(k, mode: int, nodes) -> Mempolicy | None | int:
    """mpol_new() + mpol_set_nodemask(): None for MPOL_DEFAULT, a policy, or -errno.
    The nodes are intersected with the nodes that have memory (N_MEMORY)."""
    nodes = frozenset(nodes or ())
    if mode < 0 or mode >= len(POLICY_MODES):
        return -EINVAL
    if mode == MPOL_DEFAULT:
        return -EINVAL if nodes else None
    if nodes and max(nodes) >= MAX_NUMNODES:
        return -EINVAL
    if not nodes:
        if mode == MPOL_PREFERRED:
            return Mempolicy(MPOL_LOCAL)
        if mode == MPOL_LOCAL:
            return Mempolicy(MPOL_LOCAL)
        return -EINVAL
    if mode == MPOL_LOCAL:
        return -EINVAL
    online = nodes & frozenset(range(k.numa_nodes))
    if not online:
        return -EINVAL
    if mode == MPOL_PREFERRED:
        online = frozenset([min(online)])                 # mpol_new_preferred(): the first node
    return Mempolicy(mode, online)


def get_vma_policy(vma: VMA) -> Mempolicy | None:
    """get_vma_policy(): the VMA's policy, else the task's (None: default_policy)."""
    return vma.policy if vma.policy is not None else vma.mm.mempolicy


def policy_node_order(k, pol: Mempolicy | None, ilx: int) -> list[int] | None:
    """The nodes vma_alloc_folio() tries, in order (the default and local policies: node
    0, then the others by distance). BIND stays inside its nodes; PREFERRED / PREFERRED_MANY / INTERLEAVE fall
    back to the others, nearest (lowest nid) first."""
    if pol is None or pol.mode in (MPOL_DEFAULT, MPOL_LOCAL):
        return list(range(k.numa_nodes))                  # local node 0, then the zonelist
    allowed = sorted(pol.nodes)
    others = [n for n in range(k.numa_nodes) if n not in pol.nodes]
    if pol.mode == MPOL_BIND:
        return allowed
    if pol.mode == MPOL_INTERLEAVE:                       # offset_il_node()
        first = allowed[ilx % len(allowed)]
        return [first] + [n for n in range(k.numa_nodes) if n != first]
    return allowed + others


def vma_alloc_folio(k, vma: VMA, addr: int, order: int, owner: object = None, zero: bool = True,
                    use: PageUse = PageUse.ANON):
    """vma_alloc_folio(): allocate under the VMA's policy (interleave index from the
    VMA's pgoff, interleave_nid()). Raises OutOfMemory when no allowed node has room."""
    if k.numa_nodes == 1:
        return k.alloc.alloc_pages(order, use, owner=owner, zero=zero)
    shift = k.page_shift + order - k.page_order
    ilx = (vma.pgoff >> (shift - k.page_shift)) + ((addr - vma.start) >> shift)
    order_nodes = policy_node_order(k, get_vma_policy(vma), ilx)
    for nid in order_nodes:
        try:
            return k.alloc.alloc_pages(order, use, owner=owner, zero=zero, pfn_range=node_pfn_range(k, nid))
        except OutOfMemory:
            continue
    raise OutOfMemory(f"no room for an order-{order} block on nodes {order_nodes}")


# -- queue_pages_range(): the mbind walk ------------------------------------------------------

@dataclass
class QueuePages:
    """struct queue_pages (6.6: with has_unmovable)."""

    pagelist: list
    flags: int
    nmask: frozenset
    start: int
    end: int
    first: VMA | None = None
    has_unmovable: bool = False


def queue_folio_required(k, folio, qp: QueuePages) -> bool:
    """queue_folio_required(): the folio's node is in the mask (or, MPOL_MF_INVERT, not)."""
    return (page_to_nid(k, folio.paddr) in qp.nmask) == (not qp.flags & MPOL_MF_INVERT)


def migrate_folio_add(k, folio, vma: VMA, addr: int, huge: bool, qp: QueuePages) -> int:
    """migrate_folio_add(): a folio mapped once (folio_estimated_sharers() == 1) is
    isolated onto the pagelist; a shared one is silently left; an isolation failure
    (here: a folio already isolated, or not an exclusive anon folio: the model migrates
    those only, not KSM pages and not PTE-mapped large folios, which Linux would split)
    is -EIO under MPOL_MF_STRICT, else ignored."""
    if folio.mapcount != 1:
        return 0
    if (folio.use is PageUse.ANON and not folio.extra.get("isolated") and folio.mapping is None
            and not folio.extra.get("ksm") and not (folio.order > k.page_order and not huge)):
        folio.extra["isolated"] = True                    # folio_isolate_lru()
        qp.pagelist.append((folio, addr, huge))
        return 0
    k.stats["mbind_isolate_failed"] += 1
    return -EIO if qp.flags & MPOL_MF_STRICT else 0


async def queue_folios_pmd(k, pmdval, pml, addr: int, walk: pagewalk.MmWalk) -> int:
    """queue_folios_pmd() (called with the pmd lock, drops it): a migration pmd is -EIO
    (the walk ends: no retry); the huge zero page ACTION_CONTINUE; a misplaced THP is
    queued whole (MPOL_MF_MOVE) or is -EIO (STRICT alone); an unqueueable one returns 1."""
    qp: QueuePages = walk.private
    ret = 0
    try:
        if pmdval.kind is not Kind.LEAF:                  # is_pmd_migration_entry()
            k.stats["mbind_pmd_migration"] += 1
            return -EIO
        folio = k.alloc.page_of(pmdval.paddr)
        if pmdval.special or folio is None or folio.use is PageUse.ZERO:
            walk.action = pagewalk.ACTION_CONTINUE
            return 0
        if not queue_folio_required(k, folio, qp):
            return 0
        if qp.flags & (MPOL_MF_MOVE | MPOL_MF_MOVE_ALL):
            if not vma_migratable(walk.vma) or migrate_folio_add(k, folio, walk.vma, addr, True, qp):
                ret = 1
        else:
            ret = -EIO
        return ret
    finally:
        await traps.unlock(pml)


async def queue_folios_pte_range(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """queue_folios_pte_range() (v6.6): pmd_trans_huge_lock() first (a huge or migration
    pmd goes to queue_folios_pmd); a failed pte_offset_map_lock() is ACTION_AGAIN (RETRY).
    Each present pte's normal folio on a node the policy excludes is queued (MOVE) or
    stops the scan (STRICT alone: -EIO); a folio that cannot be queued makes
    has_unmovable (STRICT: mbind's -EIO after migrating the rest)."""
    k, arch, vma = walk.k, walk.k.arch, walk.vma
    qp: QueuePages = walk.private
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if pmdval.kind in (Kind.LEAF, Kind.MIGRATION, Kind.SWAP):
        pml, cur = await huge_memory.pmd_trans_huge_lock(k, vma.mm, pmdp)
        if pml is not None:
            return await queue_folios_pmd(k, cur, pml, addr, walk)
    locked = await pgtable.pte_offset_map_lock(k, vma.mm, pmdp, addr)
    if locked is None and "queue_folios_pte_range_ignores_map_failure" in k.bugs:
        await pgtable.walk_stale_pte_table(k, pmdval, addr, end)   # bug injection: walks on
        return 0
    if locked is None:
        k.stats["queue_pages_again"] += 1
        walk.action = pagewalk.ACTION_AGAIN                # RETRY
        return 0
    ptep, ptl = locked
    a = addr
    while a != end:
        ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep + 8 * ((a - addr) >> k.page_shift)))
        folio = None
        if ptent.kind is Kind.LEAF and not ptent.special:     # pte_present() + vm_normal_folio()
            folio = k.alloc.page_of(ptent.paddr)
        if folio is None or not queue_folio_required(k, folio, qp):
            a += k.page_size
            continue
        if qp.flags & (MPOL_MF_MOVE | MPOL_MF_MOVE_ALL):
            if not vma_migratable(vma):
                qp.has_unmovable = True
                break
            if migrate_folio_add(k, folio, vma, a, folio.order > k.page_order, qp):
                qp.has_unmovable = True
        else:
            break                                          # STRICT alone: a misplaced page
        a += k.page_size
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    if qp.has_unmovable:
        return 0
    return -EIO if a != end else 0


async def queue_pages_test_walk(start: int, end: int, walk: pagewalk.MmWalk) -> int:
    """queue_pages_test_walk(): -EFAULT on a hole (unless MPOL_MF_DISCONTIG_OK); walk the
    VMA only when moving or strict checking."""
    qp: QueuePages = walk.private
    vma = walk.vma
    if qp.first is None:
        qp.first = vma
        if not qp.flags & MPOL_MF_DISCONTIG_OK and qp.start < vma.start:
            return -EFAULT                                 # hole at head side of range
    nxt = vma.mm.find_vma(vma.end)
    if not qp.flags & MPOL_MF_DISCONTIG_OK and vma.end < qp.end and (nxt is None or vma.end < nxt.start):
        return -EFAULT                                     # hole at middle or tail of range
    if not vma_migratable(vma) and not qp.flags & MPOL_MF_STRICT:
        return 1
    if qp.flags & (MPOL_MF_MOVE | MPOL_MF_MOVE_ALL | MPOL_MF_STRICT):
        return 0
    return 1


QUEUE_PAGES_WALK_OPS = pagewalk.MmWalkOps(pmd_entry=queue_folios_pte_range, test_walk=queue_pages_test_walk)


async def queue_pages_range(k, mm, start: int, end: int, nodes, flags: int, pagelist: list) -> int:
    """queue_pages_range(): 0, 1 (some misplaced folio could not be queued), -EIO (STRICT
    alone found a misplaced page) or -EFAULT (a hole)."""
    qp = QueuePages(pagelist, flags, frozenset(nodes), start, end)
    err = await pagewalk.walk_page_range(k, mm, start, end, QUEUE_PAGES_WALK_OPS, qp)
    if qp.first is None:
        err = -EFAULT                                      # whole range in hole
    if not err and qp.has_unmovable:
        err = 1
    return err


# -- migration --------------------------------------------------------------------------------

async def try_to_migrate_one(k, folio, vma: VMA, addr: int):
    """try_to_migrate_one() at the folio's one mapping (page_vma_mapped_walk with
    pte_offset_map_lock: a failed map means not mapped there, and the folio stays
    mapped: migration fails with -EAGAIN). Under the ptl: ptep_clear_flush() (the TLB
    flush waits for the other vCPUs), then a migration entry (writable, or read-exclusive:
    the folio is exclusive) keeping soft-dirty and uffd-wp; the mapping and its
    reference go. Returns the old pte, or None."""
    mm, arch = vma.mm, k.arch
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return None
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        k.stats["migrate_map_failed"] += 1
        return None
    ptep, ptl = locked
    try:
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if pte.kind is not Kind.LEAF or pte.paddr != folio.paddr:
            return None
        old = arch.decode(arch.pte_level, await pgtable.clear_entry(k, ptep, arch.pte_level))
        await flush_tlb_range(k, mm, addr, addr + k.page_size)
        swp_type = SWP_MIGRATION_WRITE if old.prot & Access.W else SWP_MIGRATION_READ_EXCLUSIVE
        swp = swap_entry(swp_type, folio.pfn, soft_dirty=old.soft_dirty, uffd_wp=old.uffd_wp)
        await pgtable.set_entry(k, ptep, arch.pte_level, swp)
        folio.mapcount -= 1                                # page_remove_rmap()
        folio.refcount -= 1                                # folio_put()
        return old
    finally:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)


async def remove_migration_pte(k, folio, vma: VMA, addr: int, old, entry) -> bool:
    """remove_migration_pte(): the migration entry for the old folio's frame (``old`` the
    pte it replaced) becomes ``entry``, a pte of ``folio`` (remap_entry()); True if it was
    there."""
    mm, arch = vma.mm, k.arch
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return False
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        return False
    ptep, ptl = locked
    try:
        pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if pte.kind is not Kind.MIGRATION or pte.swp_offset != old.paddr >> PAGE_SHIFT:
            return False
        await pgtable.set_entry(k, ptep, arch.pte_level, entry)
        folio.mapcount += 1
        folio.refcount += 1
        return True
    finally:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)


def folio_migrate_flags(new, old) -> None:
    """folio_migrate_mapping() + folio_migrate_flags(): index, anon_vma, dirty, mlock
    state, LRU generation... all move to the new folio."""
    new.index = old.index
    new.extra = {key: v for key, v in old.extra.items() if key != "isolated"}


def thp_migration_supported(k) -> bool:
    """thp_migration_supported() (CONFIG_ARCH_ENABLE_THP_MIGRATION): the arch can encode a
    migration entry in a pmd. Where it cannot (s390x), Linux splits the THP and migrates
    the pieces; the model does not split: the THP stays where it is (migration failed)."""
    try:
        k.arch.encode(k.arch.pmd_level, swap_entry(SWP_MIGRATION_WRITE, 1))
    except ValueError:
        return False
    return True


def remap_entry(k, vma: VMA, old, paddr: int):
    """remove_migration_pte() / remove_migration_pmd(): mk_pte(new, vma->vm_page_prot),
    write if the migration entry was writable, soft-dirty / uffd-wp / young / dirty kept
    (arches where migration_entry_supports_ad()). A PAGE_NONE (NUMA hinting) entry comes
    back accessible."""
    prot = memory.vm_get_page_prot(vma.flags) | (old.prot & Access.W)
    if old.uffd_wp:
        prot &= ~Access.W
    return old.with_(paddr=paddr, prot=prot)


async def migrate_folio(k, folio, vma: VMA, addr: int, huge: bool, target_nid: int | None = None,
                        sync: bool = True) -> int:
    """migrate_pages_batch() for one folio: lock it (MIGRATE_SYNC: folio_lock, sleeping,
    before any table is mapped; MIGRATE_ASYNC: folio_trylock, -EAGAIN if taken), unmap it
    into migration entries, check no other reference is left (a GUP pin or the swap cache:
    -EAGAIN, the mapping is restored), allocate the new folio (mbind's new_folio():
    vma_alloc_folio() under the new policy; ``target_nid`` set: alloc_misplaced_dst_folio(),
    that node only, __GFP_THISNODE), copy, map the new folio in, free the old one.
    0 or -errno."""
    mm = vma.mm
    if huge and not thp_migration_supported(k):
        k.stats["migrate_thp_unsupported"] += 1
        return -EBUSY
    if sync:
        await shmem.folio_lock(k, folio)
    elif not await shmem.folio_trylock(k, folio):
        return -EAGAIN
    try:
        pmdp = None
        if huge:
            pmdp = await rmap.walk_to_pmd(k, mm, addr)
            leaf = await huge_memory.set_pmd_migration_entry(k, vma, pmdp) if pmdp is not None else None
            if leaf is None or leaf.paddr != folio.paddr:
                if leaf is not None:
                    await huge_memory.remove_migration_pmd(k, vma, pmdp, leaf)
                return -EAGAIN
            folio.mapcount -= 1
            folio.refcount -= 1
            old = leaf
        else:
            old = await try_to_migrate_one(k, folio, vma, addr)
            if old is None:
                return -EAGAIN
        new = None
        if folio.refcount:                                 # folio_migrate_mapping(): extra refs
            rc = -EAGAIN
        else:
            try:
                if target_nid is None:
                    new = vma_alloc_folio(k, vma, addr, folio.order, owner=folio.owner, zero=False)
                else:
                    new = k.alloc.alloc_pages(folio.order, PageUse.ANON, owner=folio.owner, zero=False,
                                              pfn_range=node_pfn_range(k, target_nid))
                rc = 0
            except OutOfMemory:
                rc = -ENOMEM
        if new is None:                                    # back to the old folio, as it was
            k.stats["migrate_failed_" + ("eagain" if rc == -EAGAIN else "enomem")] += 1
            new, entry = folio, old
        else:
            k.physmem.copy(new.paddr, folio.paddr, folio.nr_pages << PAGE_SHIFT)
            folio_migrate_flags(new, folio)
            new.refcount = 0
            entry = remap_entry(k, vma, old, new.paddr)
        if huge:
            await huge_memory.remove_migration_pmd(k, vma, pmdp, entry)
            new.mapcount += 1
            new.refcount += 1
        else:
            await remove_migration_pte(k, new, vma, addr, old, entry)
        if new is not folio:
            k.stats["numa_pages_migrated"] += new.nr_pages >> k.page_order
            folio.extra.pop("isolated", None)
            k.alloc.free_pages(folio)
            return 0
        return rc
    finally:
        if folio.locked:
            shmem.folio_unlock(folio)


async def migrate_pages(k, mm, pagelist: list) -> int:
    """migrate_pages(MIGRATE_SYNC, MR_MEMPOLICY_MBIND): every queued folio, retried up to
    NR_MAX_MIGRATE_PAGES_RETRY times while -EAGAIN; returns how many failed (they are put
    back: putback_movable_pages())."""
    nr_failed = 0
    for folio, addr, huge in pagelist:
        rc = -EAGAIN
        for _ in range(NR_MAX_MIGRATE_PAGES_RETRY):
            vma = mm.vma_lookup(addr)
            if vma is None:
                break
            rc = await migrate_folio(k, folio, vma, addr, huge)
            if rc != -EAGAIN:
                break
        if rc:
            nr_failed += 1
            folio.extra.pop("isolated", None)             # putback_movable_pages()
    return nr_failed


# -- mbind(2), set_mempolicy(2), get_mempolicy(2) ---------------------------------------------

def mbind_range(mm, start: int, end: int, new: Mempolicy | None) -> None:
    """mbind_range() over [start, end): split at the ends (vma_modify_policy()), set
    vm_policy (vma_replace_policy()), merge neighbours with equal policies."""
    from mm_core.mmap import split_range
    for vma in split_range(mm, start, end):
        vma.policy = new
    mm.merge_adjacent()


async def do_mbind(k, mm, start: int, length: int, mode: int, nodes=(), flags: int = 0) -> int:
    """do_mbind() (v6.6): 0 or -errno. Order as in Linux: the walk (under mmap_write_lock)
    first, so -EFAULT (hole) and -EIO (STRICT alone, misplaced) leave the policy as it was;
    then the VMAs get the policy; then the queued folios migrate, still under the lock.
    MPOL_MF_STRICT with anything left misplaced (unqueueable or failed) is -EIO."""
    if flags & ~MPOL_MF_VALID:
        return -EINVAL
    if flags & MPOL_MF_MOVE_ALL:
        return -EPERM                                      # !capable(CAP_SYS_NICE)
    if start & (k.page_size - 1):
        return -EINVAL
    if mode == MPOL_DEFAULT:
        flags &= ~MPOL_MF_STRICT
    length = (length + k.page_size - 1) & ~(k.page_size - 1)
    end = start + length
    if end < start:
        return -EINVAL
    if end == start:
        return 0
    new = mpol_new(k, mode, nodes)
    if isinstance(new, int):
        return new
    if new is None:
        flags |= MPOL_MF_DISCONTIG_OK
    nmask = frozenset(nodes or ())          # the caller's nodemask, as 6.6 passes it to the walk
    pagelist: list = []
    await mmap_write_lock(mm)
    try:
        ret = await queue_pages_range(k, mm, start, end, nmask, flags | MPOL_MF_INVERT, pagelist)
        if ret < 0:
            for folio, _, _ in pagelist:
                folio.extra.pop("isolated", None)         # putback_movable_pages()
            return ret
        mbind_range(mm, start, end, new)
        nr_failed = await migrate_pages(k, mm, pagelist) if pagelist else 0
        k.stats["mbind"] += 1
        if (ret > 0 or nr_failed) and flags & MPOL_MF_STRICT:
            return -EIO
        return 0
    finally:
        await mmap_write_unlock(mm)


def do_set_mempolicy(k, mm, mode: int, nodes=()) -> int:
    """do_set_mempolicy(): the task policy (here the mm's one task): 0 or -errno."""
    new = mpol_new(k, mode, nodes)
    if isinstance(new, int):
        return new
    mm.mempolicy = new
    return 0


async def do_get_mempolicy(k, mm, addr: int = 0, flags: int = 0) -> tuple[int, frozenset] | int:
    """do_get_mempolicy(): (mode, nodes) of the task, or with MPOL_F_ADDR of the VMA at
    ``addr`` (no fallback to the task's); with MPOL_F_NODE | MPOL_F_ADDR the node of the
    page mapped there (lookup_node(): faulted in like get_user_pages_fast would)."""
    if flags & ~(MPOL_F_NODE | MPOL_F_ADDR):
        return -EINVAL
    pol = mm.mempolicy
    if flags & MPOL_F_ADDR:
        await mmap_read_lock(mm)
        try:
            vma = mm.vma_lookup(addr)
            if vma is None:
                return -EFAULT
            pol = vma.policy
        finally:
            await mmap_read_unlock(mm)
    elif addr:
        return -EINVAL
    if flags & MPOL_F_NODE:
        if not flags & MPOL_F_ADDR:
            return -EINVAL
        from mm_core import gup
        pages: list[int] = []
        ret = await gup.get_user_pages_fast(k, mm, addr & ~(k.page_size - 1), 1, 0, pages)
        if ret <= 0 or not pages:
            return ret if ret < 0 else -EFAULT
        nid = page_to_nid(k, pages[0])
        gup.put_user_page(k, pages[0])
        return nid, frozenset()
    if pol is None:
        return MPOL_DEFAULT, frozenset()
    return pol.mode, pol.nodes


# -- NUMA hinting faults: mpol_misplaced(), migrate_misplaced_folio() ------------------------

NUMA_NO_NODE = -1


def mpol_misplaced(k, folio, vma: VMA, addr: int) -> int:
    """mpol_misplaced() (6.6): the node a NUMA hinting fault should move the folio to, or
    NUMA_NO_NODE. Only a policy with MPOL_F_MOF says so: here the default (no VMA and no
    task policy), whose preferred_node_policy[] carries MPOL_F_MOF | MPOL_F_MORON, so the
    folio moves towards the faulting CPU's node, node 0 (should_numa_migrate_memory() lets
    a single task's first and later faults through). Policies set by mbind() /
    set_mempolicy() lack MPOL_F_MOF (MPOL_F_NUMA_BALANCING is not modelled): no move."""
    if k.numa_nodes == 1 or get_vma_policy(vma) is not None:
        return NUMA_NO_NODE
    thisnid = 0
    return thisnid if page_to_nid(k, folio.paddr) != thisnid else NUMA_NO_NODE


async def migrate_misplaced_folio(k, folio, vma: VMA, addr: int, huge: bool, node: int) -> bool:
    """migrate_misplaced_folio() (MIGRATE_ASYNC, MR_NUMA_MISPLACED): isolate unless it is
    shared (the model moves a folio mapped once only; Linux refuses shared executable file
    folios and lets rmap find the other mappings), then migrate_pages() to ``node`` (no
    fallback node), retried while -EAGAIN. True when it moved."""
    if folio.mapcount != 1 or folio.use is not PageUse.ANON or folio.mapping is not None:
        k.stats["numa_migrate_refused"] += 1
        return False
    rc = -EAGAIN
    for _ in range(NR_MAX_MIGRATE_PAGES_RETRY):
        rc = await migrate_folio(k, folio, vma, addr & ~((folio.nr_pages << PAGE_SHIFT) - 1), huge,
                                 target_nid=node, sync=False)
        if rc != -EAGAIN:
            break
    k.stats["numa_migrate_" + ("ok" if rc == 0 else "failed")] += 1
    return rc == 0
