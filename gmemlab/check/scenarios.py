"""The standard scenarios: small concurrent situations the series must survive.

Each scenario sets up one VMM process on a 2 MiB (4 MiB when it needs a 2M
direct-map leaf), 2-CPU machine with a
``MMAP | INIT_SHARED | NO_DIRECT_MAP`` guest_memfd bound to a memslot (some
add a guest_memfd *without* NO_DIRECT_MAP beside it, or a ``memfd_secret``
mapping), then names its actors.  They come from the review history (``series-spec.md`` §8)
and the concurrency list of ``anchors.md`` §F.9; none of them names a bug, the
invariants judge what happens.

The gadget and TLB-eviction actors aim at the frame behind guest_memfd index 0
when there is one, else at the frame the setup expects the next folio to get
(after a punch-hole, the frame just freed).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace

from gmemlab.check.world import (
    Actor,
    World,
    close,
    fallocate,
    gadget,
    guest_fault,
    gup_read,
    inject_enomem,
    kernel_alloc,
    kvm_clock,
    mlock,
    munmap,
    punch_hole,
    snp_launch_update,
    tlb_evict,
    user_fault,
)
from gmemlab.model.host import GuestMemfd, Host, Kvm, VmFd
from gmemlab.model.kvm.arch import PROFILES, ArchProfile
from gmemlab.model.kvm.mmu import kvm_mmu_page_fault
from gmemlab.model.machine import Machine, MachineConfig
from gmemlab.model.mm.direct_map import LEVEL_4K
from gmemlab.model.mm.memmap import FRAME_ALLOCATED, KIND_KERNEL
from gmemlab.model.trace import TraceMode
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SNP_VM,
    KVM_X86_TDX_VM,
    PAGE_SIZE,
    X86_VM_TYPE_NAMES,
)

PLAIN_FLAGS = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
GMEM_FLAGS = PLAIN_FLAGS | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GMEM_SIZE = 2 * PAGE_SIZE
PLAIN_GFN = GMEM_SIZE // PAGE_SIZE  # where the guest_memfd without the flag is bound


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    summary: str
    setup: Callable[[Machine], World]
    actors: tuple[Actor, ...]
    low_ram_mib: int = 2  # 1-2 MiB: 256 frames, all 4K-mapped (the machine boots faster)
    ncpus: int = 2
    profile: str = "x86_64"
    # Why the scenario cannot run on a profile (None: it can).
    requires: Callable[[ArchProfile], str | None] | None = None
    vm_type: int = KVM_X86_DEFAULT_VM  # the VM type whose NO_DIRECT_MAP offer the cell needs

    def machine_config(self, trace: TraceMode) -> MachineConfig:
        # Invariants are recorded rather than raised so a violation inside a step never
        # leaves a half-run generator behind; the checker reads them after each step.
        # The checker interleaves per-page steps: the batched paths (and judging them) never help.
        return MachineConfig(ram_gib=0, low_ram_mib=self.low_ram_mib, ncpus=self.ncpus,
                             trace=trace, invariants="record", range_paths=False)

    @property
    def nops(self) -> int:
        return max(len(a.ops) for a in self.actors)

    def on(self, profile: str) -> Scenario:
        """The same scenario on another architecture profile."""
        if profile not in PROFILES:
            raise KeyError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
        return self if profile == self.profile else replace(self, profile=profile)

    def cannot_run(self) -> str | None:
        """Why the scenario cannot run on its profile, whatever the design (None: it can)."""
        p = PROFILES[self.profile]
        if self.vm_type not in p.vm_types:
            return f"{p.name} runs no {X86_VM_TYPE_NAMES.get(self.vm_type, str(self.vm_type))} VMs"
        return None if self.requires is None else self.requires(p)


# --- setup pieces ----------------------------------------------------------------------------------
def next_frame(m: Machine) -> int:
    """The frame the page allocator will hand out next."""
    pfn = m.alloc.take()
    if pfn is None:
        raise RuntimeError("scenario machine has no free memory")
    m.alloc.give(pfn)  # LIFO: the same frame comes out first again
    return pfn


def use_up_small_frames(m: Machine) -> None:
    """Hand the kernel the frames before the first one inside a large direct-map leaf.

    The next folio then sits in a 2M leaf, so zapping it must split the leaf and
    allocate a page table: the only way the zap can fail (ENOMEM).  Done in bulk
    because setup runs once per replayed schedule.
    """
    first = next_frame(m)
    end = first
    while (leaf := m.dmap.leaf(end)) is not None and leaf[0] == LEVEL_4K:
        end += 1
    frames = m.alloc.take_many(end - first)
    if frames.tolist() != list(range(first, end)):
        raise RuntimeError("the allocator did not hand out the 4K-mapped frames in order")
    n = end - first
    mem = m.mem
    mem.state[first:end] = bytes((FRAME_ALLOCATED,)) * n
    mem.kind[first:end] = bytes((KIND_KERNEL,)) * n
    mem.refcount[first:end] = array("i", [1]) * n


def vmm(m: Machine, *, mmap: bool = True, second_vm: bool = False, plain: bool = False,
        secret: bool = False, vm_type: int = KVM_X86_DEFAULT_VM) -> World:
    """A VMM with one VM, one vCPU and a NO_DIRECT_MAP guest_memfd bound at gpa 0.

    ``mmap``: the file is mapped (``maps[0]``) and that mapping is the memslot's
    userspace address, as VMMs set it (kvm-clock's pfncache goes through it).
    ``second_vm``: a second VM with its own file on the same inode
    (``link_guest_memfd``), bound at gpa 0 too, and its own vCPU on CPU 1.
    ``plain``: a second guest_memfd, *without* NO_DIRECT_MAP, mapped (``maps[1]``)
    and bound in the same VM at gfn ``PLAIN_GFN`` (``gmem_fds[1]``).
    ``secret``: a one-page ``memfd_secret`` file, mapped (the last of ``maps``).
    ``vm_type``: an SNP or TDX VM takes a private-only NO_DIRECT_MAP file (they refuse
    ``INIT_SHARED``), unmapped, its gfns made private with ``KVM_SET_MEMORY_ATTRIBUTES``.
    """
    host = Host(m)
    kvm = host.open_kvm()
    w = World(m, host.proc)
    vm, gmem = _add_vm(w, kvm, 0, None, mmap, vm_type)
    w.gmem_mapping = gmem.file.inode.mapping
    if plain:
        _add_gmem(w, vm, 1, PLAIN_GFN, vm.create_guest_memfd(GMEM_SIZE, PLAIN_FLAGS), mmap=True)
    if second_vm:
        _add_vm(w, kvm, 1, gmem, False)
    if secret:
        secretmem = host.memfd_secret()
        secretmem.ftruncate(PAGE_SIZE)
        w.maps.append(secretmem.mmap(PAGE_SIZE).addr)
    w.target = next_frame(m)
    return w


def _add_gmem(w: World, vm: VmFd, slot: int, gfn: int, gmem: GuestMemfd, *, mmap: bool) -> None:
    """Map ``gmem`` (if asked) and bind it as memslot ``slot`` at ``gfn``."""
    addr = 0
    if mmap:
        addr = gmem.mmap(GMEM_SIZE).addr
        w.maps.append(addr)
    vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, gfn * PAGE_SIZE, GMEM_SIZE, addr, gmem, 0)
    w.gmem_fds.append(gmem.fileno())


def _add_vm(w: World, kvm: Kvm, cpu: int, share: GuestMemfd | None, mmap: bool,
            vm_type: int = KVM_X86_DEFAULT_VM) -> tuple[VmFd, GuestMemfd]:
    """A VM with a vCPU on ``cpu`` and a guest_memfd (new, or a file on ``share``'s inode)."""
    vm = kvm.create_vm(vm_type)
    private = w.m.profile.has_private_mem(vm_type)
    flags = GUEST_MEMFD_FLAG_NO_DIRECT_MAP if private else GMEM_FLAGS
    gmem = vm.create_guest_memfd(GMEM_SIZE, flags) if share is None else vm.link_guest_memfd(share)
    _add_gmem(w, vm, 0, 0, gmem, mmap=mmap and not private)
    if private:
        vm.set_memory_attributes(0, GMEM_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0, cpu=cpu)
    w.vm_fds.append(vm.fileno())
    w.vcpus.append(vcpu.vcpu)
    w.vcpu_fds.append(vcpu.fileno())
    return vm, gmem


def guest_prefault(w: World) -> None:
    """The guest has touched gfn 0: the folio is zeroed, zapped, prepared and stage-2 mapped."""
    m = w.m
    w.target = m.run(m.task("vcpu0", 0), kvm_mmu_page_fault(m, w.vcpus[0], 0, True))


# --- the scenarios ------------------------------------------------------------------------------------
def _setup_plain(m: Machine) -> World:
    return vmm(m)


def _setup_unmapped(m: Machine) -> World:
    return vmm(m, mmap=False)


def _setup_two_vms(m: Machine) -> World:
    return vmm(m, mmap=False, second_vm=True)


def _setup_prefaulted(m: Machine) -> World:
    w = vmm(m, mmap=False)
    guest_prefault(w)
    return w


def _setup_large_leaf(m: Machine) -> World:
    w = vmm(m)
    use_up_small_frames(m)
    w.target = next_frame(m)
    return w


def _setup_beside(m: Machine) -> World:
    return vmm(m, plain=True)


def _setup_secret(m: Machine) -> World:
    return vmm(m, secret=True)


def _setup_snp(m: Machine) -> World:
    return vmm(m, mmap=False, vm_type=KVM_X86_SNP_VM)


def _setup_tdx(m: Machine) -> World:
    return vmm(m, mmap=False, vm_type=KVM_X86_TDX_VM)


def _needs_split(p: ArchProfile) -> str | None:
    if p.direct_map_granularity == "blocks":
        return None
    return f"the direct map of {p.name} is page-granular: no zap splits a leaf, none can fail"


def _needs_secretmem(p: ArchProfile) -> str | None:
    if p.secretmem_enable and p.can_set_direct_map:
        return None
    return f"memfd_secret() is ENOSYS on {p.name} (can_set_direct_map() false or disabled)"


STANDARD: tuple[Scenario, ...] = (
    Scenario(
        "fault-punch",
        "guest fault (kvm_gmem_get_pfn) || punch-hole of the same index",
        _setup_unmapped,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("punch", 1, (punch_hole(),))),
    ),
    Scenario(
        "ufault-release",
        "user fault || release of the last guest_memfd file (close, munmap) while a "
        "memslot is bound || guest fault",
        _setup_plain,
        (Actor("user", 0, (user_fault(),)),
         Actor("release", 1, (close("gmem"), munmap())),
         Actor("vcpu0", 0, (guest_fault(),))),
    ),
    Scenario(
        "two-vms",
        "two VMs on one inode: guest fault in VM A || punch-hole through VM B's file",
        _setup_two_vms,
        (Actor("vcpuA", 0, (guest_fault(0),)),
         Actor("punchB", 1, (punch_hole(1),))),
    ),
    Scenario(
        "zap-gadget",
        "guest fault (zap, flush) || speculative reads and a TLB eviction on both CPUs",
        _setup_unmapped,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("gadget1", 1, (gadget(), gadget())),
         Actor("evict0", 0, (tlb_evict(),))),
    ),
    Scenario(
        "free-reuse",
        "punch-hole of a guest-mapped folio || the allocator handing its frame to the "
        "kernel || a gadget on the other CPU",
        _setup_prefaulted,
        (Actor("punch", 0, (punch_hole(),)),
         Actor("kalloc", 1, (kernel_alloc(),)),
         Actor("gadget1", 1, (gadget(),))),
    ),
    Scenario(
        "enomem-split",
        "guest fault || user fault on a folio inside a 2M direct-map leaf || ENOMEM at "
        "the split's page-table allocation",
        _setup_large_leaf,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("user", 1, (user_fault(),)),
         Actor("enomem", 1, (inject_enomem(),))),
        low_ram_mib=4,  # a 2M leaf at 2-4 MiB
        requires=_needs_split,
    ),
    Scenario(
        "enomem-guest",
        "guest fault on a folio inside a 2M direct-map leaf || ENOMEM at the split's "
        "page-table allocation (the guest path alone)",
        _setup_large_leaf,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("enomem", 1, (inject_enomem(),))),
        low_ram_mib=4,
        requires=_needs_split,
    ),
    Scenario(
        "fallocate-fault",
        "fallocate (preallocation) of the file || guest fault on index 0",
        _setup_unmapped,
        (Actor("falloc", 1, (fallocate(),)),
         Actor("vcpu0", 0, (guest_fault(),))),
    ),
    Scenario(
        "lifecycle",
        "user fault, punch-hole, guest refault (maybe of the same frame) || the "
        "allocator handing frames to the kernel",
        _setup_plain,
        (Actor("vmm", 0, (user_fault(), punch_hole(), guest_fault())),
         Actor("kalloc", 1, (kernel_alloc(),))),
    ),
    Scenario(
        "teardown",
        "guest fault (KVM_RUN) || VM teardown: close the vCPU, VM and guest_memfd fds",
        _setup_unmapped,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("teardown", 1, (close("vcpu"), close("vm"), close("gmem")))),
    ),
    Scenario(
        "plain-beside",
        "a guest_memfd without NO_DIRECT_MAP beside one with it, in one VM: user fault on "
        "the plain file || guest fault on the same page of it",
        _setup_beside,
        (Actor("user", 1, (user_fault(1),)),
         Actor("vcpu0", 0, (guest_fault(0, PLAIN_GFN),))),
    ),
    Scenario(
        "plain-populate",
        "fallocate (populate) of the guest_memfd without NO_DIRECT_MAP || a guest fault on it",
        _setup_beside,
        (Actor("falloc", 1, (fallocate(1),)),
         Actor("vcpu0", 0, (guest_fault(0, PLAIN_GFN),))),
    ),
    Scenario(
        "gup-pfncache",
        "process_vm_readv through the NO_DIRECT_MAP mapping, then through the plain one || "
        "kvm-clock's pfncache mapping a page of each (hva_to_pfn through the memslots)",
        _setup_beside,
        (Actor("reader", 1, (gup_read(0), gup_read(1))),
         Actor("vcpu0", 0, (kvm_clock(0, 0), kvm_clock(0, PLAIN_GFN)))),
    ),
    Scenario(
        "mlock-secretmem",
        "mlock of the guest_memfd mapping and of a memfd_secret mapping || user fault on "
        "the secretmem page, then process_vm_readv of it || a gadget on the other CPU",
        _setup_secret,
        (Actor("mlock", 1, (mlock(0), mlock(1))),
         Actor("secret", 0, (user_fault(1), gup_read(1))),
         Actor("gadget1", 1, (gadget(),))),
        requires=_needs_secretmem,
    ),
)

