"""get_user_pages: slow GUP and GUP-fast (mm/gup.c, v6.6; follow_trans_huge_pmd from
mm/huge_memory.c).

Slow GUP (``__get_user_pages``) runs under mmap_read_lock and looks each page up with
``follow_page_mask`` -> ``follow_pmd_mask`` -> ``follow_page_pte``. Whatever the lookup
cannot give right now -- no table (``pte_offset_map_lock()`` failed, the pmd is none or
a migration entry), a none or non-present pte, a write-protected pte for FOLL_WRITE --
comes back as NULL, and the caller faults the page in (``faultin_page`` ->
``handle_mm_fault``: do_anonymous_page, do_wp_page's COW break, do_set_pmd, a migration
wait) and looks again: RETRY through the fault path. A huge pmd is followed under the
pmd lock (``follow_trans_huge_pmd``) and the rest of the folio is grabbed in one go.

GUP-fast (``internal_get_user_pages_fast`` -> ``lockless_pages_from_mm`` ->
``gup_pgd_range`` -> ``gup_pmd_range`` -> ``gup_pte_range`` / ``gup_huge_pmd``) takes no
lock at all: it runs with interrupts off, which on 6.6 is an RCU read-side critical
section (modelled as one: no grace period -- so no pte_free_defer() -- can complete while
it runs). It copies each pmd onto the stack (``pmdp_get_lockless``), maps the PTE table
from that copy (``pte_offset_map(&pmd, addr)``), takes a reference, and then rechecks
``pmd_val(pmd) != pmd_val(*pmdp) || pte_val(pte) != pte_val(ptep_get(ptep))``: on a
change it drops the reference and stops. Any stop (map failure, none / special /
PROT_NONE / read-only-for-write pte, non-present pmd, a failed recheck) is GIVEUP:
what is left goes to slow GUP.

References: FOLL_GET takes one page reference per page (released with put_page());
FOLL_PIN takes GUP_PIN_COUNTING_BIAS references on a small folio, or one reference plus
one ``pincount`` on a large one, and never pins the zero page (6.5+); released with
unpin_user_pages().

Not modelled: FOLL_FORCE's COW-and-dirty rule for read-only VMAs beyond check_vma_flags,
FAULT_FLAG_UNSHARE (``gup_must_unshare``: a read-only FOLL_PIN of a COW-shared anon page
does not unshare it first), FOLL_LONGTERM migration out of movable zones, devmap / p2pdma /
hugetlb / gate pages, the mm's write_protect_seq (fork vs FOLL_PIN GUP-fast), and the
IPIs that interrupts-off also hold back (THP split flushes; before 6.6 the only thing that
kept an immediately freed table away from GUP-fast: tlb_remove_table_sync_one()), so
GUP-fast is faithful under the 6.6 and 6.13 profiles only.
"""
from __future__ import annotations

from emu.arch import Access, Kind
from emu.sched import traps
from emu.sched.traps import sched_point
from mm_core import huge_memory, memory, pgtable
from mm_core.locks import mmap_read_lock, mmap_read_unlock
from mm_core.mm import VM_MAYREAD, VM_MAYWRITE, VM_READ, VM_SHARED, VM_WRITE
from mm_core.rcu import rcu_read_lock, rcu_read_unlock

# enum foll_flags (include/linux/mm_types.h, 6.6) and the internal ones (mm/internal.h)
FOLL_WRITE = 1 << 0
FOLL_GET = 1 << 1
FOLL_DUMP = 1 << 2
FOLL_FORCE = 1 << 3
FOLL_NOWAIT = 1 << 4
FOLL_NOFAULT = 1 << 5
FOLL_LONGTERM = 1 << 8
FOLL_SPLIT_PMD = 1 << 9
FOLL_TOUCH = 1 << 16
FOLL_PIN = 1 << 19
FOLL_FAST_ONLY = 1 << 20
FOLL_UNLOCKABLE = 1 << 21

GUP_PIN_COUNTING_BIAS = 1 << 10

ENOMEM, EFAULT, EEXIST, EINVAL = 12, 14, 17, 22


# -- references ------------------------------------------------------------------------------

def is_zero_page(k, page) -> bool:
    return page is k.zero_page


