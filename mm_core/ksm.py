"""Kernel samepage merging (mm/ksm.c, 6.6): its page-table walkers and ksmd's scan.

    break_ksm()            unshare the KSM page at one address: walk_page_range_vma() over
                           [addr, addr + 1) with break_ksm_pmd_entry(), then a
                           FAULT_FLAG_UNSHARE fault, until the walk finds no KSM page
    break_ksm_pmd_entry()  pte_offset_map_lock(); a failed map returns 0: "no KSM page
                           here" (SKIP; a huge or migration pmd never maps a KSM page, and a
                           table freed under a racing MADV_DONTNEED has nothing to break)
    write_protect_page()   make the pte mapping a page read-only and clean, so that its
                           content can no longer change (the first half of a merge)
    replace_page()         point a pte at the KSM page instead of an identical page:
                           pte_offset_map_lock() failing or the pte changed: -EFAULT
                           (GIVEUP: the merge fails)
    ksm_madvise()          MADV_MERGEABLE / MADV_UNMERGEABLE (VM_MERGEABLE, __ksm_enter();
                           unmerging breaks every KSM page of the range)
    ksm_do_scan()          one ksmd batch: scan_get_next_rmap_item() page by page over the
                           mm_slots (follow_page(FOLL_GET): NULL, e.g. a failed
                           pte_offset_map_lock(), skips the page: SKIP), cmp_and_merge_page()
                           against the stable tree, then (checksum unchanged since the last
                           round) the unstable tree; try_to_merge_two_pages() and break_cow()
                           on a half merge

What a KSM page is here: an anon folio with ``extra["ksm"]`` set (folio_test_ksm(): its
mapping points to a stable node; True for the NULL stable node try_to_merge_one_page()
sets before stable_tree_insert()), write-protected everywhere it is mapped and owned by
no mm (the stable tree keeps it).

The trees, reduced: the rb-trees ordered by memcmp_pages() become dicts keyed by page
content (the bytes). The stable tree maps content to a list of stable nodes (the list
stands in for a stable_node chain's dups; max_page_sharing is not enforced); a node keeps
the KSM folio and its pfn and is pruned when get_ksm_page() finds it stale (the folio
freed or no longer KSM). The unstable tree maps the content a page had when its rmap_item
was inserted to that rmap_item; a lookup by the scanned page's content that finds an item
whose page now differs (the rb-tree "corrupted" under it) does not insert the new item
(the kernel would descend past that node and insert below it): the page waits for the
next round. calc_checksum() is zlib.crc32 instead of xxhash. Not modelled: KSM-placed zero
pages (use_zero_pages), NUMA trees (merge_across_nodes), smart scan (6.7),
split_huge_page() of a THP (try_to_merge_one_page() fails on one: -EFAULT), ksm_exit()
(ksmd finds the exited mm with ksm_test_exit() and frees its rmap_items and slot itself,
which is the kernel's path for a slot that has rmap_items), lru_add_drain_all(),
ksm_test_exit() and signal_pending() in unmerge_ksm_pages(), swap, the sysfs knobs other
than run / pages_to_scan.
"""
from __future__ import annotations

import zlib

from emu.arch import Access, Kind, leaf_entry
from emu.sched import traps
from mm_core import gup, memory, pagewalk, pgtable, rmap, shmem
from mm_core.locks import WaitQueue, mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from mm_core.mm import VM_SHARED, VMA
from mm_core.mmap import split_range
from mm_core.page_alloc import PageUse
from mm_core.tlbflush import flush_tlb_range

MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
VM_MERGEABLE = 0x80000000
VM_MAYSHARE, VM_PFNMAP, VM_IO, VM_DONTEXPAND, VM_MIXEDMAP = 0x80, 0x400, 0x4000, 0x40000, 0x10000000
EFAULT, EINVAL, ENOMEM, EAGAIN = 14, 22, 12, 11


def folio_test_ksm(folio) -> bool:
    return folio is not None and bool(folio.extra.get("ksm"))


def set_page_stable_node(k, folio, stable_node: StableNode | None = None) -> None:
    """set_page_stable_node(): the folio becomes a KSM page (the stable tree owns it);
    ``stable_node`` None is try_to_merge_one_page()'s NULL node (PageKsm already true),
    stable_tree_insert() names the real one."""
    if not folio_test_ksm(folio):
        k.stats["ksm_pages_shared"] += 1
    folio.extra["ksm"] = stable_node if stable_node is not None else True
    folio.owner = None


def page_stable_node(folio) -> StableNode | None:
    """page_stable_node(): the stable node of a KSM folio, None if not KSM (or NULL)."""
    node = folio.extra.get("ksm") if folio is not None else None
    return node if isinstance(node, StableNode) else None


# -- break_ksm ------------------------------------------------------------------------------------

