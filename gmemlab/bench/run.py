"""Run the bench: the real kernel's measurement, then each size and lifecycle in a fresh process.

JSON (schema ``gmemlab.bench/2``; times in seconds, costs in µs per page)::

    {
      "schema": "gmemlab.bench/2",
      "machine": {"kernel": str, "cpus": int, "python": str, "commit": str | null},
      "config": {"sizes_gib": [float], "rounds": int, "work_gib": float, "per_page_mib": float},
      "real": {"available": bool, "reason": str, "measure": MEASURE | null},
      "runs": [RUN, ...],              # one per size and lifecycle, batched paths
      "per_page": [RUN, ...]           # the per-page generator paths, at per_page_mib
    }

``MEASURE`` is ``gmemlab measure``'s JSON (``gmemlab.twin.measure``), ``RUN``
combines (:func:`gmemlab.bench.lifecycle.combine`: each operation's CPU time
over its pages, the worst lifecycle time and RSS) the
:func:`gmemlab.bench.lifecycle.run` results of a size's rounds, each round
``work_gib`` of lifecycles (one of the largest size, several of a smaller),
or is ``{"kind", "size_bytes", "error"}`` if a run failed.  A result of
:func:`merge` also has ``"merged": [commit, ...]``, the benches it pools.
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

from gmemlab.bench.lifecycle import GIB, KINDS, combine
from gmemlab.twin.measure import MeasureConfig

SCHEMA = "gmemlab.bench/2"
DEFAULT_SIZES = (1.0, 4.0, 16.0, 64.0)
QUICK_SIZES = (0.25, 1.0)
# Each round's cost at a size still varies by about 10% with the machine's drift over
# minutes; four rounds bring a size's mean within about 5%.
DEFAULT_ROUNDS = 4
Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    sizes_gib: tuple[float, ...] = DEFAULT_SIZES
    rounds: int = DEFAULT_ROUNDS
    # GiB of lifecycles per size, kind and round; None: the largest size, so that every
    # size is measured over the same work (the machine's speed varies with time).
    work_gib: float | None = None
    per_page_mib: float = 16
    real: bool = True
    design: str = "v12"  # a design's name or a design file
    profile: str = "x86_64"  # the host the model runs as
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
    from gmemlab.twin import guest_memfd_available
    from gmemlab.twin.measure import run_measurement

    ok, reason = guest_memfd_available()
    if not ok:
        return {"available": False, "reason": reason, "measure": None}
    mc = cfg.measure
    say(f"measuring the real kernel: gmemlab measure, {mc.size >> 20} MiB x {mc.reps} reps")
    return {"available": True, "reason": "", "measure": run_measurement(mc)}


def _child(size_gib: float, kind: str, *, per_page: bool, work_gib: float = 0.0,
           design: str = "v12", profile: str = "x86_64") -> dict[str, Any]:
    """Lifecycles (``work_gib`` of them, at least one) in a fresh interpreter: its peak RSS
    is that size's own."""
    cmd = [sys.executable, "-m", "gmemlab.bench.lifecycle", repr(size_gib), kind,
           "--work-gib", repr(work_gib), "--design", design, "--profile", profile]
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
    # Every other round runs the sizes in reverse order, so that each size's rounds sit on
    # average at the same point of the bench: this machine's speed drifts with time.
    work = cfg.work_gib if cfg.work_gib is not None else max(cfg.sizes_gib)
    jobs = [(size, kind) for size in cfg.sizes_gib for kind in KINDS]
    samples: dict[tuple[float, str], list[dict[str, Any]]] = {job: [] for job in jobs}
    for rnd in range(cfg.rounds):
        for size, kind in jobs if rnd % 2 == 0 else jobs[::-1]:
            samples[(size, kind)].append(_child(size, kind, per_page=False, work_gib=work,
                                                design=cfg.design, profile=cfg.profile))
    runs = [combine(samples[job]) for job in jobs]
    per_page = [_child(cfg.per_page_mib / 1024, kind, per_page=True, design=cfg.design,
                       profile=cfg.profile) for kind in KINDS]
    return {
        "schema": SCHEMA,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "commit": _commit()},
        "config": {"sizes_gib": list(cfg.sizes_gib), "rounds": cfg.rounds, "work_gib": work,
                   "per_page_mib": cfg.per_page_mib, "design": cfg.design, "profile": cfg.profile},
        "real": real,
        "runs": runs,
        "per_page": per_page,
    }


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several benches of one configuration as one: their rounds pooled.

    On a host whose speed drifts, one bench's four rounds can leave a size's cost
    10% off; benches run one after the other add rounds without starting again.
    Which code each ran is listed (``merged``), not checked: a commit that only
    touched the README measures the same model.  Raises ValueError if the
    configurations differ.
    """
    first = results[0]
    for r in results:
        if r.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result: {r.get('schema')!r}")
        for key in ("sizes_gib", "work_gib", "per_page_mib"):
            if r["config"][key] != first["config"][key]:
                raise ValueError(f"the benches differ in {key}: {first['config'][key]} and "
                                 f"{r['config'][key]}")
    real = next((r["real"] for r in results if r["real"]["measure"] is not None), first["real"])
    return {**first,
            "config": {**first["config"], "rounds": sum(r["config"]["rounds"] for r in results)},
            "real": real,
            "merged": [r["machine"]["commit"] for r in results],
            "runs": [combine(list(runs), pooled=True)
                     for runs in zip(*(r["runs"] for r in results), strict=True)],
            "per_page": [combine(list(runs), pooled=True)
                         for runs in zip(*(r["per_page"] for r in results), strict=True)]}