def _large(k, folio) -> bool:
    """folio_test_large(): more than one base page."""
    return folio.order > k.page_order


def try_grab_page(k, page, flags: int) -> int:
    """try_grab_page(): FOLL_GET takes one reference; FOLL_PIN takes a pin (one reference
    and one pincount on a large folio, GUP_PIN_COUNTING_BIAS references on a small one),
    except on the zero page. 0 or -errno."""
    if page.refcount <= 0:
        return -ENOMEM
    if flags & FOLL_GET:
        page.refcount += 1
    elif flags & FOLL_PIN:
        if is_zero_page(k, page):
            return 0
        if _large(k, page):
            page.refcount += 1
            page.extra["pincount"] = page.extra.get("pincount", 0) + 1
        else:
            page.refcount += GUP_PIN_COUNTING_BIAS
        k.stats["foll_pin_acquired"] += 1
    return 0


def try_grab_folio(k, page, refs: int, flags: int):
    """try_grab_folio() (GUP-fast): folio_try_get() -- fails on a folio whose refcount is
    already zero (being freed) -- then ``refs`` references or pins. The folio or None."""
    if page.refcount <= 0:
        return None
    if flags & FOLL_GET:
        page.refcount += refs
    elif flags & FOLL_PIN:
        if _large(k, page):
            page.refcount += refs
            page.extra["pincount"] = page.extra.get("pincount", 0) + refs
        else:
            page.refcount += refs * GUP_PIN_COUNTING_BIAS
        k.stats["foll_pin_acquired"] += refs
    else:
        return None
    return page


def gup_put_folio(k, folio, refs: int, flags: int) -> None:
    """gup_put_folio(): undo ``refs`` grabs; the last reference frees the folio."""
    if flags & FOLL_PIN:
        if is_zero_page(k, folio):
            return
        k.stats["foll_pin_released"] += refs
        if _large(k, folio):
            folio.extra["pincount"] -= refs
            if not folio.extra["pincount"]:
                del folio.extra["pincount"]
        else:
            refs *= GUP_PIN_COUNTING_BIAS
    folio.refcount -= refs
    if folio.refcount < 0:
        raise RuntimeError(f"refcount underflow on pfn {folio.pfn:#x}")
    if folio.refcount == 0:
        k.alloc.free_pages(folio)


def folio_maybe_dma_pinned(k, folio) -> bool:
    """folio_maybe_dma_pinned()."""
    if _large(k, folio):
        return folio.extra.get("pincount", 0) > 0
    return folio.refcount >= GUP_PIN_COUNTING_BIAS


def _page_of(k, paddr: int):
    page = k.alloc.page_of(paddr)
    if page is None:
        raise ValueError(f"no page at {paddr:#x}: not a page GUP returned")
    return page


def put_user_page(k, paddr: int) -> None:
    """put_page() of a page get_user_pages() returned (FOLL_GET)."""
    gup_put_folio(k, _page_of(k, paddr), 1, FOLL_GET)


def unpin_user_pages(k, paddrs: list[int]) -> None:
    """unpin_user_pages(): release pages pin_user_pages*() returned (FOLL_PIN)."""
    for paddr in paddrs:
        gup_put_folio(k, _page_of(k, paddr), 1, FOLL_PIN)


# -- slow GUP --------------------------------------------------------------------------------

def no_page_table(vma, flags: int) -> None:
    """no_page_table(): NULL, so that the caller faults the page in (FOLL_DUMP's -EFAULT
    for untouched anon memory is not modelled)."""
    return None


def vm_normal_page(k, pte):
    """vm_normal_page(): the page behind a present pte, None for a special one (the zero
    page) or a pfn without a struct page."""
    if pte.special:
        return None
    return k.alloc.page_of(pte.paddr)


class FollowPageContext:
    """struct follow_page_context: how many more pages the lookup covered (page_mask)."""

    def __init__(self) -> None:
        self.page_mask = 0
        self.pmdval = None          # follow_pmd_mask()'s lockless pmd read (bug injection only)


