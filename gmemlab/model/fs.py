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
from errno import EBADF, EFBIG, EINVAL, ENODEV, ENXIO, EOPNOTSUPP, EOVERFLOW, EPERM, ESPIPE
from typing import TYPE_CHECKING, Any, Protocol

from gmemlab.model.task import KGen
from gmemlab.uapi import (
    F_ADD_SEALS,
    F_DUPFD,
    F_DUPFD_CLOEXEC,
    F_GET_SEALS,
    F_GETFD,
    F_GETFL,
    F_SEAL_SEAL,
    F_SETFD,
    F_SETFL,
    FALLOC_FL_ALLOCATE_RANGE,
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_MODE_MASK,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_WRITE_ZEROES,
    FALLOC_FL_ZERO_RANGE,
    FD_CLOEXEC,
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_DIRECT,
    O_LARGEFILE,
    O_NOATIME,
    O_NONBLOCK,
    O_RDONLY,
    O_RDWR,
    O_WRONLY,
    to_s32,
    to_s64,
    to_u32,
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


# RLIMIT_NOFILE of the model's VMM: the default soft limit (include/asm-generic/resource.h
# INR_OPEN_CUR); F_DUPFD at or above it is EINVAL.  Running out of fd numbers (EMFILE) is
# not modelled: the model's VMM never holds that many.
RLIMIT_NOFILE = 1024
# fs/fcntl.c SETFL_MASK: the status flags F_SETFL may change (O_NDELAY is O_NONBLOCK on x86).
SETFL_MASK = O_APPEND | O_NONBLOCK | O_DIRECT | O_NOATIME


class FileOps(Protocol):
    """``struct file_operations`` + ``inode_operations.setattr``.

    ``has_read``/``has_write``/``has_llseek`` say whether ``->read``, ``->write``,
    ``->llseek`` exist, which decides the FMODE_* bits the VFS gives the file;
    ``has_fsync``, ``has_splice_read``, ``has_splice_write`` whether ``->fsync``,
    ``->splice_read``, ``->splice_write`` exist (the VFS answers EINVAL without them).
    ``setattr_mode`` is ``->setattr`` with ``ATTR_MODE`` (fchmod).
    """

    name: str
    has_read: bool
    has_write: bool
    has_llseek: bool
    has_fsync: bool
    has_splice_read: bool
    has_splice_write: bool

    def release(self, m: Machine, file: File) -> KGen[None]: ...
    def mmap(self, m: Machine, file: File, vma: Vma) -> KGen[int]: ...
    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]: ...
    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]: ...
    def setattr_mode(self, m: Machine, file: File, mode: int) -> KGen[int]: ...


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
    # What the inode's filesystem and kind decide about the calls below (set at creation):
    nlink: int = 1  # alloc_anon_inode() leaves 1; shmem_file_setup() clear_nlink()s a memfd
    noexec: bool = False  # path_noexec(): the pseudo filesystem is SB_I_NOEXEC / MNT_NOEXEC
    # i_fop has ->open (shmem_file_operations); an anonymous inode has no_open_fops (ENXIO)
    openable: bool = False
    dev: int = 0  # the superblock's s_dev (an anonymous device number; our choice of values)
    name: str = ""  # the dentry name alloc_file_pseudo() gave the file


@dataclass(eq=False, slots=True)
class File:
    f_op: FileOps
    inode: Inode
    f_mode: int
    private_data: Any = None
    f_count: int = 1
    pos: int = 0
    released: bool = False
    # f_flags: O_RDWR|O_LARGEFILE for every file the model creates (alloc_file_pseudo() with
    # O_RDWR, then the creator's f_flags |= O_LARGEFILE), changed by F_SETFL.
    f_flags: int = O_RDWR | O_LARGEFILE


