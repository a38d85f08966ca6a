"""Struct layouts and ioctl numbers of gmemlab.uapi, by hand and against <linux/kvm.h>."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from gmemlab import uapi

SIZES = {
    "kvm_create_guest_memfd": 64,
    "kvm_userspace_memory_region2": 160,
    "kvm_memory_attributes": 32,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8,
    "kvm_stats_header": 24,
    "kvm_stats_desc": 16,
}

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
}

# (C expression, uapi value, guard macro): the guard keeps the program compiling with
# headers that predate guest_memfd, KVM_SET_USER_MEMORY_REGION2 or NO_DIRECT_MAP.
RUN = uapi.kvm_run
EXIT = uapi.kvm_run_exit
LAYOUT = [
    *((f"sizeof(struct {n})", size, None) for n, size in SIZES.items()),
    *((name, value, name) for name, value in IOCTLS.items()),
    ("offsetof(struct kvm_run, exit_reason)", RUN.exit_reason.offset, None),
    ("offsetof(struct kvm_run, io)", RUN.exit.offset, None),
    ("offsetof(struct kvm_run, io.port)", RUN.exit.offset + uapi.kvm_run_io.port.offset, None),
    ("offsetof(struct kvm_run, io.data_offset)", RUN.exit.offset + 8, None),
    ("offsetof(struct kvm_run, mmio.len)", RUN.exit.offset + uapi.kvm_run_mmio.len.offset, None),
    (
        "offsetof(struct kvm_run, memory_fault.gpa)",
        RUN.exit.offset + uapi.kvm_run_memory_fault.gpa.offset,
        "KVM_EXIT_MEMORY_FAULT",
    ),
]
_STRUCT_GUARDS = {
    "kvm_create_guest_memfd": "KVM_CREATE_GUEST_MEMFD",
    "kvm_userspace_memory_region2": "KVM_SET_USER_MEMORY_REGION2",
    "kvm_memory_attributes": "KVM_SET_MEMORY_ATTRIBUTES",
    "kvm_stats_header": "KVM_GET_STATS_FD",
    "kvm_stats_desc": "KVM_GET_STATS_FD",
}
CONSTANTS = [
    n
    for n in vars(uapi)
    if n.startswith(("KVM_CAP_", "KVM_EXIT_", "KVM_MEM_", "GUEST_MEMFD_FLAG_", "KVM_X86_"))
    and isinstance(getattr(uapi, n), int)
]


@pytest.mark.parametrize("name,size", SIZES.items())
def test_struct_sizes(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(uapi, name)) == size


@pytest.mark.parametrize("name,value", IOCTLS.items())
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


def test_kvm_run_layout() -> None:
    assert uapi.kvm_run.exit.offset == 32
    assert ctypes.sizeof(uapi.kvm_run_exit) == 256
    assert uapi.kvm_run_io.data_offset.offset == 8
    assert uapi.kvm_run_mmio.len.offset == 16
    assert uapi.kvm_run_memory_fault.size.offset == 16


def test_cpuid2_with_entries() -> None:
    t = uapi.kvm_cpuid2_with(3)
    assert ctypes.sizeof(t) == 8 + 3 * 40
    assert t.entries.offset == 8


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for expr, _value, guard in LAYOUT:
        if guard is None and expr.startswith("sizeof(struct "):
            guard = _STRUCT_GUARDS.get(expr[len("sizeof(struct ") : -1])
        body = f'  printf("%s=%lu\\n", "{expr}", (unsigned long)({expr}));'
        lines += [f"#ifdef {guard}", body, "#endif"] if guard else [body]
    for name in CONSTANTS:
        lines += [
            f"#ifdef {name}",
            f'  printf("%s=%lu\\n", "{name}", (unsigned long)({name}));',
            "#endif",
        ]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def test_against_installed_headers(tmp_path: Path) -> None:
    """Compile a C program printing sizeof/offsetof/ioctl numbers from <linux/kvm.h>."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "layout.c"
    src.write_text(_c_program())
    build = subprocess.run([gcc, "-o", str(tmp_path / "layout"), str(src)], capture_output=True, text=True)
    if build.returncode != 0:
        if "linux/kvm.h" in build.stderr:
            pytest.skip("kernel headers (<linux/kvm.h>) not installed")
        pytest.fail(build.stderr)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True)
    seen = dict(line.split("=", 1) for line in out.stdout.splitlines())
    expected = {expr: value for expr, value, _ in LAYOUT}
    expected |= {name: getattr(uapi, name) for name in CONSTANTS}
    mismatches = {k: (int(v), expected[k]) for k, v in seen.items() if int(v) != expected[k]}
    assert not mismatches, f"header value vs uapi.py: {mismatches}"
    # Whatever the headers' age, the basic ioctls must have been compared.
    assert {"KVM_RUN", "KVM_GET_SREGS", "sizeof(struct kvm_sregs)"} <= seen.keys()