async def break_ksm_pmd_entry(pmdp: int, addr: int, end: int, walk: pagewalk.MmWalk) -> int:
    """break_ksm_pmd_entry() (6.6): 1 if the pte at ``addr`` maps a KSM page (present, or a
    migration entry of one: KSM pages stay KSM pages until freed), else 0. A failed
    pte_offset_map_lock() returns 0 (SKIP: nothing to break)."""
    k, arch = walk.k, walk.k.arch
    stale = "break_ksm_pmd_entry_ignores_map_failure" in k.bugs
    pmdval = await pgtable.get_entry(k, pmdp, arch.pmd_level) if stale else None
    locked = await pgtable.pte_offset_map_lock(k, walk.mm, pmdp, addr)
    if locked is None and stale:
        # bug injection: reads the pte in the table its own pmd read named
        return int(await pgtable.walk_stale_pte_table(k, pmdval, addr, addr + k.page_size) > 0)
    if locked is None:
        k.stats["break_ksm_map_failed"] += 1
        return 0
    ptep, ptl = locked
    ptent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
    page = None
    if ptent.kind is Kind.LEAF:
        page = None if ptent.special else k.alloc.page_of(ptent.paddr)      # vm_normal_page()
    elif ptent.kind is Kind.MIGRATION:
        page = k.alloc.page_of(ptent.swp_offset << 12)                     # pfn_swap_entry_to_page()
    ret = int(folio_test_ksm(page))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return ret


BREAK_KSM_OPS = pagewalk.MmWalkOps(pmd_entry=break_ksm_pmd_entry)


async def break_ksm(k, vma: VMA, addr: int, lock_vma: bool = False) -> int:
    """break_ksm(): while the walk finds a KSM page at ``addr``, fault with
    FAULT_FLAG_UNSHARE (a private copy replaces it); stop when it finds none or the fault
    fails. 0 or -ENOMEM. The caller holds mmap_lock (``lock_vma``: for writing)."""
    ret = 0
    while True:
        ksm_page = await pagewalk.walk_page_range(k, vma.mm, addr, addr + 1, BREAK_KSM_OPS)
        if not ksm_page:
            return 0
        k.stats["break_ksm_unshare"] += 1
        ret = await memory.handle_mm_fault(k, vma, addr, memory.FAULT_FLAG_UNSHARE | memory.FAULT_FLAG_REMOTE)
        if ret & (memory.VM_FAULT_SIGBUS | memory.VM_FAULT_SIGSEGV | memory.VM_FAULT_OOM):
            break
    return -ENOMEM if ret & memory.VM_FAULT_OOM else 0


def find_mergeable_vma(mm, addr: int) -> VMA | None:
    """find_mergeable_vma(): a VM_MERGEABLE VMA with an anon_vma, unless the mm exits."""
    if mm.users == 0:                                   # ksm_test_exit()
        return None
    vma = mm.vma_lookup(addr)
    if vma is None or not vma.flags & VM_MERGEABLE or not vma.anon_vma:
        return None
    return vma


async def break_cow(k, mm, addr: int) -> int:
    """break_cow() (ksmd undoing half a merge): break_ksm() under mmap_read_lock."""
    await mmap_read_lock(mm)
    try:
        vma = find_mergeable_vma(mm, addr)
        return await break_ksm(k, vma, addr) if vma is not None else 0
    finally:
        await mmap_read_unlock(mm)


async def unmerge_ksm_pages(k, vma: VMA, start: int, end: int, lock_vma: bool) -> int:
    """unmerge_ksm_pages(): break_ksm() page by page."""
    err = 0
    for addr in range(start, end, k.page_size):
        if err:
            break
        err = await break_ksm(k, vma, addr, lock_vma)
    return err


# -- merging ---------------------------------------------------------------------------------------

def vma_ksm_compatible(vma: VMA) -> bool:
    """vma_ksm_compatible(): private, ordinary memory (anon, or a private file mapping)."""
    return not vma.flags & (VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_MIXEDMAP)


async def ksm_madvise(k, mm, start: int, end: int, advice: int) -> int:
    """madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) under mmap_write_lock: ksm_madvise() on
    each VMA of the range (split to it); unmerging breaks every KSM page first."""
    await mmap_write_lock(mm)
    try:
        for vma in split_range(mm, start, end):
            if advice == MADV_MERGEABLE:
                if vma.flags & VM_MERGEABLE or not vma_ksm_compatible(vma):
                    continue
                __ksm_enter(k, mm)                             # unless MMF_VM_MERGEABLE already
                vma.flags |= VM_MERGEABLE
            else:
                if not vma.flags & VM_MERGEABLE:
                    continue
                if vma.anon_vma:
                    err = await unmerge_ksm_pages(k, vma, vma.start, vma.end, True)
                    if err:
                        return err
                vma.flags &= ~VM_MERGEABLE
        mm.merge_adjacent()
        return 0
    finally:
        await mmap_write_unlock(mm)


