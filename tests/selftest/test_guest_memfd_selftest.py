"""``tools/testing/selftests/kvm/guest_memfd_test.c``, ported to the shared API.

Each C test becomes a function over one guest_memfd, run (like
``__test_guest_memfd()``) for flags 0, MMAP, MMAP|INIT_SHARED and, where the VM
offers it, each of those with NO_DIRECT_MAP (v12 14/16), on every backend.  The
assertions are the selftest's (anchors §B); where it only says "fails" the
errno the kernel gives is asserted too.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from gmemlab import api
from gmemlab.api import KernelError, SigBus, run_program
from gmemlab.guest import GuestProgram
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    gmem_flags_str,
)

PAGE = 4096
TOTAL = 4 * PAGE
MMAP, SHARED, NDM = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_NO_DIRECT_MAP
KEEP, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
FLAG_SETS = [0, MMAP, MMAP | SHARED, NDM, NDM | MMAP, NDM | MMAP | SHARED]


def expect_errno(e: int, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    with pytest.raises(KernelError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == e, f"expected {errno.errorcode[e]}, got {info.value}"


@pytest.fixture
def vm(host: api.Host) -> api.VmFd:
    kvm = host.open_kvm()
    if not kvm.check_extension(KVM_CAP_GUEST_MEMFD):
        pytest.skip("KVM_CAP_GUEST_MEMFD not offered")
    return kvm.create_vm()


def gmem(vm: api.VmFd, flags: int, size: int = TOTAL) -> api.GuestMemfd:
    offered = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    if flags & ~offered:
        pytest.skip(f"flags {gmem_flags_str(flags)} not offered (VM offers {gmem_flags_str(offered)})")
    return vm.create_guest_memfd(size, flags)


# --- per-VM tests ------------------------------------------------------------------------
def test_guest_memfd_flags(vm: api.VmFd) -> None:
    valid = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    for bit in range(64):
        flag = 1 << bit
        if valid & flag:
            vm.create_guest_memfd(PAGE, flag).close()
        else:
            expect_errno(errno.EINVAL, vm.create_guest_memfd, PAGE, flag)


@pytest.mark.parametrize("flags", FLAG_SETS, ids=gmem_flags_str)
def test_create_guest_memfd_invalid_sizes(vm: api.VmFd, flags: int) -> None:
    gmem(vm, flags, PAGE).close()  # skips unless offered
    for size in [0, *range(1, PAGE)]:
        expect_errno(errno.EINVAL, vm.create_guest_memfd, size, flags)


def test_create_guest_memfd_multiple(vm: api.VmFd) -> None:
    with vm.create_guest_memfd(PAGE, 0) as a:
        assert a.fstat().st_size == PAGE
        with vm.create_guest_memfd(2 * PAGE, 0) as b:
            assert b.fstat().st_size == 2 * PAGE
            assert a.fstat().st_size == PAGE
            assert a.fstat().st_ino != b.fstat().st_ino


# --- per-file tests -------------------------------------------------------------------------
@pytest.mark.parametrize("flags", FLAG_SETS, ids=gmem_flags_str)
def test_guest_memfd_battery(vm: api.VmFd, flags: int) -> None:
    """``__test_guest_memfd(vm, flags)``: the per-file tests, each on a fresh 4-page file."""
    tests = [file_read_write]
    if flags & MMAP:
        tests += [mmap_supported, fault_overflow] if flags & SHARED else [fault_private]
        tests += [mmap_cow]
    else:
        tests += [mmap_not_supported]
    tests += [file_size, fallocate, invalid_punch_hole]
    for test in tests:
        with gmem(vm, flags) as fd:
            test(fd)


def file_read_write(fd: api.GuestMemfd) -> None:
    """read/write fail (no ->read/->write: EINVAL); pread/pwrite fail (no FMODE_PREAD: ESPIPE)."""
    expect_errno(errno.EINVAL, fd.read, 64)
    expect_errno(errno.EINVAL, fd.write, bytes(64))
    expect_errno(errno.ESPIPE, fd.pread, 64, 0)
    expect_errno(errno.ESPIPE, fd.pwrite, bytes(64), 0)


def mmap_supported(fd: api.GuestMemfd) -> None:
    with fd.mmap(TOTAL) as mem:
        mem.fill(0, TOTAL, 0xAA)
        assert mem.read(0, TOTAL) == b"\xaa" * TOTAL
        fd.fallocate(PUNCH, 0, PAGE)
        assert mem.read(0, PAGE) == bytes(PAGE)  # refaulted as a fresh zeroed folio
        assert mem.read(PAGE, TOTAL - PAGE) == b"\xaa" * (TOTAL - PAGE)
        mem.fill(0, PAGE, 0xAA)
        assert mem.read(0, TOTAL) == b"\xaa" * TOTAL


def fault_sigbus(fd: api.GuestMemfd, accessible: int, map_size: int) -> None:
    """``test_fault_sigbus()``: memset over the mapping SIGBUSes past ``accessible``."""
    with fd.mmap(map_size) as mem:
        with pytest.raises(SigBus):
            mem.fill(0, map_size, 0xAA)
        with pytest.raises(SigBus):
            mem.read(accessible, 1)
        assert mem.read(0, accessible) == b"\xaa" * accessible


def fault_overflow(fd: api.GuestMemfd) -> None:
    fault_sigbus(fd, TOTAL, 4 * TOTAL)


def fault_private(fd: api.GuestMemfd) -> None:
    fault_sigbus(fd, 0, TOTAL)


def mmap_cow(fd: api.GuestMemfd) -> None:
    expect_errno(errno.EINVAL, fd.mmap, TOTAL, 0, shared=False)


def mmap_not_supported(fd: api.GuestMemfd) -> None:
    expect_errno(errno.ENODEV, fd.mmap, PAGE)
    expect_errno(errno.ENODEV, fd.mmap, TOTAL)


def file_size(fd: api.GuestMemfd) -> None:
    st = fd.fstat()
    assert st.st_size == TOTAL
    assert st.st_blksize == PAGE


def fallocate(fd: api.GuestMemfd) -> None:
    fd.fallocate(KEEP, 0, TOTAL)
    expect_errno(errno.EINVAL, fd.fallocate, PUNCH, PAGE - 1, PAGE)
    expect_errno(errno.EINVAL, fd.fallocate, KEEP, TOTAL, PAGE)
    expect_errno(errno.EINVAL, fd.fallocate, KEEP, TOTAL + PAGE, PAGE)
    fd.fallocate(PUNCH, TOTAL, PAGE)
    fd.fallocate(PUNCH, TOTAL + PAGE, PAGE)
    expect_errno(errno.EINVAL, fd.fallocate, PUNCH, PAGE, PAGE - 1)
    fd.fallocate(PUNCH, PAGE, PAGE)
    fd.fallocate(KEEP, PAGE, PAGE)


def invalid_punch_hole(fd: api.GuestMemfd) -> None:
    for offset, length in [(0, 1), (0, PAGE - 1), (0, PAGE + 1), (1, 1), (1, PAGE - 1), (1, PAGE),
                           (1, PAGE + 1), (PAGE, 1), (PAGE, PAGE - 1), (PAGE, PAGE + 1)]:
        expect_errno(errno.EINVAL, fd.fallocate, PUNCH, offset, length)


# --- test_guest_memfd_guest -----------------------------------------------------------------------
def test_guest_memfd_guest(host: api.Host) -> None:
    """Host writes 0xaa, the guest checks it and writes 0xff, the host sees 0xff.

    With v12 the default VM must also offer NO_DIRECT_MAP, and the file uses it.
    """
    gpa, slot = 1 << 32, 1
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        offered = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
        assert offered & (MMAP | SHARED) == MMAP | SHARED
        flags = MMAP | SHARED | (offered & NDM)
        with vm.create_guest_memfd(PAGE, flags) as fd:
            vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, gpa, PAGE, 0, fd, 0)
            with fd.mmap(PAGE) as mem:
                mem.fill(0, PAGE, 0xAA)
            with vm.create_vcpu(0) as vcpu:
                result = run_program(vcpu, GuestProgram().check(gpa, PAGE, 0xAA).fill(gpa, PAGE, 0xFF))
                assert result.ok, result
            with fd.mmap(PAGE) as mem:
                assert mem.read(0, PAGE) == b"\xff" * PAGE
