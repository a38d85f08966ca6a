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

from dataclasses import dataclass
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOMEM
from typing import Self, TypeVar

import numpy as np
from numpy.typing import NDArray

from gmemlab import api
from gmemlab.api import DirectMapCounters, KernelError, MemoryFault, SigBus, VcpuExit
from gmemlab.guest import GuestProgram
from gmemlab.model.fs import (
    File,
    Inode,
    do_sys_ftruncate,
    fput,
    ksys_pread64,
    ksys_pwrite64,
    vfs_fallocate,
    vfs_llseek,
    vfs_read,
    vfs_write,
)
from gmemlab.model.kvm.guest_memfd import kvm_gmem_create, kvm_gmem_link
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
from gmemlab.model.kvm.vcpu import Vcpu, kvm_arch_vcpu_ioctl_run
from gmemlab.model.machine import Machine, MachineConfig
from gmemlab.model.mm.gup import (
    FOLL_FORCE,
    FOLL_LONGTERM,
    FOLL_PIN,
    FOLL_WRITE,
    get_user_pages,
    put_pages,
)
from gmemlab.model.mm.memmap import PG_hwpoison
from gmemlab.model.mm.memory import (
    VM_FAULT_HWPOISON,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    BulkOp,
    UserOp,
    do_munmap,
    fault_name,
    sys_mmap,
    walk_user,
)
from gmemlab.model.mm.mlock import do_mlock
from gmemlab.model.mm.page_alloc import GFP_KERNEL, alloc_page, clear_page
from gmemlab.model.mm.secretmem import sys_memfd_secret
from gmemlab.model.mm.shmem import sys_memfd_create
from gmemlab.model.mm.tlb import speculative_read
from gmemlab.model.task import KGen
from gmemlab.uapi import EHWPOISON, KVM_API_VERSION, PAGE_SHIFT, PAGE_SIZE, to_u32, to_u64

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


@dataclass(frozen=True, slots=True)
class StatResult:
    st_size: int
    st_blksize: int
    st_ino: int
    st_mode: int


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
        file = self.host.proc.fds.files.pop(self._fd)
        self.host.run(fput(self.host.m, file))

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

    def munmap(self) -> None:
        if self.unmapped:
            return
        h = self.host
        _check(h.run(do_munmap(h.m, h.proc, self.addr)), "munmap")
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

    def mmap(self, length: int, offset: int = 0, *, shared: bool = True) -> Mapping:
        h = self.host
        addr = _check(h.run(sys_mmap(h.m, h.proc, self.file, length, offset, shared=shared)),
                      "mmap")
        return Mapping(h, addr, to_u64(length))

    def fstat(self) -> StatResult:
        inode = self.file.inode
        return StatResult(inode.size, PAGE_SIZE, inode.ino, inode.mode)

    def ftruncate(self, length: int) -> None:
        _check(self.host.run(do_sys_ftruncate(self.host.m, self.file, length)), "ftruncate")


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

    def kvm_clock(self, gpa: int) -> None:
        """``MSR_KVM_SYSTEM_TIME_NEW`` = ``gpa | 1``: kvm-clock on, its pvclock at ``gpa``.

        Succeeds whatever becomes of the pvclock, as the WRMSR does
        (:func:`~gmemlab.model.kvm.pfncache.kvm_write_system_time`): whether KVM wrote it
        shows in guest memory only (``version``, the first 4 bytes, even and non-zero).
        """
        self.fileno()
        h = self.host
        h.m.run(self.vcpu.task, kvm_write_system_time(h.m, self.vcpu, gpa))


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

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: ``struct kvm_create_guest_memfd`` has ``__u64`` fields."""
        self.fileno()
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

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int = 0,
                                guest_memfd: api.GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``; each value as its field of
        ``struct kvm_userspace_memory_region2`` holds it (``__u32`` slot, flags and fd,
        ``__u64`` addresses, size and offset)."""
        self.fileno()
        h = self.host
        if guest_memfd is None:
            gfd = 0
        elif isinstance(guest_memfd, int):
            gfd = guest_memfd
        else:
            gfd = guest_memfd.fileno()
        _check(h.run(kvm_set_memory_region(h.m, self.kvm, to_u32(slot), to_u32(flags),
                                           to_u64(guest_phys_addr), to_u64(memory_size),
                                           to_u64(userspace_addr), to_u32(gfd),
                                           to_u64(guest_memfd_offset))),
               "KVM_SET_USER_MEMORY_REGION2")

    def read_guest(self, gpa: int, length: int) -> bytes:
        """Model only: ``kvm_read_guest()``, KVM's copy_from_user through ``userspace_addr``."""
        self.fileno()
        h = self.host
        r = h.run(kvm_read_guest(h.m, self.kvm, gpa, length))
        if isinstance(r, int):
            raise KernelError(-r, "kvm_read_guest")
        return r

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``: ``struct kvm_memory_attributes`` has ``__u64`` fields."""
        self.fileno()
        h = self.host
        _check(h.run(kvm_set_memory_attributes(h.m, self.kvm, to_u64(address), to_u64(size),
                                               to_u64(attributes), 0)),
               "KVM_SET_MEMORY_ATTRIBUTES")

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

    has_read = has_write = has_llseek = False

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

    def create_vm(self, vm_type: int = 0) -> VmFd:
        """``KVM_CREATE_VM``: EINVAL for a type the host does not support."""
        self.fileno()
        h = self.host
        r = h.run(kvm_dev_ioctl_create_vm(h.m, h.proc, vm_type))
        if isinstance(r, int):
            raise KernelError(-r, "KVM_CREATE_VM")
        fd = h.install(_KvmFileOps("kvm-vm", r), r)
        return VmFd(h, fd, r)


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
        return self.proc.fds.install(File(fops, inode, 0x3))

    # --- api.Host ----------------------------------------------------------------------------
    def open_kvm(self) -> Kvm:
        return Kvm(self, self.install(_KvmFileOps("kvm", None), None))

    def memfd_secret(self, flags: int = 0) -> MemFile:
        return MemFile(self, _check(self.run(sys_memfd_secret(self.m, self.proc, flags)),
                                    "memfd_secret"))

    def memfd_create(self, name: str = "gmemlab") -> MemFile:
        return MemFile(self, _check(self.run(sys_memfd_create(self.m, self.proc, name)),
                                    "memfd_create"))

    def mmap_anonymous(self, length: int) -> Mapping:
        addr = _check(self.run(sys_mmap(self.m, self.proc, None, length, 0, shared=False)), "mmap")
        return Mapping(self, addr, to_u64(length))

    def meminfo(self) -> DirectMapCounters:
        return self.m.meminfo()

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