async def _pte_at(k, mm, addr: int):
    """(pmd pointer, pte) at ``addr`` read under the ptl; (None, None) without a table."""
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return None, None
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        return pmdp, None
    ptep, ptl = locked
    ent = k.arch.decode(k.arch.pte_level, await pgtable.get_raw(k, ptep))
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return pmdp, ent


async def write_protect_page(k, vma: VMA, addr: int, page) -> int | None:
    """write_protect_page(): under the ptl, make the pte mapping ``page`` clean and
    read-only (ptep_clear_flush, then set it back), unless someone else holds an extra
    reference (GUP). Returns the new raw pte (orig_pte) or None (-EFAULT)."""
    arch, mm = k.arch, vma.mm
    pmdp = await rmap.walk_to_pmd(k, mm, addr)
    if pmdp is None:
        return None
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)      # page_vma_mapped_walk()
    if locked is None:
        return None
    ptep, ptl = locked
    try:
        ent = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
        if ent.kind is not Kind.LEAF or ent.paddr != page.paddr:
            return None
        if ent.prot & Access.W or ent.dirty:
            await pgtable.clear_entry(k, ptep, arch.pte_level)          # ptep_clear_flush()
            await flush_tlb_range(k, mm, addr, addr + k.page_size)
            if page.mapcount + 1 != page.refcount:                     # + our follow_page() ref
                await pgtable.set_entry(k, ptep, arch.pte_level, ent)
                return None
            if ent.dirty:
                page.extra["dirty"] = True                             # set_page_dirty()
            ent = ent.with_(prot=ent.prot & ~Access.W, dirty=False)
            await pgtable.set_entry(k, ptep, arch.pte_level, ent)
        return arch.encode(arch.pte_level, ent)
    finally:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)


async def replace_page(k, vma: VMA, addr: int, page, kpage, orig_pte: int) -> int:
    """replace_page(): map the KSM page ``kpage`` where ``page`` was, if the pte is still
    ``orig_pte``. pte_offset_map_lock() failing, or a changed pte: -EFAULT (GIVEUP)."""
    arch, mm = k.arch, vma.mm
    pmdp = await rmap.walk_to_pmd(k, mm, addr)                         # mm_find_pmd()
    if pmdp is None:
        return -EFAULT
    pmde = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
    if not pmde.present or pmde.kind is Kind.LEAF:
        return -EFAULT
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, addr)
    if locked is None:
        k.stats["replace_page_map_failed"] += 1
        return -EFAULT
    ptep, ptl = locked
    if await pgtable.get_raw(k, ptep) != orig_pte:
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        return -EFAULT
    memory.add_mapped_page(k, mm, kpage)                               # get_page + page_add_anon_rmap
    newpte = leaf_entry(kpage.paddr, memory.vm_get_page_prot(vma.flags) & ~Access.W, young=True)
    await pgtable.clear_entry(k, ptep, arch.pte_level)                 # ptep_clear_flush()
    await flush_tlb_range(k, mm, addr, addr + k.page_size)
    await pgtable.set_entry(k, ptep, arch.pte_level, newpte)           # set_pte_at_notify()
    memory._put_mapped_page(k, mm, page)                               # page_remove_rmap + folio_put
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return 0


async def try_to_merge_one_page(k, vma: VMA, addr: int, page, kpage) -> int:
    """try_to_merge_one_page(): lock the page, write-protect it; with no ``kpage`` it
    becomes the KSM page itself, else it is replaced by ``kpage`` if identical."""
    if page is kpage:
        return 0
    if page.use is not PageUse.ANON or page.order != k.page_order:     # PageTransCompound: not split here
        return -EFAULT
    if not await shmem.folio_trylock(k, page):
        return -EFAULT
    err = -EFAULT
    try:
        orig = await write_protect_page(k, vma, addr, page)
        if orig is not None:
            if kpage is None:
                if not folio_test_ksm(page):                           # (Machine.ksm_merge may pass one)
                    set_page_stable_node(k, page)
                page.extra["dirty"] = True
                err = 0
            elif k.physmem.read(page.paddr, k.page_size) == k.physmem.read(kpage.paddr, k.page_size):
                err = await replace_page(k, vma, addr, page, kpage, orig)
    finally:
        shmem.folio_unlock(page)
    return err


def is_zone_device_page(page) -> bool:
    """is_zone_device_page(): the model has no ZONE_DEVICE memory (no struct pages of
    device-private or coherent memory), so never."""
    return False


def PageAnon(page) -> bool:                                              # noqa: N802 (kernel name)
    return page is not None and page.use is PageUse.ANON


