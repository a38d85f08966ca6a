"""The batched range paths leave exactly what the per-page paths leave.

Each workload runs twice on fresh machines, with the batched range paths off
(``MachineConfig(range_paths=False)``: the generator paths, page by page) and
on, trace ``full``; the event lists (order, details, sequence numbers), the
counts and every piece of machine state must be identical.  The workloads
reach the cases the batched paths decide on: direct-map splits (1G and 2M)
inside a run, frames reused after a punch-hole (LIFO), folios that exist
already (populated by the VMM, or fallocated and not uptodate), TLB entries on
other CPUs, a full TLB, ENOMEM, hwpoison, several VMAs and VMs on one inode,
``init_on_free``, designs with and without the zap, 2 and 3 CPUs.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gmemlab.api import KernelError, MemoryFault, SigBus, SigSegv, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model import Host
from gmemlab.model.host import GuestMemfd, Mapping, VcpuFd, VmFd
from gmemlab.model.invariants import KernelOops
from gmemlab.model.mm.direct_map import LEVEL_4K
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_X86_SNP_VM,
    MADV_DONTNEED,
    MADV_REMOVE,
    PAGE_SIZE,
    PROT_READ,
)
from tests.scale.equivalence import first_difference, run_both

MIB = 1 << 20
GPA = 1 << 32
NDM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@dataclass(slots=True)
class Vm:
    vm: VmFd
    gmem: GuestMemfd
    vcpu: VcpuFd
    mapping: Mapping | None

    @property
    def mem(self) -> Mapping:
        assert self.mapping is not None
        return self.mapping


def vm_with_gmem(h: Host, size: int, flags: int, *, mapped: bool = False, vm_type: int = 0) -> Vm:
    """A VM, its guest_memfd bound at GPA (through its mmap if ``mapped``), a vCPU on cpu 0."""
    vm = h.open_kvm().create_vm(vm_type)
    gmem = vm.create_guest_memfd(size, flags)
    mapping = gmem.mmap(size) if mapped else None
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, size, mapping.addr if mapping else 0,
                               gmem, 0)
    return Vm(vm, gmem, vm.create_vcpu(0, cpu=0), mapping)


def guest(vcpu: VcpuFd, prog: GuestProgram) -> None:
    run_program(vcpu, prog)


def guest_touch(flags: int) -> Callable[[Host], None]:
    def run(h: Host) -> None:
        g = vm_with_gmem(h, 6 * MIB, flags)
        guest(g.vcpu, GuestProgram().touch(GPA + 100, 3 * MIB).fill(GPA + 3 * MIB + 5, 2 * MIB, 7)
              .check(GPA + 3 * MIB + 5, 2 * MIB, 7).check(GPA, 6 * MIB, 0))
        guest(g.vcpu, GuestProgram().touch(GPA, 6 * MIB, value=9).touch(GPA, 6 * MIB, write=False)
              .report(GPA + 5 * MIB))
        h.gadget_read(1, g.gmem.pfn(0))
    return run


def vmm_then_guest(flags: int) -> Callable[[Host], None]:
    def run(h: Host) -> None:
        g = vm_with_gmem(h, 6 * MIB, flags, mapped=True)
        g.mem.fill(10, 3 * MIB, 0x5A)
        g.mem.write(3 * MIB + 7, b"hello")
        guest(g.vcpu, GuestProgram().check(GPA + 10, 3 * MIB - 10, 0x5A).check(GPA + 10, 3 * MIB, 0x5A)
              .fill(GPA, 6 * MIB, 0xC3))
        g.vm.read_guest(GPA, 8)
        g.mem.read(3 * MIB, 16)
        g.mem.fill(0, 6 * MIB, 1)
    return run


def punch_refault_release(flags: int) -> Callable[[Host], None]:
    def run(h: Host) -> None:
        g = vm_with_gmem(h, 8 * MIB, flags, mapped=True)
        guest(g.vcpu, GuestProgram().touch(GPA, 4 * MIB))
        g.mem.fill(4 * MIB, 2 * MIB, 3)
        g.gmem.fallocate(PUNCH, MIB, 2 * MIB)
        guest(g.vcpu, GuestProgram().touch(GPA + MIB, MIB))  # reuses the freed frames, LIFO
        g.gmem.fallocate(PUNCH, 3 * MIB + 2 * PAGE_SIZE, PAGE_SIZE)
        g.gmem.fallocate(FALLOC_FL_KEEP_SIZE, 5 * MIB, 2 * MIB)
        guest(g.vcpu, GuestProgram().touch(GPA + 4 * MIB, 4 * MIB))  # not-uptodate folios too
        g.mem.munmap()
        g.gmem.close()
        g.vcpu.close()
        g.vm.close()
        for _ in range(8):
            h.kernel_alloc(1)
    return run


def teardown_vm_first(h: Host) -> None:
    g = vm_with_gmem(h, 4 * MIB, NDM)
    guest(g.vcpu, GuestProgram().fill(GPA, 3 * MIB, 4))
    g.vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 0)
    g.vcpu.close()
    g.vm.close()
    g.gmem.close()


def tlb_entries_elsewhere(h: Host) -> None:
    """Other CPUs hold 4K, 2M and 1G translations of frames the guest is about to get."""
    g = vm_with_gmem(h, 8 * MIB, NDM)
    m = h.machine
    h.gadget_read(2, int(m.alloc.peek(1)[0]) + 1)  # a 1G entry on cpu2
    guest(g.vcpu, GuestProgram().touch(GPA, MIB))
    nxt = m.alloc.peek(700)
    for cpu, k in ((1, 3), (2, 5), (1, 600), (2, 699)):
        h.gadget_read(cpu, int(nxt[k]))  # 4K in the split region, 2M past it
    h.kernel_alloc(0)
    guest(g.vcpu, GuestProgram().touch(GPA + MIB, 3 * MIB))
    g.gmem.fallocate(PUNCH, 0, 2 * MIB)
    for k in (0, 1, 2):
        h.gadget_read(k % 3, int(m.alloc.peek(4)[k]))
    guest(g.vcpu, GuestProgram().touch(GPA, 2 * MIB))


def tlb_full(h: Host) -> None:
    g = vm_with_gmem(h, 4 * MIB, NDM)
    m = h.machine
    guest(g.vcpu, GuestProgram().touch(GPA, MIB))
    for k in range(12):
        h.gadget_read(0, int(m.alloc.peek(40)[k + 20]))  # cpu0, the vCPU's, fills up
    guest(g.vcpu, GuestProgram().touch(GPA + MIB, 3 * MIB))


def enomem(h: Host) -> None:
    g = vm_with_gmem(h, 64 * MIB, NDM)
    g.vcpu.load_program(GuestProgram().touch(GPA, 64 * MIB))
    with pytest.raises(KernelError) as e:
        g.vcpu.run()
    assert e.value.errno == errno.ENOMEM
    try:
        g.gmem.fallocate(FALLOC_FL_KEEP_SIZE, 0, 64 * MIB)
    except KernelError as e:
        assert e.errno == errno.ENOMEM
    g.gmem.fallocate(PUNCH, MIB, 40 * MIB)


def hwpoison(h: Host) -> None:
    g = vm_with_gmem(h, 2 * MIB, NDM, mapped=True)
    g.mem.fill(0, MIB, 1)
    h.memory_failure(g.gmem.pfn(100 * PAGE_SIZE))
    g.vcpu.load_program(GuestProgram().touch(GPA, 2 * MIB))
    ex = g.vcpu.run()  # kvm_gmem_get_pfn() -> -EHWPOISON: a memory-fault exit, as in kvm-ioctls
    assert isinstance(ex, MemoryFault) and ex.errno == 133 and ex.gpa == GPA + 100 * PAGE_SIZE


def two_vmas_two_vms(h: Host) -> None:
    g = vm_with_gmem(h, 4 * MIB, NDM, mapped=True)
    second = g.gmem.mmap(2 * MIB)
    second.fill(0, 2 * MIB, 2)
    g.mem.fill(MIB, 2 * MIB, 3)
    vm2 = h.open_kvm().create_vm()
    linked = vm2.link_guest_memfd(g.gmem)
    vm2.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 4 * MIB, 0, linked, 0)
    guest(g.vcpu, GuestProgram().touch(GPA, 4 * MIB))
    guest(vm2.create_vcpu(0, cpu=1), GuestProgram().touch(GPA, 4 * MIB))
    g.gmem.fallocate(PUNCH, 0, 3 * MIB)
    second.munmap()
    linked.close()
    g.gmem.close()


def hva_memslot(h: Host) -> None:
    """A plain memslot backed by the guest_memfd mapping: zaps notify KVM, page by page."""
    g = vm_with_gmem(h, 4 * MIB, SHARED, mapped=True)
    g.vm.set_user_memory_region2(2, 0, 2 * GPA, 2 * MIB, g.mem.addr, None, 0)
    g.mem.fill(0, MIB, 5)
    guest(g.vcpu, GuestProgram().touch(2 * GPA, 2 * MIB).touch(GPA + MIB, 3 * MIB))
    anon = h.mmap_anonymous(MIB)
    anon.fill(0, MIB, 6)
    anon.munmap()
    g.gmem.fallocate(PUNCH, 0, 3 * MIB)
    guest(g.vcpu, GuestProgram().touch(2 * GPA, MIB))
    g.mem.munmap()


def zap_failed_earlier(h: Host) -> None:
    """A folio left uptodate but in the direct map by a failed split gets zapped by a later fault."""
    g = vm_with_gmem(h, 2 * MIB, NDM)
    h.machine.faults.arm("pt_alloc", after=1)  # the 1G split goes through, the 2M one fails
    g.vcpu.load_program(GuestProgram().touch(GPA, PAGE_SIZE))
    with pytest.raises(KernelError):
        g.vcpu.run()
    h.machine.faults.disarm("pt_alloc")
    guest(g.vcpu, GuestProgram().touch(GPA + PAGE_SIZE, PAGE_SIZE))  # splits the region
    guest(g.vcpu, GuestProgram().touch(GPA, MIB))


def split_at_region_end(h: Host) -> None:
    """A region's only folio is its last frame: its page table is the next region's first."""
    g = vm_with_gmem(h, 4 * MIB, NDM)
    guest(g.vcpu, GuestProgram().touch(GPA, MIB))
    m = h.machine
    while True:
        nxt = int(m.alloc.peek(1)[0])
        leaf = m.dmap.leaf(nxt)
        if nxt & 511 == 511 and leaf is not None and leaf[0] != LEVEL_4K:
            break
        h.kernel_alloc(1)
    guest(g.vcpu, GuestProgram().touch(GPA + MIB, 3 * MIB))


def sigbus(h: Host) -> None:
    """VMM accesses past i_size, and to a guest_memfd without INIT_SHARED, take SIGBUS."""
    vm = h.open_kvm().create_vm()
    gmem = vm.create_guest_memfd(MIB, NDM)
    mapping = gmem.mmap(2 * MIB)
    with pytest.raises(SigBus):
        mapping.fill(PAGE_SIZE + 3, 2 * MIB - PAGE_SIZE - 3, 1)
    private = vm.create_guest_memfd(MIB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_NO_DIRECT_MAP)
    with pytest.raises(SigBus):
        private.mmap(MIB).fill(0, MIB, 2)
    mapping.read(0, MIB)


def vmm_calls(flags: int) -> Callable[[Host], None]:
    """mprotect and MAP_FIXED split a bound mapping into VMAs the batched user access and
    zap walk one at a time; MADV_DONTNEED/REMOVE, a SIGSEGV on the read-only part, a
    MAP_POPULATE mapping, then munmap of the split range."""
    def run(h: Host) -> None:
        g = vm_with_gmem(h, 4 * MIB, flags, mapped=True)
        g.mem.fill(0, 4 * MIB, 3)
        g.mem.mprotect(PROT_READ, MIB, MIB)
        with pytest.raises(SigSegv):
            g.mem.fill(MIB - PAGE_SIZE, 2 * PAGE_SIZE, 4)
        g.mem.read(0, 4 * MIB)
        g.mem.madvise(MADV_DONTNEED, 0, MIB + 5 * PAGE_SIZE)
        g.mem.madvise(MADV_REMOVE, 2 * MIB, MIB)
        over = g.gmem.mmap(MIB, 3 * MIB, fixed=g.mem, populate=True)
        over.fill(0, MIB, 5)
        g.mem.read(0, 4 * MIB)
        guest(g.vcpu, GuestProgram().touch(GPA, 4 * MIB, write=False))
        g.mem.munmap()
    return run


def snp_guest(h: Host) -> None:
    g = vm_with_gmem(h, 2 * MIB, GUEST_MEMFD_FLAG_MMAP, vm_type=KVM_X86_SNP_VM)
    guest(g.vcpu, GuestProgram().touch(GPA, 2 * MIB))
    g.gmem.fallocate(PUNCH, 0, MIB)
    g.gmem.close()


def until_oops(workload: Callable[[Host], None]) -> Callable[[Host], None]:
    """``workload`` up to the oops a design makes by design (v7 reuses a frame it leaked out
    of the direct map): both runs must get there alike."""
    def run(h: Host) -> None:
        with contextlib.suppress(KernelOops):
            workload(h)
    return run


CASES: dict[str, tuple[Callable[[Host], None], dict[str, object]]] = {
    "guest-touch": (guest_touch(NDM), {}),
    "guest-touch-3cpus": (guest_touch(NDM), {"ncpus": 3}),
    "guest-touch-no-flag": (guest_touch(SHARED), {}),
    "guest-touch-base": (guest_touch(SHARED), {"design": "base"}),
    "vmm-then-guest": (vmm_then_guest(NDM), {}),
    "vmm-then-guest-base": (vmm_then_guest(SHARED), {"design": "base", "profile": "x86_64-kvm_pvm-6.18"}),
    "punch-refault-release": (punch_refault_release(NDM), {}),
    "punch-refault-release-3cpus": (punch_refault_release(NDM), {"ncpus": 3}),
    "punch-refault-release-init-on-free": (punch_refault_release(NDM), {"init_on_free": True}),
    "punch-refault-release-no-flag": (punch_refault_release(SHARED), {"init_on_free": True}),
    "punch-refault-release-base": (punch_refault_release(SHARED), {"design": "base"}),
    "punch-refault-release-no-gbpages": (punch_refault_release(NDM), {"ram_gib": 0.5}),
    "teardown-vm-first": (teardown_vm_first, {}),
    "tlb-entries-elsewhere": (tlb_entries_elsewhere, {"ncpus": 3}),
    "tlb-full": (tlb_full, {"tlb_entries": 8}),
    "enomem": (enomem, {"ram_gib": 0, "low_ram_mib": 48}),
    "hwpoison": (hwpoison, {}),
    "two-vmas-two-vms": (two_vmas_two_vms, {}),
    "snp": (snp_guest, {}),
    # v9: zero and prepare, marker, then zap; restore, then invalidate (both orders counted
    # as rationale past the first ones).
    "v9-punch-refault-release": (punch_refault_release(NDM), {"design": "v9"}),
    "v9-guest-touch": (guest_touch(NDM), {"design": "v9"}),
    "v9-vmm-then-guest": (vmm_then_guest(NDM), {"design": "v9", "ncpus": 3}),
    "v9-no-flag": (punch_refault_release(SHARED), {"design": "v9"}),
    "v9-tlb-full": (tlb_full, {"design": "v9", "tlb_entries": 8}),
    # batch: the zap's flush deferred to one per 32 zaps, over the queue's span.
    "batch-guest-touch": (guest_touch(NDM), {"design": "batch"}),
    "batch-guest-touch-3cpus": (guest_touch(NDM), {"design": "batch", "ncpus": 3}),
    "batch-vmm-then-guest": (vmm_then_guest(NDM), {"design": "batch"}),
    "batch-punch-refault-release": (punch_refault_release(NDM), {"design": "batch"}),
    "batch-tlb-full": (tlb_full, {"design": "batch", "tlb_entries": 8}),
    "batch-tlb-elsewhere": (tlb_entries_elsewhere, {"design": "batch", "ncpus": 3}),
    # zap2m: a new folio whose whole 2 MiB file block is absent brings the block in at once.
    "zap2m-guest-touch": (guest_touch(NDM), {"design": "zap2m"}),
    "zap2m-vmm-then-guest": (vmm_then_guest(NDM), {"design": "zap2m", "ncpus": 3}),
    "zap2m-punch-refault-release": (punch_refault_release(NDM), {"design": "zap2m"}),
    "zap2m-tlb-full": (tlb_full, {"design": "zap2m", "tlb_entries": 8}),
    "zap2m-trace-ring": (punch_refault_release(NDM), {"design": "zap2m", "trace": "ring",
                                                      "trace_ring": 300}),
    # The kernels VMMs run: v6.18 prepares only a folio not yet uptodate; Firecracker's port
    # prepares, then zaps, with no flush (0039) and its pfncache patches.
    "6.18-guest-touch": (guest_touch(SHARED), {"design": "6.18", "profile": "x86_64-kvm_pvm-6.18"}),
    "6.18-vmm-then-guest": (vmm_then_guest(SHARED), {"design": "6.18",
                                                      "profile": "x86_64-kvm_pvm-6.18"}),
    "6.18-punch-refault-release": (punch_refault_release(SHARED), {"design": "6.18"}),
    "fc-6.18-guest-touch": (guest_touch(NDM), {"design": "fc-6.18"}),
    "fc-6.18-vmm-then-guest": (vmm_then_guest(NDM), {"design": "fc-6.18", "ncpus": 3}),
    "fc-6.18-punch-refault-release": (punch_refault_release(NDM), {"design": "fc-6.18"}),
    "fc-6.18-two-vmas-two-vms": (two_vmas_two_vms, {"design": "fc-6.18"}),
    # v7: never marked, so every fault zaps again and every free leaks an unmapped frame.
    "v7-guest-touch": (guest_touch(NDM), {"design": "v7"}),
    "v7-vmm-then-guest": (vmm_then_guest(NDM), {"design": "v7"}),
    "v7-punch-refault-release": (until_oops(punch_refault_release(NDM)), {"design": "v7"}),
    "v7-no-flag": (until_oops(punch_refault_release(SHARED)), {"design": "v7"}),
    # Without the zap's flush every zeroed page is still cached when handed out: the first
    # violations (kept with their trace) go per page, the rest are counted in the batch.
    "noflush-guest-touch": (guest_touch(NDM), {"design": "noflush"}),
    "noflush-guest-touch-3cpus": (guest_touch(NDM), {"design": "noflush", "ncpus": 3}),
    "noflush-vmm-then-guest": (vmm_then_guest(NDM), {"design": "noflush"}),
    "noflush-punch-refault-release": (punch_refault_release(NDM), {"design": "noflush"}),
    "noflush-tlb-full": (tlb_full, {"design": "noflush", "tlb_entries": 8}),
    "noflush-tlb-elsewhere": (tlb_entries_elsewhere, {"design": "noflush", "ncpus": 3}),
    # The page cache zeroes and zaps on insertion (fallocate too), restores and zeroes on
    # removal: every removal breaks invalidate-before-restore, counted in bulk after the first.
    "filemap-guest-touch": (guest_touch(NDM), {"design": "filemap"}),
    "filemap-vmm-then-guest": (vmm_then_guest(NDM), {"design": "filemap", "ncpus": 3}),
    "filemap-punch-refault-release": (punch_refault_release(NDM), {"design": "filemap"}),
    "filemap-no-flag": (punch_refault_release(SHARED), {"design": "filemap"}),
    "filemap-tlb-full": (tlb_full, {"design": "filemap", "tlb_entries": 8}),
    "filemap-zap-failed-earlier": (zap_failed_earlier, {"design": "filemap"}),
    # ALLOC_UNMAPPED: folios off the unmapped free list (a pageblock flip per page when it
    # runs dry), zeroed through the mermap (a local flush each 512), back on the list on free.
    "unmapped-guest-touch": (guest_touch(NDM), {"design": "unmapped"}),
    "unmapped-vmm-then-guest": (vmm_then_guest(NDM), {"design": "unmapped", "ncpus": 3}),
    "unmapped-punch-refault-release": (punch_refault_release(NDM), {"design": "unmapped"}),
    "unmapped-init-on-free": (punch_refault_release(NDM), {"design": "unmapped", "init_on_free": True}),
    "unmapped-no-flag": (punch_refault_release(SHARED), {"design": "unmapped"}),
    "unmapped-two-vmas-two-vms": (two_vmas_two_vms, {"design": "unmapped"}),
    "noflush-trace-ring": (punch_refault_release(NDM), {"design": "noflush", "trace": "ring",
                                                        "trace_ring": 300}),
    "hva-memslot": (hva_memslot, {}),
    "zap-failed-earlier": (zap_failed_earlier, {}),
    "split-at-region-end": (split_at_region_end, {}),
    "sigbus": (sigbus, {}),
    "vmm-calls": (vmm_calls(NDM), {}),
    "vmm-calls-no-flag": (vmm_calls(SHARED), {}),
    "trace-ring": (punch_refault_release(NDM), {"trace": "ring", "trace_ring": 300}),
    "trace-off": (vmm_then_guest(NDM), {"trace": "off"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_equals_per_page(case: str) -> None:
    workload, options = CASES[case]
    opts = dict(options)
    design = str(opts.pop("design", "v12"))
    profile = str(opts.pop("profile", "x86_64"))
    per_page, batched = run_both(workload, design=design, profile=profile, **opts)
    assert per_page["seq"], "the workload did nothing"
    assert per_page == batched, first_difference(per_page, batched)
