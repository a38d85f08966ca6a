"""Bugs the checker used to miss (issue 13), each written into v12 as a reviewer would make it.

Each mutation is a test-local subclass of v12 (or a monkeypatch the test
undoes).  Before issue 13 the checker passed every one of them: it ran only
on x86_64, created only NO_DIRECT_MAP files, had no GUP actor, and never
judged the marker of a freed frame.  Each test shows the checker now reports
it, with the property that states the rule it breaks, and (where cheap) that
the same scenario passes on v12 itself.
"""

from __future__ import annotations

from typing import ClassVar

import pytest

from gmemlab.check.explore import Result, explore
from gmemlab.check.report import replay
from gmemlab.check.scenarios import Scenario, get_scenario
from gmemlab.check.suite import check_one
from gmemlab.model.designs.base import (
    FaultResult,
    GetPfnResult,
    fault_fail,
    inode_no_direct_map,
    kvm_gmem_fault_uptodate_folio,
    kvm_gmem_get_pfn_done,
    kvm_gmem_get_pfn_folio,
    zero_if_not_uptodate,
)
from gmemlab.model.designs.v12 import V12
from gmemlab.model.kvm.guest_memfd import kvm_arch_gmem_invalidate, kvm_arch_gmem_prepare
from gmemlab.model.kvm.kvm_main import Kvm, Memslot
from gmemlab.model.machine import Machine
from gmemlab.model.mm import gup
from gmemlab.model.mm.memory import VM_FAULT_LOCKED, Vma, vmf_error
from gmemlab.model.task import KGen


def _first(r: Result) -> str:
    assert r.found, r.verdict()
    return r.found[0].invariant


def _replays(scenario: Scenario, design: type[V12], r: Result) -> None:
    """The counterexample replays to the property it was reported for."""
    cx = r.found[0]
    rep = replay(scenario, design, cx.schedule)
    assert cx.invariant in [b.invariant for _, b in rep.broken]


# --- arm64: the flag advertised while can_set_direct_map() is false -----------------------------------
class ArmGateWithoutCanSetDirectMap(V12):
    """``kvm_arch_gmem_supports_no_direct_map()`` on arm64 testing only FEAT_S2FWB."""

    name: ClassVar[str] = "v12-arm64-gate"

    def kvm_arch_gmem_supports_no_direct_map(self, m: Machine, vm_type: int | None) -> bool:
        if m.profile.arch == "arm64":
            return m.profile.s2fwb
        return super().kvm_arch_gmem_supports_no_direct_map(m, vm_type)


def test_v12_is_skipped_where_it_does_not_offer_the_flag_saying_why() -> None:
    s = get_scenario("fault-punch")
    off = check_one("v12", s.on("arm64-rodata-off"))
    assert off.skipped is not None and "can_set_direct_map() is false" in off.skipped
    assert off.passed and off.verdict() == "skip"
    riscv = check_one("v12", s.on("riscv64"))
    assert riscv.skipped is not None and "no guest_memfd" in riscv.skipped
    assert "FEAT_S2FWB" in str(check_one("v12", s.on("arm64-no-s2fwb")).skipped)
    arm = check_one("v12", s.on("arm64"))
    assert arm.skipped is None and arm.passed and arm.verdict() == "pass (exhaustive)"


def test_an_arm64_gate_without_can_set_direct_map_is_caught_on_arm64_rodata_off() -> None:
    s = get_scenario("fault-punch")
    # On x86_64 (all the checker ran before --profile) the mutation changes nothing.
    assert check_one(ArmGateWithoutCanSetDirectMap, s).passed
    off = s.on("arm64-rodata-off")
    r = check_one(ArmGateWithoutCanSetDirectMap, off)
    assert r.skipped is None
    # The zap is a silent no-op there: the folio is marked as zapped, and unlocked (then
    # handed to the guest), still in the direct map.
    assert _first(r) == "marker-matches-direct-map"
    assert "marker set but direct map present" in r.found[0].message
    _replays(off, ArmGateWithoutCanSetDirectMap, r)


# --- the zap called for every guest_memfd (v7's bug, in v12's code) -----------------------------------
class ZapEveryGuestMemfd(V12):
    """v12's fault paths with the creation-flag test dropped before the zap."""

    name: ClassVar[str] = "v12-zap-all"

    def kvm_gmem_fault_user_mapping(self, m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
        ret, folio = yield from kvm_gmem_fault_uptodate_folio(m, vma, page)
        if ret:
            return ret, -1
        err = yield from self.kvm_gmem_folio_zap_direct_map(m, folio)
        if err:
            return (yield from fault_fail(m, folio, vmf_error(err)))
        return VM_FAULT_LOCKED, folio

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[GetPfnResult]:
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        yield from zero_if_not_uptodate(m, folio, "kvm_gmem_get_pfn")
        r = yield from self.kvm_gmem_folio_zap_direct_map(m, folio)
        if not r:
            r = yield from kvm_arch_gmem_prepare(m, kvm, gfn, folio)
        return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))