async def get_mergeable_page(k, mm, addr: int) -> int | None:
    """get_mergeable_page() (6.6): under mmap_read_lock, find_mergeable_vma() and
    follow_page(FOLL_GET); the physical address of the anon (sub)page mapped at ``addr``
    with its reference taken, or None -- no mergeable VMA (the mm exits, or it was
    unmapped / remapped), follow_page() NULL (no table, a failed map, no page: SKIP), a
    ZONE_DEVICE or non-anon page."""
    await mmap_read_lock(mm)
    try:
        vma = find_mergeable_vma(mm, addr)
        if vma is None:
            return None
        paddr = await gup.follow_page(k, vma, addr, gup.FOLL_GET)
        if paddr is None or paddr < 0:
            k.stats["ksm_follow_page_null"] += 1
            return None
        page = k.alloc.page_of(paddr)
        if is_zone_device_page(page) or not PageAnon(page):
            memory.put_page(k, page)
            return None
        return paddr
    finally:
        await mmap_read_unlock(mm)


async def ksm_merge_pages(k, mm, addr: int, tree_mm, tree_addr: int) -> int:
    """try_to_merge_two_pages(): what ksmd does once the unstable tree matched the page at
    ``addr`` with the one at ``tree_addr``: the first becomes the KSM page, the second is
    replaced by it; if that fails, break_cow() undoes the first. 0 or -EFAULT."""
    pages = []
    for m_, a in ((mm, addr), (tree_mm, tree_addr)):
        paddr = await get_mergeable_page(k, m_, a)
        if paddr is None:
            for p in pages:
                memory.put_page(k, p)
            return -EFAULT
        pages.append(k.alloc.page_of(paddr))
    page, tree_page = pages
    err = await try_to_merge_with_ksm_page(k, mm, addr, page, None)
    if not err:
        err = await try_to_merge_with_ksm_page(k, tree_mm, tree_addr, tree_page, page)
        if err:
            await break_cow(k, mm, addr)
    if not err:
        if page_stable_node(page) is None:
            stable_tree_insert(k, page)               # so that ksmd's scan finds it
        k.stats["ksm_pages_sharing"] += 1
    for p in pages:
        memory.put_page(k, p)
    return err


async def try_to_merge_with_ksm_page(k, mm, addr: int, page, kpage, rmap_item: RmapItem | None = None) -> int:
    """try_to_merge_with_ksm_page() (6.6): try_to_merge_one_page() under mmap_read_lock,
    if ``addr`` is still in a mergeable VMA (else -EFAULT: GIVEUP); on success the
    rmap_item leaves the unstable tree and keeps the VMA's anon_vma. 0 or -EFAULT."""
    await mmap_read_lock(mm)
    try:
        vma = find_mergeable_vma(mm, addr)
        if vma is None:
            return -EFAULT
        err = await try_to_merge_one_page(k, vma, addr, page, kpage)
        if err or rmap_item is None:
            return err
        remove_rmap_item_from_tree(k, rmap_item)       # the unstable nid is in a union with anon_vma
        rmap_item.anon_vma = vma.anon_vma              # get_anon_vma()
        return 0
    finally:
        await mmap_read_unlock(mm)


async def ksm_pages_at(k, mm, start: int, end: int) -> list[int]:
    """The addresses in [start, end) whose pte maps a KSM page (a test helper, like
    /proc/PID/pagemap's KPF_KSM)."""
    found = []
    for addr in range(start, end, k.page_size):
        _, ent = await _pte_at(k, mm, addr)
        if ent is not None and ent.kind is Kind.LEAF and folio_test_ksm(k.alloc.page_of(ent.paddr)):
            found.append(addr)
    return found


# -- ksmd's scan -----------------------------------------------------------------------------------

SEQNR_MASK, UNSTABLE_FLAG, STABLE_FLAG = 0x0FF, 0x100, 0x200
KSM_FLAG_MASK = SEQNR_MASK | UNSTABLE_FLAG | STABLE_FLAG
KSM_RUN_STOP, KSM_RUN_MERGE, KSM_RUN_UNMERGE = 0, 1, 2


class RmapItem:
    """struct ksm_rmap_item: one scanned address of one mm; ``address`` carries the
    UNSTABLE_FLAG / STABLE_FLAG and the unstable tree's seqnr in its low bits."""

    __slots__ = ("mm", "address", "oldchecksum", "head", "key", "anon_vma")

    def __init__(self, mm, address: int) -> None:
        self.mm = mm
        self.address = address
        self.oldchecksum = 0
        self.head: StableNode | None = None        # when STABLE_FLAG
        self.key: bytes | None = None              # its unstable tree key (reduced rb_node)
        self.anon_vma = None

    @property
    def addr(self) -> int:
        """rmap_item->address & PAGE_MASK."""
        return self.address & ~KSM_FLAG_MASK

    def __repr__(self) -> str:
        return f"RmapItem(mm {self.mm.id}, {self.address:#x})"


