"""``gmemlab churn``: the host's direct map after a modelled day of VMs, per design."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gmemlab.cli import design_list, float_in, int_in, output_file

DEFAULT_DESIGNS = "base,v12,filemap,unmapped"


def sizes_gib(value: str) -> tuple[int, int]:
    """``MIN-MAX`` GiB (or one size), whole GiB."""
    lo, _, hi = value.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not MIN-MAX in whole GiB") from None
    if not 1 <= a <= b <= 4096:
        raise argparse.ArgumentTypeError(f"{value}: need 1 <= MIN <= MAX <= 4096")
    return a, b


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "churn",
        help="the direct map after a modelled day of VMs created and destroyed, per design",
        description=(
            "A host creates and destroys VMs of mixed sizes, each fully touched by its guest, for a "
            "modelled day (seeded; the same day for every design). For each design: DirectMap4k/2M/1G "
            "over the day, the share of RAM the direct map maps with 4 KiB pages, and what that costs "
            "the host kernel's TLB reach. Runs a region at a time, with each design's effect on a 2 MiB "
            "region learnt from its real model (gmemlab.churn.rules; tests/churn holds it to the full "
            "model); --full runs the full model instead (small hosts only)."),
    )
    p.add_argument("--host-gib", type=int_in(3, 4096), default=256, help="host RAM, GiB (default 256)")
    p.add_argument("--vms", type=int_in(1, 100_000), default=1000, help="VM lifetimes (default 1000)")
    p.add_argument("--hours", type=float_in(0, 24 * 365, above=True), default=24.0,
                   help="modelled time (default 24)")
    p.add_argument("--sizes-gib", type=sizes_gib, default="1-16", help="VM sizes, MIN-MAX GiB (default 1-16)")
    p.add_argument("--occupancy", type=float_in(0, 0.9, above=True), default=0.6,
                   help="mean share of RAM the VMs hold (default 0.6; admission stops at 0.9)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="seed of the day (default 0)")
    p.add_argument("--designs", type=design_list, default=DEFAULT_DESIGNS,
                   help=f"designs or design files (default {DEFAULT_DESIGNS})")
    p.add_argument("--full", action="store_true", help="run the full model (slow: a few GiB of host)")
    p.add_argument("--tlb-entries", type=int_in(1, 1 << 20), default=1536,
                   help="entries of the ideal TLB the reach is priced with (default 1536)")
    p.add_argument("--plot", metavar="FILE.png", type=output_file, help="the trajectories, side by side")
    p.add_argument("--json", metavar="FILE", type=output_file, help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=main)


def run_churn(designs: tuple[str, ...], schedule: Any, *, full: bool, quiet: bool) -> list[Any]:
    """Each design's day, region level (or full model), with progress on stderr."""
    from gmemlab.churn.full import run_full
    from gmemlab.churn.regions import ChurnError, ChurnResult, simulate
    from gmemlab.churn.rules import learn_rule

    out = []
    for d in designs:
        def progress(i: int, n: int, d: str = d) -> None:
            if not quiet:
                print(f"churn: {d}: event {i + 1:,}/{n:,}", file=sys.stderr, flush=True)

        if full:
            out.append(run_full(d, schedule, progress))
            continue
        rule = learn_rule(d)
        if not quiet:
            print(f"churn: {rule.describe()}", file=sys.stderr, flush=True)
        try:
            out.append(simulate(rule, schedule, progress))
        except ChurnError as e:
            out.append(ChurnResult(rule.design, "regions", rule.describe(), error=str(e)))
    return out


def main(args: argparse.Namespace) -> int:
    from gmemlab.churn.report import churn_table, plot_churn, summarise
    from gmemlab.churn.schedule import ChurnConfig, make_schedule
    from gmemlab.cli import UsageError
    from gmemlab.report import dump_json

    lo, hi = args.sizes_gib
    cfg = ChurnConfig(host_gib=args.host_gib, vms=args.vms, hours=args.hours,
                      sizes_mib=(lo * 1024, hi * 1024), occupancy=args.occupancy, seed=args.seed)
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    schedule = make_schedule(cfg)
    results = run_churn(args.designs, schedule, full=args.full, quiet=args.quiet)
    ran = [r for r in results if r.samples]
    summaries = [summarise(r, args.tlb_entries) for r in ran]
    title = (f"{cfg.host_gib} GiB host, {schedule.created:,} VMs of {lo}-{hi} GiB over {cfg.hours:g} h "
             f"(seed {cfg.seed}; {schedule.refused} refused at {cfg.max_fill:.0%} full; mean life "
             f"{schedule.mean_life_hours:.2f} h)")
    print(f"gmemlab churn: {title}")
    print(churn_table(summaries))
    for r in results:
        if not r.samples:
            print(f"  {r.design}: not run: {r.error}")
    print(f"  TLB: an ideal {args.tlb_entries}-entry TLB, uniform accesses over the direct map "
          "(gmemlab.churn.report); (boot) = the same host before any VM")
    if args.plot:
        print(f"plot: {plot_churn(ran, Path(args.plot), title)}")
    if args.json:
        with open(args.json, "w") as f:
            dump_json({"schema": "gmemlab.churn/1", "title": title,
                       "config": {"host_gib": cfg.host_gib, "vms": cfg.vms, "hours": cfg.hours,
                                  "sizes_mib": list(cfg.sizes_mib), "occupancy": cfg.occupancy,
                                  "seed": cfg.seed, "created": schedule.created, "refused": schedule.refused},
                       "results": [s.as_json() for s in summaries],
                       "not_run": {r.design: r.error for r in results if not r.samples}}, f)
    return 0
