"""Built worlds, kept and restored: the race explorer builds a scenario's world once and
gives every later schedule an exact copy instead of building it again.

    snap = Snapshot.take(sc, world, strategy)        # right after spec.build(sc)
    sc2, world2 = snap.restore(strategy2)             # a world as if built fresh

A snapshot is a pickle of the Scenario (machine, kernel model, scheduler, tasks) and the
World, taken before any task ran. What pickle cannot copy is handled here:

- guest RAM (a host mapping): the frames written so far (PhysMem's dirty map) are saved
  without their trailing zeros (a ``RamTemplate``); a copy starts from a buffer holding
  them (closed copies give theirs back put right again, see ``PhysMem.close``);
- an unstarted coroutine or generator (every spawned task, a wrapper's inner body): made
  again by calling its code with the arguments bound in its frame (its free variables are
  read from the frame too: a cell it shared with another closure becomes its own);
- a closure or lambda (the machine's ``current_task`` hooks, nested task bodies): a new
  function over the same code and module globals, with its cells copied;
- classes, module-level functions, code, modules, module globals, enum members, the arch
  and the kernel profile (immutable), the ``run_sync`` caller (API_TASK) and the strategy:
  shared, not copied (the strategy is the new schedule's). Each goes into the pickle as a
  memo index (below), so a restore imports nothing by name.

The pickle is written twice: the first pass finds the shared objects (a table of them),
the second starts with them, the reconstructors below and the strings of the first pass
(attribute names, interned) already in the pickler's memo, so each is one memo get. A
restore starts its unpickler from a copy of a memo holding the same objects at the same
indices: most of a restore's cost was making those strings and table references again.
The memo writes of the pickle are made explicit (a protocol-4 MEMOIZE numbers from the
memo's length, which a copied memo does not set).

A world that cannot be copied exactly is refused (``take`` returns None) and the caller
builds fresh: guest RAM handed out untracked (``PhysMem.view``, Unicorn vCPUs), a task
that already ran, a lock held by the run_sync caller.
"""
from __future__ import annotations

import collections
import copyreg
import enum
import inspect
import io
import operator
import pickle
import pickletools
import struct
import sys
import types
from typing import Any

from emu.arch import ArchSpec
from emu.physmem import PhysMem, RamTemplate
from emu.sched.loop import API_TASK
from mm_core.config import Profile
from mm_core.shmem import AddressSpace


class NotSnapshotable(Exception):
    """Something in the world has no exact copy."""


def _make_cell() -> types.CellType:
    return types.CellType()


def _set_cell(cell: types.CellType, state: tuple) -> None:
    if state:
        cell.cell_contents = state[0]


def _make_function(code: types.CodeType, module: str, name: str, defaults, kwdefaults,
                   closure, qualname: str, attrs: dict) -> types.FunctionType:
    fn = types.FunctionType(code, vars(sys.modules[module]), name, defaults, closure)
    fn.__kwdefaults__ = kwdefaults
    fn.__qualname__ = qualname
    fn.__dict__.update(attrs)
    return fn


def _make_coroutine(code: types.CodeType, module: str, closure, args: tuple, kwargs: dict):
    """The coroutine (or generator) a call of ``code`` with these arguments returns, unstarted."""
    return types.FunctionType(code, vars(sys.modules[module]), code.co_name, None, closure)(*args, **kwargs)


def _make_counter(counts: dict) -> collections.Counter:
    """A Counter with these counts (Counter's own unpickling goes through its Python
    __init__ and update())."""
    c = collections.Counter.__new__(collections.Counter)
    dict.update(c, counts)
    return c


def _runs(pages: dict) -> list[tuple[int, int, Any]]:
    """A page cache as (first index, count, folio) runs, in its order (a PMD-order folio
    sits at 512 indices: one run)."""
    runs: list = []
    for index, folio in pages.items():
        if runs and runs[-1][2] is folio and runs[-1][0] + runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([index, 1, folio])
    return [tuple(run) for run in runs]


_RUN_KEYS: dict[tuple[int, int], dict] = {}     # (first, count) -> its indices, as dict keys


def _run_keys(first: int, count: int) -> dict:
    """The indices of a run as a dict's keys: dict.fromkeys() of a dict sizes the result
    once and reuses the keys' hashes (a range takes twice as long, with every index made
    again)."""
    keys = _RUN_KEYS.get((first, count))
    if keys is None:
        keys = _RUN_KEYS[first, count] = dict.fromkeys(range(first, first + count))
    return keys


