""":class:`TwinHost`: the real host kernel behind :class:`gmemlab.api.Host`.

Besides opening ``/dev/kvm`` and creating memory files, it drives the kernel
paths that reach user memory, each the way a real program would:

===================  =====================================  =======================
method               syscall                                how it reaches memory
===================  =====================================  =======================
pipe_write_from      ``write(2)`` into a pipe               ``copy_from_user``
proc_mem_read        ``pread(2)`` of ``/proc/self/mem``     GUP, ``FOLL_FORCE``
process_vm_readv     ``process_vm_readv(2)`` from a child   remote GUP
vmsplice             ``vmsplice(2)`` into a pipe            GUP
odirect_read_into    ``pread(2)`` of an ``O_DIRECT`` file   GUP for the DMA target
===================  =====================================  =======================

On memory whose GUP is refused (memfd_secret, and guest_memfd with
NO_DIRECT_MAP) the GUP paths fail (EIO for /proc/self/mem, EFAULT otherwise);
``copy_from_user`` keeps working.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from gmemlab import api, uapi
from gmemlab.twin import _sys
from gmemlab.twin.child import run_in_child
from gmemlab.twin.kvm import TwinKvm
from gmemlab.twin.memory import TwinFile, TwinMapping, map_memory

KVM_PATH = "/dev/kvm"
ODIRECT_DIR_ENV = "GMEMLAB_ODIRECT_DIR"
# Filesystems whose O_DIRECT is buffered I/O in disguise (copy_to_user, no GUP).
_FAKE_ODIRECT_MAGICS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}
ODIRECT_FILE_BYTE = 0xD1  # every byte of the file odirect_read_into reads
_CHUNK = 1 << 16  # the default pipe capacity: one write/splice never blocks on an empty pipe
_Push = Callable[[int, int, int], int]  # (pipe write end, address, length) -> bytes moved


class TwinUnavailable(RuntimeError):
    """The machine lacks something the twin needs (named in the message)."""


@dataclass(slots=True)
class TwinHost:
    """The host kernel this process runs on."""

    name: str = "linux"
    kvm_path: str = KVM_PATH

    def open_kvm(self) -> TwinKvm:
        """``open("/dev/kvm", O_RDWR|O_CLOEXEC)``, checking API version 12.

        Nothing else is required: on a kernel without guest_memfd (``KVM_CAP_GUEST_MEMFD``
        = 0) VMs on anonymous or memfd memory still work, and the guest_memfd calls fail
        with the kernel's own errno (``KVM_CREATE_GUEST_MEMFD`` is ENOTTY there: the ioctl
        falls through ``kvm_vm_ioctl`` to ``kvm_arch_vm_ioctl``).
        """
        try:
            fd = os.open(self.kvm_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TwinUnavailable(f"cannot open {self.kvm_path}: {os.strerror(e.errno or 0)}") from e
        kvm = TwinKvm(fd)
        try:
            version = kvm.get_api_version()
            if version != uapi.KVM_API_VERSION:
                raise TwinUnavailable(f"{self.kvm_path}: KVM API version {version}, need 12")
        except BaseException:
            kvm.close()
            raise
        return kvm

    def memfd_secret(self, flags: int = 0) -> TwinFile:
        """``memfd_secret(2)`` (syscall 447); ``flags`` passed through.

        The syscall takes ``unsigned int flags``: a value outside it cannot be passed and
        is EINVAL here, as any bit outside O_CLOEXEC is in the kernel.  (Passing the raw
        register instead would drop the high bits: ``syscall(447, 1 << 32)`` reaches the
        kernel as 0 and succeeds.)
        """
        what = f"memfd_secret({flags:#x})"
        if not 0 <= flags <= 0xFFFF_FFFF:
            raise api.KernelError(errno.EINVAL, what)
        fd = _sys.syscall(uapi.SYS_memfd_secret, flags, what=what)
        return TwinFile(fd, "memfd_secret")

    def memfd_create(self, name: str = "gmemlab") -> TwinFile:
        """``memfd_create(2)`` with ``MFD_CLOEXEC``."""
        with _sys.kernel_call("memfd_create"):
            return TwinFile(os.memfd_create(name, os.MFD_CLOEXEC), "memfd")

    def mmap_anonymous(self, length: int, *, prot: int = uapi.PROT_RW, populate: bool = False,
                       fixed: api.Mapping | None = None) -> TwinMapping:
        """``mmap(2)`` ``MAP_PRIVATE|MAP_ANONYMOUS`` (read/write: accessed in process)."""
        return map_memory(length, -1, 0, shared=False, prot=prot, populate=populate,
                          fixed=fixed, what="anonymous")

    def meminfo(self) -> api.DirectMapCounters:
        """``DirectMap4k/2M/1G`` from ``/proc/meminfo`` (kB; 0 when a line is absent)."""
        return read_direct_map()

    def maps(self, mapping: api.Mapping) -> list[api.MapsEntry]:
        """The ``/proc/self/smaps`` entries of the VMAs in the mapping's range."""
        return read_smaps(mapping.addr, mapping.addr + mapping.length)

    def sendfile(self, out: api.MemFile, in_: api.MemFile, count: int,
                 offset: int | None = None) -> int:
        """``sendfile(2)`` from ``in_`` (at its position, or at ``offset``) to ``out``."""
        with _sys.kernel_call("sendfile"):
            return os.sendfile(out.fileno(), in_.fileno(), offset, count)

    def splice_to_pipe(self, file: api.MemFile, count: int, offset: int | None = None) -> bytes:
        """``splice(2)`` from the file into a fresh pipe (at most its 64 KiB); what arrived."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            with _sys.kernel_call("splice"):
                n = os.splice(file.fileno(), wfd, min(count, _CHUNK), offset_src=offset)
            return _read_exactly(rfd, n)
        finally:
            os.close(rfd)
            os.close(wfd)

    def splice_from_pipe(self, file: api.MemFile, data: bytes, offset: int | None = None) -> int:
        """``splice(2)`` of ``data`` (first written to a fresh pipe, at most 64 KiB) into the file."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            data = data[:_CHUNK]
            written = os.write(wfd, data) if data else 0
            with _sys.kernel_call("splice"):
                return os.splice(rfd, file.fileno(), written, offset_dst=offset)
        finally:
            os.close(rfd)
            os.close(wfd)

    # --- kernel paths that reach user memory ----------------------------------------------
    def pipe_write_from(self, mapping: api.Mapping, offset: int, length: int) -> int:
        """``write(2)`` of the range into a pipe (``copy_from_user``, no GUP); bytes written."""
        start = _span(mapping, offset, length)
        return _through_pipe(
            lambda w, a, n: _sys.write_from(w, a, n, "write(pipe) from mapping"), start, length
        )

    def proc_mem_read(self, mapping: api.Mapping, offset: int, length: int) -> bytes:
        """``pread(2)`` of ``/proc/self/mem`` at the range (GUP with ``FOLL_FORCE``)."""
        start = _span(mapping, offset, length)
        with _sys.kernel_call("pread(/proc/self/mem)"):
            fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.pread(fd, length, start)
            finally:
                os.close(fd)

    def process_vm_readv(self, mapping: api.Mapping, offset: int, length: int) -> bytes:
        """``process_vm_readv(2)`` of the range, issued by a forked child on this process."""
        start = _span(mapping, offset, length)
        parent = os.getpid()
        return run_in_child(lambda _: _sys.process_vm_readv(parent, start, length), "process_vm_readv")

    def vmsplice(self, mapping: api.Mapping, offset: int, length: int) -> int:
        """``vmsplice(2)`` of the range into a pipe (GUP).  Returns bytes spliced."""
        start = _span(mapping, offset, length)
        return _through_pipe(lambda w, a, n: _sys.vmsplice(w, a, n), start, length)

    def odirect_read_into(self, mapping: api.Mapping, offset: int, length: int) -> int:
        """``pread(2)`` from an ``O_DIRECT`` file into the range (GUP of the target pages).

        The file holds ``length`` bytes of :data:`ODIRECT_FILE_BYTE`.  ``offset``
        and ``length`` must be page-aligned (O_DIRECT alignment).  The file lives
        in :func:`odirect_dir`.  Returns bytes read.
        """
        start = _span(mapping, offset, length)
        if (start | length) % uapi.PAGE_SIZE:
            raise ValueError("O_DIRECT needs a page-aligned buffer and length")
        with tempfile.NamedTemporaryFile(dir=odirect_dir(), prefix="gmemlab-odirect-") as f:
            f.write(bytes([ODIRECT_FILE_BYTE]) * length)
            f.flush()
            os.fsync(f.fileno())
            with _sys.kernel_call("open(O_DIRECT)"):
                fd = os.open(f.name, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            try:
                return _sys.pread_into(fd, start, length, 0, "pread(O_DIRECT) into mapping")
            finally:
                os.close(fd)


def _span(mapping: api.Mapping, offset: int, length: int) -> int:
    if offset < 0 or length <= 0 or offset + length > mapping.length:
        raise ValueError(f"[{offset:#x}, +{length:#x}) outside the {mapping.length:#x}-byte mapping")
    return mapping.addr + offset


def _through_pipe(push: _Push, start: int, length: int) -> int:
    """Feed [start, start+length) into a fresh pipe chunk by chunk, draining after each.

    Like one big syscall, a short transfer ends the loop and its count is returned.
    """
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        done = 0
        while done < length:
            want = min(_CHUNK, length - done)
            moved = push(wfd, start + done, want)
            done += moved
            unread = moved
            while unread:
                unread -= len(os.read(rfd, unread))
            if moved < want:
                break
        return done
    finally:
        os.close(rfd)
        os.close(wfd)


def _read_exactly(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += os.read(fd, n - len(out))
    return out


# The VmFlags mnemonics (show_smap_vma_flags()) the model keeps; the others (sd, ac, hg...)
# depend on the kernel's config and are left out of the comparison.
MODELLED_VM_FLAGS = ("rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "lo", "dd")


def read_smaps(start: int, end: int, path: str = "/proc/self/smaps") -> list[api.MapsEntry]:
    """Parse the smaps entries of the VMAs overlapping [start, end): the maps line
    (``start-end perms offset dev inode path``), ``Rss`` and ``VmFlags``."""
    out: list[api.MapsEntry] = []
    head: list[str] | None = None
    rss = 0
    with open(path) as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                head, rss = None, 0
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo < end and hi > start:
                    head = line.rstrip("\n").split(None, 5)
            elif head is not None and fields[0] == "Rss:":
                rss = int(fields[1])
            elif head is not None and fields[0] == "VmFlags:":
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                flags = tuple(x for x in MODELLED_VM_FLAGS if x in fields[1:])
                out.append(api.MapsEntry(lo, hi, head[1], int(head[2], 16),
                                         head[5] if len(head) > 5 else "", rss, flags))
                head = None
    return out


def read_direct_map(path: str = "/proc/meminfo") -> api.DirectMapCounters:
    """Parse the ``DirectMap4k/2M/1G`` lines of a meminfo file (kB)."""
    values = {"DirectMap4k": 0, "DirectMap2M": 0, "DirectMap1G": 0}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    return api.DirectMapCounters(values["DirectMap4k"], values["DirectMap2M"], values["DirectMap1G"])


@functools.cache
def odirect_dir() -> str:
    """A directory on a filesystem with real ``O_DIRECT`` (GUP on the user buffer).

    Tries ``$GMEMLAB_ODIRECT_DIR``, the temp dir, ``/var/tmp``, the working
    directory and ``$HOME``; raises :class:`TwinUnavailable` naming why each failed.
    """
    candidates = [os.environ.get(ODIRECT_DIR_ENV), tempfile.gettempdir(), "/var/tmp", os.getcwd()]
    candidates.append(os.path.expanduser("~"))
    reasons = []
    for d in dict.fromkeys(c for c in candidates if c):
        reason = _odirect_problem(d)
        if reason is None:
            return d
        reasons.append(f"{d}: {reason}")
    raise TwinUnavailable(
        f"no directory with real O_DIRECT support ({'; '.join(reasons)}); set {ODIRECT_DIR_ENV}"
    )


def _odirect_problem(directory: str) -> str | None:
    try:
        magic = _sys.statfs_type(directory)
        if magic in _FAKE_ODIRECT_MAGICS:
            return f"{_FAKE_ODIRECT_MAGICS[magic]} (O_DIRECT without GUP)"
        with tempfile.NamedTemporaryFile(dir=directory, prefix="gmemlab-probe-") as f:
            fd = os.open(f.name, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            os.close(fd)
    except OSError as e:
        return os.strerror(e.errno or 0)
    return None