class StableNode:
    """struct ksm_stable_node: a KSM page in the stable tree (kpfn, the folio it named
    then) and the rmap_items of the addresses sharing it (hlist)."""

    __slots__ = ("kpfn", "folio", "hlist", "key")

    def __init__(self, folio, key: bytes) -> None:
        self.kpfn = folio.pfn
        self.folio = folio
        self.hlist: list[RmapItem] = []
        self.key = key


class KsmMmSlot:
    """struct ksm_mm_slot: an mm registered by MADV_MERGEABLE and its rmap_items,
    sorted by address (the singly-linked rmap_list)."""

    def __init__(self, mm) -> None:
        self.mm = mm
        self.rmap_list: list[RmapItem] = []


class Ksm:
    """ksmd's state: ksm_mm_head's list of mm slots, the ksm_scan cursor (mm_slot None
    is ksm_mm_head; rmap_pos is the index ksm_scan.rmap_list points at), the two trees
    (see the module docstring for the reduction) and the sysfs counters."""

    def __init__(self) -> None:
        self.mm_slots: list[KsmMmSlot] = []
        self.scan_slot: KsmMmSlot | None = None
        self.scan_address = 0
        self.rmap_pos = 0
        self.seqnr = 0
        self.stable_tree: dict[bytes, list[StableNode]] = {}
        self.unstable_tree: dict[bytes, RmapItem] = {}
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.rmap_items = 0
        self.run = KSM_RUN_STOP
        self.pages_to_scan = 100                   # ksm_thread_pages_to_scan
        self.sleep_cycles = 20                     # ksm_thread_sleep_millisecs
        self.wq = WaitQueue("ksm_thread_wait")

    def slot_of(self, mm) -> KsmMmSlot | None:
        """mm_slot_lookup(mm_slots_hash, mm)."""
        return next((s for s in self.mm_slots if s.mm is mm), None)


def ksm_state(k) -> Ksm:
    """The kernel's KSM state (created on first use)."""
    state = getattr(k, "ksm", None)
    if state is None:
        state = k.ksm = Ksm()
    return state


def ksm_test_exit(mm) -> bool:
    """ksm_test_exit(): mm_users is zero (the mm exits: back out)."""
    return mm.users == 0


def __ksm_enter(k, mm) -> None:
    """__ksm_enter() (6.6): a slot for ``mm`` (MMF_VM_MERGEABLE), inserted just behind
    the scan cursor (list_add_tail on ksm_scan.mm_slot), so that the mm is scanned last
    in the round in progress, or at once if ksmd is between rounds."""
    ksm = ksm_state(k)
    if ksm.slot_of(mm) is not None:
        return
    slot = KsmMmSlot(mm)
    if ksm.scan_slot is None:
        ksm.mm_slots.append(slot)
    else:
        ksm.mm_slots.insert(ksm.mm_slots.index(ksm.scan_slot), slot)
    ksm.wq.post()                                  # wake_up_interruptible(&ksm_thread_wait)


def page_bytes(k, paddr: int) -> bytes:
    """The content of the base page at ``paddr`` (what memcmp_pages() compares)."""
    paddr &= ~(k.page_size - 1)
    return bytes(k.physmem.read(paddr, k.page_size))


def calc_checksum(k, paddr: int) -> int:
    """calc_checksum(): xxhash of the page in 6.6, zlib.crc32 here."""
    return zlib.crc32(page_bytes(k, paddr))


def get_ksm_page(k, stable_node: StableNode):
    """get_ksm_page(GET_KSM_PAGE_NOLOCK): the node's KSM folio with a reference, or None
    when the node is stale (the folio freed, or no longer this node's): the node is
    then removed from the stable tree."""
    folio = stable_node.folio
    if k.alloc.page_of(folio.paddr) is not folio or folio.extra.get("ksm") is not stable_node \
            or folio.refcount <= 0:
        remove_node_from_stable_tree(k, stable_node)
        return None
    folio.refcount += 1                            # get_page_unless_zero()
    return folio


def remove_node_from_stable_tree(k, stable_node: StableNode) -> None:
    """remove_node_from_stable_tree(): its rmap_items lose STABLE_FLAG (they are
    rescanned as ordinary pages), the node leaves the tree."""
    ksm = ksm_state(k)
    for i, item in enumerate(stable_node.hlist):
        if i < len(stable_node.hlist) - 1:         # rmap_item->hlist.next
            ksm.pages_sharing -= 1
        else:
            ksm.pages_shared -= 1
        item.anon_vma = None                       # put_anon_vma()
        item.address &= ~KSM_FLAG_MASK
    stable_node.hlist.clear()
    nodes = ksm.stable_tree.get(stable_node.key, [])
    if stable_node in nodes:
        nodes.remove(stable_node)
        if not nodes:
            del ksm.stable_tree[stable_node.key]
    k.stats["ksm_stable_node_stale"] += 1


