"""Process address spaces: VMAs, user page tables, faults, user accesses.

Models ``mm/mmap.c`` (``do_mmap``/``munmap``), ``mm/memory.c``
(``handle_mm_fault`` -> ``do_anonymous_page`` / ``do_fault`` -> ``__do_fault``
-> ``finish_fault``, ``zap_pte_range``), ``mm/mlock.c`` and the uaccess helpers.

A file fault calls the VMA's ``->fault``; a handler returning
``VM_FAULT_LOCKED`` hands over a locked folio with a reference, which becomes
the PTE's reference; the folio is unlocked after the PTE is set, so a
truncation (which takes the folio lock) cannot slip in between.  Zapping a
PTE drops that reference and notifies KVM (``mmu_notifier``), which zaps the
stage-2 mappings it built from that address.

User accesses go byte-for-byte through the PTEs to frame contents (not through
the direct map).  ``copy_{to,from}_user`` are the same walk run by the kernel:
a fault it cannot resolve is ``-EFAULT`` instead of a signal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from errno import EACCES, EFAULT, EINVAL, ENOMEM, EOVERFLOW, EPERM
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.fs import FMODE_READ, FMODE_WRITE, FdTable, File, fput, get_file
from gmemlab.model.mm.folio import folio_put, folio_unlock
from gmemlab.model.mm.memmap import KIND_ANON
from gmemlab.model.mm.page_alloc import GFP_HIGHUSER, GFP_HIGHUSER_ZERO, alloc_page
from gmemlab.model.mm.xarray import EMPTY, XArray
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    EHWPOISON,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_READ,
    PROT_RW,
    PROT_SEM,
    PROT_WRITE,
    to_u64,
)

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.filemap import AddressSpace

VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_MAYREAD = 0x10
VM_MAYWRITE = 0x20
VM_MAYEXEC = 0x40
VM_MAYSHARE = 0x80
VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_LOCKED = 0x2000
VM_DONTDUMP = 0x4000000

# vm_fault_t
VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2
VM_FAULT_HWPOISON = 0x10
VM_FAULT_SIGSEGV = 0x40
VM_FAULT_LOCKED = 0x200
VM_FAULT_RETRY = 0x400
VM_FAULT_ERROR = VM_FAULT_OOM | VM_FAULT_SIGBUS | VM_FAULT_HWPOISON

# x86_64 with 4-level paging: user space is [0, TASK_SIZE), TASK_SIZE = (1 << 47) - PAGE_SIZE.
TASK_SIZE = (1 << 47) - PAGE_SIZE
# mmap_base() without randomization: TASK_SIZE minus the stack gap, which is clamped to at
# least 128 MiB (an 8 MiB stack rlimit plus the guard gap is less).  Top-down mappings
# start below it.
MMAP_BASE = TASK_SIZE - (128 << 20)
# TASK_UNMAPPED_BASE (mmap_legacy_base() without randomization): where the bottom-up
# fallback of a failed top-down search starts.
TASK_UNMAPPED_BASE = -(-(TASK_SIZE // 3) // PAGE_SIZE) * PAGE_SIZE
# MAX_LFS_FILESIZE, file_mmap_size_max() of a regular file.
MAX_LFS_FILESIZE = (1 << 63) - 1
DEFAULT_MAX_MAP_COUNT = 65530  # sysctl vm.max_map_count
# How many times a user access retries a fault that returned VM_FAULT_OOM before the
# model gives up; the real task would retry forever (pagefault_out_of_memory()).
OOM_RETRIES = 8


def vmf_error(err: int) -> int:
    """``vmf_error()``: -ENOMEM -> VM_FAULT_OOM, -EHWPOISON -> VM_FAULT_HWPOISON, else SIGBUS."""
    if err == -ENOMEM:
        return VM_FAULT_OOM
    if err == -EHWPOISON:
        return VM_FAULT_HWPOISON
    return VM_FAULT_SIGBUS


FaultHandler = Callable[["Machine", "Vma", int], KGen[tuple[int, int]]]


@dataclass(eq=False, slots=True)
class Vma:
    mm: MmStruct
    start: int
    end: int
    pgoff: int
    flags: int
    file: File | None
    fault: FaultHandler | None  # vm_ops->fault; None = anonymous
    ptes: XArray = field(default_factory=XArray)

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end


@dataclass(eq=False, slots=True)
class MmStruct:
    vmas: list[Vma] = field(default_factory=list)
    mmap_base: int = MMAP_BASE
    # KVM instances whose memslots point into this mm (mmu_notifier subscribers).
    notifiers: list[Kvm] = field(default_factory=list)

    def find_vma(self, addr: int) -> Vma | None:
        for v in self.vmas:
            if v.contains(addr):
                return v
        return None


@dataclass(eq=False, slots=True)
class Process:
    pid: int
    name: str
    mm: MmStruct = field(default_factory=MmStruct)
    fds: FdTable = field(default_factory=FdTable)


def vma_has_no_direct_map(m: Machine, vma: Vma) -> bool:
    """``vma_has_no_direct_map()`` (v12), or ``vma_is_secretmem()`` without the series."""
    return vma.file is not None and m.design.mapping_refuses_gup(m, vma.file.inode.mapping)


# --- mmap / munmap / mprotect -------------------------------------------------------------------
def calc_vm_prot_bits(prot: int) -> int:
    """``calc_vm_prot_bits()`` (include/linux/mman.h) without protection keys."""
    return ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
            | (VM_EXEC if prot & PROT_EXEC else 0))


def access_error(vma: Vma, write: bool) -> bool:
    """x86 ``access_error()`` (arch/x86/mm/fault.c): a write needs VM_WRITE; a read any of
    VM_READ, VM_WRITE, VM_EXEC (``vma_is_accessible()``).  True means SIGSEGV."""
    if write:
        return not vma.flags & VM_WRITE
    return not vma.flags & VM_ACCESS_FLAGS


def sys_mmap(m: Machine, proc: Process, file: File | None, length: int, offset: int, *,
             shared: bool, prot: int = PROT_RW, fixed: int | None = None) -> KGen[int]:
    """x86 ``sys_mmap()`` -> ``ksys_mmap_pgoff()`` -> ``do_mmap()`` (6.18).

    ``len`` and ``off`` are ``unsigned long``: a caller's value is converted first, so a
    negative offset is a huge page offset, which ``file_mmap_ok()`` refuses.  ``fixed`` is
    the address of a MAP_FIXED mapping; without it there is no address hint.
    """
    length, offset = to_u64(length), to_u64(offset)
    if offset & (PAGE_SIZE - 1):
        return -EINVAL
    return (yield from do_mmap(m, proc, file, length, offset >> PAGE_SHIFT, shared=shared,
                               prot=prot, fixed=fixed))


def do_mmap(m: Machine, proc: Process, file: File | None, length: int, pgoff: int, *,
            shared: bool, prot: int = PROT_RW, fixed: int | None = None) -> KGen[int]:
    """``do_mmap()`` + ``mmap_region()`` + ``->mmap``: returns the address or -errno.

    The checks in the kernel's order: a zero length is EINVAL; a length whose page
    alignment wraps is ENOMEM; a page offset range that wraps is EOVERFLOW; then
    ``__get_unmapped_area()`` (ENOMEM when nothing fits below ``TASK_SIZE``; for MAP_FIXED,
    ENOMEM past ``TASK_SIZE`` and EINVAL for an unaligned address), then
    ``file_mmap_ok()`` (EOVERFLOW past ``MAX_LFS_FILESIZE``), the ``f_mode`` checks
    (EACCES), ``path_noexec()`` (EPERM for PROT_EXEC), then the overcommit charge of
    ``__mmap_region()`` (ENOMEM).  Nothing is mapped before every check has passed.

    MAP_FIXED over existing mappings: ``__mmap_region()`` (6.18) gathers the old VMAs,
    clears their PTEs (``vms_clean_up_area()``) before calling ``->mmap``, and if ``->mmap``
    fails, ``vms_abort_munmap_vmas()`` cannot put them back: the old range is left unmapped.
    """
    if not length:
        return -EINVAL
    length = to_u64(-(-length // PAGE_SIZE) * PAGE_SIZE)
    if not length:
        return -ENOMEM
    if pgoff + (length >> PAGE_SHIFT) > 0xFFFF_FFFF_FFFF_FFFF:
        return -EOVERFLOW
    mm = proc.mm
    if len(mm.vmas) > DEFAULT_MAX_MAP_COUNT:
        return -ENOMEM
    if fixed is None:
        addr = get_unmapped_area(mm, length)
        if addr < 0:
            return addr
    elif fixed > TASK_SIZE - length:
        return -ENOMEM
    elif fixed & (PAGE_SIZE - 1):
        return -EINVAL
    else:
        addr = fixed
    flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if file is not None:
        if length > MAX_LFS_FILESIZE or pgoff > (MAX_LFS_FILESIZE - length) >> PAGE_SHIFT:
            return -EOVERFLOW  # file_mmap_ok() of a regular file
        if shared:
            if prot & PROT_WRITE and not file.f_mode & FMODE_WRITE:
                return -EACCES
            flags |= VM_SHARED | VM_MAYSHARE
            if not file.f_mode & FMODE_WRITE:
                flags &= ~(VM_MAYWRITE | VM_SHARED)
        if not file.f_mode & FMODE_READ:
            return -EACCES
        if file.inode.noexec:  # path_noexec(): the pseudo filesystem is SB_I_NOEXEC
            if flags & VM_EXEC:
                return -EPERM
            flags &= ~VM_MAYEXEC
    elif shared:
        flags |= VM_SHARED | VM_MAYSHARE
    if not vm_enough_memory(m, length, flags):
        return -ENOMEM
    if fixed is not None:
        yield from _unmap_range(m, proc, addr, addr + length)
    vma = Vma(mm, addr, addr + length, pgoff, flags, file, None)
    if file is not None:
        r = yield from file.f_op.mmap(m, file, vma)
        if r:
            return r
        get_file(file)
        file.inode.mapping.i_mmap.append(vma)
    mm.vmas.append(vma)
    m.trace.emit("do_mmap", "mmap", -1, {"addr": vma.start, "len": length,
                                        "file": file.inode.kind if file else "anon"})
    return vma.start


def vm_enough_memory(m: Machine, length: int, vm_flags: int) -> bool:
    """``__mmap_region()``'s charge of a private writable mapping (``accountable_mapping()``)
    through ``__vm_enough_memory()`` (6.18, mm/util.c): the default heuristic
    (``vm.overcommit_memory`` = 0, OVERCOMMIT_GUESS) refuses more pages than RAM plus swap
    (the model has no swap).  The other overcommit modes and RLIMIT_AS are not modelled.
    """
    if vm_flags & (VM_SHARED | VM_WRITE) == VM_WRITE:
        return length >> PAGE_SHIFT <= sum(hi - lo for lo, hi in m.ram)
    return True


def get_unmapped_area(mm: MmStruct, length: int) -> int:
    """x86 ``arch_get_unmapped_area_topdown()`` -> ``vm_unmapped_area()`` (no hint, no
    alignment): the highest gap below ``mmap_base`` that fits, else bottom-up from
    ``TASK_UNMAPPED_BASE`` to ``TASK_SIZE``; -ENOMEM if neither has room.

    Unmapped ranges are reused, as in the kernel.
    """
    if length > TASK_SIZE:
        return -ENOMEM
    used = sorted((v.start, v.end) for v in mm.vmas)
    top = mm.mmap_base
    for start, end in reversed(used):
        if end <= top and top - end >= length:
            return top - length
        top = min(top, start)
    if top - PAGE_SIZE >= length:
        return top - length
    low = TASK_UNMAPPED_BASE
    for start, end in used:
        if end <= low:
            continue
        if start - low >= length:
            return low
        low = max(low, end)
    if TASK_SIZE - low >= length:
        return low
    return -ENOMEM


def do_munmap(m: Machine, proc: Process, addr: int) -> KGen[int]:
    """Unmap the whole VMA that starts at ``addr`` (the model checker's munmap)."""
    vma = proc.mm.find_vma(addr)
    if vma is None or vma.start != addr:
        return -EINVAL
    yield from remove_vma(m, proc, vma)
    return 0


def remove_vma(m: Machine, proc: Process, vma: Vma) -> KGen[None]:
    """``vms_complete_munmap_vmas()`` for one VMA: zap its PTEs, unlink it, drop its file."""
    if not m.ranges.zap_user_range(m, vma):
        for page, _pfn in vma.ptes.items():
            yield from zap_pte(m, vma, page)
    proc.mm.vmas.remove(vma)
    m.trace.emit("do_munmap", "munmap", -1, {"addr": vma.start})
    if vma.file is not None:
        vma.file.inode.mapping.i_mmap.remove(vma)
        yield from fput(m, vma.file)


def split_vma(m: Machine, vma: Vma, addr: int) -> Vma:
    """``__split_vma()``: cut ``vma`` at ``addr``; returns the new upper part.

    The upper part takes the PTEs above ``addr`` (with their references) and its own
    reference on the file, and joins the file's ``i_mmap``.  Our choice: VMAs are never
    merged again (the kernel's ``vma_merge_*()`` joins equal neighbours), so after an
    mprotect() round trip the model shows more VMAs than /proc/self/maps would.
    """
    assert vma.start < addr < vma.end and not addr & (PAGE_SIZE - 1)
    cut = (addr - vma.start) >> PAGE_SHIFT
    upper = Vma(vma.mm, addr, vma.end, vma.pgoff + cut, vma.flags, vma.file, vma.fault)
    for page, pfn in list(vma.ptes.items(cut)):
        vma.ptes.erase(page)
        upper.ptes.store(page - cut, pfn)
    vma.end = addr
    vma.mm.vmas.append(upper)
    if vma.file is not None:
        get_file(vma.file)
        vma.file.inode.mapping.i_mmap.append(upper)
    m.trace.emit("__split_vma", "split_vma", -1, {"addr": addr})
    return upper


def vmas_in(m: Machine, mm: MmStruct, start: int, end: int) -> list[Vma]:
    """The VMAs covering [start, end), split so that each lies wholly inside, by address."""
    out = []
    for vma in sorted((v for v in mm.vmas if v.start < end and v.end > start),
                      key=lambda v: v.start):
        if vma.start < start:
            vma = split_vma(m, vma, start)
        if vma.end > end:
            split_vma(m, vma, end)
        out.append(vma)
    return out


def _unmap_range(m: Machine, proc: Process, start: int, end: int) -> KGen[None]:
    for vma in vmas_in(m, proc.mm, start, end):
        yield from remove_vma(m, proc, vma)


def do_vmi_munmap(m: Machine, proc: Process, start: int, length: int) -> KGen[int]:
    """``munmap(2)`` -> ``__vm_munmap()`` -> ``do_vmi_munmap()`` (mm/vma.c, 6.18).

    EINVAL for an unaligned start, a zero length, or a range past ``TASK_SIZE``; the VMAs
    at the ends are split; a range with nothing mapped is not an error.
    """
    start, length = to_u64(start), to_u64(length)
    if start & (PAGE_SIZE - 1) or start > TASK_SIZE or length > TASK_SIZE - start:
        return -EINVAL
    length = -(-length // PAGE_SIZE) * PAGE_SIZE
    if not length:
        return -EINVAL
    yield from _unmap_range(m, proc, start, start + length)
    return 0


def do_mprotect_pkey(m: Machine, proc: Process, start: int, length: int, prot: int) -> KGen[int]:
    """``mprotect(2)`` -> ``do_mprotect_pkey()`` + ``mprotect_fixup()`` (mm/mprotect.c, 6.18).

    EINVAL for both PROT_GROWSDOWN and PROT_GROWSUP, an unaligned start, or a PROT bit
    outside READ|WRITE|EXEC|SEM (generic ``arch_validate_prot()``, which x86 keeps; PROT_SEM
    does nothing); ENOMEM when the range wraps or has a hole (the VMAs before the hole keep
    their new protection, as in the kernel); EINVAL for PROT_GROWSDOWN/UP once a VMA is
    found (no VMA here grows); EACCES for a protection the VMA may not have (VM_MAY*
    cleared: PROT_WRITE on a read-only shared file, PROT_EXEC on a noexec one).
    ``change_protection()`` notifies KVM (``MMU_NOTIFY_PROTECTION_VMA``), which zaps its
    stage-2 mappings of the range.  Protection keys are not modelled.
    """
    start, length = to_u64(start), to_u64(length)
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~grows
    if grows == PROT_GROWSDOWN | PROT_GROWSUP or start & (PAGE_SIZE - 1):
        return -EINVAL
    if not length:
        return 0
    end = start + -(-length // PAGE_SIZE) * PAGE_SIZE
    if end > 0xFFFF_FFFF_FFFF_FFFF or end <= start:
        return -ENOMEM
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
        return -EINVAL
    covered = sorted((v for v in proc.mm.vmas if v.start < end and v.end > start),
                     key=lambda v: v.start)
    if not covered:
        return -ENOMEM
    if grows:  # VM_GROWSDOWN/VM_GROWSUP: the model maps no stack
        return -ENOMEM if not grows & PROT_GROWSDOWN and covered[0].start > start else -EINVAL
    if covered[0].start > start:
        return -ENOMEM
    want = calc_vm_prot_bits(prot)
    tmp = start
    for vma in covered:
        if vma.start > tmp:
            return -ENOMEM
        if want & ~(vma.flags >> 4) & VM_ACCESS_FLAGS:
            return -EACCES
        lo, hi = max(vma.start, start), min(vma.end, end)
        part = vmas_in(m, proc.mm, lo, hi)[0]
        notifiers = list(part.mm.notifiers)
        for kvm in notifiers:
            yield from kvm.mmu_notifier_invalidate_range_start(m, part.start, part.end)
        part.flags = part.flags & ~VM_ACCESS_FLAGS | want
        for kvm in notifiers:
            yield from kvm.mmu_notifier_invalidate_range_end(m, part.start, part.end)
        tmp = hi
    if tmp < end:
        return -ENOMEM
    return 0


# --- faults ------------------------------------------------------------------------------------
def handle_mm_fault(m: Machine, vma: Vma, addr: int, write: bool) -> KGen[int]:
    """Resolve a user fault at ``addr``; returns the pfn or -VM_FAULT_* bits."""
    page = (addr - vma.start) >> PAGE_SHIFT
    if vma.fault is None:
        return (yield from do_anonymous_page(m, vma, page))
    m.trace.count("user_fault")
    while True:
        ret, pfn = yield from vma.fault(m, vma, page)
        if ret & VM_FAULT_RETRY:
            continue
        if ret & VM_FAULT_ERROR:
            m.trace.emit("__do_fault", "fault_error", -1, {"addr": addr, "ret": _fault_name(ret)})
            return -ret
        return (yield from finish_fault(m, vma, page, pfn))


def do_anonymous_page(m: Machine, vma: Vma, page: int) -> KGen[int]:
    pfn = yield from alloc_page(m, GFP_HIGHUSER_ZERO, kind="anon")
    if pfn < 0:
        return -VM_FAULT_OOM
    m.mem.kind[pfn] = KIND_ANON
    yield ("pte", (id(vma.mm), vma.start + (page << PAGE_SHIFT)))
    old = vma.ptes.load(page)
    if old != EMPTY:  # raced with another fault
        yield from folio_put(m, pfn)
        return old
    _set_pte(m, vma, page, pfn, "do_anonymous_page")
    return pfn


def finish_fault(m: Machine, vma: Vma, page: int, pfn: int) -> KGen[int]:
    """``finish_fault()``: set the PTE for a locked folio, then unlock it."""
    yield ("pte", (id(vma.mm), vma.start + (page << PAGE_SHIFT)))
    old = vma.ptes.load(page)
    if old != EMPTY:
        yield from folio_unlock(m, pfn)
        yield from folio_put(m, pfn)
        return old
    _set_pte(m, vma, page, pfn, "finish_fault")
    yield from folio_unlock(m, pfn)
    return pfn


def _set_pte(m: Machine, vma: Vma, page: int, pfn: int, fn: str) -> None:
    vma.ptes.store(page, pfn)
    m.mem.mapcount[pfn] += 1
    m.trace.emit(fn, "pte_map", pfn, {"addr": vma.start + (page << PAGE_SHIFT)})
    if m.inv.enabled:
        m.inv.on_handout(pfn, "user PTE")


def zap_pte(m: Machine, vma: Vma, page: int) -> KGen[None]:
    """``zap_pte_range()`` for one PTE: clear it, notify KVM, drop the PTE's reference."""
    addr = vma.start + (page << PAGE_SHIFT)
    notifiers = list(vma.mm.notifiers)
    for kvm in notifiers:
        yield from kvm.mmu_notifier_invalidate_range_start(m, addr, addr + PAGE_SIZE)
    yield ("pte", (id(vma.mm), addr))
    pfn = vma.ptes.erase(page)
    if pfn != EMPTY:
        m.mem.mapcount[pfn] -= 1
        m.trace.emit("zap_pte_range", "pte_unmap", pfn, {"addr": addr})
    for kvm in notifiers:
        yield from kvm.mmu_notifier_invalidate_range_end(m, addr, addr + PAGE_SIZE)
    if pfn != EMPTY:
        yield from folio_put(m, pfn)



def unmap_mapping_folio(m: Machine, mapping: AddressSpace, pfn: int) -> KGen[None]:
    """``unmap_mapping_folio()``: zap the folio's PTEs in every VMA mapping the file."""
    index = m.mem.index[pfn]
    for vma in list(mapping.i_mmap):
        page = index - vma.pgoff
        if 0 <= page < vma.npages and vma.ptes.load(page) == pfn:
            yield from zap_pte(m, vma, page)


def get_pte_or_fault(m: Machine, vma: Vma, addr: int, *, write: bool) -> KGen[int]:
    """The PTE's pfn, faulting it in if absent; -VM_FAULT_* on failure.  A write to a
    page-cache page in a private mapping copies it first (:func:`wp_page_copy`)."""
    page = (addr - vma.start) >> PAGE_SHIFT
    yield ("pte", (id(vma.mm), addr & ~(PAGE_SIZE - 1)))
    pfn = vma.ptes.load(page)
    if pfn == EMPTY:
        for _ in range(OOM_RETRIES):
            pfn = yield from handle_mm_fault(m, vma, addr, write)
            if pfn != -VM_FAULT_OOM:
                break
    if pfn >= 0 and write and needs_cow(m, vma, pfn):
        return (yield from wp_page_copy(m, vma, page, pfn))
    return pfn


def needs_cow(m: Machine, vma: Vma, pfn: int) -> bool:
    """A private file mapping maps the page cache read-only until a write copies the page
    (``do_cow_fault()`` on a write fault, ``do_wp_page()`` on a mapped page)."""
    return vma.file is not None and not vma.flags & VM_SHARED and m.mem.kind[pfn] != KIND_ANON


def wp_page_copy(m: Machine, vma: Vma, page: int, old: int) -> KGen[int]:
    """``wp_page_copy()`` (mm/memory.c): a new anonymous page with the old one's bytes
    (``__wp_page_copy_user()``) replaces the page-cache page in the PTE; the file is not
    written.  Our choice: the copy is secret when any byte of the old page was."""
    new = yield from alloc_page(m, GFP_HIGHUSER, kind="anon")
    if new < 0:
        return -VM_FAULT_OOM
    m.mem.kind[new] = KIND_ANON
    m.mem.write(new, 0, m.mem.read(old, 0, PAGE_SIZE), secret=m.mem.secret_bytes(old) > 0)
    yield from zap_pte(m, vma, page)
    _set_pte(m, vma, page, new, "wp_page_copy")
    return new


# --- accesses ------------------------------------------------------------------------------------
UserOp = Callable[[int, int, int, int], None]  # (pfn, offset in page, offset in buffer, n)
BulkOp = Callable[[NDArray[np.int64], int], None]  # (whole pages, offset in buffer of the first)


def _vma_for(proc: Process, a: int, write: bool) -> Vma | int:
    """The VMA of user address ``a``, or the fault an access there takes: -EFAULT for no
    VMA, ``-VM_FAULT_SIGSEGV`` for one whose protection refuses it (``access_error()``)."""
    vma = proc.mm.find_vma(a)
    if vma is None:
        return -EFAULT
    if access_error(vma, write):
        return -VM_FAULT_SIGSEGV
    return vma


def walk_user(m: Machine, proc: Process, addr: int, length: int, write: bool,
              op: UserOp, bulk: BulkOp | None = None) -> KGen[int]:
    """Apply ``op`` to each page-piece of [addr, addr+length) through the PTEs.

    Returns 0, or the negative ``VM_FAULT_*`` code (``-EFAULT`` for an unmapped address,
    ``-VM_FAULT_SIGSEGV`` for one the VMA's protection refuses) of the first fault that
    could not be resolved; bytes before it have
    been processed, as with a real access.  ``bulk``, if given, does what ``op``
    does to many whole pages at once (the batched path uses it).
    """
    done = 0
    while done < length:
        vma = _vma_for(proc, addr + done, write)
        if isinstance(vma, int):
            return vma
        batch, again = m.ranges.user_access(m, proc, addr, length, done, write, op, bulk)
        done += batch
        if again:
            continue
        if batch:  # the batch stopped at a page it could not take: look at that page's VMA
            vma = _vma_for(proc, addr + done, write)
            if isinstance(vma, int):
                return vma
        a = addr + done
        pfn = yield from get_pte_or_fault(m, vma, a, write=write)
        if pfn < 0:
            return pfn
        off = a & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - off, length - done)
        op(pfn, off, done, n)
        done += n
    return 0


def _fault_name(ret: int) -> str:
    names = [n for bit, n in ((VM_FAULT_OOM, "OOM"), (VM_FAULT_SIGBUS, "SIGBUS"),
                              (VM_FAULT_HWPOISON, "HWPOISON"), (VM_FAULT_SIGSEGV, "SIGSEGV"))
             if ret & bit]
    return "|".join(names) or hex(ret)


def fault_name(code: int) -> str:
    """Name of a negative code from :func:`walk_user` (for messages)."""
    return "EFAULT" if code == -EFAULT else "VM_FAULT_" + _fault_name(-code)
