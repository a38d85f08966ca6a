"""The ``gmemlab`` command.

Each tool lives in its own module and registers its subcommand here through a
``register(subparsers)`` function, so the command line stays one file per tool.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# Modules that contribute a subcommand, in the order ``gmemlab --help`` lists them.
COMMAND_MODULES = (
    "gmemlab.commands.run",
    "gmemlab.commands.check",
    "gmemlab.commands.probe",
    "gmemlab.commands.measure",
    "gmemlab.commands.conformance",
    "gmemlab.commands.expose",
    "gmemlab.commands.cost",
    "gmemlab.commands.churn",
    "gmemlab.commands.compare",
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


# --- argument types: every check a command line gets, run by parse_args() before any work -------
# Each returns the converted value or raises argparse.ArgumentTypeError, which argparse prints
# as one "gmemlab COMMAND: error: argument --OPTION: ..." line, exit status 2.


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi]."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside [{lo:,}, {hi:,}]")
        return n

    return parse


def float_in(lo: float, hi: float, *, above: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] (in (lo, hi] with ``above``)."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not math.isfinite(x) or x > hi or x < lo or (above and x == lo):
            raise argparse.ArgumentTypeError(f"{value} is outside {'(' if above else '['}{lo:g}, {hi:g}]")
        return x

    return parse


def nonempty(parse: Callable[[str], tuple[str, ...]]) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list read by ``parse`` (which may raise UsageError), not empty:
    ``--design ''`` must not silently mean "all"."""

    def parse_nonempty(value: str) -> tuple[str, ...]:
        try:
            names = parse(value)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not names:
            raise argparse.ArgumentTypeError("an empty list; name at least one")
        return names

    return parse_nonempty


name_list = nonempty(split_list)


def names_of(known: Iterable[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """A non-empty comma-separated list of names from ``known``."""
    valid = tuple(known)
    return nonempty(lambda value: choose(value, valid, what))


def ncpus(minimum: int) -> Callable[[str], int]:
    """A CPU count of the modelled machine: at least ``minimum``, within MachineConfig's bound."""
    from gmemlab.model.machine import MachineConfig

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        try:
            MachineConfig(ncpus=n).validate()
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} CPUs, not {n}")
        return n

    return parse


def host_cpu(value: str) -> int | None:
    """A CPU this process may run on, or -1 (None): no pinning."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n == -1:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if n not in allowed:
        raise argparse.ArgumentTypeError(f"CPU {n} is not one this process may run on ({allowed})")
    return n


def output_file(value: str) -> str:
    """A file to write: its directory exists and it is not itself a directory."""
    parent = os.path.dirname(value) or "."
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a directory")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"directory {parent} is not writable")
    return value


def output_dir(value: str) -> str:
    """A directory to write into: it exists, or its parent does (only the last part is created)."""
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise argparse.ArgumentTypeError(f"{value} exists and is not a directory")
    parent = os.path.dirname(os.path.normpath(value)) or "."
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist (only {value}'s last "
                                         "part would be created)")
    return value


def read_json(path: str) -> Any:
    """The JSON document in ``path`` (UTF-8); ArgumentTypeError says why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None


def json_object_of(schema: str) -> Callable[[str], dict[str, Any]]:
    """A JSON file holding an object whose ``"schema"`` is ``schema``."""

    def parse(path: str) -> dict[str, Any]:
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise argparse.ArgumentTypeError(f"{path} holds a JSON {type(doc).__name__}, "
                                             f"not a {schema} object")
        if doc.get("schema") != schema:
            raise argparse.ArgumentTypeError(f"{path} is not a {schema} result "
                                             f"(schema {doc.get('schema')!r})")
        return doc

    return parse


def measurement_file(path: str) -> Any:
    """A ``gmemlab measure`` JSON file, parsed and checked (a ``cost.calibrate.Measurement``)."""
    from gmemlab.cost.calibrate import CalibrationError, Measurement

    try:
        return Measurement.from_json(read_json(path), path)
    except CalibrationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def design_arg(value: str) -> str:
    """A ``--design``: a design's name, or a user's design file (loaded now, so errors come first)."""
    from gmemlab.model.designs import UnknownDesign, get_design

    try:
        get_design(value)
    except UnknownDesign as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def design_list(value: str) -> tuple[str, ...]:
    """A non-empty comma-separated list of designs (names or design files), each loaded now."""
    return tuple(design_arg(v) for v in name_list(value))


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

