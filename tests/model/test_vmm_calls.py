"""The calls a VMM makes around guest memory, on the model (issue 12 item 3).

What the conformance cases cannot see from outside: the VMAs a split leaves (their
PTEs, file references and ``i_mmap``), that a refused call changes nothing, that KVM is
told when protections drop, that nothing leaks when the files and mappings go, and the
guest_memfd flag's effect under v12 (GUP refuses the mapping, so population does too).
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import KernelError, SigSegv, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.host import Host, Mapping
from gmemlab.model.mm.memory import Vma
from gmemlab.uapi import (
    F_DUPFD,
    F_GETFD,
    F_GETFL,
    F_SETFL,
    FIOCLEX,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    O_APPEND,
    O_LARGEFILE,
    O_NONBLOCK,
    O_RDWR,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_RW,
)
from tests.conftest import model_host
from tests.model.test_bad_arguments import allocated, refused

P = PAGE_SIZE
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
NDM = SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GPA = 1 << 32


@pytest.fixture
def h() -> Host:
    return model_host()


def vmas(h: Host, m: Mapping) -> list[Vma]:
    return sorted((v for v in h.proc.mm.vmas if v.start < m.addr + m.length and v.end > m.addr),
                  key=lambda v: v.start)


def test_mprotect_splits_and_each_part_keeps_its_ptes_and_file_reference(h: Host) -> None:
    f = h.memfd_create()
    f.ftruncate(4 * P)
    m = f.mmap(4 * P)
    m.fill(0, 4 * P, 0x22)
    file = f.file
    refs = file.f_count
    m.mprotect(PROT_READ, P, 2 * P)
    parts = vmas(h, m)
    assert [(v.start - m.addr, v.end - m.addr, v.pgoff) for v in parts] == [
        (0, P, 0), (P, 3 * P, 1), (3 * P, 4 * P, 3)]
    assert [len(v.ptes) for v in parts] == [1, 2, 1]
    assert file.f_count == refs + 2  # each new VMA holds the file
    assert all(v in file.inode.mapping.i_mmap for v in parts)
    with pytest.raises(SigSegv) as e:
        m.write(2 * P, b"x")
    assert e.value.addr == m.addr + 2 * P
    assert m.read(0, 4 * P) == b"\x22" * (4 * P)
    m.munmap()
    assert file.f_count == refs - 1 and not file.inode.mapping.i_mmap
    f.close()
    assert file.inode.evicted
    h.machine.inv.check_all()


def test_mprotect_refusals_change_nothing(h: Host) -> None:
    m = h.mmap_anonymous(2 * P)
    m.fill(0, 2 * P, 1)
    refused(h, errno.EINVAL, lambda: m.mprotect(PROT_READ, 1, P))  # unaligned start
    refused(h, errno.EINVAL, lambda: m.mprotect(0x10))  # not a PROT bit
    s = h.memfd_secret()
    s.ftruncate(P)
    sm = s.mmap(P)
    refused(h, errno.EACCES, lambda: sm.mprotect(PROT_READ | 0x4))  # noexec: VM_MAYEXEC clear
    assert [v.flags & 0x7 for v in vmas(h, m)] == [0x3]


def test_mprotect_tells_kvm_so_a_guest_refaults(h: Host) -> None:
    """change_protection()'s mmu notifier zaps KVM's stage-2 mapping of the range: a guest
    store after mprotect(PROT_READ) faults again, GUP (fast path: the PTE is read-only now)
    refuses the write, and KVM_RUN fails with EFAULT; the page is unchanged."""
    vm = h.open_kvm().create_vm()
    mem = h.mmap_anonymous(P)
    vm.set_user_memory_region2(1, 0, GPA, P, mem.addr)
    vcpu = vm.create_vcpu(0)
    assert run_program(vcpu, GuestProgram().fill(GPA, P, 7)).ok
    assert vm.kvm.spte.load(GPA >> 12) != -1
    mem.mprotect(PROT_READ)
    assert vm.kvm.spte.load(GPA >> 12) == -1
    with pytest.raises(KernelError) as e:
        run_program(vcpu, GuestProgram().fill(GPA, 1, 8))
    assert e.value.errno == errno.EFAULT
    assert run_program(vcpu, GuestProgram().report(GPA)).reports == [7]
    assert mem.read(0, 1) == b"\x07"


def test_madvise_dontneed_and_remove_on_guest_memfd(h: Host) -> None:
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(4 * P, NDM)
    m = g.mmap(4 * P)
    m.fill(0, 4 * P, 0xAA)
    pfn = g.pfn(0)
    m.madvise(MADV_DONTNEED, 0, P)
    assert m.pfn(0) == -1 and g.pfn(0) == pfn  # the PTE went, the folio stayed
    before = allocated(h)
    m.madvise(MADV_REMOVE, P, 2 * P)  # kvm_gmem_fallocate(PUNCH_HOLE)
    assert allocated(h) == before - 2 and g.pfn(P) == -1
    assert m.read(0, 4 * P) == b"\xaa" * P + bytes(2 * P) + b"\xaa" * P
    h.machine.inv.check_all()


@pytest.mark.parametrize(("design", "flags", "populate"), [
    ("v12", NDM, "EINVAL"), ("v12", SHARED, "ok"), ("base", SHARED, "ok"),
    ("v12", GUEST_MEMFD_FLAG_MMAP, "EFAULT"),
])
def test_populate_guest_memfd(design: str, flags: int, populate: str) -> None:
    """MADV_POPULATE_* go through GUP: v12 refuses NO_DIRECT_MAP mappings (EINVAL); without
    INIT_SHARED the fault's SIGBUS is EFAULT; MAP_POPULATE ignores both and maps nothing."""
    h = model_host(design)
    g = h.open_kvm().create_vm().create_guest_memfd(4 * P, flags)
    m = g.mmap(4 * P)
    for advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        if populate == "ok":
            m.madvise(advice)
        else:
            refused(h, getattr(errno, populate), lambda a=advice: m.madvise(a))
    p = g.mmap(4 * P, populate=True)
    assert h.maps(p)[0].rss_kb == (16 if populate == "ok" else 0)
    h.machine.inv.check_all()