def remove_rmap_item_from_tree(k, rmap_item: RmapItem) -> None:
    """remove_rmap_item_from_tree() (6.6): a STABLE item leaves its node's hlist (if
    get_ksm_page() still finds the node's page); an UNSTABLE item inserted in this round
    (age 0) is erased from the unstable tree, one from the last round is not (the tree
    was reset: BUG_ON(age > 1))."""
    ksm = ksm_state(k)
    if rmap_item.address & STABLE_FLAG:
        stable_node = rmap_item.head
        assert stable_node is not None
        page = get_ksm_page(k, stable_node)
        if page is None:
            return
        stable_node.hlist.remove(rmap_item)
        memory.put_page(k, page)
        if stable_node.hlist:
            ksm.pages_sharing -= 1
        else:
            ksm.pages_shared -= 1
        rmap_item.anon_vma = None                  # put_anon_vma()
        rmap_item.head = None
        rmap_item.address &= ~KSM_FLAG_MASK
    elif rmap_item.address & UNSTABLE_FLAG:
        age = (ksm.seqnr - rmap_item.address) & 0xFF
        if age > 1:
            raise AssertionError(f"BUG_ON(age > 1): {rmap_item} age {age}")
        if not age and ksm.unstable_tree.get(rmap_item.key) is rmap_item:
            del ksm.unstable_tree[rmap_item.key]   # rb_erase()
        rmap_item.key = None
        ksm.pages_unshared -= 1
        rmap_item.address &= ~KSM_FLAG_MASK


def stable_tree_search(k, paddr: int):
    """stable_tree_search() (6.6), reduced to a dict lookup by content: the page itself
    if it is already a KSM page (a KSM fork), else the KSM folio of a live node whose
    content equals the page's (memcmp_pages() == 0), with a reference; else None. Stale
    nodes met on the way are pruned."""
    ksm = ksm_state(k)
    page = k.alloc.page_of(paddr)
    if page_stable_node(page) is not None:         # page_node->head != &migrate_nodes
        page.refcount += 1
        return page
    content = page_bytes(k, paddr)
    for node in list(ksm.stable_tree.get(content, [])):
        kpage = get_ksm_page(k, node)
        if kpage is None:
            continue
        if page_bytes(k, kpage.paddr) == page_bytes(k, paddr):    # memcmp_pages()
            return kpage
        memory.put_page(k, kpage)
    return None


def stable_tree_insert(k, kpage) -> StableNode:
    """stable_tree_insert(): a new stable node for ``kpage`` (an equal live node already
    there: the new one is a "dup" of the same content, here one more in the key's list)."""
    ksm = ksm_state(k)
    key = page_bytes(k, kpage.paddr)
    node = StableNode(kpage, key)
    ksm.stable_tree.setdefault(key, []).append(node)
    set_page_stable_node(k, kpage, node)
    return node


def stable_tree_append(k, rmap_item: RmapItem, stable_node: StableNode) -> None:
    """stable_tree_append(): ``rmap_item`` maps the node's KSM page."""
    ksm = ksm_state(k)
    rmap_item.head = stable_node
    rmap_item.address |= STABLE_FLAG
    stable_node.hlist.insert(0, rmap_item)         # hlist_add_head()
    if len(stable_node.hlist) > 1:
        ksm.pages_sharing += 1
    else:
        ksm.pages_shared += 1


async def unstable_tree_search_insert(k, rmap_item: RmapItem,
                                      paddr: int) -> tuple[RmapItem | None, int | None]:
    """unstable_tree_search_insert() (6.6), reduced (see the module docstring): the tree's
    item for the page's content; its page comes from get_mergeable_page() (mmap_read_lock,
    follow_page(): None -- unmapped, table gone -- ends the search with nothing inserted),
    the very same page (a forked page) is no match, and memcmp_pages() compares the two
    pages as they are now. Nothing found: ``rmap_item`` is inserted (UNSTABLE_FLAG and
    the round's seqnr). Returns (tree item, tree page's paddr with a reference) or
    (None, None)."""
    ksm = ksm_state(k)
    page = k.alloc.page_of(paddr)
    key = page_bytes(k, paddr)
    tree_item = ksm.unstable_tree.get(key)
    if tree_item is not None:
        tree_paddr = await get_mergeable_page(k, tree_item.mm, tree_item.addr)
        if tree_paddr is None:
            return None, None
        tree_page = k.alloc.page_of(tree_paddr)
        if tree_page is page:                      # don't substitute a ksm page for a forked page
            memory.put_page(k, tree_page)
            return None, None
        if page_bytes(k, paddr) != page_bytes(k, tree_paddr):     # memcmp_pages() != 0
            memory.put_page(k, tree_page)
            k.stats["ksm_unstable_tree_changed"] += 1
            return None, None
        return tree_item, tree_paddr
    rmap_item.address |= UNSTABLE_FLAG | (ksm.seqnr & SEQNR_MASK)
    rmap_item.key = key
    ksm.unstable_tree[key] = rmap_item
    ksm.pages_unshared += 1
    return None, None


