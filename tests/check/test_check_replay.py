"""Every run is reproducible: schedules replay, random runs come back from their seed."""

from __future__ import annotations

import json

import pytest

from gmemlab.check.explore import explore, random_search, shrink
from gmemlab.check.report import ScheduleError, render_counterexample, replay, step_label
from gmemlab.check.scenarios import get_scenario
from gmemlab.cli import main


def test_a_found_schedule_replays_to_the_same_violation_every_time() -> None:
    s = get_scenario("zap-gadget")
    cx = explore(s, "noflush").found[0]
    a = replay(s, "noflush", cx.schedule)
    b = replay(s, "noflush", cx.schedule)
    assert [x.invariant for _, x in a.broken] == [x.invariant for _, x in b.broken] == [cx.invariant]
    # Step keys hold object identities, which differ between replays; what they show does not.
    assert [(r.actor, step_label(r.step), [e[1:] for e in r.events]) for r in a.records] == \
           [(r.actor, step_label(r.step), [e[1:] for e in r.events]) for r in b.records]


def test_every_counterexample_of_an_all_run_replays_to_its_own_invariant() -> None:
    """--all reports later invariants with schedules that break earlier ones on the way."""
    s = get_scenario("lifecycle")
    r = explore(s, "v7", stop_at_first=False)
    assert len(r.found) >= 3
    for cx in r.found:
        rep = replay(s, "v7", cx.schedule)
        assert (len(cx.schedule), cx.invariant) in [(n, b.invariant) for n, b in rep.broken]


def test_a_schedule_naming_an_actor_that_cannot_move_is_refused() -> None:
    s = get_scenario("fault-punch")
    with pytest.raises(ScheduleError, match="step 1"):
        replay(s, "v12", (7,))
    done = explore(s, "v12", stop_at_first=False)
    assert done.passed
    # vcpu0 alone finishes in far fewer than 200 steps: the 200th step has nobody to run.
    with pytest.raises(ScheduleError):
        replay(s, "v12", (0,) * 200)


def test_the_counterexample_shows_lanes_the_break_and_the_command() -> None:
    s = get_scenario("lifecycle")
    cx = explore(s, "v7").found[0]
    text = render_counterexample(s, "v7", "v7", cx)
    assert "property 'marker-matches-direct-map' broken after 16 steps" in text
    assert "vmm (cpu0)" in text and "kalloc (cpu1)" in text
    assert ">> user fault page 0" in text
    assert "kernel functions at the break: vmm > _user_fault" in text
    assert f"--replay {cx.replay}" in text


def test_random_runs_are_reproducible_from_the_seed() -> None:
    s = get_scenario("zap-gadget")
    a = random_search(s, "noflush", seed=7, runs=20)
    b = random_search(s, "noflush", seed=7, runs=20)
    assert a.found and a.found == b.found and a.runs == b.runs
    cx = a.found[0]
    assert cx.invariant == "handout-flushed"
    assert [x.invariant for _, x in replay(s, "noflush", cx.schedule).broken] == ["handout-flushed"]


def test_random_runs_pass_v12_and_count_what_they_saw() -> None:
    r = random_search(get_scenario("ufault-release"), "v12", seed=1, runs=30)
    assert r.passed and r.runs == 30 and r.stats.states > 30
    assert r.verdict() == "pass (30 random runs)"


def test_shrinking_a_random_schedule_keeps_the_violation() -> None:
    s = get_scenario("fault-punch")
    # A long detour: both actors alternate, then vcpu0 finishes; noflush breaks near the end.
    cx = explore(s, "noflush").found[0]
    noisy = (1, 1, 1, *cx.schedule)
    short = shrink(s, "noflush", noisy, cx.invariant, frozenset())
    assert len(short) <= len(cx.schedule)
    assert [x.invariant for _, x in replay(s, "noflush", short).broken] == [cx.invariant]


# --- the command -------------------------------------------------------------------------------
def test_command_passes_v12_and_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--design", "v12", "--scenario", "fault-punch,two-vms", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gmemlab check: 1 design(s) x 2 scenario(s) x 1 profile(s) = 2 cells")
    assert "bounds: preemptions unbounded" in out and "states/s" in out
    assert out.count("pass (exhaustive)") == 2
    assert out.rstrip().splitlines()[-1] == ("summary: 2 cells run (2 pass, 0 fail), 0 skipped; "
                                             "every verdict as catalogued (exit 0)")


