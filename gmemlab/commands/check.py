"""``gmemlab check``: the interleaving checker over every design and the standard scenarios."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from gmemlab.cli import UsageError, design_list, name_list

if TYPE_CHECKING:
    from gmemlab.check.explore import Result, Stats
    from gmemlab.check.known import Judgement

DESCRIPTION = """\
Run each scenario's actors (guest and user faults, punch-hole, fallocate, file
release, VM teardown, GUP through process_vm_readv, kvm-clock's pfncache, mlock,
secretmem faults, gadget reads, TLB evictions, kernel allocations, ENOMEM at a
split) concurrently on the model of each design and architecture profile,
exploring every interleaving within the bounds (breadth-first, states hashed) or
random PCT schedules, and judge the series' rules on every step.

The historical designs break some rules by design; the catalogue of their known
bugs (gmemlab/check/known.py) says which, cell by cell.  Prints a table of the
cells, what is new against the catalogue with the shortest schedule and a
command that replays it, and a one-line summary.  Exit status: 0 if every
verdict is as catalogued (skipped cells included), 1 if anything is new (a
violation the catalogue does not list, or a catalogued one that no longer
shows), 2 on bad usage.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check",
        help="explore concurrent interleavings of every design and judge the invariants",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--design", action="append", metavar="NAME[,NAME]", type=design_list,
                   help="design(s) to check, by name or design file (default: every design of "
                        "the series)")
    p.add_argument("--scenario", action="append", metavar="NAME[,NAME]", type=name_list,
                   help="scenario(s) to run (default: the standard ones)")
    p.add_argument("--profile", action="append", metavar="NAME[,NAME]", type=name_list,
                   help="architecture profile(s) to run on, or 'all' (default: x86_64; 'all' is "
                        "every real host, a what-if profile such as x86_64-what-if-snp-tdx runs "
                        "only when named); a design that does not offer NO_DIRECT_MAP on a "
                        "profile is skipped, saying why")
    p.add_argument("--replay", metavar="SCHEDULE",
                   help="replay a schedule (comma-separated actor indices) of one design and "
                        "scenario, step by step")
    p.add_argument("--random", action="store_true",
                   help="randomised PCT schedules instead of exhaustive search")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    p.add_argument("--runs", type=int, default=300, help="schedules per run with --random (300)")
    p.add_argument("--pct-depth", type=int, default=3,
                   help="PCT bug depth: priority change points + 1 (default 3)")
    p.add_argument("--preemptions", type=int, default=None,
                   help="bound on preemptions per schedule (default: unbounded)")
    p.add_argument("--max-steps", type=int, default=400,
                   help="longest schedule explored (default 400)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="expand each level of the search in N forked worker processes (default 1: "
                        "this process); with --ray, N Ray actors (default: one per cluster CPU); "
                        "verdicts and counterexamples are the same for every N")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="shard the search on the Ray cluster at ADDRESS ('local': start a Ray "
                        "instance here; needs pip install 'gmemlab[ray]')")
    p.add_argument("--ignore", action="append", metavar="INVARIANT[,INVARIANT]", type=name_list,
                   help="do not judge these properties (to look past a bug already found)")
    p.add_argument("--all", action="store_true", dest="all_violations",
                   help="keep exploring after a violation: every broken property, each with its "
                        "shortest schedule")
    p.add_argument("--explain", action="store_true",
                   help="print one counterexample timeline per distinct violation (property and "
                        "kernel path), catalogued ones too (default when at most two cells run)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--list", action="store_true",
                   help="list designs, scenarios and properties, then exit")
    p.set_defaults(handler=run)


def _names(values: list[tuple[str, ...]] | None) -> list[str]:
    return [n for v in values or () for n in v]


