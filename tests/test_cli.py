"""The `emu` command as a user meets it: output, exit status, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, expected, workload


def emu(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_run_json_has_the_promised_keys() -> None:
    r = emu("run", workload("ppc64", "hello"), "--arch", "ppc64", "--json")
    assert r.returncode == 0
    j = json.loads(r.stdout)
    for key in ("stdout", "exit_code", "instructions", "faults", "tlb_fills", "pt_pages_allocated",
                "pt_pages_freed", "walks", "faults_by_kind", "unknown_syscalls", "seconds", "mips"):
        assert key in j
    assert j["stdout"] == expected("hello")[0].decode() and j["exit_code"] == 0


def test_run_prints_guest_output_then_a_summary() -> None:
    r = emu("run", workload("arm64", "hello"), "x", "--arch", "arm64")
    assert r.returncode == 0
    assert r.stdout.startswith("hello from emu\nargc 2\narg 1: x\n")
    for label in ("instructions", "TLB fills", "page walks", "faults", "page-table pages", "guest MIPS"):
        assert label in r.stderr


def test_arch_is_taken_from_the_elf_when_not_given() -> None:
    r = emu("run", workload("s390x", "qsort"), "--json")
    assert json.loads(r.stdout)["arch"] == "s390x"


def test_segv_exits_139_with_a_report() -> None:
    r = emu("run", workload("x86_64", "segv"), "--arch", "x86_64")
    assert r.returncode == 139
    assert "SIGSEGV (SEGV_MAPERR) at address 0x" in r.stderr
    assert "mov" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path, message", [
    ("/nonexistent/prog", "no such file"),
    ("README.md", "not an ELF file"),
    ("docs", "is a directory"),
])
def test_bad_files_get_one_line(path: str, message: str) -> None:
    assert message in one_line_error(emu("run", path, "--arch", "arm64"))


def test_truncated_elf_gets_one_line(tmp_path) -> None:
    data = open(workload("x86_64", "hello"), "rb").read()
    for cut in (20, 100, len(data) // 2):
        p = tmp_path / f"cut{cut}"
        p.write_bytes(data[:cut])
        assert "truncated" in one_line_error(emu("run", str(p)))


def test_wrong_arch_gets_one_line_naming_the_right_one() -> None:
    line = one_line_error(emu("run", workload("x86_64", "hello"), "--arch", "arm64"))
    assert "x86_64 executable" in line and "--arch x86_64" in line


def test_dynamic_executable_is_refused() -> None:
    if not os.path.exists("/bin/true"):
        pytest.skip("no /bin/true")
    assert "static" in one_line_error(emu("run", "/bin/true"))


def test_bad_options_exit_2() -> None:
    r = emu("run", workload("x86_64", "hello"), "--arch", "riscv64")
    assert r.returncode == 2 and "unknown arch" in r.stderr and "Traceback" not in r.stderr
    r = emu("run", workload("x86_64", "hello"), "--mem", "lots")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = emu("run", workload("x86_64", "hello"), "--kernel", "2.6")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_kernel_510_profile_is_accepted() -> None:
    r = emu("run", workload("x86_64", "hello"), "--kernel", "5.10", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kernel"] == "5.10"


def test_plugins_list_shows_four_builtin_arches() -> None:
    r = emu("plugins", "list", "--json")
    j = json.loads(r.stdout)
    for name in ("x86_64", "arm64", "s390x", "ppc64"):
        assert j[name]["source"] == "built-in"
    assert "pmd:9" in j["x86_64"]["geometry"] and "pte:8" in j["s390x"]["geometry"]


def test_demo_runs_every_workload_on_four_arches_with_identical_output() -> None:
    r = emu("demo", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert set(j["same_output"]) == {"hello", "pagetouch", "qsort", "segv", "shmem_collapse", "forktest",
                                     "vmops"}
    assert j["results"]["shmem_collapse"]["ppc64"]["pt_tables_rcu_deferred"] >= 2
    assert all(j["same_output"].values())
    assert j["results"]["segv"]["s390x"]["exit_code"] == 139


def test_arch_options_reach_the_plugin() -> None:
    r = emu("run", workload("ppc64", "hello"), "-O", "page_size=64K", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pt_pages_allocated"] % 16 == 0
    line = one_line_error(emu("run", workload("ppc64", "hello"), "-O", "la57=true"))
    assert "unknown option" in line
