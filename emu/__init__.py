"""emu: a plugin-based architecture emulator with pluggable MMUs and a Linux mm model."""
from emu.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
