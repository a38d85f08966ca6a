"""The churn on the full model: every VM created, bound, touched by its guest and torn down.

The reference the region level (:mod:`gmemlab.churn.regions`) is held to, and the
way to run a design the region level cannot state (``gmemlab churn --full``).
Each creation is a VM with one guest_memfd (NO_DIRECT_MAP where the design offers
it) bound as its memory and a guest that writes every page; each teardown
closes the vCPU, the guest_memfd and the VM.  It costs what the model costs per
page (microseconds batched, tens of them per page where the gate keeps a design
per page): hosts of a few GiB, not 256.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gmemlab.churn.regions import ChurnResult, Sample
from gmemlab.churn.schedule import Schedule
from gmemlab.expose.scenario import Guest, Scenario, ScenarioConfig
from gmemlab.model.designs import Design, get_design


def run_full(design: str | Design, schedule: Schedule,
             progress: Callable[[int, int], None] | None = None) -> ChurnResult:
    """``schedule`` on the full model of ``design``, sampled after every event."""
    t0 = time.perf_counter()
    d = get_design(design)
    sc = Scenario(d, ScenarioConfig(ram_gib=schedule.config.ram_gib_high, invariants="off"))
    m = sc.m
    res = ChurnResult(d.name, "full model", f"{d.name}: the full model")
    guests: dict[int, Guest] = {}
    live = 0

    def sample(hours: float, event: str) -> Sample:
        c = m.dmap.meminfo()
        return Sample(hours, event, (c.direct_map_4k, c.direct_map_2m, c.direct_map_1g),
                      m.dmap.splits_2m, m.dmap.splits_1g, m.trace.counts["pt_alloc"], live)

    res.samples.append(sample(0.0, "boot"))
    for i, e in enumerate(schedule.events):
        if e.kind == "create":
            g = guests[e.vm] = sc.new_guest(e.pages)
            sc.guest_fill(g, 1 + e.vm % 255)
            live += e.pages
        else:
            sc.close_guest(guests.pop(e.vm))
            live -= e.pages
        res.samples.append(sample(e.hours, f"{e.kind} {e.vm}"))
        if progress:
            progress(i, len(schedule.events))
    res.seconds = time.perf_counter() - t0
    return res
