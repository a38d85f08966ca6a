"""``gmemlab compare A B``: what changes from design A to design B, for a reviewer.

Five sections, each reusing the tool that owns the question:

* **UAPI**: every conformance case (:mod:`gmemlab.conformance.cases`, which
  ports the selftests' cases of ``guest_memfd_test.c`` and the real-guest
  experiments) on a model host of each design, profile ``x86_64``, invariants
  recorded rather than stopping (the checker judges them): the cases whose
  outcome (errno, SIGBUS, contents) differs.
* **Checker**: the standard scenarios (:data:`gmemlab.check.scenarios.STANDARD`)
  on each design with every property reported (``--all``), by default with at
  most one preemption (the standard scenarios' violations all show within one;
  ``preemptions=None`` is exhaustive and takes minutes per design): each
  property's verdict on both, and for a property B breaks and A holds, B's
  shortest counterexample (breadth-first search: shortest in its scenario; the
  shortest over scenarios is shown).
* **Exposure** (:mod:`gmemlab.expose`): peak and integrated secret bytes a
  host-kernel gadget reaches, per workload, ``init_on_free`` off.
* **Cost** (:mod:`gmemlab.cost`): slowdown against no removal (``base``) at 2,
  16 and 128 CPUs for boot, restore and teardown of 1 GiB, with the share of
  each time priced by measured, fitted and prior figures.
* **Churn** (:mod:`gmemlab.churn`): the direct map after a modelled day.

A design is a name or a design file (``file.py[:Class]``); the two may be the
same name in two files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gmemlab.check.explore import Bounds, Counterexample, Result
from gmemlab.check.report import render_counterexample
from gmemlab.check.scenarios import STANDARD, get_scenario
from gmemlab.check.suite import Options, check, property_names
from gmemlab.churn.regions import ChurnError, ChurnResult, simulate
from gmemlab.churn.report import Summary, churn_table, summarise
from gmemlab.churn.rules import learn_rule
from gmemlab.churn.schedule import ChurnConfig, make_schedule
from gmemlab.conformance.cases import CASES, Outcome
from gmemlab.conformance.runner import MODEL_CONFIG, outcome_of
from gmemlab.cost.analysis import CostConfig, CostRow, analyse
from gmemlab.cost.calibrate import Calibration, calibrate, load_measurement, load_primitives
from gmemlab.cost.strategies import BASELINE
from gmemlab.expose.analysis import CaseResult as ExposeCase
from gmemlab.expose.analysis import ExposeConfig, run_case
from gmemlab.expose.workloads import WORKLOADS
from gmemlab.model import Host, Machine
from gmemlab.model.designs import get_design
from gmemlab.model.invariants import INVARIANTS
from gmemlab.report import Cell, table

COST_WORKLOADS = ("boot", "restore", "teardown")
COST_CPUS = (2, 16, 128)
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class CompareConfig:
    preemptions: int | None = 1  # the checker's bound (None: exhaustive)
    churn: ChurnConfig = field(default_factory=lambda: ChurnConfig(host_gib=64, vms=250))
    expose_pages: int = 512
    cost_gib: float = 1.0


@dataclass(slots=True)
class Side:
    spec: str
    name: str
    uapi: dict[str, Outcome] = field(default_factory=dict)
    check: list[Result] = field(default_factory=list)
    exposure: list[ExposeCase] = field(default_factory=list)
    cost: list[CostRow] = field(default_factory=list)
    churn: ChurnResult | None = None


@dataclass(slots=True)
class Comparison:
    a: Side
    b: Side
    config: CompareConfig
    calibration: Calibration
    seconds: float = 0.0

    # --- what changed ------------------------------------------------------------------------
    def uapi_diff(self) -> list[tuple[str, Outcome, Outcome]]:
        return [(n, self.a.uapi[n], self.b.uapi[n]) for n in CASES if self.a.uapi[n] != self.b.uapi[n]]

    @staticmethod
    def broken(side: Side) -> dict[str, list[Counterexample]]:
        """Property -> its counterexamples, one per scenario that breaks it."""
        out: dict[str, list[Counterexample]] = {}
        for r in side.check:
            for cx in r.found:
                out.setdefault(cx.invariant, []).append(cx)
        return out

    @staticmethod
    def departures(side: Side) -> list[str]:
        """The series' rationale entries (documented orders, not safety) some execution of the
        side departed from: reported, never the exit status."""
        return sorted(set().union(*(r.rationale for r in side.check)))

    def new_breaks(self) -> list[str]:
        """Properties B breaks in some scenario and A breaks in none: exit status 1."""
        a, b = self.broken(self.a), self.broken(self.b)
        return [p for p in property_names() if p in b and p not in a]

    def fixed(self) -> list[str]:
        a, b = self.broken(self.a), self.broken(self.b)
        return [p for p in property_names() if p in a and p not in b]

    def shortest(self, prop: str) -> tuple[Result, Counterexample]:
        """B's shortest counterexample to ``prop`` over the scenarios."""
        return min(((r, cx) for r in self.b.check for cx in r.found if cx.invariant == prop),
                   key=lambda rc: len(rc[1].schedule))

    # --- output ------------------------------------------------------------------------------
    def verdict(self, side: Side, prop: str) -> str:
        ran = [r for r in side.check if r.skipped is None]
        if not ran:
            return "n/a (no NO_DIRECT_MAP)"
        where = [r.scenario for r in ran if any(cx.invariant == prop for cx in r.found)]
        if not where:
            return f"held ({len(ran)} scenarios)"
        return f"BROKEN in {len(where)}: {', '.join(where)}"

    def render(self) -> str:
        a, b = self.a, self.b
        cfg = self.config
        out = [f"gmemlab compare: A = {a.name} ({a.spec}), B = {b.name} ({b.spec})", ""]
        diff = self.uapi_diff()
        out.append(f"UAPI: {len(CASES)} conformance cases (the selftests' guest_memfd_test.c cases "
                   f"included) on both: {len(diff)} differ")
        if diff:
            out.append(table(["case", a.name, b.name], [[n, _short(x), _short(y)] for n, x, y in diff],
                             align="lll"))
        bound = "exhaustive" if cfg.preemptions is None else f"at most {cfg.preemptions} preemption(s)"
        out += ["", f"Checker: {len(STANDARD)} standard scenarios, every property reported, {bound}"]
        props = [p for p in property_names() if p in self.broken(a) or p in self.broken(b)]
        held = [p for p in property_names() if p not in props and p not in RATIONALE]
        rows: list[list[Cell]] = [[p, self.verdict(a, p), self.verdict(b, p),
                                   "NEW in B" if p in self.new_breaks() else
                                   "fixed in B" if p in self.fixed() else ""] for p in props]
        if rows:
            out.append(table(["property", a.name, b.name, "change"], rows, align="llll"))
        out.append(f"  held on both: {len(held)} properties ({', '.join(held)})" if held else "")
        for side in (a, b):
            if self.departures(side):
                out.append(f"  rationale of the series not followed by {side.name} (an order, not "
                           f"a safety rule; not judged): {', '.join(self.departures(side))}")
        for p in self.new_breaks():
            r, cx = self.shortest(p)
            out += ["", f"Shortest counterexample in B for {p}:",
                    render_counterexample(get_scenario(r.scenario), b.spec, b.name, cx)]
        out += ["", f"Exposure: secret bytes a host-kernel gadget reaches ({cfg.expose_pages} pages per VM, "
                "init_on_free off): peak kB / integrated kB*ms"]
        erows: list[list[Cell]] = []
        for x, y in zip(a.exposure, b.exposure, strict=True):
            erows.append([x.workload, f"{x.peak / 1024:,.0f} / {x.byte_us / 1024 / 1000:,.2f}",
                          f"{y.peak / 1024:,.0f} / {y.byte_us / 1024 / 1000:,.2f}"])
        out.append(table(["workload", a.name, b.name], erows, align="lrr"))
        out += ["", f"Cost: slowdown against no removal ({cfg.cost_gib:g} GiB), at "
                + ", ".join(map(str, COST_CPUS)) + " CPUs; m/f/p % = share of the time priced by "
                "measured / fitted / prior figures (gmemlab cost shows each figure's source)"]
        crows: list[list[Cell]] = []
        for side in (a, b):
            for row in side.cost:
                if row.strategy == BASELINE:
                    continue
                sweep = dict(zip(CostConfig().sweep, row.sweep["scaled"], strict=True))
                crows.append([row.workload, side.name, *(f"{sweep[n]:.2f}" for n in COST_CPUS),
                              row.priced_by_text()])
        crows.sort(key=lambda r: str(r[0]))
        out.append(table(["workload", "design", *(f"{n} CPUs" for n in COST_CPUS), "m/f/p %"], crows,
                         align="llrrrl"))
        ch = cfg.churn
        out += ["", f"Direct map after churn: {ch.host_gib} GiB host, {ch.vms} VMs of "
                f"{ch.sizes_mib[0] // 1024}-{ch.sizes_mib[1] // 1024} GiB over {ch.hours:g} h, "
                f"seed {ch.seed} (gmemlab churn, region level)"]
        out.append(churn_table(self.churn_summaries()))
        for side in (a, b):
            if side.churn is not None and not side.churn.samples:
                out.append(f"  {side.name}: not run: {side.churn.error}")
        new = self.new_breaks()
        out += ["", f"B breaks {len(new)} propert{'y' if len(new) == 1 else 'ies'} A holds"
                + (f": {', '.join(new)} (exit status 1)" if new else " (exit status 0)")
                + f"; {self.seconds:.0f} s"]
        return "\n".join(out)

    def churn_summaries(self) -> list[Summary]:
        return [summarise(s.churn) for s in (self.a, self.b) if s.churn is not None and s.churn.samples]

    def as_json(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {
                "spec": s.spec, "name": s.name,
                "check": {p: self.verdict(s, p) for p in property_names()},
                "exposure": {e.workload: {"peak_bytes": e.peak, "byte_us": e.byte_us} for e in s.exposure},
                "cost": {r.workload: {"slowdown_by_cpus": dict(zip(
                    map(str, CostConfig().sweep), r.sweep["scaled"], strict=True)), "priced_by": r.priced_by}
                    for r in s.cost if r.strategy != BASELINE},
                "churn": None if s.churn is None or not s.churn.samples else summarise(s.churn).as_json(),
            }

        return {
            "schema": "gmemlab.compare/1",
            "a": side(self.a), "b": side(self.b),
            "uapi": {"cases": len(CASES),
                     "differ": [{"case": n, "a": x, "b": y} for n, x, y in self.uapi_diff()]},
            "check": {"preemptions": self.config.preemptions, "new_in_b": self.new_breaks(),
                      "fixed_in_b": self.fixed(),
                      "rationale_not_followed": {"a": self.departures(self.a),
                                                 "b": self.departures(self.b)},
                      "counterexamples": {p: {"scenario": r.scenario, "schedule": list(cx.schedule)}
                                          for p in self.new_breaks() for r, cx in [self.shortest(p)]}},
            "cost_param_sources": {k: self.calibration.kind(k) for k in self.calibration.sources},
            "seconds": self.seconds,
        }


def _short(o: Outcome, width: int = 60) -> str:
    text = str(o)
    return text if len(text) <= width else text[: width - 3] + "..."


def _uapi(spec: str) -> dict[str, Outcome]:
    config = replace(MODEL_CONFIG, invariants="record")
    out: dict[str, Outcome] = {}
    for name, c in CASES.items():
        try:
            out[name] = outcome_of(c, Host(Machine(config, profile="x86_64", design=spec)))
        except Exception as e:  # the model's own failure is an outcome to compare, not a crash
            out[name] = f"model raised {type(e).__name__}: {e}".splitlines()[0]
    return out


def run_compare(spec_a: str, spec_b: str, cfg: CompareConfig = CompareConfig(),
                progress: Progress | None = None) -> Comparison:
    """Both designs through every section (see the module docstring)."""
    say = progress or (lambda _: None)
    t0 = time.perf_counter()
    a, b = (Side(s, get_design(s).name) for s in (spec_a, spec_b))
    cal = calibrate(load_measurement(), primitives=load_primitives())
    cost_cfg = CostConfig(strategies=(BASELINE, spec_a, spec_b), workloads=COST_WORKLOADS,
                          gib=cfg.cost_gib, model_pages=512)
    expose_cfg = ExposeConfig(designs=(spec_a, spec_b), pages=cfg.expose_pages, init_on_free=(False,))
    schedule = make_schedule(cfg.churn)
    opts = Options(bounds=Bounds(preemptions=cfg.preemptions), all_violations=True)
    for side in (a, b):
        say(f"{side.name}: UAPI, {len(CASES)} conformance cases")
        side.uapi = _uapi(side.spec)
        say(f"{side.name}: checker, {len(STANDARD)} standard scenarios")
        side.check = check([side.spec], opts=opts)
        say(f"{side.name}: exposure, {len(WORKLOADS)} workloads")
        side.exposure = [run_case(side.spec, w, False, expose_cfg, cal.model(expose_cfg.ncpus))
                         for w in WORKLOADS]
        say(f"{side.name}: churn, {schedule.created} VMs")
        rule = learn_rule(side.spec)
        try:
            side.churn = simulate(rule, schedule)
        except ChurnError as e:
            side.churn = ChurnResult(rule.design, "regions", rule.describe(), error=str(e))
    say("cost: boot, restore, teardown on base, A and B")
    rows = analyse(cost_cfg, cal)
    a.cost = [r for r in rows if r.strategy in (BASELINE, spec_a)]
    b.cost = [r for r in rows if r.strategy in (BASELINE, spec_b)]
    return Comparison(a, b, cfg, cal, time.perf_counter() - t0)


RATIONALE = frozenset(n for n, inv in INVARIANTS.items() if inv.rationale)


def plot_compare(c: Comparison, path: Path) -> Path:
    """One PNG, A and B side by side: exposure, slowdown against CPUs, the direct map after churn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ex, co, dm) = plt.subplots(1, 3, figsize=(15, 4))
    names = list(WORKLOADS)
    width = 0.4
    for i, side in enumerate((c.a, c.b)):
        xs = [k + (i - 0.5) * width for k in range(len(names))]
        ex.bar(xs, [e.peak / 1024 for e in side.exposure], width, label=side.name)
    ex.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    ex.set_ylabel("peak reachable secret kB")
    ex.set_title("exposure")
    ex.legend(fontsize=7)
    sweep = CostConfig().sweep
    for side, style in ((c.a, "-"), (c.b, "--")):
        for row in side.cost:
            if row.strategy != BASELINE:
                co.plot(sweep, row.sweep["scaled"], style, marker=".", label=f"{side.name} {row.workload}")
    co.set_xscale("log", base=2)
    co.set_xlabel("CPUs")
    co.set_ylabel("slowdown vs no removal")
    co.set_title("cost")
    co.legend(fontsize=6)
    labels = ("DirectMap4k", "DirectMap2M", "DirectMap1G")
    summaries = c.churn_summaries()
    for i, s in enumerate(summaries):
        xs = [k + (i - 0.5) * width for k in range(3)]
        dm.bar(xs, [v / (1 << 20) for v in s.after.direct_map_kb], width, label=s.design)
    dm.set_xticks(range(3), labels, fontsize=7)
    dm.set_ylabel("GiB after the day")
    dm.set_title(f"direct map after churn ({c.config.churn.host_gib} GiB host)")
    dm.legend(fontsize=7)
    fig.suptitle(f"gmemlab compare {c.a.name} {c.b.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