async def follow_page_pte(k, vma, address: int, pmdp: int, flags: int, ctx: FollowPageContext) -> int | None:
    """follow_page_pte(): the page at ``address`` under the ptl. A failed
    pte_offset_map_lock() (the table was retracted, or the pmd became huge / none) is
    no_page_table(): NULL, the caller faults in and retries. A none or non-present pte,
    a PROT_NONE pte, or a write-protected pte for FOLL_WRITE is NULL too (the fault
    breaks COW / waits for migration). Returns the physical address of the (sub)page
    with its reference taken, None, or -errno."""
    arch = k.arch
    mm = vma.mm
    if flags & FOLL_PIN and flags & FOLL_GET:
        return -EINVAL
    locked = await pgtable.pte_offset_map_lock(k, mm, pmdp, address)
    if locked is None and "follow_page_pte_ignores_map_failure" in k.bugs and ctx.pmdval is not None:
        # bug injection: reads the pte in the table follow_pmd_mask()'s pmd read named
        await pgtable.walk_stale_pte_table(k, ctx.pmdval, address, address + k.page_size)
    if locked is None:
        k.stats["gup_no_page_table"] += 1
        return no_page_table(vma, flags)
    ptep, ptl = locked
    pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))
    if pte.kind is not Kind.LEAF or pte.prot == Access.NONE:     # !pte_present / pte_protnone
        await pgtable.pte_unmap_unlock(k, ptep, ptl)
        if pte.kind is not Kind.NONE:
            k.stats["gup_pte_not_present"] += 1
            return None
        return no_page_table(vma, flags)
    page = vm_normal_page(k, pte)
    result: int | None
    if flags & FOLL_WRITE and not pte.prot & Access.W:          # !can_follow_write_pte()
        k.stats["gup_write_fault"] += 1
        result = None
    else:
        if page is None:
            if pte.paddr == k.zero_page.paddr:                  # is_zero_pfn()
                page = k.zero_page
            else:                                               # follow_pfn_pte()
                await pgtable.pte_unmap_unlock(k, ptep, ptl)
                return -EFAULT if flags & (FOLL_GET | FOLL_PIN) else -EEXIST
        ret = try_grab_page(k, page, flags)
        if ret:
            result = ret
        else:
            if flags & FOLL_TOUCH:
                if flags & FOLL_WRITE and not pte.dirty and not page.extra.get("dirty"):
                    page.extra["dirty"] = True                  # set_page_dirty()
                k.stats["mark_page_accessed"] += 1
            result = pte.paddr
    await pgtable.pte_unmap_unlock(k, ptep, ptl)
    return result


async def follow_trans_huge_pmd(k, vma, addr: int, pmdp: int, pmd, flags: int) -> int | None:
    """follow_trans_huge_pmd() (mm/huge_memory.c), under the pmd lock: NULL for FOLL_WRITE
    on a write-protected pmd (the fault does do_huge_pmd_wp_page or splits), else grab
    the folio and touch the pmd (FOLL_TOUCH); the subpage for ``addr``."""
    if flags & FOLL_WRITE and not pmd.prot & Access.W:          # !can_follow_write_pmd()
        k.stats["gup_write_fault"] += 1
        return None
    if pmd.prot == Access.NONE:                                 # pmd_protnone
        return None
    folio = k.alloc.page_of(pmd.paddr)
    if folio is None:
        return -EFAULT
    ret = try_grab_page(k, folio, flags)
    if ret:
        return ret
    if flags & FOLL_TOUCH:                                      # touch_pmd()
        new = pmd.with_(young=True, dirty=pmd.dirty or bool(flags & FOLL_WRITE))
        if new != pmd:
            await pgtable.set_entry(k, pmdp, k.arch.pmd_level, new)
    size = huge_memory.hpage_pmd_size(k)
    return pmd.paddr + (addr & (size - 1) & ~(k.page_size - 1))


