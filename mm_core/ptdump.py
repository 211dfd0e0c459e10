"""ptdump (mm/ptdump.c with an arch's note_page(), arch/*/mm/ptdump.c): the page tables of
an mm as ranges of equal attributes, the way /sys/kernel/debug/kernel_page_tables shows
init_mm and x86's /sys/kernel/debug/page_tables/current_user shows a process's tables.

The walk is walk_page_range_novma() under mmap_write_lock(mm): no VMAs, so a user mm's
PTE tables are mapped with pte_offset_map() and no ptl. mmap_write_lock does not keep
khugepaged's retract_page_tables() away (it holds only i_mmap_lock and the pmd/pte
locks), so the map can fail: ACTION_AGAIN, the pmd read again, now none (a hole) or a
huge leaf (RETRY; patch 10 of the 6.5 series). init_mm's tables are reached with
pte_offset_kernel() and never fail.

note_page() here is one generic format for the four arches (each arch's own file prints
its own bits): a range is cut where the level or the attributes change; present ranges
print as ``start-end  size  USR|KER  RW|ro  x|NX  level``, non-present non-none entries
(swap, migration, pte markers, hwpoison) as their kind; holes are not printed.
ptdump_check_wx() is the CONFIG_DEBUG_WX check of init_mm: every writable and executable
kernel page is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.arch import SWP_HWPOISON, Access, Entry, Kind
from mm_core import pagewalk, pgtable
from mm_core.locks import mmap_write_lock, mmap_write_unlock
from mm_core.swapops import is_pte_marker

UNITS = ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K"))


@dataclass
class PtdumpRange:
    """One printed line: [start, end) mapped at ``level`` with ``attrs``."""

    start: int
    end: int
    level: str
    attrs: str

    def render(self) -> str:
        size = self.end - self.start
        unit = next((f"{size // u}{name}" for u, name in UNITS if size % u == 0 and size >= u), f"{size}B")
        return f"{self.start:#018x}-{self.end:#018x} {unit:>9}  {self.attrs:<16} {self.level}"


@dataclass
class PtdumpState:
    """struct ptdump_state with the arch's struct pg_state folded in."""

    k: object
    markers: list[tuple[int, str]]                  # address markers ("---[ X ]---")
    check_wx: bool = False
    lines: list[str] = field(default_factory=list)
    ranges: list[PtdumpRange] = field(default_factory=list)
    wx_pages: int = 0
    user_bit: bool = True                           # the arch's PTEs say user or kernel
    # the range being accumulated
    start: int = 0
    level: str | None = None
    attrs: str | None = None
    marker: int = 0


def has_user_bit(k) -> bool:
    """Whether the arch's PTEs tell user from kernel pages (s390x's do not: the kernel
    runs in its own address space)."""
    arch = k.arch
    probe = Entry(Kind.LEAF, paddr=k.page_size, prot=Access.R, user=False)
    return not arch.decode(arch.pte_level, arch.encode(arch.pte_level, probe)).user


def _attrs(st: PtdumpState, val: Entry) -> str | None:
    """The printed attributes of an entry; None for none (a hole)."""
    if val.kind is Kind.NONE:
        return None
    if val.kind is Kind.LEAF:
        bits = ["RW" if val.prot & Access.W else "ro", "x" if val.prot & Access.X else "NX"]
        if st.user_bit:
            bits.insert(0, "USR" if val.user else "KER")
        return " ".join(bits)
    if val.kind is Kind.MIGRATION:
        return "migration"
    if val.kind is Kind.SWAP:
        if is_pte_marker(val):
            return "marker"
        return "hwpoison" if val.swp_type == SWP_HWPOISON else "swap"
    return val.kind.value                               # "bad"


def note_page(st: PtdumpState, addr: int, level: int, val: Entry | None) -> None:
    """note_page(st, addr, level, val): extend the current range or print it and start a
    new one; level -1 with no value flushes the last range (ptdump_walk_pgd's end)."""
    k = st.k
    attrs = None if val is None else _attrs(st, val)
    name = k.arch.levels[level].name if level >= 0 else None
    if attrs is not None and st.check_wx and val.kind is Kind.LEAF and \
            val.prot & Access.W and val.prot & Access.X:
        if not st.wx_pages:                             # WARN_ONCE()
            k.printk(f"WARNING: Found insecure W+X mapping at address {addr:#x}")
        st.wx_pages += k.arch.levels[level].span // k.page_size
    if st.level is not None and (name, attrs) == (st.level, st.attrs) and level >= 0:
        return                                          # same attributes: the range grows
    if st.attrs is not None:                            # print the range that just ended
        rng = PtdumpRange(st.start, addr, st.level, st.attrs)
        st.ranges.append(rng)
        st.lines.append(rng.render())
    while st.marker < len(st.markers) and level >= 0 and addr >= st.markers[st.marker][0]:
        st.lines.append(f"---[ {st.markers[st.marker][1]} ]---")
        st.marker += 1
    st.start, st.level, st.attrs = addr, name, attrs


