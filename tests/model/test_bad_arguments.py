"""Bad arguments get the kernel's errno, from the layer the kernel checks them in, and
leave nothing behind (issue 12).

Each case names the kernel check it models; after every refused call the machine
must look as it did before (frames, VMAs, fds, VMs) and ``check_all()`` must hold.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from gmemlab.api import KernelError, MmioWrite, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.host import Host
from gmemlab.model.mm.memmap import FRAME_ALLOCATED
from gmemlab.model.mm.memory import MMAP_BASE, TASK_SIZE
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_READONLY,
    PAGE_SIZE,
)
from tests.conftest import model_host

NDM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GPA = 1 << 32
SIZE = 16 * PAGE_SIZE
LLONG_MAX = (1 << 63) - 1


def allocated(h: Host) -> int:
    return int((h.machine.mem.views().state == FRAME_ALLOCATED).sum())


def snapshot(h: Host) -> tuple[object, ...]:
    m = h.machine
    return (allocated(h), int(m.mem.views().refcount.sum()), len(h.proc.mm.vmas),
            sorted(h.proc.fds.files), sorted(m.kvms), m.dmap.meminfo())


def refused(h: Host, err: int, call: Callable[[], object]) -> None:
    """``call`` fails with ``err`` and changes nothing."""
    before = snapshot(h)
    with pytest.raises(KernelError) as e:
        call()
    assert e.value.errno == err, f"{e.value} instead of {errno.errorcode[err]}"
    assert snapshot(h) == before
    h.machine.inv.check_all()


@pytest.fixture
def h() -> Host:
    return model_host("v12")


@pytest.mark.parametrize(("mode", "offset", "length", "err"), [
    (FALLOC_FL_KEEP_SIZE, -2 * PAGE_SIZE, 2 * PAGE_SIZE, errno.EINVAL),   # offset < 0
    (FALLOC_FL_KEEP_SIZE, 0, 0, errno.EINVAL),                            # len <= 0
    (FALLOC_FL_KEEP_SIZE, 0, -PAGE_SIZE, errno.EINVAL),
    (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, -PAGE_SIZE, PAGE_SIZE, errno.EINVAL),
    (FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE, errno.EOPNOTSUPP),               # vfs: hole needs KEEP_SIZE
    (0x1000, 0, PAGE_SIZE, errno.EOPNOTSUPP),                              # unknown mode bit
    (FALLOC_FL_KEEP_SIZE, 1 << 62, 1 << 62, errno.EFBIG),                 # offset + len wraps
    (FALLOC_FL_KEEP_SIZE, LLONG_MAX - PAGE_SIZE + 1, PAGE_SIZE, errno.EFBIG),
    (FALLOC_FL_KEEP_SIZE, 0, 1 << 64, errno.EINVAL),                      # loff_t: 2^64 is 0
    (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE, errno.EOPNOTSUPP),  # guest_memfd's
    (FALLOC_FL_KEEP_SIZE, 0, SIZE + PAGE_SIZE, errno.EINVAL),             # past i_size
])
def test_fallocate_checks_in_vfs_order(h: Host, mode: int, offset: int, length: int,
                                       err: int) -> None:
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(SIZE, NDM)
    refused(h, err, lambda: g.fallocate(mode, offset, length))


def test_fallocate_on_a_file_not_open_for_writing_is_ebadf(h: Host) -> None:
    """vfs_fallocate: EBADF without FMODE_WRITE, checked after the mode, before the range."""
    from gmemlab.model.fs import FMODE_WRITE

    g = h.open_kvm().create_vm().create_guest_memfd(SIZE, NDM)
    g.file.f_mode &= ~FMODE_WRITE
    refused(h, errno.EBADF, lambda: g.fallocate(FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE))
    refused(h, errno.EINVAL, lambda: g.fallocate(FALLOC_FL_KEEP_SIZE, -PAGE_SIZE, PAGE_SIZE))
    refused(h, errno.EOPNOTSUPP, lambda: g.fallocate(FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE))


def test_negative_fallocate_leaves_no_frame_behind(h: Host) -> None:
    """The issue's case: fallocate(KEEP_SIZE, -8192, 8192) allocated indices -2 and -1."""
    m = h.machine
    before = allocated(h)
    g = h.open_kvm().create_vm().create_guest_memfd(SIZE, NDM)
    with pytest.raises(KernelError):
        g.fallocate(FALLOC_FL_KEEP_SIZE, -8192, 8192)
    g.close()
    assert allocated(h) == before
    m.inv.check_all()


