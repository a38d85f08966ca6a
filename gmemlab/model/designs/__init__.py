"""The designs the model can run, by name.

``v12`` is the reference.  ``v9`` and ``v7`` are those versions as posted,
``noflush`` is v12 without the TLB flush (Firecracker's opt-out), ``pagecache``
is the page-cache-level design proposed after v12, and ``base`` is mainline
without the series (the kernel our machines run).  ``batch``, ``falloc``,
``zap2m`` and ``pool`` are the cost strategies discussed around the series
(flush batching, zap at fallocate, 2 MiB fault-around, an unmapped frame pool);
none was posted as code.  ``filemap`` and ``unmapped`` are the shape posted after
v12 (``docs/next-shape.md``): the page cache owns the direct map of
``AS_NO_DIRECT_MAP`` folios, zapping on insertion (slow path) or allocating them
unmapped with ALLOC_UNMAPPED and zeroing them through the mermap (fast path).
"""

from __future__ import annotations

from collections.abc import Callable

from gmemlab.model.designs.base import Design
from gmemlab.model.designs.batched import BatchedFlush
from gmemlab.model.designs.falloc import FallocRange
from gmemlab.model.designs.filemap_nodm import FilemapZap
from gmemlab.model.designs.noflush import NoFlush
from gmemlab.model.designs.pagecache import PageCache
from gmemlab.model.designs.pool import UnmappedPool
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
    "pagecache": PageCache,
    "base": Design,
    "batch": BatchedFlush,
    "falloc": FallocRange,
    "zap2m": Zap2M,
    "pool": UnmappedPool,
    "filemap": FilemapZap,
    "unmapped": UnmappedAlloc,
}
SERIES_DESIGNS = ("v12", "v9", "v7", "noflush", "pagecache")


class UnknownDesign(ValueError):
    pass


def get_design(design: str | Design) -> Design:
    """A design instance from its name (or the instance itself)."""
    if isinstance(design, Design):
        return design
    factory = DESIGNS.get(design)
    if factory is None:
        raise UnknownDesign(f"unknown design {design!r}; choose one of: {', '.join(DESIGNS)}")
    return factory()


__all__ = ["DESIGNS", "SERIES_DESIGNS", "Design", "UnknownDesign", "get_design"]
