"""Readable tables and JSON for every report command."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

Cell = str | int | float | None


def fmt_cell(v: Cell) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return v


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], *, indent: int = 2,
          align: str | None = None) -> str:
    """A plain-text table; numbers right-aligned unless ``align`` (one of l/r per column) says."""
    cells = [[fmt_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], int | float) or r[i] is None for r in rows) else "l"
            for i in range(len(headers))
        )
    pad = " " * indent

    def line(vals: Sequence[str]) -> str:
        out = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align, strict=True)]
        return (pad + "  ".join(out)).rstrip()

    sep = pad + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def dump_json(obj: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(obj, out, indent=2, sort_keys=False, default=str)
    out.write("\n")


def kib(n_bytes: int) -> str:
    return f"{n_bytes // 1024:,} kB"
