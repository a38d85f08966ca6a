"""The bugs reviewers found by reading, found mechanically, each with a shortest schedule.

The checker is told no bug: each design runs its own code and an invariant
breaks.  Where one design has several bugs, ``ignore`` looks past the one
already reported to the next, as a reviewer would after a fix.  Every
counterexample is checked minimal (no schedule one step shorter breaks the
invariant: exhaustively, with a step bound) and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gmemlab.check.explore import Bounds, Counterexample, explore
from gmemlab.check.report import replay
from gmemlab.check.scenarios import get_scenario

MAX_EXECUTIONS = 3000  # a deterministic stand-in for "found in well under 10 s"


@dataclass(frozen=True)
class Bug:
    design: str
    scenario: str
    ignore: tuple[str, ...]
    invariant: str
    length: int
    functions: tuple[str, ...]  # kernel functions on the breaking step's path or in its events


BUGS = {
    # v7 05/12: marker set with '&': never set, so the folio is unlocked zapped but unmarked...
    "v7-and-marker": Bug("v7", "lifecycle", (), "marker-matches-direct-map", 16,
                         ("kvm_gmem_fault_user_mapping", "finish_fault", "folio_unlock")),
    # ... then freed without restore...
    "v7-free-without-restore": Bug("v7", "lifecycle", ("marker-matches-direct-map",),
                                   "free-frame-in-direct-map", 32,
                                   ("kvm_gmem_punch_hole", "truncate_inode_pages_range",
                                    "free_page_to_allocator")),
    # ... and the allocator's next user oopses writing it (Brendan Jackman's v7 report).
    "v7-oops-on-reuse": Bug("v7", "lifecycle",
                            ("marker-matches-direct-map", "free-frame-in-direct-map"),
                            "kernel-oops", 34, ("alloc_page", "clear_page", "clear_page_erms")),
    # v9: zap error ignored on the guest path, ENOMEM injected at the direct-map split.
    "v9-ignored-zap-error": Bug("v9", "enomem-guest",
                                ("zap-before-prepare", "marker-matches-direct-map"),
                                "handout-zapped", 22,
                                ("kvm_gmem_get_pfn", "split_large_page", "kvm_mmu_page_fault")),
    # v12 without the TLB flush: a stale translation survives the zap...
    "noflush-stale-tlb": Bug("noflush", "zap-gadget", (), "handout-flushed", 19,
                             ("kvm_gmem_get_pfn", "kvm_mmu_page_fault")),
    # ... and a gadget on the other CPU reads the guest's page through it.
    "noflush-stale-read": Bug("noflush", "zap-gadget", ("handout-flushed",), "gadget-blocked", 23,
                              ("speculative_read",)),
    # <= v11: prepare before zap, and restore before invalidate (the windows v12 closed).
    "v9-prepare-before-zap": Bug("v9", "fault-punch", (), "zap-before-prepare", 9,
                                 ("kvm_gmem_prepare_folio_tracked", "kvm_arch_gmem_prepare")),
    "v9-restore-before-invalidate": Bug("v9", "fault-punch", ("zap-before-prepare",),
                                        "invalidate-before-restore", 26,
                                        ("kvm_gmem_free_folio", "kvm_gmem_folio_restore_direct_map")),
    "pagecache-restore-before-invalidate": Bug("pagecache", "fault-punch", (),
                                               "invalidate-before-restore", 24,
                                               ("filemap_free_folio",)),
}


def _find(bug: Bug) -> Counterexample:
    r = explore(get_scenario(bug.scenario), bug.design, ignore=frozenset(bug.ignore))
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
    shorter = explore(get_scenario(bug.scenario), bug.design, ignore=frozenset(bug.ignore),
                      bounds=Bounds(max_steps=bug.length - 1), stop_at_first=False)
    assert bug.invariant not in {c.invariant for c in shorter.found}


@pytest.mark.parametrize("name", list(BUGS))
def test_counterexample_replays_with_its_kernel_functions(name: str) -> None:
    bug = BUGS[name]
    cx = _find(bug)
    rep = replay(get_scenario(bug.scenario), bug.design, cx.schedule, ignore=frozenset(bug.ignore))
    assert [b.invariant for b in rep.broken][:1] == [bug.invariant]
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
    for bug in BUGS.values():
        r = explore(get_scenario(bug.scenario), "v12", ignore=frozenset(bug.ignore))
        assert r.passed, (bug, r.verdict())
