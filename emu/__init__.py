"""emu: a plugin-based architecture emulator with pluggable MMUs and a Linux mm model.

    import emu
    m = emu.Machine(arch="arm64", mem="256M")
    mm = m.new_mm()
    va = m.mmap(mm, 0, 1 << 20, emu.PROT_READ | emu.PROT_WRITE, emu.MAP_PRIVATE | emu.MAP_ANONYMOUS)
    pa = m.touch(mm, va, write=True)
"""
from typing import Any

from emu.hookspecs import hookimpl
from mm_core.madvise import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
)
from mm_core.mmap import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from mm_core.userfaultfd import (
    UFFD_FEATURE_POISON,
    UFFD_FEATURE_SIGBUS,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_CONTINUE_MODE_WP,
    UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_COPY_MODE_WP,
    UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
    UFFDIO_POISON_MODE_DONTWAKE,
    UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
    UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    UFFDIO_WRITEPROTECT_MODE_WP,
)

__version__ = "0.1.0"
__all__ = ["Machine", "GuestAccessError", "hookimpl", "__version__", "PROT_NONE", "PROT_READ",
           "PROT_WRITE", "PROT_EXEC", "MAP_SHARED", "MAP_PRIVATE", "MAP_FIXED", "MAP_ANONYMOUS",
           "MAP_GROWSDOWN", "MAP_POPULATE", "MAP_FIXED_NOREPLACE", "MADV_DONTNEED", "MADV_HUGEPAGE",
           "MADV_NOHUGEPAGE", "MADV_COLLAPSE", "MADV_FREE", "MADV_COLD", "MADV_PAGEOUT",
           "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES", "UFFDIO_REGISTER_MODE_MISSING", "UFFDIO_REGISTER_MODE_WP",
           "UFFDIO_REGISTER_MODE_MINOR", "UFFDIO_COPY_MODE_DONTWAKE", "UFFDIO_COPY_MODE_WP",
           "UFFDIO_CONTINUE_MODE_WP", "UFFDIO_WRITEPROTECT_MODE_WP", "UFFDIO_WRITEPROTECT_MODE_DONTWAKE",
           "UFFD_FEATURE_SIGBUS", "UFFD_FEATURE_WP_UNPOPULATED", "MADV_MERGEABLE", "MADV_UNMERGEABLE",
           "MADV_WILLNEED", "UFFD_FEATURE_POISON", "UFFDIO_POISON_MODE_DONTWAKE"]


def __getattr__(name: str) -> Any:
    # The machine pulls in Unicorn and every layer; plugins importing emu.hookimpl must not.
    if name in ("Machine", "GuestAccessError", "RunResult"):
        from emu import machine
        return getattr(machine, name)
    raise AttributeError(f"module 'emu' has no attribute {name!r}")
