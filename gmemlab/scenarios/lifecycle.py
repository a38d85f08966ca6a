"""The full lifecycle of a VM whose memory is a NO_DIRECT_MAP guest_memfd.

What a VMM such as Firecracker's secret-free mode does, in order, on the model:
create the VM and the guest_memfd, map it and bind it as the memslot (the
non-CoCo setup: ``userspace_addr`` is the guest_memfd mapping), populate part of
it from the VMM, let the guest check that data and write all of its memory,
have KVM read guest memory its own ways (``copy_from_user`` works; kvm-clock's
pfncache needs GUP and the direct map and, failing, leaves the guest's pvclock
stale without a word, unless the design carries Firecracker's pfncache
patches), let a gadget on another CPU try to read guest memory through the
direct map, punch a hole, read a freed frame, tear everything down, and let
the kernel reuse the freed frames.

Each step records what it did to the direct map, the TLBs and the invariants.
A kernel oops ends the lifecycle where it happens, like a crashed host.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gmemlab.api import DirectMapCounters, KernelError, SigBus, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.host import GuestMemfd, Host, Mapping, VcpuFd
from gmemlab.model.invariants import KernelOops, Violation
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_TDX_VM,
    PAGE_SIZE,
    X86_VM_TYPE_NAMES,
    gmem_flags_str,
)

MIB = 1 << 20
GUEST_GPA = 1 << 32  # where test_guest_memfd_guest puts guest_memfd
# Event counts each step reports (trace event names).
COLUMNS = {
    "faults": ("user_fault", "get_pfn"),
    "zaps": ("dmap_clear", "dmap_clear_2m", "dmap_clear_1g"),  # entries, of any leaf size
    "restores": ("dmap_set", "dmap_set_2m", "dmap_set_1g"),
    "splits": ("dmap_split_1g", "dmap_split_2m"),
    "flushes": ("flush_tlb_kernel_range", "flush_tlb_all"),
    "ipis": ("ipi",),
    "spte_maps": ("spte_map",),
}


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    guest_mib: int = 64
    vmm_write_mib: int = 16
    punch_mib: int = 8
    no_direct_map: bool = True
    vcpu_cpu: int = 0
    gadget_cpu: int = 1
    kernel_reuse_pages: int = 64
    # KVM_X86_*_VM.  SNP and TDX VMs get private memory only (no MMAP, no INIT_SHARED, gfns
    # made private); SNP's is populated with SNP_LAUNCH_UPDATE, TDX's by the guest alone
    # (the model has no KVM_TDX_INIT_MEM_REGION).
    vm_type: int = KVM_X86_DEFAULT_VM

    def validate(self, ram_mib: int, ncpus: int) -> None:
        if self.guest_mib <= 0:
            raise ValueError("the guest needs at least 1 MiB")
        if self.guest_mib * 2 > ram_mib:
            raise ValueError(f"a {self.guest_mib} MiB guest does not fit comfortably in "
                             f"{ram_mib} MiB of modelled RAM; raise --ram-gib")
        if not 0 <= self.vmm_write_mib <= self.guest_mib:
            raise ValueError("--vmm-write-mib must be within the guest")
        if not 0 <= self.punch_mib <= self.guest_mib // 2:
            raise ValueError("--punch-mib must be at most half the guest (the hole is punched "
                             "in the upper half)")
        for name, cpu in (("vCPU", self.vcpu_cpu), ("gadget", self.gadget_cpu)):
            if not 0 <= cpu < ncpus:
                raise ValueError(f"{name} CPU {cpu} does not exist (--cpus {ncpus})")


@dataclass(slots=True)
class StepResult:
    name: str
    outcome: str
    counts: dict[str, int]
    ok: bool = True

    def as_json(self) -> dict[str, Any]:
        return {"step": self.name, "outcome": self.outcome, "ok": self.ok, **self.counts}


@dataclass(slots=True)
class LifecycleResult:
    design: str
    design_title: str
    profile: str
    flags: int
    steps: list[StepResult] = field(default_factory=list)
    crashed: str | None = None
    violations: list[Violation] = field(default_factory=list)
    verdicts: dict[str, int] = field(default_factory=dict)
    departures: dict[str, int] = field(default_factory=dict)  # rationale entries not followed
    meminfo_before: dict[str, int] = field(default_factory=dict)
    meminfo_after: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    not_present_pages: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class _Recorder:
    def __init__(self, host: Host, result: LifecycleResult) -> None:
        self.host = host
        self.result = result
        self.before: Counter[str] = Counter()

    def start(self) -> None:
        self.before = Counter(self.host.m.trace.counts)

    def done(self, name: str, outcome: str, ok: bool = True) -> None:
        now = self.host.m.trace.counts
        delta = {col: sum(now[e] - self.before[e] for e in evs) for col, evs in COLUMNS.items()}
        self.result.steps.append(StepResult(name, outcome, delta, ok))


def run_lifecycle(host: Host, cfg: LifecycleConfig) -> LifecycleResult:
    """Run the lifecycle on ``host`` (whose invariants should be in ``record`` mode)."""
    m = host.m
    private = m.profile.has_private_mem(cfg.vm_type)
    flags = 0 if private else GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    if cfg.no_direct_map:
        flags |= GUEST_MEMFD_FLAG_NO_DIRECT_MAP
    res = LifecycleResult(m.design.name, m.design.title, m.profile.name, flags)
    mi = m.meminfo()
    res.meminfo_before = _meminfo(mi)
    rec = _Recorder(host, res)
    try:
        _steps(host, cfg, rec, res)
    except KernelOops as oops:
        res.crashed = oops.violation.message
        rec.done("(kernel crashed)", oops.violation.message, ok=False)
    except SigBus as e:
        # The VMM dies on its first SIGBUS (v12's user fault on a large folio does this).
        warn = next((f"{ev.fn} WARNs" for ev in reversed(m.trace.events())
                     if ev.event == "warn_on_once"), "")
        rec.done("(VMM killed by SIGBUS)", f"{e}" + (f"; {warn}" if warn else ""), ok=False)
    res.violations = [v for v in m.inv.violations if not v.invariant.rationale]
    res.verdicts = m.inv.verdicts()
    res.departures = m.inv.departures()
    res.meminfo_after = _meminfo(m.meminfo())
    res.splits = {"1G": m.dmap.splits_1g, "2M": m.dmap.splits_2m}
    res.not_present_pages = m.dmap.not_present_pages()
    res.counts = {col: sum(m.trace.counts[e] for e in evs) for col, evs in COLUMNS.items()}
    return res


def _meminfo(mi: DirectMapCounters) -> dict[str, int]:
    return {"DirectMap4k": mi.direct_map_4k, "DirectMap2M": mi.direct_map_2m,
            "DirectMap1G": mi.direct_map_1g}


def _steps(host: Host, cfg: LifecycleConfig, rec: _Recorder, res: LifecycleResult) -> None:
    size = cfg.guest_mib * MIB
    flags = res.flags

    rec.start()
    kvm = host.open_kvm()
    vm = kvm.create_vm(cfg.vm_type)
    supported = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    gmem: GuestMemfd = vm.create_guest_memfd(size, flags)
    kind = "" if cfg.vm_type == KVM_X86_DEFAULT_VM else f"{X86_VM_TYPE_NAMES[cfg.vm_type]} VM, "
    rec.done("create VM and guest_memfd",
             f"{kind}{cfg.guest_mib} MiB, flags {gmem_flags_str(flags)} (VM offers "
             f"{gmem_flags_str(supported)})")

    private = not flags & GUEST_MEMFD_FLAG_MMAP
    rec.start()
    mapping: Mapping | None = None
    if private:
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GUEST_GPA, size, 0, gmem, 0)
        vm.set_memory_attributes(GUEST_GPA, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        rec.done("bind it as memslot 1, private", f"GPA {GUEST_GPA:#x}, no userspace_addr, "
                 "KVM_MEMORY_ATTRIBUTE_PRIVATE")
    else:
        mapping = gmem.mmap(size)
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GUEST_GPA, size, mapping.addr, gmem, 0)
        rec.done("mmap it and bind it as memslot 1", f"GPA {GUEST_GPA:#x}, userspace_addr = the mmap")

    rec.start()
    populated = cfg.vmm_write_mib * MIB
    if cfg.vm_type == KVM_X86_TDX_VM:
        populated = 0
        how = "nothing (the model has no KVM_TDX_INIT_MEM_REGION): the guest writes it"
    elif mapping is None:
        image = bytes((0x5A,)) * PAGE_SIZE
        for off in range(0, populated, PAGE_SIZE):
            vm.snp_launch_update(GUEST_GPA + off, image)
        how = f"{cfg.vmm_write_mib} MiB of 0x5a with SNP_LAUNCH_UPDATE (kvm_gmem_populate)"
    else:
        if populated:
            mapping.fill(0, populated, 0x5A)
        how = f"{cfg.vmm_write_mib} MiB of 0x5a through the mmap"
    rec.done("VMM populates guest memory", how)

    rec.start()
    vcpu = vm.create_vcpu(0, cpu=cfg.vcpu_cpu)
    prog = GuestProgram()
    if populated:
        prog.check(GUEST_GPA, populated, 0x5A)
    prog.fill(GUEST_GPA, size, 0xC3)
    try:
        result = run_program(vcpu, prog)
        ok = result.ok
        outcome = (f"{'checked the VMM data, ' if populated else ''}wrote 0xc3 over all of it"
                   if ok else f"failed: {result.last_exit}")
    except KernelError as e:  # kvm_gmem_get_pfn()'s error, with KVM_EXIT_MEMORY_FAULT
        ok = False
        refused = any(ev.event == "refuse_large" for ev in host.m.trace.events())
        outcome = (f"KVM_RUN fails with {errno.errorcode[e.errno or 0]}"
                   + (": folio_zap_direct_map() refuses the large folio" if refused else ""))
    rec.done(f"guest runs on cpu{cfg.vcpu_cpu}", outcome, ok)

    rec.start()
    ok = True
    try:
        data = vm.read_guest(GUEST_GPA, 8)
        outcome = f"got {data[:4].hex()}... through userspace_addr"
    except KernelError as e:
        outcome = f"fails with {errno.errorcode[e.errno or 0]}"
        if private:
            outcome += ": private memory has no userspace_addr"
        else:  # the user fault under copy_from_user() refused the page
            ok = False
    rec.done("KVM reads guest memory (copy_from_user)", outcome, ok)

    rec.start()
    _kvm_clock(rec, host, vcpu, GUEST_GPA + size - PAGE_SIZE, flags, private)

    rec.start()
    victim = gmem.pfn(PAGE_SIZE)
    secret = host.m.mem.secret_bytes(victim)
    reached = host.gadget_read(cfg.gadget_cpu, victim)
    rec.done(f"gadget on cpu{cfg.gadget_cpu} reads a guest page",
             (f"reached {secret} secret bytes" if reached else "blocked: no translation")
             + f" (pfn {victim:#x})", not reached or not cfg.no_direct_map)

    rec.start()
    hole = size // 2
    punched = cfg.punch_mib * MIB
    freed = gmem.pfn(hole) if punched else -1
    if punched:
        gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, hole, punched)
    try:
        refault = (mapping.read(hole, 1).hex() or "-") if punched and mapping is not None else "-"
    except SigBus:
        refault = "SIGBUS"
    rec.done("punch a hole", f"{cfg.punch_mib} MiB at {hole // MIB} MiB; refault reads {refault}",
             refault != "SIGBUS")

    if freed >= 0:
        rec.start()
        left = host.m.mem.secret_bytes(freed)
        reached = host.gadget_read(cfg.gadget_cpu, freed)
        rec.done("gadget reads a freed frame",
                 f"{'reached' if reached else 'blocked'}: {left} bytes of guest data left in "
                 f"pfn {freed:#x} (init_on_free={'on' if host.m.config.init_on_free else 'off'})")

    rec.start()
    if mapping is not None:
        mapping.munmap()
    gmem.close()
    vcpu.close()
    vm.close()
    kvm.close()
    rec.done("tear down", f"all frames freed ({host.m.alloc.nr_free:,} free)")

    rec.start()
    for _ in range(cfg.kernel_reuse_pages):
        host.kernel_alloc(cfg.gadget_cpu)
    rec.done("kernel reuses freed frames", f"{cfg.kernel_reuse_pages} pages zeroed through the direct map")


def _kvm_clock(rec: _Recorder, host: Host, vcpu: VcpuFd, pvclock: int, flags: int,
               private: bool) -> None:
    """The guest enables kvm-clock and reads the pvclock's version back (issue 11 item 2)."""
    name = "guest enables kvm-clock (pfncache)"
    vcpu.kvm_clock(pvclock)  # the WRMSR succeeds whatever becomes of the pvclock
    try:
        version = run_program(vcpu, GuestProgram().report(pvclock)).reports
    except KernelError as e:  # the guest cannot run at all (v12 refusing a large folio)
        rec.done(name, f"MSR write succeeds; the guest cannot read it back: KVM_RUN fails with "
                 f"{errno.errorcode[e.errno or 0]}", False)
        return
    if not version:
        rec.done(name, "MSR write succeeds; the guest stopped before reading it back", False)
        return
    written = version != [0xC3]  # the low byte of a version KVM bumped is even, not 0xc3
    ndm = bool(flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP)
    via = "a vmap alias (Firecracker's pfncache)" if host.m.design.pfncache_gmem and ndm \
        else "the direct map"
    outcome = (f"MSR write succeeds; pvclock written through {via}: guest reads version "
               f"byte {version[0]:#04x}" if written else
               "MSR write succeeds, pvclock never written (the refresh failed silently): "
               "the guest reads a stale clock (0xc3, its own data)")
    # Private memory (SNP, TDX) has no userspace_addr for the pfncache to resolve.
    rec.done(name, outcome, written == ((not ndm or host.m.design.pfncache_gmem) and not private))
