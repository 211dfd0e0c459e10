"""The emu plugin contract: the arch author's manual.

Plugins are modules or objects with functions marked ``@emu.hookimpl``. They are found
through the entry-point group ``emu`` (the four built-in arches register exactly that
way, see pyproject.toml) or registered by hand with ``emu.plugins.manager().register``.

A minimal arch plugin::

    import emu
    from emu.arch import ArchSpec

    class Riscv64(ArchSpec):
        name = "riscv64"
        ...

    @emu.hookimpl
    def emu_arch_specs():
        return [Riscv64]

``emu plugins check NAME`` runs the conformance kit (``emu.testing``) against it.
"""
from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("emu")
hookimpl = pluggy.HookimplMarker("emu")


@hookspec
def emu_arch_specs() -> list[type]:
    """Return the :class:`emu.arch.ArchSpec` subclasses this plugin provides.

    Called once when the plugin manager is built. Every result of every plugin is
    collected; two classes with the same ``name`` are an error reported by
    ``emu plugins list``.
    """


@hookspec(firstresult=True)
def emu_arch_for_elf(e_machine: str, big_endian: bool) -> str | None:
    """Name the arch that runs an ELF file with this ``e_machine`` and byte order.

    Return an arch name, or None to let other plugins answer. The first non-None
    answer wins; without one, emu matches ``ArchSpec.elf_machine`` and endianness.
    """


@hookspec
def emu_register_commands(cli: Any) -> None:
    """Add subcommands to the ``emu`` click group ``cli``."""
