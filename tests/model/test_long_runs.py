"""Long runs keep the model's memory flat (issue 12): destroyed VMs are released and the
default trace is a bounded ring.  Measured in object counts, never in time."""

from __future__ import annotations

import gc

from gmemlab.api import run_program
from gmemlab.guest import GuestProgram
from gmemlab.model import Host, MachineConfig
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SIZE,
)

NDM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GPA = 1 << 32
LIFECYCLES = 2000


def lifecycle(h: Host, full: bool) -> None:
    """One VM from creation to destruction; ``full`` also maps, fills and runs the guest."""
    with h.open_kvm() as kvm, kvm.create_vm() as vm:
        size = 8 * PAGE_SIZE
        g = vm.create_guest_memfd(size, NDM)
        mem = g.mmap(size)
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, size, mem.addr, g, 0)
        with vm.create_vcpu(0) as vcpu:
            if full:
                mem.fill(0, 2 * PAGE_SIZE, 0x3C)
                program = GuestProgram().check(GPA, 2 * PAGE_SIZE, 0x3C).touch(GPA, size)
                assert run_program(vcpu, program).ok
        mem.munmap()
        g.close()


def footprint(h: Host) -> dict[str, int]:
    m = h.machine
    gc.collect()
    return {
        "vms": len(m.kvms),
        "trace events": len(m.trace.events()),
        "trace counters": len(m.trace.counts),
        "address spaces": len(m.mappings),
        "fds": len(h.proc.fds.files),
        "vmas": len(h.proc.mm.vmas),
        "mmu notifiers": len(h.proc.mm.notifiers),
        "locks": len(m.locks.held) + len(m.locks.readers),
        "allocated frames": int((m.mem.views().state == 2).sum()),
        "python objects": len(gc.get_objects()),
    }


def test_vm_lifecycles_keep_the_machine_flat() -> None:
    h = Host(config=MachineConfig(ram_gib=0, low_ram_mib=32))  # the default trace mode
    assert h.machine.config.trace == "ring"
    for i in range(LIFECYCLES):
        lifecycle(h, full=i % 100 == 0)
        if i == LIFECYCLES // 2 - 1:  # the trace's ring is full by now
            early = footprint(h)
    late = footprint(h)
    assert late["vms"] == 0
    assert late.pop("trace events") == h.machine.config.trace_ring < h.machine.trace.seq
    assert early.pop("trace events") == h.machine.config.trace_ring
    objects = late.pop("python objects") - early.pop("python objects")
    assert late == early
    assert objects < 100, f"{objects} more Python objects after {LIFECYCLES // 2} more VMs"
    h.machine.inv.check_all()


def test_full_trace_only_when_asked() -> None:
    h = Host(config=MachineConfig(ram_gib=0, low_ram_mib=32, trace="full"))
    for _ in range(40):
        lifecycle(h, full=True)
    events = h.machine.trace.events()
    assert len(events) == h.machine.trace.seq > h.machine.config.trace_ring
    assert events[0].seq == 1