async def try_to_merge_two_pages(k, rmap_item: RmapItem, page, tree_rmap_item: RmapItem, tree_page):
    """try_to_merge_two_pages(): ``page`` becomes the KSM page, then ``tree_page`` is
    replaced by it; if the second half fails (-EFAULT: the tree page's pte changed,
    an extra reference, the contents differ, its VMA went), break_cow() undoes the
    first. The KSM page or None."""
    err = await try_to_merge_with_ksm_page(k, rmap_item.mm, rmap_item.addr, page, None, rmap_item)
    if not err:
        err = await try_to_merge_with_ksm_page(k, tree_rmap_item.mm, tree_rmap_item.addr,
                                               tree_page, page, tree_rmap_item)
        if err:
            k.stats["ksm_half_merge_broken"] += 1
            rmap_item.anon_vma = None              # break_cow(): put_anon_vma()
            await break_cow(k, rmap_item.mm, rmap_item.addr)
    return None if err else page


async def cmp_and_merge_page(k, paddr: int, rmap_item: RmapItem) -> None:
    """cmp_and_merge_page() (6.6): first the stable tree (a match is merged into its KSM
    page with try_to_merge_with_ksm_page()); else, if the checksum is the one of the last
    round, the unstable tree: a match is merged with try_to_merge_two_pages() and the new
    KSM page goes into the stable tree with both rmap_items. A failure anywhere is
    GIVEUP for this page in this round (it is scanned again in the next)."""
    page = k.alloc.page_of(paddr)
    stable_node = page_stable_node(page)
    if stable_node is not None and rmap_item.head is stable_node and rmap_item.address & STABLE_FLAG:
        return
    kpage = stable_tree_search(k, paddr)
    if kpage is page and rmap_item.head is stable_node and rmap_item.address & STABLE_FLAG:
        memory.put_page(k, kpage)
        return
    remove_rmap_item_from_tree(k, rmap_item)
    if kpage is not None:
        err = await try_to_merge_with_ksm_page(k, rmap_item.mm, rmap_item.addr, page, kpage, rmap_item)
        if not err:
            node = page_stable_node(kpage)
            if node is not None:
                stable_tree_append(k, rmap_item, node)
            k.stats["ksm_merged_stable"] += 1
        memory.put_page(k, kpage)
        return
    checksum = calc_checksum(k, paddr)
    if rmap_item.oldchecksum != checksum:          # changing: not for the unstable tree yet
        rmap_item.oldchecksum = checksum
        k.stats["ksm_checksum_changed"] += 1
        return
    tree_rmap_item, tree_paddr = await unstable_tree_search_insert(k, rmap_item, paddr)
    if tree_rmap_item is None:
        return
    tree_page = k.alloc.page_of(tree_paddr)
    kpage = await try_to_merge_two_pages(k, rmap_item, page, tree_rmap_item, tree_page)
    memory.put_page(k, tree_page)
    if kpage is not None:
        node = stable_tree_insert(k, kpage)
        stable_tree_append(k, tree_rmap_item, node)
        stable_tree_append(k, rmap_item, node)
        k.stats["ksm_merged_unstable"] += 1


def get_next_rmap_item(k, slot: KsmMmSlot, addr: int) -> RmapItem:
    """get_next_rmap_item(): the slot's rmap_item for ``addr`` at the cursor; items for
    addresses passed over (no longer mapped with an anon page) are removed and freed."""
    ksm = ksm_state(k)
    lst = slot.rmap_list
    while ksm.rmap_pos < len(lst):
        item = lst[ksm.rmap_pos]
        if item.addr == addr:
            return item
        if item.address > addr:
            break
        del lst[ksm.rmap_pos]
        remove_rmap_item_from_tree(k, item)
        ksm.rmap_items -= 1                        # free_rmap_item()
    item = RmapItem(slot.mm, addr)                 # alloc_rmap_item()
    lst.insert(ksm.rmap_pos, item)
    ksm.rmap_items += 1
    return item


def remove_trailing_rmap_items(k, slot: KsmMmSlot, pos: int) -> None:
    """remove_trailing_rmap_items(): the items past the cursor (their VMAs are gone)."""
    ksm = ksm_state(k)
    while len(slot.rmap_list) > pos:
        item = slot.rmap_list.pop(pos)
        remove_rmap_item_from_tree(k, item)
        ksm.rmap_items -= 1


