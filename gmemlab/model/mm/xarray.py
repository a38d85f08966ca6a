"""A sparse index -> pfn map after ``lib/xarray.c``: 64-slot leaf nodes.

Used for the page cache (index -> pfn), user page tables (page -> pfn) and
stage-2 tables (gfn -> pfn).  Memory and range walks scale with the populated
entries, not with the size of the index space: punching one page out of a
64 GiB file, or releasing a file with few pages, touches only what exists.

Entries are 32-bit (pfns up to 8 TiB of RAM): a 64 GiB guest's page cache and
stage-2 table are two 64 MiB maps, and new memory is what a large first touch
pays most for on a nested host.  Arrays handed out are int64.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

XA_CHUNK_SHIFT = 6
XA_CHUNK_SIZE = 1 << XA_CHUNK_SHIFT
_MASK = XA_CHUNK_SIZE - 1
EMPTY = -1
_CODE, _DTYPE = "i", np.int32  # one entry
_ITEM = np.dtype(_DTYPE).itemsize
_MAX = np.iinfo(_DTYPE).max
_EMPTY_NODE = array(_CODE, [EMPTY]) * XA_CHUNK_SIZE
_EMPTY_BYTES = _EMPTY_NODE.tobytes()


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
            node = array(_CODE, _EMPTY_NODE)
            node[index & _MASK] = value  # an entry that does not fit raises before the node is in
            self._nodes[k] = node
            self._count[k] = 1
            self.nr += 1
            return EMPTY
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
        nodes = self._nodes
        for k in self._keys(start, end):
            node = nodes.get(k)
            if node is None:
                continue
            base = k << XA_CHUNK_SHIFT
            for i, v in enumerate(node.tolist()):
                idx = base + i
                if v != EMPTY and idx >= start and (end is None or idx < end):
                    yield idx, v

    def _keys(self, start: int, end: int | None) -> list[int] | range:
        """Keys of the nodes that may hold entries of [start, end), ascending.

        Walks the shorter of the key range and the populated nodes, so a range op
        costs what is populated, not the size of the index space.
        """
        lo_k = start >> XA_CHUNK_SHIFT
        hi_k = ((end - 1) >> XA_CHUNK_SHIFT) if end is not None else None
        if hi_k is not None and hi_k < lo_k:
            return []
        nodes = self._nodes
        if hi_k is not None and hi_k - lo_k + 1 <= len(nodes):
            return range(lo_k, hi_k + 1)
        return sorted(k for k in nodes if k >= lo_k and (hi_k is None or k <= hi_k))

    # --- many entries at once (the batched range paths) --------------------------------------
    # Nodes are read and written whole where possible (one bytes join or one slice per node,
    # no numpy call per node): these run once per 64 pages of a 64 GiB guest.
    def load_range(self, start: int, n: int) -> NDArray[np.int64]:
        """The entries at [start, start + n), EMPTY where absent."""
        k0 = start >> XA_CHUNK_SHIFT
        k1 = (start + n - 1) >> XA_CHUNK_SHIFT
        nodes = self._nodes
        if k1 - k0 + 1 > len(nodes):  # mostly empty: fill in the nodes that exist
            out = np.full(n, EMPTY, np.int64)
            for k in self._keys(start, start + n):
                node = nodes.get(k)
                if node is not None:
                    base = k << XA_CHUNK_SHIFT
                    lo, hi = max(start, base), min(start + n, base + XA_CHUNK_SIZE)
                    out[lo - start : hi - start] = np.frombuffer(node, _DTYPE)[lo - base : hi - base]
            return out
        buf = np.frombuffer(b"".join([nodes.get(k, _EMPTY_BYTES) for k in range(k0, k1 + 1)]), _DTYPE)
        first = start - (k0 << XA_CHUNK_SHIFT)
        return buf[first : first + n].astype(np.int64)

    def load_many(self, indices: NDArray[np.int64]) -> NDArray[np.int64]:
        """The entries at ``indices`` (ascending), EMPTY where absent."""
        if not len(indices):
            return np.zeros(0, np.int64)
        keys = indices >> XA_CHUNK_SHIFT
        starts = np.r_[True, keys[1:] != keys[:-1]]  # the first index in each node
        rank = np.cumsum(starts) - 1
        nodes = self._nodes
        buf = np.frombuffer(b"".join([nodes.get(k, _EMPTY_BYTES) for k in keys[starts].tolist()]),
                            _DTYPE)
        out: NDArray[np.int64] = buf[(rank << XA_CHUNK_SHIFT) | (indices & _MASK)].astype(np.int64)
        return out

    def store_range(self, start: int, values: NDArray[np.int64]) -> None:
        """:meth:`store` ``values[i]`` at ``start + i`` for every value that is not EMPTY."""
        nodes, count = self._nodes, self._count
        end = start + len(values)
        every = not (values == EMPTY).any()
        if len(values) and values.max() > _MAX:
            raise OverflowError(f"xarray entries are 32-bit, not {int(values.max())}")
        raw = values.astype(_DTYPE).tobytes()
        pos = start
        added = 0
        while pos < end:
            k = pos >> XA_CHUNK_SHIFT
            base = k << XA_CHUNK_SHIFT
            hi = min(end, base + XA_CHUNK_SIZE)
            node = nodes.get(k)
            if every:
                chunk = array(_CODE)
                chunk.frombytes(raw[(pos - start) * _ITEM : (hi - start) * _ITEM])
                if node is None:
                    if hi - pos == XA_CHUNK_SIZE:
                        nodes[k] = chunk
                    else:
                        node = nodes[k] = array(_CODE, _EMPTY_NODE)
                        node[pos - base : hi - base] = chunk
                    count[k] = hi - pos
                    added += hi - pos
                else:
                    new = node[pos - base : hi - base].count(EMPTY)
                    node[pos - base : hi - base] = chunk
                    count[k] += new
                    added += new
            else:
                vals = values[pos - start : hi - start]
                put = vals != EMPTY
                if put.any():
                    if node is None:
                        node = nodes[k] = array(_CODE, _EMPTY_NODE)
                        count[k] = 0
                    view = np.frombuffer(node, _DTYPE)[pos - base : hi - base]
                    new = int(np.count_nonzero(view[put] == EMPTY))
                    view[put] = vals[put]
                    count[k] += new
                    added += new
            pos = hi
        self.nr += added

    def blocks(self, start: int = 0, end: int | None = None, nodes_per_block: int = 512
               ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64]]]:
        """:meth:`items` as (indices, values) arrays, ascending, a block of nodes at a time.

        Each block is read when reached, so callers may erase what they were given.
        """
        keys = self._keys(start, end)
        nodes = self._nodes
        for b in range(0, len(keys), nodes_per_block):
            ks = [k for k in keys[b : b + nodes_per_block] if k in nodes]
            if not ks:
                continue
            buf = np.frombuffer(b"".join([nodes[k] for k in ks]), _DTYPE)
            slot = np.flatnonzero(buf != EMPTY)
            vals = buf[slot].astype(np.int64)
            idx = (np.asarray(ks, np.int64)[slot >> XA_CHUNK_SHIFT] << XA_CHUNK_SHIFT) | (slot & _MASK)
            if ks[0] << XA_CHUNK_SHIFT < start or (end is not None and (ks[-1] + 1) << XA_CHUNK_SHIFT > end):
                keep = idx >= start
                if end is not None:
                    keep &= idx < end
                idx, vals = idx[keep], vals[keep]
            yield idx, vals

    def items_range(self, start: int = 0, end: int | None = None
                    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """:meth:`items` as two arrays (indices, values), ascending."""
        parts = list(self.blocks(start, end))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def erase_indices(self, indices: NDArray[np.int64]) -> None:
        """:meth:`erase` each of ``indices`` (ascending, all present)."""
        if not len(indices):
            return
        nodes, count = self._nodes, self._count
        keys = indices >> XA_CHUNK_SHIFT
        cuts = (np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, len(indices)], strict=True):
            k = int(keys[lo])
            left = count[k] - (hi - lo)
            if left:
                np.frombuffer(nodes[k], _DTYPE)[indices[lo:hi] & _MASK] = EMPTY
                count[k] = left
            else:
                del nodes[k], count[k]
        self.nr -= len(indices)

    def first(self, start: int, end: int) -> int:
        """``xa_find``: the first present index in [start, end), or -1."""
        for idx, _ in self.items(start, end):
            return idx
        return -1
