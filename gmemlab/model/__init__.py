"""The executable model of guest_memfd direct map removal.

``Host`` implements the shared API (``gmemlab.api``) on a modelled
``Machine``; ``gmemlab.model.designs`` holds the versions of the series it can
run.  Module layout mirrors the kernel: ``mm/`` (memmap, page allocator,
direct map, TLBs, page cache, process memory, GUP, secretmem, shmem) and
``kvm/`` (guest_memfd, VMs and memslots, the MMU fault path, vCPUs, arch
profiles).
"""

from gmemlab.model.designs import DESIGNS, get_design
from gmemlab.model.host import Host
from gmemlab.model.invariants import INVARIANTS, InvariantViolation, KernelOops
from gmemlab.model.kvm.arch import PROFILES
from gmemlab.model.machine import Machine, MachineConfig

__all__ = [
    "DESIGNS",
    "INVARIANTS",
    "PROFILES",
    "Host",
    "InvariantViolation",
    "KernelOops",
    "Machine",
    "MachineConfig",
    "get_design",
]
