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

from gmemlab.twin.host import TwinHost, TwinUnavailable
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
]


@functools.cache
def available() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` with guest_memfd can be used here, and if not, why."""
    try:
        TwinHost().open_kvm().close()
    except TwinUnavailable as e:
        return False, str(e)
    return True, "ok"
