"""Bad mm arguments on the real kernel and on the model: the same errno (issue 12).

These calls need no /dev/kvm (memfd, anonymous memory, memfd_secret), so they run on
any Linux host; the KVM and guest_memfd ones are in ``tests/model/test_bad_arguments.py``
and, where the kernel has guest_memfd, in the conformance cases.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

import pytest

from gmemlab import api
from gmemlab.uapi import PAGE_SIZE
from tests.conftest import model_host

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the twin needs Linux")

Call = Callable[[api.Host], object]


def memfd_mmap(length: int, offset: int) -> Call:
    def call(h: api.Host) -> object:
        with h.memfd_create() as f:
            return f.mmap(length, offset)
    return call


CASES: dict[str, tuple[Call, int]] = {
    "mmap anonymous len 0": (lambda h: h.mmap_anonymous(0), errno.EINVAL),
    "mmap anonymous 2^50": (lambda h: h.mmap_anonymous(1 << 50), errno.ENOMEM),
    "mmap anonymous 2^64-1": (lambda h: h.mmap_anonymous((1 << 64) - 1), errno.ENOMEM),
    "mmap anonymous 2^70 (size_t: 0)": (lambda h: h.mmap_anonymous(1 << 70), errno.EINVAL),
    "mmap memfd offset -4096": (memfd_mmap(PAGE_SIZE, -PAGE_SIZE), errno.EOVERFLOW),
    "mmap memfd offset 2^63": (memfd_mmap(PAGE_SIZE, 1 << 63), errno.EOVERFLOW),
    "mmap memfd offset unaligned": (memfd_mmap(PAGE_SIZE, 1), errno.EINVAL),
    "mmap memfd pgoff wraps": (memfd_mmap(2 * PAGE_SIZE, (1 << 64) - PAGE_SIZE), errno.EOVERFLOW),
}


def twin_host() -> api.Host:
    from gmemlab import twin

    return twin.TwinHost()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_mm_argument_same_errno_on_both(case: str) -> None:
    call, err = CASES[case]
    for host in (twin_host(), model_host("base", "x86_64-kvm_pvm-6.18")):
        with pytest.raises(api.KernelError) as e:
            call(host)
        assert e.value.errno == err, f"{host.name}: {e.value}"


def test_memfd_secret_flags_outside_unsigned_int_are_einval_on_both() -> None:
    """``memfd_secret(unsigned int flags)``: a value no C caller can pass is refused as
    any bit outside O_CLOEXEC is (the twin's choice, and the model's)."""
    for host in (twin_host(), model_host("base", "x86_64-kvm_pvm-6.18")):
        for flags in (1 << 32, 1 << 70, -1):
            with pytest.raises(api.KernelError) as bad:
                host.memfd_secret(flags)
            assert bad.value.errno == errno.EINVAL, f"{host.name}: {bad.value}"
