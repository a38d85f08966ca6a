"""The Kvm/VmFd/VcpuFd objects on the real /dev/kvm, and guests on guest_memfd."""

from __future__ import annotations

import errno

import pytest

from gmemlab import api, guest, twin, uapi
from gmemlab.twin import guestenv

PAGE = uapi.PAGE_SIZE
GPA = 4 << 30
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def test_system_ioctls(host: twin.TwinHost) -> None:
    with host.open_kvm() as kvm:
        assert kvm.get_api_version() == uapi.KVM_API_VERSION
        assert kvm.get_vcpu_mmap_size() >= 4096
        assert kvm.has_cap(uapi.KVM_CAP_GUEST_MEMFD) is twin.guest_memfd_available()[0]
        assert kvm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) > 1
        assert len(kvm.get_supported_cpuid()) > 0
    with pytest.raises(api.KernelError) as closed:
        kvm.fileno()
    assert closed.value.errno == errno.EBADF


def test_vm_outlives_the_kvm_object(host: twin.TwinHost) -> None:
    kvm = host.open_kvm()
    with kvm.create_vm() as vm:
        kvm.close()
        with vm.create_vcpu(0) as vcpu:
            assert api.run_program(vcpu, guest.GuestProgram()).done


def test_create_vm_type_errors_are_the_kernels(host: twin.TwinHost) -> None:
    with host.open_kvm() as kvm, pytest.raises(api.KernelError) as e:
        kvm.create_vm(0x7FFFFFFF)
    assert e.value.errno == errno.EINVAL
    assert "KVM_CREATE_VM" in str(e.value)


def test_guest_memfd_flags_pass_through(shared_host: twin.TwinHost) -> None:
    with shared_host.open_kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(api.KernelError) as e:
            vm.create_guest_memfd(PAGE, 1 << 63)
        assert e.value.errno == errno.EINVAL
        with vm.create_guest_memfd(2 * PAGE, SHARED) as g:
            assert (g.size, g.flags) == (2 * PAGE, SHARED)
            assert g.fstat().st_size == 2 * PAGE


def test_selftest_guest_memfd_guest(shared_host: twin.TwinHost) -> None:
    """test_guest_memfd_guest, step by step with api.run_program."""
    with shared_host.open_kvm() as kvm, kvm.create_vm() as vm:
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        assert flags & SHARED == SHARED
        with vm.create_guest_memfd(PAGE, SHARED) as gmem:
            vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, gmem, 0)
            with gmem.mmap(PAGE) as m:
                m.fill(0, PAGE, 0xAA)
            vcpu = vm.create_vcpu(0)
            program = guest.GuestProgram().check(GPA, PAGE, 0xAA).fill(GPA, PAGE, 0xFF)
            result = api.run_program(vcpu, program)
            assert result.ok, result
            with gmem.mmap(PAGE) as m:
                assert m.read(0, PAGE) == b"\xff" * PAGE


def test_guest_faults_take_the_guest_memfd_path(shared_host: twin.TwinHost) -> None:
    """Binary stats: one pf_fixed per page of a fresh gmem slot, no instruction emulation."""
    pages = 64
    with (
        shared_host.open_kvm() as kvm,
        kvm.create_vm() as vm,
        vm.create_guest_memfd(pages * PAGE, SHARED) as gmem,
    ):
        vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GPA, pages * PAGE, 0, gmem, 0)
        vcpu = vm.create_vcpu(0)
        assert api.run_program(vcpu, guest.GuestProgram()).done  # fault the code page in
        before = vcpu.stats()
        result = api.run_program(vcpu, guest.GuestProgram().touch(GPA, pages * PAGE))
        after = vcpu.stats()
        assert result.done
        delta = {k: after[k] - before[k] for k in ("pf_fixed", "insn_emulation")}
        assert delta["pf_fixed"] >= pages
        assert delta["insn_emulation"] <= 2  # the doorbell exit, not the touches
        with gmem.mmap(pages * PAGE) as m:
            data = m.read(0, pages * PAGE)
        assert data[::PAGE] == b"\x01" * pages
        assert vm.stats()["pages_4k"] >= pages


