"""``gmemlab bench``: the model's costs at VM sizes, next to the real kernel's (not a test)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from gmemlab.cli import UsageError, design_list, float_in, int_in, json_object_of, name_list, output_file
from gmemlab.report import dump_json


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gmemlab.model import PROFILES

    p = subparsers.add_parser(
        "bench",
        help="time the model's guest lifecycle at 1-64 GiB against the real kernel",
        description=(
            "Run the lifecycle of a NO_DIRECT_MAP guest (bind, first touch of every page from "
            "the guest or the VMM, punch half, close and free) on the model at each size, each "
            "in a fresh process, and the real kernel's first-touch and free measurement "
            "(gmemlab measure); print model and real cost per page, their ratio, peak RSS, "
            "flatness across sizes and the scale targets."
        ),
    )
    p.add_argument("--sizes", metavar="GIB,...", type=_sizes,
                   help=f"guest sizes in GiB, at most {MAX_GIB} (default 1,4,16,64; quick 0.25,1)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (0.25,1), two rounds and a short real measurement")
    p.add_argument("--rounds", type=int_in(1, 1000),
                   help="rounds over every size and kind (default 4, quick 2)")
    p.add_argument("--work", type=float_in(0, MAX_GIB, above=True), metavar="GIB",
                   help="GiB of lifecycles per size, kind and round, the same for every size so "
                        "that costs per page compare over the same time (default: the largest size)")
    p.add_argument("--no-real", action="store_true", help="skip the real kernel's measurement")
    p.add_argument("--design", default=("v12",), metavar="DESIGN[,DESIGN]", type=design_list,
                   help="designs to bench, one bench each: names or design files (default: v12)")
    p.add_argument("--profile", default="x86_64",
                   choices=[n for n, pr in PROFILES.items() if pr.has_guest_memfd],
                   help="architecture profile the model runs as (default: x86_64)")
    p.add_argument("--json", metavar="OUT", nargs="?", const="-", type=output_file,
                   help="print the results as JSON (or write them to OUT, to --compare later)")
    p.add_argument("--compare", metavar="OLD.json", type=_bench_result,
                   help="show the change against an earlier --json")
    p.add_argument("--merge", metavar="RUN.json", nargs="+", type=_bench_result,
                   help="run nothing: pool the rounds of earlier --json runs of the same sizes and "
                        "work, and report them as one bench (their commits are listed)")
    p.set_defaults(handler=run)


MAX_GIB = 1024


def _sizes(text: str) -> tuple[float, ...]:
    """Guest sizes in GiB, each a positive whole number of MiB up to MAX_GIB."""
    size = float_in(0, MAX_GIB, above=True)
    sizes = tuple(size(s) for s in name_list(text))
    if any(s * 1024 != int(s * 1024) for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be whole numbers of MiB, in GiB (e.g. 0.25,1,4)")
    return sizes


def _bench_result(path: str) -> dict[str, Any]:
    """An earlier ``bench --json`` result (checked for its schema when read)."""
    from gmemlab.bench.run import SCHEMA

    return json_object_of(SCHEMA)(path)


def run(args: argparse.Namespace) -> int:
    from gmemlab.bench.report import compare, render
    from gmemlab.bench.run import DEFAULT_ROUNDS, QUICK_SIZES, BenchConfig, merge, run_bench
    from gmemlab.twin.measure import MeasureConfig

    sizes = args.sizes or (QUICK_SIZES if args.quick else None)
    rounds = args.rounds if args.rounds is not None else 2 if args.quick else DEFAULT_ROUNDS
    cfg = BenchConfig(rounds=rounds, work_gib=args.work, real=not args.no_real, profile=args.profile,
                      measure=MeasureConfig.quick() if args.quick else MeasureConfig())
    if sizes:
        cfg = replace(cfg, sizes_gib=sizes)

    def say(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    if args.merge:
        try:
            result = merge(args.merge)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--merge: these runs cannot be pooled: {e}") from None
        results = [result]
    else:
        if len(args.design) > 1 and (args.json not in (None, "-") or args.compare is not None):
            raise UsageError("--json OUT and --compare take one design at a time")
        results = []
        for design in args.design:
            say(f"design {design}")
            results.append(run_bench(replace(cfg, design=design), say))
    if args.json == "-":
        dump_json(results[0] if len(results) == 1 else {"benches": results})
        return 1 if any(_failed(r) for r in results) else 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0], f, indent=1)
            f.write("\n")
    print("\n\n".join(render(r) for r in results))
    if args.compare is not None:
        print()
        print(compare(args.compare, results[0]))
    return 1 if any(_failed(r) for r in results) else 0


def _failed(result: dict[str, Any]) -> bool:
    return any("error" in r for r in result["runs"] + result["per_page"])
