"""A workload's world: one modelled host under one design, driven one system call at a time.

:class:`Scenario` wraps a model :class:`~gmemlab.model.host.Host` with the
operations the exposure and cost workloads are written in: VMs whose memory is
a guest_memfd bound at :data:`GUEST_GPA` (``userspace_addr`` 0, so every guest
access faults through ``kvm_gmem_get_pfn``), guest writes and reads, VMM
writes through the guest_memfd mapping (a snapshot restore), fallocate and
punch-hole, teardown, memfd_secret, kernel allocations that reuse freed frames,
and a gadget that primes its CPU's TLB.

Two things the model leaves to its caller happen here:

* the batch boundary: after every ``KVM_RUN`` and every VMM system call a
  design that defers work to the return to user space
  (:class:`BatchBoundary`, e.g. the batched flush) gets to do it, on the CPU of
  the task that made the call;
* the VMM's ``memcpy`` into guest memory is counted as ``user_copy_page`` (the
  model moves bytes without counting them), so the cost model can price it.

Workloads are cut into named phases; each phase records the event counts it
caused, and an attached :class:`~gmemlab.expose.tracker.ExposureTracker` starts a
phase with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gmemlab.api import run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.host import GuestMemfd, Host, Mapping, MemFile, VcpuFd, VmFd
from gmemlab.model.invariants import InvariantMode
from gmemlab.model.machine import MachineConfig
from gmemlab.model.mm.tlb import speculative_read
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SIZE,
)

if TYPE_CHECKING:
    from gmemlab.expose.tracker import ExposureTracker
    from gmemlab.model.designs import Design
    from gmemlab.model.machine import Machine
    from gmemlab.model.task import KGen, Task

GUEST_GPA = 1 << 32
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


@runtime_checkable
class BatchBoundary(Protocol):
    """A design with work deferred to the return to user space."""

    def batch_boundary(self, m: Machine) -> KGen[None]: ...


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    ncpus: int = 2
    ram_gib: float = 0.5  # above 4 GiB; 2 GiB more lie below
    init_on_free: bool = False
    no_direct_map: bool = True  # create guest_memfd with the flag where the design offers it
    tlb_entries: int = 1536
    profile: str = "x86_64"
    seed: int = 0
    invariants: InvariantMode = "record"  # a design may break some by design: report, go on


@dataclass(slots=True)
class Guest:
    """A VM with one vCPU, its memory a guest_memfd bound at :data:`GUEST_GPA`."""

    vm: VmFd
    gmem: GuestMemfd
    vcpu: VcpuFd
    pages: int
    mapping: Mapping | None = None

    def folios(self) -> list[int]:
        """The frames in the guest_memfd's page cache now."""
        return [pfn for _, pfn in self.gmem.file.inode.mapping.i_pages.items()]


@dataclass(slots=True)
class PhaseCounts:
    name: str
    counts: Counter[str] = field(default_factory=Counter)