@pytest.mark.parametrize(("length", "offset", "err"), [
    (0, 0, errno.EINVAL),                       # do_mmap: !len
    (PAGE_SIZE, 100, errno.EINVAL),             # sys_mmap: off & ~PAGE_MASK
    (PAGE_SIZE, -PAGE_SIZE, errno.EOVERFLOW),   # file_mmap_ok(): pgoff past MAX_LFS_FILESIZE
    (PAGE_SIZE, 1 << 63, errno.EOVERFLOW),
    (2 * PAGE_SIZE, (1 << 64) - PAGE_SIZE, errno.EOVERFLOW),  # pgoff + pages wraps
    (1 << 50, 0, errno.ENOMEM),                 # get_unmapped_area: len > TASK_SIZE
    (TASK_SIZE, 0, errno.ENOMEM),               # fits TASK_SIZE, but no gap that large
    ((1 << 64) - 1, 0, errno.ENOMEM),           # PAGE_ALIGN wraps to 0
    (1 << 70, 0, errno.EINVAL),                 # size_t: 2^70 is 0
])
def test_mmap_checks_as_do_mmap(h: Host, length: int, offset: int, err: int) -> None:
    g = h.open_kvm().create_vm().create_guest_memfd(SIZE, NDM)
    refused(h, err, lambda: g.mmap(length, offset))


def test_anonymous_mmap_that_cannot_fit_is_enomem(h: Host) -> None:
    refused(h, errno.ENOMEM, lambda: h.mmap_anonymous(1 << 47))


def test_munmapped_address_space_is_reused_top_down(h: Host) -> None:
    """get_unmapped_area() searches down from mmap_base: 1,100 map/unmap cycles of 1 GiB
    reuse the same range, and every mapping stays below TASK_SIZE.  (Shared mappings of a
    memfd: no overcommit charge, so the machine's RAM does not limit their size.)"""
    memfd = h.memfd_create()
    first = memfd.mmap(1 << 30)
    assert first.addr == MMAP_BASE - (1 << 30)
    first.munmap()
    for _ in range(1100):
        a = memfd.mmap(1 << 30)
        assert a.addr == first.addr
        a.munmap()
    keep = [memfd.mmap(1 << 30) for _ in range(3)]
    assert [k.addr for k in keep] == [MMAP_BASE - (i << 30) for i in (1, 2, 3)]
    keep[1].munmap()
    small = h.mmap_anonymous(PAGE_SIZE)  # the highest gap that fits: the hole keep[1] left
    assert small.addr == keep[0].addr - PAGE_SIZE
    assert all(k.addr + k.length <= TASK_SIZE for k in keep)


def test_address_space_exhaustion_falls_back_bottom_up_then_enomem(h: Host) -> None:
    memfd = h.memfd_create()
    huge = memfd.mmap(MMAP_BASE - (1 << 40))
    assert huge.addr == 1 << 40
    low = memfd.mmap((1 << 40) - PAGE_SIZE)  # [PAGE_SIZE, mmap_base) is now full
    assert low.addr == PAGE_SIZE
    top = memfd.mmap(64 << 20)  # fits only above mmap_base: the bottom-up fallback
    assert top.addr == MMAP_BASE and top.addr + top.length <= TASK_SIZE
    refused(h, errno.ENOMEM, lambda: memfd.mmap(65 << 20))


