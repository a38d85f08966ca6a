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
* any port of an :class:`Out`.

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


@dataclass(frozen=True, slots=True)
class Out:
    """Write one byte to an I/O port (an exit to the VMM)."""

    port: int
    value: int


GuestOp = Fill | Check | Touch | Report | Out


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


def _byte(value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"byte value {value} out of range")
    return value
