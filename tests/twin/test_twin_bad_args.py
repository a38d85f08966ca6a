"""Bad mm arguments on the real kernel and on the model: the same errno (issue 12).

The mm calls need no /dev/kvm (memfd, anonymous memory, memfd_secret), so they run on
any Linux host; the KVM ones below need /dev/kvm but not guest_memfd.  The guest_memfd
ones are in ``tests/model/test_bad_arguments.py``.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

import pytest

from gmemlab import api, guest, uapi
from gmemlab.uapi import PAGE_SIZE
from tests.conftest import model_host

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the twin needs Linux")

Call = Callable[[api.Host], object]


def memfd_mmap(length: int, offset: int) -> Call:
    def call(h: api.Host) -> object:
        with h.memfd_create() as f:
            return f.mmap(length, offset)
    return call


CASES: dict[str, tuple[Call, int]] = {
    "mmap anonymous len 0": (lambda h: h.mmap_anonymous(0), errno.EINVAL),
    "mmap anonymous 2^50": (lambda h: h.mmap_anonymous(1 << 50), errno.ENOMEM),
    "mmap anonymous 2^64-1": (lambda h: h.mmap_anonymous((1 << 64) - 1), errno.ENOMEM),
    "mmap anonymous 2^70 (size_t: 0)": (lambda h: h.mmap_anonymous(1 << 70), errno.EINVAL),
    "mmap memfd offset -4096": (memfd_mmap(PAGE_SIZE, -PAGE_SIZE), errno.EOVERFLOW),
    "mmap memfd offset 2^63": (memfd_mmap(PAGE_SIZE, 1 << 63), errno.EOVERFLOW),
    "mmap memfd offset unaligned": (memfd_mmap(PAGE_SIZE, 1), errno.EINVAL),
    "mmap memfd pgoff wraps": (memfd_mmap(2 * PAGE_SIZE, (1 << 64) - PAGE_SIZE), errno.EOVERFLOW),
}


def twin_host() -> api.Host:
    from gmemlab import twin

    return twin.TwinHost()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_mm_argument_same_errno_on_both(case: str) -> None:
    call, err = CASES[case]
    for host in (twin_host(), model_host("base", "x86_64-kvm_pvm-6.18")):
        with pytest.raises(api.KernelError) as e:
            call(host)
        assert e.value.errno == err, f"{host.name}: {e.value}"


def test_memfd_secret_flags_outside_unsigned_int_are_einval_on_both() -> None:
    """``memfd_secret(unsigned int flags)``: a value no C caller can pass is refused as
    any bit outside O_CLOEXEC is (the twin's choice, and the model's)."""
    for host in (twin_host(), model_host("base", "x86_64-kvm_pvm-6.18")):
        for flags in (1 << 32, 1 << 70, -1):
            with pytest.raises(api.KernelError) as bad:
                host.memfd_secret(flags)
            assert bad.value.errno == errno.EINVAL, f"{host.name}: {bad.value}"


# --- KVM without guest_memfd: the real kernel here runs these (tests/twin/conftest `host`) ----
GPA = 4 << 30


def kvm_hosts(host: api.Host) -> list[api.Host]:
    """The real kernel (the twin's ``host`` fixture) and the model of it."""
    return [host, model_host("base", "x86_64-kvm_pvm-6.18")]


def test_guest_write_to_readonly_slot_is_mmio_on_both(host: api.Host) -> None:
    """KVM_MEM_READONLY: a guest store exits as KVM_EXIT_MMIO (is_write), memory unchanged."""
    for h in kvm_hosts(host):
        with h.open_kvm() as kvm, kvm.create_vm() as vm, h.mmap_anonymous(2 * PAGE_SIZE) as mem:
            mem.fill(0, 2 * PAGE_SIZE, 0x5A)
            vm.set_user_memory_region2(1, uapi.KVM_MEM_READONLY, GPA, 2 * PAGE_SIZE, mem.addr)
            with vm.create_vcpu(0) as vcpu:
                program = guest.GuestProgram().check(GPA, PAGE_SIZE, 0x5A).fill(GPA + 8, 1, 0xEE)
                r = api.run_program(vcpu, program)
                assert not r.check_failures, h.name
                assert r.last_exit == api.MmioWrite(GPA + 8, b"\xee"), f"{h.name}: {r.last_exit}"
            assert mem.read(0, 2 * PAGE_SIZE) == b"\x5a" * (2 * PAGE_SIZE), h.name
            vm.set_user_memory_region2(1, 0, GPA, 0, 0)


@pytest.mark.parametrize(("gpa", "size", "uaddr"), [
    (GPA, -PAGE_SIZE, 0),                  # __u64 size: access_ok() fails
    (-PAGE_SIZE, 2 * PAGE_SIZE, 0),        # gpa + size wraps
    (GPA, PAGE_SIZE, -PAGE_SIZE),          # userspace_addr past TASK_SIZE_MAX
    (GPA, PAGE_SIZE + 1, 0),               # size not page aligned
    (GPA + 1, PAGE_SIZE, 0),               # gpa not page aligned
])
def test_bad_memslot_is_einval_on_both(host: api.Host, gpa: int, size: int, uaddr: int) -> None:
    for h in kvm_hosts(host):
        with h.open_kvm() as kvm, kvm.create_vm() as vm:
            with pytest.raises(api.KernelError) as e:
                vm.set_user_memory_region2(1, 0, gpa, size, uaddr)
            assert e.value.errno == errno.EINVAL, f"{h.name}: {e.value}"


def closed_calls(h: api.Host) -> list[Callable[[], object]]:
    """Calls on a vCPU, a VM and /dev/kvm that were all closed."""
    kvm = h.open_kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vm.close()
    kvm.close()
    return [vcpu.run, lambda: vcpu.load_program(guest.GuestProgram()),
            lambda: vm.create_vcpu(1), lambda: vm.check_extension(1),
            lambda: vm.set_user_memory_region2(1, 0, GPA, PAGE_SIZE, 0),
            lambda: vm.create_guest_memfd(PAGE_SIZE), kvm.create_vm]


def test_calls_on_closed_vm_and_vcpu_are_ebadf_on_both(host: api.Host) -> None:
    for h in kvm_hosts(host):
        for call in closed_calls(h):
            with pytest.raises(api.KernelError) as e:
                call()
            assert e.value.errno == errno.EBADF, f"{h.name}: {e.value}"
