"""Every conformance case on the twin, against what this kernel (6.18, kvm_pvm) answers.

The expectations are ``gmemlab.conformance.recorded`` (what this kernel answered
when they were recorded); cases with NO_DIRECT_MAP are skipped where the kernel
does not offer the flag, and cases that need guest_memfd where it has none (the
rest are then held to what such a kernel answered).
"""

from __future__ import annotations

import errno

import pytest

from gmemlab import twin, uapi
from gmemlab.api import KernelError
from gmemlab.conformance import CASES, Unsupported, run_case
from gmemlab.conformance.cases import NDM
from gmemlab.conformance.recorded import EXPECTED, base_name, expected


def test_every_case_has_an_expectation() -> None:
    assert {base_name(n) for n in CASES} == set(EXPECTED)


def test_cases_are_tagged() -> None:
    gup = [c for c in CASES.values() if c.direct_map_dependent and c.gmem_flags]
    assert gup and all(".guest_memfd[" in c.name for c in gup)
    assert all(c.gmem_flags is None or c.gmem_flags & ~0b111 == 0 for c in CASES.values())
    assert any(c.gmem_flags is not None and c.gmem_flags & NDM for c in CASES.values())
    assert uapi.GUEST_MEMFD_FLAG_NO_DIRECT_MAP == NDM


@pytest.mark.parametrize("name", list(CASES))
def test_case(name: str, host: twin.TwinHost) -> None:
    c = CASES[name]
    gmem, reason = twin.guest_memfd_available()
    if c.needs_guest_memfd and not gmem:
        pytest.skip(reason)
    try:
        outcome = run_case(c, host)
    except Unsupported as e:
        pytest.skip(str(e))
    assert outcome == expected(c, guest_memfd=gmem)


def test_without_guest_memfd_the_kernel_says_enotty(host: twin.TwinHost) -> None:
    """KVM_CREATE_GUEST_MEMFD on a kernel without guest_memfd: the kernel's ENOTTY, unchanged."""
    if twin.guest_memfd_available()[0]:
        pytest.skip("this kernel has guest_memfd")
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(KernelError) as e:
            vm.create_guest_memfd(4096, 0)
        assert e.value.errno == errno.ENOTTY
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 0


def test_outcomes_are_deterministic(host: twin.TwinHost) -> None:
    if not twin.guest_memfd_available()[0]:
        pytest.skip(twin.guest_memfd_available()[1])
    for name in ("fault.overflow[MMAP|INIT_SHARED]", "guest.release_while_bound[MMAP]"):
        assert run_case(CASES[name], host) == run_case(CASES[name], host)
