"""The injectable bugs (``--inject``): each re-creates a historical (or a what-if) way to get
the rules wrong, and some scenario's ``catches`` names it.
"""
from __future__ import annotations

BUGS: dict[str, str] = {
    "retract_without_pte_free_defer":
        "retract_page_tables() frees the detached table at once (pte_free) instead of after "
        "an RCU grace period (pte_free_defer)",
    "pte_offset_map_without_rcu":
        "pte_offset_map() does not hold rcu_read_lock() until pte_unmap() (the 6.5 state)",
    "retract_without_mmap_lock":
        "retract_page_tables() without mmap_write_trylock under pre-6.6 rules: with "
        "--kernel 6.4 this is the lockless retraction the 6.5/6.6 series made safe",
    "collapse_pte_mapped_thp_without_uffd_fix":
        "collapse_pte_mapped_thp() drops the ptl between emptying the table and clearing "
        "the pmd (before a98460494b16): UFFDIO_COPY can put an anon pte in between",
    "walker_ignores_map_failure":
        "zap_pmd_range() ignores a failed pte_offset_map_lock() and walks its first "
        "snapshot of the pmd",
    "pte_offset_map_lock_without_recheck":
        "pte_offset_map_lock() takes the ptl but does not recheck pmd_same()",
    "retract_without_anon_vma_recheck":
        "retract_page_tables() checks vma->anon_vma only before taking pml and ptl, not again "
        "under them: a UFFDIO_COPY in between leaves an anon pte in the retracted table",
    "proc_walker_misses_migration_pmd":
        "the /proc walkers (smaps, pagemap, clear_refs, PAGEMAP_SCAN) test only pmd_trans_huge() "
        "before pte_offset_map_lock(), not is_swap_pmd(): a migration pmd fails the map and "
        "ACTION_AGAIN repeats for as long as the migration lasts (a what-if: 6.6 takes it "
        "under pmd_trans_huge_lock())",
    "damon_endless_again":
        "DAMON's damon_mkold_pmd_entry() answers a failed pte_offset_map_lock() with "
        "ACTION_AGAIN (before the 2025 fix): endless on a pmd that stays a migration entry",
    "move_normal_pmd_without_recheck":
        "mremap's move_normal_pmd() trusts the pmd it read before taking the rmap locks "
        "(before Jann Horn's 2024 fix): a pmd retracted meanwhile is moved as pfn 0",
    "pte_lockptr_from_live_pmd":
        "pte_offset_map_lock() and pte_offset_map_nolock() derive the ptl from the live pmd "
        "read again after the map (the pre-6.5 pte_lockptr(mm, pmd)) instead of from the "
        "snapshot they validated: after a retraction that is pfn 0's or a THP head's \"lock\"",
    "novma_walk_maps_user_table_as_kernel":
        "walk_pte_range() of a no-VMA walk (ptdump) reaches a user mm's PTE table with "
        "pte_offset_kernel(), as for init_mm: no validation of the pmd, no RCU read section, "
        "nothing to fail (a what-if of patch 10 of the 6.5 series getting its test wrong): a "
        "retracted table is read after it is freed",
    "split_huge_pmd_clears_pmd":
        "__split_huge_pmd_locked() clears an anon THP's pmd (pmdp_huge_clear_flush) instead of "
        "pmdp_invalidate() before populating the table: a concurrent zap under mmap_read_lock "
        "sees pmd_none() and skips the range (the race class ced108037c2a and 58ceeb6bec86 "
        "fixed for change_huge_pmd and MADV_FREE, 2017; a what-if for the split)",
    "move_ptes_without_pmd_same":
        "move_ptes() under 6.13 writes into the table from pte_offset_map_rw_nolock() without "
        "the pmd_same() recheck Qi Zheng added (retract_page_tables() may free that table "
        "without mmap_lock); found by the walker-contract check, run with --kernel 6.13",
    "fork_copies_file_vma_without_anon_vma":
        "fork's vma_needs_copy() without its anon_vma test: the page tables of a shared file "
        "VMA are copied, so copy_pte_range() is no longer kept apart from retract_page_tables() "
        "(which skips only VMAs with an anon_vma) and its pte_alloc_map_lock() of the child's "
        "fresh table can fail: a spurious -ENOMEM from fork",
    "move_pages_pte_unmaps_stack_copy":
        "UFFDIO_MOVE's move_pages_pte() ends its maps with pte_unmap(&orig_src_pte) and "
        "pte_unmap(&orig_dst_pte), the stack copies, before sleeping on a contended folio lock "
        "(before 927e926d72d9, 2025): the kmap_local slots leak under HIGHPTE; run with --kernel 6.13",
    "move_pages_pte_unmaps_in_map_order":
        "move_pages_pte() unmaps dst_pte before src_pte at its exit although it mapped dst first "
        "(before \"mm/userfaultfd: fix kmap_local LIFO ordering for CONFIG_HIGHPTE\", 2025): "
        "kunmap_local() out of LIFO order; run with --kernel 6.13",
    "move_pages_reads_folio_of_non_present_pmd":
        "UFFDIO_MOVE's move_pages() takes pmd_folio() of the src pmd on its split path without "
        "testing pmd_present() (before \"userfaultfd: fix a crash when UFFDIO_MOVE handles a "
        "THP hole\", 2025): a THP under migration (a migration pmd) makes it dereference a "
        "page from swap bits; run with --kernel 6.8",
    "move_pages_pte_without_dst_pmd_recheck":
        "move_pages_pte() under 6.14 (PT_RECLAIM) trusts pte_same() of its none dst pte and "
        "does not recheck pmd_same() of dst (before \"mm: userfaultfd: recheck dst_pmd entry in "
        "move_pages_pte()\"): the page is moved into a table MADV_DONTNEED just freed; run "
        "with --kernel 6.14",
    "gup_fast_maps_live_pmd":
        "GUP-fast's gup_pte_range() maps the PTE table through the live pmd with no validation "
        "(pmd_page(*pmdp), the pre-6.5 pte_offset_map()) instead of pte_offset_map(&pmd) on the "
        "stack copy it checked: after a retraction it dereferences pmd_page() of a none (pfn 0) "
        "or huge pmd (spec §6 case 15)",
    "gup_fast_without_pmd_recheck":
        "gup_pte_range() rechecks only the pte after taking the page, not the pmd (before "
        "70cbc3cc78a9, 2022): collapse_huge_page() has cleared the pmd and passed its refcount "
        "check, and GUP-fast pins a page from the detached table that the collapse then replaces",
    "retract_without_uffd_wp_recheck":
        "retract_page_tables() checks userfaultfd_wp(vma) only before taking pml and ptl, not "
        "again under them: a UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT in between puts uffd-wp "
        "markers in the table it then retracts, and the protection is gone",
    "handle_userfault_checks_before_queueing":
        "handle_userfault() runs userfaultfd_must_wait() before putting the task on "
        "fault_pending_wqh instead of after: a UFFDIO_COPY in between installs the page and "
        "finds nobody to wake (waitqueue_active() is false), the fault then sleeps forever",
    "lru_gen_walk_without_rcu":
        "MGLRU's walk_mm() without the rcu_read_lock() of mem_cgroup_trylock_pages() (gone "
        "with \"mm: memcg: no need for memcg locking for MGLRU\", the 6.13 profile's state): "
        "walk_pte_range() maps walk_pmd_range()'s stack copy of a pmd whose table was "
        "retracted and freed after the read",
    "retract_without_exit_test":
        "retract_page_tables() without the khugepaged_test_exit() after mmap_write_trylock() "
        "(before 18e77600f7a1): under 5.10 it frees the table exit_mmap() is zapping without "
        "mmap_lock; run with --kernel 5.10",
    "free_swap_and_cache_without_get_swap_device":
        "free_swap_and_cache() without get_swap_device()/put_swap_device() around its work "
        "(before 82b1c07a0af6, 6.9, \"mm: swap: fix race between free_swap_and_cache() and "
        "swapoff()\"): once it drops the count, swapoff can free the cache-only slot, finish "
        "and free swap_map under it",
    "do_swap_page_without_pte_same":
        "do_swap_page() maps the swap-cache folio under the ptl without the pte_same() recheck "
        "against the swap pte it read locklessly: a second faulter maps the page again over "
        "the first's mapping (rss counted twice, the swap count dropped twice)",
    "do_swap_page_skip_swapcache_without_swapcache_prepare":
        "do_swap_page()'s direct swap-in from a SWP_SYNCHRONOUS_IO device without the "
        "swapcache_prepare() pin (before 13ddaf26be32, \"mm/swap: fix race when skipping "
        "swapcache\", 6.8 and 6.6.19; the 6.6.0 text): two faulters read the entry into two "
        "folios, the first maps and frees the slot, a swap-out reuses it for the same entry, "
        "and the second's pte_same() passes: it maps its stale copy",
    "shmem_swapin_range_reads_under_rcu":
        "a what-if: MADV_WILLNEED's shmem_swapin_range() calls read_swap_cache_async() inside "
        "its xas_for_each() RCU section, without xas_pause() + rcu_read_unlock(): the read "
        "sleeps there when swapcache_prepare() finds another reader's SWAP_HAS_CACHE "
        "(schedule_timeout_uninterruptible())",
    "hmm_driver_skips_read_retry":
        "a mirroring driver (lib/test_hmm.c's dmirror_range_fault()) programs its device page "
        "table from hmm_range_fault()'s pfns without checking mmu_interval_read_retry() under "
        "the mutex its invalidate callback takes: an unmap / retract that ran after the walk "
        "leaves the device mapping pages the CPU no longer maps there",
    "change_pte_range_ignores_map_failure":
        "mprotect's change_pte_range() has no failure path for pte_offset_map_lock() (instead of "
        "-EAGAIN -> RETRY): it goes on into the PTE table its pmd named, a table "
        "retract_page_tables() detached and may have freed",
    "mlock_pte_range_ignores_map_failure":
        "mlock_pte_range() ignores a failed pte_offset_map_lock() (instead of ACTION_AGAIN) and "
        "walks the table its pmd read named, detached and perhaps freed by retract_page_tables()",
    "madvise_cold_uses_stale_pmd":
        "madvise_cold_or_pageout_pte_range() answers a failed pte_offset_map_lock() by walking "
        "the table of the pmd it read first (instead of SKIP), without rcu_read_lock or ptl",
    "gather_pte_stats_ignores_map_failure":
        "numa_maps' gather_pte_stats() ignores a failed pte_offset_map_lock() (instead of "
        "ACTION_AGAIN) and reads the table its pmd read named, after retract_page_tables() freed it",
    "change_huge_pmd_keeps_writable_migration_entry":
        "mprotect's change_huge_pmd() leaves a writable THP migration entry as it is (without "
        "its \"be safe and disable write\" branch): remove_migration_pmd() then maps the THP "
        "writable again after mprotect(PROT_READ) returned",
    "hwpoison_pte_range_ignores_map_failure":
        "memory-failure's hwpoison_pte_range() goes on into the table its pmd read named after "
        "a failed pte_offset_map_lock() (instead of SKIP, goto out) while kill_accessing_process() "
        "looks for the poisoned pfn",
    "queue_folios_pte_range_ignores_map_failure":
        "mbind's queue_folios_pte_range() goes on into the table its pmd read named after a "
        "failed pte_offset_map_lock() (instead of ACTION_AGAIN) while retract_page_tables() "
        "frees it",
    "madvise_free_ignores_map_failure":
        "MADV_FREE's madvise_free_pte_range() goes on into the table its pmd read named after a "
        "failed pte_offset_map_lock() (instead of SKIP, return 0): under 6.14 a racing "
        "MADV_DONTNEED's PT_RECLAIM freed it; run with --kernel 6.14",
    "break_ksm_pmd_entry_ignores_map_failure":
        "KSM's break_ksm_pmd_entry() reads the pte in the table its pmd read named after a failed "
        "pte_offset_map_lock() (instead of SKIP, \"no KSM page here\"): under 6.14 a racing "
        "MADV_DONTNEED's PT_RECLAIM freed it; run with --kernel 6.14",
    "follow_page_pte_ignores_map_failure":
        "follow_page_pte() reads the pte in the table its pmd read named after a failed "
        "pte_offset_map_lock() (instead of no_page_table(): NULL): under 6.14 a racing "
        "MADV_DONTNEED's PT_RECLAIM freed it while ksmd's scan (follow_page) looked; run with "
        "--kernel 6.14",
    "perf_get_page_size_without_irqs_off":
        "perf_get_page_size() walks without local_irq_save(): pte_offset_map(&pmd)'s own "
        "rcu_read_lock() comes after pmdp_get_lockless(), so the stack copy can name a table "
        "retract_page_tables()' pte_free_defer() freed in between",
}


# Bugs that only exist under another kernel profile than the default 6.6.
BUG_KERNELS = {"retract_without_mmap_lock": "6.4", "move_ptes_without_pmd_same": "6.13",
               "move_pages_pte_unmaps_stack_copy": "6.13", "move_pages_pte_unmaps_in_map_order": "6.13",
               "move_pages_pte_without_dst_pmd_recheck": "6.14", "retract_without_exit_test": "5.10",
               "madvise_free_ignores_map_failure": "6.14", "break_ksm_pmd_entry_ignores_map_failure": "6.14",
               "follow_page_pte_ignores_map_failure": "6.14",
               "move_pages_reads_folio_of_non_present_pmd": "6.8"}


PROFILE_BUGS = {"retract_without_mmap_lock": {"retract_without_mmap_lock": True},
                "do_swap_page_skip_swapcache_without_swapcache_prepare":
                    {"swapin_skip_swapcache_prepare": False}}
