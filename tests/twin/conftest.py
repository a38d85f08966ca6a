"""Fixtures for the twin tests: they need /dev/kvm (``host``), some guest_memfd too (``gmem_host``,
``shared_host``), else they skip with why."""

from __future__ import annotations

import pytest

from gmemlab import twin, uapi

SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


@pytest.fixture(scope="session")
def host() -> twin.TwinHost:
    ok, reason = twin.available()
    if not ok:
        pytest.skip(reason)
    return twin.TwinHost()


@pytest.fixture(scope="session")
def gmem_host(host: twin.TwinHost) -> twin.TwinHost:
    """The host, when its kernel has guest_memfd (``KVM_CAP_GUEST_MEMFD``)."""
    ok, reason = twin.guest_memfd_available()
    if not ok:
        pytest.skip(reason)
    return host


@pytest.fixture(scope="session")
def shared_host(gmem_host: twin.TwinHost) -> twin.TwinHost:
    """The host, when a default VM offers mappable, shared guest_memfd (MMAP|INIT_SHARED)."""
    host = gmem_host
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        offered = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
    if offered & SHARED != SHARED:
        pytest.skip(f"KVM_CAP_GUEST_MEMFD_FLAGS = {offered:#x}: no MMAP|INIT_SHARED")
    return host