def _set_address_space(mapping: AddressSpace, state: dict) -> None:
    runs = state["i_pages"]
    if len(runs) == 1:                  # the common case (one PMD-order folio): no second copy
        first, count, folio = runs[0]
        pages = dict.fromkeys(_run_keys(first, count), folio)
    else:
        pages = {}
        for first, count, folio in runs:
            pages.update(dict.fromkeys(_run_keys(first, count), folio))
    vars(mapping).update(state)
    mapping.i_pages = pages


def _frame_call(frame: types.FrameType, code: types.CodeType) -> tuple[tuple, dict, tuple]:
    """(args, kwargs, free variable values) bound in the frame of an unstarted call."""
    names = code.co_varnames
    local = frame.f_locals
    n, kw = code.co_argcount, code.co_kwonlyargcount
    args = [local[name] for name in names[:n]]
    kwargs = {name: local[name] for name in names[n:n + kw]}
    i = n + kw
    if code.co_flags & inspect.CO_VARARGS:
        args.extend(local[names[i]])
        i += 1
    if code.co_flags & inspect.CO_VARKEYWORDS:
        kwargs.update(local[names[i]])
    free = tuple(local[name] for name in code.co_freevars)
    return tuple(args), kwargs, free


def _module_of(globals_: dict) -> str:
    """The name of the module whose globals these are (functions are remade over them)."""
    name = globals_.get("__name__")
    if name is None or getattr(sys.modules.get(name), "__dict__", None) is not globals_:
        raise NotSnapshotable(f"globals of no importable module ({name})")
    return name


# kept by reference: immutable, or code; classes and module-level functions too (the C
# unpickler's import of a global by name is slow)
_SHARED = (type, types.CodeType, types.ModuleType, types.BuiltinFunctionType, enum.Enum, ArchSpec, Profile)


class _Table:
    """Stands for the table of shared objects in the pickle (one persistent reference,
    then memoized: each shared object is ``operator.getitem(table, index)``)."""


_TABLE = _Table()


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, outside: dict[int, str], table: list) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.outside = outside          # id -> name: objects given to restore() (RAM, strategy)
        self.table = table
        self.index: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        return self.outside.get(id(obj))

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if obj is _TABLE:
            return (_table_ref, ())
        if t is types.FunctionType and (obj.__closure__ is not None or "<" in obj.__qualname__):
            return (_make_function, (obj.__code__, _module_of(obj.__globals__), obj.__name__,
                                     obj.__defaults__, obj.__kwdefaults__, obj.__closure__,
                                     obj.__qualname__, dict(vars(obj))))
        if id(obj) in _BY_NAME:
            return NotImplemented                       # the reconstructors: imported once
        if isinstance(obj, _SHARED) or t is types.FunctionType:
            i = self.index.get(id(obj))
            if i is None:
                i = self.index[id(obj)] = len(self.table)
                self.table.append(obj)
            return (operator.getitem, (_TABLE, i))
        if t is AddressSpace:
            state = dict(vars(obj))
            state["i_pages"] = _runs(obj.i_pages)
            return (copyreg.__newobj__, (t,), state, None, None, _set_address_space)
        if t is collections.Counter:
            return (_make_counter, (dict(obj),))
        if t is types.CellType:
            try:
                state = (obj.cell_contents,)
            except ValueError:
                state = ()
            return (_make_cell, (), state, None, None, _set_cell)
        if t is types.CoroutineType or t is types.GeneratorType:
            if t is types.CoroutineType:
                frame, code, state = obj.cr_frame, obj.cr_code, inspect.getcoroutinestate(obj)
            else:
                frame, code, state = obj.gi_frame, obj.gi_code, inspect.getgeneratorstate(obj)
            if state not in ("CORO_CREATED", "GEN_CREATED"):
                raise NotSnapshotable(f"{code.co_qualname}: started or finished")
            args, kwargs, free = _frame_call(frame, code)
            closure = tuple(types.CellType(v) for v in free) or None
            return (_make_coroutine, (code, _module_of(frame.f_globals), closure, args, kwargs))
        if t is PhysMem:
            raise NotSnapshotable("a second guest RAM")
        return NotImplemented


_RECONSTRUCTORS = (operator.getitem, _make_cell, _set_cell, _make_function, _make_coroutine, _make_counter,
                   _set_address_space, copyreg.__newobj__)
_BY_NAME = {id(f) for f in _RECONSTRUCTORS}
_loading: list = []         # the table of the snapshot being restored


def _table_ref() -> list:
    return _loading[-1]


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, outside: dict[str, Any]) -> None:
        super().__init__(file)
        self.outside = outside

    def persistent_load(self, key: str) -> Any:
        return self.outside[key]


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


