"""Calibrating the cost model on this machine, from a ``gmemlab measure`` result.

Inputs (a ``gmemlab.measure/1`` JSON, see :mod:`gmemlab.twin.measure`): medians
per 4 KiB page of the host first-touch fault of guest_memfd, memfd and
memfd_secret, the guest's first touch through ``kvm_gmem_get_pfn``, the free
costs, and IPIs per page.  The measured kernel is mainline (design ``base``):
its memfd_secret fault is the only path on it that removes pages from the
direct map and flushes.

What the model does per page of each measured run (its *composition*: event
counts per page) comes from running the measurement's own procedure on the
model (:func:`compositions`): one warm-up run, then the measured one, on a
machine with the measured number of CPUs.  The fit, in order:

1. A guest fault's parts keep the shares measured on this kind of machine
   (``realkernel.md`` §4.2: of 3.65 µs, ~2.5 KVM fault and map, ~0.9 allocation
   and page-cache insert, ~0.25 zeroing); the measured guest first touch sets
   their scale.  ``guest_fault`` is what is left after allocation, insert and
   zeroing.
2. ``user_fault`` is what is left of the measured guest_memfd host fault.
3. ``free_page`` is the measured guest_memfd free cost per page.
4. The extra cost of memfd_secret over memfd (a page-cache fault without the
   removal: realkernel.md §4.5 defines "removal + flush per page" this way),
   minus the priced events the composition adds (the direct-map PTE change and
   the local flush; priors), is the IPI round trip at the measured CPU count;
   the prior's shape (1 µs + 0.2 µs per receiving CPU) is scaled to it.  That
   is the extrapolation to other CPU counts.

Measured directly when a ``gmemlab measure --primitives`` result is given
(:class:`Primitives`; the one committed for this machine is
:data:`PRIMITIVES_FILE`, see :mod:`gmemlab.twin.primitives` for how): the PTE
change and the local flush (``mprotect()`` of anonymous memory), the VMM's page
copy (``memmove()``), and a direct-map split (a memfd_secret fault that split,
less one that did not), from which the split's own ``flush_tlb_all()`` (the
local flush and the fitted IPI round trip at the measured CPU count) is taken
out, since the model counts that flush apart.  A mermap map+unmap is then two
measured PTE changes and a measured local flush.

What stays a prior (anchors §E.4 unless noted), and every one of the above
when no primitives are given: the direct-map PTE change (0.3 µs), a split's
table fill (1 µs), the local INVLPG (0.1 µs, the ``arch/x86/mm/tlb.c``
estimate), the VMM's 4 KiB memcpy (0.4 µs, ~10 GB/s), an order-9 allocation
handed out as 512 folios (512 order-0 allocations: the per-folio work, not the
buddy list operation, is what an allocation costs [assumption]), a mermap
map+unmap (two PTE changes and an INVLPG).  :attr:`Calibration.sources` says,
for every figure, which it is.

The checks then compare what the fitted model predicts for each measured kind
with the measurement.  The memfd_secret fault is predicted as the model prices
its events: a fault like guest_memfd's (step 2) plus the removal and flush
(step 4, learnt against memfd), so its error is how far memfd_secret's fault
is from "guest_memfd's fault plus what removal adds to a page-cache fault".
The other independent checks are the memfd fault, the memfd_secret free
(restore and zeroing, from priors) and IPIs per page.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from gmemlab.cost.model import IPI_PRIOR_BASE_US, IPI_PRIOR_PER_CPU_US, CostModel, CostParams
from gmemlab.uapi import PAGE_SIZE, PAGES_PER_PMD

SCHEMA = "gmemlab.measure/1"
PRIMITIVES_SCHEMA = "gmemlab.primitives/1"
DEFAULT_FILE = "calibration-6.18.44-fc-v657.json"  # measured on this project's machines
PRIMITIVES_FILE = "primitives-6.18.44-fc-v1300.json"  # gmemlab measure --primitives, this machine
REFERENCE_FILE = "calibration-realkernel-md.json"  # realkernel.md §4, transcribed

# realkernel.md §4.2: a guest fault through kvm_gmem_get_pfn on this kind of machine.
REF_GUEST_FAULT_US = 3.65
REF_SHARES = {"guest_fault": 2.5, "alloc_insert": 0.9, "zero_page": 0.25}

PRIORS = CostParams(
    user_fault=0.0,  # fitted
    guest_fault=0.0,  # fitted
    alloc_page=0.45,  # half of the 0.9 µs "allocation and page-cache insert" (realkernel §4.2), scaled
    alloc_block=0.0,  # 512 folios, each paying an allocation's per-folio work: set from alloc_page
    pagecache_add=0.45,  # the other half, scaled
    zero_page=0.25,  # realkernel §4.2, scaled
    pte_change=0.3,  # anchors §E.4: 0.1-0.5 µs, CPA lock and PTE write
    split=1.0,  # anchors §E.4: 512 PTE writes and the table install [unverified]
    flush_local=0.1,  # arch/x86/mm/tlb.c: ~100 ns per INVLPG
    ipi_base=IPI_PRIOR_BASE_US,  # fitted scale
    ipi_per_cpu=IPI_PRIOR_PER_CPU_US,  # fitted scale
    free_page=0.0,  # fitted
    user_copy_page=0.4,  # 4 KiB memcpy at ~10 GB/s [unverified]
    mermap=0.7,  # two PTE changes and a local INVLPG
)
SCALED = ("alloc_page", "pagecache_add", "zero_page")  # measured shares of a guest fault

# Where each CostParams figure comes from, before any primitive is measured.
PRIOR_SOURCES: dict[str, str] = {
    "user_fault": "fitted: measured guest_memfd fault less the priced rest",
    "guest_fault": "fitted: measured guest first touch less the priced rest",
    "alloc_page": "prior share (realkernel §4.2) scaled to the measured guest fault",
    "alloc_block": "prior: 512 x alloc_page",
    "pagecache_add": "prior share (realkernel §4.2) scaled to the measured guest fault",
    "zero_page": "prior share (realkernel §4.2) scaled to the measured guest fault",
    "pte_change": "prior: anchors §E.4, 0.1-0.5 µs",
    "split": "prior: anchors §E.4 [unverified]",
    "flush_local": "prior: arch/x86/mm/tlb.c, ~100 ns per INVLPG",
    "ipi_base": "fitted: measured memfd_secret - memfd fault, prior shape 1 + 0.2/CPU",
    "ipi_per_cpu": "fitted: measured memfd_secret - memfd fault, prior shape 1 + 0.2/CPU",
    "free_page": "fitted: measured guest_memfd free",
    "user_copy_page": "prior: 4 KiB at ~10 GB/s [unverified]",
    "mermap": "prior: two PTE changes and a local INVLPG",
}


KINDS = ("measured", "fitted", "prior")


def source_kind(source: str) -> str:
    """``measured``, ``fitted`` or ``prior``: the first word of a :data:`PRIOR_SOURCES` entry."""
    return source.split(":", 1)[0].split(" ", 1)[0]


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Measurement:
    """The medians the calibration uses, in µs per 4 KiB page."""

    source: str
    kernel: str
    cpus: int
    gmem_fault: float
    memfd_fault: float
    secretmem_fault: float
    secretmem_fault_min: float
    secretmem_fault_max: float
    guest_fault: float
    gmem_free: float
    secretmem_free: float
    secretmem_ipis_per_page: float | None
    direct_map_kb: tuple[int, int, int] | None = None  # DirectMap4k/2M/1G before the runs
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: object, source: str) -> Measurement:
        """Parse a ``gmemlab measure`` result; CalibrationError names the first field that is
        missing, not a number, or not positive (times) / negative (counts)."""
        if not isinstance(d, Mapping):
            raise CalibrationError(f"{source}: a JSON {type(d).__name__}, not a {SCHEMA} measurement")
        if d.get("schema") != SCHEMA:
            raise CalibrationError(f"{source}: not a {SCHEMA} measurement (schema {d.get('schema')!r})")

        def number(*path: str, positive: bool = True, required: bool = True) -> float | None:
            """The number at ``path``: > 0 for times and CPUs, >= 0 for counts."""
            value: Any = d
            for key in path:
                if not isinstance(value, Mapping) or value.get(key) is None:
                    if required:
                        raise CalibrationError(f"{source}: missing field {'.'.join(path)}")
                    return None
                value = value[key]
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                raise CalibrationError(f"{source}: {'.'.join(path)} = {value!r} is not a "
                                       f"{'positive' if positive else 'non-negative'} number")
            return float(value)

        def us(*path: str) -> float:
            return (number(*path) or 0.0) / 1000

        machine = d.get("machine")
        kernel = machine.get("kernel") if isinstance(machine, Mapping) else None
        if not isinstance(kernel, str):
            raise CalibrationError(f"{source}: missing field machine.kernel")
        dm = [number("direct_map_kB", "before", k, positive=False, required=False)
              for k in ("4k", "2M", "1G")]
        provenance = d.get("provenance", {})
        return cls(
            source=source,
            kernel=kernel,
            cpus=int(number("machine", "cpus") or 0),
            gmem_fault=us("fault_ns_per_page", "guest_memfd", "median"),
            memfd_fault=us("fault_ns_per_page", "memfd", "median"),
            secretmem_fault=us("fault_ns_per_page", "memfd_secret", "median"),
            secretmem_fault_min=us("fault_ns_per_page", "memfd_secret", "min"),
            secretmem_fault_max=us("fault_ns_per_page", "memfd_secret", "max"),
            guest_fault=us("guest", "first_touch_ns_per_page", "median"),
            gmem_free=us("free_ns_per_page", "guest_memfd", "median"),
            secretmem_free=us("free_ns_per_page", "memfd_secret", "median"),
            secretmem_ipis_per_page=number("ipis_per_page", "memfd_secret", positive=False, required=False),
            direct_map_kb=(int(dm[0]), int(dm[1]), int(dm[2])) if dm[0] is not None and dm[1] is not None
            and dm[2] is not None else None,
            provenance=dict(provenance) if isinstance(provenance, Mapping) else {},
        )


@dataclass(frozen=True, slots=True)
class Primitives:
    """The primitives measured by ``gmemlab measure --primitives`` (:mod:`gmemlab.twin.primitives`),
    in µs."""

    source: str
    kernel: str
    cpus: int
    pte_change: float | None  # None: not measured (noise larger than the effect)
    flush_local: float | None
    copy_page: float
    split_fault_extra: float | None  # None: no fault split while measuring
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: object, source: str) -> Primitives:
        """Parse a ``gmemlab.primitives/1`` result; CalibrationError names what is wrong."""
        if not isinstance(d, Mapping) or d.get("schema") != PRIMITIVES_SCHEMA:
            raise CalibrationError(f"{source}: not a {PRIMITIVES_SCHEMA} result")

        def ns(*path: str, required: bool = True) -> float | None:
            value: Any = d
            for key in path:
                if not isinstance(value, Mapping) or key not in value:
                    if required:
                        raise CalibrationError(f"{source}: missing field {'.'.join(path)}")
                    return None
                value = value[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise CalibrationError(f"{source}: {'.'.join(path)} = {value!r} is not a positive number")
            return float(value) / 1000

        machine = d.get("machine")
        if not isinstance(machine, Mapping) or not isinstance(machine.get("kernel"), str) \
                or not isinstance(machine.get("cpus"), int):
            raise CalibrationError(f"{source}: missing field machine.kernel or machine.cpus")
        provenance = d.get("provenance", {})
        return cls(source, machine["kernel"], machine["cpus"],
                   pte_change=ns("mprotect", "pte_change_ns", required=False),
                   flush_local=ns("mprotect", "flush_local_ns", required=False),
                   copy_page=ns("copy_page_ns", "median") or 0.0,
                   split_fault_extra=ns("split_2m", "extra_ns", required=False),
                   provenance=dict(provenance) if isinstance(provenance, Mapping) else {})


def _load_json(path: str | Path | None, committed: str) -> tuple[Any, str]:
    """The JSON document at ``path``, or the one committed as ``cost/data/<committed>``, and
    where it came from; an unreadable file is a :class:`CalibrationError`."""
    if path is None:
        text = resources.files("gmemlab.cost").joinpath("data").joinpath(committed).read_text()
        return json.loads(text), f"gmemlab/cost/data/{committed}"
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8")), str(p)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{p}: {e}") from e


def load_primitives(path: str | Path | None = None) -> Primitives:
    """Primitives from ``path``, or the ones committed for this machine (:data:`PRIMITIVES_FILE`)."""
    return Primitives.from_json(*_load_json(path, PRIMITIVES_FILE))


def load_measurement(path: str | Path | None = None) -> Measurement:
    """A measurement from ``path``, or the one committed for this project's machines."""
    return Measurement.from_json(*_load_json(path, DEFAULT_FILE))


