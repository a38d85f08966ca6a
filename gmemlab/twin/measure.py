"""Micro-benchmarks of first-touch faults, frees and KVM exits: ``gmemlab measure``.

The method follows realkernel.md §4: pinned to one CPU, one untimed warm-up
rotation (which also pre-warms the memory), the order of the kinds rotated
every repetition, min/median/max over the repetitions.  Faults are driven by
native code that stores one byte per 4 KiB page (:func:`native.touch_pages`),
as the C benchmarks do; no Python runs per page.

Kinds (host side, MAP_SHARED unless noted): ``anon`` (MAP_PRIVATE anonymous),
``memfd``, ``guest_memfd`` (MMAP|INIT_SHARED) and ``memfd_secret``.  Guest side,
``guest_memfd_guest``: a CPL3 guest's ``Touch`` loop over a guest_memfd slot at
GPA 1 GiB bound with ``userspace_addr=0``, all in one KVM_RUN, so each page is a
fault through ``kvm_gmem_get_pfn``.

On a kernel whose default VM offers no MMAP|INIT_SHARED guest_memfd (one built
without guest_memfd, for instance) the two guest_memfd kinds are left out and
named under ``unavailable``; the rest is measured.

JSON written by ``--out`` (schema ``gmemlab.measure/1``; times in ns)::

    {
      "schema": "gmemlab.measure/1",
      "machine": {"kernel": str, "cpus": int, "pinned_cpu": int | null, "python": str},
      "config": {"size_bytes": int, "pages": int, "reps": int, "roundtrip_iterations": int},
      "unavailable": {KIND: str, ...},             # kinds this kernel cannot run, and why
      "fault_ns_per_page": {KIND: STATS, ...},     # first touch, one byte store per page
      "free_ns_per_page": {KIND: STATS, ...},      # munmap + close (munmap alone for anon)
      "guest": null | {
        "first_touch_ns_per_page": STATS,          # Touch over fresh gmem in one KVM_RUN
        "second_pass_ns_per_page": STATS,          # the same pages again (already mapped)
        "pf_fixed_per_page": float,                # vCPU binary stats, median deltas / pages
        "insn_emulation_per_page": float
      },
      "kvm_run": {
        "exit_roundtrip_ns": STATS,                # VcpuFd.run() -> IoOut, decode included
        "raw_ioctl_ns": STATS                      # bare fcntl.ioctl(KVM_RUN) loop
      },
      "derived": {                                 # the guest_memfd ratios only with guest_memfd
        "secretmem_minus_gmem_fault_ns_per_page": float,
        "secretmem_over_gmem_fault": float,
        "secretmem_minus_memfd_fault_ns_per_page": float,
        "gmem_over_memfd_fault": float,
        "secretmem_minus_gmem_free_ns_per_page": float,
        "secretmem_over_gmem_free": float
      },
      "ipis_per_page": {KIND: float} | null,       # /proc/interrupts CAL, median per fault run
      "direct_map_kB": {
        "before": DM, "after_first_secretmem_fault": DM, "after": DM,
        "first_secretmem_fault_delta": DM,        # splits happen once per 2 MiB region
        "total_delta": DM
      }
    }

    STATS = {"median": float, "min": float, "max": float, "samples": [float, ...]}
    DM    = {"4k": int, "2M": int, "1G": int}
"""

from __future__ import annotations

import fcntl
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from gmemlab import api, uapi
from gmemlab.guest import GuestProgram
from gmemlab.twin import native
from gmemlab.twin.host import TwinHost, read_direct_map
from gmemlab.twin.kvm import TwinVcpu, TwinVm

SCHEMA = "gmemlab.measure/1"
HOST_KINDS = ("anon", "memfd", "guest_memfd", "memfd_secret")
GUEST_KIND = "guest_memfd_guest"
KINDS = (*HOST_KINDS, GUEST_KIND)
GUEST_GPA = 1 << 30
GUEST_SLOT = 1
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    size: int = 64 << 20
    reps: int = 7
    roundtrip_iterations: int = 2000
    cpu: int | None = 0

    @classmethod
    def quick(cls) -> MeasureConfig:
        return cls(size=8 << 20, reps=3, roundtrip_iterations=300)

    @property
    def pages(self) -> int:
        return self.size // uapi.PAGE_SIZE


@dataclass(slots=True)
class _Sample:
    fault_ns: float
    free_ns: float
    ipis: int
    extra: dict[str, float] = field(default_factory=dict)


def stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


INTERRUPTS = "/proc/interrupts"


def call_interrupts() -> int:
    """Function-call IPIs so far, all CPUs (the ``CAL`` line of /proc/interrupts; 0 if absent)."""
    if not os.path.exists(INTERRUPTS):
        return 0
    with open(INTERRUPTS) as f:
        for line in f:
            head, _, rest = line.partition(":")
            if head.strip() == "CAL":
                return sum(int(x) for x in rest.split() if x.isdigit())
    return 0


def _dm(c: api.DirectMapCounters) -> dict[str, int]:
    return {"4k": c.direct_map_4k, "2M": c.direct_map_2m, "1G": c.direct_map_1g}


def _dm_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


@contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run on ``cpu`` only (``sched_setaffinity``), restoring the old mask afterwards."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@dataclass(slots=True, eq=False)
class _Bench:
    """The resources shared by all runs: a VM for host-side gmem, a VM+vCPU for the guest."""

    host: TwinHost
    config: MeasureConfig
    touch: native.TouchFn
    gmem_vm: TwinVm
    guest_vm: TwinVm
    vcpu: TwinVcpu
    touch_program: GuestProgram
    unavailable: dict[str, str]

    @classmethod
    def open(cls, stack: ExitStack, host: TwinHost, config: MeasureConfig) -> _Bench:
        """Open /dev/kvm and the two VMs; ``stack`` closes them."""
        kvm = stack.enter_context(host.open_kvm())
        guest_vm = stack.enter_context(kvm.create_vm())
        offered = guest_vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        unavailable = {} if offered & SHARED == SHARED else dict.fromkeys(
            ("guest_memfd", GUEST_KIND),
            f"the default VM offers guest_memfd flags {uapi.gmem_flags_str(offered)}, not MMAP|INIT_SHARED")
        return cls(
            host=host,
            config=config,
            touch=native.touch_pages(),
            gmem_vm=stack.enter_context(kvm.create_vm()),
            guest_vm=guest_vm,
            vcpu=guest_vm.create_vcpu(0),
            touch_program=GuestProgram().touch(GUEST_GPA, config.size),
            unavailable=unavailable,
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k not in self.unavailable)

    def run(self, kind: str) -> _Sample:
        if kind == GUEST_KIND:
            return self._guest()
        return self._host(kind)

    def _host(self, kind: str) -> _Sample:
        size, pages = self.config.size, self.config.pages
        file: api.MemFile | None = None
        if kind == "anon":
            mapping: api.Mapping = self.host.mmap_anonymous(size)
        else:
            if kind == "guest_memfd":
                file = self.gmem_vm.create_guest_memfd(size, SHARED)
            else:
                file = self.host.memfd_secret() if kind == "memfd_secret" else self.host.memfd_create()
                file.ftruncate(size)
            mapping = file.mmap(size)
        cal = call_interrupts()
        t0 = time.perf_counter_ns()
        self.touch(mapping.addr, pages)
        t1 = time.perf_counter_ns()
        ipis = call_interrupts() - cal
        t2 = time.perf_counter_ns()
        mapping.munmap()
        if file is not None:
            file.close()
        t3 = time.perf_counter_ns()
        return _Sample((t1 - t0) / pages, (t3 - t2) / pages, ipis)

    def _guest(self) -> _Sample:
        size, pages = self.config.size, self.config.pages
        gmem = self.guest_vm.create_guest_memfd(size, SHARED)
        self.guest_vm.set_user_memory_region2(
            GUEST_SLOT, uapi.KVM_MEM_GUEST_MEMFD, GUEST_GPA, size, 0, gmem, 0
        )
        before = self.vcpu.stats()
        first = self._timed_touch()
        after = self.vcpu.stats()
        second = self._timed_touch()  # the same pages, already mapped
        t0 = time.perf_counter_ns()
        self.guest_vm.set_user_memory_region2(GUEST_SLOT, uapi.KVM_MEM_GUEST_MEMFD, GUEST_GPA, 0)
        gmem.close()
        t1 = time.perf_counter_ns()
        extra = {
            "second_pass_ns": second,
            "pf_fixed": (after["pf_fixed"] - before["pf_fixed"]) / pages,
            "insn_emulation": (after["insn_emulation"] - before["insn_emulation"]) / pages,
        }
        return _Sample(first, (t1 - t0) / pages, 0, extra)

    def _timed_touch(self) -> float:
        """ns per page of one KVM_RUN that runs the Touch loop and exits once, at the end."""
        self.vcpu.load_program(self.touch_program)
        t0 = time.perf_counter_ns()
        exit_ = self.vcpu.run()
        elapsed = time.perf_counter_ns() - t0
        if not isinstance(exit_, api.IoOut):
            raise RuntimeError(f"guest touch loop stopped with {exit_}")
        return elapsed / self.config.pages

    def roundtrip(self, iterations: int) -> tuple[float, float]:
        """Mean ns per exit for ``run()`` and for a bare ``ioctl(KVM_RUN)`` loop."""
        self.vcpu.load_program(GuestProgram())  # loops on the PORT_DONE doorbell
        self.vcpu.run()
        t0 = time.perf_counter_ns()
        for _ in range(iterations):
            self.vcpu.run()
        t1 = time.perf_counter_ns()
        fd, kvm_run = self.vcpu.fileno(), uapi.KVM_RUN
        for _ in range(iterations):
            fcntl.ioctl(fd, kvm_run, 0)
        t2 = time.perf_counter_ns()
        return (t1 - t0) / iterations, (t2 - t1) / iterations


