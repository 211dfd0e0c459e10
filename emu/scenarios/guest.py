"""Guest-program scenarios: real threads on several vCPUs.
"""
from __future__ import annotations

from emu.scenario import Scenario
from emu.scenarios.base import (
    World,
    scenario,
)


@scenario("guest-collapse-race",
          "the collapse_race guest program: two threads verify a shmem mapping while a third "
          "loops MADV_COLLAPSE and MADV_DONTNEED over it, on four vCPUs; every quantum, fault, "
          "syscall and table access is a scheduling point",
          mem="64M", cpus=4, quantum=2000, max_steps=2_000_000, prefault=True)
def guest_collapse_race(sc: Scenario) -> World:
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "workloads", "bin", sc.machine.arch.name, "collapse_race")
    proc = sc.machine.spawn(path, ["collapse_race", "2"])
    return World(extra={"proc": proc, "expect": b"mismatches 0\n"})
