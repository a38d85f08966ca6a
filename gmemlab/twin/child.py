"""Run an action that may take SIGBUS in a forked child, never in the caller.

Python cannot recover from SIGBUS raised by a load or store in C code (there is
no ``sigsetjmp``), so every host access that the kernel may answer with SIGBUS,
and every access "from another process", goes through :func:`run_in_child`.

The child inherits the caller's shared mappings, so it reads and writes the
same pages; it sends its result back over a pipe.  Before each page it touches
it stores the page's address in a word of shared anonymous memory, so a child
killed by SIGBUS is reported as :class:`gmemlab.api.SigBus` at that address, by SIGSEGV
(a protection or an unmapped address) as :class:`gmemlab.api.SigSegv`.
"""

from __future__ import annotations

import errno
import faulthandler
import mmap
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from gmemlab.api import KernelError, SigBus, SigSegv

_OK, _ERR, _CRASH = b"O", b"E", b"X"


@dataclass(slots=True, eq=False)
class Progress:
    """The address the child is about to access, readable by the parent after a crash."""

    # mmap(-1, n) is MAP_SHARED|MAP_ANONYMOUS: the child's stores reach the parent.
    _word: mmap.mmap = field(default_factory=lambda: mmap.mmap(-1, 8))

    def set(self, addr: int) -> None:
        struct.pack_into("<Q", self._word, 0, addr)

    def get(self) -> int:
        value: int = struct.unpack_from("<Q", self._word, 0)[0]
        return value

    def close(self) -> None:
        self._word.close()


def run_in_child(action: Callable[[Progress], bytes], what: str) -> bytes:
    """Run ``action`` in a forked child and return the bytes it returned.

    An ``OSError`` in the child comes back as :class:`KernelError` (same errno);
    death by SIGBUS as :class:`SigBus` at the last address the child announced.
    """
    progress = Progress()
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            _child_main(action, progress, rfd, wfd, what)
        os.close(wfd)
        wfd = -1
        reply = _read_all(rfd)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGBUS:
                raise SigBus(progress.get(), what)
            if sig == signal.SIGSEGV:
                raise SigSegv(progress.get(), what)
            raise RuntimeError(f"{what}: child killed by {signal.Signals(sig).name}")
        return _decode(reply, what)
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        progress.close()


def _child_main(
    action: Callable[[Progress], bytes], progress: Progress, rfd: int, wfd: int, what: str
) -> None:
    # The child must die of the signal itself, not of a Python-level handler.
    faulthandler.disable()
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    try:
        os.close(rfd)
        try:
            reply = _OK + action(progress)
        except OSError as e:
            where = e.what if isinstance(e, KernelError) else what
            reply = _ERR + struct.pack("<i", e.errno or errno.EIO) + where.encode()
        except BaseException as e:  # report, don't unwind into the parent's code
            reply = _CRASH + repr(e).encode()
        view = memoryview(reply)
        while view:
            view = view[os.write(wfd, view) :]
    finally:
        os._exit(0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(reply: bytes, what: str) -> bytes:
    tag, body = reply[:1], reply[1:]
    if tag == _OK:
        return body
    if tag == _ERR:
        raise KernelError(struct.unpack_from("<i", body)[0], body[4:].decode() or what)
    raise RuntimeError(f"{what}: child failed: {body.decode(errors='replace') or 'no reply'}")
