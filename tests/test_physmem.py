"""Guest RAM recycling: a buffer handed back zeroed is indistinguishable from a fresh one."""
from __future__ import annotations

from emu import physmem
from emu.physmem import PhysMem

SIZE = 6 << 20          # a size no other test uses, so the pool is ours


def _all_zero(ram: PhysMem) -> bool:
    return ram.read(0, ram.size) == bytes(ram.size)


def test_recycled_buffer_comes_back_zeroed() -> None:
    physmem._POOL.pop(SIZE, None)
    ram = PhysMem(SIZE, big_endian=True, prefault=False)
    ram.write(0x1234, b"data")
    ram.write_entry(0x200000, 0xDEADBEEF)
    ram.fill(0x300000, 3 * 4096 + 5, 0x6B)                  # crosses page boundaries
    ram.copy(0x500000, 0x1000)
    assert ram.cmpxchg_entry(0x200008, 0, 7)
    ram.fill_entries(0x5ff000, 512, 0x400)                  # s390x-style empty entries
    assert not _all_zero(ram)
    address = ram.address
    ram.close(recycle=True)
    assert len(physmem._POOL[SIZE]) == 1
    again = PhysMem(SIZE, big_endian=False, prefault=False)
    try:
        assert again.address == address                    # the same host buffer
        assert _all_zero(again)
        assert physmem._POOL[SIZE] == []
    finally:
        again.close()


def test_scatter_writes_only_its_items_and_they_are_recycled() -> None:
    physmem._POOL.pop(SIZE, None)
    ram = PhysMem(SIZE, big_endian=False, prefault=False)
    ram.fill(0x100000, 0x10000, 0x6B)
    ram.scatter(0x100008, 0x3000, b"abcdefgh" + b"ABCDEFGH" + b"12345678", 8)
    expect = bytearray(b"\x6b" * 0x10000)
    for i, item in enumerate((b"abcdefgh", b"ABCDEFGH", b"12345678")):
        expect[8 + i * 0x3000:16 + i * 0x3000] = item
    assert ram.read(0x100000, 0x10000) == bytes(expect)       # the bytes between stay
    ram.scatter(0x400fff, 0x1800, b"xyzw", 2)                 # items across frames, odd stride
    assert ram.read(0x400fff, 2) == b"xy" and ram.read(0x4027ff, 2) == b"zw"
    assert list(ram.dirty[0x3ff:0x404]) == [0, 1, 1, 1, 0]       # 0x400, 0x401 and 0x402
    ram.close(recycle=True)
    again = PhysMem(SIZE, big_endian=False, prefault=False)
    try:
        assert _all_zero(again)
    finally:
        again.close()


def test_file_data_written_sparsely_is_file_data() -> None:
    from emu.scenario import Scenario
    from emu.scenarios.base import file_data, write_file_data
    sc = Scenario(mem="8M", prefault=False)
    try:
        write_file_data(sc.kernel, 2 << 20, 2 << 20)
        assert sc.kernel.physmem.read(2 << 20, 2 << 20) == file_data(2 << 20)
    finally:
        sc.close()


def test_ram_from_a_template_starts_as_the_template_every_time() -> None:
    physmem._POOL.pop(SIZE, None)
    ram = PhysMem(SIZE, big_endian=False, prefault=False)
    ram.write(0x3000, b"abc")
    ram.fill(0x10000, 0x3000, 0x6B)
    ram.write(0x20000, bytes(100))                          # written, but zeros
    tpl = physmem.RamTemplate.of(ram)
    expect = ram.read(0, ram.size)
    ram.close(recycle=True)
    assert sorted(tpl.frames) == [0x3, 0x10, 0x11, 0x12]
    for _ in range(3):                                      # fresh buffer, then the template's own
        copy = PhysMem(SIZE, big_endian=False, prefault=False, template=tpl)
        assert copy.read(0, copy.size) == expect
        assert not any(copy.dirty)
        copy.write(0x3001, b"X")                            # a template frame changed
        copy.fill(0x11000, 0x2000, 0)                       # two cleared
        copy.write_entry(0x400000, 0x1234)                  # and one of its zero frames
        assert copy.written()[0x3] and copy.written()[0x12] and copy.written()[0x400]
        copy.close(recycle=True)
        assert len(tpl.pool) == 1 and physmem._POOL[SIZE] == []
    again = PhysMem(SIZE, big_endian=False, prefault=False, template=tpl)
    other = PhysMem(SIZE, big_endian=False, prefault=False, template=tpl)   # pool empty: filled
    try:
        assert again.read(0, again.size) == expect == other.read(0, other.size)
    finally:
        other.close(recycle=True)
        again.close(recycle=True)
    assert len(tpl.pool) == 2 and physmem._POOL[SIZE] == []
    copies = [PhysMem(SIZE, big_endian=False, prefault=False, template=tpl) for _ in range(3)]
    for copy in copies:
        copy.write(0x5000, b"more")
        copy.close(recycle=True)                            # the third finds the template's pool full
    assert len(tpl.pool) == 2 and len(physmem._POOL[SIZE]) == 1
    plain = PhysMem(SIZE, big_endian=False, prefault=False)     # its buffer: zeroed, template and all
    try:
        assert _all_zero(plain)
    finally:
        plain.close()


def test_buffer_written_behind_its_back_is_not_recycled() -> None:
    physmem._POOL.pop(SIZE, None)
    ram = PhysMem(SIZE, big_endian=False, prefault=False)
    ram.view[0x10:0x14] = b"user"                           # untracked: Machine.physmem users, Unicorn
    ram.close(recycle=True)
    assert physmem._POOL.get(SIZE) == []
    plain = PhysMem(SIZE, big_endian=False, prefault=False)
    plain.write(0, b"x")
    plain.close()                                           # recycling is opt-in
    assert physmem._POOL.get(SIZE) == []


def test_big_ram_is_not_kept() -> None:
    big = 64 << 20
    physmem._POOL.pop(big, None)
    ram = PhysMem(big, big_endian=False, prefault=False)
    ram.write(0, b"x")
    ram.close(recycle=True)
    assert not physmem._POOL.get(big)


def test_unreachable_ram_is_collected_before_live_ram_passes_the_limit() -> None:
    """Machines hold their RAM in reference cycles; past _LIVE_MAX alive, a new PhysMem runs
    the cycle collector, so RAM nobody can reach is unmapped before more is mapped."""
    import gc

    class Cycle:
        pass

    gc.collect()
    before = physmem._live[0]
    for _ in range(3 * physmem._LIVE_MAX // SIZE):
        c = Cycle()
        c.ram, c.me = PhysMem(SIZE, big_endian=False, prefault=False), c   # garbage, in a cycle
        del c
    assert physmem._live[0] - before <= physmem._LIVE_MAX
    gc.collect()
    assert physmem._live[0] == before
