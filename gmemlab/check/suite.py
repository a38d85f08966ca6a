"""Running the checker over designs and scenarios (what ``gmemlab check`` does)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gmemlab.check.execution import CHECKER_PROPERTIES, DesignSpec, make_design
from gmemlab.check.explore import Bounds, Progress, Result, explore, random_search
from gmemlab.check.scenarios import SCENARIOS, Scenario
from gmemlab.model.designs import DESIGNS
from gmemlab.model.host import Host
from gmemlab.model.invariants import INVARIANTS
from gmemlab.model.kvm.arch import PROFILES
from gmemlab.model.machine import Machine, MachineConfig
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_X86_DEFAULT_VM,
    X86_VM_TYPE_NAMES,
)


@dataclass(frozen=True, slots=True)
class Options:
    bounds: Bounds = field(default_factory=Bounds)
    ignore: frozenset[str] = frozenset()
    all_violations: bool = False  # report every property a cell breaks, not just the first
    random: bool = False  # PCT runs instead of exhaustive search
    seed: int = 0
    runs: int = 300
    pct_depth: int = 3
    workers: int = 1  # expanders per exhaustive search (0 with Ray: one per cluster CPU)
    ray: str | None = None  # Ray cluster address ("local": start one), None: no Ray


def series_designs() -> list[str]:
    """Every design that implements the series (the checker's default), in registry order."""
    return [name for name, factory in DESIGNS.items() if factory().series]


def property_names() -> list[str]:
    return [*INVARIANTS, *CHECKER_PROPERTIES]


def flag_refused(design: DesignSpec, profile: str, vm_type: int = KVM_X86_DEFAULT_VM) -> str | None:
    """Why ``design`` on ``profile`` does not offer NO_DIRECT_MAP to ``vm_type`` (None: it does).

    Asked as a VMM asks: ``KVM_CHECK_EXTENSION`` on a VM of that type on a model host.
    """
    d = make_design(design)
    m = Machine(MachineConfig(ram_gib=0, low_ram_mib=2, ncpus=1, trace="off", invariants="off"),
                profile=profile, design=d)
    prof = PROFILES[profile]
    with Host(m).open_kvm() as kvm:
        if not kvm.check_extension(KVM_CAP_GUEST_MEMFD):
            return f"KVM on {profile} builds no guest_memfd (KVM_CAP_GUEST_MEMFD = 0)"
        with kvm.create_vm(vm_type) as vm:
            flags = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP:
        return None
    if vm_type != KVM_X86_DEFAULT_VM:
        return (f"{d.name} does not offer NO_DIRECT_MAP to {X86_VM_TYPE_NAMES[vm_type]} VMs on "
                f"{profile} (a VM type it excludes; the what-if profile x86_64-what-if-snp-tdx "
                f"lifts that)")
    why = ("not in this version" if not d.series else
           "can_set_direct_map() is false" if not prof.can_set_direct_map else
           "no FEAT_S2FWB" if prof.arch == "arm64" and not prof.s2fwb else
           "not in this version")
    return (f"{d.name} does not offer NO_DIRECT_MAP on {profile}: {why} "
            f"(KVM_CAP_GUEST_MEMFD_FLAGS = {flags:#x})")


def check_one(design: DesignSpec, scenario: Scenario, opts: Options = Options(), *,
              design_name: str | None = None, progress: Progress | None = None) -> Result:
    """One cell: ``scenario`` (on its profile) explored on ``design``, or skipped, saying why."""
    skipped = scenario.cannot_run() or flag_refused(design, scenario.profile, scenario.vm_type)
    if skipped is not None:
        name = design_name or (design if isinstance(design, str) else make_design(design).name)
        return Result(scenario.name, name, "random" if opts.random else "exhaustive", opts.bounds,
                      profile=scenario.profile, skipped=skipped, complete=False)
    if opts.random:
        return random_search(scenario, design, seed=opts.seed, runs=opts.runs, depth=opts.pct_depth,
                             design_name=design_name, bounds=opts.bounds, ignore=opts.ignore,
                             stop_at_first=not opts.all_violations, progress=progress)
    return explore(scenario, design, design_name=design_name, bounds=opts.bounds, ignore=opts.ignore,
                   stop_at_first=not opts.all_violations, progress=progress, workers=opts.workers,
                   ray_address=opts.ray)


def check(designs: Iterable[str], scenarios: Iterable[Scenario] = tuple(SCENARIOS.values()),
          opts: Options = Options(),
          progress: Callable[[str, Scenario], Progress | None] | None = None,
          profiles: Iterable[str] = ("x86_64",)) -> list[Result]:
    """Every design against every scenario on every profile; ``progress(design, scenario)``
    makes a callback."""
    cells = [s.on(p) for p in profiles for s in scenarios]
    out = []
    for d in designs:
        for s in cells:
            out.append(check_one(d, s, opts, progress=progress(d, s) if progress else None))
    return out
