"""Guest physical RAM: one prefaulted host buffer shared by every vCPU.

Unicorn maps it once with ``mem_map_ptr`` (never page by page: region creation is
quadratic), Python reads and writes it through a memoryview. Physical address 0 is the
first byte. Page-table entries are read in the arch's byte order.
"""
from __future__ import annotations

import ctypes
import mmap
import struct

from emu.arch import PAGE_SHIFT, PAGE_SIZE

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str | int) -> int:
    """'256M' -> bytes. Accepts K/M/G suffixes (optionally followed by B/iB)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    num = t[: len(t) - len(unit)]
    if not num.isdigit():
        raise ValueError(f"bad size {text!r}: use a number with an optional K, M or G suffix")
    return int(num) * _SIZE_UNITS[unit]


class PhysicalAddressError(Exception):
    """An access beyond guest RAM: on hardware a machine check, here always a bug."""


class PhysMem:
    """``size`` bytes of guest RAM. Sizes are rounded up to 2 MiB so huge frames fit."""

    def __init__(self, size: int, big_endian: bool, prefault: bool = True) -> None:
        if size < 4 << 20:
            raise ValueError("guest memory must be at least 4M")
        size = (size + (2 << 20) - 1) & ~((2 << 20) - 1)
        self.size = size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if prefault else 0)
        # MAP_POPULATE prefaults: a first touch costs ~9 us a page from inside a guest run.
        self.buf = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.buf)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.big_endian = big_endian
        self.entry = struct.Struct(">Q" if big_endian else "<Q")
        self.nr_pages = size >> PAGE_SHIFT

    # -- bytes -------------------------------------------------------------------------
    def read(self, paddr: int, n: int) -> bytes:
        return bytes(self.view[paddr:paddr + n])

    def write(self, paddr: int, data: bytes) -> None:
        self.view[paddr:paddr + len(data)] = data

    def zero(self, paddr: int, n: int = PAGE_SIZE) -> None:
        self.fill(paddr, n, 0)

    def fill(self, paddr: int, n: int, byte: int) -> None:
        if not 0 <= paddr <= self.size - n:
            raise PhysicalAddressError(f"fill of {n} bytes at {paddr:#x}: outside guest RAM")
        ctypes.memset(self.address + paddr, byte, n)

    def copy(self, dst: int, src: int, n: int = PAGE_SIZE) -> None:
        self.buf[dst:dst + n] = self.buf[src:src + n]

    # -- 8-byte table entries in the guest's byte order --------------------------------------
    def read_entry(self, paddr: int) -> int:
        if not 0 <= paddr <= self.size - 8:
            raise PhysicalAddressError(f"table entry read at {paddr:#x}: outside guest RAM "
                                       f"(0..{self.size:#x}); a page table is corrupt")
        return self.entry.unpack_from(self.buf, paddr)[0]

    def read_entries(self, paddr: int, count: int) -> tuple[int, ...]:
        """``count`` consecutive entries (a table scan in one unpack)."""
        if not 0 <= paddr <= self.size - 8 * count:
            raise PhysicalAddressError(f"table read at {paddr:#x}+{8 * count}: outside guest RAM")
        return struct.unpack_from(("<" if not self.big_endian else ">") + f"{count}Q", self.buf, paddr)

    def write_entry(self, paddr: int, value: int) -> None:
        self.entry.pack_into(self.buf, paddr, value)

    def cmpxchg_entry(self, paddr: int, old: int, new: int) -> bool:
        """Atomic with respect to emu's own tasks (Python code between traps is atomic)."""
        if self.entry.unpack_from(self.buf, paddr)[0] != old:
            return False
        self.entry.pack_into(self.buf, paddr, new)
        return True

    def fill_entries(self, paddr: int, count: int, value: int) -> None:
        """Initialise a fresh table with the arch's empty value."""
        if value == 0:
            self.zero(paddr, count * 8)
        else:
            self.buf[paddr:paddr + count * 8] = self.entry.pack(value) * count

    def close(self) -> None:
        self.view.release()
        self.buf.close()
