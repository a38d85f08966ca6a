"""``gmemlab cost``: what each direct-map-removal strategy costs, calibrated on this machine."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from gmemlab.cli import (
    UsageError,
    float_in,
    int_in,
    measurement_file,
    names_of,
    ncpus,
    nonempty,
    output_dir,
    output_file,
)

MAX_GIB = 1 << 16  # 64 TiB: the model runs --model-pages and scales its counts to this
MAX_MODEL_PAGES = 1 << 16  # twice that must fit in the 3 GiB the cost scenario models


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gmemlab.cost.strategies import STRATEGIES, parse_designs
    from gmemlab.cost.workloads import COST_WORKLOADS
    from gmemlab.model import PROFILES

    p = sub.add_parser(
        "cost",
        help="compare the cost of direct-map-removal strategies, calibrated on this machine",
        description=(
            "Run each strategy (a design of the model) on each workload at small sizes, scale the "
            "kernel event counts to the requested size, and price them with per-event costs "
            "calibrated from a gmemlab measure of this machine (the committed one, --calibration FILE, "
            "or --measure to measure now). Prints the calibration (the model's prediction of each "
            "measured cost against the measurement) and one table: time, slowdown against no removal, "
            "flushes, IPIs, the direct map after, and the exposure; writes plots of slowdown against "
            "CPU count, fragmentation, and exposure against cost. Workloads: "
            + "; ".join(f"{w.name}: {w.summary}" for w in COST_WORKLOADS.values())
        ),
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES), type=nonempty(parse_designs),
                   help="comma-separated designs (NAME, batch:N, falloc:N); default: %(default)s")
    p.add_argument("--workloads", default=",".join(COST_WORKLOADS), type=names_of(COST_WORKLOADS, "workload"),
                   help="comma-separated workloads; default: %(default)s")
    p.add_argument("--gib", type=float_in(0, MAX_GIB, above=True), default=1.0,
                   help=f"guest memory of each workload, GiB, at most {MAX_GIB} (default 1)")
    p.add_argument("--model-pages", type=int_in(512, MAX_MODEL_PAGES), default=512,
                   help="pages the model runs (and twice that) before scaling; a multiple of 512, at most "
                        f"{MAX_MODEL_PAGES} (default 512)")
    p.add_argument("--cpus", type=ncpus(1), default=2, help="CPUs the table is priced for (default 2)")
    p.add_argument("--profile", default="x86_64",
                   choices=[n for n, pr in PROFILES.items() if pr.has_guest_memfd],
                   help="the host the strategies run on (default x86_64; arm64 profiles: TLBI "
                        "broadcast, set_memory_valid()'s own flushes, BBML2's on-demand splits)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--calibration", metavar="FILE", type=measurement_file,
                     help="a gmemlab measure JSON (default: the one committed for this machine)")
    src.add_argument("--measure", action="store_true",
                     help="measure this machine now (needs /dev/kvm; the quick 8 MiB measurement)")
    p.add_argument("--save-measurement", metavar="FILE", type=output_file,
                   help="with --measure: keep the measurement")
    p.add_argument("--plot-dir", metavar="DIR", default="plots", type=output_dir,
                   help="where the PNGs go (default ./plots)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plots")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=main)


def _say(quiet: bool) -> Any:
    def progress(msg: str) -> None:
        if not quiet:
            print(f"cost: {msg}", file=sys.stderr, flush=True)

    return progress


def _measurement(args: argparse.Namespace) -> Any:
    from gmemlab.cost.calibrate import Measurement, load_measurement, with_provenance

    if not args.measure:
        return args.calibration or load_measurement()
    import json

    from gmemlab.twin import guest_memfd_available
    from gmemlab.twin.measure import MeasureConfig, run_measurement

    ok, reason = guest_memfd_available()
    if not ok:
        raise UsageError(f"--measure needs the real KVM: {reason}")
    _say(args.quiet)("measuring this machine (gmemlab measure --quick)")
    result = with_provenance(run_measurement(MeasureConfig.quick()), "gmemlab cost --measure")
    if args.save_measurement:
        Path(args.save_measurement).write_text(json.dumps(result, indent=2) + "\n")
    return Measurement.from_json(result, args.save_measurement or "live measurement")


def main(args: argparse.Namespace) -> int:
    from gmemlab.cost.analysis import CostConfig, analyse
    from gmemlab.cost.calibrate import CalibrationError, calibrate, load_primitives
    from gmemlab.cost.plots import plot_exposure_cost, plot_fragmentation, plot_slowdown
    from gmemlab.cost.strategies import BASELINE
    from gmemlab.report import dump_json

    strategies = args.strategies
    if BASELINE not in strategies:
        strategies = (BASELINE, *strategies)  # slowdowns are against it
    if args.model_pages % 512:
        raise UsageError("--model-pages must be a positive multiple of 512 (whole 2 MiB blocks)")
    if args.save_measurement and not args.measure:
        raise UsageError("--save-measurement needs --measure")
    cfg = CostConfig(strategies=strategies, workloads=args.workloads, gib=args.gib,
                     model_pages=args.model_pages, ncpus=args.cpus, profile=args.profile)
    if cfg.pages < 2 * cfg.model_pages:
        raise UsageError(f"--gib {args.gib:g} is smaller than the model runs ({2 * cfg.model_pages} pages)")
    say = _say(args.quiet)
    meas = _measurement(args)
    say(f"calibrating on {meas.source}")
    try:
        cal = calibrate(meas, primitives=load_primitives())
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    rows = analyse(cfg, cal, say)
    plots = []
    if not args.no_plot:
        out = Path(args.plot_dir)
        out.mkdir(exist_ok=True)  # its parent exists: the command line checked (cli.output_dir)
        plots = [plot_slowdown(rows, cfg, out / "cost-slowdown-vs-cpus.png"),
                 plot_fragmentation(rows, cfg, out / "cost-fragmentation.png"),
                 plot_exposure_cost(rows, cfg, out / "cost-exposure-vs-cost.png")]
    if args.json:
        dump_json({
            "config": {"gib": cfg.gib, "pages": cfg.pages, "model_pages": cfg.model_pages,
                       "cpus": cfg.ncpus, "sweep": list(cfg.sweep)},
            "calibration": cal.as_json(),
            "rows": [r.as_json() for r in rows],
            "plots": [str(p) for p in plots],
        })
        return 0
    print(render(cal, rows, cfg, plots))
    return 0


def param_table(cal: Any) -> str:
    """The cost model's per-event figures, each marked measured, fitted or prior, and how."""
    from gmemlab.report import table

    return table(["figure", "µs", "source", "how"],
                 [[k, v, cal.kind(k), cal.sources[k].split(": ", 1)[-1]]
                  for k, v in cal.params.as_dict().items()], align="lrll")


