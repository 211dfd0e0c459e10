"""The embedding API: address spaces built and inspected from Python, on every arch."""
from __future__ import annotations

import pytest

import emu
from emu.arch import Kind

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS


@pytest.fixture
def m(arch: str) -> emu.Machine:
    machine = emu.Machine(arch=arch, mem="64M")
    yield machine
    machine.ram.close()


def walk_real_bytes(m: emu.Machine, mm, va: int) -> tuple[int, Kind] | None:
    """Follow the tables in guest RAM from the root with the plugin's decoder only."""
    arch = m.arch
    table = arch.root_table(m.root_register(mm))
    assert table == m.pgtable_root(mm)
    for level, lv in enumerate(arch.levels):
        raw = int.from_bytes(m.physmem[table + lv.index(va) * 8:][:8], "big" if arch.big_endian else "little")
        ent = arch.decode(level, raw)
        if ent.kind is Kind.TABLE:
            table = ent.paddr
            continue
        if ent.kind is Kind.LEAF:
            return ent.paddr + (va & (lv.span - 1)), ent
        return None
    raise AssertionError("walked past the last level")


def test_mmap_is_lazy_until_touched(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 16 * 4096, RW, ANON)
    assert va % 4096 == 0
    assert m.translate(mm, va, "r") is None


def test_read_fault_maps_the_zero_page_read_only(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4096, RW, ANON)
    pa = m.touch(mm, va)
    assert pa == m.kernel.zero_page.paddr
    assert m.translate(mm, va, "r") == pa
    assert m.translate(mm, va, "w") is None              # the first write must fault (COW)


def test_write_fault_gives_a_private_zeroed_page(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 2 * 4096, RW, ANON)
    m.touch(mm, va + 8)                                   # zero page first
    pa = m.touch(mm, va + 8, write=True)                  # then copy-on-write
    assert pa != m.kernel.zero_page.paddr + 8
    assert bytes(m.physmem[pa - 8:pa - 8 + 4096]) == bytes(4096)
    assert m.translate(mm, va + 8, "w") == pa
    leaf = walk_real_bytes(m, mm, va + 8)
    assert leaf is not None and leaf[0] == pa
    assert leaf[1].prot & emu.arch.Access.W and leaf[1].dirty and leaf[1].young


def test_translate_rejects_unknown_access_letters(m: emu.Machine) -> None:
    with pytest.raises(ValueError):
        m.translate(m.new_mm(), 0x1000, "rw")


def test_exec_needs_prot_exec(m: emu.Machine) -> None:
    mm = m.new_mm()
    data = m.mmap(mm, 0, 4096, RW, ANON)
    code = m.mmap(mm, 0, 4096, emu.PROT_READ | emu.PROT_EXEC, ANON)
    m.touch(mm, data, write=True)
    m.touch(mm, code)
    assert m.translate(mm, data, "x") is None
    assert m.translate(mm, code, "x") is not None


def test_mprotect_read_only_removes_write(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4 * 4096, RW, ANON)
    for i in range(4):
        m.touch(mm, va + i * 4096, write=True)
    m.mprotect(mm, va + 4096, 2 * 4096, emu.PROT_READ)
    assert m.translate(mm, va, "w") is not None
    assert m.translate(mm, va + 4096, "w") is None
    assert m.translate(mm, va + 4096, "r") is not None
    with pytest.raises(emu.GuestAccessError):
        m.touch(mm, va + 2 * 4096, write=True)
    assert len(mm.vmas) == 3                               # split into rw / r / rw
    m.mprotect(mm, va + 4096, 2 * 4096, RW)
    assert len(mm.vmas) == 1                               # and merged again
    m.touch(mm, va + 4096, write=True)                     # exclusive page: write reused in place


def test_prot_none_makes_present_pages_inaccessible(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4096, RW, ANON)
    pa = m.touch(mm, va, write=True)
    m.mprotect(mm, va, 4096, emu.PROT_NONE)
    assert m.translate(mm, va, "r") is None
    leaf = walk_real_bytes(m, mm, va)
    assert leaf is None or leaf[1].prot == emu.arch.Access.NONE   # PROT_NONE: present to Linux only
    m.mprotect(mm, va, 4096, emu.PROT_READ)
    assert m.translate(mm, va, "r") == pa                  # the data page survived


def test_munmap_frees_pages_and_tables(m: emu.Machine) -> None:
    mm = m.new_mm()
    before = dict(m.kernel.stats)
    va = m.mmap(mm, 0, 64 * 4096, RW, ANON)
    for i in range(64):
        m.touch(mm, va + i * 4096, write=True)
    assert mm.rss[1] == 64
    m.munmap(mm, va, 64 * 4096)
    assert m.translate(mm, va, "r") is None and mm.rss[1] == 0
    s = m.kernel.stats
    assert s["pt_tables_allocated"] - before.get("pt_tables_allocated", 0) > 0
    assert s["pt_tables_freed"] - before.get("pt_tables_freed", 0) == \
        s["pt_tables_allocated"] - before.get("pt_tables_allocated", 0)


def test_errors_are_oserrors(m: emu.Machine) -> None:
    mm = m.new_mm()
    with pytest.raises(OSError) as e:
        m.mmap(mm, 0, 0, RW, ANON)
    assert e.value.errno == 22
    with pytest.raises(OSError):
        m.munmap(mm, 123, 4096)
    with pytest.raises(OSError) as e:
        m.mprotect(mm, 0x10000, 4096, emu.PROT_READ)        # nothing mapped there
    assert e.value.errno == 12


def test_map_fixed_noreplace_refuses_to_overlap(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4 * 4096, RW, ANON)
    with pytest.raises(OSError) as e:
        m.mmap(mm, va + 4096, 4096, RW, ANON | emu.MAP_FIXED_NOREPLACE)
    assert e.value.errno == 17
    assert m.mmap(mm, va + 4096, 4096, emu.PROT_READ, ANON | emu.MAP_FIXED) == va + 4096


def test_exit_mm_frees_everything(m: emu.Machine) -> None:
    mm = m.new_mm()
    va = m.mmap(mm, 0, 1 << 21, RW, ANON)
    for off in range(0, 1 << 21, 1 << 16):
        m.touch(mm, va + off, write=True)
    m.exit_mm(mm)
    assert m.kernel.alloc.owned_by(mm) == []
    assert [pt for pt in m.kernel.ptdescs.values() if pt.mm is mm] == []


def test_root_register_holds_the_root_table(m: emu.Machine) -> None:
    mm = m.new_mm()
    reg = m.root_register(mm)
    assert m.arch.root_table(reg) == m.pgtable_root(mm)
    assert reg != 0


def test_physmem_is_all_of_guest_ram(m: emu.Machine) -> None:
    assert len(m.physmem) >= 64 << 20
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4096, RW, ANON)
    pa = m.touch(mm, va, write=True)
    m.physmem[pa:pa + 5] = b"hello"
    assert m.read_user(mm, va, 5) == b"hello"
