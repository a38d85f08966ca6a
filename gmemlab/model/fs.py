"""VFS objects: inodes, files, file descriptors.

``include/linux/fs.h``.  A :class:`File` is referenced by file descriptors and
by every VMA that maps it (``get_file()`` in mmap), so closing the last fd of a
mapped guest_memfd does not release it: the release comes with the last
``munmap``.  The inode outlives its files only through them; when the last file
goes, ``iput()`` evicts it and ``truncate_inode_pages_final()`` frees every
folio through ``->free_folio``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from errno import EBADF, EFBIG, EINVAL, ENODEV, EOPNOTSUPP, ESPIPE
from typing import TYPE_CHECKING, Any, Protocol

from gmemlab.model.task import KGen
from gmemlab.uapi import (
    FALLOC_FL_ALLOCATE_RANGE,
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_MODE_MASK,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_WRITE_ZEROES,
    FALLOC_FL_ZERO_RANGE,
    to_s32,
    to_s64,
)

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.filemap import AddressSpace
    from gmemlab.model.mm.memory import Vma

S_IFREG = 0o100000
FMODE_READ = 0x1
FMODE_WRITE = 0x2
FMODE_LSEEK = 0x4
FMODE_PREAD = 0x8
FMODE_PWRITE = 0x10
FMODE_CAN_READ = 0x20000
FMODE_CAN_WRITE = 0x40000

# MAX_LFS_FILESIZE: the s_maxbytes of every pseudo filesystem a modelled file lives on
# (guest_memfd's kvm_gmem_fs and the anon inode fs via init_pseudo(), shmem for memfd).
MAX_LFS_FILESIZE = (1 << 63) - 1


class FileOps(Protocol):
    """``struct file_operations`` + ``inode_operations.setattr``.

    ``has_read``/``has_write``/``has_llseek`` say whether ``->read``, ``->write``,
    ``->llseek`` exist, which decides the FMODE_* bits the VFS gives the file.
    """

    name: str
    has_read: bool
    has_write: bool
    has_llseek: bool

    def release(self, m: Machine, file: File) -> KGen[None]: ...
    def mmap(self, m: Machine, file: File, vma: Vma) -> KGen[int]: ...
    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]: ...
    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]: ...


@dataclass(eq=False, slots=True)
class Inode:
    ino: int
    mode: int
    size: int
    mapping: AddressSpace
    kind: str  # "guest_memfd", "secretmem", "shmem"
    # super_operations->evict_inode; the machine gives every inode truncate_inode_pages_final().
    evict_inode: Callable[[Machine, Inode], KGen[None]] | None = None
    private: int = 0  # i_private: the guest_memfd creation flags (GMEM_I(inode)->flags)
    i_count: int = 0  # references from files
    evicted: bool = False


@dataclass(eq=False, slots=True)
class File:
    f_op: FileOps
    inode: Inode
    f_mode: int
    private_data: Any = None
    f_count: int = 1
    pos: int = 0
    released: bool = False


@dataclass(slots=True)
class FdTable:
    files: dict[int, File] = field(default_factory=dict)

    def install(self, file: File) -> int:
        fd = 3
        while fd in self.files:
            fd += 1
        self.files[fd] = file
        return fd

    def get(self, fd: int) -> File | None:
        return self.files.get(fd)


def file_init_mode(f_op: FileOps, readable: bool, writable: bool) -> int:
    """``file_init_path()``: which FMODE_* bits a pseudo file gets from its fops."""
    mode = (FMODE_READ if readable else 0) | (FMODE_WRITE if writable else 0)
    if f_op.has_llseek:
        mode |= FMODE_LSEEK
    if readable and f_op.has_read:
        mode |= FMODE_CAN_READ
    if writable and f_op.has_write:
        mode |= FMODE_CAN_WRITE
    return mode


def get_file(file: File) -> None:
    file.f_count += 1


def fput(m: Machine, file: File) -> KGen[None]:
    """``fput()``: the last reference runs ``->release`` and drops the inode."""
    yield ("file", id(file))
    file.f_count -= 1
    if file.f_count:
        return
    file.released = True
    yield from file.f_op.release(m, file)
    yield from iput(m, file.inode)


def iput(m: Machine, inode: Inode) -> KGen[None]:
    """``iput()`` -> ``evict()`` -> ``->evict_inode`` (``truncate_inode_pages_final()``)."""

    inode.i_count -= 1
    if inode.i_count:
        return
    if inode.mapping.nrpages or inode.kind in ("guest_memfd", "secretmem", "shmem"):
        m.trace.emit("evict", "evict_inode", -1, {"ino": inode.ino, "kind": inode.kind})
    if inode.evict_inode is not None:
        yield from inode.evict_inode(m, inode)
    inode.evicted = True
    m.unregister_mapping(inode.mapping)


# --- fs/read_write.c, fs/open.c: what the VFS answers before any ->op runs ----------------------
def vfs_read(m: Machine, file: File) -> KGen[int]:
    """``vfs_read()``'s checks: EBADF without FMODE_READ, EINVAL without a ->read."""
    yield ("file", id(file))
    if not file.f_mode & FMODE_READ:
        return -EBADF
    if not file.f_mode & FMODE_CAN_READ:
        return -EINVAL
    return 0


