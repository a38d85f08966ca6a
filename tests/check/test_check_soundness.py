"""The reduction is sound: hashing states loses no behaviour.

* On small scenarios the unreduced search (every interleaving, nothing
  merged) and the reduced one reach the same broken invariants, with the
  same shortest schedules, and the same set of end states.
* On standard scenarios, states that two different schedules reach with one
  fingerprint behave alike: the same random continuation from each takes the
  same steps, emits the same events, breaks the same properties and ends in
  the same state.
* Fingerprints do not depend on history: replaying one schedule twice gives
  equal fingerprints at every step, and no actor local escapes the digest.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from gmemlab.check.execution import Execution
from gmemlab.check.explore import enumerate_all, explore
from gmemlab.check.report import step_label
from gmemlab.check.scenarios import STANDARD, Scenario, get_scenario, guest_prefault, vmm
from gmemlab.check.suite import series_designs
from gmemlab.check.world import (
    Actor,
    World,
    close,
    gadget,
    guest_fault,
    kernel_alloc,
    munmap,
    punch_hole,
    tlb_evict,
)
from gmemlab.model.machine import Machine


def _prefaulted(m: Machine) -> World:
    w = vmm(m, mmap=False)
    guest_prefault(w)
    return w


def _prefaulted_mapped(m: Machine) -> World:
    w = vmm(m)
    guest_prefault(w)
    return w


def _unmapped(m: Machine) -> World:
    return vmm(m, mmap=False)


SMALL = {
    "fault-kalloc": Scenario("fault-kalloc", "who gets the first free frame", _unmapped,
                             (Actor("vcpu0", 0, (guest_fault(),)), Actor("kalloc", 1, (kernel_alloc(),)))),
    "fault-gadget": Scenario("fault-gadget", "a read before, during or after the zap", _unmapped,
                             (Actor("vcpu0", 0, (guest_fault(),)), Actor("gadget1", 1, (gadget(),)))),
    "punch-kalloc": Scenario("punch-kalloc", "reuse of the freed frame", _prefaulted,
                             (Actor("punch", 0, (punch_hole(),)), Actor("kalloc", 1, (kernel_alloc(),)))),
    "unmap-close": Scenario("unmap-close", "which drops the last file reference", _prefaulted_mapped,
                            (Actor("munmap", 0, (munmap(),)), Actor("close", 1, (close("gmem"),)))),
    "tlb-race": Scenario("tlb-race", "TLB fills and evictions on both CPUs", _prefaulted,
                         (Actor("g0", 0, (gadget(), tlb_evict())), Actor("g1", 1, (gadget(),)),
                          Actor("k", 1, (kernel_alloc(),)))),
}
CASES = [
    ("fault-kalloc", "v12", ()),
    ("fault-kalloc", "noflush", ()),
    ("fault-gadget", "v12", ()),
    ("fault-gadget", "noflush", ("handout-flushed",)),
    ("punch-kalloc", "v12", ()),
    ("punch-kalloc", "v7", ("marker-matches-direct-map",)),
    ("punch-kalloc", "filemap", ()),
    ("unmap-close", "v12", ()),
    ("unmap-close", "v7", ("marker-matches-direct-map",)),
    ("tlb-race", "noflush", ("handout-flushed",)),
]


@pytest.mark.parametrize(("name", "design", "ignore"), CASES)
def test_reduced_search_matches_every_interleaving(name: str, design: str,
                                                   ignore: tuple[str, ...]) -> None:
    s = SMALL[name] if name in SMALL else get_scenario(name)
    full = enumerate_all(s, design, ignore=frozenset(ignore))
    reduced = explore(s, design, ignore=frozenset(ignore), stop_at_first=False, collect_finals=True)
    assert reduced.complete
    assert {c.invariant: len(c.schedule) for c in reduced.found} == \
           {c.invariant: len(c.schedule) for c in full.found}
    assert reduced.finals == full.finals
    assert len(full.finals) >= 1
    assert reduced.stats.executions < full.stats.executions


def test_the_small_scenarios_have_races_with_different_outcomes() -> None:
    """Equal end-state sets would be a weak test if every order ended alike."""
    outcomes = {n: len(enumerate_all(SMALL[n], "v12").finals) for n in ("fault-kalloc", "fault-gadget",
                                                                       "punch-kalloc")}
    assert all(n >= 2 for n in outcomes.values()), outcomes


def test_enomem_race_against_every_interleaving() -> None:
    s = get_scenario("enomem-guest")
    full = enumerate_all(s, "v12")
    reduced = explore(s, "v12", stop_at_first=False, collect_finals=True)
    assert reduced.passed and full.passed
    assert reduced.finals == full.finals and len(full.finals) >= 2  # the split failed, or not


# --- merged states behave alike --------------------------------------------------------------------
def _merged_pairs(s: Scenario, design: str, max_states: int, want: int
                  ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The ``want`` deepest pairs of different schedules that reach one fingerprint."""

    def run(schedule: tuple[int, ...]) -> Execution:
        ex = Execution(s, design)
        for a in schedule:
            ex.step(a)
        return ex

    first = {run(()).fingerprint(): ()}
    frontier: deque[tuple[int, ...]] = deque([()])
    pairs = []
    while frontier and len(first) < max_states:
        sched = frontier.popleft()
        for a in run(sched).enabled():
            child = (*sched, a)
            fp = run(child).fingerprint()
            if fp not in first:
                first[fp] = child
                frontier.append(child)
            elif first[fp] != child:
                pairs.append((first[fp], child))
    return sorted(pairs, key=lambda p: -len(p[1]))[:want]


