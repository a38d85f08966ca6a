"""Mappings and mappable files of the twin: real ``mmap(2)`` over real fds.

:class:`TwinMapping` is :class:`gmemlab.api.Mapping`.  Its ``read``/``write``/
``fill`` run in a forked child (:mod:`gmemlab.twin.child`) whenever the
mapping is file-backed, because a file fault can be answered with SIGBUS
(guest_memfd past ``i_size`` or without INIT_SHARED, any file past EOF).  The
``*_in_process`` variants skip the child; they are for callers that know the
pages are accessible (the measurement loops), and a SIGBUS there kills the
interpreter.

:class:`TwinFile` (memfd, memfd_secret) and :class:`TwinGuestMemfd` own their fd;
``close()`` is idempotent.  A mapping outlives the file it came from, as in
the kernel (the VMA holds its own file reference), so it is unmapped separately.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

from gmemlab import api, uapi
from gmemlab.api import SigBus, SigSegv
from gmemlab.twin import _sys
from gmemlab.twin.child import Progress, run_in_child


@dataclass(slots=True, eq=False)
class TwinMapping:
    """One ``mmap(2)`` region; ``munmap()`` is idempotent.

    ``may_sigbus`` sends every access to a child: set for file mappings, and from the
    moment the range may fault (``mprotect``, or another mapping put over it with
    MAP_FIXED, which may also have left part of it unmapped).
    """

    _addr: int
    _length: int
    may_sigbus: bool
    what: str
    _mapped: bool = True
    # MAP_PRIVATE: a store a child makes lands in the child's copy of the page, so once the
    # child has shown the store does not fault, it is made again here.
    private: bool = False

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def length(self) -> int:
        return self._length

    @property
    def mapped(self) -> bool:
        return self._mapped

    def _range(self, offset: int, length: int) -> int:
        if not self._mapped:
            raise ValueError(f"{self.what}: mapping already unmapped")
        if offset < 0 or length < 0 or offset + length > self._length:
            raise ValueError(
                f"{self.what}: [{offset:#x}, {offset + length:#x}) outside the {self._length:#x}-byte mapping"
            )
        return self._addr + offset

    # --- accesses that may take SIGBUS: in a child when the mapping is file-backed ---------
    def read(self, offset: int, length: int) -> bytes:
        """Load ``length`` bytes (user loads; page faults as the kernel serves them)."""
        start = self._range(offset, length)
        if not self.may_sigbus:
            return ctypes.string_at(start, length)
        return run_in_child(
            lambda p: b"".join(ctypes.string_at(a, n) for a, n in _pages(p, start, length)),
            f"read {self.what}",
        )

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset``."""
        start = self._range(offset, len(data))
        if not self.may_sigbus:
            ctypes.memmove(start, data, len(data))
            return

        def store(p: Progress) -> bytes:
            for a, n in _pages(p, start, len(data)):
                ctypes.memmove(a, data[a - start : a - start + n], n)
            return b""

        self._store_in_child(store, start, len(data), lambda a, n: ctypes.memmove(
            a, data[a - start : a - start + n], n), f"write {self.what}")

    def fill(self, offset: int, length: int, value: int) -> None:
        """``memset`` of ``length`` bytes to ``value``."""
        start = self._range(offset, length)
        if not self.may_sigbus:
            ctypes.memset(start, value, length)
            return

        def store(p: Progress) -> bytes:
            for a, n in _pages(p, start, length):
                ctypes.memset(a, value, n)
            return b""

        self._store_in_child(store, start, length, lambda a, n: ctypes.memset(a, value, n),
                             f"fill {self.what}")

    def _store_in_child(self, store: Callable[[Progress], bytes], start: int, length: int,
                        here: Callable[[int, int], object], what: str) -> None:
        """Run ``store`` in a child; on a MAP_PRIVATE mapping make the stores the child made
        (all of them, or those before its signal) again here with ``here(addr, n)``."""
        try:
            run_in_child(store, what)
        except (SigBus, SigSegv) as e:
            if self.private and e.addr > start:
                here(start, e.addr - start)
            raise
        if self.private:
            here(start, length)

    # --- in-process fast path: only for pages known to be accessible ----------------------
    def read_in_process(self, offset: int, length: int) -> bytes:
        """Like :meth:`read` but in this process: a SIGBUS kills the interpreter."""
        return ctypes.string_at(self._range(offset, length), length)

    def fill_in_process(self, offset: int, length: int, value: int) -> None:
        """Like :meth:`fill` but in this process: a SIGBUS kills the interpreter."""
        ctypes.memset(self._range(offset, length), value, length)

    # --- syscalls on the range -----------------------------------------------------------
    def mlock(self) -> None:
        """``mlock(2)`` the whole mapping."""
        _sys.mlock(self._range(0, self._length), self._length)

    def _sub(self, offset: int, length: int | None) -> tuple[int, int]:
        n = self._length - offset if length is None else length
        return self._range(offset, n), n

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """``madvise(2)`` of [offset, offset+length) (default: the whole mapping)."""
        addr, n = self._sub(offset, length)
        # MADV_POPULATE_* take the faults here, in this process: a fault that would SIGBUS
        # fails the call with EFAULT instead (GUP), so no child is needed.
        _sys.madvise(addr, n, advice)

    def mprotect(self, prot: int, offset: int = 0, length: int | None = None) -> None:
        """``mprotect(2)`` of [offset, offset+length); accesses go to a child from now on."""
        addr, n = self._sub(offset, length)
        self.may_sigbus = True
        _sys.mprotect(addr, n, prot)

    def munmap(self) -> None:
        """``munmap(2)``; a second call does nothing."""
        if self._mapped:
            self._mapped = False
            _sys.munmap(self._addr, self._length)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.munmap()


