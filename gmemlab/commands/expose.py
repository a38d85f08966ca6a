"""``gmemlab expose``: which guest secrets a host-kernel gadget can reach, per design and workload."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gmemlab.cli import (
    UsageError,
    int_in,
    measurement_file,
    names_of,
    ncpus,
    nonempty,
    output_dir,
)

# Pages per VM: a workload holds up to two guests and the kernel's allocations in the
# 2.5 GiB the scenario models (gmemlab.expose.scenario), so 256 MiB each leaves room.
MAX_PAGES = 1 << 16


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gmemlab.cost.strategies import parse_designs
    from gmemlab.expose.analysis import DEFAULT_DESIGNS
    from gmemlab.expose.workloads import WORKLOADS

    p = sub.add_parser(
        "expose",
        help="measure the guest secrets a transient-execution gadget in the host kernel can reach",
        description=(
            "Run each workload on each design of the model and, after every kernel step, count the "
            "secret bytes (what the guest or the VMM wrote) that a gadget on any CPU can read: through "
            "a present direct-map entry, a stale entry in that CPU's TLB, or a temporary kernel "
            "mapping. Prints peak and integrated exposure (over steps and over modelled time, priced "
            "by the calibrated cost model), the windows, and where they come from; plots a timeline "
            "per workload. Workloads: " + "; ".join(f"{w.name}: {w.summary}" for w in WORKLOADS.values())
        ),
    )
    p.add_argument("--designs", default=",".join(DEFAULT_DESIGNS), type=nonempty(parse_designs),
                   help="comma-separated designs (NAME or batch:N / falloc:N); default: %(default)s")
    p.add_argument("--workloads", default=",".join(WORKLOADS), type=names_of(WORKLOADS, "workload"),
                   help="comma-separated workloads; default: %(default)s")
    p.add_argument("--pages", type=int_in(2, MAX_PAGES), default=512,
                   help=f"guest memory per VM in 4 KiB pages, at most {MAX_PAGES} (default 512: one 2 MiB "
                        "block)")
    p.add_argument("--init-on-free", choices=("off", "on", "both"), default="both",
                   help="boot the model with init_on_free off, on, or each (default: both)")
    p.add_argument("--cpus", type=ncpus(2), default=2,
                   help="CPUs of the modelled host, at least 2: the gadget runs on CPU 1 (default 2)")
    p.add_argument("--tlb-entries", type=int_in(1, 1 << 20), default=1536,
                   help="TLB entries per CPU (default 1536)")
    p.add_argument("--calibration", metavar="FILE", type=measurement_file,
                   help="a gmemlab measure JSON to price events with (default: the committed one)")
    p.add_argument("--plot-dir", metavar="DIR", default="plots", type=output_dir,
                   help="where the timeline PNGs go (default: ./plots)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the timelines")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeline", action="store_true", help="include each timeline in the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from gmemlab.cost.calibrate import CalibrationError, calibrate, load_measurement, load_primitives
    from gmemlab.expose.analysis import ExposeConfig, phase_table, plot_timelines, run_all, summary_table
    from gmemlab.report import dump_json

    iof = {"off": (False,), "on": (True,), "both": (False, True)}[args.init_on_free]
    try:
        calibration = calibrate(args.calibration or load_measurement(), primitives=load_primitives())
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    cfg = ExposeConfig(designs=args.designs, workloads=args.workloads, pages=args.pages, init_on_free=iof,
                       ncpus=args.cpus, tlb_entries=args.tlb_entries)

    def progress(msg: str) -> None:
        print(f"expose: {msg}", file=sys.stderr, flush=True)

    results = run_all(cfg, calibration.model(args.cpus), None if args.quiet else progress)
    plots = [] if args.no_plot else plot_timelines(results, Path(args.plot_dir))
    if args.json:
        dump_json({
            "config": {"pages": cfg.pages, "cpus": cfg.ncpus, "tlb_entries": cfg.tlb_entries,
                       "calibration": calibration.measurement.source,
                       "param_sources": {k: calibration.kind(k) for k in calibration.sources}},
            "results": [r.as_json(timeline=args.timeline) for r in results],
            "plots": [str(p) for p in plots],
        })
        return 0
    print(f"gmemlab expose: {cfg.pages} pages per VM, {cfg.ncpus} CPUs, {cfg.tlb_entries} TLB entries "
          f"per CPU; time priced with {calibration.measurement.source} ({calibration.kinds_line()} "
          "per-event figures: gmemlab cost lists which)")
    print("Reachable secret bytes (peak; integrated over steps and over modelled time); via = share of "
          "kB*ms through a present direct-map entry / a stale TLB entry / a temporary mapping; windows "
          "= per-frame spans of reachability that closed; open@end = frames still reachable at the end.")
    print()
    print(summary_table(results))
    print()
    print(phase_table(results))
    if plots:
        print()
        print("timelines: " + ", ".join(str(p) for p in plots))
    return 0
