"""Thin, typed access to the libc calls Python's ``os`` module lacks.

Everything that can fail goes through :func:`kernel_call` (or :func:`check`),
the one place where an ``OSError`` or a libc ``-1`` becomes an
:class:`gmemlab.api.KernelError` carrying the kernel's errno and the name of the
syscall or ioctl that returned it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

from gmemlab.api import KernelError

_libc = ctypes.CDLL(None, use_errno=True)

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTFORK = 10

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mlock = _libc.mlock
_mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_write = _libc.write
_write.restype = ctypes.c_ssize_t
_write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_pread = _libc.pread
_pread.restype = ctypes.c_ssize_t
_pread.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long)


class iovec(ctypes.Structure):  # kernel name
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(iovec),
    ctypes.c_ulong,
    ctypes.POINTER(iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_vmsplice = _libc.vmsplice
_vmsplice.restype = ctypes.c_ssize_t
_vmsplice.argtypes = (ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_uint)


class _statfs(ctypes.Structure):
    # struct statfs on x86_64 (glibc): f_type first, then sizes; the rest is padding for us.
    _fields_ = (("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112))


_statfs_fn = _libc.statfs
_statfs_fn.argtypes = (ctypes.c_char_p, ctypes.POINTER(_statfs))


def check(result: int, what: str) -> int:
    """Turn a libc ``-1`` into :class:`KernelError` with the errno libc saved."""
    if result == -1:
        raise KernelError(ctypes.get_errno(), what)
    return result


@contextmanager
def kernel_call(what: str) -> Iterator[None]:
    """Re-raise an ``OSError`` from ``os``/``fcntl`` as :class:`KernelError` naming ``what``."""
    try:
        yield
    except KernelError:
        raise
    except OSError as e:
        raise KernelError(e.errno or 0, what) from None


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | bytearray, what: str) -> int:
    """``ioctl(2)``; a struct or bytearray argument is passed by pointer and updated in place."""
    # try/except rather than kernel_call(): KVM_RUN goes through here, once per exit.
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        raise KernelError(e.errno or 0, what) from None


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0, *, what: str,
         addr: int | None = None) -> int:
    """``mmap(2)``; returns the address (``addr``: the hint, or the address with MAP_FIXED)."""
    addr = _mmap(addr, length, prot, flags, fd, offset)
    if addr == MAP_FAILED or addr is None:
        raise KernelError(ctypes.get_errno(), what)
    return int(addr)


def munmap(addr: int, length: int) -> None:
    check(_munmap(addr, length), "munmap")


def mprotect(addr: int, length: int, prot: int) -> None:
    check(_mprotect(addr, length, prot), "mprotect")


def madvise(addr: int, length: int, advice: int) -> None:
    check(_madvise(addr, length, advice), "madvise")


def mlock(addr: int, length: int) -> None:
    check(_mlock(addr, length), "mlock")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    check(_fallocate(fd, mode, offset, length), f"fallocate(mode={mode:#x})")


def syscall(number: int, *args: int, what: str) -> int:
    return check(_syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)), what)


def write_from(fd: int, addr: int, length: int, what: str) -> int:
    """``write(2)`` with a raw user address as the buffer (``copy_from_user`` on it)."""
    return check(_write(fd, addr, length), what)


def pread_into(fd: int, addr: int, length: int, offset: int, what: str) -> int:
    """``pread(2)`` into a raw user address."""
    return check(_pread(fd, addr, length, offset), what)


def process_vm_readv(pid: int, remote_addr: int, length: int) -> bytes:
    """``process_vm_readv(2)`` of one remote range into a fresh buffer; returns what was read."""
    buf = ctypes.create_string_buffer(length)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = iovec(remote_addr, length)
    n = check(
        _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0),
        "process_vm_readv",
    )
    return buf.raw[:n]


def vmsplice(fd: int, addr: int, length: int) -> int:
    """``vmsplice(2)`` of one user range into the pipe ``fd`` (GUP on the range)."""
    iov = iovec(addr, length)
    return check(_vmsplice(fd, ctypes.byref(iov), 1, 0), "vmsplice")


def statfs_type(path: str) -> int:
    """``statfs(2)`` ``f_type`` (the filesystem magic) of ``path``."""
    st = _statfs()
    check(_statfs_fn(os.fsencode(path), ctypes.byref(st)), f"statfs({path})")
    return int(st.f_type)


@dataclass(slots=True, eq=False)
class FdOwner:
    """Owns one file descriptor; a context manager whose ``close()`` is idempotent.

    Subclasses that own more than the fd override ``close()`` and call
    ``_close_fd()`` from it.
    """

    _fd: int

    def fileno(self) -> int:
        """The fd; EBADF once closed, as the syscall on a closed fd gives (the number is
        never passed on: it may name another file by now)."""
        if self._fd < 0:
            raise KernelError(errno.EBADF, f"{type(self).__name__}: already closed")
        return self._fd

    def close(self) -> None:
        """``close(2)``; a second call does nothing."""
        self._close_fd()

    def ioctl(self, request: int, arg: int = 0) -> int:
        """``ioctl(2)`` with an integer argument: whatever the fd's file answers."""
        return ioctl(self.fileno(), request, arg, f"ioctl({request:#x})")

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
