"""Clean verdicts: v12 passes every standard scenario exhaustively within the stated bounds."""

from __future__ import annotations

from gmemlab.check.explore import Bounds, Result, explore
from gmemlab.check.scenarios import STANDARD, get_scenario
from gmemlab.check.suite import series_designs


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
    assert {"v12", "v9", "v7", "noflush", "pagecache"} <= set(names)
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
