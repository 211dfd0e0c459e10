"""Step footprints: what one scheduler step read and wrote, for partial-order reduction.

A step is one pick of the scheduler: the trap a task was parked at is carried out, then
the task runs until its next trap. DPOR needs to know which steps commute. A footprint
is a dict ``resource -> written`` built from two sources:

- the trap itself (a lock, a wait queue, a named resource of a ``sched_point``), see
  ``of_event``;
- what the Python code run during the step touched, recorded while ``ACTIVE`` is set:
  every byte of guest RAM through ``PhysMem`` at page-frame granularity (page tables and
  page contents; ``recording()`` swaps the instance's class, so ordinary runs pay
  nothing); every attribute of the model's objects (folios, VMAs, mms, page-table
  descriptors, page caches, swap devices, uffd contexts: ``tracking()`` patches their
  classes for the length of a search), one resource per object and attribute, where
  reading an attribute that holds a mutable container counts as a write (the caller
  may change what it holds); the page allocator
  (which frame comes next depends on the order of allocations), wait queues and RCU
  state (``touch`` calls in mm_core).

Two steps are dependent when one writes what the other reads or writes, or when either
runs guest code (GLOBAL: a Unicorn quantum reads and writes RAM the model never sees).
The contract that makes this sound is the one traps.py states for the whole model: every
racy action awaits a trap, and state no trap covers is guarded by a lock. It is checked,
not trusted: ``emu.explore.audit_commutation`` swaps adjacent independent steps of real
runs and demands the same per-task events and the same end state.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from emu.physmem import PAGE_SHIFT, PhysMem

GLOBAL = ("*",)                     # depends on everything
RCU = ("rcu",)                      # readers read it, grace periods and call_rcu write it
ALLOC = ("alloc",)                  # the page allocator's free lists

ACTIVE: dict[Any, bool] | None = None     # the running step's footprint, while recording


def touch(res: Any, write: bool = True) -> None:
    """Note an access to ``res`` by the running step (a no-op unless a DPOR run records)."""
    fp = ACTIVE
    if fp is not None:
        if write:
            fp[res] = True
        elif res not in fp:
            fp[res] = False


def of_event(event: tuple | None) -> dict[Any, bool]:
    """The part of a step's footprint its trap names."""
    if event is None:
        return {}
    kind = event[0]
    if kind == "point":
        what, res = event[1], event[2]
        if res is None or what in _DYNAMIC_POINTS:
            return {}
        return {_key(res): True}
    if kind in ("lock", "trylock"):
        return {lock_key(event[1]): event[2] != "r"}
    if kind == "unlock":
        return {lock_key(event[1]): True}
    if kind in ("wait", "wake"):
        return {lock_key(event[1]): True}
    if kind == "user":
        return {GLOBAL: True}
    return {}                       # self, choose, sleep: nothing shared


# points whose access is recorded exactly by the code after them (PhysMem, touch()), so
# the trap's own resource would only add false dependencies (an rcu_read_lock names the
# task, a pt_read the entry, which RAM recording sees at frame granularity anyway)
_DYNAMIC_POINTS = frozenset({"pt_read", "pt_write", "hw_walk", "rcu_read_lock", "rcu_read_unlock"})


def lock_key(lock: Any) -> tuple:
    """A lock or wait queue by name: the same in every execution of a world, where an
    id() is not (two that share a name only add a dependency)."""
    folio = getattr(lock, "folio", None)        # PG_locked: the folio's own
    if folio is not None:
        return ("lock", "folio", folio.pfn)
    return ("lock", type(lock).__name__, getattr(lock, "name", ""))


def renumber(fp: dict[Any, bool], numbers: dict[int, int]) -> dict[Any, bool]:
    """``fp`` with every object known by id() renamed ("obj", N): N counts the objects
    of the run in the order they were first touched. Executions that make the same
    decisions touch the same objects in the same order, so the names agree between them
    up to where they part; an id() does not even survive the world's restore."""
    out = {}
    for res, written in fp.items():
        if type(res) is tuple and res[0] in ("obj", "id"):
            res = ("obj", numbers.setdefault(res[1], len(numbers)), *res[2:])
            written = written or out.get(res, False)
        out[res] = written
    return out


def for_sibling(fp: dict[Any, bool], base: int) -> dict[Any, bool]:
    """A step's footprint as another execution may compare it (DPOR's sleep sets): the
    objects it was the first to touch (numbers from ``base`` on) may carry other
    numbers there, so they become one wildcard that any such object conflicts with."""
    out = {}
    for res, written in fp.items():
        if type(res) is tuple and res[0] == "obj" and res[1] >= base:
            out[("new", base)] = True
        else:
            out[res] = written
    return out


