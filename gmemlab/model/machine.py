"""One modelled host: CPUs, physical memory, the direct map, TLBs and the kernel state.

A :class:`Machine` is built from a :class:`MachineConfig` (RAM, CPUs, boot
options such as ``init_on_free``, trace and invariant modes, a seed), an
architecture profile (``gmemlab.model.kvm.arch``) and a design
(``gmemlab.model.designs``).  RAM follows an x86 e820 layout: 636 KiB below
1 MiB, ``low_ram_mib`` up to the PCI hole, and ``ram_gib`` from 4 GiB up; the
direct map is built over it as x86 builds it.

Kernel paths run as tasks pinned to CPUs: :meth:`Machine.run` runs one path to
completion on a task's CPU; the checker interleaves several.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gmemlab.api import DirectMapCounters
from gmemlab.model.designs import Design, get_design
from gmemlab.model.fault_inject import FaultInject
from gmemlab.model.fs import Inode
from gmemlab.model.invariants import InvariantMode, Invariants
from gmemlab.model.kvm.arch import PROFILES, ArchProfile
from gmemlab.model.mm.direct_map import DirectMap
from gmemlab.model.mm.filemap import AS_NO_DIRECT_MAP, AddressSpace
from gmemlab.model.mm.locks import Locks
from gmemlab.model.mm.memmap import MemMap
from gmemlab.model.mm.memory import Process
from gmemlab.model.mm.page_alloc import PageAllocator
from gmemlab.model.mm.tlb import Tlbs
from gmemlab.model.mm.truncate import truncate_inode_pages_final
from gmemlab.model.ranges import PER_PAGE, PerPage, profile_unserved
from gmemlab.model.ranges.gate import PER_PAGE_ASKED, Gate, judge
from gmemlab.model.ranges.paths import paths_for
from gmemlab.model.task import KGen, Step, Task, run_sync
from gmemlab.model.trace import Trace, TraceMode

T = TypeVar("T")
GIB_PAGES = 1 << 18


@dataclass(frozen=True, slots=True)
class MachineConfig:
    ram_gib: float = 4.0  # RAM from 4 GiB up (0: none, for tiny machines)
    low_ram_mib: int = 2048  # RAM from 1 MiB up to here (below the PCI hole)
    ncpus: int = 2
    tlb_entries: int = 1536
    init_on_alloc: bool = False
    init_on_free: bool = False
    trace: TraceMode = "ring"  # "full" only when asked (gmemlab run --trace): memory stays flat
    trace_ring: int = 4096
    invariants: InvariantMode = "stop"
    seed: int = 0
    # Let the batched paths (gmemlab.model.ranges) stand in for the per-page ones when nothing
    # observes or interleaves steps and the code is the code they mirror (see ranges.gate);
    # False forces the per-page generator paths.
    range_paths: bool = True

    def validate(self) -> None:
        if not 0 <= self.ram_gib <= 4096:
            raise ValueError(f"ram_gib must be within [0, 4096], not {self.ram_gib}")
        if not 2 <= self.low_ram_mib <= 3072:
            raise ValueError(f"low_ram_mib must be within [1, 3072], not {self.low_ram_mib}")
        if not 1 <= self.ncpus <= 4096:
            raise ValueError(f"ncpus must be within [1, 4096], not {self.ncpus}")
        if self.tlb_entries < 1:
            raise ValueError("tlb_entries must be positive")


@dataclass(slots=True)
class _Registry:
    mappings: dict[int, AddressSpace] = field(default_factory=dict)
    next_mapping: int = 1
    next_ino: int = 1000
    next_pid: int = 100
    next_vm: int = 1


def ram_ranges(c: MachineConfig) -> list[tuple[int, int]]:
    """e820 RAM in pfns: [4K, 636K), [1M, low_ram), [4G, 4G + ram)."""
    ranges = [(1, 0x9F), (0x100, c.low_ram_mib << 8)]
    high = int(c.ram_gib * GIB_PAGES)
    if high:
        ranges.append((1 << 20, (1 << 20) + high))
    return ranges


class Machine:
    def __init__(self, config: MachineConfig | None = None, *,
                 profile: str | ArchProfile = "x86_64", design: str | Design = "v12") -> None:
        self.config = config = config or MachineConfig()
        config.validate()
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
            profile = PROFILES[profile]
        self.profile: ArchProfile = profile
        self.design: Design = get_design(design)
        self.ram = ram_ranges(config)
        nr_pages = self.ram[-1][1]
        self.mem = MemMap(nr_pages)
        self.alloc = PageAllocator(self.mem, self.ram)
        self.dmap = DirectMap(nr_pages, self.ram, profile.direct_map_granularity,
                              gbpages=profile.gbpages)
        self.tlb = Tlbs(config.ncpus, config.tlb_entries)
        self.locks = Locks()
        self.trace = Trace(config.trace, config.trace_ring)
        self.inv = Invariants(self, config.invariants)
        self.faults = FaultInject(config.seed)
        self.current = Task("boot", 0)
        self._reg = _Registry()
        self.mappings = self._reg.mappings
        self.kvms: dict[int, Any] = {}
        self.processes: list[Process] = []
        # Called after every step of every kernel path run through run(); see observe().
        self.step_hook: Callable[[Step], None] | None = None
        # The loop heads of kernel paths go through this: the batched paths only while run()
        # runs a path straight through with nobody watching its steps, and the gate agrees.
        self.ranges: PerPage = PER_PAGE
        self._gate: Gate | None = None
        self._batched: PerPage = PER_PAGE

    # --- running kernel paths ----------------------------------------------------------
    def run(self, task: Task, gen: KGen[T]) -> T:
        """Run one kernel path to completion as ``task`` (on its CPU).

        With :attr:`step_hook` set, it is called after every step (exposure analysis).
        """
        self.current = task
        self.trace.current = task
        if self.step_hook is not None:
            return run_sync(_observed(gen, self.step_hook))
        outer = self.ranges
        self.ranges = self._batched if self._gate is not None else self._judge()
        try:
            return run_sync(gen)
        finally:
            self.ranges = outer

    @property
    def gate(self) -> Gate:
        """May the batched paths stand in here, and why (judged once, at the first use)?"""
        if self._gate is None:
            self._judge()
        assert self._gate is not None
        return self._gate

    def _judge(self) -> PerPage:
        unserved = profile_unserved(self.profile)
        self._gate = (PER_PAGE_ASKED if not self.config.range_paths else
                      Gate((), asked=unserved) if unserved else judge(self.design))
        self._batched = paths_for(self._gate)
        return self._batched

    def switch_to(self, task: Task) -> None:
        """Make ``task`` current (the checker calls this before each step it schedules)."""
        self.current = task
        self.trace.current = task

    def task(self, name: str, cpu: int = 0) -> Task:
        if not 0 <= cpu < self.config.ncpus:
            raise ValueError(f"cpu {cpu} does not exist (ncpus={self.config.ncpus})")
        return Task(name, cpu)

    # --- object registry -------------------------------------------------------------------
    def new_mapping(self, a_ops: object, gfp: int, kind: str) -> AddressSpace:
        reg = self._reg
        mapping = AddressSpace(reg.next_mapping, None, a_ops, gfp, kind=kind)
        reg.mappings[mapping.id] = mapping
        reg.next_mapping += 1
        return mapping

    def unregister_mapping(self, mapping: AddressSpace) -> None:
        self.mappings.pop(mapping.id, None)

    def new_inode(self, mode: int, size: int, mapping: AddressSpace, kind: str) -> Inode:
        inode = Inode(self._reg.next_ino, mode, size, mapping, kind, truncate_inode_pages_final)
        self._reg.next_ino += 1
        mapping.host = inode
        return inode

    def new_process(self, name: str) -> Process:
        proc = Process(self._reg.next_pid, name)
        self._reg.next_pid += 1
        self.processes.append(proc)
        return proc

    def new_vm_id(self) -> int:
        vid = self._reg.next_vm
        self._reg.next_vm += 1
        return vid

    # --- questions the invariants and reports ask -----------------------------------------------
    def folio_mapping(self, pfn: int) -> AddressSpace | None:
        mid = self.mem.mapping[pfn]
        return self.mappings.get(mid) if mid else None

    def folio_no_direct_map_mapping(self, pfn: int) -> bool:
        """Is ``pfn`` a page-cache folio of an ``AS_NO_DIRECT_MAP`` mapping?"""
        mid = self.mem.mapping[pfn]
        if not mid:
            return False
        mapping = self.mappings.get(mid)
        return mapping is not None and mapping.test(AS_NO_DIRECT_MAP)

    def meminfo(self) -> DirectMapCounters:
        return self.dmap.meminfo()


def _observed(gen: KGen[T], hook: Callable[[Step], None]) -> KGen[T]:
    """Run ``gen``; call ``hook(step)`` once the atomic action after ``step`` has executed."""
    send = gen.send
    step: Step | None = None
    try:
        step = send(None)
        while True:
            yield step
            done = step
            step = send(None)
            hook(done)
    except StopIteration as stop:
        if step is not None:
            hook(step)
        return stop.value  # type: ignore[no-any-return]

