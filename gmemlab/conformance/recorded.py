"""Outcomes of every conformance case on the kernel of this project's machines.

Recorded on Linux 6.18.44 (kvm_pvm, nested; ``realkernel.md``) through the twin
(``tests/twin/test_twin_conformance.py`` re-checks them on every run where
/dev/kvm is present), and kept here so the model can be held to the real
kernel where /dev/kvm is missing.

Keyed by case name without its ``[FLAGS]`` suffix; a value that depends on the
flags is a :class:`ByFlags`.  That kernel does not offer NO_DIRECT_MAP; the
expectation of a NO_DIRECT_MAP variant is derived: the same as without the
flag, except for cases tagged ``direct_map_dependent`` (GUP on the mapping),
which must then behave as on memfd_secret (v12 patches 04-06, series-spec §4.1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from gmemlab import guest
from gmemlab.conformance.cases import CASES, GMEM_GPA, MMAP, NDM, PAGE, SHARED, TOTAL, Case, Outcome, runs
from gmemlab.uapi import gmem_flags_parse

RECORDED_ON = "Linux 6.18.44 kvm_pvm (nested), default VM, guest_memfd flags MMAP|INIT_SHARED"


@dataclass(frozen=True, slots=True)
class ByFlags:
    outcomes: dict[int, Outcome]


DONE_EXIT: Outcome = {"exit": "IoOut", "port": guest.PORT_DONE, "data": "00"}


def done(*reports: int, check_failures: tuple[int, ...] = ()) -> Outcome:
    return {
        "done": True,
        "reports": list(reports),
        "check_failures": list(check_failures),
        "last_exit": DONE_EXIT,
    }


def stopped(exit_: dict[str, Outcome]) -> Outcome:
    return {"done": False, "reports": [], "check_failures": [], "last_exit": exit_}


def memory_fault(gpa: int) -> Outcome:
    return stopped({"exit": "MemoryFault", "gpa": gpa, "size": PAGE, "flags": 0, "errno": "EFAULT"})


def page_of(byte: int, n: int = PAGE) -> Outcome:
    return runs(bytes([byte]) * n)


EXPECTED: dict[str, Outcome | ByFlags] = {
    "create.flag_bits": {
        "vm_cap": 3,
        "accepted_bits": [0, 1],
        "rejected_errnos": ["EINVAL"],
        "matches_cap": True,
    },
    "create.cap_scopes": {"system": 3, "vm": 3},
    "create.invalid_sizes": {
        "0": "EINVAL",
        "1..4095": ["EINVAL"],
        "4097": "EINVAL",
        "2^63": "EINVAL",
        "4096": "ok",
    },
    "create.multiple": {"sizes": [PAGE, 2 * PAGE], "first_unchanged": True, "distinct_inodes": True},
    # No .read/.write/.llseek in kvm_gmem_fops: the VFS answers.
    "file.read_write": {"read": "EINVAL", "write": "EINVAL", "pread": "ESPIPE", "pwrite": "ESPIPE"},
    "file.lseek": {"SET 4096": "ESPIPE", "CUR 0": "ESPIPE", "END 0": "ESPIPE"},
    "file.ftruncate": {"grow": "EINVAL", "shrink": "EINVAL", "same": "EINVAL", "st_size_after": TOTAL},
    "file.fstat": {"st_size": TOTAL, "st_blksize": PAGE, "regular": True},
    "mmap.shared": ByFlags(
        {
            0: {"one_page": "ENODEV", "whole": "ENODEV"},
            MMAP: {"one_page": "ok", "whole": "ok"},
            SHARED: {"one_page": "ok", "whole": "ok"},
        }
    ),
    "mmap.private": ByFlags({0: "ENODEV", MMAP: "EINVAL", SHARED: "EINVAL"}),
    "mmap.supported": {
        "filled": page_of(0xAA, TOTAL),
        "punch": "ok",
        "after_punch": [["00", PAGE], ["aa", TOTAL - PAGE]],
        "refilled": page_of(0xAA, TOTAL),
    },
    "fault.overflow": {
        "fill": {"result": "SIGBUS", "offset": TOTAL},
        "read_past_eof": {"result": "SIGBUS", "offset": TOTAL},
        "accessible": page_of(0xAA, TOTAL),
    },
    "fault.private": {
        "fill": {"result": "SIGBUS", "offset": 0},
        "read": {"result": "SIGBUS", "offset": 0},
    },
    "fallocate.sequence": ["ok", "EINVAL", "EINVAL", "EINVAL", "ok", "ok", "EINVAL", "ok", "ok"],
    "fallocate.invalid_punch_hole": ["EINVAL"] * 10,
    "fallocate.modes": {
        "0": "EOPNOTSUPP",
        "PUNCH_HOLE": "EOPNOTSUPP",
        "KEEP_SIZE|ZERO_RANGE": "EOPNOTSUPP",
        "COLLAPSE_RANGE": "EOPNOTSUPP",
    },
    "fallocate.punch_refault_zero": [["5a", PAGE], ["00", PAGE], ["5a", 2 * PAGE]],
    "fallocate.preallocated_reads_zero": page_of(0, TOTAL),
    "bind.ok": {"bind": "ok", "delete": "ok"},
    "bind.bad_fd": "EBADF",
    "bind.not_guest_memfd": "EINVAL",
    "bind.offset_unaligned": "EINVAL",
    "bind.beyond_size": "EINVAL",
    "bind.overlapping_binding": {"overlap": "EINVAL", "disjoint": "ok"},
    "bind.overlapping_gpa": "EEXIST",
    "bind.readonly": "EINVAL",
    "bind.other_vm": "EINVAL",
    "attributes.set_private": "ENOTTY",  # KVM_GENERIC_MEMORY_ATTRIBUTES not built
    "guest.selftest": {"guest": done(), "host_after": page_of(0xFF)},
    "guest.reads_untouched_zero": done(0),
    "guest.host_to_guest": done(0x3C),
    "guest.guest_to_host": page_of(0xA5),
    "guest.host_rewrite_coherent": {"first": done(0x11), "after_rewrite": done(0x7E)},
    "guest.punch_hole_while_mapped": {"first": done(0x55), "punch": "ok", "after_punch": done(0)},
    "guest.mmap_only_access": {"guest": done(0x61), "host": "SIGBUS"},
    "guest.no_mmap_no_hva": {"KVM_RUN": "EFAULT"},
    "guest.release_while_bound": {
        "mapped_page": memory_fault(GMEM_GPA),
        "unmapped_page": memory_fault(GMEM_GPA + PAGE),
        "delete_slot": "ok",
    },
    "guest.rebind_keeps_contents": done(0x77),
    "guest.check_failure_offset": done(check_failures=(100,)),
    "guest.unbacked_gpa": stopped({"exit": "MmioRead", "addr": 8 << 30, "size": 1}),
    # Recorded on the running kernel of 2026-12-08 (6.18.44, no guest_memfd): live there.
    "guest.mmio_insn_in_memory": [{"exit": "MmioRead", "addr": 8 << 30, "size": 1},
                                  {"exit": "IoOut", "port": guest.PORT_REPORT, "data": "00"},
                                  DONE_EXIT],
    # copy_from_user works everywhere the page can be faulted in; GUP is refused on secretmem.
    "access.pipe_write_from.guest_memfd": ByFlags({MMAP: "EFAULT", SHARED: "ok"}),
    "access.pipe_write_from.memfd_secret": "ok",
    "access.pipe_write_from.memfd": "ok",
    "access.proc_mem_read.guest_memfd": ByFlags({MMAP: "EIO", SHARED: "ok"}),
    "access.proc_mem_read.memfd_secret": "EIO",
    "access.proc_mem_read.memfd": "ok",
    "access.process_vm_readv.guest_memfd": ByFlags({MMAP: "EFAULT", SHARED: "ok"}),
    "access.process_vm_readv.memfd_secret": "EFAULT",
    "access.process_vm_readv.memfd": "ok",
    "access.vmsplice.guest_memfd": ByFlags({MMAP: "EFAULT", SHARED: "ok"}),
    "access.vmsplice.memfd_secret": "EFAULT",
    "access.vmsplice.memfd": "ok",
    "access.odirect_read_into.guest_memfd": ByFlags({MMAP: "EFAULT", SHARED: "ok"}),
    "access.odirect_read_into.memfd_secret": "EFAULT",
    "access.odirect_read_into.memfd": "ok",
    "secretmem.create_flags": {"0": "ok", "O_CLOEXEC": "ok", "0x1": "EINVAL"},
    "secretmem.mappings": {
        "private": "EINVAL",
        "in_bounds": page_of(0x42),
        "past_eof": {"result": "SIGBUS", "offset": PAGE},
    },
    # Recorded on 6.18.44-fc-v1300 (no guest_memfd): mm behaviour, the same with or without it.
    "secretmem.flags_beyond_uint": {"0xffffffff": "EINVAL", "2^32": "EINVAL", "2^70": "EINVAL",
                                    "-1": "EINVAL"},
    "mlock.memfd_secret": {"untouched": "ENOMEM", "touched": "ENOMEM", "data": page_of(0x42, 2 * PAGE)},
    "mlock.memfd": {"mlock": "ok", "data": page_of(0, 2 * PAGE)},
    "mlock.past_eof": "ENOMEM",
    "mmap.anonymous_sizes": {"1M": "ok", "2^46": "ENOMEM", "2^47": "ENOMEM", "2^50": "ENOMEM"},
}


_VMM_CALLS = json.loads(resources.files("gmemlab.conformance").joinpath("data/vmm-calls.json")
                       .read_text())
# The guest_memfd cases of gmemlab.conformance.vmm: never run on a kernel with guest_memfd,
# their outcomes derived from the source (DERIVED_FROM says which).
DERIVED_FROM: str = _VMM_CALLS["derived_from"]
DERIVED: frozenset[str] = frozenset(_VMM_CALLS["derived"])


def _vmm_calls() -> dict[str, Outcome | ByFlags]:
    """The outcomes of :mod:`gmemlab.conformance.vmm` (``data/vmm-calls.json``): the cases
    without guest_memfd recorded live through the twin, the guest_memfd ones derived from
    the kernel source (that kernel has none); ``{"by_flags": {"MMAP": ...}}`` is a ByFlags."""
    out: dict[str, Outcome | ByFlags] = {}
    for name, value in {**_VMM_CALLS["live"], **_VMM_CALLS["derived"]}.items():
        if isinstance(value, dict) and set(value) == {"by_flags"}:
            out[name] = ByFlags({gmem_flags_parse(k): v for k, v in value["by_flags"].items()})
        else:
            out[name] = value
    return out


EXPECTED.update(_vmm_calls())

WITHOUT_GUEST_MEMFD_ON = "Linux 6.18.44-fc-v1300 (nested), KVM_CAP_GUEST_MEMFD = 0"
# What a kernel without guest_memfd answers the cases that probe for it; every other case
# that does not need guest_memfd answers as in EXPECTED.  KVM_CREATE_GUEST_MEMFD is ENOTTY
# there: kvm_vm_ioctl() has no such case and kvm_arch_vm_ioctl() knows none either.
WITHOUT_GUEST_MEMFD: dict[str, Outcome] = {
    "create.flag_bits": {"vm_cap": 0, "accepted_bits": [], "rejected_errnos": ["ENOTTY"],
                         "matches_cap": True},
    "create.cap_scopes": {"system": 0, "vm": 0},
}


def base_name(name: str) -> str:
    return name.split("[", 1)[0]


def expected(c: Case, *, guest_memfd: bool = True) -> Outcome:
    """What the kernel answers ``c``; NO_DIRECT_MAP variants follow the rule in the module doc.

    ``guest_memfd=False``: what a kernel without guest_memfd answers (only for cases that
    do not need it).
    """
    if not guest_memfd:
        if c.needs_guest_memfd:
            raise ValueError(f"{c.name} needs guest_memfd; nothing was recorded without it")
        if c.name in WITHOUT_GUEST_MEMFD:
            return WITHOUT_GUEST_MEMFD[c.name]
    flags = c.gmem_flags
    if flags is not None and flags & NDM and c.direct_map_dependent:
        path = base_name(c.name).removesuffix(".guest_memfd")
        return expected(CASES[f"{path}.memfd_secret"])
    entry = EXPECTED[base_name(c.name)]
    if isinstance(entry, ByFlags):
        assert flags is not None
        return entry.outcomes[flags & ~NDM]
    return entry
