"""The bugs reviewers found by reading, found mechanically, each with a shortest schedule.

The catalogue is ``gmemlab.check.known``.  Every counterexample is checked
minimal (no schedule one step shorter breaks the invariant: exhaustively,
with a step bound), replayed, and shown to pass through the kernel functions
of the bug it is said to be.
"""

from __future__ import annotations

import pytest

from gmemlab.check.explore import Bounds, Counterexample, explore
from gmemlab.check.known import KNOWN_BUGS, KnownBug
from gmemlab.check.report import replay
from gmemlab.check.scenarios import get_scenario
from gmemlab.check.suite import flag_refused
from gmemlab.uapi import KVM_X86_DEFAULT_VM

MAX_EXECUTIONS = 3000  # a deterministic stand-in for "found in well under 10 s"
BUGS = {b.name: b for b in KNOWN_BUGS}


def _find(bug: KnownBug) -> Counterexample:
    r = explore(get_scenario(bug.scenario).on(bug.profile), bug.design, ignore=frozenset(bug.ignore))
    assert r.found, f"{bug}: nothing found ({r.verdict()})"
    cx = r.found[0]
    assert cx.invariant == bug.invariant, (cx.invariant, cx.message)
    assert r.stats.executions <= MAX_EXECUTIONS, r.stats
    return cx


@pytest.mark.parametrize("name", list(BUGS))
def test_bug_is_found_with_a_shortest_schedule(name: str) -> None:
    bug = BUGS[name]
    cx = _find(bug)
    assert len(cx.schedule) == bug.length
    # Minimal: every schedule one step shorter was explored and none breaks it.
    shorter = explore(get_scenario(bug.scenario).on(bug.profile), bug.design, ignore=frozenset(bug.ignore),
                      bounds=Bounds(max_steps=bug.length - 1), stop_at_first=False)
    assert bug.invariant not in {c.invariant for c in shorter.found}


@pytest.mark.parametrize("name", list(BUGS))
def test_counterexample_replays_with_its_kernel_functions(name: str) -> None:
    bug = BUGS[name]
    cx = _find(bug)
    rep = replay(get_scenario(bug.scenario).on(bug.profile), bug.design, cx.schedule,
                 ignore=frozenset(bug.ignore))
    assert [b.invariant for _, b in rep.broken][:1] == [bug.invariant]
    assert len(rep.records) == len(cx.schedule)
    seen = ({fn for r in rep.records for fn in r.stack + r.after}
            | {e.fn for r in rep.records for e in r.events})
    missing = set(bug.functions) - seen
    assert not missing, missing


def test_the_v7_oops_is_the_reported_crash() -> None:
    """clear_page_erms called from get_page_from_freelist, a not-present write: the v7 report."""
    bug = BUGS["v7-oops-on-reuse"]
    cx = _find(bug)
    assert cx.oops
    assert "not-present page, kernel write" in cx.message and "clear_page_erms" in cx.message
    rep = replay(get_scenario(bug.scenario), bug.design, cx.schedule, ignore=frozenset(bug.ignore))
    last = rep.records[-1]
    assert rep.execution.actors[last.actor].name == "kalloc"
    assert last.stack[-2:] == ("clear_page", "kernel_access")
    assert any(e.fn == "get_page_from_freelist" and e.event == "alloc_page" for r in rep.records
               for e in r.events)


def test_the_v9_guest_path_hands_out_the_frame_after_a_failed_split() -> None:
    bug = BUGS["v9-ignored-zap-error"]
    cx = _find(bug)
    rep = replay(get_scenario(bug.scenario), bug.design, cx.schedule, ignore=frozenset(bug.ignore))
    events = [(e.fn, e.event) for r in rep.records for e in r.events]
    assert ("split_large_page", "pt_alloc_fail") in events
    # kvm_gmem_get_pfn() succeeded although its zap failed, and the stage-2 mapping followed.
    assert events.index(("split_large_page", "pt_alloc_fail")) < events.index(("kvm_gmem_get_pfn",
                                                                                "get_pfn"))
    assert events[-2:] == [("kvm_mmu_page_fault", "spte_map"), ("invariant", "violation")]
    assert "stage-2 mapping" in cx.message


def test_v12_closes_every_one_of_these_windows() -> None:
    """On the default VM type by its code; on SNP and TDX by not offering them the flag."""
    for bug in BUGS.values():
        s = get_scenario(bug.scenario)
        if s.vm_type != KVM_X86_DEFAULT_VM:
            assert flag_refused("v12", "x86_64", s.vm_type), bug
            continue
        r = explore(s, "v12", ignore=frozenset(bug.ignore))
        assert r.passed, (bug, r.verdict())
