"""KVM's other ways into guest memory (issue 11 item 6), on the model.

The emulator fetches an instruction through ``userspace_addr`` (``kvm_fetch_guest_virt``:
``copy_from_user``), so MMIO emulation of code in NO_DIRECT_MAP guest_memfd works when the
VMM maps the file: the series' ``test_guest_memfd_mmio``.  ``kvm_vcpu_map`` GUPs, so it
fails there, as kvm-clock's pfncache does.
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import InternalError, IoOut, KernelError, MmioRead
from gmemlab.guest import PORT_DONE, PORT_REPORT, GuestProgram
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MEM_GUEST_MEMFD,
)
from tests.conftest import model_host

PAGE = 4096
GPA = 1 << 32
MMIO_GPA = 1 << 38  # no memslot
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
NDM = SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP


def _vm(flags: int, *, mapped: bool = True, design: str = "v12"):  # type: ignore[no-untyped-def]
    h = model_host(design)
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(2 * PAGE, flags)
    addr = g.mmap(2 * PAGE).addr if mapped else 0
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 2 * PAGE, addr, g, 0)
    return h, vm, g


def test_mmio_emulation_fetches_code_from_no_direct_map_memory_through_userspace_addr() -> None:
    h, vm, g = _vm(NDM)
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(GuestProgram().report_via(MMIO_GPA, GPA + 0x10))
    assert vcpu.run() == MmioRead(MMIO_GPA, 1)
    assert vcpu.run() == IoOut(PORT_REPORT, b"\x00")  # the VMM's (zero) data
    assert vcpu.run() == IoOut(PORT_DONE, b"\x00")
    m = h.machine
    pfn = g.pfn(0)
    assert not m.dmap.present(pfn)
    events = [(e.fn, e.event, e.pfn) for e in m.trace.events()]
    assert ("kvm_read_guest", "copy_from_user", -1) in events
    # Nothing read the code page through the direct map: the fetch went through the user PTE.
    assert not [e for e in events if e[2] == pfn and e[1] in ("kernel_read", "oops")]


def test_a_fetch_with_no_userspace_mapping_is_an_emulation_failure() -> None:
    _, vm, _ = _vm(NDM, mapped=False)
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(GuestProgram().report_via(MMIO_GPA, GPA + 0x10))
    assert vcpu.run() == InternalError(KVM_INTERNAL_ERROR_EMULATION)


def test_a_load_from_memory_needs_no_emulation() -> None:
    _, vm, _ = _vm(NDM)
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(GuestProgram().fill(GPA + PAGE, PAGE, 0x3C).report_via(GPA + PAGE, GPA))
    assert vcpu.run() == IoOut(PORT_REPORT, b"\x3c")
    assert vcpu.stats().get("insn_emulation", 0) == 0


def test_an_instruction_across_a_page_is_refused() -> None:
    with pytest.raises(ValueError, match="one guest page"):
        GuestProgram().report_via(MMIO_GPA, GPA + PAGE - 4).validate()


@pytest.mark.parametrize(("flags", "ok"), [(SHARED, True), (NDM, False)])
def test_kvm_vcpu_map_needs_gup(flags: int, ok: bool) -> None:
    h, vm, g = _vm(flags)
    vcpu = vm.create_vcpu(0)
    if ok:
        assert vcpu.kvm_vcpu_map(GPA) == g.pfn(0)
        return
    with pytest.raises(KernelError) as e:
        vcpu.kvm_vcpu_map(GPA)
    assert e.value.errno == errno.EFAULT
    assert any(ev.event == "gpa_map_fail" for ev in h.machine.trace.events())
