"""Exploring a scenario's interleavings: exhaustive within bounds, or randomised (PCT).

Exhaustive search is a breadth-first search over *states*: a state is an
execution's fingerprint (``digest.py``), plus the running actor and the
preemptions spent when preemptions are bounded.  Every transition from every
reachable state is taken once; schedules that reach a state already seen
stop there (state hashing: the reduction).  Breadth-first order, with the
actors of a state tried in increasing order, reaches every state first by its
shortest, then lexicographically smallest, schedule; so the counterexample
reported for a property is the shortest, then smallest, schedule that breaks it.

The search goes level by level: the frontier is shared between expanders
(``expand.py``: they replay schedules and take the steps) in this process, in
forked workers or on Ray (``shard.py``), and their transitions are merged in
schedule order, which keeps the result independent of the sharding.

Bounds: the number of actors and operations is the scenario's; the
preemption bound (a switch away from an actor that could have gone on)
defaults to none; schedules longer than ``max_steps`` are cut and reported
(the verdict is then bounded, not exhaustive).

Randomised search follows PCT (Burckhardt et al., ASPLOS'10): random distinct
actor priorities, the highest-priority enabled actor runs, and at ``depth - 1``
random steps the running actor drops below all others.  Run ``r`` of seed
``s`` draws from ``random.Random(f"{s}:{r}")``, so any run is reproducible
alone; a schedule that breaks a property is shrunk greedily (drop one step
at a time while the same property still breaks) before it is reported.
"""

from __future__ import annotations

import gc
import heapq
import random
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from gmemlab.check.execution import Broken, DesignSpec, Execution
from gmemlab.check.expand import Limits, Node
from gmemlab.check.scenarios import Scenario
from gmemlab.check.shard import LocalPool, Pool, open_pool, share

PROGRESS_EVERY = 500  # transitions between progress callbacks
GC_THRESHOLD = 50_000  # allocations between young collections while exploring (default 700)


@dataclass(frozen=True, slots=True)
class Bounds:
    preemptions: int | None = None  # None: unbounded
    max_steps: int = 400

    def describe(self) -> str:
        pre = "unbounded" if self.preemptions is None else f"<= {self.preemptions}"
        return f"preemptions {pre}, steps <= {self.max_steps}"


@dataclass(frozen=True, slots=True)
class Counterexample:
    """A shortest schedule found to break ``invariant`` (``()``: the setup broke it)."""

    invariant: str
    message: str
    pfn: int
    schedule: tuple[int, ...]
    oops: bool = False
    at_end: bool = False  # broken by the state the execution ended in
    in_setup: bool = False

    @property
    def replay(self) -> str:
        return ",".join(map(str, self.schedule))


@dataclass(slots=True)
class Stats:
    executions: int = 0
    states: int = 0
    transitions: int = 0
    depth: int = 0
    seconds: float = 0.0


Progress = Callable[[Stats], None]


@dataclass(slots=True)
class Result:
    scenario: str
    design: str
    mode: str  # "exhaustive", "random", or "all" (the unreduced enumeration)
    bounds: Bounds
    stats: Stats = field(default_factory=Stats)
    found: list[Counterexample] = field(default_factory=list)
    complete: bool = True  # every reachable state was explored (no bound cut anything)
    bound_hits: int = 0  # schedules cut at max_steps
    finals: set[int] = field(default_factory=set)  # end-state fingerprints (when collected)
    unknown: set[str] = field(default_factory=set)  # local types the digest could not name
    seed: int | None = None
    runs: int = 0
    profile: str = "x86_64"
    skipped: str | None = None  # why the cell did not run (the design x profile lacks the flag)
    rationale: set[str] = field(default_factory=set)  # rationale entries some execution departed from

    @property
    def passed(self) -> bool:
        return not self.found

    def verdict(self) -> str:
        if self.skipped is not None:
            return "skip"
        if self.found:
            first = self.found[0]
            where = "in setup" if first.in_setup else f"{len(first.schedule)} steps"
            more = f" (+{len(self.found) - 1} more)" if len(self.found) > 1 else ""
            return f"FAIL {first.invariant} ({where}){more}"
        return self._pass() + (f"; rationale not followed: {', '.join(sorted(self.rationale))}"
                               if self.rationale else "")

    def _pass(self) -> str:
        if self.mode == "random":
            return f"pass ({self.runs} random runs)"
        if self.bound_hits:
            return f"pass (bounded: {self.bound_hits} cut at {self.bounds.max_steps} steps)"
        if not self.complete:
            return f"pass (bounded: preemptions <= {self.bounds.preemptions})"
        return "pass (exhaustive)"


