"""Violations the checker was not told about: mutations of the model, judged by the invariants.

Each test breaks the model in a way no test or scenario names (pytest's
``monkeypatch`` undoes it), and the checker must report the invariant that
the mutation breaks, with a schedule that replays to it, exactly as it
reports the designs' real bugs.  Some need an interleaving: run with one
actor at a time they pass.
"""

from __future__ import annotations

import pytest

from gmemlab.check.explore import Bounds, explore
from gmemlab.check.report import replay
from gmemlab.check.scenarios import Scenario, get_scenario
from gmemlab.model.designs.base import kvm_gmem_get_pfn_done, kvm_gmem_get_pfn_folio, zero_if_not_uptodate
from gmemlab.model.designs.v12 import V12
from gmemlab.model.kvm.guest_memfd import kvm_arch_gmem_prepare
from gmemlab.model.kvm.kvm_main import Kvm, Memslot
from gmemlab.model.machine import Machine
from gmemlab.model.mm import tlb
from gmemlab.model.mm.folio import folio_unlock
from gmemlab.model.task import KGen


def _found(scenario: Scenario, design: str = "v12") -> tuple[str, tuple[int, ...]]:
    r = explore(scenario, design)
    assert r.found, r.verdict()
    cx = r.found[0]
    rep = replay(scenario, design, cx.schedule)
    assert [b.invariant for _, b in rep.broken][:1] == [cx.invariant]
    return cx.invariant, cx.schedule


def _sequential(scenario: Scenario) -> bool:
    """Does every order that runs the actors one after the other pass?"""
    return explore(scenario, "v12", bounds=Bounds(preemptions=0)).passed


def test_unlocking_the_folio_before_the_zap(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_gmem_get_pfn() with its folio_unlock() moved up, before the zap."""

    def get_pfn(self: V12, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[tuple[int, int]]:
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        yield from zero_if_not_uptodate(m, folio, "kvm_gmem_get_pfn")
        yield from folio_unlock(m, folio)
        r = yield from self.kvm_gmem_folio_zap_direct_map(m, folio)
        if not r:
            r = yield from kvm_arch_gmem_prepare(m, kvm, gfn, folio)
        from gmemlab.model.fs import fput  # the tail of kvm_gmem_get_pfn_done without the unlock

        if file is not None:
            yield from fput(m, file)
        return (r, -1) if r else (0, folio)

    monkeypatch.setattr(V12, "kvm_gmem_get_pfn", get_pfn)
    invariant, _ = _found(get_scenario("fault-punch"))
    assert invariant == "zap-under-folio-lock"


def test_guest_faults_that_ignore_the_invalidation_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """mmu_invalidate_retry_gfn() that never asks a racing fault to retry."""
    monkeypatch.setattr(Kvm, "mmu_invalidate_retry_gfn", lambda self, seq, gfn: False)
    scenario = get_scenario("fault-punch")
    invariant, schedule = _found(scenario)
    assert invariant == "no-mapping-of-free-frame"
    assert len(set(schedule)) == 2  # both actors take part: it is a race
    assert _sequential(scenario)


def test_a_kernel_tlb_flush_that_skips_the_other_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """flush_tlb_kernel_range() that invalidates only the calling CPU (no IPIs)."""
    def local_only(m: Machine, lo: int, hi: int, full: bool, fn: str) -> KGen[int]:
        yield ("tlb", m.current.cpu)
        return m.tlb.invalidate_all(m.current.cpu) if full else m.tlb.invalidate(m.current.cpu, lo, hi)

    monkeypatch.setattr(tlb, "_flush_each_cpu", local_only)
    scenario = get_scenario("zap-gadget")
    invariant, schedule = _found(scenario)
    assert invariant == "zapped-frame-flushed"
    # Judged at the handout instead, the same stale entry breaks the model's invariant.
    r = explore(scenario, "v12", ignore=frozenset({"zapped-frame-flushed"}))
    assert r.found[0].invariant == "handout-flushed"
    # Only a gadget on the other CPU, filling its TLB before the zap, shows it.
    gadget = [a.name for a in scenario.actors].index("gadget1")
    assert gadget in schedule


def test_a_free_path_that_forgets_the_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """->free_folio that invalidates but never restores the direct map."""

    def free_folio(self: V12, m: Machine, pfn: int) -> KGen[None]:
        from gmemlab.model.kvm.guest_memfd import kvm_arch_gmem_invalidate

        yield from kvm_arch_gmem_invalidate(m, pfn)

    monkeypatch.setattr(V12, "kvm_gmem_free_folio", free_folio)
    r = explore(get_scenario("free-reuse"), "v12", stop_at_first=False)
    assert [c.invariant for c in r.found][:2] == ["free-frame-in-direct-map", "free-frame-unmarked"]
    # Looking past it, the frame's next kernel user crashes: the v7 oops, from another bug.
    r = explore(get_scenario("free-reuse"), "v12",
                ignore=frozenset({"free-frame-in-direct-map", "free-frame-unmarked"}))
    assert r.found[0].invariant == "kernel-oops"