def test_private_writable_mapping_is_charged_against_ram(h: Host) -> None:
    """__vm_enough_memory() (OVERCOMMIT_GUESS): a private writable mapping larger than RAM
    (plus swap: none) is ENOMEM; a shared one of the same size is not charged."""
    ram = sum(hi - lo for lo, hi in h.machine.ram) * PAGE_SIZE
    h.mmap_anonymous(ram).munmap()
    refused(h, errno.ENOMEM, lambda: h.mmap_anonymous(ram + PAGE_SIZE))
    h.memfd_create().mmap(ram + PAGE_SIZE).munmap()


def test_guest_memfd_size_is_the_u64_the_kernel_reads(h: Host) -> None:
    vm = h.open_kvm().create_vm()
    refused(h, errno.EINVAL, lambda: vm.create_guest_memfd(1 << 70))       # u64: 0
    refused(h, errno.EINVAL, lambda: vm.create_guest_memfd(-PAGE_SIZE))    # loff_t: < 0
    refused(h, errno.EINVAL, lambda: vm.create_guest_memfd(PAGE_SIZE, 1 << 64 | 1 << 63))
    g = vm.create_guest_memfd((1 << 70) + PAGE_SIZE)  # what the kernel sees: one page
    assert g.size == PAGE_SIZE and g.fstat().st_size == PAGE_SIZE


@pytest.mark.parametrize(("slot", "flags", "gpa", "size", "uaddr", "offset"), [
    (1, 0, GPA, -PAGE_SIZE, 0, 0),              # u64 size: access_ok() fails
    (1, 0, -PAGE_SIZE, PAGE_SIZE, 0, 0),        # gpa + size wraps
    (1, 0, GPA, PAGE_SIZE, -PAGE_SIZE, 0),      # userspace_addr above TASK_SIZE_MAX
    (1, 0, GPA, 1 << 64, 0, 0),                 # u64 size 0: delete of a slot that is absent
    (1 << 32 | 1, 0, GPA, PAGE_SIZE, 0, 0),     # u32 slot 1 ... but accepted: see below
])
def test_memslot_fields_are_their_c_types(h: Host, slot: int, flags: int, gpa: int, size: int,
                                          uaddr: int, offset: int) -> None:
    vm = h.open_kvm().create_vm()
    mem = h.mmap_anonymous(PAGE_SIZE)
    if slot >> 32:  # the __u32 slot field keeps the low 32 bits: slot 1
        vm.set_user_memory_region2(slot, flags, gpa, size, mem.addr)
        assert 1 in vm.kvm.memslots
        return
    refused(h, errno.EINVAL, lambda: vm.set_user_memory_region2(slot, flags, gpa, size, uaddr, None,
                                                                offset))


def test_gmem_memslot_with_negative_offset_is_einval(h: Host) -> None:
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(SIZE, NDM)
    refused(h, errno.EINVAL, lambda: vm.set_user_memory_region2(
        1, KVM_MEM_GUEST_MEMFD, GPA, PAGE_SIZE, 0, g, -PAGE_SIZE))