def _continue(s: Scenario, design: str, prefix: tuple[int, ...], seed: int
              ) -> tuple[list[object], int]:
    """Replay ``prefix`` then a random continuation; what the continuation did, and the end."""
    ex = Execution(s, design, trace="full", capture=True)
    for a in prefix:
        ex.step(a)
    del ex.records[:]
    rng = random.Random(seed)
    seen: list[object] = []
    while enabled := ex.enabled():
        a = rng.choice(enabled)
        broken = ex.step(a)
        r = ex.records[-1]
        seen.append((a, step_label(r.step), [e[1:] for e in r.events], [b.invariant for b in broken]))
    seen.append([b.invariant for b in ex.end_state()])
    return seen, ex.fingerprint()


@pytest.mark.parametrize(("scenario", "design"), [("ufault-release", "v12"), ("free-reuse", "v12"),
                                                  ("zap-gadget", "noflush"), ("teardown", "v12"),
                                                  ("enomem-split", "v12")])
def test_states_merged_by_fingerprint_behave_alike(scenario: str, design: str) -> None:
    s = get_scenario(scenario)
    pairs = _merged_pairs(s, design, max_states=300, want=10)
    assert pairs, "no merges: the scenario has no commuting steps?"
    for i, (a, b) in enumerate(pairs):
        for seed in range(3):
            assert _continue(s, design, a, seed * 100 + i) == _continue(s, design, b, seed * 100 + i), \
                (a, b, seed)


# --- fingerprints are functions of the state --------------------------------------------------------
@pytest.mark.parametrize(("scenario", "design"),
                         [(s.name, "v12") for s in STANDARD]
                         + [(s, d) for d in series_designs() if d != "v12"
                            for s in ("fault-punch", "enomem-split", "fallocate-fault")])
def test_fingerprints_do_not_depend_on_how_often_they_were_taken(scenario: str, design: str) -> None:
    s = get_scenario(scenario)
    for seed in range(3):
        rng = random.Random(seed)
        a, b = Execution(s, design), Execution(s, design)
        n = 0
        while enabled := a.enabled():
            step = rng.choice(enabled)
            a.step(step)
            b.step(step)
            if n % 3 == seed:
                a.fingerprint()  # digesting has no side effect on later digests
            assert a.fingerprint() == b.fingerprint(), (scenario, design, seed, n)
            n += 1
        assert not a.namer.unknown, a.namer.unknown


def test_state_a_design_or_the_machine_adds_is_part_of_the_fingerprint() -> None:
    """Designs keep pools and queues of their own; model changes add machine attributes."""
    ex = Execution(get_scenario("fault-punch"), "v12")
    before = ex.fingerprint()
    ex.m.design.queue = [0x101]  # type: ignore[attr-defined]
    assert ex.fingerprint() != before
    after_design = ex.fingerprint()
    ex.m.new_table = {1: 2}  # type: ignore[attr-defined]
    assert ex.fingerprint() != after_design
    settled = ex.fingerprint()
    ex.m.trace.emit("test", "noise")  # history is not state
    assert ex.fingerprint() == settled
