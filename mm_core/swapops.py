"""PTE markers (include/linux/swapops.h, mm_inline.h): non-present ptes that carry a
per-pte hint instead of a swap location. A marker is a swap entry of type SWP_PTE_MARKER
whose offset holds the marker bits, encoded by each arch's swap-pte format.

PTE_MARKER_UFFD_WP is created by UFFDIO_WRITEPROTECT of a none pte in a file VMA (and an
anon one with WP_UNPOPULATED), CONFIG_PTE_MARKER_UFFD_WP, which needs
HAVE_ARCH_USERFAULTFD_WP; PTE_MARKER_POISONED by UFFDIO_POISON (6.6, every arch: the fault
on it is VM_FAULT_HWPOISON). The same bit as a swap-in error marker (PTE_MARKER_SWAPIN_ERROR
before 6.6, from unuse_pte()) is not made here.
"""
from __future__ import annotations

from emu.arch import SWP_PTE_MARKER, Entry, Kind, swap_entry

PTE_MARKER_UFFD_WP = 1 << 0
PTE_MARKER_POISONED = 1 << 1        # PTE_MARKER_SWAPIN_ERROR before 6.6
PTE_MARKER_MASK = (1 << 2) - 1


def make_pte_marker(marker: int) -> Entry:
    """make_pte_marker(): swp_entry(SWP_PTE_MARKER, marker) as a pte."""
    return swap_entry(SWP_PTE_MARKER, marker)


def is_pte_marker(ent: Entry) -> bool:
    """is_pte_marker(): a non-present pte holding a marker."""
    return ent.kind is Kind.SWAP and ent.swp_type == SWP_PTE_MARKER


def pte_marker_get(ent: Entry) -> int:
    return ent.swp_offset & PTE_MARKER_MASK


def pte_marker_uffd_wp(ent: Entry) -> bool:
    """pte_marker_uffd_wp(): the pte is a uffd-wp marker."""
    return is_pte_marker(ent) and bool(pte_marker_get(ent) & PTE_MARKER_UFFD_WP)


def pte_none_mostly(ent: Entry) -> bool:
    """pte_none_mostly(): none, or a marker (a none pte with a hint)."""
    return ent.kind is Kind.NONE or is_pte_marker(ent)
