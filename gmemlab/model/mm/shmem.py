"""memfd_create (``mm/shmem.c``), as much as the conformance cases need.

A shmem folio is allocated on first fault, zeroed through the direct map,
marked uptodate and inserted; ``ftruncate`` sets the size and truncates what
lies beyond.  GUP works on it, which is what makes it the baseline next to
guest_memfd and memfd_secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmemlab.model.fs import S_IFREG, File, file_init_mode
from gmemlab.model.mm.filemap import (
    FGP_CREAT,
    FGP_LOCK,
    filemap_get_folio,
)
from gmemlab.model.mm.folio import folio_mark_uptodate
from gmemlab.model.mm.memory import VM_FAULT_LOCKED, VM_FAULT_SIGBUS, Process, Vma, vmf_error
from gmemlab.model.mm.page_alloc import GFP_HIGHUSER, clear_page
from gmemlab.model.mm.truncate import truncate_inode_pages_range
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine



def shmem_fault(m: Machine, vma: Vma, page: int) -> KGen[tuple[int, int]]:
    """``shmem_fault()`` -> ``shmem_get_folio_gfp()``."""
    assert vma.file is not None
    inode = vma.file.inode
    index = vma.pgoff + page
    if index << PAGE_SHIFT >= inode.size:
        return VM_FAULT_SIGBUS, -1
    folio = yield from filemap_get_folio(m, inode.mapping, index, FGP_LOCK | FGP_CREAT)
    if folio < 0:
        return vmf_error(folio), -1
    if not m.mem.test_uptodate(folio):
        yield from clear_page(m, folio, "shmem_get_folio_gfp")
        yield from folio_mark_uptodate(m, folio)
    return VM_FAULT_LOCKED, folio


class ShmemFops:
    name = "shmem_file_operations"
    has_read = True
    has_write = True
    has_llseek = True

    def mmap(self, m: Machine, file: File, vma: Vma) -> KGen[int]:
        yield ("file", id(file))
        vma.fault = shmem_fault
        return 0

    def release(self, m: Machine, file: File) -> KGen[None]:
        yield ("file", id(file))

    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
        yield ("file", id(file))
        return -95

    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]:
        """``shmem_setattr()``: shrinking truncates the pages beyond the new size."""
        inode = file.inode
        old = inode.size
        inode.size = size
        if size < old:
            yield from truncate_inode_pages_range(m, inode.mapping, -(-size // PAGE_SIZE), None)
        return 0


SHMEM_FOPS = ShmemFops()


def sys_memfd_create(m: Machine, proc: Process, name: str) -> KGen[int]:
    yield ("fd", None)
    mapping = m.new_mapping(None, GFP_HIGHUSER, "shmem")
    inode = m.new_inode(0o600 | S_IFREG, 0, mapping, "shmem")
    file = File(SHMEM_FOPS, inode, file_init_mode(SHMEM_FOPS, True, True))
    inode.i_count += 1
    fd = proc.fds.install(file)
    m.trace.emit("memfd_create", "memfd_create", -1, {"fd": fd, "name": name})
    return fd
