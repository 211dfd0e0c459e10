"""Device migration (mm/migrate_device.c 6.6) with other RAM as the device:
migrate_vma_setup() (migrate_vma_collect_pmd), migrate_vma_pages(), migrate_vma_finalize()."""
from __future__ import annotations

from conftest import BASE, collapsed_world, finish

import emu
from emu.scenario import Scenario
from mm_core import hmm, huge_memory, khugepaged, migrate_device
from mm_core.page_alloc import PageUse

RW = emu.PROT_READ | emu.PROT_WRITE
ANON = emu.MAP_PRIVATE | emu.MAP_ANONYMOUS | emu.MAP_FIXED


def test_migrate_vma_moves_anon_pages_and_populates_holes(arch: str) -> None:
    sc = Scenario(arch=arch)
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 8 * page, RW, ANON)
    m.touch(mm, a, write=True)                          # an anon page with data
    m.touch(mm, a + page)                               # the zero page
    old = m.translate(mm, a)
    k.physmem.write(old, b"device migration")
    src = m.migrate_vma(mm, a, a + 4 * page)
    assert all(s & migrate_device.MIGRATE_PFN_MIGRATE for s in src)
    assert src[0] >> migrate_device.MIGRATE_PFN_SHIFT == old // page
    assert src[0] & migrate_device.MIGRATE_PFN_WRITE
    assert src[1:] == [migrate_device.MIGRATE_PFN_MIGRATE] * 3     # zero page + holes: populated
    new = m.translate(mm, a)
    assert new is not None and new != old and k.physmem.read(new, 16) == b"device migration"
    assert k.alloc.page_of(old) is None or k.alloc.page_of(old).use is not PageUse.ANON    # freed
    assert all(m.translate(mm, a + i * page, "w") is not None for i in range(4))
    assert m.translate(mm, a + 4 * page) is None        # outside the range: untouched
    pfns = m.hmm_range_fault(mm, a, a + 8 * page)
    for i, pfn in enumerate(pfns):
        pa = m.translate(mm, a + i * page)
        assert pfn == 0 if pa is None else hmm.hmm_pfn_to_pfn(pfn) == pa // page
    assert mm.rss[0] + mm.rss[1] == 4                   # MM_FILEPAGES + MM_ANONPAGES
    m.touch(mm, a, write=True)                          # the new pte is a normal anon pte
    sc.run()
    finish(m, mm)


def test_a_pinned_page_is_put_back_and_not_migrated() -> None:
    sc = Scenario(arch="x86_64")
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, 2 * page, RW, ANON)
    for i in range(2):
        m.touch(mm, a + i * page, write=True)
    pinned = m.get_user_pages(mm, a, 1, write=True, pin=True)
    before = [m.translate(mm, a + i * page) for i in range(2)]
    src = m.migrate_vma(mm, a, a + 2 * page)
    assert src[0] == 0 and k.stats["migrate_vma_pinned"] == 1      # folio_try_share_anon_rmap_pte()
    assert src[1] & migrate_device.MIGRATE_PFN_MIGRATE
    assert m.translate(mm, a) == before[0] == pinned[0] and m.translate(mm, a + page) != before[1]
    m.unpin_user_pages(pinned)
    sc.run()
    finish(m, mm)


def test_collect_pmd_map_failure_is_again_then_a_hole_of_a_file_vma(arch: str) -> None:
    """migrate_vma_collect_pmd(): the pmd named a table, retract_page_tables() took it,
    pte_offset_map_lock() fails: ``goto again``; the pmd is none now, a hole, and a hole
    of a file VMA is skipped (nothing to migrate)."""
    sc, m, k, mm, inode, addr, pmdp, table = collapsed_world(arch)
    size = huge_memory.hpage_pmd_size(k)
    sc.task("migrate", migrate_device.dmirror_migrate(k, mm, addr, addr + 4 * k.page_size))
    sc.task("retract", khugepaged.retract_page_tables(k, inode.mapping, 0))
    sc.run(f"migrate:pt_read#{k.arch.pmd_level + 2} retract:* migrate:* rcu_gp:*", finish=False)
    assert sc.results["migrate"] == [0, 0, 0, 0]
    assert k.stats["migrate_vma_collect_again"] == 1 and k.stats["migrate_vma_collected"] == 0
    assert table.state == "freed" and m.translate(mm, addr) is None
    assert size // k.page_size > 4
    sc.run()
    finish(m, mm, files=[inode])


def test_an_access_during_the_migration_waits_on_the_migration_entry() -> None:
    """Between migrate_vma_setup() and migrate_vma_finalize() the pte is a migration
    entry: a CPU fault there sleeps (migration_entry_wait) and then sees the new page."""
    sc = Scenario(arch="x86_64")
    m, k = sc.machine, sc.kernel
    page = k.page_size
    mm = m.new_mm()
    a = m.mmap(mm, BASE, page, RW, ANON)
    m.touch(mm, a, write=True)
    old = m.translate(mm, a)
    from mm_core import memory
    from mm_core.locks import mmap_read_lock, mmap_read_unlock

    async def fault():
        await mmap_read_lock(mm)
        vma = mm.find_vma(a)
        ret = await memory.handle_mm_fault(k, vma, a, memory.FAULT_FLAG_WRITE)
        await mmap_read_unlock(mm)
        return ret

    sc.task("migrate", migrate_device.dmirror_migrate(k, mm, a, a + page))
    sc.task("fault", fault())
    # the migration entry is written by the collect walk's first pt_write
    sc.run("migrate:pt_write#2 fault:*", finish=False)
    assert k.stats["migration_entry_wait"] == 1
    sc.run()
    assert sc.results["fault"] == 0 and m.translate(mm, a) not in (None, old)
    finish(m, mm)