def test_unmodelled_advice_is_not_guessed(h: Host) -> None:
    m = h.mmap_anonymous(P)
    with pytest.raises(NotImplementedError):
        m.madvise(3)  # MADV_WILLNEED: valid, not modelled
    refused(h, errno.EINVAL, lambda: m.madvise(7))  # no such advice


def test_map_fixed_replaces_a_range_and_a_failed_one_leaves_a_hole(h: Host) -> None:
    a = h.mmap_anonymous(4 * P)
    a.fill(0, 4 * P, 0x33)
    f = h.memfd_create()
    f.ftruncate(2 * P)
    inode = f.file.inode
    new = f.mmap(2 * P, fixed=a)
    assert new.addr == a.addr and len(vmas(h, a)) == 2
    assert a.read(0, 1) == b"\x00" and a.read(2 * P, 1) == b"\x33"
    s = h.memfd_secret()
    s.ftruncate(P)
    with pytest.raises(KernelError) as e:
        s.mmap(P, shared=False, fixed=a)  # secretmem_mmap(): EINVAL after the old PTEs went
    assert e.value.errno == errno.EINVAL
    assert [v.start - a.addr for v in vmas(h, a)] == [P, 2 * P]
    with pytest.raises(SigSegv):
        a.read(0, 1)
    a.munmap()  # the whole range: the rest of the memfd mapping and the anonymous pages
    assert not vmas(h, a) and not inode.mapping.i_mmap
    f.close()
    s.close()
    assert inode.evicted
    h.machine.inv.check_all()


def test_map_fixed_checks_come_before_the_old_mapping_goes(h: Host) -> None:
    a = h.mmap_anonymous(2 * P)
    a.fill(0, 2 * P, 1)
    f = h.memfd_create()
    refused(h, errno.EOVERFLOW, lambda: f.mmap(P, -P, fixed=a))
    g = h.open_kvm().create_vm().create_guest_memfd(P, SHARED)
    refused(h, errno.EPERM, lambda: g.mmap(P, prot=PROT_READ | 0x4, fixed=a))  # noexec
    assert a.read(0, 2 * P) == b"\x01" * (2 * P)


