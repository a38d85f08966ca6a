"""A sparse index -> int map after ``lib/xarray.c``: 64-slot leaf nodes.

Used for the page cache (index -> pfn), user page tables (page -> pfn) and
stage-2 tables (gfn -> pfn).  Memory and range walks scale with the populated
entries, not with the size of the index space: punching one page out of a
64 GiB file, or releasing a file with few pages, touches only what exists.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

XA_CHUNK_SHIFT = 6
XA_CHUNK_SIZE = 1 << XA_CHUNK_SHIFT
_MASK = XA_CHUNK_SIZE - 1
EMPTY = -1
_EMPTY_NODE = array("q", [EMPTY]) * XA_CHUNK_SIZE


class XArray:
    __slots__ = ("_count", "_nodes", "nr")

    def __init__(self) -> None:
        self._nodes: dict[int, array] = {}  # type: ignore[type-arg]
        self._count: dict[int, int] = {}
        self.nr = 0

    def __len__(self) -> int:
        return self.nr

    def load(self, index: int) -> int:
        node = self._nodes.get(index >> XA_CHUNK_SHIFT)
        return EMPTY if node is None else node[index & _MASK]

    def store(self, index: int, value: int) -> int:
        """Store ``value`` (>= 0) at ``index``; returns the previous entry."""
        k = index >> XA_CHUNK_SHIFT
        node = self._nodes.get(k)
        if node is None:
            node = self._nodes[k] = array("q", _EMPTY_NODE)
            self._count[k] = 0
        old: int = node[index & _MASK]
        node[index & _MASK] = value
        if old == EMPTY:
            self._count[k] += 1
            self.nr += 1
        return old

    def erase(self, index: int) -> int:
        k = index >> XA_CHUNK_SHIFT
        node = self._nodes.get(k)
        if node is None:
            return EMPTY
        old: int = node[index & _MASK]
        if old != EMPTY:
            node[index & _MASK] = EMPTY
            self.nr -= 1
            self._count[k] -= 1
            if not self._count[k]:
                del self._nodes[k], self._count[k]
        return old

    def items(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """``xa_for_each_range``: (index, value) for present entries in [start, end), ascending.

        Snapshots each node before yielding from it, so callers may erase as they go.
        """
        lo_k = start >> XA_CHUNK_SHIFT
        hi_k = ((end - 1) >> XA_CHUNK_SHIFT) if end is not None else None
        if hi_k is not None and hi_k < lo_k:
            return
        nodes = self._nodes
        if hi_k is not None and hi_k - lo_k + 1 <= len(nodes):
            keys: list[int] | range = range(lo_k, hi_k + 1)
        else:
            keys = sorted(k for k in nodes if k >= lo_k and (hi_k is None or k <= hi_k))
        for k in keys:
            node = nodes.get(k)
            if node is None:
                continue
            base = k << XA_CHUNK_SHIFT
            for i, v in enumerate(node.tolist()):
                idx = base + i
                if v != EMPTY and idx >= start and (end is None or idx < end):
                    yield idx, v

    def first(self, start: int, end: int) -> int:
        """``xa_find``: the first present index in [start, end), or -1."""
        for idx, _ in self.items(start, end):
            return idx
        return -1