def with_provenance(result: dict[str, Any], command: str) -> dict[str, Any]:
    """A measurement result stamped with how, when and from which tree it was made."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        head = ""
    out = dict(result)
    out["provenance"] = {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_head": head or None,
    }
    return out


# --- the model's composition of each measured run ----------------------------------------------
Composition = dict[str, dict[str, float]]  # measured run -> events per page


def compositions(cpus: int, pages: int = 256) -> Composition:
    """Events per page of each measured run, by the measurement's procedure, on mainline."""
    from gmemlab.expose.scenario import Scenario, ScenarioConfig
    from gmemlab.model.host import MemFile

    sc = Scenario("base", ScenarioConfig(ncpus=cpus, no_direct_map=False))
    host, trace = sc.host, sc.m.trace
    out: Composition = {}

    def per_page(before: Counter[str]) -> dict[str, float]:
        return {k: v / pages for k, v in (Counter(trace.counts) - before).items()}

    def host_run(kind: str, rep: int) -> None:
        vm = sc.kvm.create_vm() if kind == "guest_memfd" else None
        f: MemFile
        if vm is not None:
            f = vm.create_guest_memfd(pages * PAGE_SIZE, sc.gmem_flags)
        else:
            f = host.memfd_secret() if kind == "memfd_secret" else host.memfd_create()
            f.ftruncate(pages * PAGE_SIZE)
        mapping = f.mmap(pages * PAGE_SIZE)
        before = Counter(trace.counts)
        mapping.fill(0, pages * PAGE_SIZE, 1)
        if rep:
            out[f"{kind} fault"] = per_page(before)
        before = Counter(trace.counts)
        mapping.munmap()
        f.close()
        if rep:
            out[f"{kind} free"] = per_page(before)
        if vm is not None:
            vm.close()

    # Like gmemlab measure: memfd_secret first (the direct-map splits), then the rest, then reps.
    for rep in range(2):
        for kind in ("memfd_secret", "memfd", "guest_memfd"):
            host_run(kind, rep)
        g = sc.new_guest(pages)
        before = Counter(trace.counts)
        sc.guest_fill(g, 1)
        if rep:
            out["guest fault"] = per_page(before)
        sc.close_guest(g)
    return out


