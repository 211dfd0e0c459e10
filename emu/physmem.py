"""Guest physical RAM: one prefaulted host buffer shared by every vCPU.

Unicorn maps it once with ``mem_map_ptr`` (never page by page: region creation is
quadratic), Python reads and writes it through a memoryview. Physical address 0 is the
first byte. Page-table entries are read in the arch's byte order.
"""
from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import mmap
import struct
import weakref

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


# Guest RAM buffers given back by close(recycle=True), by size: the race explorer builds a
# fresh world for every schedule, and a fresh host mapping costs a host page fault on every
# first touch (~1 us a page), more than the rest of a small schedule.
_POOL: dict[int, list[mmap.mmap]] = {}
_POOL_MAX = 4                # buffers kept per size
_POOL_SIZE_MAX = 32 << 20    # bigger RAM is not worth keeping resident (the explorer's is 8-16M)
# Machines refer to their kernels and schedulers in cycles, so RAM nobody can reach any
# more is unmapped only when the cycle collector runs, which counts objects, not bytes:
# past this much guest RAM alive, a new PhysMem collects first.
_LIVE_MAX = 768 << 20
_live = [0]
_ZERO_GAP = 32          # clean frames between two dirty ones zeroed anyway (one memset)


def _forget(size: int) -> None:
    _live[0] -= size


_INDICES = tuple(range(1 << 13))     # indices as ready-made ints (a table has at most 8192)


def nonempty(raws: tuple[int, ...], empty: int) -> list[int]:
    """The indices of the entries of ``raws`` (a read_entries() scan) that differ from
    ``empty``, in order; for an empty value of 0 one C-level pass."""
    if empty == 0 and len(raws) <= len(_INDICES):
        return list(itertools.compress(_INDICES, raws)) if raws.count(0) != len(raws) else []
    return [i for i, raw in enumerate(raws) if raw != empty]


class PhysicalAddressError(Exception):
    """An access beyond guest RAM: on hardware a machine check, here always a bug."""


class RamTemplate:
    """Contents for new guest RAM to start from (the race explorer's world snapshots): the
    frames written, each without its trailing zeros; every other byte is zero. Buffers
    closed with ``recycle`` go back to the template's own pool already holding it."""

    POOL_MAX = 2

    def __init__(self, size: int, big_endian: bool, frames: dict[int, bytes]) -> None:
        self.size, self.big_endian = size, big_endian
        self.frames = frames                        # pfn -> contents (no trailing zeros)
        self.where = [slice(pfn << PAGE_SHIFT, (pfn << PAGE_SHIFT) + len(data))
                      for pfn, data in frames.items()]
        self.what = list(frames.values())
        self.mask = sum(1 << (8 * pfn) for pfn in frames)     # one byte a frame, as PhysMem.dirty
        self.pool: list[mmap.mmap] = []

    @classmethod
    def of(cls, ram: PhysMem) -> RamTemplate:
        """What ``ram`` holds now (it must not be exposed)."""
        frames = {}
        written = ram.written()
        i = written.find(1)
        while i != -1:
            data = ram.read(i << PAGE_SHIFT, PAGE_SIZE).rstrip(b"\0")
            if data:
                frames[i] = data
            i = written.find(1, i + 1)
        return cls(ram.size, ram.big_endian, frames)