async def follow_pmd_mask(k, vma, address: int, pmdp: int, flags: int, ctx: FollowPageContext) -> int | None:
    """follow_pmd_mask(): a lockless look at the pmd (pmdp_get_lockless); none or not
    present (a migration entry) is no_page_table() (the fault waits for the migration);
    a table goes to follow_page_pte(); a huge pmd is rechecked under the pmd lock and
    followed by follow_trans_huge_pmd(), or, if it stopped being huge meanwhile, handled
    at the pte level. FOLL_SPLIT_PMD splits a huge pmd first and goes to the pte level
    (a failed map there is no_page_table(): RETRY through the fault path)."""
    arch = k.arch
    pmdval = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
    ctx.pmdval = pmdval
    if pmdval.kind in (Kind.NONE, Kind.MIGRATION, Kind.SWAP):
        k.stats["gup_pmd_not_present"] += pmdval.kind is not Kind.NONE
        return no_page_table(vma, flags)
    if pmdval.kind is not Kind.LEAF:
        return await follow_page_pte(k, vma, address, pmdp, flags, ctx)
    if pmdval.prot == Access.NONE:
        return no_page_table(vma, flags)
    pml = await pgtable.pmd_lock(k, vma.mm, pmdp)
    cur = await pgtable.get_entry(k, pmdp, arch.pmd_level)
    if cur.kind not in (Kind.LEAF, Kind.TABLE, Kind.BAD):
        await traps.unlock(pml)
        return no_page_table(vma, flags)
    if cur.kind is not Kind.LEAF:                               # split under us
        await traps.unlock(pml)
        return await follow_page_pte(k, vma, address, pmdp, flags, ctx)
    if flags & FOLL_SPLIT_PMD:
        # uprobes' get_user_pages_remote(FOLL_FORCE | FOLL_SPLIT_PMD): split, and if
        # that left the pmd empty (a file THP's mapping is dropped) "stuff a page table
        # in there quickly"; the pte level may still find no table (retracted again, or
        # refaulted huge): no_page_table(), and __get_user_pages() faults and retries
        await traps.unlock(pml)
        await huge_memory.split_huge_pmd(k, vma, pmdp, address)
        k.stats["gup_split_pmd"] += 1
        if not await pgtable.pte_alloc(k, vma.mm, pmdp):
            return -ENOMEM
        return await follow_page_pte(k, vma, address, pmdp, flags, ctx)
    page = await follow_trans_huge_pmd(k, vma, address, pmdp, cur, flags)
    await traps.unlock(pml)
    ctx.page_mask = huge_memory.hpage_pmd_nr(k) - 1
    return page


async def follow_page_mask(k, vma, address: int, flags: int, ctx: FollowPageContext) -> int | None:
    """follow_page_mask() -> follow_p4d_mask() -> follow_pud_mask() -> follow_pmd_mask():
    an upper level that is not a table (none, or a huge pud, which is not modelled) is
    no_page_table()."""
    ctx.page_mask = 0
    table = vma.mm.pgd
    for level in range(k.arch.pmd_level):
        ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, address), level)
        if ent.kind is not Kind.TABLE:
            return no_page_table(vma, flags)
        table = ent.paddr
    pmdp = pgtable.entry_addr(k, table, k.arch.pmd_level, address)
    return await follow_pmd_mask(k, vma, address, pmdp, flags, ctx)


async def follow_page(k, vma, address: int, foll_flags: int) -> int | None:
    """follow_page() (mm/gup.c, 6.6; KSM's scan and get_mergeable_page()): one lookup
    with follow_page_mask(), no fault. NULL (None) wherever follow_page_mask() has
    nothing to give -- no table, follow_page_pte()'s pte_offset_map_lock() failing, a
    none or non-present pte -- and the caller does without the page (SKIP). FOLL_PIN is
    refused (WARN_ON_ONCE: None). Returns the (sub)page's physical address with the
    FOLL_GET reference taken, None, or -errno (IS_ERR: also "no page" to the callers).

    Not modelled: vma_is_secretmem(), ctx.pgmap, and 6.6's following of PROT_NONE
    (NUMA hinting) ptes: follow_page() does not set FOLL_HONOR_NUMA_FAULT, but the model's
    follow_page_pte() answers NULL for every PROT_NONE pte (UNVERIFIED detail: 6.6 from
    memory)."""
    if foll_flags & FOLL_PIN:
        return None
    return await follow_page_mask(k, vma, address, foll_flags, FollowPageContext())


