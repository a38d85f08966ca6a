"""Strategies by name: a design of :mod:`gmemlab.model.designs`, optionally with a parameter.

``NAME`` is any registered design; ``batch:N`` is the batched flush with N zaps
per flush, ``falloc:N`` zap-at-fallocate with N folios per flush.  Every call
makes a fresh design instance: the strategies keep per-machine state.
"""

from __future__ import annotations

from gmemlab.model.designs import DESIGNS, Design, UnknownDesign, canonical_name, get_design
from gmemlab.model.designs.batched import BatchedFlush
from gmemlab.model.designs.falloc import FallocRange

# The strategies issue 5 compares, in table order; ``base`` is "no removal".
STRATEGIES = ("base", "v12", "noflush", "batch", "batch:512", "falloc", "zap2m", "folio2m", "unmapped",
              "filemap")
BASELINE = "base"

STRATEGY_TITLES = {
    "base": "no removal (guest_memfd without NO_DIRECT_MAP)",
    "v12": "zap + flush per fault (v12)",
    "noflush": "zap, no flush (Firecracker 0039)",
    "batch": "flush batched per N zaps",
    "falloc": "zap + flush per fallocate chunk",
    "zap2m": "2 MiB fault-around, one flush",
    "folio2m": "2 MiB folios, one zap + flush each",
    "unmapped": "ALLOC_UNMAPPED pageblocks + mermap",
    "filemap": "page-cache-level zap on insert",
}

_PARAMETRIZED = {"batch": BatchedFlush, "falloc": FallocRange}


class UnknownStrategy(ValueError):
    pass


def parse_designs(value: str) -> tuple[str, ...]:
    """The comma-separated design specs in ``value`` (``NAME`` or ``NAME:N``), each checked."""
    from gmemlab.cli import UsageError, split_list

    specs = split_list(value)
    for spec in specs:
        try:
            make_design(spec)
        except UnknownStrategy as e:
            raise UsageError(str(e)) from None
    return specs


def make_design(spec: str) -> Design:
    """A fresh design for ``spec``: ``NAME``, ``NAME:N``, or a design file (``file.py[:Class]``,
    ``package.module:Class``; see ``gmemlab.model.designs.load_design``)."""
    name, _, arg = spec.partition(":")
    if name.endswith(".py") or "." in name or "/" in name:
        try:
            return get_design(spec)
        except UnknownDesign as e:
            raise UnknownStrategy(str(e)) from None
    if not arg:
        if canonical_name(name) not in DESIGNS:
            raise UnknownStrategy(f"unknown design {name!r}; choose one of: {', '.join(DESIGNS)}")
        return get_design(name)
    factory = _PARAMETRIZED.get(name)
    if factory is None:
        raise UnknownStrategy(f"{name!r} takes no parameter (only {', '.join(_PARAMETRIZED)} do)")
    try:
        n = int(arg)
    except ValueError:
        raise UnknownStrategy(f"{spec!r}: the parameter must be an integer") from None
    if n < 1:
        raise UnknownStrategy(f"{spec!r}: the parameter must be positive")
    return factory(n)


def describe(spec: str) -> str:
    name, _, arg = spec.partition(":")
    title = STRATEGY_TITLES.get(canonical_name(name)) or make_design(spec).title
    if name == "batch":
        return f"{title} (N={arg or BatchedFlush().batch})"
    if name == "falloc":
        return f"{title} ({arg or FallocRange().chunk} folios)"
    return title
