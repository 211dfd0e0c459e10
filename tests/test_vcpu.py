"""The vCPU run loop: exact instruction counts, quanta, TLB fills served from our model."""
from __future__ import annotations

import ctypes

import pytest
from conftest import ARCHES, workload
from unicorn import UC_HOOK_CODE, UC_MEM_READ, UC_MEM_WRITE, UC_PROT_WRITE

from emu.machine import Machine


@pytest.mark.parametrize("quantum", [20000, 997, 37])
@pytest.mark.parametrize("arch_name", ARCHES)
def test_instruction_count_is_exact_for_any_quantum(arch_name: str, quantum: int) -> None:
    """A Python code hook sees every instruction that started; emu counts the completed
    ones, so the two differ by exactly the faulting attempts (which restart)."""
    m = Machine(arch=arch_name, mem="32M", quantum=quantum)
    m.spawn(workload(arch_name, "hello"), ["hello"])
    vcpu = m.vcpus[0]
    started = [0]
    vcpu.uc.hook_add(UC_HOOK_CODE, lambda uc, addr, size, data: started.__setitem__(0, started[0] + 1))
    s = m.run().summary
    data_faults = sum(n for kind, n in vcpu.faults_by_kind.items())
    assert s["instructions"] == started[0] - data_faults


def test_tlb_model_serves_refills_without_a_second_walk() -> None:
    """Unicorn's TLB is only a cache of ours: when it asks again for a page (after its
    own eviction or a flush), the answer comes from our TLB, not from another walk."""
    m = Machine(arch="x86_64", mem="32M")
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4096, 3, 0x22)
    pa = m.touch(mm, va, write=True)
    vcpu = m._free_vcpu()
    vcpu.switch_mm(mm)
    entry = (ctypes.c_uint64 * 2)()
    assert vcpu._fill(None, va, UC_MEM_WRITE, entry, None) is True
    assert (vcpu.walks, vcpu.tlb_hits) == (1, 0)
    assert vcpu._fill(None, va, UC_MEM_READ, entry, None) is True
    assert (vcpu.walks, vcpu.tlb_hits) == (1, 1)
    assert entry[0] == pa and entry[1] & UC_PROT_WRITE


def test_clean_page_is_filled_without_write_so_the_store_walks_again() -> None:
    m = Machine(arch="x86_64", mem="32M")
    mm = m.new_mm()
    va = m.mmap(mm, 0, 4096, 3, 0x22)
    m.touch(mm, va, write=True)
    vcpu = m._free_vcpu()
    vcpu.switch_mm(mm)
    ptep = m.walk(mm, va, 1).entry_paddr
    m.ram.write_entry(ptep, m.ram.read_entry(ptep) & ~0x40)      # clear D as reclaim would
    entry = (ctypes.c_uint64 * 2)()
    assert vcpu._fill(None, va, UC_MEM_READ, entry, None) is True
    assert not entry[1] & UC_PROT_WRITE
    assert vcpu._fill(None, va, UC_MEM_WRITE, entry, None) is True
    assert vcpu.walks == 2 and m.ram.read_entry(ptep) & 0x40    # the write walk set D again
