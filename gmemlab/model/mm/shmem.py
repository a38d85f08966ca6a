"""memfd_create (``mm/shmem.c``), as much as the conformance cases need.

A shmem folio is allocated on first fault, zeroed through the direct map,
marked uptodate and inserted; ``ftruncate`` sets the size and truncates what
lies beyond.  GUP works on it, which is what makes it the baseline next to
guest_memfd and memfd_secret.
"""

from __future__ import annotations

from errno import EFBIG, EOPNOTSUPP
from typing import TYPE_CHECKING

from gmemlab.model.fs import (
    FMODE_PREAD,
    FMODE_PWRITE,
    MAX_LFS_FILESIZE,
    S_IFREG,
    File,
    Inode,
    file_init_mode,
)
from gmemlab.model.mm.filemap import (
    FGP_CREAT,
    FGP_LOCK,
    filemap_get_folio,
)
from gmemlab.model.mm.folio import folio_mark_uptodate, folio_put, folio_unlock
from gmemlab.model.mm.memory import VM_FAULT_LOCKED, VM_FAULT_SIGBUS, Process, Vma, vmf_error
from gmemlab.model.mm.page_alloc import GFP_HIGHUSER, clear_page
from gmemlab.model.mm.truncate import truncate_inode_pages_range
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.task import KGen
from gmemlab.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine



SHMEM_DEV = 1  # shm_mnt's anonymous device (our choice of number)


def shmem_fault(m: Machine, vma: Vma, page: int) -> KGen[tuple[int, int]]:
    """``shmem_fault()`` -> ``shmem_get_folio_gfp()``."""
    assert vma.file is not None
    inode = vma.file.inode
    index = vma.pgoff + page
    if index << PAGE_SHIFT >= inode.size:
        return VM_FAULT_SIGBUS, -1
    folio = yield from shmem_get_folio(m, inode, index)
    if folio < 0:
        return vmf_error(folio), -1
    return VM_FAULT_LOCKED, folio


def shmem_get_folio(m: Machine, inode: Inode, index: int) -> KGen[int]:
    """``shmem_get_folio_gfp(SGP_CACHE)``: the locked folio at ``index`` with a reference,
    allocated and zeroed (through the direct map) if absent; -errno on failure."""
    folio = yield from filemap_get_folio(m, inode.mapping, index, FGP_LOCK | FGP_CREAT)
    if folio >= 0 and not m.mem.test_uptodate(folio):
        yield from clear_page(m, folio, "shmem_get_folio_gfp")
        yield from folio_mark_uptodate(m, folio)
    return folio


