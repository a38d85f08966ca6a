"""Shared fixtures: backends that implement ``gmemlab.api``.

``model-v12``: the model running v12 on a generic x86-64 host (NO_DIRECT_MAP offered).
``model-base``: the model running mainline on the profile of our machines
(6.18 kvm_pvm: MMAP|INIT_SHARED only).
``linux``: the real kernel through the twin, where /dev/kvm offers guest_memfd.

Which ``gmemlab`` the tests import: when gmemlab is installed as a copy (``pip install .``,
as CI does), the installed copy, never the source tree, so that a file missing from the
wheel fails here.  ``python -m pytest`` puts the tree first on ``sys.path``; the tree's
entries are moved behind site-packages before gmemlab is first imported (``tests.*``
still resolves from the tree, which is appended when pytest runs from elsewhere).  With
an editable install, or none, the tree is what is tested (the run's header says which).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _in_tree(entry: str) -> bool:
    return Path(entry or ".").resolve() == ROOT


def installed_copy() -> importlib.metadata.Distribution | None:
    """The gmemlab distribution installed outside the tree as a copy; None if absent or editable."""
    elsewhere = [p for p in sys.path if not _in_tree(p)]
    for dist in importlib.metadata.distributions(name="gmemlab", path=elsewhere):
        direct_url = dist.read_text("direct_url.json")
        if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
            return None
        return dist
    return None


INSTALLED = installed_copy()
if INSTALLED is not None:  # (if gmemlab was imported earlier, the assert below says from where)
    sys.path[:] = [p for p in sys.path if not _in_tree(p)] + [p for p in sys.path if _in_tree(p)]
if not any(_in_tree(p) for p in sys.path):
    sys.path.append(str(ROOT))  # `from tests.conftest import ...` wherever pytest was started

import gmemlab  # noqa: E402  (after the sys.path decision above)

GMEMLAB_DIR = Path(gmemlab.__file__).resolve().parent
if INSTALLED is not None:
    assert Path(str(INSTALLED.locate_file("gmemlab"))).resolve() == GMEMLAB_DIR, (
        f"gmemlab is installed at {INSTALLED.locate_file('gmemlab')} but imported from {GMEMLAB_DIR}")


def pytest_report_header() -> str:
    return f"gmemlab: {GMEMLAB_DIR} ({'installed copy' if INSTALLED else 'source tree or editable'})"


def gmemlab_command() -> tuple[list[str], dict[str, str]]:
    """The command that runs the ``gmemlab`` the tests import, from any working directory,
    and the environment variables it needs.

    The console script installed next to this interpreter when it runs that gmemlab (an
    installed copy, or an editable install of this tree); else ``python -m gmemlab`` with the
    tree on ``PYTHONPATH``.
    """
    script = Path(sys.executable).parent / "gmemlab"
    if script.exists() and (INSTALLED is not None or _editable_of_this_tree()):
        return [str(script)], {}
    return [sys.executable, "-m", "gmemlab"], {"PYTHONPATH": str(GMEMLAB_DIR.parent)}


def _editable_of_this_tree() -> bool:
    for dist in importlib.metadata.distributions(name="gmemlab"):
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct_url.get("dir_info", {}).get("editable"):
            return Path(direct_url.get("url", "").removeprefix("file://")).resolve() == GMEMLAB_DIR.parent
    return False


from gmemlab import api  # noqa: E402
from gmemlab.model import Host as ModelHost  # noqa: E402
from gmemlab.model import MachineConfig  # noqa: E402

SMALL = MachineConfig(ram_gib=0, low_ram_mib=128, trace="ring", invariants="stop")


def model_host(design: str = "v12", profile: str = "x86_64", **config: object) -> ModelHost:
    """A small modelled host that stops at the first broken invariant."""
    return ModelHost(design=design, profile=profile, config=replace(SMALL, **config))  # type: ignore[arg-type]


def twin_or_skip() -> api.Host:
    try:
        from gmemlab import twin
    except ImportError as e:  # pragma: no cover - the twin ships with the project
        pytest.skip(f"twin not importable: {e}")
    ok, reason = twin.guest_memfd_available()
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
