"""The architectural TLB model of one vCPU.

Unicorn's own softmmu TLB is only a cache of this one: every Unicorn fill is served from
here or from a plugin walk. Entries are (physical page, permissions); huge leaves are
kept once per leaf and handed out per 4K page. Invalidation drops entries here and the
vCPU flushes Unicorn's TLB at its next scheduling point.
"""
from __future__ import annotations

from emu.arch import PAGE_SHIFT, Translation


class TLB:
    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.small: dict[int, tuple[int, int]] = {}       # vpn -> (page paddr, perms)
        self.huge: dict[tuple[int, int], tuple[int, int]] = {}  # (shift, va >> shift) -> (base, perms)
        self.huge_shifts: list[int] = []
        self.by_frame: dict[int, list[int]] = {}   # frame -> vpns inserted for it (sanitizer)
        self.inserts = 0
        self.evictions = 0
        self.flushes = 0

    def lookup_huge(self, va: int) -> tuple[int, int] | None:
        """(paddr of va's 4K page, perms) from a huge entry, or None."""
        for shift in self.huge_shifts:
            e = self.huge.get((shift, va >> shift))
            if e is not None:
                return e[0] + (va & ((1 << shift) - 1) & ~((1 << PAGE_SHIFT) - 1)), e[1]
        return None

    def insert(self, va: int, t: Translation) -> tuple[int, int]:
        """Insert a walk's result; returns (paddr of va's 4K page, perms)."""
        self.inserts += 1
        page = t.paddr & ~((1 << PAGE_SHIFT) - 1)
        perms = int(t.perms)
        if t.size > 1 << PAGE_SHIFT:
            shift = t.size.bit_length() - 1
            self.huge[(shift, va >> shift)] = (t.paddr & ~(t.size - 1), perms)
            if shift not in self.huge_shifts:
                self.huge_shifts.append(shift)
                self.huge_shifts.sort()
        if len(self.small) >= self.capacity:       # FIFO replacement
            del self.small[next(iter(self.small))]
            self.evictions += 1
        self.small[va >> PAGE_SHIFT] = (page, perms)
        self.by_frame.setdefault(page, []).append(va >> PAGE_SHIFT)
        return page, perms

    def maps_frame(self, frame: int) -> int | None:
        """A VA this TLB still translates to ``frame`` (4K), or None."""
        for vpn in self.by_frame.get(frame, ()):
            e = self.small.get(vpn)
            if e is not None and e[0] == frame:
                return vpn << PAGE_SHIFT
        for (shift, vhn), (base, _) in self.huge.items():
            if base <= frame < base + (1 << shift):
                return (vhn << shift) + (frame - base)
        return None

    def flush_all(self) -> None:
        self.small.clear()
        self.by_frame.clear()
        self.huge.clear()
        self.huge_shifts.clear()
        self.flushes += 1

    def flush_range(self, start: int, end: int) -> None:
        """flush_tlb_range(): drop every entry overlapping [start, end)."""
        self.flushes += 1
        if (end - start) >> PAGE_SHIFT > len(self.small):
            for vpn in [v for v in self.small if start >> PAGE_SHIFT <= v < (end + 4095) >> PAGE_SHIFT]:
                del self.small[vpn]
        else:
            for vpn in range(start >> PAGE_SHIFT, (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT):
                self.small.pop(vpn, None)
        for key in [k for k in self.huge if (k[1] << k[0]) < end and ((k[1] + 1) << k[0]) > start]:
            del self.huge[key]