async def scan_get_next_rmap_item(k) -> tuple[RmapItem, int] | None:
    """scan_get_next_rmap_item() (6.6): from the ksm_scan cursor, the next anon page of a
    VM_MERGEABLE VMA (with an anon_vma) of the next mm slot, under mmap_read_lock with
    ksm_test_exit() checks. Each address is looked up with follow_page(FOLL_GET): NULL
    (no table, a failed pte_offset_map_lock(), a none pte) or an error skips the address
    (SKIP); a ZONE_DEVICE or non-anon page (the zero page, a file page) is put and
    skipped. At the end of an mm its trailing rmap_items go; an mm with no mergeable VMA
    left (or exiting) loses its slot; after the last slot ksm_scan.seqnr counts the round
    and None is returned. A new round starts by resetting the unstable tree. Returns
    (rmap_item, paddr of the page with a reference)."""
    ksm = ksm_state(k)
    if not ksm.mm_slots:
        return None
    slot = ksm.scan_slot
    if slot is None:
        ksm.unstable_tree = {}                     # root_unstable_tree[nid] = RB_ROOT
        slot = ksm.scan_slot = ksm.mm_slots[0]
        ksm.scan_address, ksm.rmap_pos = 0, 0
    while True:
        mm = slot.mm
        await mmap_read_lock(mm)
        if ksm_test_exit(mm):
            vmas = []
        else:                                      # vma_iter_init(&vmi, mm, ksm_scan.address)
            vmas = sorted((v for v in mm.vmas if v.end > ksm.scan_address), key=lambda v: v.start)
        for vma in vmas:
            if not vma.flags & VM_MERGEABLE:
                continue
            if ksm.scan_address < vma.start:
                ksm.scan_address = vma.start
            if not vma.anon_vma:
                ksm.scan_address = vma.end
            while ksm.scan_address < vma.end:
                if ksm_test_exit(mm):
                    break
                paddr = await gup.follow_page(k, vma, ksm.scan_address, gup.FOLL_GET)
                if paddr is None or paddr < 0:     # IS_ERR_OR_NULL(*page)
                    k.stats["ksm_scan_follow_page_null"] += 1
                    ksm.scan_address += k.page_size
                    continue
                page = k.alloc.page_of(paddr)
                if not is_zone_device_page(page) and PageAnon(page):
                    item = get_next_rmap_item(k, slot, ksm.scan_address)
                    ksm.rmap_pos = slot.rmap_list.index(item) + 1
                    ksm.scan_address += k.page_size
                    await mmap_read_unlock(mm)
                    return item, paddr
                memory.put_page(k, page)           # next_page:
                ksm.scan_address += k.page_size
        if ksm_test_exit(mm):
            ksm.scan_address, ksm.rmap_pos = 0, 0
        remove_trailing_rmap_items(k, slot, ksm.rmap_pos)
        i = ksm.mm_slots.index(slot)
        ksm.scan_slot = ksm.mm_slots[i + 1] if i + 1 < len(ksm.mm_slots) else None
        if ksm.scan_address == 0:                  # no VM_MERGEABLE VMA (or exiting): drop the slot
            ksm.mm_slots.remove(slot)
            k.stats["ksm_mm_slot_freed"] += 1
        await mmap_read_unlock(mm)
        slot = ksm.scan_slot
        if slot is None:
            break
        ksm.scan_address, ksm.rmap_pos = 0, 0      # next_mm:
    ksm.seqnr += 1
    return None


async def ksm_do_scan(k, scan_npages: int) -> int:
    """ksm_do_scan(): up to ``scan_npages`` pages: scan_get_next_rmap_item(), then
    cmp_and_merge_page() and put_page(); stops early at the end of a round. Returns the
    number of pages scanned."""
    done = 0
    while scan_npages > 0:
        scan_npages -= 1
        got = await scan_get_next_rmap_item(k)
        if got is None:
            break
        rmap_item, paddr = got
        page = k.alloc.page_of(paddr)
        await cmp_and_merge_page(k, paddr, rmap_item)
        memory.put_page(k, page)
        done += 1
    return done


async def ksm_scan_thread(k) -> None:
    """ksm_scan_thread() (ksmd): while ksm_run has KSM_RUN_MERGE and there are mm slots,
    ksm_do_scan(ksm_thread_pages_to_scan), then sleep; else wait to be woken."""
    ksm = ksm_state(k)
    while True:
        if ksm.run & KSM_RUN_MERGE and ksm.mm_slots:
            await ksm_do_scan(k, ksm.pages_to_scan)
            await traps.sleep(ksm.sleep_cycles)
        else:
            await traps.wait(ksm.wq)
