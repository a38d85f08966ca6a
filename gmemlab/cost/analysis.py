"""Every strategy on every cost workload: counts scaled to N GiB, priced, side by side.

The model runs each workload at ``model_pages`` and at twice that, and
extrapolates every event count linearly to the requested size:

    count(N) = count(s) + (count(2s) - count(s)) * (N - s) / s

That is exact for per-page events (faults, zeroing, zaps, restores, per-fault
flushes and their IPIs), for per-batch events (a flush per N zaps, per
fallocate chunk, per 2 MiB block, per pageblock refill) once ``s`` is a
multiple of the batch, and, up to one at either end, for per-2 MiB-region
events (a split and its page-table allocation happen once per 2 MiB region the
frames cover, and frames are handed out in ascending order on a fresh host).
Constant work (one-time splits of the first region, a pool's first refill)
stays constant.  1 GiB splits happen once per 1 GiB region the frames cover,
which two small runs inside one region cannot show: they are scaled per GiB
instead (the table fill and flush each brings, ~20 µs per GiB, are left out).

Times are the scaled counts priced by the calibrated :class:`CostModel`; the
slowdown is against ``base`` (no removal) on the same workload.  Because every
kernel TLB flush interrupts every other CPU, the same counts are priced again
for other CPU counts: the slowdown-against-CPUs curves.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gmemlab.cost.calibrate import KINDS, Calibration
from gmemlab.cost.model import FLUSH_EVENT, CostModel
from gmemlab.cost.strategies import BASELINE, STRATEGIES, make_design
from gmemlab.cost.workloads import COST_WORKLOADS
from gmemlab.expose.scenario import Scenario, ScenarioConfig
from gmemlab.expose.tracker import ExposureTracker
from gmemlab.model.kvm.arch import PROFILES
from gmemlab.uapi import PAGES_PER_PUD

GIB_PAGES = PAGES_PER_PUD
KB_2M, KB_1G = 2048, 1 << 20
SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, slots=True)
class CostConfig:
    strategies: tuple[str, ...] = STRATEGIES
    workloads: tuple[str, ...] = tuple(COST_WORKLOADS)
    gib: float = 1.0
    model_pages: int = 1024  # a multiple of 512: whole 2 MiB blocks
    ncpus: int = 2
    sweep: tuple[int, ...] = SWEEP
    seed: int = 0
    profile: str = "x86_64"  # the host the model runs as (arm64: TLBI broadcast, its own flushes)

    @property
    def pages(self) -> int:
        return round(self.gib * GIB_PAGES)


@dataclass(slots=True)
class ModelRun:
    """One strategy on one workload at one model size."""

    measured: Counter[str]  # events of the measured phases
    total: Counter[str]  # events of every phase but setup (the state the workload leaves)
    exposure_peak: float | None = None  # share of the secret bytes reachable, at most
    exposure_mean: float | None = None  # ... on average over the measured phases' time
    violations: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class CostRow:
    strategy: str
    workload: str
    pages: int
    counts: dict[str, float]  # measured phases, scaled to ``pages``
    total: dict[str, float]  # every phase, scaled (splits for the direct map after)
    time_us: float
    slowdown: float
    flushes: float
    ipis: float
    dm_after_kb: tuple[float, float, float] | None
    exposure_peak: float | None
    exposure_mean: float | None
    breakdown: dict[str, float]
    violations: dict[str, int]
    sweep: dict[str, list[float]] = field(default_factory=dict)  # IPI model -> slowdown per CPU count
    priced_by: dict[str, float] = field(default_factory=dict)  # share of time_us: measured/fitted/prior

    def priced_by_text(self) -> str:
        """``m/f/p`` percentages of the time priced by measured, fitted and prior figures."""
        return "/".join(f"{100 * self.priced_by.get(k, 0.0):.0f}" for k in KINDS)

    @property
    def per_page_us(self) -> float:
        return self.time_us / self.pages

    @property
    def splits_2m(self) -> float:
        return self.total.get("dmap_split_2m", 0.0)

    def as_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "workload": self.workload,
            "pages": self.pages,
            "time_us": self.time_us,
            "us_per_page": self.per_page_us,
            "slowdown": self.slowdown,
            "flushes": self.flushes,
            "ipis": self.ipis,
            "splits_2m_after": self.splits_2m,
            "splits_1g_after": self.total.get("dmap_split_1g", 0.0),
            "direct_map_after_kB": dict(zip(("4k", "2M", "1G"), self.dm_after_kb, strict=True))
            if self.dm_after_kb else None,
            "exposure": {"peak_share": self.exposure_peak, "mean_share": self.exposure_mean},
            "time_breakdown_us": self.breakdown,
            "counts": self.counts,
            "violations": self.violations,
            "slowdown_by_cpus": self.sweep,
            "priced_by": self.priced_by,
        }


def run_model(strategy: str, workload: str, pages: int, cfg: CostConfig, cost: CostModel, *,
              track: bool) -> ModelRun:
    w = COST_WORKLOADS[workload]
    sc = Scenario(make_design(strategy), ScenarioConfig(ncpus=cfg.ncpus, ram_gib=1.0, seed=cfg.seed,
                                                        profile=cfg.profile))
    tracker = None
    if track:
        tracker = ExposureTracker(sc.m, cost)
        sc.tracker = tracker
        tracker.attach()
    w.run(sc, pages)
    sc.finish()
    phases = [ph.name for ph in sc.phases if ph.name != "setup"]
    run = ModelRun(sc.counts(*w.measured), sc.counts(*phases),
                   violations={k: v for k, v in sc.m.inv.verdicts().items() if v})
    if tracker is not None and tracker.secret_written:
        measured = [ph for ph in tracker.phases if ph.name in w.measured]
        span = sum(ph.end_us - ph.start_us for ph in measured)
        run.exposure_peak = max(ph.peak for ph in measured) / tracker.secret_written
        run.exposure_mean = (sum(ph.byte_us for ph in measured) / span / tracker.secret_written
                             if span else 0.0)
    return run


def extrapolate(small: Counter[str], double: Counter[str], s: int, n: int) -> dict[str, float]:
    """Counts at ``n`` pages from runs at ``s`` and ``2s`` (see the module docstring)."""
    out: dict[str, float] = {}
    for ev in small.keys() | double.keys():
        a, b = small.get(ev, 0), double.get(ev, 0)
        out[ev] = max(0.0, a + (b - a) * (n - s) / s)
    if small.get("dmap_split_1g"):
        out["dmap_split_1g"] = small["dmap_split_1g"] * math.ceil(n / GIB_PAGES)
    return out


def direct_map_after(before_kb: tuple[int, int, int] | None, counts: dict[str, float],
                     page_granular: bool = False) -> tuple[float, float, float] | None:
    """DirectMap4k/2M/1G (kB) after the splits in ``counts``, from this machine's before; a
    profile whose linear map is page granular at boot (arm64 ``force_pte_mapping()``) has the
    same memory all in 4 KiB pages, and nothing to split."""
    if before_kb is None:
        return None
    if page_granular:
        return float(sum(before_kb)), 0.0, 0.0
    s2, s1 = counts.get("dmap_split_2m", 0.0), counts.get("dmap_split_1g", 0.0)
    k4, m2, g1 = before_kb
    return k4 + KB_2M * s2, m2 - KB_2M * s2 + KB_1G * s1, g1 - KB_1G * s1


def analyse(cfg: CostConfig, cal: Calibration,
            progress: Callable[[str], None] | None = None) -> list[CostRow]:
    prof = PROFILES[cfg.profile]
    cost = replace(cal.model(cfg.ncpus), broadcast=prof.tlb_broadcast)
    page_granular = prof.direct_map_granularity == "4k"
    s, n = cfg.model_pages, cfg.pages
    rows: list[CostRow] = []
    jobs = [(w, st) for w in cfg.workloads for st in cfg.strategies]
    for i, (workload, strategy) in enumerate(jobs, 1):
        if progress:
            progress(f"[{i}/{len(jobs)}] {workload} on {strategy}: model runs of {s} and {2 * s} pages")
        small = run_model(strategy, workload, s, cfg, cost, track=True)
        double = run_model(strategy, workload, 2 * s, cfg, cost, track=False)
        counts = extrapolate(small.measured, double.measured, s, n)
        total = extrapolate(small.total, double.total, s, n)
        rows.append(CostRow(
            strategy=strategy, workload=workload, pages=n, counts=counts, total=total,
            time_us=cost.time_us(counts), slowdown=math.nan, flushes=counts.get(FLUSH_EVENT, 0.0),
            ipis=cost.ipis(counts),
            dm_after_kb=direct_map_after(cal.measurement.direct_map_kb, total, page_granular),
            exposure_peak=small.exposure_peak, exposure_mean=small.exposure_mean,
            breakdown=cost.breakdown(counts), violations=small.violations,
            priced_by=cal.priced_by(cost.breakdown(counts)),
        ))
    _relate(rows, cal, cfg)
    return rows


def _relate(rows: list[CostRow], cal: Calibration, cfg: CostConfig) -> None:
    """Slowdowns against the baseline, at the table's CPU count and across the sweep."""
    base = {r.workload: r for r in rows if r.strategy == BASELINE}
    for r in rows:
        b = base.get(r.workload)
        if b is None:
            continue
        r.slowdown = r.time_us / b.time_us if b.time_us else math.nan
        for model in ("scaled", "prior"):
            priced = CostModel(cal.params.with_ipi_model(model), cfg.ncpus,
                               broadcast=PROFILES[cfg.profile].tlb_broadcast)
            r.sweep[model] = [priced.at(k).time_us(r.counts) / priced.at(k).time_us(b.counts)
                              for k in cfg.sweep]


def crossing(row: CostRow, cpus: Sequence[int], level: float, model: str = "scaled") -> int | None:
    """The smallest CPU count of the sweep at which ``row``'s slowdown reaches ``level``."""
    for k, v in zip(cpus, row.sweep.get(model, []), strict=False):
        if v >= level:
            return k
    return None