def test_memory_attributes_are_u64() -> None:
    """x86 with private memory: address + size wrapping past 2^64 is EINVAL, and an
    attribute beyond 2^64 is its low 64 bits."""
    from gmemlab.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM

    h = model_host("v12")
    vm = h.open_kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    refused(h, errno.EINVAL, lambda: vm.set_memory_attributes(-PAGE_SIZE, 2 * PAGE_SIZE, 0))
    refused(h, errno.EINVAL, lambda: vm.set_memory_attributes(GPA, PAGE_SIZE, 1 << 64 | 1))
    vm.set_memory_attributes(GPA, PAGE_SIZE, 1 << 64 | KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.kvm.mem_is_private(GPA >> 12)


def test_guest_write_to_a_readonly_slot_is_mmio_and_changes_nothing(h: Host) -> None:
    vm = h.open_kvm().create_vm()
    mem = h.mmap_anonymous(2 * PAGE_SIZE)
    mem.fill(0, 2 * PAGE_SIZE, 0x5A)
    vm.set_user_memory_region2(1, KVM_MEM_READONLY, GPA, 2 * PAGE_SIZE, mem.addr)
    vcpu = vm.create_vcpu(0)
    r = run_program(vcpu, GuestProgram().check(GPA, PAGE_SIZE, 0x5A).fill(GPA, 4, 0xEE))
    assert r.last_exit == MmioWrite(GPA, b"\xee")
    assert vcpu.stats()["mmio_exits"] == 1
    r = run_program(vcpu, GuestProgram().touch(GPA + PAGE_SIZE, PAGE_SIZE, write=True, value=7))
    assert r.last_exit == MmioWrite(GPA + PAGE_SIZE, b"\x07")
    vcpu.kvm_clock(GPA)  # the WRMSR succeeds; the pfncache wants a writable hva and gives up
    assert vcpu.vcpu.pv_time.refresh_err == -errno.EFAULT
    assert mem.read(0, 2 * PAGE_SIZE) == b"\x5a" * (2 * PAGE_SIZE)
    assert vm.read_guest(GPA, 8) == b"\x5a" * 8


@pytest.mark.parametrize("offset", [PAGE_SIZE - 32, PAGE_SIZE - 31, PAGE_SIZE - 1])
def test_kvm_clock_never_writes_past_its_page(h: Host, offset: int) -> None:
    """A pvclock that fits is written (version 2 on a zeroed page); one that would cross
    its page is refused by ``__kvm_gpc_activate()`` with the cache left as it was, so
    the pvclock enabled before keeps being updated where it was (seen on the real
    kernel too: tests/twin/test_twin_without_guest_memfd.py)."""
    vm = h.open_kvm().create_vm()
    mem = h.mmap_anonymous(2 * PAGE_SIZE)
    mem.fill(0, 2 * PAGE_SIZE, 0xAB)
    mem.fill(0, 32, 0)
    vm.set_user_memory_region2(1, 0, GPA, 2 * PAGE_SIZE, mem.addr)
    vcpu = vm.create_vcpu(0)
    vcpu.kvm_clock(GPA)
    assert mem.read(0, 32) == (2).to_bytes(4, "little") + bytes(28)
    vcpu.kvm_clock(GPA + offset)  # succeeds either way, as the WRMSR does
    if offset + 32 <= PAGE_SIZE:
        assert vcpu.vcpu.pv_time.refresh_err == 0
        assert mem.read(offset, 32) == (0xABABABAE).to_bytes(4, "little") + bytes(28)
        assert mem.read(0, 4) == (2).to_bytes(4, "little")
    else:
        assert vcpu.vcpu.pv_time.refresh_err == -errno.EINVAL
        assert mem.read(offset, PAGE_SIZE - offset) == b"\xab" * (PAGE_SIZE - offset)
        assert mem.read(0, 4) == (4).to_bytes(4, "little")  # the old pvclock, updated again
    assert mem.read(PAGE_SIZE, PAGE_SIZE) == b"\xab" * PAGE_SIZE


def test_every_call_on_a_closed_object_is_ebadf_and_does_nothing(h: Host) -> None:
    from gmemlab.guest import GuestProgram as P

    kvm = h.open_kvm()
    vm = kvm.create_vm()
    g = vm.create_guest_memfd(SIZE, NDM)
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(P().touch(GPA, PAGE_SIZE))
    for obj in (vcpu, g, vm, kvm):
        obj.close()
    assert h.machine.kvms == {}  # the last reference went: destroyed, and released
    destroyed = h.machine.trace.counts["vm_destroy"]
    calls: list[Callable[[], object]] = [
        vcpu.run, lambda: vcpu.load_program(P()), vcpu.stats, lambda: vcpu.kvm_clock(GPA),
        lambda: vm.create_guest_memfd(SIZE, NDM), lambda: vm.create_vcpu(1),
        lambda: vm.set_user_memory_region2(1, 0, GPA, PAGE_SIZE, 0),
        lambda: vm.set_memory_attributes(GPA, PAGE_SIZE, 0), lambda: vm.check_extension(1),
        lambda: g.fallocate(FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE), lambda: g.mmap(PAGE_SIZE),
        g.fstat, lambda: g.ftruncate(0), lambda: g.lseek(0, 0), kvm.create_vm,
        kvm.get_api_version,
    ]
    for call in calls:
        refused(h, errno.EBADF, call)
    assert h.machine.trace.counts["vm_destroy"] == destroyed == 1


def test_check_all_catches_the_fallocate_leak_when_vfs_checks_are_gone(
        h: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reintroduce the bug (fallocate straight to ->fallocate, no vfs_fallocate checks):
    the folios at indices -2 and -1 outlive the inode, and check_all() names them."""
    from gmemlab.model import InvariantViolation
    from gmemlab.model import host as host_module
    from gmemlab.model.fs import File
    from gmemlab.model.task import KGen

    def no_vfs_checks(m: object, file: File, mode: int, offset: int, length: int) -> KGen[int]:
        return (yield from file.f_op.fallocate(m, file, mode, offset, length))  # type: ignore[arg-type]

    monkeypatch.setattr(host_module, "vfs_fallocate", no_vfs_checks)
    g = h.open_kvm().create_vm().create_guest_memfd(SIZE, NDM)
    g.fallocate(FALLOC_FL_KEEP_SIZE, -8192, 8192)  # the bug: accepted
    g.close()
    with pytest.raises(InvariantViolation) as e:
        h.machine.inv.check_all()
    assert e.value.name == "frame-has-owner"
    assert "leaked" in str(e.value)


def test_check_all_holds_on_every_owner_kind() -> None:
    """Anonymous memory, secretmem, memfd, guest_memfd, kernel allocations and direct-map
    page tables are all owned: the leak sweep reports nothing on a healthy machine."""
    h = model_host("v12")
    anon = h.mmap_anonymous(4 * PAGE_SIZE)
    anon.fill(0, 4 * PAGE_SIZE, 1)
    for f in (h.memfd_secret(), h.memfd_create()):
        f.ftruncate(4 * PAGE_SIZE)
        f.mmap(4 * PAGE_SIZE).fill(0, 4 * PAGE_SIZE, 2)
    g = h.open_kvm().create_vm().create_guest_memfd(SIZE, NDM)
    g.mmap(SIZE).fill(0, SIZE, 3)
    h.kernel_alloc()
    h.machine.inv.check_all()
    assert h.machine.inv.counts["frame-has-owner"] == 0


def test_memory_attributes_over_a_huge_range() -> None:
    """Clearing attributes of a huge empty range is a no-op (the kernel's "nothing to do"
    check); otherwise a range whose xarray nodes cannot fit is -ENOMEM at xa_reserve(),
    and changes nothing."""
    from gmemlab.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM

    h = model_host("v12")
    vm = h.open_kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    vm.set_memory_attributes(0, 1 << 62, 0)
    refused(h, errno.ENOMEM,
            lambda: vm.set_memory_attributes(0, 1 << 62, KVM_MEMORY_ATTRIBUTE_PRIVATE))
    assert not vm.kvm.attributes
    vm.set_memory_attributes(GPA, 4 * PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    # Not all clear now: the kernel reserves every index of the range first, and fails.
    refused(h, errno.ENOMEM, lambda: vm.set_memory_attributes(0, 1 << 62, 0))
    assert len(vm.kvm.attributes) == 4
    vm.set_memory_attributes(GPA, 4 * PAGE_SIZE, 0)
    assert not vm.kvm.attributes
