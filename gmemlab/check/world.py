"""What a checker scenario is made of: the world its setup builds, and its actors.

A scenario's setup runs synchronously on a fresh tiny machine (through the
model's :class:`~gmemlab.model.host.Host`) and returns a :class:`World`: the
handles its actors need.  An *actor* is a short sequence of operations run as
one task pinned to one CPU; each operation is a generator over the model's own
kernel paths, so the checker interleaves the same code that runs straight
through in normal use.

Every operation yields before it touches shared state: an actor's generator is
primed when the actor is created, and nothing of the kernel may run then.  The
operations are the system calls and hardware events the series has to survive
(``fdget``/``fdput`` and ``mmap_lock`` around them, as the real entry points
take them, so the checker does not explore races the kernel excludes):

* ``guest_fault``: ``KVM_RUN`` on a vCPU whose guest touches a gfn;
* ``user_fault``: a VMM access to its guest_memfd mapping;
* ``punch_hole``: ``fallocate(PUNCH_HOLE)``; ``fallocate``: preallocation
  (``fallocate(KEEP_SIZE)``) of the whole file;
* ``close`` and ``munmap``: dropping file references, which releases the last
  guest_memfd file, tears the VM down, or evicts the inode;
* ``gadget``: a speculative kernel read of the target frame's direct-map
  address on the actor's CPU (it fills the TLB as a walk does);
* ``tlb_evict``: the CPU drops its translation of the target frame;
* ``kernel_alloc``: the page allocator hands a zeroed page to the kernel
  (``get_page_from_freelist`` -> ``clear_page_erms``, the v7 crash site);
* ``inject_enomem``: the next direct-map split fails to allocate its page table;
* ``gup_read``: ``process_vm_readv()`` through a mapping (``pin_user_pages_remote``
  under ``mmap_lock``, then the copy through the page's kernel address);
* ``kvm_clock``: the guest writes ``MSR_KVM_SYSTEM_TIME_NEW`` and KVM maps the page
  with its pfncache (``hva_to_pfn`` through the memslot's userspace address, or
  ``kvm_gmem_get_pfn`` and a vmap with Firecracker's pfncache patches) and writes it;
* ``mlock``: ``mlock()`` of a mapping (``mlock_fixup`` skips AS_NO_DIRECT_MAP VMAs);
* ``fallocate`` is also the populate path: the model has no ``KVM_PRE_FAULT_MEMORY``;
* ``snp_launch_update``: ``KVM_SEV_SNP_LAUNCH_UPDATE`` of a gfn (``kvm_gmem_populate()``
  with ``sev_gmem_post_populate()``: the initial image copied in, the page assigned).

Faults and GUP reads of a guest_memfd *without* NO_DIRECT_MAP are judged by
their result too (:func:`plain_access_failed`): the flag is opt-in, and a file
without it must work as it did before the series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from errno import EBADF, EFAULT
from typing import Any

from gmemlab.model.fs import File, fput, get_file
from gmemlab.model.kvm.guest_memfd import kvm_gmem_fallocate, kvm_gmem_no_direct_map, kvm_gmem_populate
from gmemlab.model.kvm.mmu import kvm_mmu_page_fault
from gmemlab.model.kvm.pfncache import kvm_write_system_time
from gmemlab.model.kvm.vcpu import Vcpu
from gmemlab.model.machine import Machine
from gmemlab.model.mm.filemap import AddressSpace
from gmemlab.model.mm.gup import FOLL_PIN, get_user_pages, put_pages
from gmemlab.model.mm.locks import down_read, down_write, up_read, up_write
from gmemlab.model.mm.memory import Process, do_munmap, get_pte_or_fault
from gmemlab.model.mm.mlock import do_mlock
from gmemlab.model.mm.page_alloc import __GFP_ZERO, GFP_KERNEL, alloc_page
from gmemlab.model.mm.tlb import kernel_access, speculative_read
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.task import KGen, Task
from gmemlab.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE_SHIFT, PAGE_SIZE

SNP_IMAGE = b"\x90" * PAGE_SIZE  # what the VMM's launch image holds (any non-zero page)


@dataclass(eq=False, slots=True)
class World:
    """The handles a scenario's setup built, by position (VM 0, vCPU 0, guest_memfd 0...)."""

    m: Machine
    proc: Process
    vm_fds: list[int] = field(default_factory=list)
    vcpus: list[Vcpu] = field(default_factory=list)
    vcpu_fds: list[int] = field(default_factory=list)
    gmem_fds: list[int] = field(default_factory=list)
    maps: list[int] = field(default_factory=list)  # start addresses of guest_memfd mappings
    gmem_mapping: AddressSpace | None = None  # the page cache of guest_memfd 0
    target: int = -1  # where gadgets aim when guest_memfd index 0 has no folio

    def target_frame(self) -> int:
        """The frame an attacker aims at: the one behind guest_memfd index 0, else ``target``.

        Attackers are assumed to learn physical addresses; when index 0 is empty the
        last known (or next expected) frame is the interesting one.
        """
        if self.gmem_mapping is not None:
            pfn = self.gmem_mapping.i_pages.load(0)
            if pfn != EMPTY:
                return pfn
        return self.target

    def fd(self, kind: str, index: int) -> int:
        table = {"vm": self.vm_fds, "vcpu": self.vcpu_fds, "gmem": self.gmem_fds}[kind]
        return table[index]