# --- the fit -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Check:
    name: str
    measured: float | None
    predicted: float
    role: str  # "fit", "prediction" or "model only"
    unit: str = "µs/page"

    @property
    def error(self) -> float | None:
        if self.measured is None or not self.measured:
            return None
        return (self.predicted - self.measured) / self.measured


@dataclass(frozen=True, slots=True)
class Calibration:
    measurement: Measurement
    params: CostParams
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=lambda: dict(PRIOR_SOURCES))  # CostParams field -> how
    primitives: Primitives | None = None

    def kind(self, param: str) -> str:
        """``measured``, ``fitted`` or ``prior`` for a CostParams field (``ipi``: the fitted round trip)."""
        return source_kind(self.sources["ipi_base" if param == "ipi" else param])

    def kinds_line(self) -> str:
        """``N measured, N fitted, N prior``: how many per-event figures are of each kind."""
        counts = Counter(self.kind(k) for k in self.sources)
        return ", ".join(f"{counts[k]} {k}" for k in KINDS)

    def priced_by(self, breakdown: Mapping[str, float]) -> dict[str, float]:
        """The share of a :meth:`CostModel.breakdown` priced by measured, fitted and prior figures."""
        total = sum(breakdown.values())
        out = dict.fromkeys(KINDS, 0.0)
        for param, us in breakdown.items():
            out[self.kind(param)] += us / total if total else 0.0
        return out

    def model(self, ncpus: int | None = None) -> CostModel:
        return CostModel(self.params, self.measurement.cpus if ncpus is None else ncpus)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def as_json(self) -> dict[str, Any]:
        meas = self.measurement
        return {
            "source": meas.source,
            "kernel": meas.kernel,
            "cpus": meas.cpus,
            "provenance": meas.provenance,
            "params_us": self.params.as_dict(),
            "param_sources": {k: {"kind": self.kind(k), "how": v} for k, v in self.sources.items()},
            "primitives": None if self.primitives is None else {
                "source": self.primitives.source, "kernel": self.primitives.kernel,
                "cpus": self.primitives.cpus, "provenance": self.primitives.provenance},
            "ipi_round_us": {str(n): self.params.ipi_round(n) for n in (2, 4, 8, 16, 32, 64, 128)},
            "checks": [
                {"name": c.name, "measured": c.measured, "predicted": c.predicted, "role": c.role,
                 "unit": c.unit, "error": c.error}
                for c in self.checks
            ],
            "notes": list(self.notes),
        }