class _Search:
    """Shared plumbing: fresh executions, counterexample bookkeeping, progress."""

    def __init__(self, scenario: Scenario, design: DesignSpec, design_name: str, bounds: Bounds,
                 ignore: frozenset[str], stop_at_first: bool, progress: Progress | None,
                 mode: str) -> None:
        self.scenario = scenario
        self.design = design
        self.ignore = ignore
        self.stop_at_first = stop_at_first
        self.progress = progress
        self.start = time.perf_counter()
        self.result = Result(scenario.name, design_name, mode, bounds, profile=scenario.profile)
        self.seen: dict[str, int] = {}  # invariant -> index in result.found

    def fresh(self) -> Execution:
        self.result.stats.executions += 1
        return Execution(self.scenario, self.design, ignore=self.ignore,
                         departures=self.result.rationale)

    def replay(self, schedule: tuple[int, ...]) -> Execution:
        """A fresh execution brought to the state ``schedule`` reaches (already judged)."""
        ex = self.fresh()
        for a in schedule:
            ex.step(a, judge=False)
        return ex

    def note(self, broken: list[Broken], schedule: tuple[int, ...], *, at_end: bool = False,
             in_setup: bool = False) -> bool:
        """Keep the shortest schedule seen for each broken property; True: stop searching.

        Breadth-first search finds the shortest first; the unreduced enumeration
        and random search see longer ones first.
        """
        found = self.result.found
        for b in broken:
            cx = Counterexample(b.invariant, b.message, b.pfn, schedule, b.oops, at_end, in_setup)
            i = self.seen.get(b.invariant)
            if i is None:
                self.seen[b.invariant] = len(found)
                found.append(cx)
            elif len(schedule) < len(found[i].schedule):
                found[i] = cx
        return bool(broken) and self.stop_at_first

    def tick(self, force: bool = False) -> None:
        stats = self.result.stats
        stats.seconds = time.perf_counter() - self.start
        if self.progress is not None and (force or stats.transitions % PROGRESS_EVERY == 0):
            self.progress(stats)

    def tick_at(self, base: int, more: int) -> None:
        """Progress in the middle of a level: ``more`` transitions since ``base``."""
        self.result.stats.transitions = base + more
        self.tick(force=True)

    def finish(self, ex: Execution | None) -> Result:
        if ex is not None:
            self.result.unknown |= ex.namer.unknown
        self.tick(force=True)
        return self.result

    def ended(self, fp: int, broken: list[Broken], schedule: tuple[int, ...], collect: bool) -> bool:
        """A state that can go no further, and what its end broke; True: stop searching."""
        if collect:
            self.result.finals.add(fp)
        return bool(broken) and self.note(broken, schedule, at_end=True)


def explore(scenario: Scenario, design: DesignSpec, *, design_name: str | None = None,
            bounds: Bounds = Bounds(), ignore: frozenset[str] = frozenset(),
            stop_at_first: bool = True, collect_finals: bool = False,
            progress: Progress | None = None, workers: int = 1,
            ray_address: str | None = None) -> Result:
    """Breadth-first exhaustive search of ``scenario`` on ``design`` within ``bounds``.

    ``workers`` expanders share each level (forked processes, or Ray actors on the
    cluster at ``ray_address``); the result is the same whatever the sharding.
    """
    s = _Search(scenario, design, design_name or _name(design), bounds, ignore, stop_at_first,
                progress, "exhaustive")
    pool = open_pool(scenario, design, ignore, Limits(bounds.preemptions, bounds.max_steps),
                     workers, ray_address)
    try:
        with _gc_deferred():
            _breadth_first(s, pool, collect_finals)
    finally:
        pool.close()
    return s.finish(None)