def vfs_write(m: Machine, file: File) -> KGen[int]:
    yield ("file", id(file))
    if not file.f_mode & FMODE_WRITE:
        return -EBADF
    if not file.f_mode & FMODE_CAN_WRITE:
        return -EINVAL
    return 0


def ksys_pread64(m: Machine, file: File, pos: int) -> KGen[int]:
    """``ksys_pread64()``: EINVAL for a negative offset, ESPIPE without FMODE_PREAD."""
    if pos < 0:
        return -EINVAL
    if not file.f_mode & FMODE_PREAD:
        return -ESPIPE
    return (yield from vfs_read(m, file))


def ksys_pwrite64(m: Machine, file: File, pos: int) -> KGen[int]:
    if pos < 0:
        return -EINVAL
    if not file.f_mode & FMODE_PWRITE:
        return -ESPIPE
    return (yield from vfs_write(m, file))


def vfs_llseek(m: Machine, file: File, offset: int, whence: int) -> KGen[int]:
    """``vfs_llseek()``: ESPIPE without FMODE_LSEEK; else ``generic_file_llseek``."""
    yield ("file", id(file))
    if not file.f_mode & FMODE_LSEEK:
        return -ESPIPE
    base = {0: 0, 1: file.pos, 2: file.inode.size}.get(whence)
    if base is None or base + offset < 0:
        return -EINVAL
    file.pos = base + offset
    return file.pos


def vfs_fallocate(m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
    """``ksys_fallocate()`` -> ``vfs_fallocate()`` (fs/open.c, 6.18): the generic checks, in
    their order, then ``->fallocate``.

    ``mode`` is an ``int`` and ``offset``/``len`` are ``loff_t``: the caller's values are
    converted to those types first.  Nothing is allocated or freed before every check passed.
    """
    mode, offset, length = to_s32(mode), to_s64(offset), to_s64(length)
    if offset < 0 or length <= 0:
        return -EINVAL
    if mode & ~(FALLOC_FL_MODE_MASK | FALLOC_FL_KEEP_SIZE):
        return -EOPNOTSUPP
    # Modes are exclusive; FALLOC_FL_ALLOCATE_RANGE is no bit set.
    kind = mode & FALLOC_FL_MODE_MASK
    if kind == FALLOC_FL_PUNCH_HOLE:
        if not mode & FALLOC_FL_KEEP_SIZE:
            return -EOPNOTSUPP
    elif kind in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_WRITE_ZEROES):
        if mode & FALLOC_FL_KEEP_SIZE:
            return -EOPNOTSUPP
    elif kind not in (FALLOC_FL_ALLOCATE_RANGE, FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_ZERO_RANGE):
        return -EOPNOTSUPP
    if not file.f_mode & FMODE_WRITE:
        return -EBADF
    if not file.inode.mode & S_IFREG:
        return -ENODEV
    # check_add_overflow(offset, len, &sum), then sum > s_maxbytes: both EFBIG.
    if offset + length > MAX_LFS_FILESIZE:
        return -EFBIG
    return (yield from file.f_op.fallocate(m, file, mode, offset, length))


def do_sys_ftruncate(m: Machine, file: File, length: int) -> KGen[int]:
    """``do_sys_ftruncate()`` -> ``notify_change()`` -> ``->setattr``."""
    if length < 0:
        return -EINVAL
    if not file.inode.mode & S_IFREG or not file.f_mode & FMODE_WRITE:
        return -EINVAL
    return (yield from file.f_op.setattr_size(m, file, length))
