"""Each window of issue 5, opened and measured where the design says it is.

Phase peaks are in bytes; a workload of ``PAGES`` pages writes ``PAGES * 4096``
secret bytes per VM.
"""

from __future__ import annotations

import pytest

from gmemlab.cost.model import CostModel
from gmemlab.expose.analysis import CaseResult, ExposeConfig, run_case
from gmemlab.expose.tracker import DMAP, TEMP, TLB
from gmemlab.model.designs.fc618 import Firecracker618

PAGES = 16
ALL = PAGES * 4096
PAGE = 4096


def case(design: str, workload: str, cost: CostModel, *, init_on_free: bool = False) -> CaseResult:
    return run_case(design, workload, init_on_free, ExposeConfig(pages=PAGES), cost)


def peak(r: CaseResult, phase: str) -> int:
    return next(ph.peak for ph in r.phases if ph.name == phase)


def via(r: CaseResult, phase: str, cause: int) -> float:
    return next(ph.by_cause_us[cause - 1] for ph in r.phases if ph.name == phase)


def test_baseline_keeps_every_guest_byte_reachable(cost: CostModel) -> None:
    r = case("base", "guest-boot", cost)
    assert not r.no_direct_map
    assert r.secret_written == ALL
    assert peak(r, "guest writes") == peak(r, "run") == ALL
    assert r.byte_us == pytest.approx(sum(r.by_cause_us)) and r.by_cause_us[1:] == [0.0, 0.0]


def test_v12_guards_guest_memory_while_it_is_in_use(cost: CostModel) -> None:
    r = case("v12", "guest-boot", cost)
    assert r.no_direct_map
    assert peak(r, "guest writes") == peak(r, "run") == 0
    # The free path: restored frames still hold the guest's data, until the kernel zeroes them.
    assert peak(r, "teardown") == ALL
    assert r.exposed_at_end == ALL - (PAGES // 2) * PAGE  # the reuse phase zeroed half
    assert r.open_at_end == PAGES // 2


def test_init_on_free_leaves_one_page_between_restore_and_zeroing(cost: CostModel) -> None:
    r = case("v12", "guest-boot", cost, init_on_free=True)
    assert peak(r, "teardown") == PAGE
    assert r.exposed_at_end == 0 and r.open_at_end == 0
    assert r.windows == PAGES and r.window_max_steps <= 8


def test_without_the_flush_stale_tlb_entries_expose_the_guest(cost: CostModel) -> None:
    r = case("noflush", "guest-boot", cost)
    assert peak(r, "guest writes") >= ALL - PAGE  # a split's flush_tlb_all may catch the first
    assert via(r, "guest writes", TLB) > 0 and via(r, "guest writes", DMAP) == 0
    assert "handout-flushed" in r.violations


def test_v12_zap_to_flush_window_holds_no_secret(cost: CostModel) -> None:
    """Zeroing precedes the zap, so nothing secret sits behind a stale entry before the flush."""
    for workload in ("guest-boot", "vmm-restore", "primed"):
        r = case("v12", workload, cost)
        assert all(ph.by_cause_us[TLB - 1] == 0 for ph in r.phases), workload


def test_a_batched_flush_exposes_at_most_the_open_batch(cost: CostModel) -> None:
    r = case("batch:4", "guest-boot", cost)
    assert 0 < peak(r, "guest writes") <= 3 * PAGE  # the 4th zap flushes the batch
    assert peak(r, "run") == 0  # the return to user space flushed the rest


def test_an_attacker_keeps_primed_translations_without_a_flush(cost: CostModel) -> None:
    assert peak(case("v12", "primed", cost), "guest writes") == 0
    assert peak(case("falloc", "primed", cost), "guest writes") == 0
    r = case("noflush", "primed", cost)
    assert peak(r, "guest writes") >= ALL - PAGE


def test_fallocate_hands_out_the_previous_vms_data_still_mapped(cost: CostModel) -> None:
    r = case("v12", "reuse", cost)
    assert peak(r, "B fallocate") == ALL  # A's data in B's folios, direct-mapped, not yet zeroed
    # B's first touch zeroes (then zaps) half of them.
    b_touch = next(ph for ph in r.phases if ph.name == "B touches half")
    assert b_touch.peak == ALL
    assert r.exposed_at_end <= ALL
    # Designs that zero at insertion close it at fallocate.
    for design in ("falloc", "filemap"):
        assert peak(case(design, "reuse", cost), "B touches half") == 0, design


def test_unmapped_exposes_only_through_its_temporary_mapping(cost: CostModel) -> None:
    r = case("unmapped", "reuse", cost)
    # Nothing through the direct map: the folios live in unmapped pageblocks.
    assert all(via(r, ph.name, DMAP) == 0 for ph in r.phases)
    # The mermap's stale translations of A's folios (zeroed there, then written by the guest)
    # last until A's removal flushes them (mapping_check_flush_mermap).
    assert peak(r, "A writes") == ALL and via(r, "A writes", TEMP) > 0
    assert peak(r, "B fallocate") == PAGE  # the mermap zeroing A's data, one frame at a time
    assert peak(r, "teardown") == 0 and r.exposed_at_end == 0


def test_secretmem_restores_before_it_zeroes(cost: CostModel) -> None:
    r = case("v12", "secretmem", cost)
    assert peak(r, "vmm writes") == 0
    assert peak(r, "teardown") == PAGE
    assert r.exposed_at_end == 0
    # Firecracker's no-flush patch removes secretmem's flush too.
    assert peak(case("noflush", "secretmem", cost), "vmm writes") >= ALL - PAGE


def test_windows_add_up(cost: CostModel) -> None:
    r = case("base", "guest-boot", cost, init_on_free=True)
    assert r.open_at_end == 0 and r.windows == PAGES
    # Each page was reachable from its write to its zeroing at free: byte*steps is the sum.
    assert r.byte_steps >= r.windows * PAGE


def test_kvm_clock_vmap_alias_exposes_the_pvclock_page_and_later_its_next_owner(
        cost: CostModel) -> None:
    """Firecracker's pfncache (0042) maps the guest's pvclock page with vmap(): the page's
    data (all but the 32 pvclock bytes KVM wrote) is reachable from every CPU while the
    cache lives.  A punch-hole only invalidates the cache (0046), so the alias then maps
    the freed frame, and VM B's data once B gets that frame.  v12, whose kvm-clock fails
    silently, maps nothing.  (With 0039's default, no flush, stale TLB entries reach the
    page first: the flush is turned on here to see the alias alone.)"""
    fc = run_case(Firecracker618(guest_memfd_tlb_flush=True), "kvm-clock", False,
                  ExposeConfig(pages=PAGES), cost)
    assert peak(fc, "guest writes") == 0
    assert peak(fc, "kvm-clock on") == PAGE  # the page...
    assert peak(fc, "run") == PAGE - 32  # ...but for the pvclock KVM wrote over its data
    assert via(fc, "run", TEMP) > 0 and via(fc, "run", DMAP) == via(fc, "run", TLB) == 0
    assert via(fc, "B boots", TEMP) > 0
    v12 = case("v12", "kvm-clock", cost)
    assert peak(v12, "kvm-clock on") == 0
    assert all(ph.by_cause_us[TEMP - 1] == 0 for ph in v12.phases)
