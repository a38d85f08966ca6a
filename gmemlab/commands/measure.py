"""``gmemlab measure``: fault, free and KVM exit costs on this machine, for the cost model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from gmemlab.cli import host_cpu, int_in, output_file
from gmemlab.report import dump_json


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "measure",
        help="measure first-touch fault and free cost per page, KVM_RUN round trips, DirectMap",
        description=(
            "First-touch fault and free cost per 4 KiB page for anonymous memory, memfd, "
            "guest_memfd (MMAP|INIT_SHARED) and memfd_secret; a guest's first touch through "
            "kvm_gmem_get_pfn; the KVM_RUN exit round trip; the DirectMap change caused by "
            "memfd_secret faults. See gmemlab.twin.measure for the JSON schema."
        ),
    )
    p.add_argument("--size-mib", type=int_in(1, 1 << 20), help="memory per run in MiB (default 64, quick 8)")
    p.add_argument("--reps", type=int_in(1, 10_000),
                   help="measured repetitions per kind (default 7, quick 3)")
    p.add_argument("--iterations", type=int_in(1, 10**9), help="KVM_RUN round trips per repetition")
    p.add_argument("--cpu", type=host_cpu, default="0", help="CPU to pin to (default 0; -1: no pinning)")
    p.add_argument("--quick", action="store_true", help="small and fast: 8 MiB, 3 reps")
    p.add_argument("--primitives", action="store_true",
                   help="measure the cost model's primitives instead: a direct-map split (memfd_secret "
                        "faults that split against those that did not), a PTE change and the local flush "
                        "(mprotect), a page copy; see gmemlab.twin.primitives")
    p.add_argument("--out", metavar="FILE", type=output_file, help="write the JSON result to FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gmemlab.twin import available
    from gmemlab.twin.measure import MeasureConfig, format_report, run_measurement

    config = MeasureConfig.quick() if args.quick else MeasureConfig()
    if args.size_mib is not None:
        config = replace(config, size=args.size_mib << 20)
    if args.reps is not None:
        config = replace(config, reps=args.reps)
    if args.iterations is not None:
        config = replace(config, roundtrip_iterations=args.iterations)
    config = replace(config, cpu=args.cpu)
    def progress(message: str) -> None:
        print(f"measure: {message}", file=sys.stderr, flush=True)

    say = None if args.quiet else progress
    if args.primitives:
        return _primitives(args, config, say)
    ok, reason = available()
    if not ok:
        print(f"gmemlab measure: {reason}", file=sys.stderr)
        return 1
    return _emit(args, run_measurement(config, progress=say), format_report)


def _primitives(args: argparse.Namespace, config: Any, say: Any) -> int:
    """``--primitives``: needs no /dev/kvm, only memfd_secret and /proc/vmstat."""
    from gmemlab.cost.calibrate import with_provenance
    from gmemlab.twin.primitives import format_primitives, measure_primitives

    result = with_provenance(measure_primitives(reps=config.reps, cpu=config.cpu, progress=say),
                             "gmemlab measure --primitives")
    return _emit(args, result, format_primitives)


def _emit(args: argparse.Namespace, result: Any, fmt: Callable[[Any], str]) -> int:
    """Write ``result`` to ``--out`` if asked, and print it as JSON or as ``fmt`` renders it."""
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    if args.json:
        dump_json(result)
    else:
        print(fmt(result))
    return 0
