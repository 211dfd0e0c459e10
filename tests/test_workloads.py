"""Real guest programs on the four arches: same output as Linux (qemu-user) gave."""
from __future__ import annotations

import pytest
from conftest import ARCHES, expected, workload

from emu.machine import Machine

PROGRAMS = ["hello", "pagetouch", "qsort", "segv", "nosys", "forktest"]


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("arch_name", ARCHES)
def test_workload_matches_linux_output(arch_name: str, name: str) -> None:
    out, rc = expected(name)
    m = Machine(arch=arch_name, mem="32M")
    m.spawn(workload(arch_name, name), [name])
    r = m.run()
    assert r.stdout == out
    assert r.exit_code == rc


@pytest.mark.parametrize("arch_name", ARCHES)
def test_every_page_and_table_is_freed_at_exit(arch_name: str) -> None:
    m = Machine(arch=arch_name, mem="32M")
    m.spawn(workload(arch_name, "pagetouch"), ["pagetouch"])
    s = m.run().summary
    assert s["pt_pages_allocated"] > 0
    assert s["pt_pages_allocated"] == s["pt_pages_freed"]
    assert s["pt_tables_allocated"] == s["pt_tables_freed"]
    assert m.kernel.alloc.pages.keys() == {m.kernel.zero_page.pfn}   # only the zero page is left


@pytest.mark.parametrize("arch_name", ARCHES)
def test_translations_come_from_plugin_walks(arch_name: str) -> None:
    m = Machine(arch=arch_name, mem="32M")
    m.spawn(workload(arch_name, "pagetouch"), ["pagetouch"])
    s = m.run().summary
    assert s["walks"] >= 256                   # every touched page was walked at least once
    assert s["walk_reads"] >= s["walks"] * (len(m.arch.levels) - 1)
    assert s["tlb_fills"] >= s["walks"]
    assert s["faults"] >= 256                  # demand paging through mm_core
    assert s["instructions"] > 5_000


@pytest.mark.parametrize("arch_name", ARCHES)
def test_segv_reports_signal_address_pc_and_instruction(arch_name: str) -> None:
    m = Machine(arch=arch_name, mem="32M")
    m.spawn(workload(arch_name, "segv"), ["segv"])
    r = m.run()
    assert r.exit_code == 139
    sig = r.signal
    assert sig.name == "SIGSEGV" and sig.code == "SEGV_MAPERR" and sig.access == "write"
    assert sig.address is not None and sig.address % 4096 == 0
    with pytest.raises(ValueError, match="has exited"):
        m.translate(m.processes[0].mm, sig.address)
    assert "(" in sig.instruction and "not readable" not in sig.instruction
    assert f"{sig.pc:#x}" in sig.format()


@pytest.mark.parametrize("arch_name", ARCHES)
def test_unknown_syscall_returns_enosys_and_is_counted(arch_name: str) -> None:
    m = Machine(arch=arch_name, mem="32M")
    m.spawn(workload(arch_name, "nosys"), ["nosys"])
    r = m.run()
    assert r.stdout == b"syscall 999 returned -38\n"
    assert r.summary["unknown_syscalls"] == {"#999": 1}


def test_argv_reaches_the_guest() -> None:
    m = Machine(arch="s390x", mem="32M")
    m.spawn(workload("s390x", "hello"), ["hello", "one", "two"])
    out = m.run().stdout.decode()
    assert "argc 3\narg 1: one\narg 2: two\n" in out


@pytest.mark.parametrize("policy", ["round-robin", "timed"])
def test_two_processes_on_two_vcpus_interleave_and_both_finish(policy: str) -> None:
    m = Machine(arch="x86_64", mem="32M", cpus=2, policy=policy, quantum=5000)
    a = m.spawn(workload("x86_64", "qsort"), ["qsort"])
    b = m.spawn(workload("x86_64", "pagetouch"), ["pagetouch"])
    m.run()
    assert a.stdout == expected("qsort")[0] and b.stdout == expected("pagetouch")[0]
    assert m.scheduler.switches > 10          # the quanta really interleaved


@pytest.mark.parametrize("arch_name", ARCHES)
def test_stepped_hardware_walks_give_the_same_results(arch_name: str) -> None:
    """With walks="stepped" every table read of the MMU is a scheduling point."""
    m = Machine(arch=arch_name, mem="32M", walks="stepped")
    m.spawn(workload(arch_name, "pagetouch"), ["pagetouch"])
    r = m.run()
    assert r.stdout == expected("pagetouch")[0]
    assert m.scheduler.traps > r.summary["walk_reads"] >= 256 * (len(m.arch.levels) - 1)