async def faultin_page(k, vma, address: int, flags: int) -> int:
    """faultin_page(): handle_mm_fault() for what follow_page_mask() could not give (a
    write fault for FOLL_WRITE: do_wp_page breaks COW). 0: look again; -ENOMEM / -EFAULT."""
    if flags & FOLL_NOFAULT:
        return -EFAULT
    fault_flags = memory.FAULT_FLAG_WRITE if flags & FOLL_WRITE else 0
    k.stats["gup_faultin"] += 1
    ret = await memory.handle_mm_fault(k, vma, address, fault_flags)
    if ret & memory.VM_FAULT_OOM:
        return -ENOMEM
    if ret & (memory.VM_FAULT_SIGBUS | memory.VM_FAULT_SIGSEGV):
        return -EFAULT
    return 0


def is_cow_mapping(vm_flags: int) -> bool:
    return vm_flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE


def check_vma_flags(vma, gup_flags: int) -> int:
    """check_vma_flags(): may GUP access this VMA this way?"""
    if gup_flags & FOLL_WRITE:
        if not vma.flags & VM_WRITE:
            if not gup_flags & FOLL_FORCE or not is_cow_mapping(vma.flags):
                return -EFAULT
    elif not vma.flags & VM_READ:
        if not gup_flags & FOLL_FORCE or not vma.flags & VM_MAYREAD:
            return -EFAULT
    return 0


async def __get_user_pages(k, mm, start: int, nr_pages: int, gup_flags: int, pages: list | None) -> int:
    """__get_user_pages() (mmap_lock held): page by page, follow_page_mask(); NULL means
    faultin_page() and ``goto retry`` (RETRY through the fault path); a huge pmd covers
    the rest of its folio at once. Returns how many pages were taken, or -errno if none."""
    page_size = k.page_size
    start &= ~(page_size - 1)
    i, ret, vma = 0, 0, None
    ctx = FollowPageContext()
    while nr_pages:
        if vma is None or start >= vma.end:
            vma = mm.vma_lookup(start)                          # gup_vma_lookup()
            if vma is None:
                ret = -EFAULT
                break
            ret = check_vma_flags(vma, gup_flags)
            if ret:
                break
        while True:                                             # retry:
            page = await follow_page_mask(k, vma, start, gup_flags, ctx)
            if page is not None:
                break
            ret = await faultin_page(k, vma, start, gup_flags)
            if ret:
                break
            k.stats["gup_retry"] += 1
            await sched_point("retry", start)
        if page is None:
            break
        if page < 0:
            ret = page
            break
        page_increm = min(1 + (~(start >> k.page_shift) & ctx.page_mask), nr_pages)
        if page_increm > 1 and gup_flags & (FOLL_GET | FOLL_PIN):    # the rest of a large folio
            if try_grab_folio(k, _page_of(k, page), page_increm - 1, gup_flags) is None:
                gup_put_folio(k, _page_of(k, page), 1, gup_flags)
                ret = -EFAULT
                break
        if pages is not None:
            pages.extend(page + j * page_size for j in range(page_increm))
        i += page_increm
        start += page_increm * page_size
        nr_pages -= page_increm
    return i if i else ret


async def __get_user_pages_locked(k, mm, start: int, nr_pages: int, pages: list | None, locked: bool,
                                  flags: int) -> int:
    """__get_user_pages_locked(): take mmap_read_lock unless the caller holds it."""
    if not locked:
        await mmap_read_lock(mm)
    try:
        return await __get_user_pages(k, mm, start, nr_pages, flags, pages)
    finally:
        if not locked:
            await mmap_read_unlock(mm)


async def get_user_pages_unlocked(k, mm, start: int, nr_pages: int, pages: list | None,
                                  gup_flags: int) -> int:
    """get_user_pages_unlocked() (``mm`` is current->mm): FOLL_GET | FOLL_TOUCH."""
    return await __get_user_pages_locked(k, mm, start, nr_pages, pages, False,
                                         gup_flags | FOLL_GET | FOLL_TOUCH | FOLL_UNLOCKABLE)


async def pin_user_pages_unlocked(k, mm, start: int, nr_pages: int, pages: list | None,
                                  gup_flags: int) -> int:
    """pin_user_pages_unlocked(): FOLL_PIN | FOLL_TOUCH (release with unpin_user_pages)."""
    return await __get_user_pages_locked(k, mm, start, nr_pages, pages, False,
                                         gup_flags | FOLL_PIN | FOLL_TOUCH | FOLL_UNLOCKABLE)


# -- GUP-fast --------------------------------------------------------------------------------