async def ptdump_pud_entry(entp: int, addr: int, nxt: int, walk: pagewalk.MmWalk) -> int:
    """ptdump_pgd_entry() / ptdump_p4d_entry() / ptdump_pud_entry(): a leaf above the pmd."""
    k = walk.k
    level = walk.level
    note_page(walk.private, addr, level, await pgtable.get_entry(k, entp, level))
    return 0


async def ptdump_pmd_entry(pmdp: int, addr: int, nxt: int, walk: pagewalk.MmWalk) -> int:
    """ptdump_pmd_entry(): READ_ONCE(*pmd); a leaf (huge page, huge vmalloc) or a
    non-present entry (a migration pmd) is a range of its own; a table is descended into."""
    k = walk.k
    val = k.arch.decode(k.arch.pmd_level, await pgtable.pmdp_get_lockless(k, pmdp))
    if val.kind is not Kind.TABLE:
        note_page(walk.private, addr, k.arch.pmd_level, val)
    return 0


async def ptdump_pte_entry(ptep: int, addr: int, nxt: int, walk: pagewalk.MmWalk) -> int:
    """ptdump_pte_entry(): ptep_get_lockless() of every pte, none ones included."""
    k = walk.k
    note_page(walk.private, addr, k.arch.pte_level, await pgtable.get_entry(k, ptep, k.arch.pte_level))
    return 0


async def ptdump_hole(addr: int, nxt: int, walk: pagewalk.MmWalk) -> int:
    """ptdump_hole(): nothing mapped: the current range ends."""
    note_page(walk.private, addr, max(walk.level, 0), None)
    return 0


PTDUMP_OPS = pagewalk.MmWalkOps(pud_entry=ptdump_pud_entry, pmd_entry=ptdump_pmd_entry,
                                pte_entry=ptdump_pte_entry, pte_hole=ptdump_hole)


def address_space_end(k) -> int:
    """The end of what the root table maps."""
    top = k.arch.levels[0]
    return 1 << (top.shift + top.index_bits)


async def ptdump_walk_pgd(k, st: PtdumpState, mm, start: int, end: int) -> int:
    """ptdump_walk_pgd(): walk_page_range_novma() of [start, end) under
    mmap_write_lock(mm), then note_page(st, 0, -1, 0) to print the last range."""
    await mmap_write_lock(mm)
    try:
        err = await pagewalk.walk_page_range_novma(k, mm, start, end, PTDUMP_OPS, st)
    finally:
        await mmap_write_unlock(mm)
    note_page(st, end, -1, None)
    return err


async def ptdump_show(k, mm=None) -> list[str]:
    """The dump of init_mm's kernel half (``mm`` None: kernel_page_tables) or of a user
    mm's user half (x86's page_tables/current_user), one line per range."""
    from mm_core.vmalloc import VMALLOC_START, get_init_mm
    if mm is None:
        mm, start, end = get_init_mm(k), VMALLOC_START(k), address_space_end(k)
        markers = [(start, "vmalloc() Area")]
    else:
        start, end, markers = 0, k.arch.task_size, [(0, "User Space")]
    st = PtdumpState(k, markers, user_bit=has_user_bit(k))
    err = await ptdump_walk_pgd(k, st, mm, start, end)
    return st.lines if err == 0 else [f"error {err}"]


async def ptdump_check_wx(k) -> int:
    """ptdump_check_wx() (CONFIG_DEBUG_WX): walk init_mm and count its W+X pages; the
    result is printed as the kernel does and returned (0: passed)."""
    from mm_core.vmalloc import VMALLOC_START, get_init_mm
    st = PtdumpState(k, [], check_wx=True)
    await ptdump_walk_pgd(k, st, get_init_mm(k), VMALLOC_START(k), address_space_end(k))
    if st.wx_pages:
        k.printk(f"Checked W+X mappings: FAILED, {st.wx_pages} W+X pages found.")
    else:
        k.printk("Checked W+X mappings: passed, no W+X pages found.")
    return st.wx_pages
