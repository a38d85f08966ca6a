"""The trace of a batch: per-page events in per-page order, or bulk counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.trace import Detail

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

DetailFn = Callable[[int], Detail]
PfnFn = Callable[[int], int]


def listed(a: NDArray[Any]) -> Callable[[int], Any]:
    """``a[i]`` as a Python value; ``a`` is converted once, when first asked.

    Details are asked for only when an event is recorded, so a batch run with
    the trace off converts nothing.
    """
    cache: list[list[Any]] = []

    def get(i: int) -> Any:
        if not cache:
            cache.append(a.tolist())
        return cache[0][i]

    return get


class Events:
    """The events each page of a batch emits, added column by column in per-page order.

    A column is one ``emit`` of the per-page path: function, event, the pages
    that reach it (all if None), the detail of page ``i`` and the frame the
    event names (the page's own unless ``pfn`` says).  :meth:`emit` replays
    them page by page (page 0's events, then page 1's, as the per-page loop
    does) as far as the trace keeps them: all in ``full`` mode, the last
    ``ring_size`` in ``ring`` mode; the others are only counted and numbered.
    """

    __slots__ = ("cols", "m", "pfns")

    def __init__(self, m: Machine, pfns: NDArray[np.int64]) -> None:
        self.m = m
        self.pfns = pfns
        self.cols: list[tuple[str, str, NDArray[np.bool_] | None, DetailFn | None, PfnFn | None]] = []

    def add(self, fn: str, event: str, where: NDArray[np.bool_] | None = None,
            detail: DetailFn | None = None, pfn: PfnFn | None = None) -> None:
        self.cols.append((fn, event, where, detail, pfn))

    def emit(self) -> None:
        trace = self.m.trace
        n = len(self.pfns)
        if not n:
            return
        first = 0  # pages [first, n) are recorded, the ones before only counted
        if trace.mode == "off":
            first = n
        elif trace.mode == "ring":
            # Only the last ring_size events can stay in the ring.
            per_page = np.zeros(n, np.int64)
            for _fn, _event, where, _detail, _pfn in self.cols:
                per_page += 1 if where is None else where
            kept = np.cumsum(per_page[::-1])
            first = n - int(np.searchsorted(kept, trace.ring_size)) - 1 if kept[-1] > trace.ring_size else 0
        if first:
            for _fn, event, where, _detail, _pfn in self.cols:
                k = first if where is None else int(np.count_nonzero(where[:first]))
                if k:
                    trace.skip(event, k)
        if first == n:
            return
        cols = [(fn, event, None if where is None else where.tolist(), detail, at)
                for fn, event, where, detail, at in self.cols]
        emit = trace.emit
        pfns = self.pfns.tolist()
        for i in range(first, n):
            pfn = pfns[i]
            for fn, event, where, detail, at in cols:
                if where is None or where[i]:
                    emit(fn, event, pfn if at is None else at(i), None if detail is None else detail(i))