def _breadth_first(s: _Search, pool: Pool, collect: bool) -> None:
    """Level by level: every worker expands its share of the frontier, then the transitions are
    merged in schedule order, as one process expanding the frontier in order would see them.

    Breadth-first order with actors tried in increasing order reaches each state first by
    its shortest, then lexicographically smallest, schedule; merging in schedule order keeps
    that, so a property's counterexample is that schedule however the levels were sharded.
    """
    res = s.result
    stats = res.stats
    root = pool.root()
    stats.executions = 1
    res.unknown |= root.unknown
    res.rationale |= root.departures
    if root.crashed:
        s.note(root.setup_broken, (), in_setup=True)
        return
    seen: set[Hashable] = {root.node.key}
    stats.states = 1
    if not root.node.enabled:
        s.ended(root.fp, root.end, (), collect)
        return
    owner: dict[Hashable, int] = {root.node.key: 0}  # the worker that keeps a node's execution
    frontier = [root.node]
    while frontier:
        base = stats.transitions
        if isinstance(pool, LocalPool):  # in this process: progress within a level too
            pool.expander.tick = partial(s.tick_at, base)
        batches = pool.expand(share(frontier, owner, pool.size), s.stop_at_first)
        stats.transitions = base  # counted again below, as they are merged
        owner = {}
        frontier = []
        for b in batches:
            stats.executions += b.executions
            res.unknown |= b.unknown
            res.rationale |= b.departures
            if b.cut:
                res.complete = False
        merged = heapq.merge(*[[(o, w) for o in b.outcomes] for w, b in enumerate(batches)],
                             key=lambda ow: ow[0].schedule)
        for o, w in merged:
            stats.transitions += 1
            if o.broken and s.note(o.broken, o.schedule):
                res.complete = False
                return
            if o.key in seen:
                continue
            assert o.enabled is not None, "an expander skipped a state the explorer never saw"
            seen.add(o.key)
            depth = len(o.schedule)
            stats.states = len(seen)
            stats.depth = max(stats.depth, depth)
            if not o.enabled:
                if s.ended(o.fp, o.end, o.schedule, collect):
                    res.complete = False
                    return
            elif depth >= res.bounds.max_steps:
                res.bound_hits += 1
            else:
                owner[o.key] = w
                frontier.append(Node(o.key, o.schedule, o.enabled, o.schedule[-1], o.preemptions,
                                     o.digests))
        s.tick(force=True)


@contextmanager
def _gc_deferred() -> Iterator[None]:
    """Collect garbage less often while exploring.

    Every replay builds a machine of thousands of objects; with the default
    thresholds the collector runs several times per replay and, once the
    explorer's own records have grown, spends a third of the time walking them.
    """
    old = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def enumerate_all(scenario: Scenario, design: DesignSpec, *, ignore: frozenset[str] = frozenset(),
                  max_executions: int = 200_000) -> Result:
    """Every interleaving, no reduction: the reference the reduced search is tested against.

    Explores past violations (as ``explore(stop_at_first=False)`` does) and
    collects the fingerprint of every end state.
    """
    s = _Search(scenario, design, _name(design), Bounds(), ignore, False, None, "all")
    res = s.result
    root = s.fresh()
    if root.setup_broken or root.crashed:
        s.note(root.setup_broken, (), in_setup=True)
        return s.finish(root)
    stack: list[tuple[tuple[int, ...], Execution]] = [((), root)]
    while stack:
        prefix, ex = stack.pop()
        enabled = ex.enabled()
        if not enabled:
            res.finals.add(ex.fingerprint())
            s.note(ex.end_state(), prefix, at_end=True)
            continue
        for j, a in enumerate(enabled):
            if res.stats.executions >= max_executions:
                raise RuntimeError(f"{scenario.name}: more than {max_executions} interleavings")
            child = ex if j == len(enabled) - 1 else s.replay(prefix)
            s.note(child.step(a), (*prefix, a))
            res.stats.transitions += 1
            stack.append(((*prefix, a), child))
    return s.finish(root)


