"""The twin's assembler: encodings (checked against GNU as when present) and program lowering."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gmemlab import guest
from gmemlab.twin import guestenv, native
from gmemlab.twin.asm import Assembler, Cond, Reg, Target, compile_program, touch_pages_function

Emit = Callable[[Assembler], None]

# (GNU as Intel syntax, emitter, expected bytes)
ENCODINGS: list[tuple[str, Emit, str]] = [
    ("mov rdi, 0x1122334455667788", lambda a: a.mov_imm64(Reg.RDI, 0x1122334455667788),
     "48bf8877665544332211"),
    ("mov edx, 0xe0", lambda a: a.mov_imm32(Reg.RDX, 0xE0), "bae0000000"),
    ("mov al, 5", lambda a: a.mov_al_imm8(5), "b005"),
    ("mov eax, edi", lambda a: a.mov_r32(Reg.RAX, Reg.RDI), "89f8"),
    ("mov [rdi], al", lambda a: a.store8(Reg.RDI, Reg.RAX), "8807"),
    ("mov dword ptr [rdx], eax", lambda a: a.store32(Reg.RDX, Reg.RAX), "8902"),
    ("mov cl, [rdi]", lambda a: a.load8(Reg.RCX, Reg.RDI), "8a0f"),
    ("mov al, [rsi]", lambda a: a.load8(Reg.RAX, Reg.RSI), "8a06"),
    ("add rdi, 4096", lambda a: a.add_imm32(Reg.RDI, 4096), "4881c700100000"),
    ("sub rdi, rsi", lambda a: a.sub(Reg.RDI, Reg.RSI), "4829f7"),
    ("cmp rdi, rsi", lambda a: a.cmp(Reg.RDI, Reg.RSI), "4839f7"),
    ("dec rsi", lambda a: a.dec(Reg.RSI), "48ffce"),
    ("test rsi, rsi", lambda a: a.test(Reg.RSI, Reg.RSI), "4885f6"),
    ("cld", lambda a: a.cld(), "fc"),
    ("rep stosb", lambda a: a.rep_stosb(), "f3aa"),
    ("repe scasb", lambda a: a.repe_scasb(), "f3ae"),
    ("ret", lambda a: a.ret(), "c3"),
]  # fmt: skip


def _assemble(emit: Emit) -> bytes:
    a = Assembler()
    emit(a)
    return a.assemble()


@pytest.mark.parametrize("text,emit,expected", ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_encoding(text: str, emit: Emit, expected: str) -> None:
    assert _assemble(emit).hex() == expected


def test_branches_are_rel32_to_labels() -> None:
    a = Assembler()
    a.label("top")
    a.jmp("end")
    a.jcc(Cond.NE, "top")
    a.label("end")
    assert a.assemble().hex() == "e906000000" + "0f85f5ffffff"


def test_undefined_and_duplicate_labels() -> None:
    a = Assembler()
    a.jmp("nowhere")
    with pytest.raises(ValueError, match="undefined"):
        a.assemble()
    a.label("x")
    with pytest.raises(ValueError, match="twice"):
        a.label("x")


def test_unencodable_base_register() -> None:
    with pytest.raises(ValueError):
        _assemble(lambda a: a.store8(Reg.RSP, Reg.RAX))


def test_against_gnu_as(tmp_path: Path) -> None:
    """Assemble the same instructions with GNU as and compare the bytes."""
    gas, objcopy = shutil.which("as"), shutil.which("objcopy")
    if gas is None or objcopy is None:
        pytest.skip("GNU as/objcopy not installed")
    text = ["top:"] + [t for t, _, _ in ENCODINGS] + ["{disp32} jmp top", "{disp32} jne top"]
    (tmp_path / "t.s").write_text(".intel_syntax noprefix\n.code64\n" + "\n".join(text) + "\n")
    subprocess.run([gas, "--64", "-o", str(tmp_path / "t.o"), str(tmp_path / "t.s")], check=True)
    subprocess.run(
        [objcopy, "-O", "binary", "-j", ".text", str(tmp_path / "t.o"), str(tmp_path / "t.bin")],
        check=True,
    )
    a = Assembler()
    a.label("top")
    for _, emit, _ in ENCODINGS:
        emit(a)
    a.jmp("top")
    a.jcc(Cond.NE, "top")
    assert a.assemble() == (tmp_path / "t.bin").read_bytes()


TARGET = Target(port_base=0x1000_0000, limit=1 << 32, reserved=(0x2000_0000, 0x3000_0000))


def test_program_ends_in_done_loop() -> None:
    code = compile_program(guest.GuestProgram(), TARGET)
    # cld; mov al,0; mov rdx, port_base+PORT_DONE; mov [rdx], al; jmp back to the mov al
    done = (TARGET.port_base + guest.PORT_DONE).to_bytes(8, "little").hex()
    assert code.hex() == "fc" + "b000" + "48ba" + done + "8802" + "e9edffffff"


@pytest.mark.parametrize(
    "program",
    [
        guest.GuestProgram().fill((1 << 32) - 1, 2, 0),
        guest.GuestProgram().report(1 << 32),
        guest.GuestProgram().touch(0x2FFF_F000, 0x2000),
        guest.GuestProgram().check(0x1FFF_FFFF, 2, 0),
    ],
)
def test_program_range_checks(program: guest.GuestProgram) -> None:
    with pytest.raises(ValueError):
        compile_program(program, TARGET)


def test_twin_target_reserves_its_own_range() -> None:
    with pytest.raises(ValueError, match="reserved"):
        compile_program(guest.GuestProgram().report(guestenv.PRIVATE_GPA), guestenv.TARGET)
    assert guestenv.port_of(guestenv.PORT_WINDOW_GPA + guest.PORT_REPORT) == guest.PORT_REPORT
    assert guestenv.port_of(guestenv.PORT_WINDOW_GPA - 1) is None


def test_touch_pages_function_stores_one_byte_per_page() -> None:
    assert touch_pages_function().startswith(bytes.fromhex("4885f6"))
    buf = (ctypes.c_uint8 * (4 * 4096))()
    native.touch_pages()(ctypes.addressof(buf), 3)
    assert [buf[i * 4096] for i in range(4)] == [1, 1, 1, 0]
    assert sum(buf) == 3
    native.touch_pages()(ctypes.addressof(buf), 0)  # no page: no store
    assert sum(buf) == 3
