"""Plugin manager: built-in and third-party plugins, all through the ``emu`` entry points."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import cache

import pluggy

from emu import hookspecs
from emu.arch import ArchSpec

ENTRY_POINT_GROUP = "emu"
BUILTIN_DIST = "emu-mmu"


class PluginError(Exception):
    """A plugin could not be loaded or does not honour the contract."""


@dataclass(frozen=True)
class ArchInfo:
    name: str
    cls: type[ArchSpec]
    plugin: str          # plugin (entry point) name
    source: str          # "built-in" or "entry point (<distribution>)"


_sources: dict[str, str] = {}          # plugin name -> where it came from
broken: dict[str, str] = {}            # plugin name -> why it could not be loaded


@cache
def manager() -> pluggy.PluginManager:
    """The plugin manager, with every plugin of the ``emu`` entry-point group loaded.

    Entry points are loaded one by one (rather than with
    ``load_setuptools_entrypoints``) so that one broken third-party plugin is reported
    by ``emu plugins list`` instead of taking the whole command down.
    """
    pm = pluggy.PluginManager("emu")
    pm.add_hookspecs(hookspecs)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure is the plugin's
            broken[ep.name] = f"{type(err).__name__}: {err}"
            continue
        pm.register(plugin, name=ep.name)
        dist = ep.dist.name if ep.dist is not None else "?"
        _sources[ep.name] = "built-in" if dist == BUILTIN_DIST else f"entry point ({dist})"
    return pm


def _source(pm: pluggy.PluginManager, plugin_name: str) -> str:
    return _sources.get(plugin_name, "registered")


def arches() -> dict[str, ArchInfo]:
    """Every arch any plugin provides, by name."""
    pm = manager()
    found: dict[str, ArchInfo] = {}
    for impl in pm.hook.emu_arch_specs.get_hookimpls():
        for cls in impl.function() or []:
            if not (isinstance(cls, type) and issubclass(cls, ArchSpec)):
                raise PluginError(f"plugin {impl.plugin_name!r} returned {cls!r}, not an ArchSpec subclass")
            if cls.name in found:
                raise PluginError(f"arch {cls.name!r} provided twice "
                                  f"({found[cls.name].plugin}, {impl.plugin_name})")
            found[cls.name] = ArchInfo(cls.name, cls, impl.plugin_name, _source(pm, impl.plugin_name))
    return dict(sorted(found.items()))


def get_arch(name: str, **options: object) -> ArchSpec:
    """An instance of the arch called ``name`` (with its options)."""
    known = arches()
    if name not in known:
        raise PluginError(f"unknown arch {name!r}; known: {', '.join(known)}")
    return known[name].cls(**options)


def arch_for_elf(e_machine: str, big_endian: bool) -> str | None:
    answer = manager().hook.emu_arch_for_elf(e_machine=e_machine, big_endian=big_endian)
    if answer:
        return answer
    for info in arches().values():
        if info.cls.elf_machine == e_machine and info.cls.big_endian == big_endian:
            return info.name
    return None