OpFn = Callable[..., KGen[Any]]
# Judges an operation's result: the message of the violation, or None.
OpJudge = Callable[["World", tuple[int | str, ...], Any], str | None]


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of an actor: ``fn(world, task, *args)``, shown as ``label``.

    ``judge``, if set, is called with the operation's result when it returns
    (property ``plain-fault-succeeds``).
    """

    label: str
    fn: OpFn
    args: tuple[int | str, ...] = ()
    judge: OpJudge | None = None

    def run(self, world: World, task: Task) -> KGen[Any]:
        return self.fn(world, task, *self.args)


@dataclass(frozen=True, slots=True)
class Actor:
    """A task pinned to ``cpu`` that runs ``ops`` one after the other."""

    name: str
    cpu: int
    ops: tuple[Op, ...]


# --- entry points the kernel takes before the paths under test --------------------------------
def fdget(w: World, fd: int) -> KGen[File | None]:
    """``fdget()``: the file behind ``fd`` with a reference, or None once it is closed."""
    yield ("fd", fd)
    file = w.proc.fds.get(fd)
    if file is None:
        return None
    get_file(file)
    return file


def mmap_lock_key(proc: Process) -> tuple[str, int]:
    return ("mmap_lock", proc.pid)


# --- the operations ------------------------------------------------------------------------------
def _guest_fault(w: World, task: Task, vcpu: int, gfn: int) -> KGen[int]:
    file = yield from fdget(w, w.vcpu_fds[vcpu])
    if file is None:
        return -EBADF
    r = yield from kvm_mmu_page_fault(w.m, w.vcpus[vcpu], gfn << PAGE_SHIFT, True)
    yield from fput(w.m, file)
    return r


def _user_fault(w: World, task: Task, mapping: int, page: int) -> KGen[int]:
    m = w.m
    addr = w.maps[mapping] + (page << PAGE_SHIFT)
    yield from down_read(m, mmap_lock_key(w.proc))
    vma = w.proc.mm.find_vma(addr)
    r = -EFAULT if vma is None else (yield from get_pte_or_fault(m, vma, addr, write=True))
    yield from up_read(m, mmap_lock_key(w.proc))
    return r


def _punch_hole(w: World, task: Task, gmem: int, index: int) -> KGen[int]:
    file = yield from fdget(w, w.gmem_fds[gmem])
    if file is None:
        return -EBADF
    mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    r = yield from kvm_gmem_fallocate(w.m, file, mode, index << PAGE_SHIFT, 1 << PAGE_SHIFT)
    yield from fput(w.m, file)
    return r


def _fallocate(w: World, task: Task, gmem: int) -> KGen[int]:
    file = yield from fdget(w, w.gmem_fds[gmem])
    if file is None:
        return -EBADF
    r = yield from kvm_gmem_fallocate(w.m, file, FALLOC_FL_KEEP_SIZE, 0, file.inode.size)
    yield from fput(w.m, file)
    return r


def _snp_launch_update(w: World, task: Task, vm: int, gfn: int) -> KGen[int]:
    file = yield from fdget(w, w.vm_fds[vm])
    if file is None:
        return -EBADF
    r = yield from kvm_gmem_populate(w.m, w.vcpus[vm].kvm, gfn, SNP_IMAGE)
    yield from fput(w.m, file)
    return r


def _close(w: World, task: Task, kind: str, index: int) -> KGen[int]:
    fd = w.fd(kind, index)
    yield ("fd", fd)
    file = w.proc.fds.files.pop(fd, None)
    if file is None:
        return -EBADF
    yield from fput(w.m, file)
    return 0


def _munmap(w: World, task: Task, mapping: int) -> KGen[int]:
    m = w.m
    yield from down_write(m, mmap_lock_key(w.proc))
    r = yield from do_munmap(m, w.proc, w.maps[mapping])
    yield from up_write(m, mmap_lock_key(w.proc))
    return r


def _gup_read(w: World, task: Task, mapping: int, page: int) -> KGen[int]:
    """``process_vm_readv()`` of one page: pin it, copy it through its kernel address, unpin."""
    m = w.m
    addr = w.maps[mapping] + (page << PAGE_SHIFT)
    yield from down_read(m, mmap_lock_key(w.proc))
    pages = yield from get_user_pages(m, w.proc, addr, 1, FOLL_PIN, "pin_user_pages_remote")
    yield from up_read(m, mmap_lock_key(w.proc))
    if isinstance(pages, int):
        return pages
    for pfn in pages:  # copy_page_to_iter(): kmap_local_page() is the direct map
        yield from kernel_access(m, pfn, "copy_page_to_iter", write=False)
    yield from put_pages(m, pages)
    return len(pages)


def _kvm_clock(w: World, task: Task, vcpu: int, gfn: int) -> KGen[int]:
    """The guest enables kvm-clock at ``gfn``: KVM maps it with its pfncache and writes it.

    The WRMSR itself always succeeds; the result judged is the pfncache refresh's,
    which ``kvm_write_system_time()`` drops, so that a guest_memfd without
    NO_DIRECT_MAP whose pvclock silently stays unwritten is caught.
    ``hva_to_pfn()``'s slow GUP takes ``mmap_lock``; held here around the whole
    refresh (a little more serialisation than the kernel's, never less).
    """
    file = yield from fdget(w, w.vcpu_fds[vcpu])
    if file is None:
        return -EBADF
    owner = w.vcpus[vcpu].kvm.owner
    yield from down_read(w.m, mmap_lock_key(owner))
    yield from kvm_write_system_time(w.m, w.vcpus[vcpu], gfn << PAGE_SHIFT)
    yield from up_read(w.m, mmap_lock_key(owner))
    yield from fput(w.m, file)
    return w.vcpus[vcpu].pv_time.refresh_err


def _mlock(w: World, task: Task, mapping: int) -> KGen[int]:
    m = w.m
    yield from down_write(m, mmap_lock_key(w.proc))
    r = yield from do_mlock(m, w.proc, w.maps[mapping], PAGE_SIZE)
    yield from up_write(m, mmap_lock_key(w.proc))
    return r


def _gadget(w: World, task: Task) -> KGen[bool]:
    yield ("xa", "target")  # the attacker picks its address, then reads it
    return (yield from speculative_read(w.m, task.cpu, w.target_frame()))


def _tlb_evict(w: World, task: Task) -> KGen[bool]:
    yield ("xa", "target")
    pfn = w.target_frame()
    yield ("tlb", (task.cpu, pfn))
    return w.m.tlb.evict(task.cpu, pfn)


def _kernel_alloc(w: World, task: Task) -> KGen[int]:
    return (yield from alloc_page(w.m, GFP_KERNEL | __GFP_ZERO, kind="kernel"))


def _inject_enomem(w: World, task: Task) -> KGen[int]:
    yield ("fault", "pt_alloc")
    w.m.faults.arm("pt_alloc", times=1)
    return 0


# --- judging results -------------------------------------------------------------------------------
def _open_file_flags(file: File | None) -> int | None:
    """The guest_memfd flags of ``file`` while it is open; None if it is gone or not one."""
    if file is None or file.released or file.f_count == 0 or file.f_op.name != "kvm_gmem_fops":
        return None
    return int(file.inode.private)


def _mapped_file(w: World, mapping: int, page: int) -> File | None:
    vma = w.proc.mm.find_vma(w.maps[mapping] + (page << PAGE_SHIFT))
    return None if vma is None else vma.file


def _slot_file(w: World, vcpu: int, gfn: int) -> File | None:
    slot = w.vcpus[vcpu].kvm.gfn_to_memslot(gfn)
    return None if slot is None else slot.gmem_file


def plain_access_failed(file: File | None, result: int) -> str | None:
    """A fault or GUP that reached an open guest_memfd without NO_DIRECT_MAP and failed.

    -EBADF never reached the file (the entry's fd was closed).
    """
    flags = _open_file_flags(file)
    if flags is None or result >= 0 or result == -EBADF:
        return None
    if kvm_gmem_no_direct_map(file.inode):  # type: ignore[union-attr]
        return None
    return (f"failed with {result} on a guest_memfd without NO_DIRECT_MAP "
            f"(flags {flags:#x}), which must behave as before the series")


def _judge_user(w: World, args: tuple[int | str, ...], result: Any) -> str | None:
    mapping, page = int(args[0]), int(args[1])
    return plain_access_failed(_mapped_file(w, mapping, page), int(result))


def _judge_guest(w: World, args: tuple[int | str, ...], result: Any) -> str | None:
    vcpu, gfn = int(args[0]), int(args[1])
    return plain_access_failed(_slot_file(w, vcpu, gfn), int(result))


def _map_suffix(mapping: int) -> str:
    return f" of map {mapping}" if mapping else ""


def guest_fault(vcpu: int = 0, gfn: int = 0) -> Op:
    return Op(f"guest fault gfn {gfn}", _guest_fault, (vcpu, gfn), _judge_guest)


def user_fault(mapping: int = 0, page: int = 0) -> Op:
    return Op(f"user fault page {page}{_map_suffix(mapping)}", _user_fault, (mapping, page),
              _judge_user)


def gup_read(mapping: int = 0, page: int = 0) -> Op:
    return Op(f"process_vm_readv page {page}{_map_suffix(mapping)}", _gup_read, (mapping, page),
              _judge_user)


def kvm_clock(vcpu: int = 0, gfn: int = 0) -> Op:
    return Op(f"kvm-clock at gfn {gfn} (pfncache)", _kvm_clock, (vcpu, gfn), _judge_guest)


def mlock(mapping: int = 0) -> Op:
    return Op(f"mlock{_map_suffix(mapping)}", _mlock, (mapping,))


def punch_hole(gmem: int = 0, index: int = 0) -> Op:
    return Op(f"punch-hole index {index}", _punch_hole, (gmem, index))


def snp_launch_update(vm: int = 0, gfn: int = 0) -> Op:
    return Op(f"SNP_LAUNCH_UPDATE gfn {gfn}", _snp_launch_update, (vm, gfn))


def fallocate(gmem: int = 0) -> Op:
    return Op(f"fallocate whole file{f' {gmem}' if gmem else ''}", _fallocate, (gmem,))


def close(kind: str, index: int = 0) -> Op:
    return Op(f"close {kind} fd", _close, (kind, index))


def munmap(mapping: int = 0) -> Op:
    return Op("munmap", _munmap, (mapping,))


def gadget() -> Op:
    return Op("gadget read", _gadget)


def tlb_evict() -> Op:
    return Op("TLB evict", _tlb_evict)


def kernel_alloc() -> Op:
    return Op("kernel alloc", _kernel_alloc)


def inject_enomem() -> Op:
    return Op("ENOMEM at next split", _inject_enomem)
