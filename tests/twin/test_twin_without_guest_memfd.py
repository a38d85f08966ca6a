"""What the twin offers on a kernel without guest_memfd, and mm answers the model must share.

A kernel built without guest_memfd (``KVM_CAP_GUEST_MEMFD`` = 0, ours:
6.18.44-fc-v1300) still runs VMs on anonymous or memfd memory, memfd_secret and the
GUP paths; the twin offers all of that and lets the guest_memfd calls fail with the
kernel's errno.  The mm cases below run on both backends: the model (v12 and
mainline) and the running kernel through the twin (these need no /dev/kvm).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import partial

import pytest

from gmemlab import api, twin, uapi
from gmemlab.guest import GuestProgram
from tests.conftest import model_host

PAGE = 4096
GPA = 1 << 30

MM_BACKENDS: dict[str, Callable[[], api.Host]] = {
    "model-v12": lambda: model_host("v12", "x86_64"),
    "model-6.18": lambda: model_host("6.18", "x86_64-kvm_pvm-6.18"),
    "linux": twin.TwinHost,
}


@pytest.fixture(params=list(MM_BACKENDS))
def mm_host(request: pytest.FixtureRequest) -> api.Host:
    return MM_BACKENDS[request.param]()


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(api.KernelError) as e:
        fn()
    return e.value.errno or 0


def test_memfd_secret_flags_must_fit_unsigned_int(mm_host: api.Host) -> None:
    """memfd_secret(unsigned int flags): 1 << 70 must not reach the kernel as 0."""
    for flags in (1 << 70, 1 << 32, -1, 0xFFFF_FFFF):
        assert errno_of(partial(mm_host.memfd_secret, flags)) == errno.EINVAL
    mm_host.memfd_secret(0).close()


def test_mlock_of_secretmem_is_enomem(mm_host: api.Host) -> None:
    """mlock_fixup() skips the secretmem VMA; the populate's GUP gets EFAULT -> ENOMEM."""
    with mm_host.memfd_secret() as f:
        f.ftruncate(2 * PAGE)
        with f.mmap(2 * PAGE) as m:
            assert errno_of(m.mlock) == errno.ENOMEM
            m.fill(0, 2 * PAGE, 0x42)
            assert errno_of(m.mlock) == errno.ENOMEM
            assert m.read(0, 2 * PAGE) == b"\x42" * 2 * PAGE


def test_mlock_of_memfd_populates_and_past_eof_is_enomem(mm_host: api.Host) -> None:
    with mm_host.memfd_create() as f:
        f.ftruncate(PAGE)
        with f.mmap(PAGE) as m:
            m.mlock()
            assert m.read(0, PAGE) == bytes(PAGE)
        with f.mmap(2 * PAGE) as m:
            assert errno_of(m.mlock) == errno.ENOMEM  # the fault past EOF is SIGBUS


@pytest.mark.parametrize("shift", [46, 47, 50])
def test_anonymous_mmap_beyond_memory_is_enomem(mm_host: api.Host, shift: int) -> None:
    """2^46 and 2^50 bytes: more than RAM (overcommit heuristic); 2^47: more than TASK_SIZE."""
    assert errno_of(lambda: mm_host.mmap_anonymous(1 << shift)) == errno.ENOMEM
    with mm_host.mmap_anonymous(1 << 20) as m:  # and the address space is still usable
        m.fill(0, PAGE, 7)
        assert m.read(0, 1) == b"\x07"


# --- the twin on whatever /dev/kvm has ----------------------------------------------------------
@pytest.fixture
def kvm_host() -> twin.TwinHost:
    ok, reason = twin.available()
    if not ok:
        pytest.skip(reason)
    return twin.TwinHost()


def test_open_kvm_does_not_require_guest_memfd(kvm_host: twin.TwinHost) -> None:
    gmem, _ = twin.guest_memfd_available()
    with kvm_host.open_kvm() as kvm, kvm.create_vm() as vm:
        assert kvm.has_cap(uapi.KVM_CAP_GUEST_MEMFD) is gmem
        if not gmem:
            # kvm_vm_ioctl() has no KVM_CREATE_GUEST_MEMFD case: kvm_arch_vm_ioctl() says ENOTTY.
            assert errno_of(lambda: vm.create_guest_memfd(PAGE, 0)) == errno.ENOTTY
            assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 0


