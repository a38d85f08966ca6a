"""A tiny x86-64 assembler and the compiler from :class:`GuestProgram` to machine code.

Only the handful of instructions the twin needs, with the eight legacy
registers (no REX.R/X/B).  Branches take labels and are encoded with 32-bit
displacements, patched when :meth:`Assembler.assemble` is called, so code size
does not depend on the distance.  ``tests/twin/test_asm.py`` checks each
encoding against GNU ``as`` when it is installed.

:func:`compile_program` lowers a program to code that runs at CPL3 in 64-bit
mode with guest-virtual = guest-physical (the twin's identity map), reporting
through the ports :mod:`gmemlab.guest` specifies.  A port write is a store to
a doorbell GPA with no memslot behind it (an MMIO exit the twin turns back into
an :class:`~gmemlab.api.IoOut`): the ``out`` instruction cannot be used, because
kvm_pvm forces IOPL to 0 in the guest, so ``out`` at CPL3 raises #GP, which a
guest without a PVM event entry turns into a triple fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from gmemlab import guest, uapi


class Reg(IntEnum):
    RAX = 0
    RCX = 1
    RDX = 2
    RBX = 3
    RSP = 4
    RBP = 5
    RSI = 6
    RDI = 7


class Cond(IntEnum):
    """Condition codes (the low nibble of ``0F 8x``)."""

    B = 0x2  # unsigned below (CF=1)
    E = 0x4  # equal / zero
    NE = 0x5  # not equal / not zero


_REX_W = 0x48


def _modrm_reg(reg: Reg, rm: Reg) -> int:
    return 0xC0 | (reg << 3) | rm


def _modrm_mem(reg: Reg, base: Reg) -> int:
    # mod=00 with rm=RSP needs a SIB byte and rm=RBP means RIP-relative: not supported.
    if base in (Reg.RSP, Reg.RBP):
        raise ValueError(f"[{base.name}] is not encodable without SIB/displacement here")
    return (reg << 3) | base


@dataclass(slots=True)
class Assembler:
    """Emit instructions in order; ``label()`` marks positions branches refer to."""

    code: bytearray = field(default_factory=bytearray)
    labels: dict[str, int] = field(default_factory=dict)
    fixups: list[tuple[int, str]] = field(default_factory=list)

    def _emit(self, *parts: int | bytes) -> None:
        for p in parts:
            if isinstance(p, int):
                self.code.append(p)
            else:
                self.code += p

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = len(self.code)

    def _rel32(self, name: str) -> None:
        self.fixups.append((len(self.code), name))
        self.code += b"\0\0\0\0"

    def assemble(self) -> bytes:
        """Resolve branch targets and return the machine code."""
        out = bytearray(self.code)
        for pos, name in self.fixups:
            if name not in self.labels:
                raise ValueError(f"undefined label {name!r}")
            struct.pack_into("<i", out, pos, self.labels[name] - (pos + 4))
        return bytes(out)

    # --- moves -------------------------------------------------------------------------------
    def mov_imm64(self, reg: Reg, imm: int) -> None:
        """``mov reg, imm64`` (REX.W B8+r)."""
        self._emit(_REX_W, 0xB8 + reg, struct.pack("<Q", imm & (2**64 - 1)))

    def mov_imm32(self, reg: Reg, imm: int) -> None:
        """``mov reg32, imm32`` (B8+r; zero-extends into the 64-bit register)."""
        self._emit(0xB8 + reg, struct.pack("<I", imm & 0xFFFFFFFF))

    def mov_al_imm8(self, imm: int) -> None:
        """``mov al, imm8`` (B0 ib)."""
        self._emit(0xB0, imm & 0xFF)

    def mov_r32(self, dst: Reg, src: Reg) -> None:
        """``mov dst32, src32`` (89 /r)."""
        self._emit(0x89, _modrm_reg(src, dst))

    def store8(self, base: Reg, src: Reg) -> None:
        """``mov byte [base], src8`` (88 /r); ``src`` is AL, CL, DL or BL."""
        self._emit(0x88, _modrm_mem(src, base))

    def store32(self, base: Reg, src: Reg) -> None:
        """``mov dword [base], src32`` (89 /r)."""
        self._emit(0x89, _modrm_mem(src, base))

    def load8(self, dst: Reg, base: Reg) -> None:
        """``mov dst8, byte [base]`` (8A /r); ``dst`` is AL, CL, DL or BL."""
        self._emit(0x8A, _modrm_mem(dst, base))

    # --- arithmetic ----------------------------------------------------------------------------
    def add_imm32(self, reg: Reg, imm: int) -> None:
        """``add reg, imm32`` (REX.W 81 /0 id)."""
        self._emit(_REX_W, 0x81, _modrm_reg(Reg(0), reg), struct.pack("<i", imm))

    def sub(self, dst: Reg, src: Reg) -> None:
        """``sub dst, src`` (REX.W 29 /r)."""
        self._emit(_REX_W, 0x29, _modrm_reg(src, dst))

    def cmp(self, a: Reg, b: Reg) -> None:
        """``cmp a, b`` (REX.W 39 /r): flags of ``a - b``."""
        self._emit(_REX_W, 0x39, _modrm_reg(b, a))

    def dec(self, reg: Reg) -> None:
        """``dec reg`` (REX.W FF /1)."""
        self._emit(_REX_W, 0xFF, _modrm_reg(Reg(1), reg))

    def test(self, a: Reg, b: Reg) -> None:
        """``test a, b`` (REX.W 85 /r)."""
        self._emit(_REX_W, 0x85, _modrm_reg(b, a))

    # --- strings -------------------------------------------------------------------------------
    def cld(self) -> None:
        self._emit(0xFC)

    def stosb(self) -> None:
        """``stosb``: store AL to [RDI], advance RDI."""
        self._emit(0xAA)

    def rep_stosb(self) -> None:
        """``rep stosb``: store AL to [RDI], RCX times."""
        self._emit(0xF3, 0xAA)

    def repe_scasb(self) -> None:
        """``repe scasb``: compare AL with [RDI] while equal, at most RCX times."""
        self._emit(0xF3, 0xAE)

    # --- control flow and I/O -------------------------------------------------------------------
    def jmp(self, target: str) -> None:
        """``jmp rel32`` (E9 cd)."""
        self._emit(0xE9)
        self._rel32(target)

    def jcc(self, cond: Cond, target: str) -> None:
        """``jcc rel32`` (0F 80+cc cd)."""
        self._emit(0x0F, 0x80 | cond)
        self._rel32(target)

    def call(self, reg: Reg) -> None:
        """``call reg`` (FF /2)."""
        self._emit(0xFF, _modrm_reg(Reg(2), reg))

    def ret(self) -> None:
        self._emit(0xC3)


# --- GuestProgram -> code --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    """Where a compiled program may reach.

    ``port_base``: the doorbell window; port ``p`` is a store to GPA
    ``port_base + p`` (no memslot there, so it exits as MMIO).  ``limit``: end
    of the identity map.  ``reserved``: a GPA range (the twin's own) that
    program ops may not touch.
    """

    port_base: int
    limit: int
    reserved: tuple[int, int]


def compile_program(program: guest.GuestProgram, target: Target) -> bytes:
    """Machine code for ``program``.

    Register use: RDI walks memory, RCX counts, RSI holds an end or a base, AL
    holds a byte value, RDX a doorbell address.  After the last op the code
    loops on the PORT_DONE doorbell so that every further KVM_RUN reports done
    again.
    """
    program.validate()
    a = Assembler()
    a.cld()
    for i, op in enumerate(program.ops):
        _check_range(op, target)
        if isinstance(op, guest.Fill):
            a.mov_imm64(Reg.RDI, op.gpa)
            a.mov_imm64(Reg.RCX, op.length)
            a.mov_al_imm8(op.value)
            a.rep_stosb()
        elif isinstance(op, guest.Check):
            _compile_check(a, target, op, f"ok{i}")
        elif isinstance(op, guest.Touch):
            _compile_touch(a, op, f"touch{i}")
        elif isinstance(op, guest.Report):
            a.mov_imm64(Reg.RSI, op.gpa)
            a.load8(Reg.RAX, Reg.RSI)
            _out(a, target, guest.PORT_REPORT)
        elif isinstance(op, guest.ReportVia):
            # Write the instruction byte by byte, then call it: the load runs from guest memory.
            a.mov_imm64(Reg.RDI, op.code_gpa)
            for b in guest.via_code(op.gpa):
                a.mov_al_imm8(b)
                a.stosb()
            a.mov_imm64(Reg.RAX, op.code_gpa)
            a.call(Reg.RAX)
            _out(a, target, guest.PORT_REPORT)
        else:
            a.mov_al_imm8(op.value)
            _out(a, target, op.port)
    a.label("done")
    a.mov_al_imm8(0)
    _out(a, target, guest.PORT_DONE)
    a.jmp("done")
    return a.assemble()


def _out(a: Assembler, target: Target, port: int, *, dword: bool = False) -> None:
    """Ring doorbell ``port`` with AL (or EAX when ``dword``)."""
    a.mov_imm64(Reg.RDX, target.port_base + port)
    if dword:
        a.store32(Reg.RDX, Reg.RAX)
    else:
        a.store8(Reg.RDX, Reg.RAX)


def _compile_check(a: Assembler, target: Target, op: guest.Check, ok: str) -> None:
    a.mov_imm64(Reg.RDI, op.gpa)
    a.mov_imm64(Reg.RCX, op.length)
    a.mov_al_imm8(op.value)
    a.repe_scasb()
    a.jcc(Cond.E, ok)
    # RDI is one past the differing byte: report its offset from op.gpa, then stop.
    a.mov_imm64(Reg.RSI, op.gpa + 1)
    a.sub(Reg.RDI, Reg.RSI)
    a.mov_r32(Reg.RAX, Reg.RDI)
    _out(a, target, guest.PORT_CHECK_FAIL, dword=True)
    a.jmp("done")
    a.label(ok)


def _compile_touch(a: Assembler, op: guest.Touch, loop: str) -> None:
    a.mov_imm64(Reg.RDI, op.gpa)
    a.mov_imm64(Reg.RSI, op.gpa + op.length)
    a.mov_al_imm8(op.value)
    a.label(loop)
    if op.write:
        a.store8(Reg.RDI, Reg.RAX)
    else:
        a.load8(Reg.RCX, Reg.RDI)
    a.add_imm32(Reg.RDI, uapi.PAGE_SIZE)
    a.cmp(Reg.RDI, Reg.RSI)
    a.jcc(Cond.B, loop)


def _check_range(op: guest.GuestOp, target: Target) -> None:
    if isinstance(op, guest.Out):
        return
    if isinstance(op, guest.ReportVia):
        spans = [(op.gpa, op.gpa + 1), (op.code_gpa, op.code_gpa + guest.VIA_CODE_SIZE)]
    else:
        spans = [(op.gpa, op.gpa + (1 if isinstance(op, guest.Report) else op.length))]
    lo, hi = target.reserved
    for start, end in spans:
        if end > target.limit:
            raise ValueError(f"{op}: beyond the guest's identity map ({target.limit:#x} bytes)")
        if start < hi and end > lo:
            raise ValueError(f"{op}: touches the twin's reserved GPA range [{lo:#x}, {hi:#x})")


def touch_pages_function() -> bytes:
    """Host code for ``void touch(char *addr, size_t npages)``: one byte store per 4 KiB page.

    SysV ABI: RDI = addr, RSI = npages.  It drives first-touch faults from
    native code, as the C benchmarks do, without a Python loop per page.
    """
    a = Assembler()
    a.test(Reg.RSI, Reg.RSI)
    a.jcc(Cond.E, "end")
    a.mov_al_imm8(1)
    a.label("loop")
    a.store8(Reg.RDI, Reg.RAX)
    a.add_imm32(Reg.RDI, uapi.PAGE_SIZE)
    a.dec(Reg.RSI)
    a.jcc(Cond.NE, "loop")
    a.label("end")
    a.ret()
    return a.assemble()