async def local_irq_save(k) -> None:
    """local_irq_save(): with interrupts off no grace period can end on this CPU (on 6.6
    an IRQs-off region is an RCU read-side critical section): pte_free_defer()ed tables
    stay readable until local_irq_restore()."""
    await rcu_read_lock(k)


async def local_irq_restore(k) -> None:
    await rcu_read_unlock(k)


def _pte_access_permitted(pte, write: bool) -> bool:
    """pte_access_permitted() / pmd_access_permitted(): present, user, readable (and
    writable for FOLL_WRITE)."""
    need = Access.R | (Access.W if write else Access.NONE)
    return pte.user and pte.prot & need == need


async def gup_pte_range(k, pmd: int, pmdp: int, addr: int, end: int, flags: int, pages: list) -> bool:
    """gup_pte_range(): map the PTE table from the pmd copied onto the stack
    (``pte_offset_map(&pmd, addr)``; a failure stops the walk: GIVEUP, slow GUP takes
    over), then per pte: stop on none / PROT_NONE / not permitted / special (zero page);
    try_grab_folio(); recheck that neither the pmd nor the pte changed (a retracted or
    collapsed table, an unmapped page) and drop the reference and stop if they did."""
    arch = k.arch
    live_map = "gup_fast_maps_live_pmd" in k.bugs
    if live_map:
        # bug injection: map through the live pmd with no validation (the pre-6.5
        # pte_offset_map(pmdp): pmd_page() of whatever *pmdp holds now)
        live = arch.decode(arch.pmd_level, await pgtable.get_raw(k, pmdp))
        ptep = pgtable.entry_addr(k, live.paddr, arch.pte_level, addr)
    else:
        ptep = await pgtable.pte_offset_map_stack(k, pmd, addr)
        if ptep is None:
            k.stats["gup_fast_map_failed"] += 1
            return False
    ptem, ok = ptep, False
    write = bool(flags & FOLL_WRITE)
    while True:
        raw = await pgtable.get_raw(k, ptep)                    # ptep_get_lockless()
        pte = arch.decode(arch.pte_level, raw)
        if pte.kind is not Kind.LEAF or pte.prot == Access.NONE:
            break
        if not _pte_access_permitted(pte, write) or pte.special:
            break
        page = k.alloc.page_of(pte.paddr)                       # pte_page(); !pfn_valid: stop
        if page is None:
            break
        folio = try_grab_folio(k, page, 1, flags)
        if folio is None:
            break
        pmd_changed = "gup_fast_without_pmd_recheck" not in k.bugs \
            and pmd != await pgtable.pmdp_get_lockless(k, pmdp)
        if pmd_changed or raw != await pgtable.get_raw(k, ptep):
            gup_put_folio(k, folio, 1, flags)
            k.stats["gup_fast_recheck_failed"] += 1
            break
        folio.extra["referenced"] = True                        # folio_set_referenced()
        pages.append(pte.paddr)
        addr += k.page_size
        if addr == end:
            ok = True
            break
        ptep += 8
    if not live_map:
        await pgtable.pte_unmap(k, ptem)
    return ok


async def gup_huge_pmd(k, orig: int, pmdp: int, addr: int, end: int, flags: int, pages: list) -> bool:
    """gup_huge_pmd(): the subpages of [addr, end) of a PMD-mapped folio, with one
    try_grab_folio() for all of them, then the pmd recheck."""
    pmd = k.arch.decode(k.arch.pmd_level, orig)
    if not _pte_access_permitted(pmd, bool(flags & FOLL_WRITE)):
        return False
    folio = k.alloc.page_of(pmd.paddr)
    if folio is None:
        return False
    size = huge_memory.hpage_pmd_size(k)
    first = pmd.paddr + (addr & (size - 1))
    refs = (end - addr) >> k.page_shift
    if try_grab_folio(k, folio, refs, flags) is None:
        return False
    if orig != await pgtable.pmdp_get_lockless(k, pmdp):
        gup_put_folio(k, folio, refs, flags)
        k.stats["gup_fast_recheck_failed"] += 1
        return False
    pages.extend(first + j * k.page_size for j in range(refs))
    folio.extra["referenced"] = True
    return True