@pytest.mark.parametrize("kind", ["anonymous", "memfd"])
def test_guest_on_plain_memory(kvm_host: twin.TwinHost, kind: str) -> None:
    """A VM whose memory is anonymous or memfd (no guest_memfd): host and guest see each
    other's writes, and a memfd_secret mapping as a memslot is refused by GUP at KVM_RUN."""
    size = 4 * PAGE
    with kvm_host.open_kvm() as kvm, kvm.create_vm() as vm, kvm_host.memfd_create() as f:
        f.ftruncate(size)
        mem = kvm_host.mmap_anonymous(size) if kind == "anonymous" else f.mmap(size)
        with mem:
            mem.fill(0, size, 0x3C)
            vm.set_user_memory_region2(1, 0, GPA, size, mem.addr)
            with vm.create_vcpu(0) as vcpu:
                program = GuestProgram().check(GPA, size, 0x3C).fill(GPA, PAGE, 0xC3).report(GPA)
                result = api.run_program(vcpu, program)
                assert result.done and result.reports == [0xC3] and not result.check_failures
            assert mem.read(0, PAGE) == b"\xc3" * PAGE
            assert mem.read(PAGE, 1) == b"\x3c"


def test_guest_on_memfd_secret_fails_with_efault(kvm_host: twin.TwinHost) -> None:
    """realkernel N15: hva_to_pfn() GUPs the memfd_secret mapping, GUP refuses: EFAULT."""
    with kvm_host.open_kvm() as kvm, kvm.create_vm() as vm, kvm_host.memfd_secret() as f:
        f.ftruncate(PAGE)
        with f.mmap(PAGE) as mem:
            mem.fill(0, PAGE, 1)
            vm.set_user_memory_region2(1, 0, GPA, PAGE, mem.addr)
            with vm.create_vcpu(0) as vcpu:
                assert errno_of(lambda: api.run_program(vcpu, GuestProgram().report(GPA))) == errno.EFAULT


@pytest.mark.parametrize("kind", ["memfd", "secretmem"])
def test_kvm_clock_msr_succeeds_and_a_refused_refresh_is_silent(mm_host: api.Host, kind: str) -> None:
    """``kvm_write_system_time()`` drops ``kvm_gpc_activate()``'s result and
    ``kvm_setup_guest_pvclock()`` returns when ``kvm_gpc_refresh()`` fails.  On memfd_secret
    memory, which GUP refuses as it refuses NO_DIRECT_MAP guest_memfd, the MSR write
    succeeds, ``KVM_RUN`` runs, and the pvclock's data (pad, ``tsc_timestamp``,
    ``system_time``) are never written.  Seen on 6.18.44 kvm_pvm: its version and flags
    bytes do change there (0x11111111 -> 0x11111114, flags 0x11 -> 0x10), which mainline's
    code does not do; kvm_pvm's own, not modelled, and left out of the comparison."""
    if isinstance(mm_host, twin.TwinHost):
        ok, reason = twin.available()
        if not ok:
            pytest.skip(reason)
    with mm_host.open_kvm() as kvm, kvm.create_vm() as vm:
        f = mm_host.memfd_secret() if kind == "secretmem" else mm_host.memfd_create()
        with f:
            f.ftruncate(PAGE)
            with f.mmap(PAGE) as mem:
                mem.fill(0, PAGE, 0x11)
                vm.set_user_memory_region2(1, 0, GPA, PAGE, mem.addr)
                with vm.create_vcpu(0) as vcpu:
                    vcpu.kvm_clock(GPA + 64)
                    assert api.run_program(vcpu, GuestProgram().out(0x10, 1)).done
                    pvclock = mem.read(64, 32)
    version = int.from_bytes(pvclock[:4], "little")
    if kind == "secretmem":
        assert pvclock[4:24] == b"\x11" * 20
    else:
        assert pvclock[4:8] == bytes(4) and version % 2 == 0 and version > 0x11111111
