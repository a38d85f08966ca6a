"""Benchmark of ``gmemlab check`` (not a test): throughput and time to find each known bug.

Prints, for the v12 standard suite, executions and distinct states explored
per second (against the 60 s budget of issue 4), then for each bug of
``gmemlab.check.known`` how long the checker takes to find it (budget 10 s)
and with how many executions, and the throughput of random (PCT) mode.

    python benchmarks/bench_check.py [--repeat N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from gmemlab.check.explore import explore, random_search
from gmemlab.check.known import KNOWN_BUGS, judge
from gmemlab.check.report import table
from gmemlab.check.scenarios import STANDARD, get_scenario

SUITE_BUDGET_S = 60.0
BUG_BUDGET_S = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="repeat each bug search, report the median")
    args = ap.parse_args()
    print(f"gmemlab check benchmark: Python {platform.python_version()}, {platform.machine()}, "
          f"{_cpus()} CPUs")
    print()

    print("v12 standard suite (exhaustive, states hashed, preemptions unbounded):")
    start = time.perf_counter()
    results = [explore(s, "v12") for s in STANDARD]
    suite_s = time.perf_counter() - start
    print(table(results, [judge(r) for r in results]))
    ok = all(r.passed and r.complete for r in results) and suite_s < SUITE_BUDGET_S
    print(f"suite: {suite_s:.1f} s (budget {SUITE_BUDGET_S:.0f} s): {'OK' if ok else 'OVER'}")
    print()

    print(f"time to find each known bug (median of {args.repeat}):")
    print(f"  {'bug':<36} {'invariant':<27} {'steps':>5} {'execs':>6} {'states':>6} {'time s':>7}")
    worst = 0.0
    for bug in KNOWN_BUGS:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            r = explore(get_scenario(bug.scenario).on(bug.profile), bug.design,
                        ignore=frozenset(bug.ignore))
            times.append(time.perf_counter() - t)
        cx = r.found[0] if r.found else None
        found = cx is not None and cx.invariant == bug.invariant
        secs = statistics.median(times)
        worst = max(worst, secs)
        print(f"  {bug.name:<36} {(cx.invariant if cx else 'NOT FOUND'):<27} "
              f"{(len(cx.schedule) if cx else 0):>5} {r.stats.executions:>6} {r.stats.states:>6} "
              f"{secs:>7.3f}{'' if found else '  (expected ' + bug.invariant + ')'}")
    print(f"slowest: {worst:.2f} s (budget {BUG_BUDGET_S:.0f} s): {'OK' if worst < BUG_BUDGET_S else 'OVER'}")
    print()

    print("random (PCT, depth 3) mode, 200 runs each:")
    for name in ("ufault-release", "enomem-split"):
        t = time.perf_counter()
        r = random_search(get_scenario(name), "v12", seed=0, runs=200)
        secs = time.perf_counter() - t
        print(f"  v12 x {name:<15} {r.runs / secs:7.0f} runs/s, {r.stats.transitions / secs:7.0f} "
              f"steps/s, {r.stats.states} distinct states seen, {r.verdict()}")
    return 0 if ok and worst < BUG_BUDGET_S else 1


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
