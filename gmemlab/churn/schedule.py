"""A modelled day of VM churn on one host: which VMs start and stop, and when.

The schedule is drawn from a seed and does not depend on the design, so every
design runs exactly the same sequence of creations and teardowns:

* ``vms`` VMs arrive at uniformly random times over ``hours``;
* each asks for a size drawn uniformly from ``sizes_mib`` (whole 2 MiB blocks);
* each lives an exponentially distributed time whose mean is set so that the
  host is, on average, ``occupancy`` full (Little's law: occupancy x RAM =
  arrival rate x mean lifetime x mean size);
* a VM that would take the guest memory committed on the host above
  ``max_fill`` of its RAM is refused (a host's admission control): it is counted,
  never created.  VMs still alive at the end of the day stay alive.

Our choice: no host workload besides the VMs, and every VM fully touched by its
guest at creation (the worst case for the direct map, and what the issue asks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from gmemlab.uapi import PAGE_SIZE, PAGES_PER_PMD

MIB_PAGES = (1 << 20) // PAGE_SIZE
LOW_RAM_MIB = 2048  # RAM below the PCI hole, as the model's MachineConfig has it


@dataclass(frozen=True, slots=True)
class ChurnConfig:
    host_gib: int = 256  # RAM of the host: 2 GiB below 4 GiB, the rest above
    vms: int = 1000
    hours: float = 24.0
    sizes_mib: tuple[int, int] = (1024, 16384)
    occupancy: float = 0.6
    max_fill: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the first bad field (the command line checks before any work)."""
        lo, hi = self.sizes_mib
        if self.host_gib < 3:
            raise ValueError(f"a host of at least 3 GiB, not {self.host_gib}")
        if not 2 <= lo <= hi or lo % 2 or hi % 2:
            raise ValueError(f"VM sizes must be whole 2 MiB blocks with min <= max, not {lo}-{hi} MiB")
        if hi > self.max_fill * self.host_gib * 1024:
            raise ValueError(f"a {hi} MiB VM cannot fit in {self.max_fill:.0%} of a {self.host_gib} GiB host")
        if not 0 < self.occupancy <= self.max_fill <= 1:
            raise ValueError("need 0 < occupancy <= max_fill <= 1")
        if self.vms < 1 or self.hours <= 0:
            raise ValueError("need at least one VM and a positive duration")

    @property
    def ram_gib_high(self) -> float:
        """The model's ``MachineConfig.ram_gib``: the RAM above 4 GiB."""
        return self.host_gib - LOW_RAM_MIB / 1024

    @property
    def ram_pages(self) -> int:
        return self.host_gib * 1024 * MIB_PAGES


@dataclass(frozen=True, slots=True)
class Event:
    hours: float
    kind: Literal["create", "destroy"]
    vm: int
    pages: int


@dataclass(frozen=True, slots=True)
class Schedule:
    config: ChurnConfig
    events: tuple[Event, ...]
    refused: int  # VMs admission control turned away
    mean_life_hours: float

    @property
    def created(self) -> int:
        return sum(1 for e in self.events if e.kind == "create")


def make_schedule(cfg: ChurnConfig) -> Schedule:
    """The day's events in time order (a teardown before a creation at the same instant)."""
    cfg.validate()
    rng = random.Random(f"churn:{cfg.seed}")
    lo, hi = (s // 2 for s in cfg.sizes_mib)
    arrivals = sorted(rng.uniform(0, cfg.hours) for _ in range(cfg.vms))
    sizes = [rng.randint(lo, hi) * 2 * MIB_PAGES for _ in range(cfg.vms)]
    mean_pages = (lo + hi) * MIB_PAGES  # mean of 2 MiB x U[lo, hi]
    mean_life = cfg.occupancy * cfg.ram_pages * cfg.hours / (cfg.vms * mean_pages)
    lives = [rng.expovariate(1 / mean_life) for _ in range(cfg.vms)]
    cap = cfg.max_fill * cfg.ram_pages
    live: dict[int, tuple[float, int]] = {}  # vm -> (end, pages)
    committed = 0
    events: list[Event] = []
    refused = 0
    for vm, (start, pages, life) in enumerate(zip(arrivals, sizes, lives, strict=True)):
        for other, (end, size) in sorted(live.items(), key=lambda kv: kv[1][0]):
            if end <= start:
                events.append(Event(end, "destroy", other, size))
                committed -= size
                del live[other]
        if committed + pages > cap:
            refused += 1
            continue
        events.append(Event(start, "create", vm, pages))
        committed += pages
        live[vm] = (start + life, pages)
    events.extend(Event(end, "destroy", vm, size) for vm, (end, size) in sorted(
        live.items(), key=lambda kv: kv[1][0]) if end < cfg.hours)
    assert all(e.pages % PAGES_PER_PMD == 0 for e in events)
    return Schedule(cfg, tuple(events), refused, mean_life)
