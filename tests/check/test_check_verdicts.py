"""Clean verdicts: v12 passes every standard scenario exhaustively within the stated bounds."""

from __future__ import annotations

import pytest

from gmemlab.check.explore import Bounds, Counterexample, Result, explore
from gmemlab.check.known import EXPECTED, KNOWN_BUGS, expected, judge
from gmemlab.check.scenarios import STANDARD, get_scenario
from gmemlab.check.suite import check_one, series_designs


def test_v12_passes_every_standard_scenario_exhaustively(v12_suite: list[Result]) -> None:
    assert [r.scenario for r in v12_suite] == [s.name for s in STANDARD]
    for r in v12_suite:
        assert r.passed, (r.scenario, r.verdict(), [c.message for c in r.found])
        assert r.complete and r.bound_hits == 0, (r.scenario, r.verdict())
        assert r.verdict() == "pass (exhaustive)"
        assert r.stats.states > 1 and r.stats.transitions >= r.stats.states - 1


def test_every_local_of_every_actor_is_digested(v12_suite: list[Result]) -> None:
    """State hashing is sound only if no actor local falls back to an id()."""
    for r in v12_suite:
        assert not r.unknown, (r.scenario, r.unknown)


def test_the_suite_explores_concurrency_not_just_one_order(v12_suite: list[Result]) -> None:
    by_name = {r.scenario: r for r in v12_suite}
    # Every standard scenario has at least two actors that really interleave.
    for s in STANDARD:
        assert len(s.actors) >= 2
        assert by_name[s.name].stats.depth >= sum(len(a.ops) for a in s.actors)
    assert max(r.stats.states for r in v12_suite) > 1000


def test_the_default_designs_are_those_of_the_series() -> None:
    names = series_designs()
    assert {"v12", "v9", "v7", "noflush", "filemap", "unmapped"} <= set(names)
    assert "base" not in names


def test_a_preemption_bound_explores_a_subset_and_says_so() -> None:
    s = get_scenario("fault-punch")
    bounded = explore(s, "v12", bounds=Bounds(preemptions=0))
    assert bounded.passed and not bounded.complete  # schedules over the bound were skipped
    # A bug that needs no preemption is still found under the tightest bound.
    noflush = explore(s, "noflush", bounds=Bounds(preemptions=0))
    assert noflush.found[0].invariant == "handout-flushed"


def test_a_step_bound_cuts_schedules_and_the_verdict_says_bounded() -> None:
    r = explore(get_scenario("fault-punch"), "v12", bounds=Bounds(max_steps=20))
    assert r.passed and r.bound_hits > 0
    assert r.verdict().startswith("pass (bounded")


# --- the catalogue ------------------------------------------------------------------------------------
def _result(design: str, scenario: str, found: list[str], *, mode: str = "exhaustive",
            bounds: Bounds | None = None, skipped: str | None = None) -> Result:
    r = Result(scenario, design, mode, bounds or Bounds(), skipped=skipped)
    r.found = [Counterexample(p, "msg", -1, (0,)) for p in found]
    return r


def test_every_known_bug_is_catalogued_where_the_checker_finds_it() -> None:
    for bug in KNOWN_BUGS:
        e = expected(bug.design, bug.scenario, bug.profile)
        assert e is not None and bug.invariant in e.breaks, bug.name
    # Each entry names a design and a scenario that exist, and says why.
    for e in EXPECTED:
        assert e.design in series_designs() and get_scenario(e.scenario) and e.why and e.breaks


def test_a_verdict_is_judged_against_the_catalogue() -> None:
    e = expected("v7", "fault-punch", "x86_64")
    assert e is not None
    first = sorted(e.breaks)[0]
    assert judge(_result("v7", "fault-punch", [first])).status == "ok"
    assert judge(_result("v12", "fault-punch", [])).status == "ok"
    # Something the catalogue does not list is new, even beside catalogued ones.
    j = judge(_result("v7", "fault-punch", [first, "no-warn"]), all_violations=True)
    assert j.status == "new" and j.new == ("no-warn",)
    assert judge(_result("v12", "fault-punch", ["no-warn"])).status == "new"
    # A catalogued bug that no longer shows is gone: stopping at the first, the cell passes...
    j = judge(_result("v7", "fault-punch", []))
    assert j.status == "gone" and set(j.gone) == e.breaks
    # ... with --all, any catalogued property missing.
    if len(e.breaks) > 1:
        assert judge(_result("v7", "fault-punch", [first]), all_violations=True).status == "gone"
    # Ignored properties are not expected; a bounded or random search that misses one says so.
    assert judge(_result("v7", "fault-punch", []), frozenset(e.breaks)).status == "ok"
    j = judge(_result("v7", "fault-punch", [], bounds=Bounds(preemptions=0)))
    assert j.status == "ok" and "not reached by this bounded search" in j.note
    j = judge(_result("v7", "fault-punch", [], mode="random"))
    assert j.status == "ok" and "random" in j.note
    assert judge(_result("v12", "fault-punch", [], skipped="why")).status == "skip"


@pytest.mark.parametrize("design", ["v9", "v7", "noflush", "fc-6.18", "filemap", "batch"])
def test_the_historical_designs_break_what_the_catalogue_says(design: str) -> None:
    """The whole catalogue was drawn from ``gmemlab check --all --profile all``; here a sample."""
    for name in ("fault-punch", "plain-beside"):
        j = judge(check_one(design, get_scenario(name)))
        assert j.status == "ok", (design, name, j.describe())