@pytest.mark.parametrize("arch_name", ARCHES)
def test_more_processes_than_vcpus_share_them_by_context_switching(arch_name: str) -> None:
    m = Machine(arch=arch_name, mem="32M", cpus=1, quantum=3000)
    a = m.spawn(workload(arch_name, "qsort"), ["qsort"])
    b = m.spawn(workload(arch_name, "pagetouch"), ["pagetouch"])
    c = m.spawn(workload(arch_name, "hello"), ["hello", "x"])
    m.run()
    assert a.stdout == expected("qsort")[0] and b.stdout == expected("pagetouch")[0]
    assert c.stdout.startswith(b"hello from emu\nargc 2\n")
    assert len(m.vcpus) == 1 and m.kernel.stats["context_switches"] > 10


@pytest.mark.parametrize("arch_name", ARCHES)
def test_collapse_race_threads_on_four_vcpus(arch_name: str) -> None:
    """clone, futex join, sched_yield; MADV_COLLAPSE retracting tables under threads that
    keep reading and writing the range; the guest verifies every word."""
    m = Machine(arch=arch_name, mem="64M", cpus=4, quantum=5000)
    m.spawn(workload(arch_name, "collapse_race"), ["collapse_race"])
    r = m.run()
    assert (r.stdout, r.exit_code) == (expected("collapse_race")[0], 0)
    assert m.kernel.stats["threads_created"] == 3 and len(m.vcpus) == 4
    assert r.summary["pt_tables_rcu_deferred"] >= 1


def test_threads_outnumbering_vcpus_share_one() -> None:
    m = Machine(arch="ppc64", mem="64M", cpus=1, quantum=3000)
    m.spawn(workload("ppc64", "collapse_race"), ["collapse_race", "3"])
    r = m.run()
    assert r.exit_code == 0 and b"mismatches 0\n" in r.stdout and len(m.vcpus) == 1


@pytest.mark.parametrize("arch_name", ARCHES)
@pytest.mark.parametrize("kernel", ["6.6", "6.13"])
def test_vmops_checks_the_mm_syscalls_through_mincore_pagemap_and_smaps(arch_name: str, kernel: str) -> None:
    """mmap, madvise (DONTNEED, COLD, FREE, PAGEOUT), mprotect, mremap, mlock, mincore and
    the guest's own /proc/self/{pagemap,smaps,clear_refs} (openat, read, pread64, write):
    the program checks every step itself; its output is the same on every arch."""
    out, rc = expected("vmops")
    m = Machine(arch=arch_name, mem="32M", kernel=kernel)
    p = m.spawn(workload(arch_name, "vmops"), ["vmops"])
    r = m.run()
    assert r.stdout == out and r.exit_code == rc == 0, r.stdout.decode()
    for name in ("openat", "pread64", "read", "mremap", "mincore", "mlock", "madvise", "mprotect"):
        assert p.syscalls[name] > 0, name
    assert m.kernel.stats["lazyfree_discarded"] == 1 and m.kernel.stats["lazyfree_redirtied"] == 1


@pytest.mark.parametrize("arch_name", ARCHES)
def test_fork_copies_the_mm_and_wait4_reaps_the_children(arch_name: str) -> None:
    """clone(SIGCHLD) goes through dup_mmap (copy_pte_range), the child's writes are
    copy-on-write, both processes' mms and tables are gone at the end."""
    m = Machine(arch=arch_name, mem="32M")
    p = m.spawn(workload(arch_name, "forktest"), ["forktest"])
    r = m.run()
    stats = m.kernel.stats
    assert r.exit_code == 0 and stats["processes_forked"] == stats["forks"] == 2
    assert stats["copy_pte_range"] >= 1
    children = [c for c in m.processes if c.parent is p]
    assert [c.exit_code for c in children] == [7, 0] and all(c.reaped and c.mm.dead for c in children)
    assert m.kernel.alloc.pages.keys() == {m.kernel.zero_page.pfn}


@pytest.mark.parametrize("arch_name", ARCHES)
def test_uffdtest_handler_thread_resolves_missing_faults_with_uffdio_copy(arch_name: str) -> None:
    """userfaultfd(2) from a guest: UFFDIO_API / REGISTER, a handler thread read()s each
    fault's uffd_msg and answers it with UFFDIO_COPY while the faulting thread sleeps in
    handle_userfault(); then UFFDIO_ZEROPAGE (again: -EEXIST) and the error cases. qemu-user
    7.2 has no userfaultfd (-ENOSYS), so the expected output is emu's, the same on every
    arch and checked by the program itself (bad_words 0, copy_errors 0)."""
    out, rc = expected("uffdtest")
    m = Machine(arch=arch_name, mem="32M")
    p = m.spawn(workload(arch_name, "uffdtest"), ["uffdtest"])
    r = m.run()
    assert r.stdout == out and r.exit_code == rc == 0, r.stdout.decode()
    stats = m.kernel.stats
    # each of the four pages: one fault queued, read once, slept on, woken by the copy
    assert stats["handle_userfault_missing"] == stats["uffd_msgs_read"] == 4
    assert stats["uffd_fault_waits"] == stats["uffd_woken"] == stats["uffdio_copy"] == 4
    assert p.syscalls["userfaultfd"] == 3 and p.syscalls["ioctl"] >= 10
