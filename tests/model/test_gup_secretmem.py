"""GUP's refusal of AS_NO_DIRECT_MAP mappings, mlock, KVM's hva paths, and memfd_secret.

series-spec §4.1-4.2 (AS_NO_DIRECT_MAP and GUP), §4.4 (secretmem); realkernel.md §2
(the errnos each kernel path gives on memfd_secret).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from gmemlab.api import KernelError, SigBus, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.designs.fc618 import Firecracker618
from gmemlab.model.host import Host, Mapping
from gmemlab.model.mm.memory import VM_LOCKED
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    O_CLOEXEC,
)
from tests.conftest import model_host

PAGE = 4096
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
NDM = GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GPA = 1 << 32

PATHS: dict[str, Callable[[Host, Mapping], object]] = {
    "pipe_write_from": lambda h, m: h.pipe_write_from(m, 0, PAGE),
    "proc_mem_read": lambda h, m: h.proc_mem_read(m, 0, PAGE),
    "process_vm_readv": lambda h, m: h.process_vm_readv(m, 0, PAGE),
    "vmsplice": lambda h, m: h.vmsplice(m, 0, PAGE),
    "odirect_read_into": lambda h, m: h.odirect_read_into(m, 0, PAGE),
}
REFUSED = {"pipe_write_from": None, "proc_mem_read": errno.EIO, "process_vm_readv": errno.EFAULT,
           "vmsplice": errno.EFAULT, "odirect_read_into": errno.EFAULT}


def outcome(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except KernelError as e:
        return e.errno
    return None


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", ["guest_memfd", "guest_memfd+NDM", "memfd_secret"])
def test_kernel_access_paths(path: str, kind: str) -> None:
    h = model_host(invariants="stop")
    if kind == "memfd_secret":
        f = h.memfd_secret()
        f.ftruncate(PAGE)
    else:
        f = h.open_kvm().create_vm().create_guest_memfd(PAGE, SHARED | (NDM if "NDM" in kind else 0))
    mem = f.mmap(PAGE)
    mem.fill(0, PAGE, 0x11)
    refused = kind != "guest_memfd"
    assert outcome(lambda: PATHS[path](h, mem)) == (REFUSED[path] if refused else None)


def test_gup_never_returns_a_no_direct_map_folio_even_when_mapped() -> None:
    """GUP-fast sees the PTE but gup_fast_folio_allowed() refuses; slow GUP returns -EFAULT."""
    h = model_host()
    g = h.open_kvm().create_vm().create_guest_memfd(PAGE, SHARED | NDM)
    mem = g.mmap(PAGE)
    mem.fill(0, PAGE, 1)  # the PTE exists now
    with pytest.raises(KernelError):
        h.process_vm_readv(mem, 0, PAGE)
    assert h.machine.inv.verdicts()["gup-refuses-no-direct-map"] == 0
    assert any(e.event == "gup_refused" for e in h.machine.trace)


@pytest.mark.parametrize(("flags", "locked"), [(SHARED, True), (SHARED | NDM, False)])
def test_mlock_skips_no_direct_map_vmas(flags: int, locked: bool) -> None:
    """mlock_fixup() leaves the VMA unlocked; the populate's GUP is refused (EFAULT), which
    mlock() reports as ENOMEM, as it does for memfd_secret on the real kernel."""
    h = model_host()
    g = h.open_kvm().create_vm().create_guest_memfd(2 * PAGE, flags)
    mem = g.mmap(2 * PAGE)
    if locked:
        mem.mlock()
    else:
        with pytest.raises(KernelError) as e:
            mem.mlock()
        assert e.value.errno == errno.ENOMEM
    vma = h.proc.mm.find_vma(mem.addr)
    assert vma is not None and bool(vma.flags & VM_LOCKED) is locked
    assert (g.pfn(PAGE) >= 0) is locked  # mlock populates what it locks


def test_kvm_hva_path_cannot_use_a_no_direct_map_mapping() -> None:
    """A memslot without KVM_MEM_GUEST_MEMFD whose userspace_addr is a NO_DIRECT_MAP mmap:
    hva_to_pfn() GUPs and fails, KVM_RUN returns EFAULT (like memfd_secret, realkernel N15)."""
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(PAGE, SHARED | NDM)
    mem = g.mmap(PAGE)
    vm.set_user_memory_region2(2, 0, GPA, PAGE, mem.addr)
    vcpu = vm.create_vcpu(0)
    vcpu.load_program(GuestProgram().report(GPA))
    with pytest.raises(KernelError) as e:
        vcpu.run()
    assert e.value.errno == errno.EFAULT


def test_kvm_reads_through_userspace_addr_but_kvm_clock_fails_silently() -> None:
    """``kvm_setup_guest_pvclock()`` returns when ``kvm_gpc_refresh()`` fails: the WRMSR
    succeeds, GUP refuses the NO_DIRECT_MAP mapping and the guest reads a stale pvclock."""
    h = model_host()
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(2 * PAGE, SHARED | NDM)
    mem = g.mmap(2 * PAGE)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 2 * PAGE, mem.addr, g, 0)
    mem.fill(0, PAGE, 0x77)
    assert vm.read_guest(GPA, 4) == b"\x77" * 4  # copy_from_user: fine
    vcpu = vm.create_vcpu(0)
    vcpu.kvm_clock(GPA)  # pfncache: GUP refuses, nothing is written, nothing is said
    assert vcpu.vcpu.pv_time.refresh_err == -errno.EFAULT and not vcpu.vcpu.pv_time.valid
    assert run_program(vcpu, GuestProgram().report(GPA).report(GPA + 8)).reports == [0x77, 0x77]
    h2 = model_host()
    vm2 = h2.open_kvm().create_vm()
    g2 = vm2.create_guest_memfd(PAGE, SHARED)
    vm2.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, g2.mmap(PAGE).addr, g2, 0)
    vcpu2 = vm2.create_vcpu(0)
    vcpu2.kvm_clock(GPA)  # without the flag kvm-clock works: version 2 on the zeroed page
    assert run_program(vcpu2, GuestProgram().report(GPA)).reports == [2]


def test_firecracker_pfncache_writes_kvm_clock_through_a_vmap() -> None:
    """Firecracker's 0041/0042: ``kvm_gmem_get_pfn()`` then ``vmap()``; the alias lives
    until the cache unmaps it, a punch-hole only invalidates it (0046), and the VM's
    teardown (``kvm_gpc_deactivate()``) drops it."""
    h = model_host("fc-6.18", invariants="record")  # it prepares before the zap (0032)
    design = h.machine.design
    assert isinstance(design, Firecracker618)
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(2 * PAGE, SHARED | NDM)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 2 * PAGE, 0, g, 0)
    vcpu = vm.create_vcpu(0)
    assert run_program(vcpu, GuestProgram().fill(GPA, 2 * PAGE, 0x77)).ok
    vcpu.kvm_clock(GPA + PAGE + 64)
    pfn = g.pfn(PAGE)
    assert design.vmapped == {pfn: 1} and design.temporary_mapping_cpus(pfn) == [0, 1]
    assert not h.machine.dmap.present(pfn)  # the direct map stays zapped
    assert run_program(vcpu, GuestProgram().report(GPA + PAGE + 64).report(GPA + PAGE)).reports \
        == [0x7A, 0x77]  # version (0x77777777 + 1) | 1, + 1
    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, PAGE, PAGE)
    assert not vcpu.vcpu.pv_time.valid and design.vmapped == {pfn: 1}  # freed, still aliased
    vcpu.kvm_clock(GPA + PAGE + 64)  # the refresh finds a new folio and unmaps the old alias
    assert design.vmapped == {g.pfn(PAGE): 1}
    vcpu.close()
    vm.close()
    g.close()
    assert design.vmapped == {}


def test_firecracker_kernel_without_its_pfncache_patches_fails_silently_too() -> None:
    """``Firecracker618(pfncache_gmem=False)``: the port without ``11-kvm-clock``."""
    h = model_host(Firecracker618(pfncache_gmem=False), invariants="record")  # type: ignore[arg-type]
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(PAGE, SHARED | NDM)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGE, g.mmap(PAGE).addr, g, 0)
    vcpu = vm.create_vcpu(0)
    assert run_program(vcpu, GuestProgram().fill(GPA, PAGE, 0x77)).ok
    vcpu.kvm_clock(GPA)
    assert vcpu.vcpu.pv_time.refresh_err == -errno.EFAULT
    assert run_program(vcpu, GuestProgram().report(GPA)).reports == [0x77]


def test_memfd_secret_syscall() -> None:
    h = model_host()
    for flags, err in ((1, errno.EINVAL), (O_CLOEXEC | 4, errno.EINVAL)):
        with pytest.raises(KernelError) as e:
            h.memfd_secret(flags)
        assert e.value.errno == err
    f = h.memfd_secret(O_CLOEXEC)
    f.ftruncate(2 * PAGE)
    with pytest.raises(KernelError) as e:
        f.ftruncate(PAGE)  # the size is set once
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError) as e:
        f.mmap(PAGE, shared=False)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError) as e:
        model_host("v12", "arm64-rodata-off").memfd_secret()
    assert e.value.errno == errno.ENOSYS


@pytest.mark.parametrize("design", ["base", "v9", "v12", "filemap"])
def test_memfd_secret_removes_before_insertion_and_zeroes_after_restore(design: str) -> None:
    h = model_host(design)
    m = h.machine
    f = h.memfd_secret()
    f.ftruncate(2 * PAGE)
    mem = f.mmap(3 * PAGE)
    mem.fill(0, PAGE, 0x99)
    vma = h.proc.mm.find_vma(mem.addr)
    assert vma is not None and vma.flags & VM_LOCKED
    pfn = mem.pfn(0)
    assert not m.dmap.present(pfn) and not m.tlb.cached_anywhere(pfn)
    with pytest.raises(SigBus) as e:
        mem.read(2 * PAGE - 1, 2)  # the second byte is past i_size
    assert e.value.addr == mem.addr + 2 * PAGE
    mem.munmap()
    f.close()
    assert m.dmap.present(pfn) and m.mem.secret_bytes(pfn) == 0  # restored, then zeroed
    assert not m.mem.allocated(pfn)


@pytest.mark.parametrize(("design", "flushes"), [("base", 1), ("v12", 2)])
def test_secretmem_fault_flushes_on_arm64(design: str, flushes: int) -> None:
    """arm64: mainline's secretmem_fault() clears PTE_VALID with set_direct_map_invalid_noflush()
    (update_range_prot(), no flush) and flushes once itself; v12 03/16 goes through
    folio_zap_direct_map(), whose set_direct_map_valid_noflush() is set_memory_valid(), which
    flushes too.  The free restores with no TLBI at all."""
    h = model_host(design, "arm64")
    f = h.memfd_secret()
    f.ftruncate(PAGE)
    mem = f.mmap(PAGE)
    mem.fill(0, PAGE, 1)
    counts = h.machine.trace.counts
    assert counts["flush_tlb_kernel_range"] == flushes
    mem.munmap()
    f.close()
    assert counts["flush_tlb_kernel_range"] == flushes


def test_secretmem_flush_is_lost_with_the_noflush_patch() -> None:
    """Firecracker's 0039 drops the flush from folio_zap_direct_map(), which secretmem uses too."""
    h = model_host("noflush", invariants="record")
    f = h.memfd_secret()
    f.ftruncate(PAGE)
    f.mmap(PAGE).fill(0, PAGE, 1)
    assert h.machine.inv.verdicts()["handout-flushed"] == 1