def test_command_fails_as_catalogued_with_a_timeline_and_replays_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    """v7 breaks lifecycle by design: the catalogue says so, so the run exits 0."""
    assert main(["check", "--design", "v7", "--scenario", "lifecycle", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "as catalogued" in out and "every verdict as catalogued (exit 0)" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("replay: gmemlab check"))
    argv = line.split("replay: gmemlab ")[1].split()
    assert main(argv) == 1
    again = capsys.readouterr().out
    assert "BROKEN marker-matches-direct-map" in again


def test_command_exits_1_and_names_a_catalogued_bug_that_no_longer_shows(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from gmemlab.model.designs import DESIGNS
    from gmemlab.model.designs.v12 import V12

    monkeypatch.setitem(DESIGNS, "v7", V12)  # "v7" fixed: its catalogued bugs are gone
    assert main(["check", "--design", "v7", "--scenario", "lifecycle", "--quiet"]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert "1 not as catalogued: v7 x lifecycle (GONE " in last and last.endswith("(exit 1)")


def test_command_exits_1_and_names_a_new_violation(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gmemlab.model.designs import DESIGNS
    from tests.check.test_check_coverage import ZapEveryGuestMemfd

    monkeypatch.setitem(DESIGNS, "v12", ZapEveryGuestMemfd)
    assert main(["check", "--design", "v12", "--scenario", "plain-beside,fault-punch,two-vms",
                 "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "not as catalogued:" in out and "NEW no-warn" in out
    assert "replay: gmemlab check --design v12 --scenario plain-beside --replay" in out
    assert out.rstrip().splitlines()[-1].endswith("v12 x plain-beside (NEW no-warn) (exit 1)")


def test_command_skips_a_profile_without_the_flag_and_says_why(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--design", "v12", "--scenario", "fault-punch", "--profile",
                 "arm64-rodata-off,riscv64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "can_set_direct_map() is false" in out and "builds no guest_memfd" in out
    assert "0 cells run (0 pass, 0 fail), 2 skipped" in out


def test_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--design", "v7", "--scenario", "fault-punch", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["as_catalogued"]
    (res,) = data["results"]
    assert res["verdict"].startswith("FAIL marker-matches-direct-map")
    assert res["catalogue"]["status"] == "ok" and "marker-matches-direct-map" in res["catalogue"]["expected"]
    assert res["counterexamples"][0]["length"] == 18
    assert res["executions"] > 0 and res["states_per_second"] > 0
    sched = ",".join(map(str, res["counterexamples"][0]["schedule"]))
    assert main(["check", "--design", "v7", "--scenario", "fault-punch", "--replay", sched,
                 "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["broken"][0]["invariant"] == "marker-matches-direct-map"
    assert rep["steps"][0]["actor"] == "vcpu0"


def test_explain_draws_one_timeline_per_distinct_violation() -> None:
    from gmemlab.check.report import explain

    results = [explore(get_scenario(n), "noflush") for n in ("fault-punch", "two-vms", "teardown")]
    assert {r.found[0].invariant for r in results} == {"handout-flushed"}
    text = explain(results, frozenset())
    assert text.startswith("1 distinct violation(s)")
    assert text.count("property 'handout-flushed' broken") == 1
    assert "the same violation in 2 more cell(s):" in text


def test_command_random_mode_prints_its_seed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--design", "v12", "--scenario", "teardown", "--random", "--seed", "5",
                 "--runs", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "random PCT, seed 5, 10 runs" in out and "pass (10 random runs)" in out


@pytest.mark.parametrize("argv", [
    ["check", "--design", "nope"],
    ["check", "--scenario", "nope"],
    ["check", "--ignore", "nope"],
    ["check", "--replay", "0,1"],
    ["check", "--profile", "nope"],
    ["check", "--design", "v12", "--scenario", "fault-punch", "--replay", "x"],
])
def test_command_rejects_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_command_lists_what_it_can_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--list"]) == 0
    out = capsys.readouterr().out
    assert "fault-punch" in out and "handout-flushed" in out and "v12" in out
    assert "arm64-rodata-off" in out and "free-frame-unmarked" in out and "§8 bug 5" in out


def test_profile_all_is_every_real_host_and_leaves_the_what_if_out(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--design", "v12", "--scenario", "enomem-guest", "--profile", "all",
                 "--json", "--quiet"]) == 0
    profiles = {r["profile"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert "x86_64" in profiles and "x86_64-what-if-snp-tdx" not in profiles
