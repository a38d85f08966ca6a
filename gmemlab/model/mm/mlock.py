"""``mlock()`` (``mm/mlock.c``): lock the VMAs, then populate them through GUP.

Above both ``memory`` (faults) and ``gup`` (``check_vma_flags()``), as the
kernel's ``do_mlock()`` calls into ``mm/gup.c``'s ``__mm_populate()``.
"""

from __future__ import annotations

from errno import EAGAIN, ENOMEM
from typing import TYPE_CHECKING

from gmemlab.model.mm.gup import FOLL_WRITE, check_vma_flags
from gmemlab.model.mm.memory import (
    VM_FAULT_OOM,
    VM_LOCKED,
    VM_SHARED,
    VM_WRITE,
    Process,
    get_pte_or_fault,
    vma_has_no_direct_map,
)
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


def do_mlock(m: Machine, proc: Process, addr: int, length: int) -> KGen[int]:
    """``do_mlock()`` (mm/mlock.c, 6.18; v12 04-06 for AS_NO_DIRECT_MAP): lock, then populate.

    ``apply_vma_lock_flags()`` -> ``mlock_fixup()`` leaves a VMA that refuses GUP
    (``vma_has_no_direct_map()``, ``vma_is_secretmem()`` before the series) without
    VM_LOCKED.  ``__mm_populate(start, len, 0)`` then faults every page in through
    ``__get_user_pages()`` and, unlike the MAP_POPULATE path, stops at the first error:
    ``check_vma_flags()`` refuses those VMAs and a fault that fails (SIGBUS) is -EFAULT
    too, which ``__mlock_posix_error_return()`` makes -ENOMEM; an OOM fault is -ENOMEM,
    made -EAGAIN.  So mlock() of memfd_secret memory is ENOMEM (measured on 6.18.44).
    RLIMIT_MEMLOCK is not modelled: the model's VMM has CAP_IPC_LOCK.
    """
    end = addr + length
    vmas = sorted((v for v in proc.mm.vmas if v.start < end and v.end > addr), key=lambda v: v.start)
    for vma in vmas:
        if vma_has_no_direct_map(m, vma):
            m.trace.emit("mlock_fixup", "mlock_skip", -1, {"addr": vma.start})
            continue
        vma.flags |= VM_LOCKED
    for vma in vmas:
        # populate_vma_page_range(): write-fault private writable mappings (break COW).
        write = vma.flags & (VM_WRITE | VM_SHARED) == VM_WRITE
        if check_vma_flags(m, vma, FOLL_WRITE if write else 0):
            return -ENOMEM
        for a in range(max(addr, vma.start), min(end, vma.end), PAGE_SIZE):
            pfn = yield from get_pte_or_fault(m, vma, a, write=write)
            if pfn < 0:
                return -EAGAIN if pfn == -VM_FAULT_OOM else -ENOMEM
    return 0