async def gup_pmd_range(k, pmd_table: int, addr: int, end: int, flags: int, pages: list) -> bool:
    """gup_pmd_range(): each pmd read once onto the stack (pmdp_get_lockless); not
    present (none, migration) stops the walk; a huge pmd goes to gup_huge_pmd(), a table
    to gup_pte_range() with the copy."""
    arch = k.arch
    span = arch.levels[arch.pmd_level].span
    while addr < end:
        nxt = min(end, (addr | (span - 1)) + 1)
        pmdp = pgtable.entry_addr(k, pmd_table, arch.pmd_level, addr)
        pmd = await pgtable.pmdp_get_lockless(k, pmdp)
        kind = arch.decode(arch.pmd_level, pmd).kind
        if kind in (Kind.NONE, Kind.MIGRATION, Kind.SWAP):     # !pmd_present()
            return False
        if kind is Kind.LEAF:
            if not await gup_huge_pmd(k, pmd, pmdp, addr, nxt, flags, pages):
                return False
        elif not await gup_pte_range(k, pmd, pmdp, addr, nxt, flags, pages):
            return False
        addr = nxt
    return True


async def gup_pgd_range(k, mm, addr: int, end: int, flags: int, pages: list) -> None:
    """gup_pgd_range() -> gup_p4d_range() -> gup_pud_range(): READ_ONCE of each upper
    entry; one that is not a table stops the walk."""
    arch = k.arch

    async def down(table: int, level: int, lo: int, hi: int) -> bool:
        if level == arch.pmd_level:
            return await gup_pmd_range(k, table, lo, hi, flags, pages)
        span = arch.levels[level].span
        while lo < hi:
            nxt = min(hi, (lo | (span - 1)) + 1)
            ent = await pgtable.get_entry(k, pgtable.entry_addr(k, table, level, lo), level)
            if ent.kind is not Kind.TABLE or not await down(ent.paddr, level + 1, lo, nxt):
                return False
            lo = nxt
        return True

    try:
        await down(mm.pgd, 0, addr, end)
    finally:
        down = None     # it reaches itself through its closure: a cycle only the collector frees


async def lockless_pages_from_mm(k, mm, start: int, end: int, gup_flags: int, pages: list) -> int:
    """lockless_pages_from_mm(): the walk with interrupts off; how many pages it took."""
    before = len(pages)
    await local_irq_save(k)
    try:
        await gup_pgd_range(k, mm, start, end, gup_flags, pages)
    finally:
        await local_irq_restore(k)
    return len(pages) - before


async def internal_get_user_pages_fast(k, mm, start: int, nr_pages: int, gup_flags: int, pages: list) -> int:
    """internal_get_user_pages_fast(): GUP-fast first; whatever it could not take (it
    stops at the first problem) goes to slow GUP (__gup_longterm_locked ->
    __get_user_pages_locked, which takes mmap_read_lock). Returns the number of pages,
    or -errno if there are none."""
    page_size = k.page_size
    start &= ~(page_size - 1)
    end = start + nr_pages * page_size
    nr_pinned = await lockless_pages_from_mm(k, mm, start, end, gup_flags, pages)
    k.stats["gup_fast_pages"] += nr_pinned
    if nr_pinned == nr_pages or gup_flags & FOLL_FAST_ONLY:
        return nr_pinned
    k.stats["gup_fast_fallback"] += 1
    ret = await __get_user_pages_locked(k, mm, start + nr_pinned * page_size, nr_pages - nr_pinned, pages,
                                        False, gup_flags | FOLL_TOUCH | FOLL_UNLOCKABLE)
    if ret < 0:
        return nr_pinned if nr_pinned else ret
    return ret + nr_pinned


async def get_user_pages_fast(k, mm, start: int, nr_pages: int, gup_flags: int, pages: list) -> int:
    """get_user_pages_fast(): FOLL_GET (release with put_page)."""
    return await internal_get_user_pages_fast(k, mm, start, nr_pages, gup_flags | FOLL_GET, pages)


async def pin_user_pages_fast(k, mm, start: int, nr_pages: int, gup_flags: int, pages: list) -> int:
    """pin_user_pages_fast(): FOLL_PIN (release with unpin_user_pages)."""
    return await internal_get_user_pages_fast(k, mm, start, nr_pages, gup_flags | FOLL_PIN, pages)