def test_ports_and_exits(host: twin.TwinHost) -> None:
    with host.open_kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        result = api.run_program(vcpu, guest.GuestProgram().out(0x10, 7).out(0x3F8, 0x41))
        assert result.done
        assert result.outs == [(0x10, 7), (0x3F8, 0x41)]
        assert vcpu.run() == api.IoOut(guest.PORT_DONE, b"\0")  # done stays done
        # Memory without a memslot is MMIO, both ways.
        result = api.run_program(vcpu, guest.GuestProgram().fill(8 << 30, 1, 0x99))
        assert result.last_exit == api.MmioWrite(8 << 30, b"\x99")
        result = api.run_program(vcpu, guest.GuestProgram().report(8 << 30))
        assert result.last_exit == api.MmioRead(8 << 30, 1)
        # After an MMIO exit a new program still starts cleanly.
        assert api.run_program(vcpu, guest.GuestProgram().out(0x11, 1)).outs == [(0x11, 1)]


def test_memory_fault_exit_after_release(shared_host: twin.TwinHost) -> None:
    with shared_host.open_kvm() as kvm, kvm.create_vm() as vm:
        gmem = vm.create_guest_memfd(PAGE, SHARED)
        vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, gmem.fileno(), 0)
        gmem.close()
        gmem.close()
        with vm.create_vcpu(0) as vcpu:
            result = api.run_program(vcpu, guest.GuestProgram().report(GPA + 5))
            assert result.last_exit == api.MemoryFault(GPA, PAGE, 0)


def test_kvm_run_efault_without_record_raises(gmem_host: twin.TwinHost) -> None:
    """realkernel N12: flags 0, no hva: KVM_RUN fails with EFAULT and no MEMORY_FAULT."""
    with gmem_host.open_kvm() as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(PAGE) as g:
        vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, g, 0)
        with vm.create_vcpu(0) as vcpu, pytest.raises(api.KernelError) as e:
            api.run_program(vcpu, guest.GuestProgram().report(GPA))
        assert e.value.errno == errno.EFAULT


def test_registers_round_trip(host: twin.TwinHost) -> None:
    with host.open_kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        sregs = vcpu.get_sregs()
        assert (sregs.cr0, sregs.cr4, sregs.efer) == (0x80050033, 0x20, 0x500)
        assert (sregs.cs.selector, sregs.cs.dpl, sregs.cs.l) == (0x33, 3, 1)
        vcpu.load_program(guest.GuestProgram())
        regs = vcpu.get_regs()
        assert regs.rip == guestenv.PRIVATE_GPA + guestenv.AREAS_OFFSET
        regs.rbx = 0x1234
        vcpu.set_regs(regs)
        assert vcpu.get_regs().rbx == 0x1234


def test_private_slot_is_guarded(host: twin.TwinHost) -> None:
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        before = vm.private_slot
        assert before is None
        vcpu = vm.create_vcpu(0)
        slot = vm.private_slot
        assert slot == kvm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) - 1
        with pytest.raises(ValueError, match="private slot"):
            vm.set_user_memory_region2(slot, 0, 0, 0)
        with pytest.raises(api.KernelError) as e:  # its GPA range is taken
            vm.set_user_memory_region2(2, 0, guestenv.PRIVATE_GPA, PAGE, 0)
        assert e.value.errno == errno.EEXIST
    with pytest.raises(api.KernelError) as closed:  # closing the VM closed its vCPUs
        vcpu.run()
    assert closed.value.errno == errno.EBADF


def test_set_memory_attributes_reaches_the_kernel(host: twin.TwinHost) -> None:
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        if kvm.has_cap(uapi.KVM_CAP_MEMORY_ATTRIBUTES):
            pytest.skip("this kernel implements memory attributes")
        with pytest.raises(api.KernelError) as e:
            vm.set_memory_attributes(0, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        assert e.value.errno == errno.ENOTTY


def test_mmio_emulation_fetches_an_instruction_from_guest_memory(host: twin.TwinHost) -> None:
    """``GuestProgram.report_via`` on the real kernel, code in an anonymous memslot: KVM
    fetches the instruction through ``userspace_addr`` and the model agrees.  The series'
    ``test_guest_memfd_mmio`` puts it in NO_DIRECT_MAP guest_memfd, which this kernel lacks
    (the model's ``tests/model/test_kvm_access_paths.py`` runs that)."""
    from gmemlab import model

    exits = []
    for h in (host, model.Host(design="base")):
        with h.open_kvm() as kvm, kvm.create_vm() as vm:
            mem = h.mmap_anonymous(8192)
            vm.set_user_memory_region2(1, 0, 1 << 32, 8192, mem.addr, None, 0)
            with vm.create_vcpu(0) as vcpu:
                vcpu.load_program(guest.GuestProgram().report_via(1 << 38, (1 << 32) + 0x800))
                exits.append([vcpu.run() for _ in range(3)])
    real, modelled = exits
    assert real == modelled
    assert real[0] == api.MmioRead(1 << 38, 1)
