"""A seeded random-sequence driver over the whole API, with a data-integrity oracle.

:func:`generate` picks calls a VMM makes (VMs, guest_memfd with any offered flags,
memslots on guest_memfd or on anonymous memory, read-only slots, mmap of guest_memfd,
memfd and memfd_secret, VMM fills and reads, guest fills, checks and byte reports,
GUP reads, fallocate and punch-hole, madvise (DONTNEED, REMOVE, POPULATE_*), mprotect,
MAP_POPULATE, dup, munmap, close) and bad arguments the kernel
refuses, in an order drawn from ``random.Random(seed)``.  :class:`World` runs each
call and holds it to an oracle: every byte that should persist reads back as written
through the mapping, the guest and GUP; a refused call gives the kernel's errno and
changes nothing.  :func:`run_sequence` then closes everything and sweeps the machine
(``check_all()``), and every frame the sequence allocated must be back.

A failure is a :class:`SequenceFailure` that names the seed, the design, the profile
and a sequence shortened by :func:`shrink` (calls are recorded with objects named by
creation order, so any subsequence replays).
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from gmemlab.api import KernelError, MmioWrite, SigBus, SigSegv, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model import Host, MachineConfig
from gmemlab.model.host import GuestMemfd, Mapping, MemFile, VcpuFd, VmFd
from gmemlab.model.invariants import KernelOops
from gmemlab.model.mm.memmap import FRAME_ALLOCATED, KIND_ANON, KIND_FILE
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_READONLY,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    PAGE_SIZE,
    PROT_READ,
    PROT_RW,
)

ADVICE = (MADV_DONTNEED, MADV_REMOVE, MADV_POPULATE_READ, MADV_POPULATE_WRITE)

GPA_BASE = 1 << 32
SLOT_SPAN = 1 << 24  # slot i of a VM lives at GPA_BASE + i * SLOT_SPAN
MAX_PAGES = 8
MAX_SLOTS = 4
MAX_VMS = 3
CONFIG = MachineConfig(ram_gib=0, low_ram_mib=24, trace="ring", invariants="record")

# Designs whose posted code breaks some invariants on ordinary sequences (README, "Designs"):
# their violations of these are expected; any other invariant must hold on every design.
# Departures from the series' rationale (its orders) are reported, never violations.
EXPECTED_VIOLATIONS: dict[str, frozenset[str]] = {
    "v9": frozenset({"handout-zapped", "marker-matches-direct-map"}),
    "v7": frozenset({"marker-matches-direct-map", "free-frame-in-direct-map", "kernel-oops",
                     "zap-only-no-direct-map", "handout-zapped"}),
    "noflush": frozenset({"handout-flushed", "gadget-blocked"}),
    # Firecracker's port: 0039's flush gate (its prepare before the zap is rationale only).
    "fc-6.18": frozenset({"handout-flushed", "gadget-blocked"}),
    "batch": frozenset({"handout-flushed", "gadget-blocked"}),
}


def _pvclock_write(b: Backing, at: int) -> None:
    """What ``kvm_setup_guest_pvclock()`` leaves at ``at``: version bumped to the next even
    value past the one there, the rest zero (the model writes no TSC values)."""
    version = int.from_bytes(b.data[at : at + 4], "little")
    version = (((version + 1) | 1) + 1) & 0xFFFFFFFF
    b.data[at : at + 32] = version.to_bytes(4, "little") + bytes(28)


@dataclass(frozen=True, slots=True)
class Op:
    """One call: its name and arguments; objects are named by creation order."""

    name: str
    args: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.args))})"


class OracleMismatch(AssertionError):
    """The model answered differently from what the oracle says the kernel must."""


@dataclass(eq=False)
class Backing:
    """Contents the VMM and the guest should see: one byte per byte of the object."""

    data: bytearray


@dataclass(eq=False)
class Gmem:
    file: GuestMemfd
    vm: int
    backing: Backing
    flags: int
    open: bool = True


@dataclass(eq=False)
class Map:
    mapping: Mapping
    backing: Backing
    kind: str  # "gmem", "anon", "memfd", "secretmem"
    shared_ok: bool  # host accesses succeed (else SIGBUS: guest_memfd without INIT_SHARED)
    gup_refused: bool  # GUP must refuse it (secretmem, NO_DIRECT_MAP guest_memfd on the series)
    mapped: bool = True


@dataclass(eq=False)
class Slot:
    gpa: int
    npages: int
    backing: Backing
    readonly: bool
    uaddr: int  # userspace_addr: kvm-clock's pfncache goes through it, whatever is there now
    gmem: int = -1  # the Gmem it is bound to, or -1 (anonymous memory: the Map below)
    map: int = -1


@dataclass(eq=False)
class Vm:
    vm: VmFd
    slots: dict[int, Slot] = field(default_factory=dict)
    vcpu: VcpuFd | None = None
    # A vCPU lives until its VM does, closed fd or not: a new one needs a new id (EEXIST).
    next_vcpu_id: int = 0
    open: bool = True


class World:
    """The model host, the objects a sequence made, and the oracle of their contents."""

    def __init__(self, design: str, profile: str, *, range_paths: bool = True) -> None:
        self.design, self.profile = design, profile
        self.h = Host(design=design, profile=profile,
                      config=replace(CONFIG, range_paths=range_paths))
        self.kvm = self.h.open_kvm()
        self.gmem_ok = self.kvm.check_extension(KVM_CAP_GUEST_MEMFD) > 0
        self.vms: list[Vm] = []
        self.gmems: list[Gmem] = []
        self.maps: list[Map] = []
        self.files: list[tuple[MemFile, Backing, str]] = []
        self.closed: list[Callable[[], object]] = []  # calls on closed objects
        self.crashed = False  # the modelled kernel oopsed (a design known to)
        self.ops: list[Op] = []  # what run_sequence() drew
        self.baseline = self.user_frames()

    # --- bookkeeping ------------------------------------------------------------------------
    def user_frames(self) -> int:
        v = self.h.machine.mem.views()
        return int(((v.state == FRAME_ALLOCATED) & ((v.kind == KIND_FILE) | (v.kind == KIND_ANON))).sum())

    def snapshot(self) -> tuple[object, ...]:
        m = self.h.machine
        v = m.mem.views()
        return (int((v.state == FRAME_ALLOCATED).sum()), int(v.refcount.sum()),
                len(self.h.proc.mm.vmas), len(self.h.proc.fds.files), len(m.kvms))

    def vm(self, i: int) -> Vm | None:
        return self.vms[i] if 0 <= i < len(self.vms) and self.vms[i].open else None

    def gmem(self, i: int) -> Gmem | None:
        return self.gmems[i] if 0 <= i < len(self.gmems) and self.gmems[i].open else None

    def map(self, i: int) -> Map | None:
        return self.maps[i] if 0 <= i < len(self.maps) and self.maps[i].mapped else None

    def refused(self, err: int, call: Callable[[], object], what: str) -> None:
        before = self.snapshot()
        try:
            call()
        except KernelError as e:
            if e.errno != err:
                raise OracleMismatch(f"{what}: {e} instead of {errno.errorcode[err]}") from None
        else:
            raise OracleMismatch(f"{what}: succeeded, the kernel gives {errno.errorcode[err]}")
        if self.snapshot() != before:
            raise OracleMismatch(f"{what}: refused, but left state behind")

    # --- calls ------------------------------------------------------------------------------
    def apply(self, op: Op) -> None:
        """Run ``op``; one that names an object that is gone (a shortened replay) does nothing."""
        getattr(self, "op_" + op.name)(*op.args)

    def op_create_vm(self) -> None:
        if sum(v.open for v in self.vms) < MAX_VMS:
            self.vms.append(Vm(self.kvm.create_vm()))

    def op_create_gmem(self, vm: int, pages: int, flag_bits: int) -> None:
        v = self.vm(vm)
        if v is None or not self.gmem_ok:
            return
        offered = v.vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
        flags = offered & flag_bits
        g = v.vm.create_guest_memfd(pages * PAGE_SIZE, flags)
        self.gmems.append(Gmem(g, vm, Backing(bytearray(pages * PAGE_SIZE)), flags))

    def op_mmap_gmem(self, gi: int, populate: int = 0) -> None:
        g = self.gmem(gi)
        if g is None:
            return
        if not g.flags & GUEST_MEMFD_FLAG_MMAP:
            self.refused(errno.ENODEV, lambda: g.file.mmap(g.file.size), "mmap(guest_memfd)")
            return
        # MAP_POPULATE never fails for what it cannot populate (no INIT_SHARED, GUP refused).
        mapping = g.file.mmap(g.file.size, populate=bool(populate))
        refuses = self.h.machine.design.mapping_refuses_gup(self.h.machine, g.file.file.inode.mapping)
        self.maps.append(Map(mapping, g.backing, "gmem", bool(g.flags & GUEST_MEMFD_FLAG_INIT_SHARED),
                             refuses))

    def op_mmap_anon(self, pages: int) -> None:
        mapping = self.h.mmap_anonymous(pages * PAGE_SIZE)
        self.maps.append(Map(mapping, Backing(bytearray(pages * PAGE_SIZE)), "anon", True, False))

    def op_memfile(self, secret: int, pages: int) -> None:
        try:
            f = self.h.memfd_secret() if secret else self.h.memfd_create()
        except KernelError as e:
            if e.errno != errno.ENOSYS:  # secretmem disabled on this profile
                raise
            return
        f.ftruncate(pages * PAGE_SIZE)
        backing = Backing(bytearray(pages * PAGE_SIZE))
        kind = "secretmem" if secret else "memfd"
        self.maps.append(Map(f.mmap(pages * PAGE_SIZE), backing, kind, True, bool(secret)))
        self.files.append((f, backing, kind))

    def op_close_memfile(self, i: int) -> None:
        if 0 <= i < len(self.files) and not self.files[i][0].closed:
            f = self.files[i][0]
            f.close()
            self.closed.append(f.fstat)

    def op_set_slot(self, vm: int, sid: int, src: int, readonly: int) -> None:
        """Slot ``sid`` on guest_memfd ``src`` (its VM's) or, if ``src`` < 0, anonymous map ~src."""
        v = self.vm(vm)
        if v is None or sid in v.slots:
            return
        gpa = GPA_BASE + sid * SLOT_SPAN
        if src >= 0:
            g = self.gmem(src)
            if g is None or g.vm != vm or any(s.gmem == src for s in v.slots.values()):
                return
            m = next((self.maps[i] for i in range(len(self.maps))
                      if self.map(i) and self.maps[i].backing is g.backing), None)
            uaddr = m.mapping.addr if m is not None else 0
            v.vm.set_user_memory_region2(sid, KVM_MEM_GUEST_MEMFD, gpa, g.file.size, uaddr,
                                         g.file, 0)
            v.slots[sid] = Slot(gpa, g.file.size // PAGE_SIZE, g.backing, False, uaddr, gmem=src)
            return
        mi = ~src
        mp = self.map(mi)
        if mp is None or mp.kind != "anon":
            return
        flags = KVM_MEM_READONLY if readonly else 0
        v.vm.set_user_memory_region2(sid, flags, gpa, mp.mapping.length, mp.mapping.addr)
        v.slots[sid] = Slot(gpa, mp.mapping.length // PAGE_SIZE, mp.backing, bool(readonly),
                            mp.mapping.addr, map=mi)

    def op_delete_slot(self, vm: int, sid: int) -> None:
        v = self.vm(vm)
        if v is not None and sid in v.slots:
            v.vm.set_user_memory_region2(sid, 0, v.slots[sid].gpa, 0, 0)
            del v.slots[sid]

    def op_vmm_fill(self, mi: int, page: int, n: int, value: int) -> None:
        mp = self.map(mi)
        if mp is None:
            return
        off, length = self._span(mp.backing, page, n)
        if not mp.shared_ok:
            self._sigbus(lambda: mp.mapping.fill(off, length, value))
            return
        mp.mapping.fill(off, length, value)
        mp.backing.data[off : off + length] = bytes((value,)) * length

    def op_vmm_write(self, mi: int, offset: int, value: int) -> None:
        """A short write across a page boundary, unlike the page fills."""
        mp = self.map(mi)
        if mp is None or not mp.shared_ok:
            return
        offset %= len(mp.backing.data)
        data = bytes((value + i) & 0xFF for i in range(min(40, len(mp.backing.data) - offset)))
        mp.mapping.write(offset, data)
        mp.backing.data[offset : offset + len(data)] = data

    def op_vmm_read(self, mi: int, page: int, n: int) -> None:
        mp = self.map(mi)
        if mp is None:
            return
        off, length = self._span(mp.backing, page, n)
        if not mp.shared_ok:
            self._sigbus(lambda: mp.mapping.read(off, length))
            return
        got = mp.mapping.read(off, length)
        if got != bytes(mp.backing.data[off : off + length]):
            raise OracleMismatch(f"VMM read of {mp.kind} [{off:#x}, +{length:#x}) differs")

    def op_gup_read(self, mi: int, page: int) -> None:
        mp = self.map(mi)
        if mp is None:
            return
        off, length = self._span(mp.backing, page, 1)
        try:
            got = self.h.process_vm_readv(mp.mapping, off, length)
        except KernelError as e:
            if e.errno != errno.EFAULT or not (mp.gup_refused or not mp.shared_ok):
                raise OracleMismatch(f"process_vm_readv of {mp.kind}: {e}") from None
            return
        if mp.gup_refused or not mp.shared_ok:
            raise OracleMismatch(f"process_vm_readv of {mp.kind} succeeded; GUP must refuse it")
        if got != bytes(mp.backing.data[off : off + length]):
            raise OracleMismatch(f"process_vm_readv of {mp.kind} page {page} differs")

    def op_madvise(self, mi: int, page: int, n: int, which: int) -> None:
        """A balloon or a restore: what each advice does to each kind of memory."""
        mp = self.map(mi)
        if mp is None:
            return
        off, length = self._span(mp.backing, page, n)
        advice = ADVICE[which % len(ADVICE)]
        call = lambda: mp.mapping.madvise(advice, off, length)  # noqa: E731
        what = f"madvise({advice}) of {mp.kind}"
        populate = advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE)
        # EINVAL: secretmem is VM_LOCKED and refused by GUP; anonymous memory has no file to
        # punch; GUP refuses NO_DIRECT_MAP guest_memfd on the series.
        if (mp.kind == "secretmem" or (advice == MADV_REMOVE and mp.kind == "anon")
                or (populate and mp.gup_refused)):
            self.refused(errno.EINVAL, call, what)
        elif populate and not mp.shared_ok:  # the fault's SIGBUS
            self.refused(errno.EFAULT, call, what)
        else:
            call()
            if advice == MADV_REMOVE or (advice == MADV_DONTNEED and mp.kind == "anon"):
                mp.backing.data[off : off + length] = bytes(length)

    def op_mprotect(self, mi: int, page: int, n: int) -> None:
        """PROT_READ on a range: writes there take SIGSEGV and change nothing, reads work;
        then PROT_READ|PROT_WRITE again."""
        mp = self.map(mi)
        if mp is None or not mp.shared_ok:
            return
        off, length = self._span(mp.backing, page, n)
        mp.mapping.mprotect(PROT_READ, off, length)
        try:
            mp.mapping.fill(off, length, 0xEE)
        except SigSegv:
            pass
        else:
            raise OracleMismatch(f"a write to a PROT_READ {mp.kind} range did not SIGSEGV")
        if mp.mapping.read(off, length) != bytes(mp.backing.data[off : off + length]):
            raise OracleMismatch(f"PROT_READ {mp.kind} range reads back differently")
        mp.mapping.mprotect(PROT_RW, off, length)

    def op_dup(self, i: int) -> None:
        """The VMM keeps a memory file by a dup()ed fd and closes the first one."""
        if not (0 <= i < len(self.files)) or self.files[i][0].closed:
            return
        f, backing, kind = self.files[i]
        self.files[i] = (f.dup(), backing, kind)
        f.close()
        self.closed.append(f.fstat)

    def op_munmap(self, mi: int) -> None:
        mp = self.map(mi)
        if mp is None:
            return
        for v in self.vms:  # KVM reaches anonymous memory through it: drop those slots first
            for sid, s in list(v.slots.items()):
                if v.open and s.map == mi:
                    self.op_delete_slot(self.vms.index(v), sid)
        mp.mapping.munmap()
        mp.mapped = False

    def _guest(self, vm: int, sid: int) -> tuple[Vm, Slot, VcpuFd] | None:
        v = self.vm(vm)
        if v is None or sid not in v.slots:
            return None
        s = v.slots[sid]
        if s.gmem >= 0 and not self.gmems[s.gmem].flags & GUEST_MEMFD_FLAG_MMAP:
            return None  # shared faults would go through userspace_addr: none here
        if v.vcpu is None:
            v.vcpu = v.vm.create_vcpu(v.next_vcpu_id)
            v.next_vcpu_id += 1
        return v, s, v.vcpu

    def op_guest_fill(self, vm: int, sid: int, page: int, n: int, value: int) -> None:
        g = self._guest(vm, sid)
        if g is None:
            return
        _v, s, vcpu = g
        off, length = self._span(s.backing, page, n)
        r = run_program(vcpu, GuestProgram().fill(s.gpa + off, length, value))
        if s.readonly:  # emulated MMIO: the VMM gets the write, memory does not change
            if r.last_exit != MmioWrite(s.gpa + off, bytes((value,))):
                raise OracleMismatch(f"guest write to a read-only slot: {r.last_exit}")
            return
        if not r.ok:
            raise OracleMismatch(f"guest fill of slot {sid}: {r}")
        s.backing.data[off : off + length] = bytes((value,)) * length

    def op_guest_read(self, vm: int, sid: int, page: int, byte: int) -> None:
        g = self._guest(vm, sid)
        if g is None:
            return
        _v, s, vcpu = g
        off, length = self._span(s.backing, page, 1)
        want = s.backing.data[off : off + length]
        program = GuestProgram().report(s.gpa + off + byte % length)
        uniform = want == bytes((want[0],)) * length
        if uniform:
            program.check(s.gpa + off, length, want[0])
        r = run_program(vcpu, program)
        if not r.ok or r.reports != [want[byte % length]]:
            raise OracleMismatch(f"guest read of slot {sid} page {page}: {r}, want "
                                 f"{want[byte % length]:#x}{' everywhere' if uniform else ''}")

    def op_kvm_clock(self, vm: int, sid: int, page: int, slot32: int) -> None:
        """kvm-clock's pvclock (version bumped by 2, then 28 zero bytes here) written through
        the slot's ``userspace_addr`` by GUP.  The WRMSR always succeeds; the pvclock is
        silently not written on a read-only slot, where GUP refuses, and where nothing is
        mapped; else the bytes land in whatever mapping is there now.  Firecracker's
        pfncache (0041) resolves a guest_memfd slot with ``kvm_gmem_get_pfn()`` instead:
        the bytes land in the guest_memfd."""
        g = self._guest(vm, sid)
        if g is None:
            return
        _v, s, vcpu = g
        off = self._span(s.backing, page, 1)[0] + (slot32 % (PAGE_SIZE // 32)) * 32
        hva = s.uaddr + off
        target = next((mp for mp in self.maps if mp.mapped and s.uaddr
                       and mp.mapping.addr <= hva < mp.mapping.addr + mp.mapping.length), None)
        design = self.h.machine.design
        before = self.snapshot()
        vcpu.kvm_clock(s.gpa + off)
        if s.readonly:  # KVM_HVA_ERR_RO_BAD before any lookup
            target = None
        elif s.gmem >= 0 and design.pfncache_gmem:
            _pvclock_write(s.backing, off)
            return
        if target is None or target.gup_refused or not target.shared_ok:
            if self.snapshot() != before:  # kvm_setup_guest_pvclock() gave up, leaving nothing
                raise OracleMismatch("kvm_clock: the pvclock was not written, but state changed")
            return
        _pvclock_write(target.backing, hva - target.mapping.addr)

    def op_fallocate(self, gi: int, page: int, n: int, punch: int) -> None:
        g = self.gmem(gi)
        if g is None:
            return
        off, length = self._span(g.backing, page, n)
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else 0)
        g.file.fallocate(mode, off, length)
        if punch:
            g.backing.data[off : off + length] = bytes(length)

    def op_close_gmem(self, gi: int) -> None:
        g = self.gmem(gi)
        if g is None:
            return
        v = self.vms[g.vm]
        for sid, s in list(v.slots.items()):  # a closed guest_memfd's slots would fault
            if v.open and s.gmem == gi:
                self.op_delete_slot(g.vm, sid)
        g.file.close()
        g.open = False
        self.closed.append(lambda: g.file.fallocate(FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE))

    def op_close_vcpu(self, vm: int) -> None:
        v = self.vm(vm)
        if v is not None and v.vcpu is not None:
            vcpu, v.vcpu = v.vcpu, None
            vcpu.close()
            self.closed.append(vcpu.run)

    def op_close_vm(self, vm: int) -> None:
        v = self.vm(vm)
        if v is None:
            return
        self.op_close_vcpu(vm)
        v.vm.close()
        v.open = False
        self.closed.append(lambda: v.vm.create_guest_memfd(PAGE_SIZE))

    def op_bad(self, which: int, arg: int) -> None:
        """A call the kernel refuses, on whatever exists."""
        gmems = [g for g in self.gmems if g.open]
        vms = [v for v in self.vms if v.open]
        prof = self.h.machine.profile
        choice = which % 11
        if choice == 0 and gmems:
            g = gmems[arg % len(gmems)]
            self.refused(errno.EINVAL, lambda: g.file.fallocate(FALLOC_FL_KEEP_SIZE, -2 * PAGE_SIZE,
                                                                2 * PAGE_SIZE), "fallocate(-8192)")
        elif choice == 1 and gmems:
            g = gmems[arg % len(gmems)]
            self.refused(errno.EFBIG, lambda: g.file.fallocate(FALLOC_FL_KEEP_SIZE, 1 << 62, 1 << 62),
                         "fallocate(2^62, 2^62)")
        elif choice == 2 and gmems:
            g = gmems[arg % len(gmems)]
            self.refused(errno.EOVERFLOW, lambda: g.file.mmap(PAGE_SIZE, -PAGE_SIZE), "mmap(off -4096)")
        elif choice == 3:
            self.refused(errno.ENOMEM, lambda: self.h.mmap_anonymous(1 << 50), "mmap(2^50)")
        elif choice == 4 and vms:
            err = errno.EINVAL if self.gmem_ok else prof.unknown_vm_ioctl_errno
            v = vms[arg % len(vms)]
            self.refused(err, lambda: v.vm.create_guest_memfd(1 << 70), "KVM_CREATE_GUEST_MEMFD(2^70)")
        elif choice == 5 and vms:
            v = vms[arg % len(vms)]
            self.refused(errno.EINVAL, lambda: v.vm.set_user_memory_region2(
                MAX_SLOTS, 0, GPA_BASE + MAX_SLOTS * SLOT_SPAN, -PAGE_SIZE, 0), "memslot size -4096")
        elif choice == 6 and self.closed:
            self.refused(errno.EBADF, self.closed[arg % len(self.closed)], "call on a closed fd")
        elif choice == 7 and self.maps:
            mp = self.maps[arg % len(self.maps)]
            if mp.mapped:
                self.refused(errno.EINVAL, lambda: mp.mapping.madvise(999), "madvise(999)")
                self.refused(errno.EINVAL, lambda: mp.mapping.mprotect(0x10), "mprotect(0x10)")
        elif choice == 8 and vms:
            v = vms[arg % len(vms)]
            self.refused(errno.EINVAL, lambda: v.vm.set_user_memory_region(
                MAX_SLOTS, KVM_MEM_GUEST_MEMFD, GPA_BASE, PAGE_SIZE, 0),
                "KVM_SET_USER_MEMORY_REGION(KVM_MEM_GUEST_MEMFD)")
        elif choice == 9 and gmems:
            g = gmems[arg % len(gmems)]
            self.refused(errno.EINVAL, g.file.fsync, "fsync(guest_memfd)")
            self.refused(errno.EINVAL, lambda: g.file.fchmod(0o644), "fchmod(guest_memfd)")
            self.refused(errno.ENXIO, g.file.reopen, "open(/proc/self/fd/guest_memfd)")
        elif choice == 10 and gmems and self.files:
            g, f = gmems[arg % len(gmems)], self.files[arg % len(self.files)][0]
            if not f.closed:
                self.refused(errno.EINVAL, lambda: self.h.sendfile(f, g.file, PAGE_SIZE),
                             "sendfile(from guest_memfd)")

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _span(b: Backing, page: int, n: int) -> tuple[int, int]:
        pages = len(b.data) // PAGE_SIZE
        page %= pages
        return page * PAGE_SIZE, min(n, pages - page) * PAGE_SIZE

    @staticmethod
    def _sigbus(call: Callable[[], object]) -> None:
        try:
            call()
        except SigBus:
            return
        raise OracleMismatch("a host access to guest_memfd without INIT_SHARED did not SIGBUS")

    def teardown(self) -> None:
        """Close everything the sequence left open; then every user frame must be back."""
        for i, v in enumerate(self.vms):
            self.op_close_vcpu(i)
            for sid in list(v.slots):
                self.op_delete_slot(i, sid)
        for i in range(len(self.maps)):
            self.op_munmap(i)
        for i in range(len(self.gmems)):
            self.op_close_gmem(i)
        for i in range(len(self.files)):
            self.op_close_memfile(i)
        for i in range(len(self.vms)):
            self.op_close_vm(i)
        self.kvm.close()
        if self.user_frames() != self.baseline:
            raise OracleMismatch(f"{self.user_frames() - self.baseline} user frames still allocated "
                                 "after everything was closed")


def generate(rng: random.Random, w: World) -> Op:
    """The next call, drawn from ``rng`` among those that make sense in ``w`` now.

    Targets are picked among the objects that exist (a call on a missing one would
    do nothing); the recorded arguments name them, so the call replays on its own.
    """
    r = rng.randrange
    vms = [i for i in range(len(w.vms)) if w.vm(i)]
    gmems = [i for i in range(len(w.gmems)) if w.gmem(i)]
    maps = [i for i in range(len(w.maps)) if w.map(i)]
    slots = [(i, sid) for i in vms for sid in w.vms[i].slots]
    free_slots = [(i, sid) for i in vms for sid in range(MAX_SLOTS) if sid not in w.vms[i].slots]
    anon = [i for i in maps if w.maps[i].kind == "anon"]
    files = [i for i in range(len(w.files)) if not w.files[i][0].closed]

    def one(xs: list[int]) -> int:
        return xs[r(len(xs))]

    def slot_source(vm: int) -> int:
        mine = [g for g in gmems if w.gmems[g].vm == vm]
        if mine and (not anon or r(3)):
            return one(mine)
        return ~one(anon) if anon else 0

    choices: list[tuple[int, Callable[[], Op]]] = [
        (2 if len(vms) < MAX_VMS else 0, lambda: Op("create_vm")),
        (2, lambda: Op("mmap_anon", (r(1, MAX_PAGES + 1),))),
        (1, lambda: Op("memfile", (r(2), r(1, MAX_PAGES + 1)))),
        (3, lambda: Op("bad", (r(12), r(1 << 16)))),
    ]
    if vms:
        choices += [
            # Mostly mappable (MMAP): the guest and the VMM then share the pages.
            (4, lambda: Op("create_gmem", (one(vms), r(1, MAX_PAGES + 1),
                                           r(1 << 8) | GUEST_MEMFD_FLAG_MMAP * (r(4) > 0)))),
            (1, lambda: Op("close_vcpu", (one(vms),))),
            (1, lambda: Op("close_vm", (one(vms),))),
        ]
    if free_slots:
        def set_slot() -> Op:
            vm, sid = free_slots[r(len(free_slots))]
            return Op("set_slot", (vm, sid, slot_source(vm), int(r(4) == 0)))
        choices.append((5, set_slot))
    if slots:
        def on_slot(name: str, *extra: Callable[[], int]) -> Callable[[], Op]:
            def make() -> Op:
                vm, sid = slots[r(len(slots))]
                return Op(name, (vm, sid, *(f() for f in extra)))
            return make
        choices += [
            (1, on_slot("delete_slot")),
            (8, on_slot("guest_fill", lambda: r(MAX_PAGES), lambda: r(1, 3), lambda: r(1, 256))),
            (8, on_slot("guest_read", lambda: r(MAX_PAGES), lambda: r(PAGE_SIZE))),
            (2, on_slot("kvm_clock", lambda: r(MAX_PAGES), lambda: r(PAGE_SIZE // 32))),
        ]
    if gmems:
        choices += [
            (3, lambda: Op("mmap_gmem", (one(gmems), int(r(3) == 0)))),
            (4, lambda: Op("fallocate", (one(gmems), r(MAX_PAGES), r(1, 4), r(2)))),
            (1, lambda: Op("close_gmem", (one(gmems),))),
        ]
    if maps:
        choices += [
            (6, lambda: Op("vmm_fill", (one(maps), r(MAX_PAGES), r(1, 3), r(256)))),
            (2, lambda: Op("vmm_write", (one(maps), r(MAX_PAGES * PAGE_SIZE), r(256)))),
            (6, lambda: Op("vmm_read", (one(maps), r(MAX_PAGES), r(1, 3)))),
            (3, lambda: Op("gup_read", (one(maps), r(MAX_PAGES)))),
            (1, lambda: Op("munmap", (one(maps),))),
            (3, lambda: Op("madvise", (one(maps), r(MAX_PAGES), r(1, 3), r(len(ADVICE))))),
            (1, lambda: Op("mprotect", (one(maps), r(MAX_PAGES), r(1, 3)))),
        ]
    if files:
        choices += [(1, lambda: Op("close_memfile", (one(files),))),
                    (1, lambda: Op("dup", (one(files),)))]
    total = sum(wt for wt, _ in choices)
    pick = r(total)
    for wt, make in choices:
        if pick < wt:
            return make()
        pick -= wt
    raise AssertionError("unreachable")


class SequenceFailure(AssertionError):
    def __init__(self, seed: int, design: str, profile: str, ops: list[Op], error: BaseException,
                 shortened: list[Op]) -> None:
        lines = [f"seed {seed}, design {design}, profile {profile}: {type(error).__name__}: {error}",
                 f"after {len(ops)} calls; a shortened sequence of {len(shortened)} that fails too:"]
        lines += [f"  {op}" for op in shortened]
        super().__init__("\n".join(lines))
        self.seed = seed
        self.shortened = shortened


def play(ops: list[Op], design: str, profile: str) -> World:
    """Run ``ops``, tear down, sweep; raises what the first broken promise raises."""
    w = World(design, profile)
    try:
        for op in ops:
            w.apply(op)
        w.teardown()
    except KernelOops:
        if "kernel-oops" not in EXPECTED_VIOLATIONS.get(design, ()):
            raise
        w.crashed = True  # as this design does: nothing more to judge
        return w
    judge(w)
    return w


def judge(w: World) -> None:
    """``check_all()``, then every violation must be one the design is known for."""
    inv = w.h.machine.inv
    inv.check_all()
    allowed = EXPECTED_VIOLATIONS.get(w.design, frozenset())
    bad = [v for v in inv.violations if v.invariant.name not in allowed and not v.invariant.rationale]
    if bad:
        raise AssertionError(bad[0].format())


def outcome(w: World) -> tuple[object, ...]:
    """What a sequence left: event counts and numbering, every frame's state, owner and
    contents byte, the direct map.  The batched and per-page paths must leave the same."""
    m = w.h.machine
    v = m.mem.views()
    counts = sorted((k, n) for k, n in m.trace.counts.items() if n)
    return (counts, m.trace.seq, v.state.tobytes(), v.kind.tobytes(), v.refcount.tobytes(),
            v.fill.tobytes(), m.dmap.meminfo())


def run_sequence(seed: int, design: str, profile: str, steps: int, *,
                 range_paths: bool = True) -> World:
    """Generate and run ``steps`` calls from ``seed``, tear down and judge; returns the world.

    On a failure, raises :class:`SequenceFailure` with the seed and a shortened sequence.
    """
    rng = random.Random(f"{seed}/{design}/{profile}")
    w = World(design, profile, range_paths=range_paths)
    ops: list[Op] = []
    try:
        for _ in range(steps):
            op = generate(rng, w)
            ops.append(op)
            w.apply(op)
        w.teardown()
        judge(w)
    except KernelOops:
        if "kernel-oops" not in EXPECTED_VIOLATIONS.get(design, ()):
            raise SequenceFailure(seed, design, profile, ops, *_shrunk(ops, design, profile)) from None
        w.crashed = True
    except Exception:  # any failure is reported with its sequence
        raise SequenceFailure(seed, design, profile, ops, *_shrunk(ops, design, profile)) from None
    w.ops = ops
    return w


def _shrunk(ops: list[Op], design: str, profile: str) -> tuple[BaseException, list[Op]]:
    error = _failure(ops, design, profile)
    assert error is not None, "the failure did not reproduce on replay"
    return error, shrink(ops, lambda o: _failure(o, design, profile) is not None)


def _failure(ops: list[Op], design: str, profile: str) -> BaseException | None:
    try:
        play(ops, design, profile)
    except Exception as e:  # the failure is what is looked for
        return e
    return None


def shrink(ops: list[Op], fails: Callable[[list[Op]], bool], budget: int = 400) -> list[Op]:
    """Delta debugging (ddmin) over the calls: a shorter sequence that still ``fails``."""
    n = 2
    tries = 0
    while len(ops) >= 2 and tries < budget:
        chunk = -(-len(ops) // n)
        for start in range(0, len(ops), chunk):
            candidate = ops[:start] + ops[start + chunk :]
            tries += 1
            if fails(candidate):
                ops = candidate
                n = max(n - 1, 2)
                break
        else:
            if chunk == 1:
                break
            n = min(2 * n, len(ops))
    return ops
