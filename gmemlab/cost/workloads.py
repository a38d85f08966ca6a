"""The cost workloads: what a VMM does to guest memory, at the sizes the model can run.

Each workload runs a guest with ``pages`` of guest_memfd on a fresh modelled
host; only its *measured* phases count (setting up the VM is not per-page
work).  All guest memory is secret (the guest writes every byte), so the same
run also measures exposure.

``boot``
    First touch of all guest memory by the guest (a faulting boot, as
    Firecracker runs: no preallocation).
``boot-prealloc``
    The VMM fallocates the whole file first, then the guest touches it; both
    count.  The only workload where zap-at-fallocate differs from v12.
``restore``
    Snapshot-restore-like population: the VMM writes every page through its
    mapping of the guest_memfd (user faults and a 4 KiB copy each).  The series
    reported this "5x" longer with the flush.
``teardown``
    After a boot, the VMM exits and the memory is freed (restores, and the
    splits a 2 MiB zap leaves to the free path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gmemlab.expose.scenario import Scenario
from gmemlab.expose.workloads import GUEST_SECRET, VMM_SECRET


@dataclass(frozen=True, slots=True)
class CostWorkload:
    name: str
    summary: str
    run: Callable[[Scenario, int], None]
    measured: tuple[str, ...]  # the phases whose events are the workload's cost
    series_slowdown: float | None = None  # what the series reported for this kind of work
    series_label: str = ""


def boot(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("first touch")
    sc.guest_fill(g, GUEST_SECRET)


def boot_prealloc(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("fallocate")
    sc.fallocate(g)
    sc.phase("first touch")
    sc.guest_fill(g, GUEST_SECRET)


def restore(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("population")
    sc.vmm_fill(g, VMM_SECRET)


def teardown(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("first touch")
    sc.guest_fill(g, GUEST_SECRET)
    sc.phase("teardown")
    sc.close_guest(g)


COST_WORKLOADS: dict[str, CostWorkload] = {
    w.name: w
    for w in (
        CostWorkload("boot", "guest first touch of all its memory", boot, ("first touch",),
                     40.0, "v7 06/12: gmem faults up to 40x longer (grows with cores)"),
        CostWorkload("boot-prealloc", "VMM fallocates, then guest first touch", boot_prealloc,
                     ("fallocate", "first touch")),
        CostWorkload("restore", "VMM populates every page through its mapping", restore, ("population",),
                     5.0, "v7 06/12: memory population 5x longer"),
        CostWorkload("teardown", "VMM exits after a boot; memory freed", teardown, ("teardown",)),
    )
}
