"""The ``gmemlab`` command.

Each tool lives in its own module and registers its subcommand here through a
``register(subparsers)`` function, so the command line stays one file per tool.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterable, Sequence

# Modules that contribute a subcommand, in the order ``gmemlab --help`` lists them.
COMMAND_MODULES = (
    "gmemlab.commands.run",
    "gmemlab.commands.check",
    "gmemlab.commands.probe",
    "gmemlab.commands.measure",
    "gmemlab.commands.conformance",
    "gmemlab.commands.expose",
    "gmemlab.commands.cost",
    "gmemlab.commands.bench",
)

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input on the command line: printed as ``gmemlab: error: ...``, exit status 2."""


def split_list(value: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def choose(value: str, known: Iterable[str], what: str) -> tuple[str, ...]:
    """The comma-separated names in ``value``; a :class:`UsageError` names any not in ``known``."""
    names = split_list(value)
    valid = set(known)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UsageError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def design_arg(value: str) -> str:
    """A ``--design``: a design's name, or a user's design file (loaded now, so errors come first)."""
    from gmemlab.model.designs import UnknownDesign, get_design

    try:
        get_design(value)
    except UnknownDesign as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmemlab",
        description=(
            "Model, twin and tools for guest_memfd direct map removal "
            "(GUEST_MEMFD_FLAG_NO_DIRECT_MAP, the v12 series)."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except UsageError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