def _pages(progress: Progress, start: int, length: int) -> Iterator[tuple[int, int]]:
    """Yield [start, start+length) split at page boundaries, announcing each piece first."""
    addr, end = start, start + length
    while addr < end:
        n = min(end, (addr | (uapi.PAGE_SIZE - 1)) + 1) - addr
        progress.set(addr)
        yield addr, n
        addr += n


def map_memory(length: int, fd: int, offset: int, *, shared: bool, prot: int, populate: bool,
               fixed: api.Mapping | None, what: str) -> TwinMapping:
    """``mmap(2)`` of ``fd`` (-1: anonymous) with the API's options; MAP_FIXED at ``fixed``.

    The mapping displaced by MAP_FIXED may now fault anywhere (another file, or, when the
    new mapping's ``->mmap`` failed after the old PTEs were cleared, nothing at all), so
    its accesses go to a child from then on.
    """
    flags = (_sys.MAP_SHARED if shared else _sys.MAP_PRIVATE) | (0 if fd >= 0 else _sys.MAP_ANONYMOUS)
    flags |= uapi.MAP_POPULATE if populate else 0
    at = None
    if fixed is not None:
        if not isinstance(fixed, TwinMapping):
            raise TypeError(f"{fixed!r} is not a mapping of the real kernel")
        at = fixed._range(0, 0)
        flags |= uapi.MAP_FIXED
        fixed.may_sigbus = True
    addr = _sys.mmap(length, prot, flags, fd, offset, what=f"mmap({what})", addr=at)
    in_process = fd < 0 and prot == uapi.PROT_RW
    return TwinMapping(addr, length, may_sigbus=not in_process, what=f"{what} mapping",
                       private=not shared)


