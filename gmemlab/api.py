"""The one API that both backends implement: the model and the real-kernel twin.

Shaped like rust-vmm's kvm-ioctls: a :class:`Host` opens :class:`Kvm`, which
creates :class:`VmFd` objects, which create :class:`VcpuFd` objects and
guest_memfd files.  Every object owns what it opened (``close()`` and context
managers).  Errors are :class:`KernelError` (an ``OSError``), so
``e.errno == errno.EINVAL`` works as in the kernel selftests; an access that the
kernel answers with SIGBUS raises :class:`SigBus` instead.  vCPU exits are small
frozen dataclasses.

Scenarios written against these protocols run unchanged on ``gmemlab.model``
and ``gmemlab.twin``; the conformance suite does exactly that.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from gmemlab.guest import GuestProgram
from gmemlab.uapi import F_DUPFD, F_DUPFD_CLOEXEC, O_RDWR, PROT_RW


class KernelError(OSError):
    """A syscall or ioctl failed; ``.errno`` is the kernel's errno."""

    def __init__(self, err: int, what: str = "") -> None:
        super().__init__(err, f"{os.strerror(err)} [{_errno.errorcode.get(err, err)}]", what)
        self.what = what

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        where = f"{self.what}: " if self.what else ""
        return f"{where}{name} ({os.strerror(self.errno or 0)})"


class SigBus(Exception):
    """A user access took SIGBUS (e.g. a guest_memfd fault past i_size)."""

    def __init__(self, addr: int, what: str = "") -> None:
        super().__init__(f"SIGBUS at {addr:#x}" + (f" ({what})" if what else ""))
        self.addr = addr
        self.what = what


class SigSegv(Exception):
    """A user access took SIGSEGV: the address is not mapped, or the mapping's protection
    (``mprotect``, ``mmap`` PROT flags) does not allow the access."""

    def __init__(self, addr: int, what: str = "") -> None:
        super().__init__(f"SIGSEGV at {addr:#x}" + (f" ({what})" if what else ""))
        self.addr = addr
        self.what = what


def check_fcntl_cmd(cmd: int) -> None:
    """``MemFile.fcntl`` takes no F_DUPFD*: the new fd must have an owner (``MemFile.dup``)."""
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        raise ValueError("F_DUPFD/F_DUPFD_CLOEXEC: use dup(minfd, cloexec=...)")


# --- vCPU exits ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    port: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioRead:
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int


@dataclass(frozen=True, slots=True)
class FailEntry:
    reason: int


@dataclass(frozen=True, slots=True)
class MemoryFault:
    """KVM_EXIT_MEMORY_FAULT: KVM_RUN failed with EFAULT or EHWPOISON and filled ``memory_fault``.

    kvm-ioctls (``VcpuFd::run``, rust-vmm/kvm-ioctls ``kvm-ioctls/src/ioctls/vcpu.rs``) returns
    ``VcpuExit::MemoryFault`` for -1 with errno EFAULT or EHWPOISON and ``exit_reason ==
    KVM_EXIT_MEMORY_FAULT`` (Documentation/virt/kvm/api.rst: "errno will always be set to
    EFAULT or EHWPOISON"), and drops the errno.  Our choice: keep it in ``errno``, because a VMM
    answers EHWPOISON (``kvm_gmem_get_pfn()`` on a hwpoisoned folio) with a machine check for
    the guest, and EFAULT by fixing the gfn's attributes or backing.
    """

    gpa: int
    size: int
    flags: int
    errno: int = _errno.EFAULT


@dataclass(frozen=True, slots=True)
class UnknownExit:
    reason: int


VcpuExit = (
    IoOut | IoIn | MmioRead | MmioWrite | Hlt | Shutdown | InternalError | FailEntry | MemoryFault
    | UnknownExit
)


@dataclass(frozen=True, slots=True)
class DirectMapCounters:
    """``/proc/meminfo`` DirectMap4k/2M/1G, in kB."""

    direct_map_4k: int
    direct_map_2m: int
    direct_map_1g: int


@dataclass(frozen=True, slots=True)
class MapsEntry:
    """One VMA as ``/proc/self/smaps`` shows it (``show_map_vma()``, ``show_smap()``).

    ``flags`` are the VmFlags mnemonics both backends model: rd wr ex sh mr mw me ms lo dd.
    """

    start: int
    end: int
    perms: str  # "rw-s"
    offset: int
    path: str  # "" for anonymous memory, else the file's d_path()
    rss_kb: int
    flags: tuple[str, ...]


