"""The search sharded over workers (forked processes, Ray actors) finds what one process finds.

Merging each level's transitions in schedule order makes the verdicts and the
counterexamples (shortest, then lexicographically smallest schedule) independent
of the sharding; only the number of replays changes.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from gmemlab.check.expand import Node
from gmemlab.check.explore import Bounds, Result, explore
from gmemlab.check.scenarios import get_scenario
from gmemlab.check.shard import RAY_LOCAL, ray_available, share


def _same(a: Result, b: Result) -> None:
    assert a.found == b.found
    assert a.rationale == b.rationale
    assert (a.verdict(), a.complete, a.bound_hits) == (b.verdict(), b.complete, b.bound_hits)


@pytest.mark.parametrize(("design", "scenario", "kwargs"), [
    ("noflush", "fault-punch", {}),  # stops at the first violation, mid-level
    ("v7", "lifecycle", {"stop_at_first": False}),  # every property, each its shortest schedule
    ("v12", "two-vms", {"collect_finals": True}),  # exhaustive pass: the same end states
    ("noflush", "zap-gadget", {"bounds": Bounds(preemptions=1)}),  # keys carry the bound
])
def test_workers_find_what_one_process_finds(design: str, scenario: str,
                                             kwargs: dict[str, object]) -> None:
    s = get_scenario(scenario)
    one = explore(s, design, **kwargs)  # type: ignore[arg-type]
    for workers in (2, 3):
        many = explore(s, design, workers=workers, **kwargs)  # type: ignore[arg-type]
        _same(one, many)
        assert many.finals == one.finals
        if one.passed:
            assert (many.stats.states, many.stats.transitions, many.stats.depth) == \
                   (one.stats.states, one.stats.transitions, one.stats.depth)


@pytest.mark.parametrize("workers", [1, 2])
def test_rationale_departures_reach_the_result_however_sharded(workers: int) -> None:
    """v9's orders are the series' rationale, not safety: reported, from every worker."""
    r = explore(get_scenario("fault-punch"), "v9", workers=workers)
    assert r.passed and r.rationale == {"invalidate-before-restore", "zap-before-prepare"}


def test_a_design_made_by_a_closure_is_explored_by_forked_workers() -> None:
    """Forked workers inherit the design as it is: no pickling, closures work."""
    from gmemlab.model.designs import get_design

    def make() -> object:
        return get_design("noflush")

    s = get_scenario("fault-punch")
    _same(explore(s, "noflush"), explore(s, make, design_name="noflush", workers=2))  # type: ignore[arg-type]


def test_a_level_isshared_evenly_and_each_worker_keeps_the_states_it_found() -> None:
    nodes = [Node(k, (k,), (0, 1)) for k in range(7)]
    owner: dict[Hashable, int] = {k: 0 for k in range(6)}
    owner[6] = 1
    out = share(nodes, owner, 2)
    assert [len(b) for b in out] == [4, 3]
    assert [n.key for n in out[0]] == [0, 1, 2, 3]
    assert [n.key for n in out[1]] == [4, 5, 6]  # sorted by schedule, its own node among them
    assert share(nodes, owner, 1) == [nodes]


def test_a_worker_that_raises_reports_it_to_the_explorer() -> None:
    s = get_scenario("fault-punch")

    def broken() -> object:
        raise RuntimeError("no such design here")

    with pytest.raises(RuntimeError, match="no such design here"):
        explore(s, broken, design_name="broken", workers=2)  # type: ignore[arg-type]


@pytest.mark.skipif(ray_available() is not None, reason=str(ray_available()))
def test_ray_actors_find_what_one_process_finds() -> None:
    """On a local Ray instance started here (two actors): the same counterexample and verdict."""
    import importlib

    ray = importlib.import_module("ray")
    s = get_scenario("fault-punch")
    try:
        _same(explore(s, "noflush"), explore(s, "noflush", workers=2, ray_address=RAY_LOCAL))
        one = explore(s, "v12", stop_at_first=False, collect_finals=True)
        many = explore(s, "v12", stop_at_first=False, collect_finals=True, workers=2,
                       ray_address=RAY_LOCAL)
        _same(one, many)
        # The actors hash with their own seed: the same end states, under other fingerprints.
        assert len(one.finals) == len(many.finals)
        assert (one.stats.states, one.stats.transitions) == (many.stats.states,
                                                             many.stats.transitions)
    finally:
        ray.shutdown()


def test_the_command_shards_with_workers_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from gmemlab.cli import main

    assert main(["check", "--design", "noflush", "--scenario", "fault-punch", "--workers", "2",
                 "--quiet"]) == 0  # noflush's handout-flushed is catalogued
    out = capsys.readouterr().out
    assert "2 worker processes" in out and "handout-flushed" in out


def test_the_command_refuses_ray_where_it_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import gmemlab.check.shard
    import gmemlab.check.suite
    from gmemlab.cli import main

    monkeypatch.setattr(gmemlab.check.shard, "ray_available", lambda: "Ray is not installed")
    monkeypatch.setattr(gmemlab.check.suite, "check_one", None)  # no work may start
    with pytest.raises(SystemExit) as e:
        main(["check", "--ray", "local"])
    assert e.value.code == 2
    assert "--ray: Ray is not installed" in capsys.readouterr().err