class Scenario:
    def __init__(self, design: str | Design, config: ScenarioConfig | None = None) -> None:
        cfg = self.config = config or ScenarioConfig()
        mc = MachineConfig(ram_gib=cfg.ram_gib, ncpus=cfg.ncpus, tlb_entries=cfg.tlb_entries,
                           init_on_free=cfg.init_on_free, trace="off", invariants=cfg.invariants,
                           seed=cfg.seed)
        self.host = Host(design=design, profile=cfg.profile, config=mc)  # type: ignore[arg-type]
        self.m = self.host.m
        self.kvm = self.host.open_kvm()
        offered = self.kvm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
        nodm = GUEST_MEMFD_FLAG_NO_DIRECT_MAP if cfg.no_direct_map else 0
        self.gmem_flags = SHARED | (offered & nodm)
        self.tracker: ExposureTracker | None = None
        self.phases: list[PhaseCounts] = []
        self._mark = Counter(self.m.trace.counts)
        self._next_slot = 0

    @property
    def no_direct_map(self) -> bool:
        return bool(self.gmem_flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP)

    # --- phases ----------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Close the current phase (its event counts) and open ``name``."""
        self._close_phase()
        self.phases.append(PhaseCounts(name))
        if self.tracker is not None:
            self.tracker.phase(name)

    def finish(self) -> None:
        self._close_phase()
        if self.tracker is not None:
            self.tracker.finish()

    def _close_phase(self) -> None:
        now = Counter(self.m.trace.counts)
        if self.phases:
            self.phases[-1].counts = now - self._mark
        self._mark = now

    def counts(self, *phases: str) -> Counter[str]:
        """The events the named phases caused, summed."""
        total: Counter[str] = Counter()
        for ph in self.phases:
            if ph.name in phases:
                total.update(ph.counts)
        return total

    # --- system calls --------------------------------------------------------------------
    def _boundary(self, task: Task) -> None:
        design = self.m.design
        if isinstance(design, BatchBoundary):
            self.m.run(task, design.batch_boundary(self.m))

    def new_guest(self, pages: int, *, cpu: int = 0) -> Guest:
        """A VM with ``pages`` of guest_memfd at GUEST_GPA and a vCPU on ``cpu``."""
        vm = self.kvm.create_vm()
        gmem = vm.create_guest_memfd(pages * PAGE_SIZE, self.gmem_flags)
        vm.set_user_memory_region2(0, KVM_MEM_GUEST_MEMFD, GUEST_GPA, pages * PAGE_SIZE, 0, gmem, 0)
        vcpu = vm.create_vcpu(0, cpu=cpu)
        self._boundary(self.host.task)
        return Guest(vm, gmem, vcpu, pages)

    def _run(self, g: Guest, program: GuestProgram) -> None:
        result = run_program(g.vcpu, program)
        if not result.ok:
            raise RuntimeError(f"guest program stopped: {result.last_exit}")
        self._boundary(g.vcpu.vcpu.task)

    def guest_fill(self, g: Guest, value: int, first: int = 0, n: int | None = None) -> None:
        """The guest writes ``value`` over pages [first, first + n): its secrets."""
        n = g.pages - first if n is None else n
        self._run(g, GuestProgram().fill(GUEST_GPA + first * PAGE_SIZE, n * PAGE_SIZE, value))

    def guest_read(self, g: Guest, first: int = 0, n: int | None = None) -> None:
        """The guest reads one byte of each page of [first, first + n)."""
        n = g.pages - first if n is None else n
        self._run(g, GuestProgram().touch(GUEST_GPA + first * PAGE_SIZE, n * PAGE_SIZE, write=False))

    def vmm_fill(self, g: Guest, value: int, first: int = 0, n: int | None = None) -> None:
        """The VMM writes ``value`` over pages [first, first + n) through its mapping."""
        n = g.pages - first if n is None else n
        if g.mapping is None:
            g.mapping = g.gmem.mmap(g.pages * PAGE_SIZE)
        g.mapping.fill(first * PAGE_SIZE, n * PAGE_SIZE, value)
        self.m.trace.count("user_copy_page", n)
        self._boundary(self.host.task)

    def fallocate(self, g: Guest, first: int = 0, n: int | None = None) -> None:
        n = g.pages - first if n is None else n
        g.gmem.fallocate(FALLOC_FL_KEEP_SIZE, first * PAGE_SIZE, n * PAGE_SIZE)
        self._boundary(self.host.task)

    def punch(self, g: Guest, first: int, n: int) -> None:
        """The VMM punches pages [first, first + n) out of the guest_memfd (frees them)."""
        g.gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, first * PAGE_SIZE,
                         n * PAGE_SIZE)
        self._boundary(self.host.task)

    def kvm_clock(self, g: Guest, page: int) -> None:
        """The guest enables kvm-clock with its pvclock at the start of ``page``."""
        g.vcpu.kvm_clock(GUEST_GPA + page * PAGE_SIZE)
        self._boundary(g.vcpu.vcpu.task)

    def close_guest(self, g: Guest) -> None:
        """The VMM exits: unmap, close the vCPU, the guest_memfd and the VM; memory is freed."""
        if g.mapping is not None:
            g.mapping.munmap()
        g.vcpu.close()
        g.gmem.close()
        g.vm.close()
        self._boundary(self.host.task)

    def secretmem(self, pages: int) -> tuple[MemFile, Mapping]:
        f = self.host.memfd_secret()
        f.ftruncate(pages * PAGE_SIZE)
        return f, f.mmap(pages * PAGE_SIZE)

    def secret_fill(self, mapping: Mapping, value: int) -> None:
        mapping.fill(0, mapping.length, value)
        self.m.trace.count("user_copy_page", mapping.length // PAGE_SIZE)
        self._boundary(self.host.task)

    def close_file(self, f: MemFile, mapping: Mapping) -> None:
        mapping.munmap()
        f.close()
        self._boundary(self.host.task)

    def kernel_allocs(self, n: int) -> None:
        """The kernel allocates and zeroes ``n`` pages, round robin over the CPUs.

        The page allocator hands out the most recently freed frames first, so this
        is what ends the life of guest data left in freed frames.
        """
        for i in range(n):
            self.host.kernel_alloc(i % self.config.ncpus)

    def gadget_prime(self, frames: list[int], cpu: int) -> None:
        """A gadget on ``cpu`` reads each frame speculatively, caching what it can reach."""
        m = self.m
        task = m.task("gadget", cpu)
        for pfn in frames:
            m.run(task, speculative_read(m, cpu, pfn))
