"""The VMM calls on the real kernel (issue 12 item 3): the twin's own mechanics, and bad
arguments that must get the same errno from the kernel and from the model.

Everything here runs on memfd, memfd_secret and anonymous memory, so any Linux host can run
it; the conformance cases (``gmemlab.conformance.vmm``) cover the outcomes themselves.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gmemlab import api, uapi
from gmemlab.twin.host import read_smaps
from gmemlab.twin.memory import TwinMapping
from gmemlab.uapi import PAGE_SIZE
from tests.conftest import model_host

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the twin needs Linux")

P = PAGE_SIZE
Call = Callable[[api.Host], object]


def twin_host() -> api.Host:
    from gmemlab import twin

    return twin.TwinHost()


def on_anon(fn: Callable[[api.Mapping], object]) -> Call:
    def call(h: api.Host) -> object:
        with h.mmap_anonymous(2 * P) as m:
            return fn(m)
    return call


def on_memfd(fn: Callable[[api.MemFile], object]) -> Call:
    def call(h: api.Host) -> object:
        with h.memfd_create() as f:
            f.ftruncate(P)
            return fn(f)
    return call


def on_secret(fn: Callable[[api.Host, api.MemFile], object]) -> Call:
    def call(h: api.Host) -> object:
        with h.memfd_secret() as f:
            f.ftruncate(P)
            return fn(h, f)
    return call


CASES: dict[str, tuple[Call, int]] = {
    "madvise unknown advice": (on_anon(lambda m: m.madvise(0x7777)), errno.EINVAL),
    "madvise unaligned": (on_anon(lambda m: m.madvise(uapi.MADV_DONTNEED, 5, P)), errno.EINVAL),
    "madvise REMOVE anonymous": (on_anon(lambda m: m.madvise(uapi.MADV_REMOVE)), errno.EINVAL),
    "mprotect PROT bit 0x10": (on_anon(lambda m: m.mprotect(0x10)), errno.EINVAL),
    "mprotect unaligned": (on_anon(lambda m: m.mprotect(uapi.PROT_READ, 1, P)), errno.EINVAL),
    "mprotect GROWSDOWN": (on_anon(lambda m: m.mprotect(uapi.PROT_GROWSDOWN | 1)), errno.EINVAL),
    "mprotect GROWSUP": (on_anon(lambda m: m.mprotect(uapi.PROT_GROWSUP | 1)), errno.EINVAL),
    "mprotect GROWS both": (on_anon(lambda m: m.mprotect(
        uapi.PROT_GROWSDOWN | uapi.PROT_GROWSUP | 1)), errno.EINVAL),
    "fcntl unknown command": (on_memfd(lambda f: f.fcntl(0x7777)), errno.EINVAL),
    "F_SETFL O_DIRECT": (on_memfd(lambda f: f.fcntl(uapi.F_SETFL, uapi.O_DIRECT)), errno.EINVAL),
    "F_ADD_SEALS unsealable memfd": (on_memfd(lambda f: f.fcntl(uapi.F_ADD_SEALS, 4)), errno.EPERM),
    "dup minfd 2^31": (on_memfd(lambda f: f.dup(1 << 31)), errno.EINVAL),
    "KVM_RUN on a memfd": (on_memfd(lambda f: f.ioctl(uapi.KVM_RUN)), errno.ENOTTY),
    "reopen memfd_secret": (on_secret(lambda h, f: f.reopen()), errno.ENXIO),
    "fsync memfd_secret": (on_secret(lambda h, f: f.fsync()), errno.EINVAL),
    "mmap memfd_secret PROT_EXEC": (on_secret(lambda h, f: f.mmap(P, prot=5)), errno.EPERM),
    "sendfile from memfd_secret": (on_secret(lambda h, f: h.sendfile(f, f, P)), errno.EINVAL),
    "sendfile memfd_secret at 0": (on_secret(lambda h, f: h.sendfile(f, f, P, 0)), errno.ESPIPE),
    "splice memfd_secret at 0": (on_secret(lambda h, f: h.splice_to_pipe(f, P, 0)), errno.EINVAL),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_vmm_call_same_errno_on_both(case: str) -> None:
    call, err = CASES[case]
    for host in (twin_host(), model_host("base", "x86_64-kvm_pvm-6.18")):
        with pytest.raises(api.KernelError) as e:
            call(host)
        assert e.value.errno == err, f"{host.name}: {e.value}"


def test_prot_sem_is_accepted_and_changes_nothing_on_both() -> None:
    """x86 keeps the generic arch_validate_prot(): PROT_SEM is a valid bit with no effect."""
    for host in (twin_host(), model_host("base", "x86_64-kvm_pvm-6.18")):
        with host.mmap_anonymous(P) as m:
            m.mprotect(uapi.PROT_SEM | uapi.PROT_READ)
            with pytest.raises(api.SigSegv):
                m.write(0, b"x")


def test_a_sigsegv_is_taken_in_a_child() -> None:
    """A PROT_NONE or read-only access would kill the interpreter: the twin makes it in a
    forked child and reports SigSegv at the address, and this process goes on."""
    h = twin_host()
    with h.mmap_anonymous(2 * P) as m:
        m.fill(0, 2 * P, 3)
        m.mprotect(uapi.PROT_READ, P, P)
        with pytest.raises(api.SigSegv) as e:
            m.fill(0, 2 * P, 4)
        assert e.value.addr == m.addr + P
        assert m.read(0, 2 * P) == b"\x04" * P + b"\x03" * P  # the first page did change
        m.mprotect(uapi.PROT_NONE)
        with pytest.raises(api.SigSegv):
            m.read(0, 1)


def test_a_private_mapping_keeps_a_store_made_through_a_child() -> None:
    """A store to a MAP_PRIVATE mapping lands in this process's copy (the child's copy-on-
    write page would be lost with the child), and never in the file."""
    h = twin_host()
    with h.memfd_create() as f:
        f.ftruncate(P)
        with f.mmap(P, shared=False) as priv, f.mmap(P) as shared:
            priv.write(0, b"\x66")
            assert priv.read(0, 1) == b"\x66"
            assert shared.read(0, 1) == b"\x00"


def test_map_fixed_sends_the_displaced_mapping_to_a_child() -> None:
    h = twin_host()
    with h.mmap_anonymous(2 * P) as a, h.memfd_create() as f:
        assert isinstance(a, TwinMapping) and not a.may_sigbus
        f.ftruncate(P)
        f.mmap(P, fixed=a)
        assert a.may_sigbus
        assert a.read(0, 1) == b"\x00" and a.read(P, 1) == b"\x00"


def test_reopen_decides_close_on_exec_from_its_flags() -> None:
    """os.open() would add O_CLOEXEC by itself (PEP 446); the twin leaves it to the flags."""
    h = twin_host()
    with h.memfd_create() as f:
        with f.reopen() as g:
            assert g.fcntl(uapi.F_GETFD) == 0
        with f.reopen(os.O_RDWR | uapi.O_CLOEXEC) as g:
            assert g.fcntl(uapi.F_GETFD) == uapi.FD_CLOEXEC


SMAPS = """\
7f0000000000-7f0000002000 rw-s 00001000 00:01 2049                       /memfd:gmemlab (deleted)
Size:                  8 kB
Rss:                   4 kB
VmFlags: rd wr sh mr mw me ms sd
7f0000002000-7f0000003000 ---p 00000000 00:00 0
Size:                  4 kB
Rss:                   0 kB
THPeligible:           0
VmFlags: mr mw me ac
7f0000003000-7f0000004000 r--p 00000000 00:00 0
Rss:                   4 kB
VmFlags: rd mr mw me
"""


def test_smaps_parser(tmp_path: Path) -> None:
    path = tmp_path / "smaps"
    path.write_text(SMAPS)
    got = read_smaps(0x7F0000001000, 0x7F0000003000, str(path))
    assert got == [
        api.MapsEntry(0x7F0000000000, 0x7F0000002000, "rw-s", 0x1000, "/memfd:gmemlab (deleted)", 4,
                      ("rd", "wr", "sh", "mr", "mw", "me", "ms")),
        api.MapsEntry(0x7F0000002000, 0x7F0000003000, "---p", 0, "", 0, ("mr", "mw", "me")),
    ]