@dataclass(slots=True)
class FdTable:
    files: dict[int, File] = field(default_factory=dict)
    cloexec: set[int] = field(default_factory=set)  # close_on_exec bits of the fdtable

    def install(self, file: File, *, minfd: int = 3, cloexec: bool = False) -> int:
        """``get_unused_fd_flags()`` + ``fd_install()``: the lowest free number >= ``minfd``
        (0-2 are the VMM's stdio)."""
        fd = max(minfd, 3)
        while fd in self.files:
            fd += 1
        self.files[fd] = file
        if cloexec:
            self.cloexec.add(fd)
        return fd

    def get(self, fd: int) -> File | None:
        return self.files.get(fd)

    def close(self, fd: int) -> File:
        self.cloexec.discard(fd)
        return self.files.pop(fd)


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


# --- fs/fcntl.c, fs/file.c, fs/sync.c, fs/open.c: calls on an open file ------------------------
def f_dupfd(fds: FdTable, file: File, minfd: int, cloexec: bool) -> int:
    """``f_dupfd()``: EINVAL when ``minfd`` (an ``unsigned int``) is not below RLIMIT_NOFILE."""
    if to_u32(minfd) >= RLIMIT_NOFILE:
        return -EINVAL
    get_file(file)
    return fds.install(file, minfd=to_u32(minfd), cloexec=cloexec)


def setfl(file: File, arg: int) -> int:
    """``setfl()`` (fs/fcntl.c, 6.18): O_DIRECT needs ``FMODE_CAN_ODIRECT``, which no file
    the model creates has (alloc_file_pseudo() does not call ``->open``, where shmem sets it);
    O_NOATIME needs the owner (the model's VMM owns its files).  Bits outside SETFL_MASK are
    ignored; no file here has ``->check_flags`` or ``->fasync``."""
    if arg & O_DIRECT:
        return -EINVAL
    file.f_flags = arg & SETFL_MASK | file.f_flags & ~SETFL_MASK
    return 0


def do_fcntl(m: Machine, fds: FdTable, fd: int, cmd: int, arg: int) -> KGen[int]:
    """``do_fcntl()`` for the commands a VMM uses on its memory fds (6.18).

    F_GET_SEALS/F_ADD_SEALS go to ``memfd_fcntl()``: a file without seals (guest_memfd,
    memfd_secret) is EINVAL; a memfd made without MFD_ALLOW_SEALING carries F_SEAL_SEAL, so
    adding a seal is EPERM.  Any other command is EINVAL.
    """
    file = fds.get(fd)
    if file is None:
        return -EBADF
    yield ("file", id(file))
    arg = to_u32(arg)
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        return f_dupfd(fds, file, arg, cmd == F_DUPFD_CLOEXEC)
    if cmd == F_GETFD:
        return FD_CLOEXEC if fd in fds.cloexec else 0
    if cmd == F_SETFD:
        if arg & FD_CLOEXEC:
            fds.cloexec.add(fd)
        else:
            fds.cloexec.discard(fd)
        return 0
    if cmd == F_GETFL:
        return file.f_flags
    if cmd == F_SETFL:
        return setfl(file, arg)
    if cmd in (F_GET_SEALS, F_ADD_SEALS):
        if file.inode.kind != "shmem":
            return -EINVAL
        return F_SEAL_SEAL if cmd == F_GET_SEALS else -EPERM
    return -EINVAL


def vfs_fsync(m: Machine, file: File) -> KGen[int]:
    """``vfs_fsync_range()``: EINVAL without ``->fsync`` (guest_memfd, memfd_secret);
    shmem's is ``noop_fsync``.  fdatasync is the same call with ``datasync`` set."""
    yield ("file", id(file))
    return 0 if file.f_op.has_fsync else -EINVAL


def chmod_common(m: Machine, file: File, mode: int) -> KGen[int]:
    """``fchmod(2)`` -> ``chmod_common()`` -> ``notify_change()`` -> ``->setattr``
    (guest_memfd's ``kvm_gmem_setattr()`` refuses everything with EINVAL)."""
    return (yield from file.f_op.setattr_mode(m, file, mode & 0o7777))