def run_measurement(
    config: MeasureConfig, host: TwinHost | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every kind ``config.reps`` times (after one warm-up rotation); see the schema above."""
    host = host or TwinHost()
    say = progress or (lambda _: None)
    roundtrips: list[tuple[float, float]] = []
    dm_before = _dm(read_direct_map())
    with ExitStack() as stack, pinned(config.cpu):
        bench = _Bench.open(stack, host, config)
        kinds = bench.kinds
        for kind, why in bench.unavailable.items():
            say(f"{kind}: not measured: {why}")
        samples: dict[str, list[_Sample]] = {k: [] for k in kinds}
        say("warm-up: memfd_secret first (direct-map splits), then the other kinds")
        bench.run("memfd_secret")
        dm_first = _dm(read_direct_map())
        for kind in kinds:
            if kind != "memfd_secret":
                bench.run(kind)
        bench.roundtrip(config.roundtrip_iterations // 10 or 1)
        for rep in range(config.reps):
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
            for kind in order:
                say(f"rep {rep + 1}/{config.reps}: {kind}")
                samples[kind].append(bench.run(kind))
            roundtrips.append(bench.roundtrip(config.roundtrip_iterations))
    dm_after = _dm(read_direct_map())
    return _report(config, samples, bench.unavailable, roundtrips, dm_before, dm_first, dm_after)


def _report(
    config: MeasureConfig,
    samples: dict[str, list[_Sample]],
    unavailable: dict[str, str],
    roundtrips: list[tuple[float, float]],
    dm_before: dict[str, int],
    dm_first: dict[str, int],
    dm_after: dict[str, int],
) -> dict[str, Any]:
    fault = {k: stats([s.fault_ns for s in v]) for k, v in samples.items()}
    free = {k: stats([s.free_ns for s in v]) for k, v in samples.items()}
    host_kinds = [k for k in HOST_KINDS if k in samples]

    def med(table: dict[str, Any], kind: str) -> float:
        value: float = table[kind]["median"]
        return value

    derived = {"secretmem_minus_memfd_fault_ns_per_page": med(fault, "memfd_secret") - med(fault, "memfd")}
    if "guest_memfd" in samples:
        derived |= {
            "secretmem_minus_gmem_fault_ns_per_page": med(fault, "memfd_secret") - med(fault, "guest_memfd"),
            "secretmem_over_gmem_fault": med(fault, "memfd_secret") / med(fault, "guest_memfd"),
            "gmem_over_memfd_fault": med(fault, "guest_memfd") / med(fault, "memfd"),
            "secretmem_minus_gmem_free_ns_per_page": med(free, "memfd_secret") - med(free, "guest_memfd"),
            "secretmem_over_gmem_free": med(free, "memfd_secret") / med(free, "guest_memfd"),
        }
    guest = samples.get(GUEST_KIND)
    ipis = {k: statistics.median(s.ipis for s in samples[k]) / config.pages for k in host_kinds}
    return {
        "schema": SCHEMA,
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "pinned_cpu": config.cpu,
            "python": platform.python_version(),
        },
        "config": {
            "size_bytes": config.size,
            "pages": config.pages,
            "reps": config.reps,
            "roundtrip_iterations": config.roundtrip_iterations,
        },
        "unavailable": unavailable,
        "fault_ns_per_page": {k: fault[k] for k in host_kinds},
        "free_ns_per_page": {k: free[k] for k in host_kinds},
        "guest": None if guest is None else {
            "first_touch_ns_per_page": fault[GUEST_KIND],
            "second_pass_ns_per_page": stats([s.extra["second_pass_ns"] for s in guest]),
            "free_ns_per_page": free[GUEST_KIND],
            "pf_fixed_per_page": statistics.median(s.extra["pf_fixed"] for s in guest),
            "insn_emulation_per_page": statistics.median(s.extra["insn_emulation"] for s in guest),
        },
        "kvm_run": {
            "exit_roundtrip_ns": stats([r[0] for r in roundtrips]),
            "raw_ioctl_ns": stats([r[1] for r in roundtrips]),
        },
        "derived": derived,
        "ipis_per_page": ipis if os.path.exists(INTERRUPTS) else None,
        "direct_map_kB": {
            "before": dm_before,
            "after_first_secretmem_fault": dm_first,
            "after": dm_after,
            "first_secretmem_fault_delta": _dm_delta(dm_before, dm_first),
            "total_delta": _dm_delta(dm_before, dm_after),
        },
    }


def format_report(r: dict[str, Any]) -> str:
    """A readable summary of a :func:`run_measurement` result."""
    cfg = r["config"]
    lines = [
        f"kernel {r['machine']['kernel']}, {r['machine']['cpus']} CPUs, pinned to "
        f"{r['machine']['pinned_cpu']}; {cfg['size_bytes'] >> 20} MiB "
        f"({cfg['pages']} pages) x {cfg['reps']} reps",
        "",
        f"{'kind':<20} {'fault ns/page (min/median/max)':>34} {'free ns/page':>14} {'IPIs/page':>10}",
    ]
    ipis = r["ipis_per_page"] or {}
    for kind, f in r["fault_ns_per_page"].items():
        fr = r["free_ns_per_page"][kind]
        lines.append(f"{kind:<20} {_mmm(f):>34} {fr['median']:>14.0f} {ipis.get(kind, float('nan')):>10.2f}")
    g = r["guest"]
    if g is not None:
        lines.append(
            f"{'guest first touch':<20} {_mmm(g['first_touch_ns_per_page']):>34} "
            f"{g['free_ns_per_page']['median']:>14.0f}"
        )
        lines.append(
            f"{'guest second pass':<20} {_mmm(g['second_pass_ns_per_page']):>34}   "
            f"(pf_fixed/page {g['pf_fixed_per_page']:.2f}, "
            f"insn_emulation/page {g['insn_emulation_per_page']:.4f})"
        )
    lines.extend(f"{kind:<20} not measured: {why}" for kind, why in r.get("unavailable", {}).items())
    d = r["derived"]
    k = r["kvm_run"]
    dm = r["direct_map_kB"]
    lines.append("")
    if "secretmem_over_gmem_fault" in d:
        lines += [
            f"secretmem / guest_memfd fault: {d['secretmem_over_gmem_fault']:.2f}x "
            f"(+{d['secretmem_minus_gmem_fault_ns_per_page']:.0f} ns/page); "
            f"guest_memfd / memfd: {d['gmem_over_memfd_fault']:.2f}x",
            f"secretmem / guest_memfd free: {d['secretmem_over_gmem_free']:.2f}x "
            f"(+{d['secretmem_minus_gmem_free_ns_per_page']:.0f} ns/page)",
        ]
    else:
        lines.append(f"secretmem - memfd fault: +{d['secretmem_minus_memfd_fault_ns_per_page']:.0f} ns/page")
    lines += [
        f"KVM_RUN exit round trip: {_mmm(k['exit_roundtrip_ns'])} ns with run(); "
        f"raw ioctl {k['raw_ioctl_ns']['median']:.0f} ns",
        "DirectMap delta (kB) at the first secretmem fault: "
        + ", ".join(f"{key} {v:+d}" for key, v in dm["first_secretmem_fault_delta"].items())
        + "; whole run: "
        + ", ".join(f"{key} {v:+d}" for key, v in dm["total_delta"].items()),
    ]
    return "\n".join(lines)


def _mmm(s: dict[str, Any]) -> str:
    return f"{s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f}"