# --- protocols ---------------------------------------------------------------------------------
@runtime_checkable
class StatResult(Protocol):
    @property
    def st_size(self) -> int: ...
    @property
    def st_blksize(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_mode(self) -> int: ...
    @property
    def st_nlink(self) -> int: ...
    @property
    def st_blocks(self) -> int: ...
    @property
    def st_dev(self) -> int: ...


class Mapping(Protocol):
    """A mapping of a file (or anonymous memory) in the VMM's address space.

    ``madvise``/``mprotect`` take a range inside the mapping (default: all of it);
    ``munmap`` unmaps the mapping's whole range, whatever is mapped there by now.
    """

    @property
    def addr(self) -> int: ...
    @property
    def length(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def fill(self, offset: int, length: int, value: int) -> None: ...
    def mlock(self) -> None: ...
    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None: ...
    def mprotect(self, prot: int, offset: int = 0, length: int | None = None) -> None: ...
    def munmap(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class MemFile(Protocol):
    """A file whose pages can be mapped: guest_memfd, memfd_secret, memfd.

    ``mmap(fixed=m)`` is MAP_FIXED at ``m.addr``: it replaces whatever is mapped there.
    """

    def fileno(self) -> int: ...
    def mmap(self, length: int, offset: int = 0, *, shared: bool = True, prot: int = PROT_RW,
             populate: bool = False, fixed: Mapping | None = None) -> Mapping: ...
    def fstat(self) -> StatResult: ...
    def ftruncate(self, length: int) -> None: ...
    def dup(self, minfd: int = 0, *, cloexec: bool = False) -> Self: ...
    def fcntl(self, cmd: int, arg: int = 0) -> int: ...
    def fsync(self) -> None: ...
    def fdatasync(self) -> None: ...
    def fchmod(self, mode: int) -> None: ...
    def reopen(self, flags: int = O_RDWR) -> Self: ...
    def ioctl(self, request: int, arg: int = 0) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class GuestMemfd(MemFile, Protocol):
    @property
    def size(self) -> int: ...
    @property
    def flags(self) -> int: ...
    def fallocate(self, mode: int, offset: int, length: int) -> None: ...
    def read(self, length: int) -> bytes: ...
    def write(self, data: bytes) -> int: ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes, offset: int) -> int: ...
    def lseek(self, offset: int, whence: int) -> int: ...


class VcpuFd(Protocol):
    @property
    def vcpu_id(self) -> int: ...
    def load_program(self, program: GuestProgram) -> None: ...
    def run(self) -> VcpuExit: ...
    def stats(self) -> dict[str, int]: ...
    def ioctl(self, request: int, arg: int = 0) -> int: ...
    def kvm_clock(self, gpa: int) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class VmFd(Protocol):
    @property
    def vm_type(self) -> int: ...
    def check_extension(self, cap: int) -> int: ...
    def create_guest_memfd(self, size: int, flags: int = 0, *,
                           reserved: Sequence[int] = ()) -> GuestMemfd: ...
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int = 0) -> None: ...
    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: GuestMemfd | int | None = None,
        guest_memfd_offset: int = 0,
        *,
        pad1: int = 0,
        pad2: Sequence[int] = (),
    ) -> None: ...
    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None: ...
    def create_vcpu(self, vcpu_id: int) -> VcpuFd: ...
    def ioctl(self, request: int, arg: int = 0) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class Kvm(Protocol):
    def get_api_version(self) -> int: ...
    def check_extension(self, cap: int) -> int: ...
    def has_cap(self, cap: int) -> bool: ...
    def get_vcpu_mmap_size(self) -> int: ...
    def create_vm(self, vm_type: int = 0) -> VmFd: ...
    def ioctl(self, request: int, arg: int = 0) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class Host(Protocol):
    """The host kernel as the VMM sees it: /dev/kvm plus the mm syscalls around it."""

    name: str

    def open_kvm(self) -> Kvm: ...
    def memfd_secret(self, flags: int = 0) -> MemFile: ...
    def memfd_create(self, name: str = "gmemlab") -> MemFile: ...
    def mmap_anonymous(self, length: int, *, prot: int = PROT_RW, populate: bool = False,
                       fixed: Mapping | None = None) -> Mapping: ...
    def meminfo(self) -> DirectMapCounters: ...
    def maps(self, mapping: Mapping) -> list[MapsEntry]: ...
    # sendfile(2) and splice(2) between a memory file and a pipe or another file.
    def sendfile(self, out: MemFile, in_: MemFile, count: int, offset: int | None = None) -> int: ...
    def splice_to_pipe(self, file: MemFile, count: int, offset: int | None = None) -> bytes: ...
    def splice_from_pipe(self, file: MemFile, data: bytes, offset: int | None = None) -> int: ...
    # Kernel paths that reach user memory.  GUP-based ones fail on AS_NO_DIRECT_MAP mappings.
    def pipe_write_from(self, mapping: Mapping, offset: int, length: int) -> int: ...
    def proc_mem_read(self, mapping: Mapping, offset: int, length: int) -> bytes: ...
    def process_vm_readv(self, mapping: Mapping, offset: int, length: int) -> bytes: ...
    def vmsplice(self, mapping: Mapping, offset: int, length: int) -> int: ...
    def odirect_read_into(self, mapping: Mapping, offset: int, length: int) -> int: ...


# --- running a guest program ---------------------------------------------------------------------
@dataclass(slots=True)
class ProgramResult:
    """What a :class:`GuestProgram` reported, in order, and how it ended."""

    reports: list[int]
    check_failures: list[int]
    outs: list[tuple[int, int]]
    done: bool
    last_exit: VcpuExit | None

    @property
    def ok(self) -> bool:
        return self.done and not self.check_failures


def run_program(vcpu: VcpuFd, program: GuestProgram, *, max_exits: int = 10_000) -> ProgramResult:
    """Load ``program`` and run the vCPU until it reports PORT_DONE or stops otherwise.

    Stops early (``done=False``) on any exit other than port output, e.g. an MMIO
    access, a KVM_EXIT_MEMORY_FAULT, or a shutdown; the exit is in ``last_exit``.
    """
    from gmemlab.guest import PORT_CHECK_FAIL, PORT_DONE, PORT_REPORT

    vcpu.load_program(program)
    result = ProgramResult([], [], [], False, None)
    for _ in range(max_exits):
        ex = vcpu.run()
        result.last_exit = ex
        if not isinstance(ex, IoOut):
            return result
        if ex.port == PORT_DONE:
            result.done = True
            return result
        if ex.port == PORT_REPORT:
            result.reports.append(ex.data[0])
        elif ex.port == PORT_CHECK_FAIL:
            result.check_failures.append(int.from_bytes(ex.data[:4], "little"))
        else:
            result.outs.append((ex.port, ex.data[0]))
    raise RuntimeError(f"guest program did not finish within {max_exits} exits")