class PhysMem:
    """``size`` bytes of guest RAM. Sizes are rounded up to 2 MiB so huge frames fit.
    With a ``template``, the RAM starts with its contents instead of zeros."""

    def __init__(self, size: int, big_endian: bool, prefault: bool = True,
                 template: RamTemplate | None = None) -> None:
        if size < 4 << 20:
            raise ValueError("guest memory must be at least 4M")
        size = (size + (2 << 20) - 1) & ~((2 << 20) - 1)
        if template is not None and template.size != size:
            raise ValueError(f"a RAM template of {template.size:#x} bytes for RAM of {size:#x}")
        self.size = size
        self.template = template
        if _live[0] + size > _LIVE_MAX:
            gc.collect()
        pooled = _POOL.get(size)
        fill = template is not None
        if template is not None and template.pool:
            self.buf = template.pool.pop()      # holds the template already: see close()
            fill = False
        elif pooled:
            self.buf = pooled.pop()             # all zero again: see close()
        else:
            populate = getattr(mmap, "MAP_POPULATE", 0) if prefault else 0
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
            # MAP_POPULATE prefaults: a first touch costs ~9 us a page from inside a guest run.
            self.buf = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self.buf)
        _live[0] += size
        self._gone = weakref.finalize(self, _forget, size)      # at close() or collection
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.big_endian = big_endian
        self.entry = struct.Struct(">Q" if big_endian else "<Q")
        self.nr_pages = size >> PAGE_SHIFT
        # frames written through this object's methods, so close(recycle=True) can zero
        # just those; writers it cannot see (Unicorn, users of ``view``) set ``exposed``
        self.dirty = bytearray(self.nr_pages)
        self.exposed = False
        if fill:
            collections.deque(map(self._view.__setitem__, template.where, template.what), maxlen=0)

    def written(self) -> bytes:
        """One byte a frame, 1 where the RAM may hold something else than zero: the frames
        written, and the template's."""
        if self.template is None or not self.template.mask:
            return bytes(self.dirty)
        return (int.from_bytes(self.dirty, "little") | self.template.mask).to_bytes(self.nr_pages, "little")

    @property
    def view(self) -> memoryview:
        """All of RAM as a writable memoryview. Writes through it are not tracked, so a
        PhysMem whose view was handed out is never recycled."""
        self.exposed = True
        return self._view

    def _mark(self, paddr: int, n: int) -> None:
        first, last = paddr >> PAGE_SHIFT, (paddr + n - 1) >> PAGE_SHIFT
        if first == last:
            self.dirty[first] = 1
        else:
            self.dirty[first:last + 1] = b"\x01" * (last + 1 - first)

    # -- bytes -------------------------------------------------------------------------
    def read(self, paddr: int, n: int) -> bytes:
        return bytes(self._view[paddr:paddr + n])

    def write(self, paddr: int, data: bytes) -> None:
        self._view[paddr:paddr + len(data)] = data
        self._mark(paddr, len(data))

    def scatter(self, paddr: int, stride: int, items: bytes, size: int) -> None:
        """Write the ``size``-byte items of ``items`` at ``paddr``, ``paddr + stride``, ...
        (one strided copy per byte of an item), leaving the bytes between them alone: a
        sparse pattern written into zeroed memory without copying its zeros."""
        n = len(items) // size
        if n == 0:
            return
        end = paddr + (n - 1) * stride + size
        if size > stride or len(items) != n * size or not 0 <= paddr <= end <= self.size:
            raise PhysicalAddressError(f"scatter of {n} x {size} bytes every {stride} at {paddr:#x}: "
                                       "outside guest RAM or overlapping")
        last = paddr + (n - 1) * stride + 1
        for j in range(size):
            self._view[paddr + j:last + j:stride] = items[j::size]
        if stride % PAGE_SIZE == 0 and (paddr & (PAGE_SIZE - 1)) + size <= PAGE_SIZE:
            first, step = paddr >> PAGE_SHIFT, stride >> PAGE_SHIFT
            self.dirty[first:first + (n - 1) * step + 1:step] = b"\x01" * n
        else:
            for i in range(n):
                self._mark(paddr + i * stride, size)

    def zero(self, paddr: int, n: int = PAGE_SIZE) -> None:
        self.fill(paddr, n, 0)

    def fill(self, paddr: int, n: int, byte: int) -> None:
        if not 0 <= paddr <= self.size - n:
            raise PhysicalAddressError(f"fill of {n} bytes at {paddr:#x}: outside guest RAM")
        ctypes.memset(self.address + paddr, byte, n)
        self._mark(paddr, n)

    def copy(self, dst: int, src: int, n: int = PAGE_SIZE) -> None:
        self.buf[dst:dst + n] = self.buf[src:src + n]
        self._mark(dst, n)

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
        self.dirty[paddr >> PAGE_SHIFT] = 1

    def cmpxchg_entry(self, paddr: int, old: int, new: int) -> bool:
        """Atomic with respect to emu's own tasks (Python code between traps is atomic)."""
        if self.entry.unpack_from(self.buf, paddr)[0] != old:
            return False
        self.entry.pack_into(self.buf, paddr, new)
        self.dirty[paddr >> PAGE_SHIFT] = 1
        return True

    def fill_entries(self, paddr: int, count: int, value: int) -> None:
        """Initialise a fresh table with the arch's empty value."""
        if value == 0:
            self.zero(paddr, count * 8)
        else:
            self.buf[paddr:paddr + count * 8] = self.entry.pack(value) * count
            self._mark(paddr, count * 8)

    def close(self, recycle: bool = False) -> None:
        """Unmap the RAM; with ``recycle`` (and nobody untracked ever wrote to it) zero
        the frames written and keep the buffer for the next PhysMem of this size. A second
        close() does nothing (the buffer must not go back to the pool twice)."""
        if not self._gone.alive:
            return
        self._view.release()
        self._gone()
        pool = _POOL.setdefault(self.size, [])
        if not recycle or self.exposed or self.size > _POOL_SIZE_MAX:
            self.buf.close()
            return
        tpl = self.template
        if tpl is not None and len(tpl.pool) < tpl.POOL_MAX:
            # back to the template: zero what was written, then its frames among those zeroed
            # (a cluster takes clean frames along) again
            zeroed = self._zero(self.dirty)
            both = (int.from_bytes(zeroed, "little") & tpl.mask).to_bytes(self.nr_pages, "little")
            pfn = both.find(1)
            while pfn != -1:
                data = tpl.frames[pfn]
                ctypes.memmove(self.address + (pfn << PAGE_SHIFT), data, len(data))
                pfn = both.find(1, pfn + 1)
            tpl.pool.append(self.buf)
            return
        if len(pool) >= _POOL_MAX:
            self.buf.close()
            return
        self._zero(self.written())
        pool.append(self.buf)

    def _zero(self, dirty: bytes | bytearray) -> bytearray:
        """Zero the frames marked in ``dirty``: one memset per cluster (a cluster ends at the
        first _ZERO_GAP clean frames in a row; a call costs as much as zeroing ~16 pages).
        Returns the frames zeroed, one byte a frame."""
        zeroed = bytearray(len(dirty))
        start, gap = dirty.find(1), bytes(_ZERO_GAP)
        while start != -1:
            end = dirty.find(gap, start)
            end = len(dirty) if end == -1 else end
            ctypes.memset(self.address + (start << PAGE_SHIFT), 0, (end - start) << PAGE_SHIFT)
            zeroed[start:end] = b"\x01" * (end - start)
            start = dirty.find(1, end)
        return zeroed
