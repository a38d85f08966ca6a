"""What this machine's KVM and mm offer for guest_memfd work: ``gmemlab probe``.

:func:`probe` returns a JSON-able dict; :func:`format_probe` renders it as
tables.  Guest_memfd flags are not only read from ``KVM_CAP_GUEST_MEMFD_FLAGS``
(system and VM scope, which may differ: the system-scope answer of the v12
series advertises NO_DIRECT_MAP even where no VM can use it) but also tried:
``KVM_CREATE_GUEST_MEMFD`` with each single bit, on every VM type that can be
created.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from gmemlab import api, uapi
from gmemlab.conformance.cases import attempt, errno_name
from gmemlab.twin.host import TwinHost, TwinUnavailable
from gmemlab.twin.kvm import TwinKvm

CAPS: dict[str, int] = dict(
    sorted(
        ((n, v) for n, v in vars(uapi).items() if n.startswith("KVM_CAP_") and isinstance(v, int)),
        key=lambda kv: kv[1],
    )
)
FLAG_BITS = range(64)


def probe(host: TwinHost | None = None) -> dict[str, Any]:
    """Probe ``/dev/kvm``, memfd_secret and the direct-map counters."""
    host = host or TwinHost()
    uname = os.uname()
    report: dict[str, Any] = {
        "kernel": uname.release,
        "machine": uname.machine,
        "cpus": os.cpu_count(),
        "memfd_secret": attempt(lambda: host.memfd_secret().close()),
        "direct_map_kB": _direct_map(host.meminfo()),
    }
    try:
        kvm = host.open_kvm()
    except TwinUnavailable as e:
        report["kvm"] = {"available": False, "reason": str(e)}
        return report
    with kvm:
        report["kvm"] = _probe_kvm(kvm)
    return report


def _probe_kvm(kvm: TwinKvm) -> dict[str, Any]:
    caps = {name: kvm.check_extension(cap) for name, cap in CAPS.items()}
    vm_types: dict[str, Any] = {}
    for vm_type, type_name in uapi.X86_VM_TYPE_NAMES.items():
        try:
            vm = kvm.create_vm(vm_type)
        except api.KernelError as e:
            vm_types[type_name] = {"create": errno_name(e)}
            continue
        with vm:
            accepted = []
            rejected: set[str] = set()
            for bit in FLAG_BITS:
                result = attempt(partial(_create_gmem, vm, 1 << bit))
                if result == "ok":
                    accepted.append(bit)
                else:
                    rejected.add(result)
            vm_types[type_name] = {
                "create": "ok",
                "vm_caps": {name: vm.check_extension(cap) for name, cap in CAPS.items()},
                "guest_memfd_flags_cap": vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS),
                "guest_memfd_bits_accepted": accepted,
                "guest_memfd_bits_rejected_with": sorted(rejected),
            }
    return {
        "available": True,
        "api_version": kvm.get_api_version(),
        "vcpu_mmap_size": kvm.get_vcpu_mmap_size(),
        "caps": caps,
        "vm_types_cap": caps["KVM_CAP_VM_TYPES"],
        "vm_types": vm_types,
    }


def _create_gmem(vm: api.VmFd, flags: int) -> None:
    vm.create_guest_memfd(uapi.PAGE_SIZE, flags).close()


def _direct_map(c: api.DirectMapCounters) -> dict[str, int]:
    return {"4k": c.direct_map_4k, "2M": c.direct_map_2m, "1G": c.direct_map_1g}


def _bit_name(bit: int) -> str:
    return uapi.GUEST_MEMFD_FLAG_NAMES.get(1 << bit, f"bit{bit}")


def format_probe(report: dict[str, Any]) -> str:
    """The probe as readable tables."""
    lines = [
        f"kernel {report['kernel']} ({report['machine']}, {report['cpus']} CPUs)",
        f"memfd_secret: {report['memfd_secret']}",
        "DirectMap: " + ", ".join(f"{k} {v} kB" for k, v in report["direct_map_kB"].items()),
    ]
    kvm = report["kvm"]
    if not kvm["available"]:
        lines.append(f"KVM: unavailable: {kvm['reason']}")
        return "\n".join(lines)
    lines.append(f"KVM: API version {kvm['api_version']}, vCPU mmap size {kvm['vcpu_mmap_size']}")
    default = kvm["vm_types"].get("DEFAULT", {}).get("vm_caps", {})
    lines += ["", f"{'capability':<32} {'#':>4} {'system':>10} {'default VM':>10}"]
    for name, cap in CAPS.items():
        lines.append(f"{name:<32} {cap:>4} {kvm['caps'][name]:>10} {default.get(name, '-'):>10}")
    lines += ["", f"VM types (KVM_CAP_VM_TYPES = {kvm['vm_types_cap']:#x}):"]
    header = f"{'type':<14} {'create':<8} {'FLAGS cap':>9}  " + "  ".join(
        f"{_bit_name(b):>13}" for b in range(3)
    )
    lines.append(header + "  other bits")
    for type_name, t in kvm["vm_types"].items():
        if t["create"] != "ok":
            lines.append(f"{type_name:<14} {t['create']}")
            continue
        accepted = set(t["guest_memfd_bits_accepted"])
        rejected = "/".join(t["guest_memfd_bits_rejected_with"]) or "-"
        cells = "  ".join(f"{'ok' if b in accepted else rejected:>13}" for b in range(3))
        others = sorted(accepted - {0, 1, 2})
        lines.append(
            f"{type_name:<14} {'ok':<8} {t['guest_memfd_flags_cap']:>#9x}  {cells}  "
            + (f"accepted {others}" if others else f"all {rejected}")
        )
    return "\n".join(lines)
