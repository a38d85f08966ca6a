"""``madvise()`` (``mm/madvise.c``) and ``MAP_POPULATE`` (``mm/gup.c``'s ``__mm_populate()``).

The advice a VMM gives guest memory: ``MADV_DONTNEED`` (a balloon's inflate on anonymous
memory: zap the PTEs; a shared file keeps its pages), ``MADV_REMOVE`` (the balloon on
shared memory: punch a hole through ``vfs_fallocate()``, so on guest_memfd
``kvm_gmem_fallocate()`` runs), and ``MADV_POPULATE_READ``/``WRITE`` (a snapshot restore or
prefault: fault every page in through GUP, so every VMA that GUP refuses is refused here,
guest_memfd with NO_DIRECT_MAP among them under v12 05/16).

Above ``memory`` (VMAs, faults), ``gup`` (``check_vma_flags()``) and ``fs``
(``vfs_fallocate()``), as the kernel's files are.
"""

from __future__ import annotations

from errno import EACCES, EFAULT, EINVAL, ENOMEM
from typing import TYPE_CHECKING

from gmemlab.model.fs import vfs_fallocate
from gmemlab.model.mm.gup import FOLL_WRITE, check_vma_flags
from gmemlab.model.mm.memory import (
    VM_FAULT_HWPOISON,
    VM_FAULT_OOM,
    VM_LOCKED,
    VM_MAYWRITE,
    VM_SHARED,
    VM_WRITE,
    Process,
    Vma,
    get_pte_or_fault,
    vmas_in,
    zap_pte,
)
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    EHWPOISON,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    to_u64,
)

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

MODELLED_ADVICE = (MADV_DONTNEED, MADV_REMOVE, MADV_POPULATE_READ, MADV_POPULATE_WRITE)
# madvise_behavior_valid() (6.18, x86_64 with KSM and THP; MADV_HWPOISON and
# MADV_SOFT_OFFLINE left out): every advice the kernel accepts.  The model carries out
# MODELLED_ADVICE and refuses to guess the rest.
VALID_ADVICE = frozenset((*range(0, 5), *range(8, 26), 102, 103))


