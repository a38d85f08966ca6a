"""Run the conformance cases on the real kernel and on the model, side by side.

The model takes the profile of the running kernel, read from what /dev/kvm
advertises: the VM types it accepts, whether memory attributes are built, and
the guest_memfd flags (without NO_DIRECT_MAP the design is ``base``, mainline
without the series).  With that profile every case must give the same outcome
on both.  Where /dev/kvm is missing, the real side is the outcomes recorded on
our machines (``gmemlab.conformance.recorded``).

On a kernel without guest_memfd at all (``KVM_CAP_GUEST_MEMFD`` = 0) every case
that does not need it still runs live, against the model of that kernel; the
cases that need it are compared with the recorded outcomes, on the model of the
recorded kernel, and are marked so.

NO_DIRECT_MAP variants cannot run on a kernel without the flag; they run on the
model with the series (v12) and are listed apart, against what the real
kernel gives without the flag: identical, except where the case reaches the
mapping through GUP, which the flag refuses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gmemlab import api, uapi
from gmemlab.conformance.cases import CASES, NDM, Case, Outcome, Unsupported, run_case
from gmemlab.conformance.recorded import RECORDED_ON, expected
from gmemlab.model import Host as ModelHost
from gmemlab.model import Machine, MachineConfig
from gmemlab.model.designs import DESIGNS
from gmemlab.model.kvm.arch import PROFILES, ArchProfile

MODEL_CONFIG = MachineConfig(ram_gib=0, low_ram_mib=256, trace="ring", invariants="stop")
FLAG_REASON = "GUP refuses AS_NO_DIRECT_MAP (v12 04-06): fails as on memfd_secret"


@dataclass(frozen=True, slots=True)
class RunningKernel:
    """What the model needs to know about the kernel it is compared with."""

    description: str
    profile: ArchProfile
    design: str


def running_kernel(kvm: api.Kvm) -> RunningKernel:
    """Derive the model's profile from what the kernel advertises on /dev/kvm."""
    types_mask = kvm.check_extension(uapi.KVM_CAP_VM_TYPES) or 1
    vm_types = frozenset(t for t in range(32) if types_mask >> t & 1)
    with kvm.create_vm() as vm:
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        attrs = vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    profile = PROFILES["x86_64"].with_(
        name=f"running kernel ({os.uname().release})",
        description="derived from KVM_CHECK_EXTENSION on /dev/kvm",
        vm_types=vm_types,
        memory_attributes=bool(attrs) or bool(kvm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)),
        has_guest_memfd=bool(kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD)),
    )
    design = _design_of(os.uname().release, bool(flags & uapi.GUEST_MEMFD_FLAG_NO_DIRECT_MAP))
    return RunningKernel(f"Linux {os.uname().release}, guest_memfd flags "
                         f"{uapi.gmem_flags_str(flags)}", profile, design)


def _design_of(release: str, no_direct_map: bool) -> str:
    """The design that is the running kernel's code: a 6.18 kernel is ``6.18`` (the guest
    fault tracks preparedness) or, offering NO_DIRECT_MAP, Firecracker's port of the series
    (``fc-6.18``, the only 6.18 kernel that has it); any other is taken for kvm/next, the
    base the series was posted on (``base``, ``v12``)."""
    if release.startswith("6.18"):
        return "fc-6.18" if no_direct_map else "6.18"
    return "v12" if no_direct_map else "base"


RECORDED_KERNEL = RunningKernel(RECORDED_ON, PROFILES["x86_64-kvm_pvm-6.18"], "6.18")


def model_factory(profile: ArchProfile, design: str) -> Callable[[], api.Host]:
    return lambda: ModelHost(Machine(MODEL_CONFIG, profile=profile, design=design))


@dataclass(slots=True)
class CaseResult:
    case: Case
    real: Outcome | None  # None: the real side could not run it
    model: Outcome
    note: str = ""
    recorded: bool = False  # the real side is the recorded outcome, not the running kernel

    @property
    def match(self) -> bool:
        return self.real == self.model


@dataclass(slots=True)
class Report:
    real_name: str
    live: bool
    model_name: str
    results: list[CaseResult] = field(default_factory=list)
    flag_results: list[CaseResult] = field(default_factory=list)

    @property
    def mismatches(self) -> list[CaseResult]:
        return [r for r in self.results if not r.match]


def outcome_of(c: Case, host: api.Host) -> Outcome:
    try:
        return run_case(c, host)
    except Unsupported as e:
        return f"unsupported: {e}"


def compare(real: api.Host | None, *, names: Iterable[str] | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Run the cases on ``real`` (or the recorded outcomes if None) and on the model.

    A case ``real`` cannot run (it needs guest_memfd, which that kernel lacks) is held to
    its recorded outcome on the model of the recorded kernel.
    """
    if real is not None:
        with real.open_kvm() as kvm:
            kernel = running_kernel(kvm)
    else:
        kernel = RECORDED_KERNEL
    gmem = kernel.profile.has_guest_memfd
    model = model_factory(kernel.profile, kernel.design)
    recorded_model = model_factory(RECORDED_KERNEL.profile, RECORDED_KERNEL.design)
    with_flag = model_factory(kernel.profile if gmem else RECORDED_KERNEL.profile, "v12")
    live = real if gmem else None  # who answers the guest_memfd cases
    report = Report(kernel.description, real is not None,
                    f"model: profile '{kernel.profile.name}', design {kernel.design}")
    selected = [CASES[n] for n in (names if names is not None else CASES)]
    for i, c in enumerate(selected):
        if progress:
            progress(i, len(selected), c.name)
        if c.gmem_flags is not None and c.gmem_flags & NDM and not DESIGNS[kernel.design]().series:
            report.flag_results.append(_flag_variant(c, live, with_flag))
        elif real is None or (c.needs_guest_memfd and not gmem):
            report.results.append(CaseResult(c, expected(c), outcome_of(c, recorded_model()),
                                             recorded=real is not None))
        else:
            report.results.append(CaseResult(c, outcome_of(c, real), outcome_of(c, model())))
    return report


def _flag_variant(c: Case, real: api.Host | None, with_flag: Callable[[], api.Host]) -> CaseResult:
    """A NO_DIRECT_MAP case the kernel cannot run: the model with the flag, against the rule.

    ``real`` holds what the kernel gives without the flag, or on memfd_secret for a
    GUP path, which is what the model must give with it.
    """
    assert c.gmem_flags is not None
    base = c.name.split("[", 1)[0]
    if c.direct_map_dependent:
        reference = CASES[base.removesuffix(".guest_memfd") + ".memfd_secret"]
        note = FLAG_REASON
    else:
        reference = CASES[f"{base}[{uapi.gmem_flags_str(c.gmem_flags & ~NDM)}]"]
        note = "the flag changes nothing a syscall can see"
    want = outcome_of(reference, real) if real is not None else expected(reference)
    return CaseResult(c, want, outcome_of(c, with_flag()), note)
