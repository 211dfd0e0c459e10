"""The conformance kit passes on every built-in arch and catches a broken plugin."""
from __future__ import annotations

import subprocess
import sys

import pytest

from arch_plugins.x86_64 import X86_64
from emu import plugins
from emu.arch import Entry, Kind
from emu.testing import ArchConformance, run_checks


class TestX86_64(ArchConformance):
    arch_name = "x86_64"


class TestX86_64_LA57(ArchConformance):
    arch_name = "x86_64"
    arch_options = {"la57": True}


class TestArm64(ArchConformance):
    arch_name = "arm64"


class TestArm64Hafdbs(ArchConformance):
    arch_name = "arm64"
    arch_options = {"hafdbs": True}


class TestS390x(ArchConformance):
    arch_name = "s390x"


class TestPpc64(ArchConformance):
    arch_name = "ppc64"


class ForgetsDirty(X86_64):
    """A deliberately broken arch: its encoder drops the dirty bit."""

    name = "x86_64-broken"

    def encode(self, level: int, entry: Entry) -> int:
        if entry.kind is Kind.LEAF:
            entry = entry.with_(dirty=False)
        return super().encode(level, entry)


class NeverFaults(X86_64):
    """A deliberately broken arch: its walk ignores the not-present bit."""

    name = "x86_64-nofault"

    def walk(self, root, va, access):
        result = yield from super().walk(root, va, access)
        if result.__class__.__name__ == "Fault":
            from emu.arch import Access, Translation
            return Translation(0, 4096, Access.RWX, 3, 0)
        return result


def test_kit_catches_an_encoder_that_loses_bits() -> None:
    failed = {r.name for r in run_checks(ForgetsDirty()) if not r.ok}
    assert "round_trips" in failed


def test_kit_catches_a_walk_that_never_faults() -> None:
    failed = {r.name for r in run_checks(NeverFaults()) if not r.ok}
    assert {"walk_faults_on_none_at_every_level", "walk_enforces_protection"} <= failed


def test_builtin_arches_come_from_the_entry_point_group() -> None:
    found = plugins.arches()
    for name in ("x86_64", "arm64", "s390x", "ppc64"):
        assert found[name].source == "built-in"
        assert found[name].plugin == name


def test_a_plugin_registered_by_hand_is_listed() -> None:
    import emu

    class Plugin:
        @emu.hookimpl
        def emu_arch_specs(self):
            return [ForgetsDirty]

    pm = plugins.manager()
    plugin = Plugin()
    pm.register(plugin, name="broken-demo")
    try:
        assert plugins.arches()["x86_64-broken"].source == "registered"
        assert plugins.arch_for_elf("EM_X86_64", False) == "x86_64"   # built-in still claims x86 ELFs
    finally:
        pm.unregister(plugin)


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(plugins.PluginError, match="unknown arch 'riscv64'"):
        plugins.get_arch("riscv64")


def test_unknown_arch_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        plugins.get_arch("s390x", la57=True)


def test_emu_plugins_check_command() -> None:
    r = subprocess.run([sys.executable, "-m", "emu", "plugins", "check", "ppc64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ppc64: 10 passed, 0 failed" in r.stdout


class TestPpc64_64K(ArchConformance):
    arch_name = "ppc64"
    arch_options = {"page_size": "64K"}


class TestS390xFullPagePte(ArchConformance):
    arch_name = "s390x"
    arch_options = {"full_page_pte": True}