def test_a_zap_of_every_guest_memfd_fires_the_warn_and_fails_the_plain_fault() -> None:
    s = get_scenario("plain-beside")
    assert explore(s, "v12").passed
    r = explore(s, ZapEveryGuestMemfd)
    assert _first(r) == "no-warn"
    assert "kvm_gmem_fault_user_mapping" in r.found[0].message  # where the actor stopped next
    _replays(s, ZapEveryGuestMemfd, r)
    # Looking past the WARN, the fault itself fails on the file without the flag.
    r = explore(s, ZapEveryGuestMemfd, ignore=frozenset({"no-warn"}))
    assert _first(r) == "plain-fault-succeeds"
    assert "without NO_DIRECT_MAP" in r.found[0].message
    # The properties issue 13 adds are what catch it: without them the scenario passes.
    assert explore(s, ZapEveryGuestMemfd,
                   ignore=frozenset({"no-warn", "plain-fault-succeeds"})).passed


# --- GUP's slow path testing only secretmem ---------------------------------------------------------
def test_check_vma_flags_testing_only_secretmem_is_caught_by_the_gup_actors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = get_scenario("gup-pfncache")
    assert explore(s, "v12").passed

    def secretmem_only(m: Machine, vma: Vma, gup_flags: int) -> int:
        if gup_flags & gup.FOLL_WRITE and not vma.flags & 0x2:
            return -gup.EFAULT
        if vma.file is not None and vma.file.inode.mapping.kind == "secretmem":
            return -gup.EFAULT
        return 0

    monkeypatch.setattr(gup, "check_vma_flags", secretmem_only)
    r = explore(s, "v12")
    assert _first(r) == "gup-refuses-no-direct-map"
    assert "pin_user_pages_remote" in r.found[0].message or "hva_to_pfn" in r.found[0].message
    _replays(s, V12, r)


# --- a restore that forgets the marker ---------------------------------------------------------------
class RestoreKeepsMarker(V12):
    """``kvm_gmem_folio_restore_direct_map()`` without its ``clear_marker`` (the v8 bug)."""

    name: ClassVar[str] = "v12-restore-keeps-marker"

    def kvm_gmem_folio_restore_direct_map(self, m: Machine, folio: int) -> KGen[None]:
        m.trace.emit("kvm_gmem_folio_restore_direct_map", "restore", folio)
        if m.inv.enabled:
            m.inv.on_restore(folio)
        yield from self.folio_restore_direct_map(m, folio)


def test_a_restore_that_keeps_the_marker_is_caught_when_the_frame_is_freed() -> None:
    s = get_scenario("free-reuse")
    r = explore(s, RestoreKeepsMarker)
    assert _first(r) == "free-frame-unmarked"
    assert "KVM_GMEM_FOLIO_NO_DIRECT_MAP" in r.found[0].message
    _replays(s, RestoreKeepsMarker, r)


# --- a crash in the code under check, and a bug in the checker ---------------------------------------
class FreeFolioReadsTheInode(V12):
    """``->free_folio`` reading the inode's flag, as v5/v6 did (§8 bug 9): by then
    ``folio->mapping`` is NULL, and the model's dereference raises."""

    name: ClassVar[str] = "v12-free-reads-inode"

    def kvm_gmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        yield from kvm_arch_gmem_invalidate(m, pfn)
        if inode_no_direct_map(m, pfn):
            yield from self.kvm_gmem_folio_restore_direct_map(m, pfn)


def test_an_exception_in_a_kernel_path_is_an_oops_with_its_kernel_path() -> None:
    s = get_scenario("fault-punch")
    r = explore(s, FreeFolioReadsTheInode)
    cx = r.found[0]
    assert cx.invariant == "kernel-crash" and cx.oops
    assert cx.message.startswith("oops: KeyError")
    assert "kvm_gmem_free_folio > inode_no_direct_map > folio_inode" in cx.message
    assert "model-error" not in cx.message and "checker" not in cx.message


def test_an_exception_in_the_checker_is_told_apart() -> None:
    from dataclasses import replace

    from gmemlab.check.world import Actor, user_fault

    s = get_scenario("fault-punch")  # its setup maps nothing: an actor using map 0 is the bug
    broken = replace(s, actors=(Actor("user", 0, (user_fault(),)),))
    r = explore(broken, "v12")
    cx = r.found[0]
    assert cx.invariant == "checker-error" and not cx.oops
    assert "IndexError" in cx.message and "world.py" in cx.message
