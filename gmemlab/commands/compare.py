"""``gmemlab compare A B``: what a design change changes (UAPI, checker, exposure, cost, churn)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gmemlab.cli import design_arg, int_in, output_file
from gmemlab.commands.churn import sizes_gib


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two designs: UAPI outcomes, checker verdicts, exposure, cost, churn",
        description=(
            "Run design A and design B (names or design files, file.py[:Class]) through every "
            "conformance case, the checker's standard scenarios, the exposure workloads, the cost "
            "workloads (boot, restore, teardown at 2, 16 and 128 CPUs) and a modelled day of churn, "
            "and report what differs. Exit status 1 when B breaks a property A holds."),
    )
    p.add_argument("a", type=design_arg, metavar="A", help="the design compared against")
    p.add_argument("b", type=design_arg, metavar="B", help="the design under review")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--preemptions", type=int_in(0, 10), default=1,
                       help="the checker's preemption bound (default 1)")
    bound.add_argument("--exhaustive", action="store_true",
                       help="the checker without a preemption bound (minutes per design)")
    p.add_argument("--churn-host-gib", type=int_in(3, 4096), default=64,
                   help="host RAM of the churn, GiB (default 64; gmemlab churn defaults to 256)")
    p.add_argument("--churn-vms", type=int_in(1, 100_000), default=250, help="VM lifetimes (default 250)")
    p.add_argument("--churn-sizes-gib", type=sizes_gib, default="1-16",
                   help="VM sizes of the churn, MIN-MAX GiB (default 1-16)")
    p.add_argument("--quick", action="store_true",
                   help="small figures for a first look: 16 pages per exposure VM, 0.01 GiB per cost "
                        "workload, the checker without preemptions")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="seed of the churn (default 0)")
    p.add_argument("--json", metavar="FILE", type=output_file, help="write the comparison as JSON")
    p.add_argument("--plot", metavar="FILE.png", type=output_file, help="one PNG, A and B side by side")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from gmemlab.churn.schedule import ChurnConfig
    from gmemlab.cli import UsageError
    from gmemlab.compare import CompareConfig, plot_compare, run_compare

    lo, hi = args.churn_sizes_gib
    churn = ChurnConfig(host_gib=args.churn_host_gib, vms=args.churn_vms, sizes_mib=(lo * 1024, hi * 1024),
                        seed=args.seed)
    try:
        churn.validate()
    except ValueError as e:
        raise UsageError(f"churn: {e}") from None
    cfg = CompareConfig(preemptions=None if args.exhaustive else 0 if args.quick else args.preemptions,
                        churn=churn)
    if args.quick:
        cfg = replace(cfg, expose_pages=16, cost_gib=0.01)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"compare: {msg}", file=sys.stderr, flush=True)

    c = run_compare(args.a, args.b, cfg, progress)
    print(c.render())
    if args.plot:
        print(f"plot: {plot_compare(c, Path(args.plot))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(c.as_json(), f, indent=2, default=str)
            f.write("\n")
    return 1 if c.new_breaks() else 0
