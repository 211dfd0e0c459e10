"""THP split scenarios: walkers and zaps meeting an anon THP whose pmd is being split
(`__split_huge_pmd_locked`: pmdp_invalidate(), fill the deposited table, pmd_populate()).
"""
from __future__ import annotations

from emu.scenario import Scenario
from emu.scenarios.base import World, anon_thp, scenario
from mm_core import huge_memory, madvise
from mm_core.sanitizers import Finding


@scenario("dontneed-vs-thp-split",
          "two MADV_DONTNEEDs under mmap_read_lock over neighbouring parts of one anon THP "
          "(four pages each): the first to reach it splits the pmd (zap_pmd_range -> "
          "split_huge_pmd), the other must not take the pmd for empty while it is being "
          "split. Oracle: afterwards those eight pages are unmapped, the rest still mapped",
          catches=("split_huge_pmd_clears_pmd",))
def dontneed_vs_thp_split(sc: Scenario) -> World:
    m, k = sc.machine, sc.kernel
    size = huge_memory.hpage_pmd_size(k)
    mm, a, thp = anon_thp(m)
    k.physmem.write(thp, b"\xa5" * size)                    # written data to be thrown away
    part = 4 * k.page_size
    done: list[str] = []

    async def dontneed(lo: int, hi: int, name: str):
        await madvise.madvise_dontneed(k, mm, lo, hi)
        done.append(name)
        if len(done) < 2:
            return 0
        # the other MADV_DONTNEED is over too
        left = [hex(v) for v in range(a, a + 2 * part, k.page_size) if m.translate(mm, v) is not None]
        if left:
            raise Finding("ORACLE", "ORACLE: MADV_DONTNEED left pages of the THP mapped",
                          "ORACLE:dontneed-thp-split", [f"  still mapped: {', '.join(left)}"])
        rest = m.translate(mm, a + 2 * part)
        if rest != thp + 2 * part:
            raise Finding("ORACLE", "ORACLE: the rest of the split THP is not mapped where it was",
                          "ORACLE:dontneed-thp-split-rest", [f"  {a + 2 * part:#x} -> {rest}"])
        return 0

    sc.task("dontneed-low", dontneed(a, a + part, "low"))
    sc.task("dontneed-high", dontneed(a + part, a + 2 * part, "high"))
    return World([mm], [], a)
