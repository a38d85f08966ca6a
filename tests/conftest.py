"""Shared fixtures: backends that implement ``gmemlab.api``.

``model-v12``: the model running v12 on a generic x86-64 host (NO_DIRECT_MAP offered).
``model-base``: the model running mainline on the profile of our machines
(6.18 kvm_pvm: MMAP|INIT_SHARED only).
``linux``: the real kernel through the twin, where /dev/kvm offers guest_memfd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from gmemlab import api
from gmemlab.model import Host as ModelHost
from gmemlab.model import MachineConfig

SMALL = MachineConfig(ram_gib=0, low_ram_mib=128, trace="ring", invariants="stop")


def model_host(design: str = "v12", profile: str = "x86_64", **config: object) -> ModelHost:
    """A small modelled host that stops at the first broken invariant."""
    return ModelHost(design=design, profile=profile, config=replace(SMALL, **config))  # type: ignore[arg-type]


def twin_or_skip() -> api.Host:
    try:
        from gmemlab import twin
    except ImportError as e:  # pragma: no cover - the twin ships with the project
        pytest.skip(f"twin not importable: {e}")
    ok, reason = twin.available()
    if not ok:
        pytest.skip(reason)
    return twin.TwinHost()


BACKENDS: dict[str, Callable[[], api.Host]] = {
    "model-v12": lambda: model_host("v12", "x86_64"),
    "model-base": lambda: model_host("base", "x86_64-kvm_pvm-6.18"),
    "linux": twin_or_skip,
}


@pytest.fixture(params=list(BACKENDS))
def host(request: pytest.FixtureRequest) -> Iterator[api.Host]:
    """Each backend in turn."""
    yield BACKENDS[request.param]()


@pytest.fixture
def model() -> ModelHost:
    return model_host()


def skip_to_large_leaf(h: ModelHost) -> None:
    """Give the kernel the frames ahead of the first one inside a 2M leaf, so the next
    guest_memfd folio's zap must split the direct map."""
    from gmemlab.model.mm.direct_map import LEVEL_4K

    m = h.machine
    while True:
        pfn = m.alloc.take()
        assert pfn is not None, "no frame in a large direct-map leaf"
        leaf = m.dmap.leaf(pfn)
        if leaf is not None and leaf[0] != LEVEL_4K:
            m.alloc.give(pfn)
            return
        m.mem.reset_for_alloc(pfn, 3)  # KIND_KERNEL: the kernel keeps it


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-long", action="store_true", default=False,
                     help="run the reliability suite's long random sequences (also "
                          "GMEMLAB_RELIABILITY_LONG=1)")
