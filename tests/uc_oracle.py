"""Unicorn's own QEMU MMU as an independent oracle for plugin walks (spec/arch_formats.md §5).

``uc_vmem_translate`` runs QEMU's walker (UC_TLB_CPU mode) for one access without
executing code. The 2.1.4 Python binding does not wrap it, so it is called through ctypes.
"""
from __future__ import annotations

import ctypes

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, Uc
from unicorn.unicorn_py3.unicorn import uclib

uclib.uc_vmem_translate.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_uint64)]
uclib.uc_vmem_translate.restype = ctypes.c_int


def vmem_translate(uc: Uc, va: int, prot: int) -> int | None:
    """Physical address QEMU's walker gives ``va`` for ``prot`` (UC_PROT_*), or None on a fault."""
    pa = ctypes.c_uint64()
    err = uclib.uc_vmem_translate(uc._uch, va, prot, ctypes.byref(pa))
    return pa.value if err == 0 else None


def tlb_flush(uc: Uc) -> None:
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
