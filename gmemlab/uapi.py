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
PMD_ORDER = PMD_SHIFT - PAGE_SHIFT  # HPAGE_PMD_ORDER
PAGES_PER_PUD = 1 << (PUD_SHIFT - PAGE_SHIFT)  # 262144

# Linux errno values Python's errno module does not name (include/uapi/asm-generic/errno.h).
EHWPOISON = 133  # memory page has hardware error


# --- C integer types: what the kernel sees of a Python int passed as an argument ---------
# A syscall argument or a uAPI struct field has a C type; a caller's value is converted to
# it (modulo 2^N, as a C caller's cast would do) before any kernel check runs.
def to_u32(v: int) -> int:
    """``(__u32)v``."""
    return v & 0xFFFF_FFFF


def to_s32(v: int) -> int:
    """``(int)v``."""
    v &= 0xFFFF_FFFF
    return v - (1 << 32) if v >> 31 else v


def to_u64(v: int) -> int:
    """``(__u64)v`` (also ``unsigned long``/``size_t`` on 64-bit)."""
    return v & 0xFFFF_FFFF_FFFF_FFFF


def to_s64(v: int) -> int:
    """``(loff_t)v`` (``long long``)."""
    v &= 0xFFFF_FFFF_FFFF_FFFF
    return v - (1 << 64) if v >> 63 else v


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
class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = (
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    )


class kvm_userspace_memory_region(ctypes.Structure):
    """The legacy region: the first 32 bytes of ``kvm_userspace_memory_region2``."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class kvm_userspace_memory_region2(ctypes.Structure):
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


class kvm_memory_attributes(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class kvm_regs(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    )


class kvm_segment(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class kvm_dtable(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = (
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = (
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    )


class kvm_cpuid2(ctypes.Structure):
    """The fixed header; the ioctl numbers encode only its size (entries are a flex array)."""

    _fields_ = (
        ("nent", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
    )


class kvm_msr_entry(ctypes.Structure):
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    )


class kvm_msrs(ctypes.Structure):
    """``struct kvm_msrs`` with one entry (the ioctl number encodes only the 8-byte header)."""

    _fields_ = (
        ("nmsrs", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("entries", kvm_msr_entry * 1),
    )


MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01  # kvm-clock: pvclock gpa | enable bit (KVM_FEATURE_CLOCKSOURCE2)


def kvm_cpuid2_with(nent: int) -> type[ctypes.Structure]:
    """A ``struct kvm_cpuid2`` type with room for ``nent`` entries after the header."""
    return type(
        f"kvm_cpuid2_{nent}",
        (ctypes.Structure,),
        {
            "_fields_": (
                ("nent", ctypes.c_uint32),
                ("padding", ctypes.c_uint32),
                ("entries", kvm_cpuid_entry2 * nent),
            )
        },
    )


# struct kvm_run: the header, the exit union (256 bytes at offset 32) and the
# members of that union the twin decodes.  The tail (kvm_valid_regs, the synced
# register area) is not used, so the struct stops after the union.
class kvm_run_io(ctypes.Structure):
    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class kvm_run_mmio(ctypes.Structure):
    _fields_ = (
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    )


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = (
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    )


class kvm_run_internal(ctypes.Structure):
    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class kvm_run_memory_fault(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("gpa", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class kvm_run_exit(ctypes.Union):
    _fields_ = (
        ("hardware_exit_reason", ctypes.c_uint64),
        ("fail_entry", kvm_run_fail_entry),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", ctypes.c_char * 256),
    )


class kvm_run(ctypes.Structure):
    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", kvm_run_exit),
    )


# Binary statistics (KVM_GET_STATS_FD): a header, then descriptors each followed by
# a name of header.name_size bytes, then the u64 data.
class kvm_stats_header(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("name_size", ctypes.c_uint32),
        ("num_desc", ctypes.c_uint32),
        ("id_offset", ctypes.c_uint32),
        ("desc_offset", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint32),
    )


class kvm_stats_desc(ctypes.Structure):
    """The fixed part; ``name`` (header.name_size bytes) follows it."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("exponent", ctypes.c_int16),
        ("size", ctypes.c_uint16),
        ("offset", ctypes.c_uint32),
        ("bucket_size", ctypes.c_uint32),
    )


KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2


# --- system ioctls ----------------------------------------------------------------
KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(KVMIO, 0x05, ctypes.sizeof(kvm_cpuid2))
KVM_API_VERSION = 12

# --- VM ioctls --------------------------------------------------------------------
KVM_CREATE_VCPU = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _iow(KVMIO, 0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_USER_MEMORY_REGION2 = _iow(KVMIO, 0x49, ctypes.sizeof(kvm_userspace_memory_region2))
KVM_SET_MEMORY_ATTRIBUTES = _iow(KVMIO, 0xD2, ctypes.sizeof(kvm_memory_attributes))
KVM_CREATE_GUEST_MEMFD = _iowr(KVMIO, 0xD4, ctypes.sizeof(kvm_create_guest_memfd))
KVM_GET_STATS_FD = _io(KVMIO, 0xCE)

# --- vCPU ioctls --------------------------------------------------------------------
KVM_RUN = _io(KVMIO, 0x80)
KVM_GET_REGS = _ior(KVMIO, 0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _iow(KVMIO, 0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(KVMIO, 0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(KVMIO, 0x84, ctypes.sizeof(kvm_sregs))
KVM_SET_MSRS = _iow(KVMIO, 0x89, 8)  # sizeof(struct kvm_msrs) without its entries
KVM_SET_CPUID2 = _iow(KVMIO, 0x90, ctypes.sizeof(kvm_cpuid2))

# --- capabilities (KVM_CHECK_EXTENSION) -------------------------------------------
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_EXT_CPUID = 7
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


def gmem_flags_parse(text: str) -> int:
    """The flag word :func:`gmem_flags_str` named."""
    by_name = {n: bit for bit, n in GUEST_MEMFD_FLAG_NAMES.items()}
    return 0 if text == "0" else sum(by_name[n] for n in text.split("|"))


# --- memslot flags ------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
# The only flags the legacy KVM_SET_USER_MEMORY_REGION takes (virt/kvm/kvm_main.c).
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
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
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_INTERNAL_ERROR_EMULATION = 1  # kvm_run.internal.suberror: the emulator failed
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
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80  # since 6.17
FALLOC_FL_ALLOCATE_RANGE = 0x00
FALLOC_FL_MODE_MASK = (FALLOC_FL_ALLOCATE_RANGE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE
                       | FALLOC_FL_ZERO_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_UNSHARE_RANGE
                       | FALLOC_FL_WRITE_ZEROES)

# --- memfd_secret (include/uapi/linux/secretmem.h has none; O_CLOEXEC only) -------------------
O_CLOEXEC = 0o2000000

# --- mm and VFS calls a VMM makes (include/uapi/asm-generic/mman-common.h, fcntl.h; x86_64) ----
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
PROT_SEM = 0x8
PROT_RW = PROT_READ | PROT_WRITE
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_POPULATE = 0x8000
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2
O_ACCMODE = 0o3
O_APPEND = 0o2000
O_NONBLOCK = 0o4000
O_DIRECT = 0o40000
O_LARGEFILE = 0o100000
O_NOATIME = 0o1000000
FD_CLOEXEC = 1
F_DUPFD = 0
F_GETFD = 1
F_SETFD = 2
F_GETFL = 3
F_SETFL = 4
F_DUPFD_CLOEXEC = 1030
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
FIONCLEX = 0x5450
FIOCLEX = 0x5451
SYS_memfd_secret = 447  # x86_64