def test_dup_keeps_the_file_and_fcntl_flags_are_per_file(h: Host) -> None:
    g = h.open_kvm().create_vm().create_guest_memfd(P, SHARED)
    d = g.dup()
    assert d.fileno() != g.fileno() and d.fcntl(F_GETFD) == 0
    g.fcntl(F_SETFL, O_NONBLOCK | O_APPEND | 0o100)  # O_CREAT is ignored
    assert d.fcntl(F_GETFL) == O_RDWR | O_LARGEFILE | O_NONBLOCK | O_APPEND
    with pytest.raises(ValueError):
        g.fcntl(F_DUPFD, 0)  # an fd nobody would own: dup() instead
    inode = g.file.inode
    g.close()
    assert not inode.evicted
    m = d.mmap(P)
    m.fill(0, P, 9)
    d.close()
    assert not inode.evicted  # the mapping holds it
    m.munmap()
    assert inode.evicted
    h.machine.inv.check_all()


def test_reopen_of_a_memfd_shares_its_page_cache_and_leaks_nothing(h: Host) -> None:
    f = h.memfd_create()
    f.ftruncate(P)
    before = allocated(h)
    r = f.reopen()
    with r.mmap(P) as m:
        m.fill(0, P, 0x5E)
    with f.mmap(P) as m:
        assert m.read(0, 2) == b"\x5e\x5e"
    inode = f.file.inode
    f.close()
    r.close()
    assert inode.evicted and allocated(h) == before
    g = h.open_kvm().create_vm().create_guest_memfd(P, SHARED)
    refused(h, errno.ENXIO, g.reopen)


def test_sendfile_and_splice_move_memfd_bytes_and_refuse_guest_memfd(h: Host) -> None:
    f = h.memfd_create()
    f.ftruncate(2 * P)
    with f.mmap(2 * P) as m:
        m.fill(0, 2 * P, 0x22)
    out = h.memfd_create()
    assert h.sendfile(out, f, 3 * P) == 2 * P  # at f's position: it moves on
    assert h.sendfile(out, f, P) == 0
    assert h.splice_from_pipe(out, b"abc", 1) == 3
    assert h.splice_to_pipe(out, 5, 0) == b"\x22abc\x22"
    g = h.open_kvm().create_vm().create_guest_memfd(P, NDM)
    refused(h, errno.EINVAL, lambda: h.sendfile(out, g, P))
    refused(h, errno.ESPIPE, lambda: h.sendfile(out, g, P, 0))
    refused(h, errno.EINVAL, lambda: h.splice_to_pipe(g, P))
    refused(h, errno.EINVAL, lambda: h.splice_from_pipe(g, b"x"))


def test_kvm_files_answer_ioctls_they_do_not_know(h: Host) -> None:
    kvm = h.open_kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    assert {f.ioctl(FIOCLEX) for f in (kvm, vm, vcpu)} == {0}  # do_vfs_ioctl()
    for f, err in ((kvm, errno.EINVAL), (vm, errno.ENOTTY), (vcpu, errno.EINVAL)):
        refused(h, err, lambda f=f: f.ioctl(0xAEFF))
    with pytest.raises(NotImplementedError):
        vm.ioctl(0x541B)  # FIONREAD: a generic ioctl the model does not answer


def test_legacy_memslot_takes_no_guest_memfd_and_pads_are_ignored(h: Host) -> None:
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(P, SHARED, reserved=[7] * 6)
    mem = h.mmap_anonymous(P, prot=PROT_RW)
    refused(h, errno.EINVAL, lambda: vm.set_user_memory_region(1, KVM_MEM_GUEST_MEMFD, GPA, P, 0))
    vm.set_user_memory_region(1, 0, GPA, P, mem.addr)
    vm.set_user_memory_region2(2, KVM_MEM_GUEST_MEMFD, 2 * GPA, P, 0, g, 0, pad1=1, pad2=[2] * 14)
    with pytest.raises(ValueError):
        vm.set_user_memory_region2(3, 0, 3 * GPA, P, mem.addr, pad2=[0] * 15)
    assert sorted(vm.kvm.memslots) == [1, 2]


def test_prot_none_memory_is_neither_accessible_nor_populated(h: Host) -> None:
    m = h.mmap_anonymous(2 * P, prot=PROT_NONE, populate=True)
    assert h.maps(m)[0].rss_kb == 0 and h.maps(m)[0].perms == "---p"
    with pytest.raises(SigSegv):
        m.read(0, 1)
    refused(h, errno.EINVAL, lambda: m.madvise(MADV_POPULATE_READ))
    refused(h, errno.EFAULT, lambda: h.pipe_write_from(m, 0, P))  # copy_from_user
