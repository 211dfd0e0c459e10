"""Sanitizers: kernel-style reports for the bugs the v6.5/v6.6 rules prevent.

  KASAN-like   page-table lifetime: a read or write of an entry of a table that was
               freed (its page is poisoned and held in a quarantine), with alloc /
               detach / free provenance
  LOSTPTE      a present PTE written into a table already detached from its pmd
  SPINLOCK     "bad magic": a ptl taken that belongs to no live or RCU-deferred PTE
               table (pte_lockptr() of a pmd that is none or huge by now)
  RCU          rcu_read_lock imbalance when a task ends, sleeping inside rcu_read_lock
               (on a sleeping lock or wait queue, or a timed sleep: schedule_timeout())
  PTEMAP       map/unmap balance of pte_offset_map*() (the kmap_local stack of HIGHPTE):
               pte_unmap() of a pointer no map of this task returned (a stack copy),
               out of LIFO order, or a task that sleeps or ends with maps outstanding
  check_mm     counters at teardown (mm_core.memory.check_mm)

A finding raises ``Finding`` inside the task that did the access, which ends the run; the
explorer turns it into a report with the schedule that led there.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from emu.physmem import nonempty

_HELPERS = {"pgtable.py", "sanitizers.py", "pgalloc.py", "traps.py", "scenario.py", "loop.py",
            "script.py"}


@dataclass
class Finding(Exception):
    sanitizer: str                 # "KASAN", "LOSTPTE", "RCU", "CHECK_MM", "DEADLOCK", ...
    title: str                     # one line, kernel style
    signature: str                 # what dedups findings: sanitizer + site
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.title

    def __reduce__(self):                       # findings cross process boundaries (--workers)
        return (Finding, (self.sanitizer, self.title, self.signature, self.details))

    def report(self) -> str:
        bar = "=" * 66
        return "\n".join([bar, f"BUG: {self.title}", *self.details, bar])


@dataclass
class PteMap:
    """One pte_offset_map*() not yet ended by pte_unmap() (a kmap_local slot under HIGHPTE)."""

    ptep: int                      # the pointer the map returned
    table: int                     # the PTE table it points into
    pmdp: int                      # the pmd it was mapped through
    site: str                      # the kernel function that mapped it
    step: int


RETRY_LIMIT = 1000          # retries of one task before a retry loop counts as endless


def coroutine_site(coro) -> str:
    """The innermost kernel function a (suspended) task is in."""
    site = "?"
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            name = frame.f_code.co_filename.rsplit("/", 1)[-1]
            if name not in _HELPERS and not frame.f_code.co_name.startswith("<"):
                site = frame.f_code.co_name
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return site


def call_site() -> str:
    """The innermost kernel function outside the table helpers (deterministic)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.rsplit("/", 1)[-1]
        if name not in _HELPERS and not f.f_code.co_name.startswith("<"):
            return f.f_code.co_name
        f = f.f_back
    return "?"


