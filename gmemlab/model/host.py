"""The model behind the shared API: a VMM process on a modelled host.

:class:`Host` implements :class:`gmemlab.api.Host` on a
:class:`~gmemlab.model.machine.Machine`.  Each call is the syscall or ioctl it
names, run as the VMM task on its CPU; a negative result becomes
:class:`~gmemlab.api.KernelError` with that errno, a user access that faults
with ``VM_FAULT_SIGBUS`` becomes :class:`~gmemlab.api.SigBus`.

Model-only extras, for scenarios that need a hand inside the kernel, are
methods prefixed with nothing special but documented as such:
:meth:`Host.gadget_read`, :meth:`Host.kernel_alloc`, :meth:`Host.memory_failure`,
:meth:`VcpuFd.kvm_clock`, :meth:`VmFd.link_guest_memfd`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOMEM, ENOTTY, EOPNOTSUPP
from typing import Self, TypeVar

import numpy as np
from numpy.typing import NDArray

from gmemlab import api
from gmemlab.api import (
    DirectMapCounters,
    KernelError,
    MapsEntry,
    MemoryFault,
    SigBus,
    SigSegv,
    VcpuExit,
    check_fcntl_cmd,
)
from gmemlab.guest import GuestProgram
from gmemlab.model.fs import (
    File,
    Inode,
    chmod_common,
    do_fcntl,
    do_sendfile,
    do_sys_ftruncate,
    fput,
    ksys_pread64,
    ksys_pwrite64,
    reopen,
    splice_file_to_pipe,
    splice_pipe_to_file,
    vfs_fallocate,
    vfs_fsync,
    vfs_llseek,
    vfs_read,
    vfs_write,
)
from gmemlab.model.kvm.guest_memfd import kvm_gmem_create, kvm_gmem_link, kvm_gmem_populate
from gmemlab.model.kvm.kvm_main import (
    Kvm as KvmStruct,
)
from gmemlab.model.kvm.kvm_main import (
    kvm_check_extension,
    kvm_dev_ioctl_create_vm,
    kvm_read_guest,
    kvm_set_memory_attributes,
    kvm_set_memory_region,
)
from gmemlab.model.kvm.pfncache import kvm_write_system_time
from gmemlab.model.kvm.vcpu import Vcpu, kvm_arch_vcpu_ioctl_run, kvm_vcpu_map
from gmemlab.model.machine import Machine, MachineConfig
from gmemlab.model.mm.gup import (
    FOLL_FORCE,
    FOLL_LONGTERM,
    FOLL_PIN,
    FOLL_WRITE,
    get_user_pages,
    put_pages,
)
from gmemlab.model.mm.madvise import do_madvise, mm_populate
from gmemlab.model.mm.memmap import PG_hwpoison
from gmemlab.model.mm.memory import (
    VM_DONTDUMP,
    VM_EXEC,
    VM_FAULT_HWPOISON,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    BulkOp,
    UserOp,
    Vma,
    do_mprotect_pkey,
    do_vmi_munmap,
    fault_name,
    sys_mmap,
    walk_user,
)
from gmemlab.model.mm.mlock import do_mlock
from gmemlab.model.mm.page_alloc import GFP_KERNEL, alloc_page, clear_page
from gmemlab.model.mm.secretmem import sys_memfd_secret
from gmemlab.model.mm.shmem import shmem_read, shmem_write, sys_memfd_create
from gmemlab.model.mm.tlb import speculative_read
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    EHWPOISON,
    F_DUPFD,
    F_DUPFD_CLOEXEC,
    FIOCLEX,
    FIONCLEX,
    KVM_API_VERSION,
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS,
    O_CLOEXEC,
    O_RDWR,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_RW,
    to_u32,
    to_u64,
)

T = TypeVar("T")
KVM_MAX_VCPU_IDS = 4096
VCPU_MMAP_SIZE = 3 * PAGE_SIZE


def _ours(mapping: api.Mapping) -> Mapping:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{mapping!r} is not a mapping of this modelled host")
    return mapping


def _check(r: int, what: str) -> int:
    if r < 0:
        raise KernelError(-r, what)
    return r


# Requests do_vfs_ioctl() (fs/ioctl.c, 6.18) answers for every fd before the file's own
# ->unlocked_ioctl: FIOCLEX and FIONCLEX are modelled; the model does not guess the others.
_UNMODELLED_VFS_IOCTLS = {
    0x1: "FIBMAP", 0x2: "FIGETBSZ", 0x5421: "FIONBIO", 0x5452: "FIOASYNC", 0x5460: "FIOQSIZE",
    0x541B: "FIONREAD", 0xC0045877: "FIFREEZE", 0xC0045878: "FITHAW",
    0xC020660B: "FS_IOC_FIEMAP", 0x40049409: "FICLONE", 0x4020940D: "FICLONERANGE",
    0xC018940E: "FIDEDUPERANGE", 0x80086601: "FS_IOC_GETFLAGS", 0x40086602: "FS_IOC_SETFLAGS",
}


@dataclass(frozen=True, slots=True)
class StatResult:
    """``fstat(2)``: ``generic_fillattr()`` of the inode (``i_blocks`` in 512-byte units)."""

    st_size: int
    st_blksize: int
    st_ino: int
    st_mode: int
    st_nlink: int
    st_blocks: int
    st_dev: int


def do_vfs_ioctl(fds_owner: _Owned, request: int) -> int | None:
    """``do_vfs_ioctl()``'s requests common to every fd: FIOCLEX/FIONCLEX set the fd's
    close-on-exec bit; the other generic ones are not modelled; None: not one of them."""
    fd = fds_owner.fileno()
    table = fds_owner.host.proc.fds
    if request == FIOCLEX:
        table.cloexec.add(fd)
        return 0
    if request == FIONCLEX:
        table.cloexec.discard(fd)
        return 0
    if request in _UNMODELLED_VFS_IOCTLS:
        raise NotImplementedError(f"{_UNMODELLED_VFS_IOCTLS[request]} is not modelled")
    return None


class _Owned:
    """Something the VMM holds by a file descriptor; closing twice is harmless.

    Every call on it after ``close()`` is EBADF and changes nothing: the syscall's
    ``fdget()`` finds no file (the object never reuses its fd number for another file).
    """

    def __init__(self, host: Host, fd: int) -> None:
        self.host = host
        self._fd = fd
        self.closed = False

    def fileno(self) -> int:
        if self.closed:
            raise KernelError(EBADF, f"fd {self._fd} is closed")
        return self._fd

    @property
    def file(self) -> File:
        """``fdget()``: the open file, or EBADF once closed."""
        f = self.host.proc.fds.get(self.fileno())
        assert f is not None
        return f

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        file = self.host.proc.fds.close(self._fd)
        self.host.run(fput(self.host.m, file))

    def ioctl(self, request: int, arg: int = 0) -> int:
        """``ioctl(2)`` -> ``do_vfs_ioctl()``, then the file's own ``->unlocked_ioctl``
        (:meth:`unlocked_ioctl`): ENOTTY where there is none (guest_memfd, memfd_secret,
        memfd: ``vfs_ioctl()``)."""
        r = do_vfs_ioctl(self, to_u32(request))
        if r is not None:
            return r
        return _check(self.unlocked_ioctl(to_u32(request)), f"ioctl({request:#x})")

    def unlocked_ioctl(self, request: int) -> int:
        """The file's ``->unlocked_ioctl`` for a request this API has no method for."""
        return -ENOTTY

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Mapping:
    """A mapping in the VMM's address space; accesses walk its page tables."""

    def __init__(self, host: Host, addr: int, length: int) -> None:
        self.host = host
        self.addr = addr
        self.length = length
        self.unmapped = False

    def _range(self, offset: int, length: int) -> int:
        if self.unmapped:
            raise ValueError("mapping was unmapped")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"[{offset}, {offset + length}) is outside the {self.length}-byte mapping")
        return self.addr + offset

    def _access(self, offset: int, length: int, write: bool, op: UserOp,
                bulk: BulkOp | None = None) -> None:
        addr = self._range(offset, length)
        h = self.host
        done = 0

        def counted(pfn: int, poff: int, boff: int, n: int) -> None:
            nonlocal done
            op(pfn, poff, boff, n)
            done = boff + n

        def counted_bulk(pfns: NDArray[np.int64], boff: int) -> None:
            nonlocal done
            assert bulk is not None
            bulk(pfns, boff)
            done = boff + len(pfns) * PAGE_SIZE

        r = h.run(walk_user(h.m, h.proc, addr, length, write, counted,
                            None if bulk is None else counted_bulk))
        if r in (-VM_FAULT_SIGBUS, -VM_FAULT_HWPOISON):
            raise SigBus(addr + done, "user access")
        if r in (-VM_FAULT_SIGSEGV, -EFAULT):
            raise SigSegv(addr + done, "user access: " + fault_name(r))
        if r == -VM_FAULT_OOM:
            raise KernelError(ENOMEM, "page fault kept returning VM_FAULT_OOM")
        if r < 0:
            raise KernelError(EFAULT, f"user access: {fault_name(r)}")

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        mem = self.host.m.mem

        def op(pfn: int, poff: int, boff: int, n: int) -> None:
            out[boff : boff + n] = mem.read(pfn, poff, n)

        self._access(offset, length, False, op)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        mem = self.host.m.mem

        def op(pfn: int, poff: int, boff: int, n: int) -> None:
            mem.write(pfn, poff, data[boff : boff + n], secret=True)

        self._access(offset, len(data), True, op)

    def fill(self, offset: int, length: int, value: int) -> None:
        mem = self.host.m.mem

        def op(pfn: int, poff: int, boff: int, n: int) -> None:
            mem.memset(pfn, poff, n, value, secret=True)

        def pages(pfns: NDArray[np.int64], boff: int) -> None:
            mem.memset_pages(pfns, value, secret=True)

        self._access(offset, length, True, op, pages)

    def mlock(self) -> None:
        h = self.host
        _check(h.run(do_mlock(h.m, h.proc, self._range(0, 0), self.length)), "mlock")

    def _sub(self, offset: int, length: int | None) -> tuple[int, int]:
        n = self.length - offset if length is None else length
        return self._range(offset, n), n

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """``madvise(2)`` of [offset, offset+length) (see :func:`do_madvise`)."""
        h = self.host
        addr, n = self._sub(offset, length)
        _check(h.run(do_madvise(h.m, h.proc, addr, n, advice)), f"madvise({advice})")

    def mprotect(self, prot: int, offset: int = 0, length: int | None = None) -> None:
        """``mprotect(2)`` of [offset, offset+length) (see :func:`do_mprotect_pkey`)."""
        h = self.host
        addr, n = self._sub(offset, length)
        _check(h.run(do_mprotect_pkey(h.m, h.proc, addr, n, prot)), f"mprotect({prot:#x})")

    def munmap(self) -> None:
        """``munmap(2)`` of the whole range; a second call does nothing."""
        if self.unmapped:
            return
        h = self.host
        _check(h.run(do_vmi_munmap(h.m, h.proc, self.addr, self.length)), "munmap")
        self.unmapped = True

    def pfn(self, offset: int) -> int:
        """Model only: the pfn the page at ``offset`` maps now (-1 if none)."""
        vma = self.host.proc.mm.find_vma(self._range(offset, 0))
        if vma is None:
            return -1
        return vma.ptes.load((self.addr + offset - vma.start) >> PAGE_SHIFT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.munmap()


class MemFile(_Owned):
    """memfd_secret, memfd and guest_memfd files."""

    def mmap(self, length: int, offset: int = 0, *, shared: bool = True, prot: int = PROT_RW,
             populate: bool = False, fixed: api.Mapping | None = None) -> Mapping:
        """``mmap(2)`` of the file (see :func:`mmap_in`)."""
        return mmap_in(self.host, self.file, length, offset, shared=shared, prot=prot,
                       populate=populate, fixed=fixed)

    def fstat(self) -> StatResult:
        """``vfs_getattr()``: st_blocks is ``i_blocks``, which only shmem keeps (one page is
        8 blocks; guest_memfd and secretmem leave it 0)."""
        inode = self.file.inode
        blocks = inode.mapping.nrpages * (PAGE_SIZE // 512) if inode.kind == "shmem" else 0
        return StatResult(inode.size, PAGE_SIZE, inode.ino, inode.mode, inode.nlink, blocks,
                          inode.dev)

    def ftruncate(self, length: int) -> None:
        _check(self.host.run(do_sys_ftruncate(self.host.m, self.file, length)), "ftruncate")

    def _another(self, fd: int) -> Self:
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        _Owned.__init__(other, self.host, fd)
        return other

    def dup(self, minfd: int = 0, *, cloexec: bool = False) -> Self:
        """``fcntl(F_DUPFD[_CLOEXEC], minfd)`` (``dup(2)`` with ``minfd`` 0): the lowest free
        fd >= ``minfd`` on the same open file, owned by the object returned."""
        h = self.host
        cmd = F_DUPFD_CLOEXEC if cloexec else F_DUPFD
        fd = _check(h.run(do_fcntl(h.m, h.proc.fds, self.fileno(), cmd, minfd)), "F_DUPFD")
        return self._another(fd)

    def fcntl(self, cmd: int, arg: int = 0) -> int:
        """``fcntl(2)`` (see :func:`do_fcntl`); F_DUPFD/F_DUPFD_CLOEXEC go through :meth:`dup`,
        which owns the new fd."""
        check_fcntl_cmd(cmd)
        h = self.host
        return _check(h.run(do_fcntl(h.m, h.proc.fds, self.fileno(), cmd, arg)), f"fcntl({cmd})")

    def fsync(self) -> None:
        _check(self.host.run(vfs_fsync(self.host.m, self.file)), "fsync")

    def fdatasync(self) -> None:
        _check(self.host.run(vfs_fsync(self.host.m, self.file)), "fdatasync")

    def fchmod(self, mode: int) -> None:
        _check(self.host.run(chmod_common(self.host.m, self.file, mode)), "fchmod")

    def reopen(self, flags: int = O_RDWR) -> Self:
        """``open("/proc/self/fd/N", flags)`` (see :func:`reopen`)."""
        h = self.host
        new = h.run(reopen(h.m, self.file, flags))
        if isinstance(new, int):
            raise KernelError(-new, "open(/proc/self/fd)")
        fd = h.proc.fds.install(new, cloexec=bool(flags & O_CLOEXEC))
        return self._another(fd)


class GuestMemfd(MemFile):
    def __init__(self, host: Host, fd: int, size: int, flags: int) -> None:
        super().__init__(host, fd)
        self.size = size
        self.flags = flags

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        _check(self.host.run(vfs_fallocate(self.host.m, self.file, mode, offset, length)),
               "fallocate")

    def read(self, length: int) -> bytes:
        _check(self.host.run(vfs_read(self.host.m, self.file)), "read")
        raise AssertionError("guest_memfd has no ->read")

    def write(self, data: bytes) -> int:
        _check(self.host.run(vfs_write(self.host.m, self.file)), "write")
        raise AssertionError("guest_memfd has no ->write")

    def pread(self, length: int, offset: int) -> bytes:
        _check(self.host.run(ksys_pread64(self.host.m, self.file, offset)), "pread")
        raise AssertionError("guest_memfd has no ->read")

    def pwrite(self, data: bytes, offset: int) -> int:
        _check(self.host.run(ksys_pwrite64(self.host.m, self.file, offset)), "pwrite")
        raise AssertionError("guest_memfd has no ->write")

    def lseek(self, offset: int, whence: int) -> int:
        return _check(self.host.run(vfs_llseek(self.host.m, self.file, offset, whence)), "lseek")

    @property
    def inode_no(self) -> int:
        return self.file.inode.ino

    def pfn(self, offset: int) -> int:
        """Model only: the pfn of the folio at ``offset`` in the page cache (-1 if none)."""
        return self.file.inode.mapping.i_pages.load(offset >> PAGE_SHIFT)


class VcpuFd(_Owned):
    def __init__(self, host: Host, fd: int, vcpu: Vcpu) -> None:
        super().__init__(host, fd)
        self.vcpu = vcpu

    @property
    def vcpu_id(self) -> int:
        return self.vcpu.vcpu_id

    def load_program(self, program: GuestProgram) -> None:
        self.fileno()
        self.vcpu.load(program)

    def run(self) -> VcpuExit:
        """``KVM_RUN``; EFAULT or EHWPOISON with ``KVM_EXIT_MEMORY_FAULT`` comes back as
        :class:`MemoryFault` (kvm-ioctls' ``VcpuFd::run``); any other error raises."""
        self.fileno()
        if self.vcpu.program is None:
            raise RuntimeError("no guest program loaded (load_program first)")
        h = self.host
        r = h.m.run(self.vcpu.task, kvm_arch_vcpu_ioctl_run(h.m, self.vcpu))
        if isinstance(r, int):
            mf = self.vcpu.memory_fault
            if r in (-EFAULT, -EHWPOISON) and mf is not None:
                return MemoryFault(*mf, errno=-r)
            raise KernelError(-r, "KVM_RUN")
        return r

    def stats(self) -> dict[str, int]:
        self.fileno()
        return dict(self.vcpu.stats)

    def unlocked_ioctl(self, request: int) -> int:
        """``kvm_vcpu_ioctl()``: a request of another ioctl type, or one neither it nor x86
        ``kvm_arch_vcpu_ioctl()`` knows, is EINVAL."""
        return -EINVAL

    def kvm_clock(self, gpa: int) -> None:
        """``MSR_KVM_SYSTEM_TIME_NEW`` = ``gpa | 1``: kvm-clock on, its pvclock at ``gpa``.

        Succeeds whatever becomes of the pvclock, as the WRMSR does
        (:func:`~gmemlab.model.kvm.pfncache.kvm_write_system_time`): whether KVM wrote it
        shows in guest memory only (``version``, the first 4 bytes, even and non-zero).
        """
        self.fileno()
        h = self.host
        h.m.run(self.vcpu.task, kvm_write_system_time(h.m, self.vcpu, gpa))

    def kvm_vcpu_map(self, gpa: int) -> int:
        """Model only: ``kvm_vcpu_map()`` of ``gpa`` (as nested VMX maps a vmcs12): the pfn."""
        self.fileno()
        h = self.host
        pfn = h.m.run(self.vcpu.task, kvm_vcpu_map(h.m, self.vcpu, gpa))
        _check(pfn, "kvm_vcpu_map")
        return pfn


class VmFd(_Owned):
    def __init__(self, host: Host, fd: int, kvm: KvmStruct) -> None:
        super().__init__(host, fd)
        self.kvm = kvm

    @property
    def vm_type(self) -> int:
        return self.kvm.vm_type

    def check_extension(self, cap: int) -> int:
        self.fileno()
        return kvm_check_extension(self.host.m, self.kvm, cap)

    def create_guest_memfd(self, size: int, flags: int = 0, *,
                           reserved: Sequence[int] = ()) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: ``struct kvm_create_guest_memfd`` has ``__u64`` fields.

        ``kvm_gmem_create()`` never reads ``reserved[6]``: any value is accepted (kvm-next
        and v12 alike; nothing posted checks it).
        """
        self.fileno()
        if len(reserved) > 6:
            raise ValueError("struct kvm_create_guest_memfd has 6 reserved words")
        h = self.host
        size, flags = to_u64(size), to_u64(flags)
        fd = _check(h.run(kvm_gmem_create(h.m, self.kvm, size, flags)), "KVM_CREATE_GUEST_MEMFD")
        return GuestMemfd(h, fd, size, flags)

    def link_guest_memfd(self, other: GuestMemfd) -> GuestMemfd:
        """Model only: a file of this VM on ``other``'s inode (see ``kvm_gmem_link``)."""
        self.fileno()
        h = self.host
        fd = _check(h.run(kvm_gmem_link(h.m, self.kvm, other.file)), "link")
        return GuestMemfd(h, fd, other.size, other.flags)

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int = 0) -> None:
        """The legacy ``KVM_SET_USER_MEMORY_REGION`` (``kvm_vm_ioctl()``, 6.18): the
        32-byte struct, the rest of ``kvm_userspace_memory_region2`` zeroed, and EINVAL for
        any flag outside ``KVM_SET_USER_MEMORY_REGION_V1_FLAGS`` (so no guest_memfd)."""
        self.fileno()
        if to_u32(flags) & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
            raise KernelError(EINVAL, "KVM_SET_USER_MEMORY_REGION")
        self._set_region(slot, flags, guest_phys_addr, memory_size, userspace_addr, 0, 0,
                         "KVM_SET_USER_MEMORY_REGION")

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int = 0,
                                guest_memfd: api.GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0, *, pad1: int = 0,
                                pad2: Sequence[int] = ()) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``; each value as its field of
        ``struct kvm_userspace_memory_region2`` holds it (``__u32`` slot, flags and fd,
        ``__u64`` addresses, size and offset).  ``pad1``/``pad2`` are never read by
        ``kvm_set_memory_region()``: any value is accepted (measured on 6.18.44)."""
        self.fileno()
        if len(pad2) > 14:
            raise ValueError("struct kvm_userspace_memory_region2 has 14 pad2 words")
        if guest_memfd is None:
            gfd = 0
        elif isinstance(guest_memfd, int):
            gfd = guest_memfd
        else:
            gfd = guest_memfd.fileno()
        self._set_region(slot, flags, guest_phys_addr, memory_size, userspace_addr, gfd,
                         guest_memfd_offset, "KVM_SET_USER_MEMORY_REGION2")

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, uaddr: int, gfd: int,
                    gmem_offset: int, what: str) -> None:
        h = self.host
        _check(h.run(kvm_set_memory_region(h.m, self.kvm, to_u32(slot), to_u32(flags),
                                           to_u64(gpa), to_u64(size), to_u64(uaddr),
                                           to_u32(gfd), to_u64(gmem_offset))), what)

    def read_guest(self, gpa: int, length: int) -> bytes:
        """Model only: ``kvm_read_guest()``, KVM's copy_from_user through ``userspace_addr``."""
        self.fileno()
        h = self.host
        r = h.run(kvm_read_guest(h.m, self.kvm, gpa, length))
        if isinstance(r, int):
            raise KernelError(-r, "kvm_read_guest")
        return r

    def snp_launch_update(self, gpa: int, data: bytes) -> None:
        """Model only: ``KVM_SEV_SNP_LAUNCH_UPDATE`` of one private page at ``gpa``
        (``kvm_gmem_populate()`` with ``sev_gmem_post_populate()``): ``data`` is the source
        page the VMM passes."""
        self.fileno()
        if len(data) != PAGE_SIZE or gpa % PAGE_SIZE:
            raise KernelError(EINVAL, "snp_launch_update")
        h = self.host
        _check(h.run(kvm_gmem_populate(h.m, self.kvm, gpa >> PAGE_SHIFT, data)), "snp_launch_update")

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``: ``struct kvm_memory_attributes`` has ``__u64`` fields."""
        self.fileno()
        h = self.host
        _check(h.run(kvm_set_memory_attributes(h.m, self.kvm, to_u64(address), to_u64(size),
                                               to_u64(attributes), 0)),
               "KVM_SET_MEMORY_ATTRIBUTES")

    def unlocked_ioctl(self, request: int) -> int:
        """``kvm_vm_ioctl()`` -> ``kvm_arch_vm_ioctl()``: an unknown request is ENOTTY."""
        return -ENOTTY

    def create_vcpu(self, vcpu_id: int, *, cpu: int | None = None) -> VcpuFd:
        """``KVM_CREATE_VCPU``; the vCPU thread runs on ``cpu`` (default: vcpu_id mod ncpus)."""
        self.fileno()
        h = self.host
        kvm = self.kvm
        if not 0 <= vcpu_id < KVM_MAX_VCPU_IDS:
            raise KernelError(EINVAL, "KVM_CREATE_VCPU")
        if vcpu_id in kvm.vcpus:
            raise KernelError(EEXIST, "KVM_CREATE_VCPU")
        if len(kvm.vcpus) >= h.m.profile.max_vcpus:
            raise KernelError(EINVAL, "KVM_CREATE_VCPU")
        ncpus = h.m.config.ncpus
        task = h.m.task(f"vcpu{vcpu_id}", vcpu_id % ncpus if cpu is None else cpu)
        vcpu = Vcpu(kvm, vcpu_id, task)
        kvm.vcpus[vcpu_id] = vcpu
        kvm.get()
        fd = h.install(_KvmFileOps("kvm-vcpu", kvm), kvm)
        return VcpuFd(h, fd, vcpu)


class _KvmFileOps:
    """The fops of /dev/kvm, VM and vCPU files: release drops the VM reference."""

    has_read = has_write = has_llseek = has_fsync = has_splice_read = has_splice_write = False

    def __init__(self, name: str, kvm: KvmStruct | None) -> None:
        self.name = name
        self.kvm = kvm

    def release(self, m: Machine, file: File) -> KGen[None]:
        yield ("file", id(file))
        if self.kvm is not None:
            yield from self.kvm.put(m)

    def mmap(self, m: Machine, file: File, vma: object) -> KGen[int]:
        yield ("file", id(file))
        return -ENODEV

    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
        yield ("file", id(file))
        return -95

    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]:
        yield ("file", id(file))
        return -EINVAL

    def setattr_mode(self, m: Machine, file: File, mode: int) -> KGen[int]:
        """``anon_inode_setattr()`` (fs/anon_inodes.c, since 6.15): EOPNOTSUPP."""
        yield ("file", id(file))
        return -EOPNOTSUPP


class Kvm(_Owned):
    def get_api_version(self) -> int:
        self.fileno()
        return KVM_API_VERSION

    def check_extension(self, cap: int) -> int:
        self.fileno()
        return kvm_check_extension(self.host.m, None, cap)

    def has_cap(self, cap: int) -> bool:
        return self.check_extension(cap) > 0

    def get_vcpu_mmap_size(self) -> int:
        self.fileno()
        return VCPU_MMAP_SIZE

    def unlocked_ioctl(self, request: int) -> int:
        """``kvm_dev_ioctl()`` -> x86 ``kvm_arch_dev_ioctl()``: an unknown request is EINVAL."""
        return -EINVAL

    def create_vm(self, vm_type: int = 0) -> VmFd:
        """``KVM_CREATE_VM``: EINVAL for a type the host does not support."""
        self.fileno()
        h = self.host
        r = h.run(kvm_dev_ioctl_create_vm(h.m, h.proc, vm_type))
        if isinstance(r, int):
            raise KernelError(-r, "KVM_CREATE_VM")
        fd = h.install(_KvmFileOps("kvm-vm", r), r)
        return VmFd(h, fd, r)


PIPE_CAPACITY = 1 << 16  # a fresh pipe's 16 pages: what one splice can move into or out of it
# show_smap_vma_flags() mnemonics of the VM_* bits the model keeps.
_VM_FLAG_NAMES = ((VM_READ, "rd"), (VM_WRITE, "wr"), (VM_EXEC, "ex"), (VM_SHARED, "sh"),
                  (VM_MAYREAD, "mr"), (VM_MAYWRITE, "mw"), (VM_MAYEXEC, "me"),
                  (VM_MAYSHARE, "ms"), (VM_LOCKED, "lo"), (VM_DONTDUMP, "dd"))


def _maps_entry(vma: Vma) -> MapsEntry:
    """``show_map_vma()`` + ``show_smap()``: perms, offset, path, Rss, VmFlags."""
    f = vma.flags
    perms = "".join(c if f & bit else "-" for bit, c in ((VM_READ, "r"), (VM_WRITE, "w"),
                                                         (VM_EXEC, "x")))
    perms += "s" if f & VM_MAYSHARE else "p"
    # d_path() of a pseudo file: d_alloc_pseudo()'s anon_ops.d_dname is simple_dname().
    path = "" if vma.file is None else f"/{vma.file.inode.name} (deleted)"
    return MapsEntry(vma.start, vma.end, perms, vma.pgoff << PAGE_SHIFT if vma.file else 0, path,
                     len(vma.ptes) * (PAGE_SIZE // 1024),
                     tuple(n for bit, n in _VM_FLAG_NAMES if f & bit))


def mmap_in(host: Host, file: File | None, length: int, offset: int, *, shared: bool, prot: int,
            populate: bool, fixed: api.Mapping | None) -> Mapping:
    """``vm_mmap_pgoff()``: ``do_mmap()``, then ``mm_populate()`` for MAP_POPULATE."""
    at = None if fixed is None else _ours(fixed).addr
    addr = _check(host.run(sys_mmap(host.m, host.proc, file, length, offset, shared=shared,
                                    prot=prot, fixed=at)), "mmap")
    if populate:
        host.run(mm_populate(host.m, host.proc, addr, to_u64(length)))
    return Mapping(host, addr, to_u64(length))


class Host:
    """A modelled host as one VMM process sees it."""

    name = "model"

    def __init__(self, machine: Machine | None = None, *, profile: str = "x86_64",
                 design: str = "v12", config: MachineConfig | None = None) -> None:
        self.m = machine if machine is not None else Machine(config, profile=profile, design=design)
        self.proc = self.m.new_process("vmm")
        self.task = self.m.task("vmm", 0)

    @property
    def machine(self) -> Machine:
        return self.m

    def run(self, gen: KGen[T]) -> T:
        return self.m.run(self.task, gen)

    def install(self, fops: _KvmFileOps, kvm: KvmStruct | None) -> int:

        mapping = self.m.new_mapping(None, 0, fops.name)
        inode = Inode(0, 0, 0, mapping, fops.name)
        inode.i_count = 1
        # anon_inode_getfd(..., O_RDWR | O_CLOEXEC) for /dev/kvm's open, VMs and vCPUs.
        return self.proc.fds.install(File(fops, inode, 0x3), cloexec=True)

    # --- api.Host ----------------------------------------------------------------------------
    def open_kvm(self) -> Kvm:
        return Kvm(self, self.install(_KvmFileOps("kvm", None), None))

    def memfd_secret(self, flags: int = 0) -> MemFile:
        return MemFile(self, _check(self.run(sys_memfd_secret(self.m, self.proc, flags)),
                                    "memfd_secret"))

    def memfd_create(self, name: str = "gmemlab") -> MemFile:
        return MemFile(self, _check(self.run(sys_memfd_create(self.m, self.proc, name)),
                                    "memfd_create"))

    def mmap_anonymous(self, length: int, *, prot: int = PROT_RW, populate: bool = False,
                       fixed: api.Mapping | None = None) -> Mapping:
        """``mmap(2)`` ``MAP_PRIVATE|MAP_ANONYMOUS`` (see :func:`mmap_in`)."""
        return mmap_in(self, None, length, 0, shared=False, prot=prot, populate=populate,
                       fixed=fixed)

    def meminfo(self) -> DirectMapCounters:
        return self.m.meminfo()

    def maps(self, mapping: api.Mapping) -> list[MapsEntry]:
        """``/proc/self/smaps`` for the VMAs in the mapping's range (``show_smap()``)."""
        ours = _ours(mapping)
        end = ours.addr + ours.length
        vmas = sorted((v for v in self.proc.mm.vmas if v.start < end and v.end > ours.addr),
                      key=lambda v: v.start)
        return [_maps_entry(v) for v in vmas]

    def _files(self, *files: api.MemFile) -> list[File]:
        out = []
        for f in files:
            if not isinstance(f, MemFile):
                raise TypeError(f"{f!r} is not a file of this modelled host")
            out.append(f.file)
        return out

    def sendfile(self, out: api.MemFile, in_: api.MemFile, count: int,
                 offset: int | None = None) -> int:
        """``sendfile(2)`` (see :func:`do_sendfile`); between two memfds the bytes move
        through ``shmem_file_splice_read()`` and ``iter_file_splice_write()``."""
        o, i = self._files(out, in_)
        _check(self.run(do_sendfile(self.m, o, i, offset, count)), "sendfile")
        pos = i.pos if offset is None else offset
        data = shmem_read(self.m, i.inode, pos, count)
        n = _check(self.run(shmem_write(self.m, o, o.pos, data)), "sendfile")
        o.pos += n
        if offset is None:
            i.pos += n
        return n

    def splice_to_pipe(self, file: api.MemFile, count: int, offset: int | None = None) -> bytes:
        """``splice(2)`` from the file into a fresh pipe; what the pipe then holds."""
        (f,) = self._files(file)
        _check(self.run(splice_file_to_pipe(self.m, f, offset)), "splice")
        pos = f.pos if offset is None else offset
        data = shmem_read(self.m, f.inode, pos, min(count, PIPE_CAPACITY))
        if offset is None:
            f.pos += len(data)
        return data

    def splice_from_pipe(self, file: api.MemFile, data: bytes, offset: int | None = None) -> int:
        """``splice(2)`` of ``data`` (written to a fresh pipe first) into the file."""
        (f,) = self._files(file)
        _check(self.run(splice_pipe_to_file(self.m, f, offset)), "splice")
        pos = f.pos if offset is None else offset
        n = _check(self.run(shmem_write(self.m, f, pos, data[:PIPE_CAPACITY])), "splice")
        if offset is None:
            f.pos += n
        return n

    def pipe_write_from(self, mapping: api.Mapping, offset: int, length: int) -> int:
        """``write(pipe, addr, len)``: ``copy_from_user`` through the VMM's page tables."""
        addr = _ours(mapping)._range(offset, length)
        copied = 0

        def op(pfn: int, poff: int, boff: int, n: int) -> None:
            nonlocal copied
            copied += n

        r = self.run(walk_user(self.m, self.proc, addr, length, False, op))
        if r < 0 and not copied:
            raise KernelError(EFAULT, "write(pipe): copy_from_user")
        return copied

    def _gup_read(self, mapping: api.Mapping, offset: int, length: int, flags: int, fn: str,
                  err: int) -> bytes:
        addr = _ours(mapping)._range(offset, length)
        first = addr & ~(PAGE_SIZE - 1)
        npages = -(-(addr + length - first) // PAGE_SIZE)
        pages = self.run(get_user_pages(self.m, self.proc, first, npages, flags, fn))
        if isinstance(pages, int):
            raise KernelError(err, fn)
        out = bytearray()
        for i, pfn in enumerate(pages):
            lo = max(addr, first + i * PAGE_SIZE)
            hi = min(addr + length, first + (i + 1) * PAGE_SIZE)
            out += self.m.mem.read(pfn, lo & (PAGE_SIZE - 1), hi - lo)
        self.run(put_pages(self.m, pages))
        if len(pages) < npages and not out:
            raise KernelError(err, fn)
        return bytes(out)

    def proc_mem_read(self, mapping: api.Mapping, offset: int, length: int) -> bytes:
        """``/proc/self/mem`` read: ``access_remote_vm(FOLL_FORCE)``; nothing read is EIO."""
        return self._gup_read(mapping, offset, length, FOLL_FORCE, "access_remote_vm", EIO)

    def process_vm_readv(self, mapping: api.Mapping, offset: int, length: int) -> bytes:
        return self._gup_read(mapping, offset, length, FOLL_PIN, "pin_user_pages_remote", EFAULT)

    def vmsplice(self, mapping: api.Mapping, offset: int, length: int) -> int:
        return len(self._gup_read(mapping, offset, length, 0, "iov_iter_get_pages", EFAULT))

    def odirect_read_into(self, mapping: api.Mapping, offset: int, length: int) -> int:
        """An O_DIRECT read into the mapping: the block layer pins the buffer for writing."""
        pages = self._gup_read(mapping, offset, length, FOLL_WRITE | FOLL_PIN | FOLL_LONGTERM,
                               "bio_iov_iter_get_pages", EFAULT)
        return len(pages)

    # --- model only ----------------------------------------------------------------------------
    def gadget_read(self, cpu: int, pfn: int) -> bool:
        """A transient-execution gadget on ``cpu`` reading ``__va(pfn)``: did it get data?"""
        return self.m.run(self.m.task("gadget", cpu), speculative_read(self.m, cpu, pfn))

    def kernel_alloc(self, cpu: int = 0) -> int:
        """The page allocator hands a zeroed page to the kernel on ``cpu`` (it writes it)."""
        def path() -> KGen[int]:
            pfn = yield from alloc_page(self.m, GFP_KERNEL, kind="kernel")
            if pfn >= 0:
                yield from clear_page(self.m, pfn, "clear_page_erms")
            return pfn

        return _check(self.m.run(self.m.task("kalloc", cpu), path()), "alloc_pages")

    def memory_failure(self, pfn: int) -> None:
        """A hardware memory error on ``pfn``: ``memory_failure()`` -> ``->error_remove_folio``."""
        m = self.m
        m.mem.flags[pfn] |= PG_hwpoison
        mapping = m.folio_mapping(pfn)
        remove = getattr(mapping.a_ops, "error_remove_folio", None) if mapping else None
        if mapping is not None and remove is not None:
            self.run(remove(m, mapping, pfn))

