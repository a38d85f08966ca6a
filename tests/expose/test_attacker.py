"""The attacker reaches secrets exactly where the model says a translation exists, at every step.

After every kernel step of every workload, on designs that leave each kind of
translation (present entries, stale TLB entries, temporary mappings), the
incremental tracker must agree with

* a recomputation from scratch (``ExposureTracker.audit``);
* the direct map and the TLBs, CPU by CPU: a frame is reachable from a CPU iff
  its direct-map entry is present, that CPU's TLB covers it, or that CPU's
  temporary mapping holds it;
* the model's own gadget, ``speculative_read``, run on every CPU against every
  frame that holds secrets, with the TLBs and counters put back afterwards so
  the probe changes nothing.
"""

from __future__ import annotations

from collections import Counter

import pytest

from gmemlab.cost.model import CostModel
from gmemlab.cost.strategies import make_design
from gmemlab.expose.scenario import Scenario, ScenarioConfig
from gmemlab.expose.tracker import ExposureTracker
from gmemlab.expose.workloads import WORKLOADS
from gmemlab.model.machine import Machine
from gmemlab.model.mm.tlb import speculative_read
from gmemlab.model.task import Step, run_sync

PAGES = 16
DESIGNS = ("base", "v12", "noflush", "batch:4", "zap2m", "filemap", "unmapped")


def probe(m: Machine, cpu: int, pfn: int) -> bool:
    """``speculative_read`` from ``cpu``, leaving no trace in the machine."""
    tlb = [t.copy() for t in m.tlb.entries]
    counts = Counter(m.trace.counts)
    seq, nviol = m.trace.seq, len(m.inv.violations)
    try:
        return run_sync(speculative_read(m, cpu, pfn))
    finally:
        m.tlb.entries[:] = tlb
        m.trace.counts.clear()
        m.trace.counts.update(counts)
        m.trace.seq = seq
        del m.inv.violations[nviol:]


def cross_check(m: Machine, tracker: ExposureTracker) -> int:
    assert tracker.audit() == []
    temp = tracker.temp
    exposed = 0
    for pfn in tracker.secret_frames():
        present = m.dmap.present(pfn)
        expected = set()
        for cpu in range(m.tlb.ncpus):
            cached = m.tlb.covers(cpu, pfn)
            mapped = temp is not None and cpu in temp.temporary_mapping_cpus(pfn)
            if present or cached or mapped:
                expected.add(cpu)
            assert probe(m, cpu, pfn) == (present or cached), (pfn, cpu)
        assert set(tracker.reachable_cpus(pfn)) == expected
        if expected:
            exposed += m.mem.secret_bytes(pfn)
    assert tracker.exposed == exposed
    return exposed


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("design", DESIGNS)
def test_reach_matches_translations_at_every_step(design: str, workload: str, cost: CostModel) -> None:
    sc = Scenario(make_design(design), ScenarioConfig(init_on_free=workload == "guest-boot"))
    tracker = ExposureTracker(sc.m, cost)
    sc.tracker = tracker
    tracker.attach()
    observe = sc.m.step_hook
    assert observe is not None
    seen = Counter[str]()

    def hook(step: Step) -> None:
        observe(step)
        seen["steps"] += 1
        if cross_check(sc.m, tracker):
            seen["exposed steps"] += 1

    sc.m.step_hook = hook
    WORKLOADS[workload].run(sc, PAGES)
    sc.finish()
    assert seen["steps"] == tracker.steps > 0
    # Every workload writes secrets; only designs that guard everything keep them all unreachable.
    assert tracker.secret_written > 0


def test_a_probe_changes_nothing() -> None:
    sc = Scenario("noflush")
    g = sc.new_guest(4)
    sc.guest_fill(g, 0x11)
    m = sc.m
    before = ([t.copy() for t in m.tlb.entries], Counter(m.trace.counts))
    for pfn in g.folios():
        for cpu in range(2):
            probe(m, cpu, pfn)
    assert ([t.copy() for t in m.tlb.entries], Counter(m.trace.counts)) == before


def test_the_tracker_needs_the_step_hook_to_itself(cost: CostModel) -> None:
    sc = Scenario("v12")
    ExposureTracker(sc.m, cost).attach()
    with pytest.raises(RuntimeError):
        ExposureTracker(sc.m, cost).attach()


def test_prices_drive_the_clock(cost: CostModel) -> None:
    sc = Scenario("v12")
    g = sc.new_guest(8)
    tracker = ExposureTracker(sc.m, cost)
    start = Counter(sc.m.trace.counts)
    tracker.attach()
    sc.guest_fill(g, 1)
    assert tracker.time_us > 0
    assert tracker.time_us == pytest.approx(cost.time_us(Counter(sc.m.trace.counts) - start))


@pytest.mark.parametrize("tlb_entries", [4, 16])
def test_evictions_from_a_full_tlb_end_stale_reach(tlb_entries: int, cost: CostModel) -> None:
    """noflush with tiny TLBs: fills evict stale entries, and the tracker must see each go."""
    sc = Scenario("noflush", ScenarioConfig(tlb_entries=tlb_entries))
    tracker = ExposureTracker(sc.m, cost)
    sc.tracker = tracker
    tracker.attach()
    observe = sc.m.step_hook
    assert observe is not None

    def hook(step: Step) -> None:
        observe(step)
        cross_check(sc.m, tracker)

    sc.m.step_hook = hook
    WORKLOADS["guest-boot"].run(sc, 24)
    sc.finish()
    via_tlb = next(ph for ph in tracker.phases if ph.name == "guest writes").by_cause_us[1]
    assert via_tlb > 0
    # A TLB of N entries keeps at most N stale translations per CPU.
    assert max(t[3] for t in tracker.timeline) <= 2 * tlb_entries * 4096


def test_a_2m_zap_and_its_restores(cost: CostModel) -> None:
    """zap2m on a whole 2 MiB block: checked wherever the direct map or a TLB changes."""
    sc = Scenario("zap2m")
    tracker = ExposureTracker(sc.m, cost)
    sc.tracker = tracker
    tracker.attach()
    observe = sc.m.step_hook
    assert observe is not None
    kinds = Counter[str]()

    def hook(step: Step) -> None:
        observe(step)
        if step[0] == "dmap" or (step[0] == "tlb" and isinstance(step[1], int)):
            kinds[step[0]] += 1
            if step[0] == "tlb" or kinds["dmap"] % 32 == 1:  # every flush; a sample of the restores
                cross_check(sc.m, tracker)

    sc.m.step_hook = hook
    WORKLOADS["guest-boot"].run(sc, 512)
    sc.finish()
    assert sc.m.trace.counts["dmap_clear_2m"] == 1
    assert kinds["dmap"] > 512  # the block zap, then a restore per folio
    assert cross_check(sc.m, tracker) == tracker.exposed
