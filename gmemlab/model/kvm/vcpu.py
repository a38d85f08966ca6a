"""vCPUs: ``KVM_RUN`` on a guest program, and KVM's own accesses to guest memory.

The model runs a :class:`~gmemlab.guest.GuestProgram` the way the twin's CPL3
x86 code runs it on a real vCPU: every access goes through the stage-2 table,
faulting through :func:`~gmemlab.model.kvm.mmu.kvm_mmu_page_fault`.  Guest
accesses use the guest's own translation, never the host direct map.  Progress
is kept exactly, so a ``KVM_RUN`` that exits (I/O, MMIO, an error) resumes
where it stopped.

kvm-clock, KVM's own write into guest memory through a vCPU's pfncache, is
:mod:`gmemlab.model.kvm.pfncache` (the cache is ``Vcpu.pv_time``);
``kvm_vcpu_map()`` (nested virtualization's way in) maps through ``hva_to_pfn()``
(GUP on ``userspace_addr``), so it fails on NO_DIRECT_MAP guest_memfd.  The
instruction emulator reaches guest memory by ``copy_from_user()`` on
``userspace_addr`` instead (``kvm_fetch_guest_virt()``), which works on
NO_DIRECT_MAP guest_memfd mapped by the VMM: the series' MMIO selftest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from errno import EFAULT
from typing import TYPE_CHECKING

from gmemlab.api import InternalError, IoOut, MmioRead, MmioWrite, VcpuExit
from gmemlab.guest import (
    PORT_CHECK_FAIL,
    PORT_DONE,
    PORT_REPORT,
    VIA_CODE_SIZE,
    Check,
    Fill,
    GuestProgram,
    Out,
    Report,
    ReportVia,
    Touch,
    via_code,
)
from gmemlab.model.kvm.kvm_main import kvm_read_guest
from gmemlab.model.kvm.mmu import MMIO, guest_translate, memory_fault_flags
from gmemlab.model.kvm.pfncache import GfnToPfnCache
from gmemlab.model.mm.folio import folio_put
from gmemlab.model.mm.gup import FOLL_WRITE, get_user_pages
from gmemlab.model.mm.tlb import kernel_access
from gmemlab.model.task import KGen, Task
from gmemlab.uapi import KVM_INTERNAL_ERROR_EMULATION, KVM_MEM_READONLY, PAGE_SHIFT, PAGE_SIZE

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
        if isinstance(op, Report | ReportVia):
            code = None
            if isinstance(op, ReportVia):
                code = op.code_gpa
                if not vcpu.off:  # the guest writes the instruction, then calls it
                    r = yield from _write_bytes(m, vcpu, code, via_code(op.gpa))
                    if r is not None:
                        return r
                    vcpu.off = 1
            value = yield from _read_byte(m, vcpu, op.gpa, code)
            if isinstance(value, MmioRead | InternalError):
                return _exit(vcpu, value)
            if value < 0:
                return value
            vcpu.pc += 1
            vcpu.off = 0
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


def _read_byte(m: Machine, vcpu: Vcpu, gpa: int,
               code_gpa: int | None = None) -> KGen[int | MmioRead | InternalError]:
    """A guest load of ``gpa``; an MMIO one by an instruction at ``code_gpa`` makes KVM
    fetch that instruction first (:func:`kvm_fetch_guest_virt`)."""
    if vcpu.mmio_pending == gpa:
        vcpu.mmio_pending = -1
        return 0  # the MMIO data the VMM left in kvm_run (zero: nothing filled it)
    pfn = yield from guest_translate(m, vcpu, gpa, False)
    if pfn == MMIO:
        vcpu.stats["insn_emulation"] += 1
        if code_gpa is not None:
            insn = yield from kvm_fetch_guest_virt(m, vcpu, code_gpa, VIA_CODE_SIZE)
            if isinstance(insn, int) or insn != via_code(gpa):
                # handle_emulation_failure(): nothing to decode.
                m.trace.emit("x86_emulate_instruction", "emulation_failure", -1, {"rip": code_gpa})
                return InternalError(KVM_INTERNAL_ERROR_EMULATION)
        vcpu.mmio_pending = gpa
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


def _write_bytes(m: Machine, vcpu: Vcpu, gpa: int, data: bytes) -> KGen[VcpuExit | int | None]:
    """Guest stores of ``data`` at ``gpa`` (within one page): None when done."""
    pfn = yield from guest_translate(m, vcpu, gpa, True)
    if pfn == MMIO:
        vcpu.stats["insn_emulation"] += 1
        return _exit(vcpu, MmioWrite(gpa, data[:1]))
    if pfn < 0:
        return pfn
    yield ("frame", pfn)
    m.mem.write(pfn, gpa & (PAGE_SIZE - 1), data, secret=True)
    return None


def kvm_fetch_guest_virt(m: Machine, vcpu: Vcpu, gva: int, n: int) -> KGen[bytes | int]:
    """``kvm_fetch_guest_virt()`` (``arch/x86/kvm/x86.c``): the emulator's instruction fetch.

    The guest's page tables translate ``gva`` (identity-mapped here, as the twin
    maps it), then ``kvm_vcpu_read_guest_page()`` -> ``__kvm_read_guest_page()`` ->
    ``__copy_from_user()`` from the memslot's ``userspace_addr``: through the VMM's
    mapping, so a NO_DIRECT_MAP guest_memfd page is read through its user PTE (the
    user fault maps it if need be), never through the direct map.  The walk of the
    guest's page tables reads them the same way (``paging64_walk_addr_generic()``
    -> ``__get_user()`` on the table's hva); the model's identity map has no tables
    in guest memory to read (our choice: the twin keeps them in its own slot).
    Returns the bytes or -EFAULT (``X86EMUL_PROPAGATE_FAULT``/``IO_NEEDED``).
    """
    return (yield from kvm_read_guest(m, vcpu.kvm, gva, n))


def kvm_vcpu_map(m: Machine, vcpu: Vcpu, gpa: int) -> KGen[int]:
    """``kvm_vcpu_map()`` (``virt/kvm/kvm_main.c``): the pfn mapped, or -errno.

    ``__kvm_vcpu_map()`` -> ``kvm_follow_pfn()`` -> ``hva_to_pfn()``: GUP on the
    memslot's ``userspace_addr`` (a guest_memfd slot is not asked: the gmem path is
    for the stage-2 fault only), then ``kmap()`` of the page, which on x86-64 is its
    direct-map address.  Nested VMX maps the vmcs12 and its pages this way
    (``nested_get_vmcs12_pages()``), SVM the nested VMCB.  On a NO_DIRECT_MAP
    guest_memfd GUP refuses the mapping and the map fails with -EFAULT, as
    kvm-clock's pfncache does.  The mapping is released at once (``kvm_vcpu_unmap()``).
    """
    pfn = yield from _hva_to_pfn(m, vcpu, gpa, "kvm_vcpu_map", "gpa_map_fail")
    if pfn < 0:
        return pfn
    yield from kernel_access(m, pfn, "kvm_vcpu_map", write=False)
    m.trace.emit("kvm_vcpu_map", "vcpu_map", pfn, {"gpa": gpa})
    yield from folio_put(m, pfn)
    return pfn


def _hva_to_pfn(m: Machine, vcpu: Vcpu, gpa: int, fn: str, failed: str) -> KGen[int]:
    """``gfn_to_hva_memslot()`` (writable) + ``hva_to_pfn()``: a referenced pfn or -EFAULT
    (traced as ``failed`` of ``fn``)."""
    slot = vcpu.kvm.gfn_to_memslot(gpa >> PAGE_SHIFT)
    if slot is None:
        return -EFAULT
    if slot.flags & KVM_MEM_READONLY:
        # gfn_to_hva_memslot() asks for a writable hva: KVM_HVA_ERR_RO_BAD, -EFAULT.
        m.trace.emit(fn, failed, -1, {"gpa": gpa, "err": "EFAULT"})
        return -EFAULT
    hva = slot.userspace_addr + (((gpa >> PAGE_SHIFT) - slot.base_gfn) << PAGE_SHIFT)
    pages = yield from get_user_pages(m, vcpu.kvm.owner, hva, 1, FOLL_WRITE, "hva_to_pfn")
    if isinstance(pages, int):
        m.trace.emit(fn, failed, -1, {"gpa": gpa, "err": "EFAULT"})
        return -EFAULT
    return pages[0]


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