class Sanitizers:
    """Per-kernel sanitizer state; mm_core calls the hooks below."""

    def __init__(self, k) -> None:
        self.k = k
        self.enabled = True
        self.dead: dict[int, object] = {}        # table paddr -> freed PageTable (quarantined)
        self.lock_order: dict[tuple[str, str], str] = {}   # (outer class, inner class) -> first seen
        # pte_offset_map_rw_nolock() maps still open: task -> {table: [pmdp, ptl, revalidated, site]}
        self.rw_nolock: dict[object, dict[int, list]] = {}
        # every pte_offset_map*() still mapped, per task, oldest first (the kmap_local stack)
        self.pte_maps: dict[object, list[PteMap]] = {}
        sizes = {lv.table_bytes for lv in k.arch.levels}
        self._one_table_size = len(sizes) == 1
        self._base_mask = ~(min(sizes) - 1)

    # -- lockdep-lite and RCU sleeping checks, from the scheduler's trap stream ----------------
    def on_trap(self, task, event: tuple) -> None:
        if not self.enabled:
            return
        kind = event[0]
        if kind == "point":
            what = event[1]
            if what == "pt_write":
                self._check_table_pmd_clear(task, event[2])
            elif what != "retry":
                return
        if kind == "point" and event[1] == "retry":
            n = task.kstate["retries"] = task.kstate.get("retries", 0) + 1
            if n > RETRY_LIMIT:
                site = coroutine_site(task.kstate.get("coro", task.coro))
                raise Finding("LIVELOCK", f"LIVELOCK: {task.name} retried {n} times in {site} without "
                              "progress", f"LIVELOCK:{site}",
                              ["  a retry after a failed pte_offset_map*() must re-read the pmd and end "
                               "when it is stable but not a table"])
        if kind == "sleep" and self.k.rcu.readers.get(task, 0):
            # schedule_timeout() & co. inside rcu_read_lock(): "Illegal context switch in RCU
            # read-side critical section" (and might_sleep()'s "sleeping function called from
            # invalid context")
            site = coroutine_site(task.kstate.get("coro", task.coro))
            raise Finding("RCU", f"RCU: {task.name} sleeps inside rcu_read_lock() in {site}",
                          f"RCU:sleep:{site}",
                          ["  schedule_timeout() in an RCU read-side critical section: leave it "
                           "first (xas_pause() + rcu_read_unlock(), pte_unmap())",
                           *self._outstanding(task)])
        if kind in ("lock", "wait", "trylock"):
            lock = event[1]
            if getattr(lock, "not_a_ptl", False):
                self._bad_ptl(task, lock)
            depth = self.k.rcu.readers.get(task, 0)
            sleeps = getattr(lock, "sleeps", kind == "wait") and kind != "trylock"
            if depth and sleeps:
                raise Finding("RCU", f"RCU: sleeping on {lock!r} inside rcu_read_lock() in {task.name}",
                              f"RCU:sleep:{getattr(lock, 'cls', type(lock).__name__)}",
                              ["  a pte_offset_map() holder must not sleep: pte_unmap() first",
                               *self._outstanding(task)])
            if sleeps and self.pte_maps.get(task):
                maps = self.pte_maps[task]
                raise Finding("PTEMAP", f"PTEMAP: {task.name} sleeps on {lock!r} with {len(maps)} pte map(s) "
                              f"outstanding", f"PTEMAP:sleep:{maps[-1].site}",
                              ["  a pte_offset_map() holder must not sleep (kmap_local / RCU): "
                               "pte_unmap() first", *self._outstanding(task)])
            if (kind == "wait" and not hasattr(lock, "cls")) or kind == "trylock":
                return      # as in lockdep, a trylock adds no dependency: it cannot wait
            inner = getattr(lock, "cls", "?")
            for held in task.held:
                outer = getattr(held, "cls", "?")
                if outer == inner:
                    continue                       # nesting within a class (annotated in Linux)
                if (outer, inner) not in self.lock_order:
                    self.lock_order[outer, inner] = f"{task.name} at step {self.k.current_step()}"
                first = self.lock_order.get((inner, outer))
                if first is not None:
                    raise Finding(
                        "LOCKDEP", f"LOCKDEP: possible circular locking dependency: {outer} -> {inner}",
                        f"LOCKDEP:{min(outer, inner)}/{max(outer, inner)}",
                        [f"  {task.name} takes {inner} while holding {outer};",
                         f"  {inner} -> {outer} was seen earlier ({first})"])

    def _bad_ptl(self, task, lock) -> None:
        """CONFIG_DEBUG_SPINLOCK's "bad magic", for split ptlocks: a task takes the "ptl"
        of a page that is no live or RCU-deferred PTE table (pte_lockptr() of a pmd value
        that names pfn 0, a THP head or a freed table). Such a lock excludes nobody, and
        in the kernel it is a spinlock written into (or a ptlock pointer read from)
        memory that is not one: spec §6 case 2, a ptl derived from the live pmd instead
        of the snapshot the map validated.

        Not under the 6.4 rules' own map: pte_offset_map_lock() then takes the ptl of the
        live pmd by design and its caller vouches for the pmd (pmd_trans_unstable() under
        mmap_lock); what goes wrong there is reported where the table is used."""
        k = self.k
        if lock.snapshot is None and not k.profile.fallible_pte_map:
            return
        site = coroutine_site(task.kstate.get("coro", task.coro))
        details = [f"  lock: ptlock of {lock.what}, .magic: not a spinlock, .owner: none",
                   f"  taken by {task.name} at step {k.current_step()} in {site}; {lock.derived}"]
        if lock.pmdp is not None:
            now = k.arch.decode(k.arch.pmd_level, k.physmem.read_entry(lock.pmdp))
            details.append(f"  pmd {lock.pmdp:#x} now {k.physmem.read_entry(lock.pmdp):#018x} "
                           f"({now.kind.value}{f' {now.paddr:#x}' if now.kind.value != 'none' else ''})")
        if lock.snapshot is not None:
            details.append(f"  snapshot {lock.snapshot}: its ptl is the one to take")
        else:
            details.append("  no validated snapshot: the value was read from the live pmd, not handed "
                           "over by __pte_offset_map()")
        pt = None
        if lock.table is not None:
            pt = k.ptdescs.get(lock.table) or self.dead.get(lock.table) or next(
                (d for d in k.deferred if d.paddr == lock.table), None)
        if pt is not None:
            holder = getattr(pt.ptl, "holder", None)
            if holder is not None:
                details.append(f"  the real ptl of table {pt.paddr:#x} ({pt.ptl!r}) is held by "
                               f"{getattr(holder, 'name', holder)}: this lock excludes nobody")
            details.extend(pt.provenance())
        raise Finding("SPINLOCK", f"SPINLOCK: bad magic: {task.name} takes the ptl of {lock.short}, "
                      f"not of a page table, in {site}", f"SPINLOCK:bad-ptl:{site}", details)

    # -- hooks --------------------------------------------------------------------------
    def entry_access(self, entp: int, write: bool, value: int | None = None) -> None:
        """Every page-table entry read or write by kernel code."""
        if not self.enabled:
            return
        pt = self._table_of(entp)
        if pt is None:
            if not write:
                self._check_wild_read(entp)
            return
        if pt.state == "freed":
            self._uaf(pt, entp, write)
        if self.rw_nolock:
            self._check_rw_nolock(entp, write)
        if write and value is not None:
            arch = self.k.arch
            if pt.state in ("detached", "deferred") and pt.level == arch.pte_level \
                    and arch.decode(pt.level, value).present:
                self._lost_pte(pt, entp)
            if pt.level < arch.pte_level:
                self._check_table_entry(pt, entp, value)

    # -- walker contract of pte_offset_map_rw_nolock() (6.13) ---------------------------------
    def rw_nolock_mapped(self, pmdp: int, ptep: int, ptl) -> None:
        task = self.k.current_task()
        if task is not None and self.enabled:
            self.rw_nolock.setdefault(task, {})[self._pte_table(ptep)] = [pmdp, ptl, False, call_site()]

    def pte_unmapped(self, ptep: int) -> None:
        """pte_unmap(ptep): ``ptep`` must point into the table of this task's most recent
        map still outstanding (kunmap_local() masks the pointer to its page; kmap_local
        slots are a stack, so maps end in LIFO order). A pointer into no mapped table (a
        stack copy of a pte, as UFFDIO_MOVE's move_pages_pte() passed before 927e926d72d9)
        or into an older map is reported at once: under HIGHPTE the kmap slot leaks or the
        wrong one is popped, and even when the RCU counts balance the map is not ended."""
        task = self.k.current_task()
        if self.rw_nolock:
            maps = self.rw_nolock.get(task)
            if maps:
                maps.pop(self._pte_table(ptep), None)
        if not self.enabled:
            return
        stack = self.pte_maps.get(task, [])
        hit = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].ptep == ptep), None)
        if hit is None:
            table = self._pte_table(ptep)
            hit = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].table == table), None)
        site = call_site()
        who = task.name if task is not None else "the API caller"
        if hit is None:
            pt = self._table_of(ptep)
            what = (f"an entry of page table {pt.paddr:#x} ({pt.state}) that {who} has not mapped"
                    if pt is not None and pt.level == self.k.arch.pte_level else
                    "not a pointer into any page table (a copy of a pte on the kernel stack?)")
            raise Finding("PTEMAP", f"PTEMAP: pte_unmap() of {ptep:#x} that no pte_offset_map*() of {who} "
                          f"returned, in {site}", f"PTEMAP:bad-unmap:{site}",
                          [f"  {ptep:#x} is {what}; by {self._where()}",
                           "  under HIGHPTE kunmap_local() leaves the real map's kmap slot in place "
                           "(and a later unmap pops the wrong one)", *self._outstanding(task)])
        if hit != len(stack) - 1:
            raise Finding("PTEMAP", f"PTEMAP: pte_unmap() out of LIFO order in {site}", f"PTEMAP:lifo:{site}",
                          [f"  {who} unmaps {ptep:#x} (mapped in {stack[hit].site} at step "
                           f"{stack[hit].step}) while a later map is still outstanding; by {self._where()}",
                           "  kmap_local slots are a stack: WARNING in kunmap_local_indexed() under HIGHPTE",
                           *self._outstanding(task)])
        stack.pop()
        if not stack:
            self.pte_maps.pop(task, None)

    def pte_mapped(self, ptep: int, pmdp: int) -> None:
        """A successful pte_offset_map*(): push it on this task's map stack."""
        if not self.enabled:
            return
        task = self.k.current_task()
        self.pte_maps.setdefault(task, []).append(
            PteMap(ptep, self._pte_table(ptep), pmdp, call_site(), self.k.current_step()))

    def _outstanding(self, task, maps: list[PteMap] | None = None) -> list[str]:
        maps = self.pte_maps.get(task, []) if maps is None else maps
        if not maps:
            return []
        return ["  pte maps outstanding (oldest first):",
                *[f"    {m.ptep:#x} (table {m.table:#x}, "
                  f"{'a pmd copied onto the stack' if m.pmdp < 0 else f'pmd {m.pmdp:#x}'}) "
                  f"mapped in {m.site} at step {m.step}" for m in maps]]

    def _pte_table(self, entp: int) -> int:
        return self.k.arch.levels[self.k.arch.pte_level].table_base(entp)

    def _check_rw_nolock(self, entp: int, write: bool) -> None:
        """The caller of pte_offset_map_rw_nolock() must, after taking the ptl and before
        writing a pte, re-read the pmd (pmd_same) or the pte (pte_same): the table may have
        been retracted between the map and the lock. A read under the ptl counts as that
        recheck; a write before one is a contract violation even when no race happened."""
        task = self.k.current_task()
        maps = self.rw_nolock.get(task)
        if not maps:
            return
        base = self._pte_table(entp)
        for table, rec in maps.items():
            pmdp, ptl, checked, site = rec
            if entp == pmdp or base == table:
                if not write and ptl.holder is task:
                    rec[2] = True
                elif write and base == table and not checked:
                    where = call_site()
                    raise Finding("WALKER", f"WALKER: pte written after pte_offset_map_rw_nolock() with no "
                                  f"pmd_same()/pte_same() under the ptl in {where}",
                                  f"WALKER:rw_nolock:{where}",
                                  [f"  table {table:#x} mapped in {site} via pmd {pmdp:#x}; "
                                   f"write to {entp:#x} by {self._where()}",
                                   "  the table may have been retracted between the map and the lock"])

    def page_freed(self, page) -> None:
        """TLB coherence: no vCPU may still translate to a frame being freed, unless a
        shootdown covering it is queued (it lands before that vCPU runs guest code)."""
        if not self.enabled:
            return
        for vcpu in self.k.vcpus():
            for off in range(0, page.nr_pages << 12, 1 << 12):
                va = vcpu.tlb.maps_frame(page.paddr + off)
                if va is not None and not vcpu.flush_pending_for(va) and vcpu.mm is not None:
                    site = call_site()
                    raise Finding("TLB", f"TLB: vCPU {vcpu.index} still maps freed frame "
                                  f"{page.paddr + off:#x} in {site}", f"TLB:stale:{site}",
                                  [f"  va {va:#x} -> pa {page.paddr + off:#x} ({page.use.value}), "
                                   f"no flush queued: the page is freed before the TLB flush"])

    def table_released(self, pt) -> None:
        """A PTE table on its way out (pte_free / pte_free_defer) must be empty: a present
        entry left in it is a page mapped where no walker or rmap will find it."""
        k = self.k
        if not self.enabled or pt.level != k.arch.pte_level:
            return
        lv = k.arch.levels[pt.level]
        empty = k.arch.empty_value(pt.level)
        raws = k.physmem.read_entries(pt.paddr, lv.entries)
        for i in nonempty(raws, empty):
            value = raws[i]
            if k.arch.decode(pt.level, value).present:
                site = call_site()
                raise Finding(
                    "PTFREE", f"PTFREE: page table freed with a present pte in {site}",
                    f"PTFREE:{site}",
                    [f"entry {i} of table {pt.paddr:#x} = {value:#018x} still maps a page "
                     f"({self._where()})", "  the page is leaked: expect Bad rss-counter state at exit",
                     *pt.provenance()])

    def table_freed(self, pt) -> None:
        self.dead[pt.paddr] = pt

    def table_allocated(self, paddr: int) -> None:
        self.dead.pop(paddr, None)

    def task_ended(self, task) -> None:
        self.rw_nolock.pop(task, None)
        maps = self.pte_maps.pop(task, [])
        depth = self.k.rcu.readers.get(task, 0)
        if self.enabled and depth:
            raise Finding("RCU", f"RCU: {task.name} ended inside {depth} rcu_read_lock() section(s)",
                          f"RCU:imbalance:{task.name}", ["  a pte_offset_map() without its pte_unmap()",
                                                         *self._outstanding(task, maps)])
        if self.enabled and maps:
            raise Finding("PTEMAP", f"PTEMAP: {task.name} ended with {len(maps)} pte map(s) outstanding",
                          f"PTEMAP:leak:{maps[-1].site}",
                          ["  a pte_offset_map*() without its pte_unmap() (a leaked kmap_local slot "
                           "under HIGHPTE)", *self._outstanding(task, maps)])

    # -- reports ------------------------------------------------------------------------
    def _table_of(self, entp: int):
        k = self.k
        if self._one_table_size:
            # every level's tables are the same size (4K): one base, and of a live and a
            # quarantined table there, the one of the upper level (the loop's order)
            base = entp & self._base_mask
            live, dead = k.ptdescs.get(base), self.dead.get(base)
            if live is not None and (dead is None or live.level <= dead.level):
                return live
            if dead is not None:
                return dead
        else:
            pt = self._table_of_by_level(entp)
            if pt is not None:
                return pt
        for pt in k.deferred:
            if pt.paddr <= entp < pt.paddr + k.arch.levels[pt.level].table_bytes:
                return pt
        return None

    def _table_of_by_level(self, entp: int):
        k = self.k
        for level, lv in enumerate(k.arch.levels):
            base = lv.table_base(entp)
            for pt in (k.ptdescs.get(base), self.dead.get(base)):
                if pt is not None and pt.level == level:
                    return pt
        return None

    def _check_table_pmd_clear(self, task, entp: int) -> None:
        """Who may change a pmd that points to a page table (Jann Horn's rule, in its 6.6
        form): the mmap_lock writer (munmap, exit, mremap, anon collapse), or the holder
        of both the pmd's lock and the table's ptl (retract_page_tables,
        collapse_pte_mapped_thp): every lockless walker then fails its recheck. Before
        5.17 (profile 5.10) exit_mmap()'s free_pgtables() held no mmap_lock: an mm with
        mm_users == 0 is exempt there."""
        k = self.k
        pt = self._table_of(entp)
        if pt is None or pt.level != k.arch.pmd_level or pt.state != "live":
            return
        old = k.arch.decode(pt.level, k.physmem.read_entry(entp))
        if old.kind.value != "table":
            return
        mm = pt.mm
        if mm is not None and getattr(mm.mmap_lock, "writer", None) is task:
            return
        if mm is not None and mm.users == 0 and not k.profile.exit_mmap_lock:
            return      # exit_mmap() before 5.17: no mmap_lock, mm_users == 0 keeps others out
        child = k.ptdescs.get(old.paddr)
        if pt.ptl is not None and pt.ptl.holder is task and child is not None \
                and (child.ptl is None or child.ptl.holder is task):
            return
        site = coroutine_site(task.kstate.get("coro", task.coro))
        raise Finding("LOCKDEP", f"LOCKDEP: pmd pointing to a page table changed without "
                      f"mmap_lock(W) or pml+ptl in {site}", f"LOCKDEP:pmd-clear:{site}",
                      [f"  pmd {entp:#x} -> table {old.paddr:#x}, by {task.name}; held: "
                       f"{', '.join(map(repr, task.held)) or 'nothing'}"])

    def _check_wild_read(self, entp: int) -> None:
        """An entry read from memory that is no page table: pmd_page() of a non-table (a
        huge pmd's folio, or pfn 0 of a none pmd), what a walker gets when it maps the PTE
        table through a pmd it did not validate (spec §6 case 15). Under the 6.4 rules
        pte_offset_map() did exactly that by design, so pfn 0 is only reported from 6.5 on."""
        k = self.k
        page = k.alloc.page_of(entp)
        if page is not None:
            if page.use.value == "pagetable":
                return
            what = f"a {page.use.value} page"
            where = f"pfn {page.pfn:#x}"
        elif entp >> 12 == 0 and k.profile.fallible_pte_map:
            what, where = "pfn 0", "never allocated"
        else:
            return
        site = call_site()
        raise Finding("BADPMD", f"BADPMD: page-table entry read from {what} in {site}",
                      f"BADPMD:read:{site}",
                      [f"  read of {entp:#x} ({what}, {where}) as a page table by {self._where()}",
                       "  pmd_page() of a pmd that is not a table: the map used a pmd it never validated"])

    def _check_table_entry(self, pt, entp: int, value: int) -> None:
        """A table entry written above the PTE level must name a live table of the next
        level (a pmd pointing at pfn 0 or at a freed table is the mremap bug's result)."""
        k = self.k
        ent = k.arch.decode(pt.level, value)
        if ent.kind.value != "table":
            return
        child = k.ptdescs.get(ent.paddr)
        if child is None or child.level != pt.level + 1:
            site = call_site()
            what = "freed table" if ent.paddr in self.dead else "non-table page" if ent.paddr else "pfn 0"
            raise Finding("BADPMD", f"BADPMD: {k.arch.levels[pt.level].name} entry pointing at a {what} "
                          f"in {site}", f"BADPMD:{site}",
                          [f"  entry {entp:#x} := {value:#018x} by {self._where()}"])

    def _where(self) -> str:
        cur = self.k.current_task()
        return f"{cur.name} (step {self.k.current_step()})" if cur is not None else "the API caller"

    def _uaf(self, pt, entp: int, write: bool) -> None:
        site = call_site()
        raise Finding(
            "KASAN",
            f"KASAN: use-after-free in {site}",
            f"UAF:pagetable:{'write' if write else 'read'}:{site}",
            [f"{'Write' if write else 'Read'} of size 8 at addr {entp:#x} (page table {pt.paddr:#x}, "
             f"level {self.k.arch.levels[pt.level].name}) by {self._where()}",
             *pt.provenance()])

    def _lost_pte(self, pt, entp: int) -> None:
        site = call_site()
        raise Finding(
            "LOSTPTE",
            f"LOSTPTE: pte installed into a detached page table in {site}",
            f"LOSTPTE:{site}",
            [f"Write of a present pte at {entp:#x} (table {pt.paddr:#x}, {pt.state}) by {self._where()}",
             "  the table's pmd was cleared: the pte is invisible to the MMU and rmap, and its page "
             "leaks", *pt.provenance()])
