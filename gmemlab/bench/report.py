"""The bench's table, its verdict on the scale targets, and the change against an earlier run.

Model costs are the model process's CPU time per page, over the same work at
every size (:func:`gmemlab.bench.lifecycle.combine`), with the spread of the
rounds beside it; real costs are ``gmemlab measure``'s medians.  The real kernel here has no
``NO_DIRECT_MAP``, so the real column is guest_memfd ``MMAP|INIT_SHARED``:
the cost the series adds on top is the model's to show, not the kernel's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gmemlab.bench.lifecycle import GIB, OPS
from gmemlab.report import Cell, table

# Targets of issue 6.
LIFECYCLE_SIZE_GIB = 64
LIFECYCLE_SECONDS = 120.0
PEAK_RSS_MIB = 4096.0
REAL_RATIO = 5.0
FLATNESS = 1.2

Measure = dict[str, Any]
# The real kernel's cost (ns per page) of each (lifecycle, operation) it can do.
REAL: dict[tuple[str, str], Callable[[Measure], float]] = {
    ("guest", "guest first touch"): lambda r: float(r["guest"]["first_touch_ns_per_page"]["median"]),
    ("guest", "close + free"): lambda r: float(r["guest"]["free_ns_per_page"]["median"]),
    ("host", "host first touch"): lambda r: float(r["fault_ns_per_page"]["guest_memfd"]["median"]),
    ("host", "close + free"): lambda r: float(r["free_ns_per_page"]["guest_memfd"]["median"]),
}
TOUCH = {("guest", "guest first touch"), ("host", "host first touch")}


def size_label(size_bytes: int) -> str:
    gib = size_bytes / GIB
    return f"{gib:g} GiB" if gib >= 1 else f"{size_bytes >> 20} MiB"


def real_us(result: dict[str, Any], kind: str, op: str) -> float | None:
    measure = result["real"]["measure"]
    get = REAL.get((kind, op))
    return get(measure) / 1000 if measure is not None and get is not None else None


def _rows(result: dict[str, Any], runs: list[dict[str, Any]], suffix: str = "") -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for run in runs:
        label = size_label(run["size_bytes"]) + suffix
        if "error" in run:
            rows.append([label, run["kind"], "(failed: " + run["error"] + ")", None, None, None, None,
                         None])
            continue
        for i, op in enumerate(OPS[run["kind"]]):
            model = run["ops"][op]["us_per_page"]
            samples = run["ops"][op].get("samples_us_per_page", [model])
            real = real_us(result, run["kind"], op)
            rows.append([label if i == 0 else "", run["kind"] if i == 0 else "", op, round(model, 3),
                         f"{min(samples):.2f}-{max(samples):.2f}" if len(samples) > 1 else None,
                         None if real is None else round(real, 3),
                         None if real is None else round(model / real, 2),
                         round(run["peak_rss_mib"]) if i == 0 else None])
    return rows


def flatness(runs: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Per lifecycle and operation (but bind, which is per VM): max / min of µs per page over
    the sizes of 1 GiB and up."""
    out = {}
    for kind, ops in OPS.items():
        for op in ops[1:]:
            costs = [r["ops"][op]["us_per_page"] for r in runs
                     if r["kind"] == kind and "error" not in r and r["size_bytes"] >= GIB]
            if len(costs) > 1:
                out[(kind, op)] = max(costs) / min(costs)
    return out


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Each target of issue 6: (target, what was measured, met; None if not measured)."""
    runs = [r for r in result["runs"] if "error" not in r]
    out: list[tuple[str, str, bool | None]] = []
    big = [r for r in result["runs"] if r["size_bytes"] >= LIFECYCLE_SIZE_GIB * GIB]
    if big:
        parts, ok = [], True
        for r in big:
            if "error" in r:
                parts.append(f"{r['kind']}: failed")
                ok = False
                continue
            parts.append(f"{r['kind']}: {r['lifecycle_wall_s']:.0f} s, {r['peak_rss_mib']:,.0f} MiB, "
                         f"{r['violations']} violations"
                         + (f" ({', '.join(f'{k} {v:,}' for k, v in r['broken'].items())})"
                            if r.get("broken") else ""))
            ok &= (r["lifecycle_wall_s"] <= LIFECYCLE_SECONDS and r["peak_rss_mib"] <= PEAK_RSS_MIB
                   and not r["violations"])
        out.append((f"{LIFECYCLE_SIZE_GIB} GiB lifecycle <= {LIFECYCLE_SECONDS:.0f} s, "
                    f"peak RSS <= {PEAK_RSS_MIB / 1024:.0f} GiB", "; ".join(parts), ok))
    else:
        out.append((f"{LIFECYCLE_SIZE_GIB} GiB lifecycle", "not run (--sizes)", None))
    if result["real"]["measure"] is None:
        out.append((f"first touch <= {REAL_RATIO:g}x real", result["real"]["reason"], None))
    else:
        worst = max(((r["ops"][op]["us_per_page"] / rv, f"{r['kind']} {size_label(r['size_bytes'])}")
                     for r in runs for kind, op in TOUCH if r["kind"] == kind
                     for rv in [real_us(result, kind, op)] if rv), default=None)
        out.append((f"first touch <= {REAL_RATIO:g}x real",
                    "no run" if worst is None else f"worst {worst[0]:.2f}x ({worst[1]})",
                    None if worst is None else worst[0] <= REAL_RATIO))
    flat = flatness(runs)
    if flat:
        (kind, op), worst_flat = max(flat.items(), key=lambda kv: kv[1])
        out.append((f"cost per page flat within {FLATNESS - 1:.0%} from 1 GiB up",
                    f"worst max/min {worst_flat:.2f} ({kind} {op})", worst_flat <= FLATNESS))
    else:
        out.append((f"cost per page flat within {FLATNESS - 1:.0%}", "fewer than 2 sizes >= 1 GiB", None))
    return out


def paths_line(result: dict[str, Any]) -> str:
    """Which kernel paths the bench's lifecycles ran, and why (``Machine.gate``)."""
    design = result["config"].get("design", "v12")
    done = [r for r in result["runs"] if "error" not in r]
    if not done or "paths_reason" not in done[0]:
        return f"design {design}"
    r = done[0]
    on = f" on {r['profile']}" if r.get("profile", "x86_64") != "x86_64" else ""
    return f"design {r.get('design', design)}{on}: kernel paths {r['paths_reason']}"


