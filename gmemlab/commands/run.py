"""``gmemlab run``: the full lifecycle of a NO_DIRECT_MAP guest on the model, and its report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gmemlab.cli import UsageError, design_arg, float_in, ncpus, output_file
from gmemlab.model import DESIGNS, PROFILES, Host, Machine, MachineConfig
from gmemlab.report import Cell, dump_json, kib, table
from gmemlab.scenarios.lifecycle import COLUMNS, LifecycleConfig, LifecycleResult, run_lifecycle
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SNP_VM,
    KVM_X86_TDX_VM,
    gmem_flags_str,
)

VM_TYPES = {"default": KVM_X86_DEFAULT_VM, "snp": KVM_X86_SNP_VM, "tdx": KVM_X86_TDX_VM}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the lifecycle of a NO_DIRECT_MAP guest on the model and report it",
        description=(
            "Create a VM whose memory is a guest_memfd with NO_DIRECT_MAP, bind it, populate it "
            "from the VMM, let the guest fault and write it, have KVM and a gadget access it, "
            "punch a hole, tear down and let the kernel reuse the frames; report what happened "
            "to the direct map and the TLBs, and the series' invariants."
        ),
    )
    p.add_argument("--design", default="v12", type=design_arg, metavar="DESIGN",
                   help=f"kernel design to run: {', '.join(DESIGNS)}, or a design file "
                        "(file.py[:Class], module:Class) (default: v12)")
    p.add_argument("--design-file", dest="design", type=design_arg, metavar="FILE.py[:Class]",
                   help="run a design of your own (see the README: write your own design)")
    p.add_argument("--per-page", action="store_true",
                   help="run every page through the design's per-page kernel paths, never the "
                        "batched ones (slower; the report is the same)")
    without = [n for n, pr in PROFILES.items() if not pr.has_guest_memfd]
    p.add_argument("--profile", default="x86_64", choices=[n for n in PROFILES if n not in without],
                   help="architecture profile (default: x86_64); those without guest_memfd "
                        f"({', '.join(without)}) cannot run the lifecycle")
    p.add_argument("--guest-mib", type=int, default=64, help="guest memory in MiB (default: 64)")
    p.add_argument("--vmm-write-mib", type=int, default=16,
                   help="MiB the VMM writes before the guest runs (default: 16)")
    p.add_argument("--punch-mib", type=int, default=8, help="MiB of hole to punch (default: 8)")
    p.add_argument("--ram-gib", type=float_in(0, 4096), default=None,
                   help="modelled RAM above 4 GiB, in GiB (default: 4, or twice the guest if that is "
                        "more; 2 GiB more lie below 4 GiB)")
    p.add_argument("--cpus", type=ncpus(1), default=2, help="number of CPUs (default: 2)")
    p.add_argument("--init-on-free", action="store_true", help="boot with init_on_free=1")
    p.add_argument("--vm-type", choices=list(VM_TYPES), default="default",
                   help="VM type (default: default). snp and tdx take private memory only: the VMM "
                        "populates SNP memory with SNP_LAUNCH_UPDATE, nothing maps it; the series "
                        "refuses them NO_DIRECT_MAP unless the profile is the what-if "
                        "x86_64-what-if-snp-tdx")
    p.add_argument("--without-flag", action="store_true",
                   help="create the guest_memfd without NO_DIRECT_MAP (the baseline)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--trace", metavar="FILE", type=output_file,
                   help="write every kernel step as JSON lines to FILE")
    p.add_argument("--plot", metavar="FILE.png", type=output_file, help="draw the direct map after the run")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    try:
        # The lifecycle wants twice the guest (see LifecycleConfig.validate).
        ram_gib = (args.ram_gib if args.ram_gib is not None
                   else min(4096.0, max(4.0, 2 * max(args.guest_mib, 0) / 1024)))
        config = MachineConfig(ram_gib=ram_gib, ncpus=args.cpus, init_on_free=args.init_on_free,
                               trace="full" if args.trace else "ring", invariants="record",
                               seed=args.seed, range_paths=not args.per_page)
        machine = Machine(config, profile=args.profile, design=args.design)
    except ValueError as e:
        raise UsageError(str(e)) from None
    host = Host(machine)
    vm_type = VM_TYPES[args.vm_type]
    if vm_type not in machine.profile.vm_types:
        raise UsageError(f"profile {args.profile!r} runs no {args.vm_type} VMs")
    offered = host.open_kvm().create_vm(vm_type).check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    flag = not args.without_flag and bool(offered & GUEST_MEMFD_FLAG_NO_DIRECT_MAP)
    note = ""
    if not args.without_flag and not flag:
        note = (f"design {args.design!r} on profile {args.profile!r} does not offer NO_DIRECT_MAP "
                f"to {args.vm_type} VMs (VM flags: {gmem_flags_str(offered)}); running the "
                "baseline without it")
    host = Host(Machine(config, profile=args.profile, design=args.design))
    lc = LifecycleConfig(guest_mib=args.guest_mib, vmm_write_mib=args.vmm_write_mib,
                         punch_mib=args.punch_mib, no_direct_map=flag, vm_type=vm_type,
                         gadget_cpu=1 if args.cpus > 1 else 0)
    try:
        ram_mib = sum(hi - lo for lo, hi in host.m.ram) * 4 // 1024
        lc.validate(ram_mib, args.cpus)
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = run_lifecycle(host, lc)
    if args.trace:
        with open(args.trace, "w") as f:
            for ev in host.m.trace:
                f.write(json.dumps(ev.as_json()) + "\n")
    plot = None
    if args.plot:
        from gmemlab.plots import plot_direct_map

        plot = plot_direct_map(host.m.dmap, args.plot,
                               f"direct map after the lifecycle ({args.design}, {args.profile})")
    if args.json:
        dump_json(as_json(result, host, note, plot))
    else:
        print(render(result, host, note, plot))
    return 0 if result.crashed is None and not result.violations else 1


def as_json(r: LifecycleResult, host: Host, note: str, plot: Path | None) -> dict[str, Any]:
    m = host.m
    return {
        "design": r.design,
        "design_title": r.design_title,
        "profile": r.profile,
        "cpus": m.config.ncpus,
        "init_on_free": m.config.init_on_free,
        "flags": gmem_flags_str(r.flags),
        "note": note or None,
        "steps": [s.as_json() for s in r.steps],
        "crashed": r.crashed,
        "direct_map": {"before": r.meminfo_before, "after": r.meminfo_after, "splits": r.splits,
                       "not_present_pages": r.not_present_pages},
        "counts": r.counts,
        "paths": {"batched": [p.path for p in m.gate.paths if p.mirror],
                  "per_page": [p.path for p in m.gate.paths if not p.mirror],
                  "mirror": m.gate.mirror, "why": m.gate.describe(), "differs": list(m.gate.differs)},
        "invariants": r.verdicts,
        "rationale_not_followed": {n: k for n, k in r.departures.items() if k},
        "violations": [
            {"invariant": v.invariant.name, "message": v.message, "pfn": v.pfn, "seq": v.seq,
             "trace": [e.as_json() for e in v.trace]}
            for v in r.violations
        ],
        "plot": str(plot) if plot else None,
    }


def render(r: LifecycleResult, host: Host, note: str, plot: Path | None) -> str:
    m = host.m
    ram_gib = sum(hi - lo for lo, hi in m.ram) / (1 << 18)
    out = [
        f"gmemlab run: design {r.design}: {r.design_title}",
        f"profile {r.profile} ({m.profile.description}); {m.config.ncpus} CPUs, {ram_gib:.1f} GiB RAM, "
        f"init_on_free {'on' if m.config.init_on_free else 'off'}",
    ]
    if note:
        out.append(f"note: {note}")
    gate = m.gate
    out.append(f"kernel paths: {gate.describe()}")
    out += ["", "What happened"]
    width = max(len(s.name) for s in r.steps)
    for i, s in enumerate(r.steps):
        mark = "  " if s.ok else "!!"
        out.append(f"{mark}{i + 1:>2}  {s.name:<{width}}  {s.outcome}")
    out += ["", "Kernel work per step"]
    cols = list(COLUMNS)
    rows: list[list[Cell]] = [[i + 1, s.name, *(s.counts[c] for c in cols)]
                              for i, s in enumerate(r.steps)]
    rows.append(["", "total", *(r.counts[c] for c in cols)])
    out.append(table(["#", "step", *cols], rows, align="rl" + "r" * len(cols)))
    # arm64 prints no DirectMap lines (arch_report_meminfo() is x86's): the same leaf counts,
    # read from the modelled linear map.
    out += ["", "Direct map (/proc/meminfo)" if m.profile.arch == "x86_64" else
            f"Linear map by leaf size ({m.profile.arch} /proc/meminfo has no DirectMap lines)"]
    out.append(table(["", "before", "after"],
                     [[k, kib(r.meminfo_before[k] * 1024), kib(r.meminfo_after[k] * 1024)]
                      for k in r.meminfo_after], align="lrr"))
    out.append(f"  splits: {r.splits['1G']} of 1G, {r.splits['2M']} of 2M, never merged back; "
               f"pages not present now: {r.not_present_pages}")
    c = r.counts
    others = m.config.ncpus - 1
    out.append(f"\nKernel TLB flushes: {c['flushes']:,}, sending {c['ipis']:,} IPIs to {others} other "
               f"CPU{'s' if others != 1 else ''}; {c['zaps']:,} direct-map entries removed, "
               f"{c['restores']:,} restored")
    held = [n for n, k in r.verdicts.items() if not k]
    broken = {n: k for n, k in r.verdicts.items() if k}
    out.append(f"\nInvariants: all {len(held)} held" if not broken else
               f"\nInvariants: {len(held)} held, {len(broken)} violated:")
    for name, k in broken.items():
        first = next(v for v in r.violations if v.invariant.name == name)
        out.append(f"  {name} ({k}x) first at #{first.seq}: {first.message}")
    departed = {n: k for n, k in r.departures.items() if k}
    if departed:
        out.append("Rationale of the series not followed (its orders; not failures): "
                   + ", ".join(f"{n} ({k}x)" for n, k in departed.items()))
    if r.violations:
        out += ["", "First violation, with the steps that led there:", r.violations[0].format()]
    if r.crashed:
        out.append(f"\nThe modelled kernel crashed: {r.crashed}")
    if plot:
        out.append(f"\ndirect map picture: {plot}")
    return "\n".join(out)