# On the confidential VM types, where the arch hooks act.  Only a design that offers
# NO_DIRECT_MAP to the VM type runs them: v9 (no exclusion), or any design on the
# what-if profile x86_64-what-if-snp-tdx.  They are how the checker finds why the
# series excludes SNP and TDX, rather than being told.
COCO: tuple[Scenario, ...] = (
    Scenario(
        "snp-fault-punch",
        "SNP VM, private gfn: guest fault (zap, sev_gmem_prepare) || punch-hole of the same "
        "index (->free_folio: sev_gmem_invalidate's clflush through __va, and the restore)",
        _setup_snp,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("punch", 1, (punch_hole(),))),
        vm_type=KVM_X86_SNP_VM,
        low_ram_mib=4,  # a free 2 MiB pageblock, for the designs that allocate by the block
    ),
    Scenario(
        "snp-populate",
        "SNP VM: SNP_LAUNCH_UPDATE of gfn 0 (kvm_gmem_populate: copy through kmap_local_pfn, "
        "rmp_make_private), then the guest fault || punch-hole of the same index",
        _setup_snp,
        (Actor("vmm", 0, (snp_launch_update(), guest_fault())),
         Actor("punch", 1, (punch_hole(),))),
        vm_type=KVM_X86_SNP_VM,
        low_ram_mib=4,  # a free 2 MiB pageblock, for the designs that allocate by the block
    ),
    Scenario(
        "tdx-fault-punch",
        "TDX VM, private gfn: guest fault (zap, tdh_mem_page_aug's clflush through __va) || "
        "punch-hole of the same index (tdh_mem_page_remove, tdx_quirk_reset_page)",
        _setup_tdx,
        (Actor("vcpu0", 0, (guest_fault(),)),
         Actor("punch", 1, (punch_hole(),))),
        vm_type=KVM_X86_TDX_VM,
        low_ram_mib=4,  # a free 2 MiB pageblock, for the designs that allocate by the block
    ),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (*STANDARD, *COCO)}


def get_scenario(name: str) -> Scenario:
    s = SCENARIOS.get(name)
    if s is None:
        raise KeyError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    return s

# Scenarios beyond one process's minute: for ``--workers``/``--ray``, not in the default suite.
LARGE: tuple[Scenario, ...] = (
    Scenario(
        "two-vms-gadget",
        "two VMs on one inode: guest faults in VM A and in VM B (each zaps, flushes, maps) || "
        "a speculative gadget on CPU 1 || a TLB eviction on CPU 0",
        _setup_two_vms,
        (Actor("vcpuA", 0, (guest_fault(0),)),
         Actor("vcpuB", 1, (guest_fault(1),)),
         Actor("gadget1", 1, (gadget(),)),
         Actor("evict0", 0, (tlb_evict(),))),
    ),
)

SCENARIOS.update((s.name, s) for s in LARGE)
