"""The arch hooks as the kernel has them, and what the series' VM-type exclusion keeps away.

SNP: ``sev_gmem_prepare`` RMP-assigns, ``sev_gmem_invalidate`` reclaims and clflushes through
``__va()``, ``sev_gmem_post_populate`` copies through ``kmap_local_pfn()``.  TDX:
``tdh_mem_page_aug``'s ``tdx_clflush_page`` and ``tdx_quirk_reset_page``.  The series' orders
are rationale (counted, never violations); what is judged is the consequence.
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import KernelError, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.invariants import INVARIANTS, KernelOops
from gmemlab.model.mm.memmap import GUEST_OWNED_SNP, GUEST_OWNED_TDX
from gmemlab.model.mm.tlb import kernel_access
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_SNP_VM,
    KVM_X86_TDX_VM,
)
from tests.conftest import ModelHost, model_host

PAGE = 4096
GPA = 1 << 32
WHAT_IF = "x86_64-what-if-snp-tdx"
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _private_vm(h: ModelHost, vm_type: int, flags: int = GUEST_MEMFD_FLAG_NO_DIRECT_MAP):  # type: ignore[no-untyped-def]
    vm = h.open_kvm().create_vm(vm_type)
    g = vm.create_guest_memfd(PAGE, flags)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, g, 0)
    vm.set_memory_attributes(GPA, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return vm, g


def test_the_rationale_entries_are_not_safety() -> None:
    rationale = {n for n, i in INVARIANTS.items() if i.rationale}
    assert rationale == {"zap-before-prepare", "invalidate-before-restore",
                         "guest-owned-not-host-mapped"}
    assert not INVARIANTS["host-write-guest-owned"].rationale


@pytest.mark.parametrize("vm_type", [KVM_X86_SNP_VM, KVM_X86_TDX_VM])
def test_v12_excludes_snp_and_tdx_and_the_what_if_profile_lets_them_through(vm_type: int) -> None:
    with pytest.raises(KernelError) as e:
        _private_vm(model_host("v12"), vm_type)
    assert e.value.errno == errno.EINVAL
    _private_vm(model_host("v12", WHAT_IF), vm_type)


def test_what_if_snp_v12_oopses_in_sev_gmem_invalidate() -> None:
    """v12's order, invalidate then restore: the clflush finds the page still zapped."""
    h = model_host("v12", WHAT_IF, invariants="record")
    vm, g = _private_vm(h, KVM_X86_SNP_VM)
    assert run_program(vm.create_vcpu(0), GuestProgram().fill(GPA, PAGE, 7)).ok
    pfn = g.pfn(0)
    assert h.machine.mem.guest_owned[pfn] == GUEST_OWNED_SNP and not h.machine.dmap.present(pfn)
    with pytest.raises(KernelOops) as e:
        g.fallocate(PUNCH, 0, PAGE)
    assert "sev_gmem_invalidate" in str(e.value) and "not-present page, kernel read" in str(e.value)


def test_v9_on_snp_restores_first_and_the_clflush_goes_through() -> None:
    """v9's order (restore, then invalidate) departs from v12's rationale and does not fault."""
    h = model_host("v9", invariants="record")
    vm, g = _private_vm(h, KVM_X86_SNP_VM)
    assert run_program(vm.create_vcpu(0), GuestProgram().fill(GPA, PAGE, 7)).ok
    pfn = g.pfn(0)
    g.fallocate(PUNCH, 0, PAGE)
    inv = h.machine.inv
    assert not any(inv.verdicts().values())
    assert {n for n, k in inv.departures().items() if k} == {
        "zap-before-prepare", "invalidate-before-restore", "guest-owned-not-host-mapped"}
    assert h.machine.mem.guest_owned[pfn] == 0 and h.machine.dmap.present(pfn)
    assert any(e.fn == "sev_gmem_invalidate" and e.event == "kernel_read"
               for e in h.machine.trace.events())


@pytest.mark.parametrize("design", ["v12", "v9"])
def test_tdx_oopses_at_the_first_private_fault(design: str) -> None:
    """tdh_mem_page_aug() clflushes the zapped page through the direct map (why v10 excludes TDs)."""
    h = model_host(design, WHAT_IF, invariants="record")
    vm, _ = _private_vm(h, KVM_X86_TDX_VM)
    with pytest.raises(KernelOops) as e:
        run_program(vm.create_vcpu(0), GuestProgram().fill(GPA, PAGE, 7))
    assert "tdh_mem_page_aug" in str(e.value)


def test_tdx_without_the_flag_runs_and_gives_the_page_back_with_the_quirk_reset() -> None:
    h = model_host("v12", WHAT_IF)
    vm, g = _private_vm(h, KVM_X86_TDX_VM, 0)
    assert run_program(vm.create_vcpu(0), GuestProgram().fill(GPA, PAGE, 7)).ok
    pfn = g.pfn(0)
    assert h.machine.mem.guest_owned[pfn] == GUEST_OWNED_TDX
    g.fallocate(PUNCH, 0, PAGE)
    assert h.machine.mem.guest_owned[pfn] == 0
    events = [(e.fn, e.event) for e in h.machine.trace.events()]
    assert events.index(("tdx_sept_remove_private_spte", "tdx_page_remove")) < events.index(
        ("tdx_quirk_reset_page", "kernel_write"))


def test_snp_launch_update_copies_through_the_direct_map() -> None:
    """v12 leaves populate alone (no zap): the copy works, the later invalidate oopses;
    a design that zaps at insertion oopses in the copy itself."""
    h = model_host("v12", WHAT_IF, invariants="record")
    vm, g = _private_vm(h, KVM_X86_SNP_VM)
    vm.snp_launch_update(GPA, b"\x5a" * PAGE)
    assert h.machine.mem.guest_owned[g.pfn(0)] == GUEST_OWNED_SNP
    assert run_program(vm.create_vcpu(0), GuestProgram().check(GPA, PAGE, 0x5A)).ok
    with pytest.raises(KernelError) as e:
        vm.snp_launch_update(GPA, b"\x5a" * PAGE)  # already assigned
    assert e.value.errno == errno.EINVAL
    h = model_host("pagecache", WHAT_IF, invariants="record")
    vm, _ = _private_vm(h, KVM_X86_SNP_VM)
    with pytest.raises(KernelOops) as o:
        vm.snp_launch_update(GPA, b"\x5a" * PAGE)
    assert "sev_gmem_post_populate" in str(o.value)


def test_a_host_write_to_a_guest_owned_page_is_judged() -> None:
    """SNP: an RMP violation in the kernel oopses; TDX: recorded, the TD pays later."""
    for vm_type, owner, oops in ((KVM_X86_SNP_VM, GUEST_OWNED_SNP, True),
                                 (KVM_X86_TDX_VM, GUEST_OWNED_TDX, False)):
        h = model_host("base", invariants="record")
        vm, g = _private_vm(h, vm_type, 0)
        assert run_program(vm.create_vcpu(0), GuestProgram().touch(GPA, PAGE)).ok
        m = h.machine
        pfn = g.pfn(0)
        assert m.mem.guest_owned[pfn] == owner
        write = kernel_access(m, pfn, "copy_to_kernel", write=True)
        if oops:
            with pytest.raises(KernelOops, match="RMP violation"):
                m.run(m.task("k", 0), write)
        else:
            m.run(m.task("k", 0), write)
            assert m.inv.verdicts()["host-write-guest-owned"] == 1