def _priced(model: CostModel, events: Mapping[str, float], *, without: tuple[str, ...] = ()) -> float:
    return model.time_us({k: v for k, v in events.items() if k not in without})


def calibrate(meas: Measurement, comp: Composition | None = None,
              primitives: Primitives | None = None) -> Calibration:
    """Fit :class:`CostParams` to ``meas`` (see the module docstring for the steps), with the
    measured ``primitives`` in place of their priors."""
    comp = comp if comp is not None else compositions(meas.cpus)
    notes: list[str] = []
    sources = dict(PRIOR_SOURCES)
    scale = meas.guest_fault / REF_GUEST_FAULT_US
    shares = {"alloc_page": REF_SHARES["alloc_insert"] / 2, "pagecache_add": REF_SHARES["alloc_insert"] / 2,
              "zero_page": REF_SHARES["zero_page"]}
    p = replace(PRIORS, **{k: shares[k] * scale for k in SCALED}, ipi_base=0.0, ipi_per_cpu=0.0)
    p = replace(p, alloc_block=PAGES_PER_PMD * p.alloc_page)
    if primitives is not None:
        where = f"{primitives.source}, kernel {primitives.kernel}"
        p = replace(p, user_copy_page=primitives.copy_page)
        sources["user_copy_page"] = f"measured: memmove of 64 MiB, per 4 KiB ({where})"
        if primitives.pte_change is not None and primitives.flush_local is not None:
            p = replace(p, pte_change=primitives.pte_change, flush_local=primitives.flush_local,
                        mermap=2 * primitives.pte_change + primitives.flush_local)
            sources |= {
                "pte_change": f"measured: mprotect of anonymous memory, per PTE ({where}); a user PTE "
                              "change standing for CPA's",
                "flush_local": f"measured: mprotect of one page less one PTE change: INVLPG ({where})",
                "mermap": "measured: two measured PTE changes and a measured local flush",
            }
        else:
            notes.append(f"pte_change, flush_local: {primitives.source} has no usable mprotect figures; "
                         "priors kept")

    def solve(p: CostParams, field_: str, event: str, measured: float, kind: str) -> CostParams:
        events = comp[kind]
        rest = _priced(CostModel(p, meas.cpus), events, without=(event,))
        per = events.get(event, 0)
        if not per:
            raise CalibrationError(f"the model's {kind} has no {event!r} event to fit {field_} on")
        value = (measured - rest) / per
        if value < 0:
            notes.append(f"{field_}: the measured {kind} ({measured:.2f} µs) is below the priced rest "
                         f"({rest:.2f} µs); set to 0")
            value = 0.0
        return replace(p, **{field_: value})

    p = solve(p, "guest_fault", "spte_map", meas.guest_fault, "guest fault")
    p = solve(p, "user_fault", "user_fault", meas.gmem_fault, "guest_memfd fault")
    p = solve(p, "free_page", "free_page", meas.gmem_free, "guest_memfd free")
    secret, memfd = comp["memfd_secret fault"], comp["memfd fault"]
    extra = {k: secret.get(k, 0) - memfd.get(k, 0) for k in secret.keys() | memfd.keys()}
    flushes = extra.get("tlb_flush", 0)
    if flushes <= 0:
        raise CalibrationError("the model's memfd_secret fault does not flush more than memfd's")
    removal = _priced(CostModel(p, meas.cpus), extra)
    round_trip = (meas.secretmem_fault - meas.memfd_fault - removal) / flushes
    shape = IPI_PRIOR_BASE_US + IPI_PRIOR_PER_CPU_US * (meas.cpus - 1)
    if meas.cpus <= 1 or round_trip <= 0:
        notes.append(f"no IPI round trip to fit ({meas.cpus} CPU(s), {round_trip:.2f} µs); prior kept")
        factor = 1.0
    else:
        factor = round_trip / shape
    p = replace(p, ipi_base=IPI_PRIOR_BASE_US * factor, ipi_per_cpu=IPI_PRIOR_PER_CPU_US * factor)
    if primitives is not None and primitives.split_fault_extra is not None:
        # The split fault also ran split_large_page()'s flush_tlb_all(), which the model counts as
        # a tlb_flush of its own: take it out at the CPU count the primitives were measured on.
        flush = p.flush_local + p.ipi_round(primitives.cpus)
        split = primitives.split_fault_extra - flush
        if split < 0:
            notes.append(f"split: the measured split fault adds {primitives.split_fault_extra:.2f} µs, "
                         f"below its flush ({flush:.2f} µs); set to 0")
        p = replace(p, split=max(split, 0.0))
        sources["split"] = (f"measured: memfd_secret fault that split less one that did not, less its "
                            f"flush_tlb_all() ({primitives.source}, kernel {primitives.kernel})")
    elif primitives is not None:
        notes.append(f"split: {primitives.source} saw no fault split the direct map; prior kept")
    return Calibration(meas, p, _checks(meas, p, comp), tuple(notes), sources, primitives)


def _checks(meas: Measurement, p: CostParams, comp: Composition) -> tuple[Check, ...]:
    model = CostModel(p, meas.cpus)

    def at(kind: str) -> float:
        return model.time_us(comp[kind])

    secret_ipis = comp["memfd_secret fault"].get("tlb_flush", 0) * (meas.cpus - 1)
    return (
        Check("guest_memfd fault", meas.gmem_fault, at("guest_memfd fault"), "fit"),
        Check("guest first touch (kvm_gmem_get_pfn)", meas.guest_fault, at("guest fault"), "fit"),
        Check("guest_memfd free", meas.gmem_free, at("guest_memfd free"), "fit"),
        Check("memfd_secret - memfd fault", meas.secretmem_fault - meas.memfd_fault,
              at("memfd_secret fault") - at("memfd fault"), "fit"),
        Check("memfd_secret fault", meas.secretmem_fault, at("memfd_secret fault"), "prediction"),
        Check("memfd fault", meas.memfd_fault, at("memfd fault"), "prediction"),
        Check("memfd_secret free", meas.secretmem_free, at("memfd_secret free"), "prediction"),
        Check("memfd_secret IPIs", meas.secretmem_ipis_per_page, secret_ipis, "prediction", "per page"),
    )