def render(result: dict[str, Any]) -> str:
    rows = _rows(result, result["runs"]) + _rows(result, result["per_page"], " per page")
    real = result["real"]
    out = [paths_line(result),
           table(["size", "lifecycle", "operation", "model us/page", "rounds", "real us/page", "ratio",
                  "peak RSS MiB"], rows, align="lllrrrrr")]
    out.append("")
    rounds, work = result["config"]["rounds"], result["config"]["work_gib"]
    if "merged" in result:
        out.append(f"pooled: {len(result['merged'])} benches (commits "
                   f"{', '.join(str(c) for c in result['merged'])}), their rounds together.")
    out.append(f"model: CPU time of the model process per page handled (punch and close: half the "
               f"pages each), over {rounds} round(s) of {work:g} GiB of lifecycles at every size; "
               "'rounds': the lowest and highest round; 'per page': the generator paths, batching off.")
    if real["measure"] is None:
        out.append(f"real: not measured: {real['reason']}")
    else:
        mc = real["measure"]["config"]
        out.append(f"real: gmemlab measure on {real['measure']['machine']['kernel']}, "
                   f"{mc['size_bytes'] >> 20} MiB x {mc['reps']} reps, medians; guest_memfd "
                   "MMAP|INIT_SHARED: this kernel cannot do NO_DIRECT_MAP, and measures no punch-hole.")
    out.append("")
    life = [[size_label(r["size_bytes"]), r["kind"], r["lifecycles"], round(r["lifecycle_wall_s"], 2),
             round(r["lifecycle_cpu_s"], 2), round(r["boot"]["wall_s"], 2),
             round(sum(c["wall_s"] for c in r["check_all"]), 2),
             f"{r['splits']['1G']} x 1G, {r['splits']['2M']:,} x 2M"]
            for r in result["runs"] if "error" not in r]
    out.append(table(["size", "lifecycle", "lifecycles", "lifecycle s (worst)", "CPU s", "boot s",
                      "check_all s", "direct-map splits"], life, align="llrrrrrl"))
    flat = flatness(result["runs"])
    if flat:
        out.append("")
        out.append("flatness (max / min us per page, sizes >= 1 GiB): " + ", ".join(
            f"{kind} {op} {v:.2f}" for (kind, op), v in flat.items()))
    out.append("")
    out.append("targets")
    out.append(table(["target", "measured", "met"],
                     [[t, what, ok] for t, what, ok in targets(result)], align="lll"))
    return "\n".join(out)


def _costs(result: dict[str, Any]) -> dict[tuple[str, str, int, bool], float]:
    return {(r["kind"], op, r["size_bytes"], r["per_page_path"]): v["us_per_page"]
            for r in result["runs"] + result["per_page"] if "error" not in r
            for op, v in r["ops"].items()}


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The change of every model cost both runs have."""
    before, after = _costs(old), _costs(new)
    rows: list[list[Cell]] = []
    for key, now in after.items():
        if key in before:
            kind, op, size, per_page = key
            was = before[key]
            rows.append([size_label(size) + (" per page" if per_page else ""), kind, op, round(was, 3),
                         round(now, 3), f"{(now - was) / was:+.0%}" if was else "-"])
    head = (f"change against {old['machine'].get('commit') or 'the earlier run'} "
            f"(model us/page, CPU time)")
    if not rows:
        return head + ": no operation in common"
    return head + "\n" + table(["size", "lifecycle", "operation", "before", "now", "change"], rows,
                               align="lllrrr")