def reopen(m: Machine, file: File, flags: int) -> KGen[File | int]:
    """``open("/proc/self/fd/N", flags)``: ``do_dentry_open()`` on the inode behind the fd.

    An anonymous inode (guest_memfd, memfd_secret: ``alloc_anon_inode()`` keeps
    ``no_open_fops``) answers ENXIO; a memfd's shmem inode opens a new file on the same
    page cache.  The access mode comes from ``flags``.
    """
    yield ("file", id(file))
    if not file.inode.openable:
        return -ENXIO
    acc = flags & O_ACCMODE
    # do_dentry_open() gives a regular file FMODE_PREAD | FMODE_PWRITE besides.
    new = File(file.f_op, file.inode,
               file_init_mode(file.f_op, acc in (O_RDONLY, O_RDWR), acc in (O_WRONLY, O_RDWR))
               | FMODE_PREAD | FMODE_PWRITE)
    # build_open_flags() keeps O_CLOEXEC for the fd table only; open() forces O_LARGEFILE.
    new.f_flags = flags & ~(O_ACCMODE | O_CLOEXEC) | acc | O_LARGEFILE
    file.inode.i_count += 1
    return new


def do_sendfile(m: Machine, out: File, in_: File, pos: int | None, count: int) -> KGen[int]:
    """``do_sendfile()`` (fs/read_write.c) up to ``do_splice_direct()``'s first ``->op``.

    EBADF if ``in`` is not readable or ``out`` not writable; ESPIPE for an explicit
    offset on a file without FMODE_PREAD; EINVAL for a negative one (``rw_verify_area``)
    or an O_APPEND ``out``; then ``vfs_splice_read()`` needs ``in->f_op->splice_read`` and
    ``direct_splice_actor()`` ``out->f_op->splice_write`` (EINVAL: ``warn_unsupported()``).
    Returns 0 when the data may move (the caller moves it).
    """
    yield ("file", id(in_))
    if not in_.f_mode & FMODE_READ:
        return -EBADF
    if pos is not None:
        if not in_.f_mode & FMODE_PREAD:
            return -ESPIPE
        if pos < 0:
            return -EINVAL
    if not out.f_mode & FMODE_WRITE:
        return -EBADF
    start = in_.pos if pos is None else pos
    if start + count > MAX_LFS_FILESIZE:
        return -EOVERFLOW
    if out.f_flags & O_APPEND:
        return -EINVAL
    if not in_.f_op.has_splice_read or not out.f_op.has_splice_write:
        return -EINVAL
    return 0


def splice_file_to_pipe(m: Machine, in_: File, pos: int | None) -> KGen[int]:
    """``splice(file -> pipe)``: ``do_splice()`` -> ``splice_file_to_pipe()`` ->
    ``vfs_splice_read()``: EBADF unreadable, EINVAL for an offset without FMODE_PREAD
    (``do_splice()``'s errno there, unlike sendfile's ESPIPE; measured on 6.18.44), EINVAL
    without ``->splice_read``.  Returns 0 when the data may move."""
    yield ("file", id(in_))
    if not in_.f_mode & FMODE_READ:
        return -EBADF
    if pos is not None and (not in_.f_mode & FMODE_PREAD or pos < 0):
        return -EINVAL
    return 0 if in_.f_op.has_splice_read else -EINVAL


def splice_pipe_to_file(m: Machine, out: File, pos: int | None) -> KGen[int]:
    """``splice(pipe -> file)``: ``do_splice()`` -> ``do_splice_from()``: EBADF unwritable,
    EINVAL for an offset without FMODE_PWRITE,
    EINVAL for O_APPEND, EINVAL without ``->splice_write``.  0 when the data may move."""
    yield ("file", id(out))
    if not out.f_mode & FMODE_WRITE:
        return -EBADF
    if pos is not None and not out.f_mode & FMODE_PWRITE:
        return -EINVAL
    if out.f_flags & O_APPEND or (pos is not None and pos < 0):
        return -EINVAL
    return 0 if out.f_op.has_splice_write else -EINVAL
