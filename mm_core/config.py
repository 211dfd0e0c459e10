"""Semantics profiles by kernel version (see docs/profiles.md).

A profile switches the page-table rules mm_core follows, so the same scenario can be run
under the rules before and after "mm: allow pte_offset_map[_lock]() to fail" (6.5) and
"mm: free retracted page table by RCU" (6.6), and, with 5.10, before "mm: protect
free_pgtables with mmap_lock write lock in exit_mmap" (64591e8605d6, 5.17).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    fallible_pte_map: bool       # 6.5: __pte_offset_map validates the pmd and may fail
    rcu_pte_map: bool            # 6.6: pte_offset_map holds rcu_read_lock until pte_unmap
    pte_free_defer: bool         # 6.6: retracted tables are freed after a grace period
    retract_without_mmap_lock: bool   # 6.6: retract_page_tables under i_mmap + pml + ptl only
    rw_nolock: bool              # 6.13: pte_offset_map_ro_nolock / _rw_nolock
    summary: str
    uffdio_move: bool = False    # 6.8: the UFFDIO_MOVE ioctl (mm/userfaultfd.c move_pages)
    pt_reclaim: bool = False     # 6.14: MADV_DONTNEED frees emptied PTE tables, and the rechecks
                                 # that came with it (move_pages_pte's dst pmd_same)
    # 5.17 (64591e8605d6): exit_mmap() unmaps and frees the tables under mmap_lock; before
    # that it ran with no mmap_lock at all, mm_users == 0 keeping khugepaged out
    exit_mmap_lock: bool = True
    # 5.10: retract_page_tables() clears the pmd under pmd_lock() alone (no ptl, no
    # anon_vma/uffd-wp recheck), relying on mmap_write_trylock() + khugepaged_test_exit()
    retract_pmd_lock_only: bool = False
    # 13ddaf26be32 "mm/swap: fix race when skipping swapcache" (Kairui Song, v6.8, and the
    # 6.6 stable series from 6.6.19): do_swap_page()'s direct swap-in from a
    # SWP_SYNCHRONOUS_IO device pins the slot with swapcache_prepare() (a parallel faulter
    # sleeps a tick and refaults) and drops the pin with swapcache_clear() after mapping
    swapin_skip_swapcache_prepare: bool = True

    @property
    def version(self) -> tuple[int, int]:
        """(major, minor) of the kernel the profile follows ("6.6+custom" -> (6, 6))."""
        major, minor = self.name.split("+")[0].split(".")[:2]
        return int(major), int(minor)


PROFILES = {
    "5.10": Profile("5.10", False, False, False, False, False,
                    "the 6.4 rules, but exit_mmap() without mmap_lock and retract_page_tables() "
                    "under mmap_write_trylock + pmd_lock only (v5.10; see docs/profiles.md)",
                    exit_mmap_lock=False, retract_pmd_lock_only=True, swapin_skip_swapcache_prepare=False),
    "6.4": Profile("6.4", False, False, False, False, False,
                   "pmd_trans_unstable()-style checks; collapse under mmap_write_lock; immediate free",
                   swapin_skip_swapcache_prepare=False),
    "6.5": Profile("6.5", True, False, False, False, False,
                   "fallible pte_offset_map[_lock]; no RCU around the map yet",
                   swapin_skip_swapcache_prepare=False),
    "6.6": Profile("6.6", True, True, True, True, False,
                   "RCU-protected map, pte_free_defer, retract_page_tables without mmap_lock (default)"),
    "6.8": Profile("6.8", True, True, True, True, False,
                   "6.6 plus UFFDIO_MOVE (move_pages_pte maps with pte_offset_map_nolock; 6.8-6.12)",
                   uffdio_move=True),
    "6.13": Profile("6.13", True, True, True, True, True,
                    "6.6 plus pte_offset_map_ro_nolock/_rw_nolock with pmd_same rechecks", uffdio_move=True),
    "6.14": Profile("6.14", True, True, True, True, True,
                    "6.13 plus PT_RECLAIM (MADV_DONTNEED frees empty PTE tables) and move_pages_pte's "
                    "dst pmd_same recheck", uffdio_move=True, pt_reclaim=True),
}
DEFAULT_PROFILE = "6.6"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown kernel profile {name!r}; choose from {', '.join(PROFILES)}") from None