class _Progress:
    """Progress on stderr: which cell runs; on a long one, its states after 2 s, then every
    second (every 5 s off a TTY)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = self.start + 2.0 - (1.0 if self.tty else 5.0)
        if self.tty:
            print(f"\r\033[K  {label}", end="", file=sys.stderr, flush=True)

    def __call__(self, st: Stats) -> None:
        now = time.monotonic()
        if now - self.last < (1.0 if self.tty else 5.0):
            return
        self.last = now
        line = (f"  {self.label}: {st.states} states, {st.executions} executions, "
                f"depth {st.depth}, {now - self.start:.0f} s")
        print(("\r\033[K" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from gmemlab.check import report
    from gmemlab.check.explore import Bounds
    from gmemlab.check.known import judge
    from gmemlab.check.scenarios import SCENARIOS
    from gmemlab.check.suite import Options, check_one, property_names, series_designs
    from gmemlab.model.kvm.arch import PROFILES

    if args.list:
        print("designs:   " + ", ".join(series_designs()))
        print("profiles:  " + ", ".join(PROFILES))
        print("scenarios:")
        for s in SCENARIOS.values():
            print(f"  {s.name:<15} {s.summary}")
            for i, a in enumerate(s.actors):
                print(f"      actor {i}: {a.name} on cpu{a.cpu}: " + "; ".join(o.label for o in a.ops))
        print("properties (each with the rule of the series it states):")
        from gmemlab.check.execution import describe

        for name in property_names():
            summary, source = describe(name)
            print(f"  {name:<28} {summary}\n  {'':<28}   ({source})")
        return 0

    designs = _names(args.design) or series_designs()
    scenario_names = _names(args.scenario) or list(SCENARIOS)
    for n in scenario_names:
        if n not in SCENARIOS:
            raise UsageError(f"unknown scenario {n!r}; choose from: {', '.join(SCENARIOS)}")
    profiles = _names(args.profile) or ["x86_64"]
    if "all" in profiles:  # every real host; a what-if profile is only run when named
        profiles = [n for n, p in PROFILES.items() if not p.what_if_coco_no_direct_map]
    for p in profiles:
        if p not in PROFILES:
            raise UsageError(f"unknown profile {p!r}; choose from: all, {', '.join(PROFILES)}")
    ignore = frozenset(_names(args.ignore))
    unknown = ignore - set(property_names())
    if unknown:
        raise UsageError(f"unknown propert{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(sorted(unknown))}; see --list")
    if args.runs < 1 or args.pct_depth < 1 or args.max_steps < 1:
        raise UsageError("--runs, --pct-depth and --max-steps must be positive")
    if args.preemptions is not None and args.preemptions < 0:
        raise UsageError("--preemptions must not be negative")

    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.random and (args.ray is not None or (args.workers or 1) > 1):
        raise UsageError("--workers and --ray shard the exhaustive search; --random runs in one "
                         "process")
    if args.ray is not None:
        from gmemlab.check.shard import ray_available

        why = ray_available()
        if why is not None:
            raise UsageError(f"--ray: {why}")

    if args.replay is not None:
        return _replay(args, designs, scenario_names, profiles, ignore)

    opts = Options(Bounds(args.preemptions, args.max_steps), ignore, args.all_violations, args.random,
                   args.seed, args.runs, args.pct_depth,
                   workers=args.workers if args.workers is not None else (0 if args.ray else 1),
                   ray=args.ray)
    cells = [(d, SCENARIOS[n].on(p)) for d in designs for p in profiles for n in scenario_names]
    if not args.json:
        mode = (f"random PCT, seed {args.seed}, {args.runs} runs per cell, depth {args.pct_depth}"
                if args.random else "every interleaving (breadth-first, states hashed)")
        if args.ray is not None:
            mode += f"; sharded on Ray at {args.ray}" + (f", {args.workers} actors" if args.workers
                                                       else ", one actor per cluster CPU")
        elif opts.workers > 1:
            mode += f"; {opts.workers} worker processes"
        print(f"gmemlab check: {len(designs)} design(s) x {len(scenario_names)} scenario(s) x "
              f"{len(profiles)} profile(s) = {len(cells)} cells; {mode}")
        print(f"  designs:   {', '.join(designs)}\n  profiles:  {', '.join(profiles)}")
        print(f"  {len(property_names())} properties judged on every step (--list names them and "
              "their rules); bounds: " + opts.bounds.describe())
        print("  verdicts are held to the catalogue of known bugs (gmemlab/check/known.py): "
              "exit 0 if nothing is new")
        if ignore:
            print("  ignoring: " + ", ".join(sorted(ignore)))
        print()
    results = []
    for i, (d, s) in enumerate(cells, 1):
        on = f" on {s.profile}" if len(profiles) > 1 else ""
        prog = None if args.quiet or args.json else _Progress(f"[{i}/{len(cells)}] {d} x {s.name}{on}")
        results.append(check_one(d, s, opts, progress=prog))
        if prog is not None:
            prog.done()
    judgements = [judge(r, ignore, all_violations=args.all_violations) for r in results]
    undigested = sorted(set().union(*(r.unknown for r in results)))
    if undigested:
        # Not unsound (such values are told apart by identity), but equal states may not merge.
        print(f"warning: the state digest does not know {', '.join(undigested)}; teach "
              "gmemlab.check.digest to name them", file=sys.stderr)
    bad = [(r, j) for r, j in zip(results, judgements, strict=True) if j.status in ("new", "gone")]
    if args.json:
        print(json.dumps({"bounds": opts.bounds.describe(), "random": args.random,
                          "profiles": profiles, "as_catalogued": not bad,
                          "results": [report.result_json(r, ignore, j)
                                      for r, j in zip(results, judgements, strict=True)]},
                         indent=2))
        return 1 if bad else 0
    print(report.table(results, judgements))
    if args.explain or len(results) <= 2:
        print()
        print(report.explain(results, ignore))
    elif bad:
        print()
        print("not as catalogued:")
        for r, j in bad:
            on = f" on {r.profile}" if r.profile != "x86_64" else ""
            print(f"  {r.design} x {r.scenario}{on}: {j.describe()}")
            for cx in r.found:
                if cx.invariant in j.new:
                    where = "in setup" if cx.in_setup else f"{len(cx.schedule)} steps"
                    print(f"    {cx.invariant} ({where}): {cx.message}\n    replay: "
                          + report.replay_command(r.design, r.scenario, cx.schedule, ignore,
                                                  r.profile))
        print("  (--explain shows the timelines)")
    print()
    print(_summary(results, judgements))
    return 1 if bad else 0


def _summary(results: list[Result], judgements: list[Judgement]) -> str:
    skipped = sum(r.skipped is not None for r in results)
    ran = len(results) - skipped
    passed = sum(r.skipped is None and r.passed for r in results)
    bad = [f"{r.design} x {r.scenario}" + (f" on {r.profile}" if r.profile != "x86_64" else "")
           + f" ({j.describe()})" for r, j in zip(results, judgements, strict=True)
           if j.status in ("new", "gone")]
    head = (f"summary: {ran} cells run ({passed} pass, {ran - passed} fail), {skipped} skipped; ")
    if not bad:
        return head + "every verdict as catalogued (exit 0)"
    return head + f"{len(bad)} not as catalogued: " + "; ".join(bad) + " (exit 1)"


def _replay(args: argparse.Namespace, designs: list[str], scenarios: list[str], profiles: list[str],
            ignore: frozenset[str]) -> int:
    from gmemlab.check import report
    from gmemlab.check.scenarios import SCENARIOS

    if len(designs) != 1 or len(scenarios) != 1 or len(profiles) != 1:
        raise UsageError("--replay needs exactly one --design and one --scenario (and at most one "
                         "--profile)")
    try:
        schedule = tuple(int(x) for x in args.replay.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--replay wants comma-separated actor indices, not {args.replay!r}") from None
    scenario = SCENARIOS[scenarios[0]].on(profiles[0])
    try:
        rep = report.replay(scenario, designs[0], schedule, ignore=ignore)
    except report.ScheduleError as e:
        raise UsageError(str(e)) from None
    if args.json:
        actors = rep.execution.actors
        print(json.dumps({
            "design": designs[0], "scenario": scenario.name, "schedule": list(schedule),
            "steps": [{"actor": actors[r.actor].name, "cpu": actors[r.actor].task.cpu,
                       "step": report.step_label(r.step), "stack": list(r.stack),
                       "events": [e.as_json() for e in r.events],
                       "broken": [b.invariant for b in r.broken]} for r in rep.records],
            "broken": [{"invariant": b.invariant, "message": b.message, "step": n}
                       for n, b in rep.broken],
        }, indent=2))
    else:
        print(report.render_replay(rep, designs[0]))
    return 1 if rep.broken else 0
