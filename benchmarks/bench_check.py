"""Benchmark of ``gmemlab check`` (not a test): throughput and time to find each known bug.

Prints, for the v12 standard suite, SPIN-style figures per scenario (distinct
states, transitions, depth reached, replays, seconds, states per second)
against the targets of issue 13 (9,000 states/s, the suite in 3 s), then for
each bug of ``gmemlab.check.known`` how long the checker takes to find it
(budget 10 s) and with how many executions, and the throughput of random (PCT)
mode.  ``--workers N`` explores each scenario with N forked workers;
``--large`` adds the scenarios kept out of the default suite (minutes each).

    python benchmarks/bench_check.py [--repeat N] [--workers N] [--large]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from gmemlab.check.explore import Result, explore, random_search
from gmemlab.check.known import KNOWN_BUGS
from gmemlab.check.scenarios import LARGE, STANDARD, Scenario, get_scenario

SUITE_BUDGET_S = 3.0
RATE_TARGET = 9000.0  # states per second
BUG_BUDGET_S = 10.0


def spin_table(scenarios: tuple[Scenario, ...], workers: int) -> tuple[list[Result], float]:
    """Explore each scenario on v12; print one SPIN-style line per scenario as it ends."""
    print(f"  {'scenario':<16} {'verdict':<18} {'states':>7} {'trans':>7} {'depth':>5} "
          f"{'replays':>7} {'time s':>7} {'states/s':>8}")
    results = []
    start = time.perf_counter()
    for s in scenarios:
        r = explore(s, "v12", workers=workers)
        st = r.stats
        results.append(r)
        print(f"  {s.name:<16} {r.verdict()[:18]:<18} {st.states:>7} {st.transitions:>7} "
              f"{st.depth:>5} {st.executions:>7} {st.seconds:>7.2f} "
              f"{st.states / max(st.seconds, 1e-9):>8.0f}", flush=True)
    return results, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="repeat each bug search, report the median")
    ap.add_argument("--workers", type=int, default=1, help="forked workers per search (default 1)")
    ap.add_argument("--large", action="store_true", help="also the large scenarios (minutes)")
    args = ap.parse_args()
    print(f"gmemlab check benchmark: Python {platform.python_version()}, {platform.machine()}, "
          f"{_cpus()} CPUs, load average {_load()}, {args.workers} worker(s)")
    print()

    print("v12 standard suite (exhaustive, states hashed, preemptions unbounded):")
    results, suite_s = spin_table(STANDARD, args.workers)
    states = sum(r.stats.states for r in results)
    rate = states / suite_s
    ok = all(r.passed and r.complete for r in results)
    print(f"suite: {states} states in {suite_s:.1f} s = {rate:.0f} states/s (targets: "
          f"{SUITE_BUDGET_S:.0f} s, {RATE_TARGET:.0f} states/s): "
          f"{'OK' if ok and suite_s <= SUITE_BUDGET_S and rate >= RATE_TARGET else 'SHORT'}")
    print()
    if args.large:
        print("large scenarios (not in the default suite):")
        spin_table(LARGE, args.workers)
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


def _load() -> str:
    import os

    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
