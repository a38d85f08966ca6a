"""The KVM and mm user ABI: constants, ioctl numbers and struct layouts.

One place for every number that crosses the user/kernel boundary, shared by the
model (which validates calls exactly as the kernel does) and the twin (which
issues them to the real ``/dev/kvm``).  Values follow ``include/uapi/linux/kvm.h``
and ``include/uapi/linux/falloc.h`` as of the v12 series ("Direct Map Removal
Support for guest_memfd", 2026-04-10); ``tests/test_uapi.py`` checks the struct
sizes and ioctl numbers against the installed kernel headers when a C compiler
is available.
"""

from __future__ import annotations

import ctypes

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SHIFT = 21
PUD_SHIFT = 30
PTRS_PER_PTE = 512
PAGES_PER_PMD = 1 << (PMD_SHIFT - PAGE_SHIFT)  # 512
PAGES_PER_PUD = 1 << (PUD_SHIFT - PAGE_SHIFT)  # 262144

# --- ioctl encoding (include/uapi/asm-generic/ioctl.h) -----------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(typ: int, nr: int) -> int:
    return _ioc(_IOC_NONE, typ, nr, 0)


def _ior(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, typ, nr, size)


def _iow(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, typ, nr, size)


def _iowr(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, size)


KVMIO = 0xAE


# --- structs --------------------------------------------------------------------
class kvm_create_guest_memfd(ctypes.Structure):  # noqa: N801 - kernel name
    _fields_ = (
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    )


class kvm_userspace_memory_region2(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    )


class kvm_memory_attributes(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


# --- system ioctls ----------------------------------------------------------------
KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(KVMIO, 0x04)
KVM_API_VERSION = 12

# --- VM ioctls --------------------------------------------------------------------
KVM_CREATE_VCPU = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION2 = _iow(KVMIO, 0x49, ctypes.sizeof(kvm_userspace_memory_region2))
KVM_SET_MEMORY_ATTRIBUTES = _iow(KVMIO, 0xD2, ctypes.sizeof(kvm_memory_attributes))
KVM_CREATE_GUEST_MEMFD = _iowr(KVMIO, 0xD4, ctypes.sizeof(kvm_create_guest_memfd))
KVM_GET_STATS_FD = _io(KVMIO, 0xCE)

# --- vCPU ioctls --------------------------------------------------------------------
KVM_RUN = _io(KVMIO, 0x80)

# --- capabilities (KVM_CHECK_EXTENSION) -------------------------------------------
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_GUEST_MEMFD_FLAGS = 244

# --- guest_memfd creation flags ------------------------------------------------------
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_FLAG_NO_DIRECT_MAP = 1 << 2  # v8..v12 (bit 1 in v5/v6)

GUEST_MEMFD_FLAG_NAMES = {
    GUEST_MEMFD_FLAG_MMAP: "MMAP",
    GUEST_MEMFD_FLAG_INIT_SHARED: "INIT_SHARED",
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP: "NO_DIRECT_MAP",
}


def gmem_flags_str(flags: int) -> str:
    """``MMAP|INIT_SHARED`` style name of a guest_memfd flag word."""
    if not flags:
        return "0"
    names = [n for bit, n in GUEST_MEMFD_FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(GUEST_MEMFD_FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names)


# --- memslot flags ------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# --- VM types (x86) ---------------------------------------------------------------------
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5

X86_VM_TYPE_NAMES = {
    KVM_X86_DEFAULT_VM: "DEFAULT",
    KVM_X86_SW_PROTECTED_VM: "SW_PROTECTED",
    KVM_X86_SEV_VM: "SEV",
    KVM_X86_SEV_ES_VM: "SEV_ES",
    KVM_X86_SNP_VM: "SNP",
    KVM_X86_TDX_VM: "TDX",
}

# --- exit reasons (struct kvm_run.exit_reason) --------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# --- fallocate modes (include/uapi/linux/falloc.h) -----------------------------------------
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10

# --- memfd_secret (include/uapi/linux/secretmem.h has none; O_CLOEXEC only) -------------------
O_CLOEXEC = 0o2000000
SYS_memfd_secret = 447  # x86_64
