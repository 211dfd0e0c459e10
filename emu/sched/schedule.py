"""Schedules: the pick sequence of one run, as data a human can paste.

A schedule names the scenario and its settings and lists, run-length encoded, which
task ran at each step (task names, so it survives small code changes better than
indices). Two forms, both round-trip:

  printable  ``emu1.`` + base64url(msgpack)     e.g. emu1.haNzY2W...
  text       ``walker:7 retract:12 walker:*``   (the form ``Scenario.run`` takes)

``digest`` is a hash of the event sequence (task, trap kind, resource), used by replay to
say exactly where a run stopped following the recorded one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import msgpack

PREFIX = "emu1."


class ScheduleFormatError(ValueError):
    """Not a schedule emu can read."""


@dataclass
class Schedule:
    scenario: str
    kernel: str = "6.6"
    arch: str = "x86_64"
    inject: str = ""
    tasks: list[str] = field(default_factory=list)       # task names, index = position
    runs: list[tuple[int, int]] = field(default_factory=list)   # (task index, steps)
    digest: str = ""
    strategy: str = ""
    seed: int = 0
    data: list[int] = field(default_factory=list)        # data choices, in order

    # -- building ------------------------------------------------------------------------
    @classmethod
    def from_picks(cls, picks: list[str], **meta: Any) -> Schedule:
        index: dict[str, int] = {}          # task name -> its number, in order of first pick
        runs: list[tuple[int, int]] = []
        for name, run in itertools.groupby(picks):
            i = index.setdefault(name, len(index))
            runs.append((i, len(list(run))))
        return cls(tasks=list(index), runs=runs, **meta)

    def picks(self) -> list[str]:
        return [self.tasks[i] for i, n in self.runs for _ in range(n)]

    @property
    def steps(self) -> int:
        return sum(n for _, n in self.runs)

    @property
    def preemptions(self) -> int:
        """Switches between tasks (an upper bound on preemptions: some switches happen
        because the running task blocked or finished)."""
        return max(0, len(self.runs) - 1)

    # -- forms ---------------------------------------------------------------------------
    def text(self) -> str:
        runs = " ".join(f"{self.tasks[i]}:{n}" for i, n in self.runs)
        return runs + (f"  [data {' '.join(map(str, self.data))}]" if any(self.data) else "")

    def encode(self) -> str:
        body = msgpack.packb([1, self.scenario, self.kernel, self.arch, self.inject, self.tasks,
                              [x for run in self.runs for x in run], self.digest, self.strategy,
                              self.seed, self.data])
        return PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Schedule:
        text = text.strip()
        if not text.startswith(PREFIX):
            raise ScheduleFormatError(f"a schedule starts with {PREFIX!r} (got {text[:12]!r})")
        b64 = text[len(PREFIX):]
        try:
            body = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
            fields = msgpack.unpackb(body)
        except (binascii.Error, ValueError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as err:
            raise ScheduleFormatError(f"corrupt schedule: {err}") from None
        if not isinstance(fields, list) or len(fields) != 11 or fields[0] != 1:
            raise ScheduleFormatError("corrupt schedule: unknown layout or version")
        _, scenario, kernel, arch, inject, tasks, flat, digest, strategy, seed, data = fields
        if len(flat) % 2 or any(not 0 <= i < len(tasks) for i in flat[0::2]):
            raise ScheduleFormatError("corrupt schedule: bad run list")
        runs = list(zip(flat[0::2], flat[1::2], strict=True))
        return cls(scenario, kernel, arch, inject, list(tasks), runs, digest, strategy, seed, list(data))


class Digest:
    """Hash of the event sequence: (task name, trap kind, what it acted on), one line per
    event. The lines are hashed when the digest is asked for (blake2b of their
    concatenation, the same as feeding them one by one)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._done: tuple[int, str] = (-1, "")

    @property
    def events(self) -> int:
        return len(self.lines)

    def observe(self, task: Any, event: tuple) -> None:
        kind = event[0]
        what = event[1] if kind == "point" else getattr(event[1], "name", "") if len(event) > 1 else ""
        self.lines.append(f"{task.name}|{kind}|{what}\n")

    def hexdigest(self) -> str:
        if self._done[0] != len(self.lines):
            h = hashlib.blake2b("".join(self.lines).encode(), digest_size=8)
            self._done = (len(self.lines), h.hexdigest())
        return self._done[1]
