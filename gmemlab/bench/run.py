"""Run the bench: the real kernel's measurement, then each size and lifecycle in a fresh process.

JSON (schema ``gmemlab.bench/1``; times in seconds, costs in µs per page)::

    {
      "schema": "gmemlab.bench/1",
      "machine": {"kernel": str, "cpus": int, "python": str, "commit": str | null},
      "config": {"sizes_gib": [float], "per_page_mib": float},
      "real": {"available": bool, "reason": str, "measure": MEASURE | null},
      "runs": [RUN, ...],              # one per size and lifecycle, batched paths
      "per_page": [RUN, ...]           # the per-page generator paths, at per_page_mib
    }

``MEASURE`` is ``gmemlab measure``'s JSON (``gmemlab.twin.measure``), ``RUN``
is :func:`gmemlab.bench.lifecycle.run_best`'s result (or ``{"kind",
"size_bytes", "error"}`` if the run failed): each size runs several times
(:func:`reps_for`) and each operation's cost is the best of them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gmemlab.bench.lifecycle import GIB, KINDS
from gmemlab.twin.measure import MeasureConfig

SCHEMA = "gmemlab.bench/1"
DEFAULT_SIZES = (1.0, 4.0, 16.0, 64.0)
QUICK_SIZES = (0.25, 1.0)
REPEAT_GIB = 16.0
Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    sizes_gib: tuple[float, ...] = DEFAULT_SIZES
    per_page_mib: float = 16
    real: bool = True
    measure: MeasureConfig = field(default_factory=MeasureConfig)


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def _real(cfg: BenchConfig, say: Say) -> dict[str, Any]:
    """The real kernel's first-touch and free costs (``gmemlab measure``), if it can be reached."""
    if not cfg.real:
        return {"available": False, "reason": "skipped (--no-real)", "measure": None}
    from gmemlab.twin import available
    from gmemlab.twin.measure import run_measurement

    ok, reason = available()
    if not ok:
        return {"available": False, "reason": reason, "measure": None}
    mc = cfg.measure
    say(f"measuring the real kernel: gmemlab measure, {mc.size >> 20} MiB x {mc.reps} reps")
    return {"available": True, "reason": "", "measure": run_measurement(mc)}


def reps_for(size_gib: float) -> int:
    """Lifecycles per size: at least two, more for small sizes (up to some 16 GiB in all)."""
    return max(2, min(8, round(REPEAT_GIB / size_gib)))


def _child(size_gib: float, kind: str, *, per_page: bool) -> dict[str, Any]:
    """A size's lifecycles in a fresh interpreter: its peak RSS is its own."""
    cmd = [sys.executable, "-m", "gmemlab.bench.lifecycle", repr(size_gib), kind,
           "--reps", str(1 if per_page else reps_for(size_gib))]
    if per_page:
        cmd.append("--per-page")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode:
        return {"kind": kind, "size_bytes": int(size_gib * GIB), "per_page_path": per_page,
                "error": f"exit status {out.returncode} (see stderr above)"}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_bench(cfg: BenchConfig, say: Say) -> dict[str, Any]:
    real = _real(cfg, say)
    runs = []
    for size in cfg.sizes_gib:
        for kind in KINDS:
            runs.append(_child(size, kind, per_page=False))
    per_page = [_child(cfg.per_page_mib / 1024, kind, per_page=True) for kind in KINDS]
    return {
        "schema": SCHEMA,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "commit": _commit()},
        "config": {"sizes_gib": list(cfg.sizes_gib), "per_page_mib": cfg.per_page_mib},
        "real": real,
        "runs": runs,
        "per_page": per_page,
    }
