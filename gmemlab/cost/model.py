"""Per-event costs: the time the model's event counts stand for.

The model counts kernel events (``Trace.counts``); a :class:`CostModel` prices
them.  Every priced event names one :class:`CostParams` field
(:data:`EVENT_PARAM`); everything else the model counts is bookkeeping inside a
priced event (``kernel_write`` is part of ``zero_page``, ``pt_alloc`` comes with
an ``alloc_page`` and a split, ...) and costs nothing on its own.

A kernel TLB flush (``tlb_flush``: one per ``flush_tlb_kernel_range()`` or
``flush_tlb_all()``) costs the initiating CPU's own invalidation plus, on x86
with more than one CPU, one ``on_each_cpu()`` round trip.  The round trip grows
with the number of CPUs it waits for::

    ipi_round(n) = ipi_base + ipi_per_cpu * (n - 1)        (n > 1; 0 for n = 1)

The prior's shape is 1 µs + 0.2 µs per receiving CPU (anchors §E.1, §E.4);
:mod:`gmemlab.cost.calibrate` keeps that shape and scales it to this machine.
Because every flush interrupts every other CPU, the count of IPIs is
``tlb_flush * (n - 1)``: the same event counts are priced for any CPU count,
which is how the slowdown-against-CPUs curves are drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Literal

# event (Trace.counts key) -> CostParams field
EVENT_PARAM: dict[str, str] = {
    "user_fault": "user_fault",
    "spte_map": "guest_fault",
    "alloc_page": "alloc_page",
    "alloc_block": "alloc_block",
    "pagecache_add": "pagecache_add",
    "zero_page": "zero_page",
    "dmap_clear": "pte_change",
    "dmap_set": "pte_change",
    "dmap_clear_2m": "pte_change",
    "dmap_set_2m": "pte_change",
    "dmap_clear_1g": "pte_change",
    "dmap_set_1g": "pte_change",
    "dmap_split_2m": "split",
    "dmap_split_1g": "split",
    "tlb_flush": "flush_local",
    "free_page": "free_page",
    "mermap_map": "mermap",
    "user_copy_page": "user_copy_page",
}
FLUSH_EVENT = "tlb_flush"

IpiModel = Literal["scaled", "prior"]

# The prior's shape of an on_each_cpu() round trip (anchors §E.1: ~1 µs + ~0.2 µs per receiver).
IPI_PRIOR_BASE_US = 1.0
IPI_PRIOR_PER_CPU_US = 0.2


@dataclass(frozen=True, slots=True)
class CostParams:
    """Cost of one event, in µs, on the CPU that runs the path."""

    user_fault: float  # user page fault: trap, handle_mm_fault, PTE install (no alloc/zero/insert)
    guest_fault: float  # guest stage-2 fault: exit, KVM MMU fault, stage-2 map (no alloc/zero/insert)
    alloc_page: float  # order-0 buddy allocation
    alloc_block: float  # order-9 allocation handed out as 512 frames
    pagecache_add: float  # filemap_add_folio
    zero_page: float  # clear_page of 4 KiB
    pte_change: float  # CPA: one direct-map entry set or cleared (4 KiB PTE or 2 MiB PMD)
    split: float  # split_large_page beyond its page-table allocation: fill and install a table
    flush_local: float  # the flushing CPU's own invalidation
    ipi_base: float  # on_each_cpu() round trip, fixed part
    ipi_per_cpu: float  # ... per receiving CPU
    free_page: float  # removing a folio from the page cache and freeing it (munmap + close share)
    user_copy_page: float  # the VMM copying 4 KiB into guest memory
    mermap: float  # map and unmap a per-CPU temporary mapping, local INVLPG

    def ipi_round(self, ncpus: int) -> float:
        return 0.0 if ncpus <= 1 else self.ipi_base + self.ipi_per_cpu * (ncpus - 1)

    def with_ipi_model(self, model: IpiModel) -> CostParams:
        """The same costs with the calibrated IPI round trip, or the bare-metal prior."""
        if model == "scaled":
            return self
        return replace(self, ipi_base=IPI_PRIOR_BASE_US, ipi_per_cpu=IPI_PRIOR_PER_CPU_US)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Prices event counts for a machine of ``ncpus`` CPUs."""

    params: CostParams
    ncpus: int
    broadcast: bool = False  # arm64 TLBI IS / AMD INVLPGB: no IPIs

    def at(self, ncpus: int) -> CostModel:
        return replace(self, ncpus=ncpus)

    def flush_cost(self) -> float:
        p = self.params
        return p.flush_local + (0.0 if self.broadcast else p.ipi_round(self.ncpus))

    def prices(self) -> dict[str, float]:
        """µs per event, for the events that cost anything."""
        p = self.params
        out = {ev: getattr(p, field) for ev, field in EVENT_PARAM.items()}
        out[FLUSH_EVENT] = self.flush_cost()
        return {ev: c for ev, c in out.items() if c}

    def ipis(self, counts: Mapping[str, float]) -> float:
        return 0.0 if self.broadcast else counts.get(FLUSH_EVENT, 0) * max(self.ncpus - 1, 0)

    def time_us(self, counts: Mapping[str, float]) -> float:
        return sum(counts.get(ev, 0) * c for ev, c in self.prices().items())

    def breakdown(self, counts: Mapping[str, float]) -> dict[str, float]:
        """µs per cost component (CostParams field; ``ipi`` for the flush round trips)."""
        p = self.params
        out: dict[str, float] = {}
        for ev, field in EVENT_PARAM.items():
            n = counts.get(ev, 0)
            if n:
                out[field] = out.get(field, 0.0) + n * getattr(p, field)
        ipi = counts.get(FLUSH_EVENT, 0) * (0.0 if self.broadcast else p.ipi_round(self.ncpus))
        if ipi:
            out["ipi"] = ipi
        return out