def test_memfd_secret_says_enosys_before_it_looks_at_the_flags() -> None:
    """mm/secretmem.c: ``if (!secretmem_enable || !can_set_direct_map()) return -ENOSYS;`` comes
    before the flags check, so bad flags on a host without secretmem are ENOSYS, not EINVAL."""
    import errno

    from gmemlab.api import KernelError
    from gmemlab.model import Host

    for profile, want in (("arm64-rodata-off", errno.ENOSYS), ("x86_64", errno.EINVAL)):
        with pytest.raises(KernelError) as e:
            Host(profile=profile).memfd_secret(0x80)
        assert e.value.errno == want, profile


def test_check_vma_flags_honours_foll_force() -> None:
    """mm/gup.c: a forced write to a VMA without VM_WRITE needs a COW mapping, a forced read
    of one without VM_READ needs VM_MAYREAD; unforced, both are refused."""
    from gmemlab.model import Host
    from gmemlab.model.mm.gup import FOLL_FORCE, FOLL_WRITE, check_vma_flags
    from gmemlab.model.mm.memory import VM_MAYWRITE, VM_READ, VM_SHARED, VM_WRITE

    h = Host()
    m = h.machine
    private = m.processes[0].mm.find_vma(h.mmap_anonymous(1 << 16).addr)
    assert private is not None and not private.flags & VM_SHARED
    assert check_vma_flags(m, private, FOLL_WRITE) == 0
    private.flags &= ~VM_WRITE  # as mprotect(PROT_READ) would leave it
    assert check_vma_flags(m, private, FOLL_WRITE) == -errno.EFAULT
    assert check_vma_flags(m, private, FOLL_WRITE | FOLL_FORCE) == 0  # ptrace's COW write
    private.flags &= ~VM_MAYWRITE
    assert check_vma_flags(m, private, FOLL_WRITE | FOLL_FORCE) == -errno.EFAULT
    private.flags &= ~VM_READ  # PROT_NONE
    assert check_vma_flags(m, private, 0) == -errno.EFAULT
    assert check_vma_flags(m, private, FOLL_FORCE) == 0  # VM_MAYREAD is still there