def render(cal: Any, rows: Any, cfg: Any, plots: list[Path]) -> str:
    from gmemlab.cost.analysis import crossing
    from gmemlab.cost.strategies import BASELINE, describe
    from gmemlab.cost.workloads import COST_WORKLOADS
    from gmemlab.report import Cell, table

    meas = cal.measurement
    prov = meas.provenance
    out = [f"gmemlab cost: {cfg.gib:g} GiB per workload ({cfg.pages:,} pages; the model ran "
           f"{cfg.model_pages} and {2 * cfg.model_pages} pages and scaled), priced for {cfg.ncpus} CPUs",
           "", f"Calibration: {meas.source} (kernel {meas.kernel}, {meas.cpus} CPUs"
           + (f", measured {prov['date']}" if prov.get("date") else "") + ")"]
    checks: list[list[Cell]] = [
        [c.name, c.role, c.measured, c.predicted, None if c.error is None else f"{100 * c.error:+.1f}%",
         c.unit] for c in cal.checks]
    out.append(table(["measured quantity", "role", "measured", "model", "error", "unit"], checks,
                     align="llrrrl"))
    sm = cal.check("memfd_secret fault")
    out.append(f"  memfd_secret per-page fault: model {sm.predicted:.2f} µs against measured "
               f"{sm.measured:.2f} µs (error {100 * (sm.error or 0):+.2f}%; the measured reps ranged "
               f"{meas.secretmem_fault_min:.2f}-{meas.secretmem_fault_max:.2f} µs): a guest_memfd-like "
               "fault (fitted) plus the removal and flush (fitted against memfd); memfd, the memfd_secret "
               "free and the IPI count are predictions too.")
    p = cal.params
    out += ["", "Per-event costs (measured: timed on a kernel; fitted: solved from measured times; "
            "prior: a published or assumed figure)"]
    out.append(param_table(cal))
    prior = p.with_ipi_model("prior")
    out.append("  IPI round trip of a kernel TLB flush, fitted shape 1 + 0.2/CPU scaled to the measured "
               f"{meas.cpus}-CPU figure (prior unscaled): "
               + ", ".join(f"{n} CPUs {p.ipi_round(n):.1f} ({prior.ipi_round(n):.1f})"
                           for n in (2, 4, 16, 64, 256)))
    out.extend(f"  note: {n}" for n in cal.notes)
    out += ["", "Strategies:"]
    out.extend(f"  {s:<10} {describe(s)}" for s in cfg.strategies)
    from gmemlab.model import PROFILES

    prof = PROFILES[cfg.profile]
    ipis = ("none: TLBI is broadcast, a flush is priced as the local one (no arm64 measurement)"
            if prof.tlb_broadcast else "flushes x (CPUs - 1)")
    dm_how = ("all 4 KiB: this machine's memory, page-mapped at boot as force_pte_mapping() does"
              if prof.direct_map_granularity == "4k" else "this machine's counters before plus the splits")
    out += ["", f"Side by side on {cfg.profile} (time scaled to the workload size; IPIs = {ipis}; "
            f"DirectMap after = {dm_how}; exposure = share of "
            "the secret bytes a gadget reaches, peak / mean over the measured phases, from the model run; "
            "m/f/p % = share of the time priced by measured / fitted / prior figures)"]
    headers = ["workload", "strategy", "time s", "us/page", "slowdown", "flushes", "IPIs", "2M splits",
               "DM4k GiB", "DM2M GiB", "DM1G GiB", "exposed %", "m/f/p %", "broken invariants (whole run)"]
    trows: list[list[Cell]] = []
    for r in rows:
        dm = r.dm_after_kb or (math.nan, math.nan, math.nan)
        expo = ("-" if r.exposure_peak is None
                else f"{100 * r.exposure_peak:.0f} / {100 * (r.exposure_mean or 0):.0f}")
        trows.append([r.workload, r.strategy, r.time_us / 1e6, r.per_page_us, r.slowdown, round(r.flushes),
                      round(r.ipis), round(r.splits_2m), dm[0] / (1 << 20), dm[1] / (1 << 20),
                      dm[2] / (1 << 20), expo, r.priced_by_text(),
                      ", ".join(f"{k} x{v}" for k, v in r.violations.items()) or "-"])
    out.append(table(headers, trows, align="llrrrrrrrrrrrl"))
    out += ["", "Where the series' figures are reached (CPU count at which the slowdown gets there; "
            "IPI cost fitted here / bare-metal IPI prior):"]
    for workload in cfg.workloads:
        w = COST_WORKLOADS[workload]
        if not w.series_slowdown:
            continue
        never = f">{cfg.sweep[-1]}"
        cells = []
        for r in (r for r in rows if r.workload == workload and r.strategy != BASELINE):
            here = crossing(r, cfg.sweep, w.series_slowdown) or never
            bare = crossing(r, cfg.sweep, w.series_slowdown, "prior") or never
            cells.append(f"{r.strategy} {here}/{bare}")
        out.append(f"  {w.series_label} ({w.series_slowdown:g}x) on {workload}: " + ", ".join(cells))
    if plots:
        out += ["", "plots: " + ", ".join(str(p) for p in plots)]
    return "\n".join(out)
