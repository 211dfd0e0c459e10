"""perf's sample page sizes (kernel/events/core.c, 6.6): perf_get_page_size() and
perf_get_pgtable_size(), a lockless walk with IRQs off (PERF_SAMPLE_DATA_PAGE_SIZE /
PERF_SAMPLE_CODE_PAGE_SIZE).

    perf_get_page_size()     local_irq_save(), then the walk of current->mm, or of
                             init_mm for a kernel thread; IRQs off is what keeps the
                             tables from being freed under it (an IRQs-off region is an RCU
                             read-side critical section, and it holds off the TLB-flush
                             IPIs of arches that free tables after one): modelled as
                             rcu_read_lock()
    perf_get_pgtable_size()  READ_ONCE() of each level; a non-present entry is size 0, a
                             leaf its size; the pmd read with pmdp_get_lockless() into a
                             stack copy, mapped with pte_offset_map(&pmd): a failed map is
                             ``goto again`` (RETRY: read the pmd again)

The retry ends because the copy it maps was just checked present and not a leaf: a none
or migration pmd returns 0 before any map, a huge one its size. The map of the copy can
only fail on a bad pmd, and pmd_clear_bad(&pmd) then clears the copy, not the pmd: a
corrupt pmd makes the loop endless (with IRQs off). A table retracted after the read is
still mapped (the copy names it, and IRQs off keep it from being freed): it is empty, so
the size is 0.
"""
from __future__ import annotations

from emu.arch import Kind
from emu.sched.traps import sched_point
from mm_core import pgtable
from mm_core.rcu import rcu_read_lock, rcu_read_unlock


async def perf_get_pgtable_size(k, mm, addr: int) -> int:
    """perf_get_pgtable_size(): the size of the mapping of ``addr`` in ``mm`` (0: none)."""
    arch = k.arch
    table = mm.pgd
    for level in range(arch.pmd_level):                       # pgd, p4d, pud: READ_ONCE()
        ent = arch.decode(level, await pgtable.get_raw(k, pgtable.entry_addr(k, table, level, addr)))
        if not ent.present:
            return 0
        if ent.kind is Kind.LEAF:                             # p?d_leaf_size()
            return arch.levels[level].span
        table = ent.paddr
    pmdp = pgtable.entry_addr(k, table, arch.pmd_level, addr)
    while True:                                               # again:
        pmd = arch.decode(arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
        if pmd.kind in (Kind.NONE, Kind.SWAP, Kind.MIGRATION):  # !pmd_present()
            return 0
        if pmd.kind is Kind.LEAF:
            return arch.levels[arch.pmd_level].span            # pmd_leaf_size()
        ptep = await pgtable.pte_offset_map_copy(k, pmd, addr, pmdp)
        if ptep is not None:
            break
        k.stats["perf_pgtable_again"] += 1
        await sched_point("retry", pmdp)                      # goto again
    pte = arch.decode(arch.pte_level, await pgtable.get_raw(k, ptep))   # ptep_get_lockless()
    size = k.page_size if pte.kind is Kind.LEAF else 0        # pte_leaf_size()
    await pgtable.pte_unmap(k, ptep)
    return size


async def perf_get_page_size(k, mm, addr: int) -> int:
    """perf_get_page_size(): 0 for address 0; ``mm`` None stands for a kernel thread
    (init_mm)."""
    if not addr:
        return 0
    if mm is None:
        from mm_core.vmalloc import get_init_mm
        mm = get_init_mm(k)
    if "perf_get_page_size_without_irqs_off" in k.bugs:       # bug injection: no local_irq_save()
        return await perf_get_pgtable_size(k, mm, addr)
    await rcu_read_lock(k)                                    # local_irq_save()
    try:
        return await perf_get_pgtable_size(k, mm, addr)
    finally:
        await rcu_read_unlock(k)                              # local_irq_restore()