def shmem_read(m: Machine, inode: Inode, pos: int, count: int) -> bytes:
    """What ``shmem_file_read_iter()``/``shmem_file_splice_read()`` copy out: the page cache
    up to i_size, a hole reading as zeros (the zero page), nothing allocated."""
    end = min(pos + count, inode.size)
    out = bytearray()
    a = pos
    while a < end:
        n = min(end, (a // PAGE_SIZE + 1) * PAGE_SIZE) - a
        pfn = inode.mapping.i_pages.load(a >> PAGE_SHIFT)
        out += bytes(n) if pfn == EMPTY else m.mem.read(pfn, a % PAGE_SIZE, n)
        a += n
    return bytes(out)


def shmem_write(m: Machine, file: File, pos: int, data: bytes) -> KGen[int]:
    """``shmem_file_write_iter()`` (what ``iter_file_splice_write()`` calls): folios allocated
    as needed, i_size grown to the end of the write; the bytes written."""
    inode = file.inode
    if pos + len(data) > MAX_LFS_FILESIZE:
        return -EFBIG
    done = 0
    while done < len(data):
        a = pos + done
        n = min(len(data) - done, PAGE_SIZE - a % PAGE_SIZE)
        folio = yield from shmem_get_folio(m, inode, a >> PAGE_SHIFT)
        if folio < 0:
            return done or folio
        m.mem.write(folio, a % PAGE_SIZE, data[done : done + n], secret=False)
        yield from folio_unlock(m, folio)
        yield from folio_put(m, folio)
        done += n
    inode.size = max(inode.size, pos + done)
    return done


class ShmemFops:
    name = "shmem_file_operations"
    has_read = True
    has_write = True
    has_llseek = True
    has_fsync = True  # noop_fsync
    has_splice_read = True  # shmem_file_splice_read
    has_splice_write = True  # iter_file_splice_write

    def mmap(self, m: Machine, file: File, vma: Vma) -> KGen[int]:
        yield ("file", id(file))
        vma.fault = shmem_fault
        return 0

    def release(self, m: Machine, file: File) -> KGen[None]:
        yield ("file", id(file))

    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
        """``shmem_fallocate()`` (mm/shmem.c, 6.18): KEEP_SIZE and PUNCH_HOLE only.

        A punched hole zaps the range from every mapping and frees its whole pages
        (``shmem_truncate_range()``; partial pages at its ends are zeroed).  Allocation
        adds zeroed folios and grows i_size unless KEEP_SIZE.  Seals and the memcg charge
        are not modelled.
        """
        yield ("file", id(file))
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            return -EOPNOTSUPP
        inode = file.inode
        end = offset + length
        if mode & FALLOC_FL_PUNCH_HOLE:
            first, last = -(-offset // PAGE_SIZE), end // PAGE_SIZE
            for a, b in ((offset, min(end, first * PAGE_SIZE)), (max(offset, last * PAGE_SIZE), end)):
                pfn = inode.mapping.i_pages.load(a >> PAGE_SHIFT) if a < b else -1
                if pfn >= 0:
                    m.mem.memset(pfn, a % PAGE_SIZE, b - a, 0, secret=False)
            if first < last:
                yield from truncate_inode_pages_range(m, inode.mapping, first, last)
            return 0
        for index in range(offset >> PAGE_SHIFT, -(-end // PAGE_SIZE)):
            folio = yield from shmem_get_folio(m, inode, index)
            if folio < 0:
                return folio
            yield from folio_unlock(m, folio)
            yield from folio_put(m, folio)
        if not mode & FALLOC_FL_KEEP_SIZE:
            inode.size = max(inode.size, end)
        return 0

    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]:
        """``shmem_setattr()``: shrinking truncates the pages beyond the new size."""
        inode = file.inode
        old = inode.size
        inode.size = size
        if size < old:
            yield from truncate_inode_pages_range(m, inode.mapping, -(-size // PAGE_SIZE), None)
        return 0

    def setattr_mode(self, m: Machine, file: File, mode: int) -> KGen[int]:
        """``shmem_setattr()`` -> ``setattr_copy()``."""
        yield ("file", id(file))
        file.inode.mode = file.inode.mode & ~0o7777 | mode
        return 0


SHMEM_FOPS = ShmemFops()


def sys_memfd_create(m: Machine, proc: Process, name: str) -> KGen[int]:
    yield ("fd", None)
    mapping = m.new_mapping(None, GFP_HIGHUSER, "shmem")
    # shmem_get_inode(S_IFREG | S_IRWXUGO); __shmem_file_setup() clear_nlink()s it.
    inode = m.new_inode(0o777 | S_IFREG, 0, mapping, "shmem")
    inode.nlink, inode.openable, inode.dev = 0, True, SHMEM_DEV
    inode.name = f"memfd:{name}"
    # memfd_alloc_file(): FMODE_LSEEK | FMODE_PREAD | FMODE_PWRITE on top of file_init_path().
    file = File(SHMEM_FOPS, inode,
                file_init_mode(SHMEM_FOPS, True, True) | FMODE_PREAD | FMODE_PWRITE)
    inode.i_count += 1
    # The twin's memfd_create() passes MFD_CLOEXEC; so does the model's.
    fd = proc.fds.install(file, cloexec=True)
    m.trace.emit("memfd_create", "memfd_create", -1, {"fd": fd, "name": name})
    return fd
