"""Shared fixtures: the four built-in arches and the committed guest workloads."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHES = ["x86_64", "arm64", "s390x", "ppc64"]


def workload(arch: str, name: str) -> str:
    path = os.path.join(ROOT, "workloads", "bin", arch, name)
    if not os.path.exists(path):
        pytest.fail(f"missing workload ELF {path} (run `make guests`)")
    return path


def expected(name: str) -> tuple[bytes, int]:
    base = os.path.join(ROOT, "workloads", "expected", name)
    with open(base + ".out", "rb") as f:
        out = f.read()
    with open(base + ".rc") as f:
        rc = int(f.read().strip())
    return out, rc


@pytest.fixture(params=ARCHES)
def arch(request) -> str:
    return request.param
