"""get_user_pages: how the kernel takes references on user memory (``mm/gup.c``).

GUP-fast walks the page tables locklessly and asks ``gup_fast_folio_allowed()``
about each folio; v12 (patches 04-06) has it read ``folio->mapping`` for every
folio and refuse ``AS_NO_DIRECT_MAP`` mappings, falling back to the slow path.
The slow path's ``check_vma_flags()`` refuses such VMAs with ``-EFAULT``.  Before
the series both checks named secretmem instead.

Every kernel path that reaches user memory by reference goes through here and
fails the same way on such mappings: ``/proc/pid/mem`` (``access_remote_vm``,
which turns "no page" into ``-EIO``), ``process_vm_readv`` (``-EFAULT``),
``vmsplice`` and ``O_DIRECT`` (``iov_iter_get_pages``: ``-EFAULT``), and KVM's
``hva_to_pfn()`` (kvm-clock's pfncache, non-guest_memfd memslots).
"""

from __future__ import annotations

from errno import EFAULT
from typing import TYPE_CHECKING

from gmemlab.model.mm.folio import folio_put
from gmemlab.model.mm.memmap import KIND_ANON
from gmemlab.model.mm.memory import (
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Process,
    Vma,
    access_error,
    get_pte_or_fault,
    needs_cow,
    vma_has_no_direct_map,
)
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

FOLL_WRITE = 0x01
FOLL_FORCE = 0x10
FOLL_LONGTERM = 0x100
FOLL_PIN = 0x40000


def gup_fast_folio_allowed(m: Machine, pfn: int, gup_flags: int) -> bool:
    """``gup_fast_folio_allowed()``, v12 shape (no secretmem shortcut; mapping read for all)."""
    mem = m.mem
    if mem.kind[pfn] == KIND_ANON:
        return True
    mapping_id = mem.mapping[pfn]
    if not mapping_id:
        return False  # folio_is_zone_device() is never true here
    mapping = m.mappings[mapping_id]
    if m.design.mapping_refuses_gup(m, mapping):
        return False
    if gup_flags & (FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE) != FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE:
        return True
    return mapping.kind == "shmem"


def check_vma_flags(m: Machine, vma: Vma, gup_flags: int) -> int:
    """``check_vma_flags()`` (mm/gup.c; v12 05/16 turns ``vma_is_secretmem()`` into
    ``vma_has_no_direct_map()``): the slow path's per-VMA refusal.

    A write to a VMA without VM_WRITE, or a read of one without VM_READ, is refused unless
    the caller forces it (``FOLL_FORCE``: ptrace, ``/proc/pid/mem``), and even then a forced
    write needs a COW mapping and a forced read VM_MAYREAD.
    """
    flags = vma.flags
    if vma_has_no_direct_map(m, vma):
        return -EFAULT
    if gup_flags & FOLL_WRITE:
        if not flags & VM_WRITE and (not gup_flags & FOLL_FORCE or not is_cow_mapping(flags)):
            return -EFAULT
    elif not flags & VM_READ and (not gup_flags & FOLL_FORCE or not flags & VM_MAYREAD):
        return -EFAULT
    return 0


def is_cow_mapping(flags: int) -> bool:
    """``is_cow_mapping()``: private and possibly writable."""
    return flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE


def get_user_pages(m: Machine, proc: Process, addr: int, npages: int, gup_flags: int,
                   fn: str) -> KGen[list[int] | int]:
    """``get_user_pages_fast()`` falling back to ``__get_user_pages()``.

    Returns the pfns (each with a reference the caller must put) or -errno when
    not even the first page could be taken.
    """
    pages: list[int] = []
    mm = proc.mm
    # GUP-fast: lockless walk, stop at the first PTE it cannot use.
    for i in range(npages):
        a = addr + i * PAGE_SIZE
        vma = mm.find_vma(a)
        if vma is None:
            break
        yield ("pte", (id(mm), a))
        pfn = vma.ptes.load((a - vma.start) // PAGE_SIZE)
        # pte_access_permitted(): mprotect() made the PTEs as protected as the VMA.
        write = bool(gup_flags & FOLL_WRITE)
        if (pfn == EMPTY or access_error(vma, write) or (write and needs_cow(m, vma, pfn))
                or not gup_fast_folio_allowed(m, pfn, gup_flags)):
            break
        m.mem.refcount[pfn] += 1
        pages.append(pfn)
    # Slow path for the rest.
    for i in range(len(pages), npages):
        a = addr + i * PAGE_SIZE
        vma = mm.find_vma(a)
        err = -EFAULT if vma is None else check_vma_flags(m, vma, gup_flags)
        if err:
            m.trace.emit(fn, "gup_refused", -1, {"addr": a, "err": "EFAULT"})
            return pages_or_error(m, pages, err)
        assert vma is not None
        pfn = yield from get_pte_or_fault(m, vma, a, write=bool(gup_flags & FOLL_WRITE))
        if pfn < 0:
            return pages_or_error(m, pages, -EFAULT)
        yield ("ref", pfn)
        m.mem.refcount[pfn] += 1
        pages.append(pfn)
    for pfn in pages:
        if m.inv.enabled:
            m.inv.on_gup(pfn, fn)
    m.trace.emit(fn, "gup", pages[0] if pages else -1, {"pages": len(pages)})
    return pages


def pages_or_error(m: Machine, pages: list[int], err: int) -> list[int] | int:
    return pages if pages else err


def put_pages(m: Machine, pages: list[int]) -> KGen[None]:

    for pfn in pages:
        yield from folio_put(m, pfn)