def random_search(scenario: Scenario, design: DesignSpec, *, seed: int, runs: int, depth: int = 3,
                  design_name: str | None = None, bounds: Bounds = Bounds(),
                  ignore: frozenset[str] = frozenset(), stop_at_first: bool = True,
                  progress: Progress | None = None) -> Result:
    """PCT-style randomised search: ``runs`` schedules drawn from ``seed``."""
    s = _Search(scenario, design, design_name or _name(design), bounds, ignore, stop_at_first,
                progress, "random")
    res = s.result
    res.seed = seed
    res.complete = False
    stats = res.stats
    states: set[int] = set()
    # PCT draws its change points from the run's length, unknown until a run ends:
    # start from a generous guess (operations take tens of steps) and learn the longest.
    length = 32 * sum(len(a.ops) for a in scenario.actors)
    ex: Execution | None = None
    for r in range(runs):
        res.runs = r + 1
        sched = pct_schedule(s, seed, r, depth, length, bounds.max_steps, states)
        length = max(length, len(sched.steps))
        ex = sched.execution
        if sched.broken:
            first = sched.broken[0]
            short = shrink(scenario, design, sched.steps, first.invariant, ignore, at_end=sched.at_end)
            s.note([first], short, at_end=sched.at_end, in_setup=sched.in_setup)
            if s.stop_at_first:
                break
        stats.states = len(states)
        s.tick(force=r % 50 == 0)
    return s.finish(ex)


@dataclass(slots=True)
class _Run:
    execution: Execution
    steps: tuple[int, ...]
    broken: list[Broken]
    at_end: bool = False
    in_setup: bool = False


def pct_schedule(s: _Search, seed: int, run: int, depth: int, length: int, max_steps: int,
                 states: set[int]) -> _Run:
    """One PCT run; its schedule and the first properties it broke."""
    rng = random.Random(f"{seed}:{run}")
    ex = s.fresh()
    if ex.setup_broken or ex.crashed:
        return _Run(ex, (), ex.setup_broken, in_setup=True)
    n = len(ex.actors)
    prio = list(range(depth, depth + n))
    rng.shuffle(prio)
    changes = sorted(rng.sample(range(1, length + 1), min(depth - 1, length)))
    steps: list[int] = []
    while len(steps) < max_steps:
        enabled = ex.enabled()
        if not enabled:
            return _Run(ex, tuple(steps), ex.end_state(), at_end=True)
        a = max(enabled, key=prio.__getitem__)
        broken = ex.step(a)
        steps.append(a)
        s.result.stats.transitions += 1
        states.add(ex.fingerprint())
        if broken:
            return _Run(ex, tuple(steps), broken)
        while changes and changes[0] == len(steps):
            prio[a] = depth - len(changes)  # below every initial priority
            changes.pop(0)
    s.result.bound_hits += 1
    return _Run(ex, tuple(steps), [])


def replay_lenient(scenario: Scenario, design: DesignSpec, schedule: tuple[int, ...],
                   invariant: str, ignore: frozenset[str], at_end: bool) -> tuple[int, ...] | None:
    """Replay skipping steps of actors that cannot move; the prefix that breaks ``invariant``."""
    ex = Execution(scenario, design, ignore=ignore)
    done: list[int] = []
    for a in schedule:
        if a not in ex.enabled():
            continue
        done.append(a)
        if any(b.invariant == invariant for b in ex.step(a)):
            return tuple(done)
    if at_end and not ex.enabled() and any(b.invariant == invariant for b in ex.end_state()):
        return tuple(done)
    return None


def shrink(scenario: Scenario, design: DesignSpec, schedule: tuple[int, ...], invariant: str,
           ignore: frozenset[str], *, at_end: bool = False) -> tuple[int, ...]:
    """Drop steps one at a time, from the end, while ``invariant`` still breaks."""
    best = replay_lenient(scenario, design, schedule, invariant, ignore, at_end) or schedule
    i = len(best) - 1
    while i >= 0:
        cand = replay_lenient(scenario, design, best[:i] + best[i + 1:], invariant, ignore, at_end)
        if cand is not None and len(cand) < len(best):
            best = cand
        i = min(i - 1, len(best) - 1)
    return best


def _name(design: DesignSpec) -> str:
    if isinstance(design, str):
        return design
    return str(getattr(design, "name", getattr(design, "__name__", "design")))
