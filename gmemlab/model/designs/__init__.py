"""The designs the model can run, by name.

``v12`` is the reference.  ``v9`` and ``v7`` are those versions as posted,
``noflush`` is posted v12 with Firecracker's patch 0039 alone (the TLB flush behind
an opt-in), ``fc-6.18`` is Firecracker's kernel (v6.18 with its port of the series,
0039 and the pfncache patches), ``base`` is mainline (kvm/next) without the series,
and ``6.18`` is v6.18 without it (the kernel our machines run).  ``batch``,
``falloc`` and ``zap2m`` are the cost strategies discussed around the series
(flush batching, zap at fallocate, 2 MiB fault-around); none was posted as code.
``folio2m`` is v12 on 2 MiB guest_memfd folios (the THP guest_memfd allocation with
v11's whole-folio zap), which v12 refuses.
``filemap`` and ``unmapped`` are the shape posted after v12
(``docs/next-shape.md``): the page cache owns the direct map of
``AS_NO_DIRECT_MAP`` folios, zapping on insertion (slow path) or allocating them
unmapped with ALLOC_UNMAPPED and zeroing them through the mermap (fast path).

``pagecache`` and ``pool`` were those two ideas written before the postings; they
gave way to the posted shape (``docs/next-shape.md`` §4) and are now names that
load ``filemap`` and ``unmapped`` (:data:`ALIASES`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from gmemlab.model.designs.base import Design
from gmemlab.model.designs.batched import BatchedFlush
from gmemlab.model.designs.falloc import FallocRange
from gmemlab.model.designs.fc618 import Firecracker618
from gmemlab.model.designs.filemap_nodm import FilemapZap
from gmemlab.model.designs.folio2m import Folio2M
from gmemlab.model.designs.linux618 import Linux618
from gmemlab.model.designs.noflush import NoFlush
from gmemlab.model.designs.unmapped_alloc import UnmappedAlloc
from gmemlab.model.designs.v7 import V7
from gmemlab.model.designs.v9 import V9
from gmemlab.model.designs.v12 import V12
from gmemlab.model.designs.zap2m import Zap2M

DESIGNS: dict[str, Callable[[], Design]] = {
    "v12": V12,
    "v9": V9,
    "v7": V7,
    "noflush": NoFlush,
    "fc-6.18": Firecracker618,
    "base": Design,
    "6.18": Linux618,
    "batch": BatchedFlush,
    "falloc": FallocRange,
    "zap2m": Zap2M,
    "folio2m": Folio2M,
    "filemap": FilemapZap,
    "unmapped": UnmappedAlloc,
}
SERIES_DESIGNS = ("v12", "v9", "v7", "noflush", "fc-6.18", "filemap", "unmapped")
# Designs written from ideas before the postings, and the posted design each name now loads.
ALIASES: dict[str, str] = {"pagecache": "filemap", "pool": "unmapped"}


class UnknownDesign(ValueError):
    pass


def is_design_file(spec: str) -> bool:
    """Does ``spec`` name a user's design (``file.py``, ``file.py:Class``, ``module:Class``)?"""
    return spec.endswith(".py") or ":" in spec


def load_design(spec: str) -> type[Design]:
    """The design class a user wrote: ``path/to/file.py[:Class]`` or ``package.module:Class``.

    Without ``:Class`` the file must define exactly one :class:`Design` subclass of its own.
    """
    where, _, cls_name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UnknownDesign(f"design file {where!r}: no such file")
            name = "gmemlab_user_design_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                assert loader_spec is not None and loader_spec.loader is not None
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module  # dataclasses and inspect look modules up by name
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(where)
    except UnknownDesign:
        raise
    except Exception as e:  # the user's code: say where it failed, in one line
        raise UnknownDesign(f"design {spec!r} does not load: {type(e).__name__}: {e}") from e
    if cls_name:
        found = getattr(module, cls_name, None)
        if not (isinstance(found, type) and issubclass(found, Design)):
            raise UnknownDesign(f"design {spec!r}: {cls_name!r} is not a Design subclass in {where}")
        return found
    own = [v for v in vars(module).values()
           if isinstance(v, type) and issubclass(v, Design) and v.__module__ == module.__name__]
    if len(own) != 1:
        names = ", ".join(c.__name__ for c in own) or "none"
        raise UnknownDesign(f"design file {where!r} defines {len(own)} Design subclasses ({names}); "
                            f"name one as {where}:Class")
    return own[0]


def canonical_name(name: str) -> str:
    """The registered name ``name`` stands for: itself, or the posted design an old name gave way to."""
    return ALIASES.get(name, name)


def get_design(design: str | Design) -> Design:
    """A design instance from its name, a user's design file (:func:`load_design`), or itself."""
    if isinstance(design, Design):
        return design
    factory = DESIGNS.get(canonical_name(design))
    if factory is None and is_design_file(design):
        factory = load_design(design)
    if factory is None:
        raise UnknownDesign(f"unknown design {design!r}; choose one of: {', '.join(DESIGNS)} "
                            f"({', '.join(f'{a} loads {b}' for a, b in ALIASES.items())}), "
                            "or a design file (file.py[:Class], module:Class)")
    return factory()


__all__ = ["ALIASES", "DESIGNS", "SERIES_DESIGNS", "Design", "UnknownDesign", "canonical_name", "get_design",
           "is_design_file", "load_design"]