def do_madvise(m: Machine, proc: Process, start: int, len_in: int, behavior: int) -> KGen[int]:
    """``do_madvise()`` (mm/madvise.c, 6.18): the generic checks, then the advice.

    EINVAL for an unknown advice, an unaligned start, or a length whose page alignment
    wraps; an empty range is 0.  The populate advice is one GUP walk over the range
    (``madvise_populate()``); the others visit each VMA (``madvise_walk_vmas()``) and
    answer ENOMEM at the end when the range had a hole, after advising what is mapped.
    """
    start, len_in = to_u64(start), to_u64(len_in)
    if behavior not in VALID_ADVICE:
        return -EINVAL
    if behavior not in MODELLED_ADVICE:
        raise NotImplementedError(f"madvise advice {behavior} is not modelled")
    if start & (PAGE_SIZE - 1):
        return -EINVAL
    length = -(-len_in // PAGE_SIZE) * PAGE_SIZE
    end = start + length
    if (len_in and not length) or end > 0xFFFF_FFFF_FFFF_FFFF:
        return -EINVAL
    if end == start:
        return 0
    if behavior in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        return (yield from madvise_populate(m, proc, start, end, behavior == MADV_POPULATE_WRITE))
    covered = sorted((v for v in proc.mm.vmas if v.start < end and v.end > start),
                     key=lambda v: v.start)
    if not covered:
        return -ENOMEM
    unmapped = 0
    at = start
    for vma in covered:
        if vma.start > at:
            unmapped = -ENOMEM
        lo, hi = max(vma.start, start), min(vma.end, end)
        if behavior == MADV_DONTNEED:
            r = yield from madvise_dontneed(m, vma, lo, hi)
        else:
            r = yield from madvise_remove(m, vma, lo, hi)
        if r:
            return r
        at = hi
    return unmapped or (-ENOMEM if at < end else 0)


def madvise_dontneed(m: Machine, vma: Vma, start: int, end: int) -> KGen[int]:
    """``madvise_dontneed_free()``: EINVAL on a VM_LOCKED VMA; else ``zap_page_range_single()``
    over the range.  Anonymous memory reads back as zeros afterwards; a shared file's pages
    stay in its page cache and fault back in with their contents."""
    if vma.flags & VM_LOCKED:
        return -EINVAL
    first, last = (start - vma.start) >> PAGE_SHIFT, (end - vma.start) >> PAGE_SHIFT
    for page, _pfn in list(vma.ptes.items(first, last)):
        yield from zap_pte(m, vma, page)
    m.trace.emit("madvise_dontneed_single_vma", "madvise", -1, {"addr": start, "len": end - start})
    return 0


def madvise_remove(m: Machine, vma: Vma, start: int, end: int) -> KGen[int]:
    """``madvise_remove()``: EINVAL on a VM_LOCKED or an anonymous VMA, EACCES unless shared
    and writable (``vma_is_shared_maywrite()``), then ``vfs_fallocate(PUNCH_HOLE|KEEP_SIZE)``
    on the file at the range's offset (EOPNOTSUPP for memfd_secret, which has no
    ``->fallocate``)."""
    if vma.flags & VM_LOCKED or vma.file is None:
        return -EINVAL
    if vma.flags & (VM_SHARED | VM_MAYWRITE) != VM_SHARED | VM_MAYWRITE:
        return -EACCES
    offset = ((start - vma.start) >> PAGE_SHIFT) + vma.pgoff << PAGE_SHIFT
    return (yield from vfs_fallocate(m, vma.file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                     offset, end - start))


def madvise_populate(m: Machine, proc: Process, start: int, end: int, write: bool) -> KGen[int]:
    """``madvise_populate()`` -> ``faultin_page_range()`` -> ``__get_user_pages()`` with
    ``FOLL_MADV_POPULATE`` (mm/gup.c, 6.18): a page without a VMA is ENOMEM, a VMA that
    ``check_vma_flags()`` refuses EINVAL (PROT_NONE, a write to a read-only VMA,
    memfd_secret, and NO_DIRECT_MAP guest_memfd under v12), a fault that fails with SIGBUS
    (guest_memfd past EOF or without INIT_SHARED) EFAULT, a poisoned page EHWPOISON, OOM
    ENOMEM.  The pages before the failure stay populated."""
    gup_flags = FOLL_WRITE if write else 0
    for a in range(start, end, PAGE_SIZE):
        vma = proc.mm.find_vma(a)
        if vma is None:
            return -ENOMEM
        if check_vma_flags(m, vma, gup_flags):
            return -EINVAL
        pfn = yield from get_pte_or_fault(m, vma, a, write=write)
        if pfn == -VM_FAULT_OOM:
            return -ENOMEM
        if pfn == -VM_FAULT_HWPOISON:
            return -EHWPOISON
        if pfn < 0:
            return -EFAULT
    m.trace.emit("madvise_populate", "madvise", -1, {"addr": start, "len": end - start})
    return 0


def mm_populate(m: Machine, proc: Process, start: int, length: int) -> KGen[None]:
    """``mm_populate()`` -> ``__mm_populate(ignore_errors=1)`` after a MAP_POPULATE mmap
    (``vm_mmap_pgoff()``): each VMA's pages through ``populate_vma_page_range()``; a VMA
    GUP refuses, or a fault that fails, ends that VMA's population and nothing is
    reported (mmap has already succeeded).  Private writable VMAs are write-faulted.
    ``populate_vma_page_range()``'s FOLL_FORCE for accessible VMAs is left out: it only
    matters for the forced write of a read-only private mapping, which is never populated
    with a write fault here."""
    for vma in vmas_in(m, proc.mm, start, start + length):
        write = vma.flags & (VM_WRITE | VM_SHARED) == VM_WRITE
        if check_vma_flags(m, vma, FOLL_WRITE if write else 0):
            continue
        for a in range(vma.start, vma.end, PAGE_SIZE):
            if (yield from get_pte_or_fault(m, vma, a, write=write)) < 0:
                break
