"""copy_from_user / copy_to_user: the kernel touching user memory through the MMU.

The kernel's own accesses take the same hardware walk as the guest's (so A/D bits are
set as hardware would) and fault pages in through mm_core when the walk fails.
"""
from __future__ import annotations

from emu.arch import PAGE_SIZE, Access, Translation
from mm_core.memory import FAULT_FLAG_WRITE, FaultResult, do_user_addr_fault, handle_mm_fault


class EFault(Exception):
    """The user range is not accessible: the syscall returns -EFAULT."""


async def user_paddr(machine, mm, va: int, access: Access, force: bool = False) -> int:
    """Physical address of user ``va`` for ``access``, faulting it in if needed.
    ``force`` is FOLL_FORCE: write even where the VMA is read-only (loading text)."""
    k = machine.kernel
    for _ in range(4):
        t = machine.walk(mm, va, access)
        if type(t) is Translation:
            return t.paddr
        if force:
            vma = mm.vma_lookup(va)
            if vma is None:
                raise EFault(va)
            await handle_mm_fault(k, vma, va, FAULT_FLAG_WRITE if access & Access.W else 0)
            if access & Access.W:
                access = Access.R         # the page is now a private copy; write it physically
        elif await do_user_addr_fault(k, mm, va, access, user=False) is not FaultResult.OK:
            raise EFault(va)
    raise EFault(va)


async def copy_from_user(machine, mm, va: int, n: int) -> bytes:
    out = bytearray()
    while n > 0:
        chunk = min(n, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
        pa = await user_paddr(machine, mm, va, Access.R)
        out += machine.ram.read(pa, chunk)
        va, n = va + chunk, n - chunk
    return bytes(out)


async def copy_to_user(machine, mm, va: int, data: bytes, force: bool = False) -> None:
    pos = 0
    while pos < len(data):
        chunk = min(len(data) - pos, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
        pa = await user_paddr(machine, mm, va, Access.W, force)
        machine.ram.write(pa, data[pos:pos + chunk])
        va, pos = va + chunk, pos + chunk


async def strncpy_from_user(machine, mm, va: int, limit: int = 4096) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = await copy_from_user(machine, mm, va, min(64, PAGE_SIZE - (va & (PAGE_SIZE - 1))))
        nul = chunk.find(b"\0")
        if nul >= 0:
            return bytes(out + chunk[:nul])
        out += chunk
        va += len(chunk)
    return bytes(out)