@dataclass(slots=True, eq=False)
class TwinFile(_sys.FdOwner):
    """A mappable file we own the fd of: memfd, memfd_secret (and, below, guest_memfd)."""

    kind: str

    def mmap(self, length: int, offset: int = 0, *, shared: bool = True, prot: int = uapi.PROT_RW,
             populate: bool = False, fixed: api.Mapping | None = None) -> TwinMapping:
        """``mmap(2)``: ``MAP_SHARED`` (or ``MAP_PRIVATE``), ``MAP_POPULATE``, ``MAP_FIXED``."""
        return map_memory(length, self.fileno(), offset, shared=shared, prot=prot,
                          populate=populate, fixed=fixed, what=self.kind)

    def fstat(self) -> os.stat_result:
        """``fstat(2)``."""
        with _sys.kernel_call(f"fstat({self.kind})"):
            return os.fstat(self.fileno())

    def ftruncate(self, length: int) -> None:
        """``ftruncate(2)``."""
        with _sys.kernel_call(f"ftruncate({self.kind})"):
            os.ftruncate(self.fileno(), length)

    def dup(self, minfd: int = 0, *, cloexec: bool = False) -> Self:
        """``fcntl(F_DUPFD[_CLOEXEC], minfd)``: a new object owning the new fd."""
        cmd = uapi.F_DUPFD_CLOEXEC if cloexec else uapi.F_DUPFD
        with _sys.kernel_call("F_DUPFD"):
            fd = fcntl.fcntl(self.fileno(), cmd, minfd)
        return dataclasses.replace(self, _fd=fd)

    def fcntl(self, cmd: int, arg: int = 0) -> int:
        """``fcntl(2)`` with an integer argument (F_DUPFD*: :meth:`dup`)."""
        api.check_fcntl_cmd(cmd)
        with _sys.kernel_call(f"fcntl({cmd})"):
            return fcntl.fcntl(self.fileno(), cmd, arg)

    def fsync(self) -> None:
        with _sys.kernel_call(f"fsync({self.kind})"):
            os.fsync(self.fileno())

    def fdatasync(self) -> None:
        with _sys.kernel_call(f"fdatasync({self.kind})"):
            os.fdatasync(self.fileno())

    def fchmod(self, mode: int) -> None:
        with _sys.kernel_call(f"fchmod({self.kind})"):
            os.fchmod(self.fileno(), mode)

    def reopen(self, flags: int = os.O_RDWR) -> Self:
        """``open("/proc/self/fd/N", flags)``: a new open file of the same inode, if any."""
        with _sys.kernel_call("open(/proc/self/fd)"):
            fd = os.open(f"/proc/self/fd/{self.fileno()}", flags)
        # os.open() adds O_CLOEXEC (PEP 446); the caller's flags decide it here.
        os.set_inheritable(fd, not flags & uapi.O_CLOEXEC)
        return dataclasses.replace(self, _fd=fd)


@dataclass(slots=True, eq=False)
class TwinGuestMemfd(TwinFile):
    """A guest_memfd file (from ``KVM_CREATE_GUEST_MEMFD``); every call is the real syscall."""

    _size: int = 0
    _flags: int = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def flags(self) -> int:
        return self._flags

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` (``kvm_gmem_fallocate``)."""
        _sys.fallocate(self.fileno(), mode, offset, length)

    def read(self, length: int) -> bytes:
        """``read(2)``."""
        with _sys.kernel_call("read(guest_memfd)"):
            return os.read(self.fileno(), length)

    def write(self, data: bytes) -> int:
        """``write(2)``."""
        with _sys.kernel_call("write(guest_memfd)"):
            return os.write(self.fileno(), data)

    def pread(self, length: int, offset: int) -> bytes:
        """``pread64(2)``."""
        with _sys.kernel_call("pread(guest_memfd)"):
            return os.pread(self.fileno(), length, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        """``pwrite64(2)``."""
        with _sys.kernel_call("pwrite(guest_memfd)"):
            return os.pwrite(self.fileno(), data, offset)

    def lseek(self, offset: int, whence: int) -> int:
        """``lseek(2)``."""
        with _sys.kernel_call("lseek(guest_memfd)"):
            return os.lseek(self.fileno(), offset, whence)