def dependent_sibling(sleeping: dict[Any, bool], fp: dict[Any, bool]) -> bool:
    """dependent() for a footprint from for_sibling()."""
    if dependent(sleeping, fp):
        return True
    for res in sleeping:
        if type(res) is tuple and res[0] == "new":
            base = res[1]
            return any(type(r) is tuple and r[0] == "obj" and r[1] >= base for r in fp)
    return False


def _key(res: Any) -> Any:
    if isinstance(res, (int, str, tuple)):
        return ("res", res)
    return ("id", id(res))


def dependent(a: dict[Any, bool], b: dict[Any, bool]) -> bool:
    """Do two steps' footprints conflict (a write against any access of the same thing)?"""
    if GLOBAL in a or GLOBAL in b:
        return bool(a) and bool(b)
    if len(a) > len(b):
        a, b = b, a
    for res, written in a.items():
        other = b.get(res)
        if other is not None and (written or other):
            return True
    return False


# -- model objects at object granularity ------------------------------------------------------

_MUTABLE = (dict, list, set, bytearray)


def _get(self, name):
    value = object.__getattribute__(self, name)
    fp = ACTIVE
    if fp is not None and not name.startswith("__"):
        key = ("obj", id(self), name)
        if isinstance(value, _MUTABLE):
            fp[key] = True
        elif key not in fp:
            fp[key] = False
    return value


def _set(self, name, value):
    fp = ACTIVE
    if fp is not None:
        fp[("obj", id(self), name)] = True
    object.__setattr__(self, name, value)


@contextlib.contextmanager
def tracking(classes: list[type]) -> Iterator[None]:
    """Record attribute reads and writes of instances of ``classes`` while a recorded
    step runs (DPOR searches only: it slows every attribute access)."""
    saved = []
    for cls in classes:
        saved.append((cls, cls.__dict__.get("__getattribute__"), cls.__dict__.get("__setattr__")))
        cls.__getattribute__ = _get
        cls.__setattr__ = _set
    try:
        yield
    finally:
        for cls, get, set_ in saved:
            for name, old in (("__getattribute__", get), ("__setattr__", set_)):
                if old is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, old)


# -- guest RAM at frame granularity ---------------------------------------------------------

def _frames(fp: dict[Any, bool], paddr: int, n: int, write: bool) -> None:
    first, last = paddr >> PAGE_SHIFT, (paddr + max(n, 1) - 1) >> PAGE_SHIFT
    for frame in range(first, last + 1):
        if write:
            fp[frame] = True
        elif frame not in fp:
            fp[frame] = False


class RecordingPhysMem(PhysMem):
    """PhysMem that notes every frame a step reads or writes in ``ACTIVE``."""

    def read(self, paddr, n):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, n, False)
        return super().read(paddr, n)

    def write(self, paddr, data):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, len(data), True)
        super().write(paddr, data)

    def scatter(self, paddr, stride, items, size):
        if ACTIVE is not None and items:
            _frames(ACTIVE, paddr, (len(items) // size - 1) * stride + size, True)
        super().scatter(paddr, stride, items, size)

    def fill(self, paddr, n, byte):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, n, True)
        super().fill(paddr, n, byte)

    def copy(self, dst, src, n=1 << PAGE_SHIFT):
        if ACTIVE is not None:
            _frames(ACTIVE, src, n, False)
            _frames(ACTIVE, dst, n, True)
        super().copy(dst, src, n)

    def read_entry(self, paddr):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, 8, False)
        return super().read_entry(paddr)

    def read_entries(self, paddr, count):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, 8 * count, False)
        return super().read_entries(paddr, count)

    def write_entry(self, paddr, value):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, 8, True)
        super().write_entry(paddr, value)

    def cmpxchg_entry(self, paddr, old, new):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, 8, True)
        return super().cmpxchg_entry(paddr, old, new)

    def fill_entries(self, paddr, count, value):
        if ACTIVE is not None:
            _frames(ACTIVE, paddr, 8 * count, True)
        super().fill_entries(paddr, count, value)


def recording(physmem: PhysMem) -> None:
    """Make ``physmem`` note its accesses (for the rest of its life: one run)."""
    if type(physmem) is PhysMem:
        physmem.__class__ = RecordingPhysMem
