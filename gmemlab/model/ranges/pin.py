"""``python -m gmemlab.model.ranges.pin``: show, or pin, what the batched paths mirror.

Pin only once ``tests/scale`` shows the batched paths equal to the code as it
is now (see :mod:`.gate`).
"""

from __future__ import annotations

import argparse
import importlib

from gmemlab.model.designs import DESIGNS, get_design
from gmemlab.model.ranges import pins
from gmemlab.model.ranges.gate import judge, write_pins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmemlab.model.ranges.pin",
                                 description="Show, or pin, what the batched paths mirror.")
    ap.add_argument("--write", action="store_true",
                    help="rewrite pins.py from the code as it is now (after tests/scale passes)")
    ap.add_argument("design", nargs="*", default=list(DESIGNS), help="designs to judge (default: all)")
    args = ap.parse_args(argv)
    if args.write:
        print(f"wrote {write_pins()}")
        importlib.reload(pins)
    for name in args.design:
        gate = judge(get_design(name))
        on = [p.path for p in gate.paths if p.mirror]
        how = (f"batched ({len(on)} of {len(gate.paths)} paths), mirroring {gate.mirror}" if on
               else "per page")
        print(f"{name:10} {how}: {gate.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
