"""KVM_CREATE_GUEST_MEMFD and KVM_CHECK_EXTENSION, per architecture profile and design.

series-spec §2.2-2.3 and §5; anchors §B.2 (test_guest_memfd_flags).
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import KernelError
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED as SHARED,
)
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_MMAP as MMAP,
)
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP as NDM,
)
from gmemlab.uapi import (
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_VM_TYPES,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
)
from tests.conftest import model_host

PAGE = 4096

# VM-scope KVM_CAP_GUEST_MEMFD_FLAGS, x86 v12: INIT_SHARED only without private memory,
# NO_DIRECT_MAP for every type but TDX (v10) and SNP (v12).
X86_V12 = {
    KVM_X86_DEFAULT_VM: MMAP | SHARED | NDM,
    KVM_X86_SW_PROTECTED_VM: MMAP | NDM,
    KVM_X86_SEV_VM: MMAP | SHARED | NDM,
    KVM_X86_SEV_ES_VM: MMAP | SHARED | NDM,
    KVM_X86_SNP_VM: MMAP,
    KVM_X86_TDX_VM: MMAP,
}


@pytest.mark.parametrize("vm_type", list(X86_V12))
def test_x86_v12_flags_per_vm_type(vm_type: int) -> None:
    vm = model_host().open_kvm().create_vm(vm_type)
    assert vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == X86_V12[vm_type]


@pytest.mark.parametrize("vm_type", [KVM_X86_TDX_VM, KVM_X86_SNP_VM])
def test_v12_refuses_no_direct_map_for_populate_users(vm_type: int) -> None:
    vm = model_host().open_kvm().create_vm(vm_type)
    with pytest.raises(KernelError) as e:
        vm.create_guest_memfd(PAGE, MMAP | NDM)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("design", ["v9", "v7"])
def test_before_v10_tdx_and_snp_were_offered_the_flag(design: str) -> None:
    kvm = model_host(design).open_kvm()
    for vm_type in (KVM_X86_TDX_VM, KVM_X86_SNP_VM):
        assert kvm.create_vm(vm_type).check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) & NDM


@pytest.mark.parametrize(
    ("profile", "vm_scope", "system_scope"),
    [
        ("x86_64", MMAP | SHARED | NDM, MMAP | SHARED | NDM),
        ("arm64", MMAP | SHARED | NDM, MMAP | SHARED | NDM),
        ("arm64-no-s2fwb", MMAP | SHARED, MMAP | SHARED | NDM),
        ("arm64-rodata-off", MMAP | SHARED, MMAP | SHARED | NDM),
        ("x86_64-kvm_pvm-6.18", MMAP | SHARED | NDM, MMAP | SHARED | NDM),
    ],
)
def test_capability_scopes(profile: str, vm_scope: int, system_scope: int) -> None:
    """The system-wide answer (kvm == NULL) always includes NO_DIRECT_MAP in v12 (§2.2)."""
    kvm = model_host("v12", profile).open_kvm()
    assert kvm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == system_scope
    vm = kvm.create_vm()
    assert vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == vm_scope
    if not vm_scope & NDM:
        with pytest.raises(KernelError) as e:
            vm.create_guest_memfd(PAGE, NDM)
        assert e.value.errno == errno.EINVAL


def test_mainline_offers_no_flag() -> None:
    kvm = model_host("base", "x86_64-kvm_pvm-6.18").open_kvm()
    assert kvm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | SHARED
    assert kvm.check_extension(KVM_CAP_VM_TYPES) == 1
    assert kvm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) == 0
    with pytest.raises(KernelError) as e:
        kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    assert e.value.errno == errno.EINVAL


def test_riscv_has_no_guest_memfd() -> None:
    kvm = model_host("v12", "riscv64").open_kvm()
    assert kvm.check_extension(KVM_CAP_GUEST_MEMFD) == 0
    vm = kvm.create_vm()
    assert vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == 0
    with pytest.raises(KernelError) as e:
        vm.create_guest_memfd(PAGE, 0)
    assert e.value.errno == errno.EINVAL  # kvm_arch_vm_ioctl() on riscv


def test_create_validation_order_and_sizes() -> None:
    vm = model_host().open_kvm().create_vm()
    for flags, size in [(1 << 3, PAGE), (1 << 63, PAGE), (0, 0), (0, PAGE - 1), (0, PAGE + 1),
                        (0, 1 << 63), (1 << 5, 1)]:
        with pytest.raises(KernelError) as e:
            vm.create_guest_memfd(size, flags)
        assert e.value.errno == errno.EINVAL, (flags, size)
    # NO_DIRECT_MAP needs neither MMAP nor INIT_SHARED; INIT_SHARED needs no MMAP.
    for flags in (NDM, NDM | SHARED, SHARED, NDM | MMAP):
        with vm.create_guest_memfd(2 * PAGE, flags) as f:
            assert f.fstat().st_size == 2 * PAGE


def test_flag_sets_address_space_bits() -> None:
    from gmemlab.model.mm.filemap import AS_INACCESSIBLE, AS_NO_DIRECT_MAP, AS_UNEVICTABLE

    vm = model_host().open_kvm().create_vm()
    for flags, ndm in ((MMAP, False), (MMAP | NDM, True)):
        with vm.create_guest_memfd(PAGE, flags) as f:
            mapping = f.file.inode.mapping
            assert mapping.test(AS_UNEVICTABLE) and mapping.test(AS_INACCESSIBLE)
            assert mapping.test(AS_NO_DIRECT_MAP) is ndm
            assert f.file.inode.private == flags
