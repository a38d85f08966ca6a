"""``gmemlab probe``: what this machine's KVM, guest_memfd and memfd_secret offer."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "probe",
        help="probe /dev/kvm capabilities, guest_memfd flags, memfd_secret and DirectMap",
        description=(
            "Report KVM capabilities (system and VM scope), the guest_memfd flags each VM "
            "type accepts (tried bit by bit), memfd_secret availability and DirectMap counters."
        ),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gmemlab.twin.probe import format_probe, probe

    report = probe()
    print(json.dumps(report, indent=2) if args.json else format_probe(report))
    return 0
