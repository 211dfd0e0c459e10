"""TLB shootdowns as the flusher sees them (arch/x86/mm/tlb.c, kernel/smp.c).

flush_tlb_range() sends an IPI to every other CPU that may cache translations of the mm
and, like flush_tlb_mm_range() -> on_each_cpu_cond_mask(..., wait=true), does not return
until each of them has run the flush. A target acknowledges at its next scheduling point
(the machine decides when that is: the next step of a task on that vCPU, at once if the
vCPU is idle); until then the flusher is blocked, so whatever it does next — freeing the
pages, the table — happens after every TLB has forgotten them.
"""
from __future__ import annotations

from emu.sched import traps


async def flush_tlb_range(k, mm, start: int, end: int) -> None:
    """flush_tlb_range() / flush_tlb_mm_range(): IPIs to the vCPUs running ``mm``, then
    wait for every acknowledgement (a blocking wait: a scheduling point)."""
    acks = k.flush_tlb_range(mm, start, end)
    if acks is not None and not acks.try_acquire(None, "wait"):
        k.stats["tlb_ack_waits"] += 1
        await traps.wait(acks)