def _seed(table: list, data: bytes) -> list:
    """What the second pass starts with in its memo: the shared objects, the
    reconstructors, and every string the first pass wrote (interned: an attribute name is
    the interned string itself, so the pickler finds it by identity)."""
    seed = list(dict.fromkeys([*table, *_RECONSTRUCTORS], None))
    seen = {id(obj) for obj in seed}
    for op, arg, _ in pickletools.genops(data):
        if op.name in _STRINGS:
            s = sys.intern(arg)
            if id(s) not in seen:
                seen.add(id(s))
                seed.append(s)
    return seed


def _explicit_puts(data: bytes, first: int) -> bytes:
    """The pickle with each MEMOIZE that a later get reads as a PUT of its index (the
    pickler numbered them from ``first``, after the seeded memo), the others dropped, and
    everything after PROTO in one frame (without frames the unpickler reads its file
    opcode by opcode)."""
    ops = list(pickletools.genops(data))
    used = {arg for op, arg, _ in ops if op.name in ("BINGET", "LONG_BINGET", "GET")}
    if ops[0][0].name != "PROTO":
        raise NotSnapshotable("a pickle without PROTO")
    head, out = data[:ops[1][2]], bytearray()
    index = first
    for j, (op, _, pos) in enumerate(ops[1:], 1):
        end = ops[j + 1][2] if j + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "MEMOIZE":
            if index in used:
                out += (pickle.BINPUT + bytes([index])) if index < 256 else \
                    (pickle.LONG_BINPUT + struct.pack("<I", index))
            index += 1
            continue
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            raise NotSnapshotable("a pickle with explicit memo indices")
        out += data[pos:end]
    return head + pickle.FRAME + struct.pack("<Q", len(out)) + bytes(out)


class _SeedLoader(pickle.Unpickler):
    def __init__(self, seed: list) -> None:
        # each object of the seed put into the memo at its index: BININT i, BINPERSID,
        # LONG_BINPUT i, POP
        stream = b"".join(pickle.BININT + struct.pack("<i", i) + pickle.BINPERSID + pickle.LONG_BINPUT
                          + struct.pack("<I", i) + pickle.POP for i in range(len(seed)))
        super().__init__(io.BytesIO(stream + pickle.NONE + pickle.STOP))
        self.seed = seed

    def persistent_load(self, i: int) -> Any:
        return self.seed[i]


def _seeded_memo(seed: list) -> Any:
    """An unpickler memo (a proxy: assigning it to another unpickler copies it in C) with
    ``seed[i]`` at index i. (Assigning a dict to ``Unpickler.memo`` loses it in 3.11.)"""
    loader = _SeedLoader(seed)
    loader.load()
    return loader.memo


class Snapshot:
    """A built world, to be restored any number of times."""

    def __init__(self, data: bytes, table: list, ram: RamTemplate, seed: list) -> None:
        self.data = data
        self.table = table
        self.ram = ram          # guest RAM as built
        self.memo = _seeded_memo(seed)

    @classmethod
    def take(cls, sc: Any, world: Any, strategy: Any) -> Snapshot | None:
        """The world ``spec.build(sc)`` made, before anything ran; None when it cannot be
        copied exactly (build fresh instead)."""
        ram: PhysMem = sc.machine.ram
        if ram.exposed or sc.machine.vcpus or API_TASK.held or API_TASK.kstate:
            return None
        outside = {id(ram): "ram", id(strategy): "strategy", id(API_TASK): "api",
                   id(_table_ref): "table"}
        table: list = []
        try:
            buf = io.BytesIO()
            _Pickler(buf, outside, table).dump((sc, world))
            seed = _seed(table, buf.getvalue())
            buf = io.BytesIO()
            pickler = _Pickler(buf, outside, table)
            pickler.memo = {id(obj): (i, obj) for i, obj in enumerate(seed)}
            pickler.dump((sc, world))
            data = _explicit_puts(buf.getvalue(), len(seed))
        except Exception:           # NotSnapshotable, or something pickle cannot take
            return None
        return cls(data, table, RamTemplate.of(ram), seed)

    def restore(self, strategy: Any) -> tuple[Any, Any]:
        """A fresh copy of the world, scheduled by ``strategy``."""
        ram = PhysMem(self.ram.size, self.ram.big_endian, prefault=False, template=self.ram)
        outside = {"ram": ram, "strategy": strategy, "api": API_TASK, "table": _table_ref}
        _loading.append(self.table)
        unpickler = _Unpickler(io.BytesIO(self.data), outside)
        unpickler.memo = self.memo
        try:
            sc, world = unpickler.load()
        finally:
            _loading.pop()
        sc.sched.strategy = strategy
        sc.sched.policy = strategy.name
        return sc, world
