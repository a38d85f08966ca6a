"""Guest programs: what a vCPU does, written once for both backends.

A program is a short list of operations on guest-physical memory.  The model
interprets it through its stage-2 fault path (``kvm_mmu_page_fault`` ->
``kvm_gmem_get_pfn``); the twin assembles it to 64-bit x86 code that runs at
CPL3 on a real vCPU (the only mode kvm_pvm runs natively, so the real
guest_memfd fault path is taken).  Results come back as port I/O exits:

* ``PORT_DONE`` (1 byte, 0): the program finished;
* ``PORT_REPORT`` (1 byte): the value a :class:`Report` read;
* ``PORT_CHECK_FAIL`` (4 bytes, little endian): offset of the first byte a
  :class:`Check` found different; the program then jumps to its end;
* any port of an :class:`Out`;
* a :class:`ReportVia` reports like a :class:`Report`; if KVM cannot fetch the
  instruction it has to emulate, ``KVM_EXIT_INTERNAL_ERROR``
  (``KVM_INTERNAL_ERROR_EMULATION``).

After the program is done, running the vCPU again reports ``PORT_DONE`` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PORT_DONE = 0xE0
PORT_REPORT = 0xE1
PORT_CHECK_FAIL = 0xE2
RESERVED_PORTS = frozenset({PORT_DONE, PORT_REPORT, PORT_CHECK_FAIL})


@dataclass(frozen=True, slots=True)
class Fill:
    """Write ``value`` to every byte of [gpa, gpa + length)."""

    gpa: int
    length: int
    value: int


@dataclass(frozen=True, slots=True)
class Check:
    """Compare every byte of [gpa, gpa + length) with ``value``."""

    gpa: int
    length: int
    value: int


@dataclass(frozen=True, slots=True)
class Touch:
    """One access (a byte write of ``value``, or a read) per 4 KiB page of the range."""

    gpa: int
    length: int
    write: bool = True
    value: int = 1


@dataclass(frozen=True, slots=True)
class Report:
    """Read the byte at ``gpa`` and report it on ``PORT_REPORT``."""

    gpa: int


# ``movabs al, [moffs64]; ret``: the instruction a :class:`ReportVia` writes and calls.
VIA_CODE_SIZE = 10


def via_code(gpa: int) -> bytes:
    """The bytes :class:`ReportVia` places at its ``code_gpa``."""
    return bytes((0xA0,)) + gpa.to_bytes(8, "little") + bytes((0xC3,))


@dataclass(frozen=True, slots=True)
class ReportVia:
    """Report the byte at ``gpa``, read by an instruction that lives in guest memory.

    The guest writes ``movabs al, [gpa]; ret`` at ``code_gpa`` and calls it.  When
    ``gpa`` has no memslot the load is emulated MMIO, and KVM must first fetch that
    instruction from ``code_gpa`` itself (``x86_decode_emulated_instruction()`` ->
    ``kvm_fetch_guest_virt()``): with ``code_gpa`` in NO_DIRECT_MAP guest_memfd this
    is the series' selftest ``test_guest_memfd_mmio`` (v7 12/12 onwards,
    ``set_memory_region_test.c``), which holds that the fetch goes through the
    memslot's ``userspace_addr`` and not the direct map.  The instruction must not
    cross a page.
    """

    gpa: int
    code_gpa: int


@dataclass(frozen=True, slots=True)
class Out:
    """Write one byte to an I/O port (an exit to the VMM)."""

    port: int
    value: int


GuestOp = Fill | Check | Touch | Report | ReportVia | Out


@dataclass(slots=True)
class GuestProgram:
    """A builder for a list of :data:`GuestOp`; every method returns ``self``."""

    ops: list[GuestOp] = field(default_factory=list)

    def fill(self, gpa: int, length: int, value: int) -> GuestProgram:
        self.ops.append(Fill(gpa, length, _byte(value)))
        return self

    def check(self, gpa: int, length: int, value: int) -> GuestProgram:
        self.ops.append(Check(gpa, length, _byte(value)))
        return self

    def touch(self, gpa: int, length: int, *, write: bool = True, value: int = 1) -> GuestProgram:
        self.ops.append(Touch(gpa, length, write, _byte(value)))
        return self

    def report(self, gpa: int) -> GuestProgram:
        self.ops.append(Report(gpa))
        return self

    def report_via(self, gpa: int, code_gpa: int) -> GuestProgram:
        self.ops.append(ReportVia(gpa, code_gpa))
        return self

    def out(self, port: int, value: int) -> GuestProgram:
        if not 0 <= port <= 0xFFFF or port in RESERVED_PORTS:
            raise ValueError(f"port {port:#x} is out of range or reserved")
        self.ops.append(Out(port, _byte(value)))
        return self

    def validate(self) -> None:
        for op in self.ops:
            if isinstance(op, Fill | Check | Touch) and op.length <= 0:
                raise ValueError(f"{op}: length must be positive")
            if getattr(op, "gpa", 0) < 0:
                raise ValueError(f"{op}: negative guest physical address")
            if isinstance(op, ReportVia) and (
                    op.code_gpa < 0 or (op.code_gpa & 0xFFF) + VIA_CODE_SIZE > 0x1000):
                raise ValueError(f"{op}: the instruction must lie within one guest page")


def _byte(value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"byte value {value} out of range")
    return value
