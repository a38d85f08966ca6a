"""Expanding states of the breadth-first search: the part of ``explore`` a worker runs.

The explorer (``explore.py``) keeps the search itself: which states are known,
the frontier, the counterexamples.  An :class:`Expander` takes frontier nodes,
brings a fresh execution to each (or continues one it kept alive), takes each
allowed transition, and reports what it saw.  The explorer can run one in its
own process, several in forked processes, or several as Ray actors
(``shard.py``); what the expander reports depends only on the nodes it is
given, never on which worker it runs in, so the merged search is the same.

A state is reached by replaying its schedule on a fresh execution, except for
its first transition when this expander found the state itself one level
earlier and kept that execution alive (up to :data:`LIVE_MAX`).  Model
generators cannot be copied, so nothing cheaper than a replay can bring a
second execution to the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from gmemlab.check.execution import Broken, DesignSpec, Execution
from gmemlab.check.scenarios import Scenario

LIVE_MAX = 2048  # executions kept alive for their state's first expansion (~40 KB each)
TICK_EVERY = 500  # transitions between progress callbacks


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds an expander applies to each transition (``explore.Bounds``, flattened)."""

    preemptions: int | None
    max_steps: int


@dataclass(frozen=True, slots=True)
class Node:
    """A frontier state: its key, its shortest (then lexicographically smallest) schedule, the
    actors enabled in it, who ran last, and the preemptions spent on the way."""

    key: Hashable
    schedule: tuple[int, ...]
    enabled: tuple[int, ...]
    last: int = -1
    preemptions: int = 0
    digests: tuple[int | None, ...] = ()  # each actor's part of the fingerprint


@dataclass(frozen=True, slots=True)
class Outcome:
    """One transition: ``schedule`` ends with the actor that moved."""

    schedule: tuple[int, ...]
    broken: list[Broken]
    key: Hashable  # the state reached
    fp: int
    preemptions: int
    enabled: tuple[int, ...] | None  # None: this expander had already reported the state
    end: list[Broken] = field(default_factory=list)  # judged when nothing is enabled
    digests: tuple[int | None, ...] = ()


@dataclass(slots=True)
class Batch:
    """What an expander reports for a batch of nodes: its transitions in schedule order."""

    outcomes: list[Outcome]
    cut: bool  # a transition was left out by the preemption bound
    executions: int
    unknown: set[str]
    departures: set[str] = field(default_factory=set)  # rationale entries departed from


@dataclass(frozen=True, slots=True)
class Root:
    """The execution before any step: what its setup broke, or the root node."""

    setup_broken: list[Broken]
    crashed: bool
    fp: int
    node: Node
    end: list[Broken]
    unknown: set[str]
    departures: set[str] = field(default_factory=set)  # rationale entries departed from


class Expander:
    """Expands nodes of one scenario on one design (one per worker)."""

    def __init__(self, scenario: Scenario, design: DesignSpec, ignore: frozenset[str],
                 limits: Limits) -> None:
        self.scenario = scenario
        self.design = design
        self.ignore = ignore
        self.limits = limits
        self.live: dict[Hashable, Execution] = {}
        self.known: set[Hashable] = set()  # states this expander reported (or was given)
        self.tick: Callable[[int], None] | None = None  # progress, called in-process only
        self.departures: set[str] = set()  # the series' rationale entries some step departed from

    @staticmethod
    def hash_probe() -> int:
        """How this process hashes a string (workers whose fingerprints are merged must agree)."""
        return hash("gmemlab fingerprint")

    def fresh(self) -> Execution:
        return Execution(self.scenario, self.design, ignore=self.ignore, departures=self.departures)

    def key(self, fp: int, last: int, pre: int) -> Hashable:
        # Under a preemption bound, what may still happen depends on who ran last and
        # on the preemptions left: they are part of the state.
        return fp if self.limits.preemptions is None else (fp, last, pre)

    def root(self) -> Root:
        ex = self.fresh()
        if ex.setup_broken or ex.crashed:
            return Root(ex.setup_broken, True, 0, Node(0, (), ()), [], set(ex.namer.unknown),
                        set(self.departures))
        fp = ex.fingerprint()
        node = Node(self.key(fp, -1, 0), (), tuple(ex.enabled()), digests=ex.actor_digests())
        self.known.add(node.key)
        if node.enabled:
            self.live[node.key] = ex
        return Root([], False, fp, node, [] if node.enabled else ex.end_state(),
                    set(ex.namer.unknown), set(self.departures))

    def expand(self, nodes: list[Node], stop_at_first: bool) -> Batch:
        """Every allowed transition of ``nodes`` (in schedule order), up to the first that
        breaks a property when ``stop_at_first``: the ones after it are all larger."""
        limit = self.limits.preemptions
        max_steps = self.limits.max_steps
        known = self.known
        known.update(n.key for n in nodes)
        old, self.live = self.live, {}
        out: list[Outcome] = []
        cut = False
        executions = 0
        unknown: set[str] = set()
        for node in nodes:
            for a in node.enabled:
                pre = node.preemptions
                if node.last >= 0 and a != node.last and node.last in node.enabled:
                    pre += 1
                    if limit is not None and pre > limit:
                        cut = True
                        continue
                ex = old.pop(node.key, None)
                if ex is None:
                    ex = self.fresh()
                    executions += 1
                    for b in node.schedule:
                        ex.step(b, judge=False)
                    # The actors that do not move keep their part of the node's fingerprint.
                    ex.set_actor_digests(node.digests)
                broken = ex.step(a)
                fp = ex.fingerprint()
                unknown |= ex.namer.unknown
                key = self.key(fp, a, pre)
                schedule = (*node.schedule, a)
                if key in known:
                    out.append(Outcome(schedule, broken, key, fp, pre, None))
                else:
                    known.add(key)
                    enabled = tuple(ex.enabled())
                    end = [] if enabled else ex.end_state()
                    out.append(Outcome(schedule, broken, key, fp, pre, enabled, end,
                                       ex.actor_digests()))
                    if enabled and len(schedule) < max_steps and len(self.live) < LIVE_MAX:
                        self.live[key] = ex
                if self.tick is not None and len(out) % TICK_EVERY == 0:
                    self.tick(len(out))
                if stop_at_first and (broken or out[-1].end):
                    return Batch(out, cut, executions, unknown, set(self.departures))
        return Batch(out, cut, executions, unknown, set(self.departures))
