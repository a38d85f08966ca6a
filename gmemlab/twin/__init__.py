"""The twin: :mod:`gmemlab.api` implemented over the real ``/dev/kvm`` and mm syscalls.

Pure Python (``fcntl``, ``ctypes``, ``mmap``); see :mod:`gmemlab.twin.host` for
the entry point and :func:`available` to decide whether tests can run here.

What the twin reserves in every VM that has a vCPU (:mod:`gmemlab.twin.guestenv`):
memslot ``KVM_CAP_NR_MEMSLOTS - 1`` at GPA 511 GiB (4 MiB: page tables, code,
stacks) and a 64 KiB doorbell window right after it.  Guest programs report
through stores to that window, which ``run()`` returns as
:class:`~gmemlab.api.IoOut`: kvm_pvm forces IOPL to 0, so a CPL3 ``out`` faults.
Accesses through file mappings run in a forked child (:mod:`gmemlab.twin.child`),
so a SIGBUS never reaches the caller's process.
"""

from __future__ import annotations

import functools

from gmemlab import uapi
from gmemlab.twin.host import KVM_PATH, TwinHost, TwinUnavailable
from gmemlab.twin.kvm import TwinKvm, TwinVcpu, TwinVm
from gmemlab.twin.memory import TwinFile, TwinGuestMemfd, TwinMapping

__all__ = [
    "TwinFile",
    "TwinGuestMemfd",
    "TwinHost",
    "TwinKvm",
    "TwinMapping",
    "TwinUnavailable",
    "TwinVcpu",
    "TwinVm",
    "available",
    "guest_memfd_available",
]


@functools.cache
def available() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` can be used here (VMs, vCPUs, memslots), and if not, why."""
    try:
        TwinHost().open_kvm().close()
    except TwinUnavailable as e:
        return False, str(e)
    return True, "ok"


@functools.cache
def guest_memfd_available() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` also has guest_memfd (``KVM_CAP_GUEST_MEMFD``), and if not, why."""
    ok, reason = available()
    if not ok:
        return ok, reason
    with TwinHost().open_kvm() as kvm:
        for cap, name in ((uapi.KVM_CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD"),
                          (uapi.KVM_CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2")):
            if not kvm.has_cap(cap):
                return False, f"{KVM_PATH} lacks guest_memfd support ({name} = 0)"
    return True, "ok"
