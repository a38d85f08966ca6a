"""vCPUs: ``KVM_RUN`` on a guest program, and KVM's own accesses to guest memory.

The model runs a :class:`~gmemlab.guest.GuestProgram` the way the twin's CPL3
x86 code runs it on a real vCPU: every access goes through the stage-2 table,
faulting through :func:`~gmemlab.model.kvm.mmu.kvm_mmu_page_fault`.  Guest
accesses use the guest's own translation, never the host direct map.  Progress
is kept exactly, so a ``KVM_RUN`` that exits (I/O, MMIO, an error) resumes
where it stopped.

kvm-clock, KVM's own write into guest memory through a vCPU's pfncache, is
:mod:`gmemlab.model.kvm.pfncache`; the cache is ``Vcpu.pv_time``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gmemlab.api import IoOut, MmioRead, MmioWrite, VcpuExit
from gmemlab.guest import (
    PORT_CHECK_FAIL,
    PORT_DONE,
    PORT_REPORT,
    Check,
    Fill,
    GuestProgram,
    Out,
    Report,
    Touch,
)
from gmemlab.model.kvm.mmu import MMIO, guest_translate, memory_fault_flags
from gmemlab.model.kvm.pfncache import GfnToPfnCache
from gmemlab.model.task import KGen, Task
from gmemlab.uapi import PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.machine import Machine

@dataclass(eq=False)
class Vcpu:
    kvm: Kvm
    vcpu_id: int
    task: Task
    program: GuestProgram | None = None
    pc: int = 0  # current op
    off: int = 0  # bytes of the current op done
    mmio_pending: int = -1  # gpa of an MMIO read whose data the next KVM_RUN consumes
    memory_fault: tuple[int, int, int] | None = None  # kvm_run.memory_fault: gpa, size, flags
    pv_time: GfnToPfnCache = field(default_factory=GfnToPfnCache)  # kvm-clock's cache
    stats: Counter[str] = field(default_factory=Counter)

    def load(self, program: GuestProgram) -> None:
        program.validate()
        self.program = program
        self.pc = self.off = 0
        self.mmio_pending = -1

    def prepare_memory_fault(self, gpa: int, is_private: bool) -> None:
        """``kvm_prepare_memory_fault_exit()``."""
        self.memory_fault = (gpa & ~(PAGE_SIZE - 1), PAGE_SIZE, memory_fault_flags(is_private))


def kvm_arch_vcpu_ioctl_run(m: Machine, vcpu: Vcpu) -> KGen[VcpuExit | int]:
    """``KVM_RUN``: run the program until it exits; -errno on failure."""
    vcpu.memory_fault = None
    prog = vcpu.program
    assert prog is not None
    ops = prog.ops
    while vcpu.pc < len(ops):
        op = ops[vcpu.pc]
        if isinstance(op, Out):
            vcpu.pc += 1
            return _exit(vcpu, IoOut(op.port, bytes((op.value,))))
        if isinstance(op, Report):
            value = yield from _read_byte(m, vcpu, op.gpa)
            if isinstance(value, MmioRead) or value < 0:
                return _exit(vcpu, value) if isinstance(value, MmioRead) else value
            vcpu.pc += 1
            return _exit(vcpu, IoOut(PORT_REPORT, bytes((value,))))
        if isinstance(op, Fill | Check):
            r = yield from _run_range(m, vcpu, op)
            if r is not None:
                return r
        else:  # Touch
            r = yield from _run_touch(m, vcpu, op)
            if r is not None:
                return r
        vcpu.pc += 1
        vcpu.off = 0
    return _exit(vcpu, IoOut(PORT_DONE, b"\x00"))


def _exit(vcpu: Vcpu, ex: VcpuExit) -> VcpuExit:
    vcpu.stats["exits"] += 1
    vcpu.stats["mmio_exits" if isinstance(ex, MmioRead | MmioWrite) else "io_exits"] += 1
    return ex


def _read_byte(m: Machine, vcpu: Vcpu, gpa: int) -> KGen[int | MmioRead]:
    if vcpu.mmio_pending == gpa:
        vcpu.mmio_pending = -1
        return 0  # the MMIO data the VMM left in kvm_run (zero: nothing filled it)
    pfn = yield from guest_translate(m, vcpu, gpa, False)
    if pfn == MMIO:
        vcpu.mmio_pending = gpa
        vcpu.stats["insn_emulation"] += 1
        return MmioRead(gpa, 1)
    if pfn < 0:
        return pfn
    yield ("frame", pfn)
    return m.mem.byte_at(pfn, gpa & (PAGE_SIZE - 1))


def _run_range(m: Machine, vcpu: Vcpu, op: Fill | Check) -> KGen[VcpuExit | int | None]:
    write = isinstance(op, Fill)
    mem = m.mem
    while vcpu.off < op.length:
        if m.ranges.guest_access(m, vcpu, op):
            continue
        gpa = op.gpa + vcpu.off
        if vcpu.mmio_pending == gpa:
            pfn = MMIO  # the read's data has arrived
        else:
            pfn = yield from guest_translate(m, vcpu, gpa, write)
        if pfn == MMIO:
            vcpu.stats["insn_emulation"] += 1
            if write:
                vcpu.off += 1
                return _exit(vcpu, MmioWrite(gpa, bytes((op.value,))))
            if vcpu.mmio_pending != gpa:
                vcpu.mmio_pending = gpa
                return _exit(vcpu, MmioRead(gpa, 1))
            vcpu.mmio_pending = -1
            if op.value != 0:
                return _check_failed(vcpu)
            vcpu.off += 1
            continue
        if pfn < 0:
            return pfn
        poff = gpa & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - poff, op.length - vcpu.off)
        yield ("frame", pfn)
        if write:
            mem.memset(pfn, poff, n, op.value, secret=True)
        else:
            bad = mem.mismatch(pfn, poff, n, op.value)
            if bad >= 0:
                vcpu.off += bad
                return _check_failed(vcpu)
        vcpu.off += n
    return None


def _check_failed(vcpu: Vcpu) -> VcpuExit:
    assert vcpu.program is not None
    offset = vcpu.off
    vcpu.pc = len(vcpu.program.ops)  # jump to the end: the next run reports PORT_DONE
    vcpu.off = 0
    return _exit(vcpu, IoOut(PORT_CHECK_FAIL, offset.to_bytes(4, "little")))


def _run_touch(m: Machine, vcpu: Vcpu, op: Touch) -> KGen[VcpuExit | int | None]:
    mem = m.mem
    while vcpu.off < op.length:
        if m.ranges.guest_access(m, vcpu, op):
            continue
        gpa = op.gpa + vcpu.off
        pfn = yield from guest_translate(m, vcpu, gpa, op.write)
        if pfn == MMIO:
            vcpu.off += PAGE_SIZE - (gpa & (PAGE_SIZE - 1))
            vcpu.stats["insn_emulation"] += 1
            if op.write:
                return _exit(vcpu, MmioWrite(gpa, bytes((op.value,))))
            return _exit(vcpu, MmioRead(gpa, 1))
        if pfn < 0:
            return pfn
        if op.write:
            yield ("frame", pfn)
            mem.memset(pfn, gpa & (PAGE_SIZE - 1), 1, op.value, secret=True)
        vcpu.off += PAGE_SIZE - (gpa & (PAGE_SIZE - 1))
    return None
