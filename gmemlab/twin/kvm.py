"""``Kvm`` -> ``VmFd`` -> ``VcpuFd`` over the real ``/dev/kvm``, shaped like rust-vmm kvm-ioctls.

Each object owns its fd (and the vCPU its ``kvm_run`` mapping); ``close()`` is
idempotent and every class is a context manager.  A :class:`TwinVm` also owns
the vCPUs it created and the twin's private memslot (:mod:`gmemlab.twin.guestenv`),
so closing the VM closes them too.  Errors are :class:`gmemlab.api.KernelError`
with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from gmemlab import api, uapi
from gmemlab.guest import GuestProgram
from gmemlab.twin import _sys, guestenv
from gmemlab.twin.asm import compile_program
from gmemlab.twin.memory import TwinGuestMemfd, TwinMapping
from gmemlab.twin.stats import BinaryStats

MAX_CPUID_ENTRIES = 256


@dataclass(slots=True, eq=False)
class TwinKvm(_sys.FdOwner):
    """The system fd, ``/dev/kvm`` (opened ``O_RDWR|O_CLOEXEC`` by :class:`TwinHost`)."""

    _cpuid: ctypes.Array[uapi.kvm_cpuid_entry2] | None = None

    def get_api_version(self) -> int:
        """``KVM_GET_API_VERSION``."""
        return _sys.ioctl(self.fileno(), uapi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` at system scope: the raw value (a bitmask for some caps)."""
        return _sys.ioctl(self.fileno(), uapi.KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def has_cap(self, cap: int) -> bool:
        return self.check_extension(cap) > 0

    def get_vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: the size of a vCPU's ``kvm_run`` mapping."""
        return _sys.ioctl(self.fileno(), uapi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self) -> ctypes.Array[uapi.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_CPUID`` (cached): the entries a vCPU may be given."""
        if self._cpuid is None:
            buf = uapi.kvm_cpuid2_with(MAX_CPUID_ENTRIES)()
            buf.nent = MAX_CPUID_ENTRIES
            _sys.ioctl(self.fileno(), uapi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            n: int = buf.nent
            entries = (uapi.kvm_cpuid_entry2 * n)()
            ctypes.memmove(entries, buf.entries, ctypes.sizeof(entries))
            self._cpuid = entries
        return self._cpuid

    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> TwinVm:
        """``KVM_CREATE_VM(type)``.

        The VM keeps what its vCPUs will need from /dev/kvm (CPUID, ``kvm_run``
        size), so it stays fully usable after this object is closed.
        """
        cpuid, run_size = self.get_supported_cpuid(), self.get_vcpu_mmap_size()
        fd = _sys.ioctl(self.fileno(), uapi.KVM_CREATE_VM, vm_type, f"KVM_CREATE_VM({vm_type})")
        return TwinVm(fd, vm_type, cpuid, run_size)

    def close(self) -> None:
        """``close(2)`` of the /dev/kvm fd; VMs created from it stay usable."""
        self._close_fd()


@dataclass(slots=True, eq=False)
class _PrivateSlot:
    """The twin's own memslot: page tables, code and stacks (see :mod:`guestenv`)."""

    memory: TwinMapping
    slot: int
    next_area: int = 0


@dataclass(slots=True, eq=False)
class TwinVm(_sys.FdOwner):
    """A VM fd (``KVM_CREATE_VM``)."""

    _vm_type: int
    _cpuid: ctypes.Array[uapi.kvm_cpuid_entry2]
    _run_size: int
    _vcpus: list[TwinVcpu] = field(default_factory=list)
    _private: _PrivateSlot | None = None
    _stats: BinaryStats | None = None

    @property
    def vm_type(self) -> int:
        return self._vm_type

    @property
    def private_slot(self) -> int | None:
        """The memslot number the twin took for its guest environment, once a vCPU exists."""
        return self._private.slot if self._private else None

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (VM-scope answer, e.g. GUEST_MEMFD_FLAGS)."""
        return _sys.ioctl(self.fileno(), uapi.KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION(vm, {cap})")

    def create_guest_memfd(self, size: int, flags: int = 0, *,
                           reserved: Sequence[int] = ()) -> TwinGuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``; ``flags`` and the ``reserved`` words passed through."""
        if len(reserved) > 6:
            raise ValueError("struct kvm_create_guest_memfd has 6 reserved words")
        args = uapi.kvm_create_guest_memfd(size=size & (2**64 - 1), flags=flags & (2**64 - 1))
        for i, word in enumerate(reserved):
            args.reserved[i] = word & (2**64 - 1)
        what = f"KVM_CREATE_GUEST_MEMFD(size={size:#x}, flags={uapi.gmem_flags_str(flags)})"
        fd = _sys.ioctl(self.fileno(), uapi.KVM_CREATE_GUEST_MEMFD, args, what)
        return TwinGuestMemfd(fd, "guest_memfd", size, flags)

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: api.GuestMemfd | int | None = None,
        guest_memfd_offset: int = 0,
        *,
        pad1: int = 0,
        pad2: Sequence[int] = (),
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``; ``guest_memfd`` is a file object or a raw fd
        number; ``pad1``/``pad2`` are written into the struct as given."""
        self._own_slot(slot)
        if len(pad2) > 14:
            raise ValueError("struct kvm_userspace_memory_region2 has 14 pad2 words")
        if guest_memfd is None:
            gmem_fd = 0
        elif isinstance(guest_memfd, int):
            gmem_fd = guest_memfd
        else:
            gmem_fd = guest_memfd.fileno()
        self._set_region(
            uapi.kvm_userspace_memory_region2(
                slot=slot,
                flags=flags,
                guest_phys_addr=guest_phys_addr,
                memory_size=memory_size,
                userspace_addr=userspace_addr,
                guest_memfd_offset=guest_memfd_offset & (2**64 - 1),
                guest_memfd=gmem_fd & 0xFFFFFFFF,
                pad1=pad1 & 0xFFFFFFFF,
                pad2=(ctypes.c_uint64 * 14)(*(w & (2**64 - 1) for w in pad2)),
            )
        )

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int = 0) -> None:
        """The legacy ``KVM_SET_USER_MEMORY_REGION`` (``struct kvm_userspace_memory_region``)."""
        self._own_slot(slot)
        region = uapi.kvm_userspace_memory_region(
            slot=slot & 0xFFFFFFFF, flags=flags & 0xFFFFFFFF,
            guest_phys_addr=guest_phys_addr & (2**64 - 1), memory_size=memory_size & (2**64 - 1),
            userspace_addr=userspace_addr & (2**64 - 1))
        what = f"KVM_SET_USER_MEMORY_REGION(slot={region.slot}, flags={region.flags:#x})"
        _sys.ioctl(self.fileno(), uapi.KVM_SET_USER_MEMORY_REGION, region, what)

    def _own_slot(self, slot: int) -> None:
        if self._private is not None and slot == self._private.slot:
            raise ValueError(f"memslot {slot} is the twin's private slot")

    def _set_region(self, region: uapi.kvm_userspace_memory_region2) -> None:
        what = (
            f"KVM_SET_USER_MEMORY_REGION2(slot={region.slot}, flags={region.flags:#x}, "
            f"gpa={region.guest_phys_addr:#x}, size={region.memory_size:#x})"
        )
        _sys.ioctl(self.fileno(), uapi.KVM_SET_USER_MEMORY_REGION2, region, what)

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``."""
        attrs = uapi.kvm_memory_attributes(address=address, size=size, attributes=attributes)
        _sys.ioctl(self.fileno(), uapi.KVM_SET_MEMORY_ATTRIBUTES, attrs, "KVM_SET_MEMORY_ATTRIBUTES")

    def create_vcpu(self, vcpu_id: int) -> TwinVcpu:
        """``KVM_CREATE_VCPU``, then mmap ``kvm_run`` and set up 64-bit CPL3 state:
        ``KVM_SET_CPUID2`` with the ``KVM_GET_SUPPORTED_CPUID`` entries, ``KVM_SET_SREGS``.
        :meth:`TwinVcpu.load_program` sets RIP and RSP (``KVM_SET_REGS``).
        """
        private = self._private_slot()
        program_area = guestenv.area(private.memory.addr, private.next_area)
        fd = _sys.ioctl(self.fileno(), uapi.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        run_size = self._run_size
        try:
            run_addr = _sys.mmap(
                run_size,
                _sys.PROT_READ | _sys.PROT_WRITE,
                _sys.MAP_SHARED,
                fd,
                what="mmap(kvm_run)",
            )
        except BaseException:
            os.close(fd)
            raise
        private.next_area += 1
        vcpu = TwinVcpu(fd, vcpu_id, TwinMapping(run_addr, run_size, False, "kvm_run"), program_area)
        self._vcpus.append(vcpu)
        try:
            vcpu.set_cpuid2(self._cpuid)
            sregs = vcpu.get_sregs()
            guestenv.long_mode_sregs(sregs)
            vcpu.set_sregs(sregs)
        except BaseException:
            vcpu.close()
            raise
        return vcpu

    def _private_slot(self) -> _PrivateSlot:
        if self._private is None:
            slot = self.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) - 1
            prot = _sys.PROT_READ | _sys.PROT_WRITE
            addr = _sys.mmap(
                guestenv.PRIVATE_SIZE,
                prot,
                _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS,
                what="mmap(twin private memory)",
            )
            memory = TwinMapping(addr, guestenv.PRIVATE_SIZE, False, "twin private memory")
            try:
                # Children forked for SIGBUS-prone accesses must not make these pages COW.
                memory.madvise(_sys.MADV_DONTFORK)
                guestenv.install(addr, guestenv.has_1g_pages(self._cpuid))
                self._set_region(
                    uapi.kvm_userspace_memory_region2(
                        slot=slot,
                        guest_phys_addr=guestenv.PRIVATE_GPA,
                        memory_size=guestenv.PRIVATE_SIZE,
                        userspace_addr=addr,
                    )
                )
            except BaseException:
                memory.munmap()
                raise
            self._private = _PrivateSlot(memory, slot)
        return self._private

    def stats(self) -> dict[str, int]:
        """VM-scope binary statistics (``KVM_GET_STATS_FD`` on the VM fd)."""
        fd = self.fileno()
        if self._stats is None:
            self._stats = BinaryStats.open(fd, "vm")
        return self._stats.read()

    def close(self) -> None:
        """Close the vCPUs, the stats fd, the VM fd, then unmap the twin's private memory."""
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._stats is not None:
            self._stats.close()
        self._close_fd()
        if self._private is not None:
            self._private.memory.munmap()


@dataclass(slots=True, eq=False)
class TwinVcpu(_sys.FdOwner):
    """A vCPU fd (``KVM_CREATE_VCPU``) and its mmapped ``struct kvm_run``."""

    _vcpu_id: int
    _run_map: TwinMapping
    _area: guestenv.ProgramArea
    _stats: BinaryStats | None = None
    _entered: bool = False
    _run: uapi.kvm_run = field(init=False)

    def __post_init__(self) -> None:
        self._run = uapi.kvm_run.from_address(self._run_map.addr)

    @property
    def vcpu_id(self) -> int:
        return self._vcpu_id

    @property
    def kvm_run(self) -> uapi.kvm_run:
        """The mmapped ``struct kvm_run`` (valid until :meth:`close`)."""
        return self._run

    def set_cpuid2(self, entries: ctypes.Array[uapi.kvm_cpuid_entry2]) -> None:
        """``KVM_SET_CPUID2``."""
        buf = uapi.kvm_cpuid2_with(len(entries))()
        buf.nent = len(entries)
        ctypes.memmove(buf.entries, entries, ctypes.sizeof(entries))
        _sys.ioctl(self.fileno(), uapi.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_regs(self) -> uapi.kvm_regs:
        """``KVM_GET_REGS``."""
        regs = uapi.kvm_regs()
        _sys.ioctl(self.fileno(), uapi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        _sys.ioctl(self.fileno(), uapi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> uapi.kvm_sregs:
        """``KVM_GET_SREGS``."""
        sregs = uapi.kvm_sregs()
        _sys.ioctl(self.fileno(), uapi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        _sys.ioctl(self.fileno(), uapi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def kvm_clock(self, gpa: int) -> None:
        """``KVM_SET_MSRS`` of ``MSR_KVM_SYSTEM_TIME_NEW`` = ``gpa | 1``: kvm-clock on.

        A host-initiated write reaches the same ``kvm_write_system_time()`` as the
        guest's WRMSR (``kvm_set_msr_common()``; ``KVM_FEATURE_CLOCKSOURCE2`` is not
        enforced unless ``KVM_CAP_ENFORCE_PV_FEATURE_CPUID``).  It succeeds whatever
        becomes of the pvclock; KVM writes it at the next entry, so a guest read then
        shows it (even, non-zero ``version``) or its absence.  The ioctl returns how
        many MSRs it set: 0 means KVM refused the MSR itself.
        """
        msrs = uapi.kvm_msrs(nmsrs=1)
        msrs.entries[0].index = uapi.MSR_KVM_SYSTEM_TIME_NEW
        msrs.entries[0].data = (gpa | 1) & ((1 << 64) - 1)
        if _sys.ioctl(self.fileno(), uapi.KVM_SET_MSRS, msrs, "KVM_SET_MSRS") != 1:
            raise api.KernelError(errno.EINVAL, "KVM_SET_MSRS(MSR_KVM_SYSTEM_TIME_NEW)")

    def load_program(self, program: GuestProgram) -> None:
        """Assemble ``program`` into this vCPU's code area and point RIP/RSP at it.

        A previous exit may still have an instruction to complete (I/O, MMIO);
        ``KVM_RUN`` with ``immediate_exit`` set finishes it without entering the
        guest, so the ``KVM_SET_REGS`` that follows is not overridden.
        """
        self.fileno()  # EBADF once closed, before touching the (then unmapped) code area
        code = compile_program(program, guestenv.TARGET)
        if len(code) > self._area.code_size:
            raise ValueError(f"program needs {len(code)} bytes of code, at most {self._area.code_size}")
        if self._entered:
            self._complete_pending_exit()
        ctypes.memmove(self._area.code_hva, code, len(code))
        regs = uapi.kvm_regs(
            rip=self._area.code_gpa, rsp=self._area.stack_top_gpa, rflags=guestenv.RFLAGS_INITIAL
        )
        self.set_regs(regs)

    def _complete_pending_exit(self) -> None:
        run = self._run
        run.immediate_exit = 1
        try:
            _sys.ioctl(self.fileno(), uapi.KVM_RUN, 0, "KVM_RUN(immediate_exit)")
        except api.KernelError as e:
            if e.errno != errno.EINTR:
                raise
        finally:
            run.immediate_exit = 0

    def run(self) -> api.VcpuExit:
        """``KVM_RUN`` until an exit to userspace, decoded from ``kvm_run``.

        EINTR (a signal for this thread) re-enters the guest.  EFAULT or EHWPOISON with
        ``exit_reason == KVM_EXIT_MEMORY_FAULT`` is returned as
        :class:`~gmemlab.api.MemoryFault` (with that errno), as kvm-ioctls' ``VcpuFd::run``
        does; other errors raise.
        A store to the twin's doorbell window comes back as :class:`~gmemlab.api.IoOut`.
        """
        run, fd = self._run, self.fileno()
        self._entered = True
        while True:
            # exit_reason is stale from the previous exit unless KVM sets it; reset it
            # so an EFAULT without a memory-fault record is not mistaken for one.
            run.exit_reason = uapi.KVM_EXIT_UNKNOWN
            try:
                _sys.ioctl(fd, uapi.KVM_RUN, 0, "KVM_RUN")
            except api.KernelError as e:
                if e.errno == errno.EINTR:
                    continue
                if (e.errno in (errno.EFAULT, uapi.EHWPOISON)
                        and run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT):
                    mf = run.exit.memory_fault
                    return api.MemoryFault(mf.gpa, mf.size, mf.flags, e.errno)
                raise
            return self._decode(run)

    def _decode(self, run: uapi.kvm_run) -> api.VcpuExit:
        reason = run.exit_reason
        if reason == uapi.KVM_EXIT_IO:
            io = run.exit.io
            if io.direction == uapi.KVM_EXIT_IO_OUT:
                data = ctypes.string_at(self._run_map.addr + io.data_offset, io.size * io.count)
                return api.IoOut(io.port, data)
            return api.IoIn(io.port, io.size)
        if reason == uapi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            if mmio.is_write:
                data = bytes(mmio.data[: mmio.len])
                port = guestenv.port_of(mmio.phys_addr)
                return api.MmioWrite(mmio.phys_addr, data) if port is None else api.IoOut(port, data)
            return api.MmioRead(mmio.phys_addr, mmio.len)
        if reason == uapi.KVM_EXIT_HLT:
            return api.Hlt()
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return api.Shutdown()
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            return api.FailEntry(run.exit.fail_entry.hardware_entry_failure_reason)
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            return api.InternalError(run.exit.internal.suberror)
        if reason == uapi.KVM_EXIT_MEMORY_FAULT:
            mf = run.exit.memory_fault
            return api.MemoryFault(mf.gpa, mf.size, mf.flags)
        return api.UnknownExit(reason)

    def stats(self) -> dict[str, int]:
        """vCPU binary statistics (``KVM_GET_STATS_FD``): pf_fixed, pf_taken, exits, ..."""
        fd = self.fileno()
        if self._stats is None:
            self._stats = BinaryStats.open(fd, f"vcpu {self._vcpu_id}")
        return self._stats.read()

    def close(self) -> None:
        """Close the stats fd, unmap ``kvm_run``, close the vCPU fd."""
        if self._stats is not None:
            self._stats.close()
        self._run_map.munmap()
        self._close_fd()
