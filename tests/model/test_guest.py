"""Guest programs on the model: exits, resumption, memslot kinds (realkernel.md §5)."""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import IoOut, KernelError, MemoryFault, MmioRead, MmioWrite, run_program
from gmemlab.guest import PORT_CHECK_FAIL, GuestProgram
from gmemlab.uapi import (
    EHWPOISON,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
)
from tests.conftest import model_host

PAGE = 4096
GPA = 1 << 32
ALL = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP


def test_program_exits_and_resumes_exactly() -> None:
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(2 * PAGE, ALL)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 2 * PAGE, 0, g, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(GuestProgram().fill(GPA, 2 * PAGE, 9).out(0x10, 1).report(GPA + PAGE)
                      .fill(GPA + 100, 1, 8).check(GPA, PAGE, 9).touch(GPA, 2 * PAGE))
    assert vcpu.run() == IoOut(0x10, b"\x01")
    assert vcpu.run() == IoOut(0xE1, b"\x09")
    assert vcpu.run() == IoOut(PORT_CHECK_FAIL, (100).to_bytes(4, "little"))
    assert vcpu.run() == IoOut(0xE0, b"\x00")  # a failed check jumps to the end
    stats = vcpu.stats()
    assert stats["pf_fixed"] == 2 and stats["exits"] == 4


def test_unbacked_gpa_exits_as_mmio() -> None:
    vm = model_host().open_kvm().create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(GuestProgram().report(8 << 30).fill(8 << 30, 2, 5))
    assert vcpu.run() == MmioRead(8 << 30, 1)
    assert vcpu.run() == IoOut(0xE1, b"\x00")  # the MMIO data nobody filled in
    assert vcpu.run() == MmioWrite(8 << 30, b"\x05")
    assert vcpu.run() == MmioWrite((8 << 30) + 1, b"\x05")


def test_release_while_bound_is_a_memory_fault() -> None:
    """realkernel N13: KVM_RUN fails with EFAULT and fills kvm_run.memory_fault."""
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(PAGE, ALL)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, g, 0)
    vcpu = vm.create_vcpu(0)
    assert run_program(vcpu, GuestProgram().fill(GPA, PAGE, 1)).ok
    g.close()
    vcpu.load_program(GuestProgram().report(GPA))
    assert vcpu.run() == MemoryFault(GPA, PAGE, 0)  # the SPTE was zapped by the release


def test_without_mmap_the_guest_uses_userspace_addr() -> None:
    """realkernel N11/N12: flags 0 is not GMEM_ONLY; the hva path needs userspace_addr."""
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(PAGE, 0)
    decoy = h.mmap_anonymous(PAGE)
    decoy.fill(0, PAGE, 0xDD)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, decoy.addr, g, 0)
    assert run_program(vm.create_vcpu(0), GuestProgram().report(GPA)).reports == [0xDD]
    vm2 = h.open_kvm().create_vm()
    g2 = vm2.create_guest_memfd(PAGE, 0)
    vm2.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, g2, 0)
    vcpu = vm2.create_vcpu(0)
    vcpu.load_program(GuestProgram().report(GPA))
    with pytest.raises(KernelError) as e:
        vcpu.run()
    assert e.value.errno == errno.EFAULT


def test_punch_hole_zaps_the_guest_mapping_and_refaults_zeroed() -> None:
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(PAGE, ALL)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, g, 0)
    vcpu = vm.create_vcpu(0)
    assert run_program(vcpu, GuestProgram().fill(GPA, PAGE, 0x55).report(GPA)).reports == [0x55]
    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, PAGE)
    assert h.machine.trace.counts["spte_zap"] == 1
    assert run_program(vcpu, GuestProgram().report(GPA)).reports == [0]


def test_two_vms_on_one_inode() -> None:
    """gmem_file per VM on one inode: a punch-hole through either file zaps both VMs' SPTEs,
    and memory lives as long as the inode, not a file (series-spec §3.6; anchors §B.4)."""
    h = model_host()
    a = h.open_kvm().create_vm()
    b = h.open_kvm().create_vm()
    ga = a.create_guest_memfd(PAGE, ALL)
    gb = b.link_guest_memfd(ga)
    a.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, ga, 0)
    b.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 2 * GPA, PAGE, 0, gb, 0)
    assert run_program(a.create_vcpu(0), GuestProgram().fill(GPA, PAGE, 0x3A)).ok
    vb = b.create_vcpu(0)
    assert run_program(vb, GuestProgram().report(2 * GPA)).reports == [0x3A]  # the same folio
    pfn = ga.pfn(0)
    assert h.machine.mem.s2count[pfn] == 2
    gb.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, PAGE)
    assert h.machine.mem.s2count[pfn] == 0 and h.machine.dmap.present(pfn)
    assert run_program(vb, GuestProgram().fill(2 * GPA, PAGE, 0x4B)).ok
    ga.close()  # the inode lives on through B's file
    assert run_program(vb, GuestProgram().report(2 * GPA)).reports == [0x4B]


def test_hwpoison_is_a_memory_fault_with_ehwpoison() -> None:
    """``__kvm_gmem_get_pfn()`` refuses a hwpoisoned folio with -EHWPOISON and KVM fills
    ``kvm_run.memory_fault``: kvm-ioctls returns ``VcpuExit::MemoryFault`` for EHWPOISON as
    for EFAULT; we keep which errno it was."""
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(2 * PAGE, ALL)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 2 * PAGE, 0, g, 0)
    vcpu = vm.create_vcpu(0)
    assert run_program(vcpu, GuestProgram().fill(GPA, 2 * PAGE, 1)).ok
    h.memory_failure(g.pfn(PAGE))  # ->error_remove_folio zaps the SPTE, keeps the folio
    vcpu.load_program(GuestProgram().report(GPA).report(GPA + PAGE))
    assert vcpu.run() == IoOut(0xE1, b"\x01")
    assert vcpu.run() == MemoryFault(GPA + PAGE, PAGE, 0, EHWPOISON)
    assert MemoryFault(GPA, PAGE, 0).errno == errno.EFAULT  # what a released file gives
