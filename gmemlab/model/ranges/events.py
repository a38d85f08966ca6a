"""The trace of a batch: per-page events in per-page order, or bulk counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Burst:
    """The events one page makes in one step of its own (a 2 MiB fault-around: hundreds), as
    counts by name, and the events themselves, made only if the trace keeps them."""

    counts: dict[str, int]
    make: Callable[[], list[tuple[str, str, int, Detail]]]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Events:
    """The events each page of a batch emits, added column by column in per-page order.

    A column is one ``emit`` of the per-page path: function, event, the pages
    that reach it (all if None), the detail of page ``i`` and the frame the
    event names (the page's own unless ``pfn`` says).  :meth:`emit` replays
    them page by page (page 0's events, then page 1's, as the per-page loop
    does) as far as the trace keeps them: all in ``full`` mode, the last
    ``ring_size`` in ``ring`` mode; the others are only counted and numbered.
    """

    __slots__ = ("bursts", "cols", "m", "pfns")

    def __init__(self, m: Machine, pfns: NDArray[np.int64]) -> None:
        self.m = m
        self.pfns = pfns
        self.cols: list[tuple[str, str, NDArray[np.bool_] | None, DetailFn | None, PfnFn | None]] = []
        self.bursts: dict[int, dict[int, Burst]] = {}  # column -> page -> its burst

    def add(self, fn: str, event: str, where: NDArray[np.bool_] | None = None,
            detail: DetailFn | None = None, pfn: PfnFn | None = None) -> None:
        self.cols.append((fn, event, where, detail, pfn))

    def add_bursts(self, bursts: dict[int, Burst]) -> None:
        """A column of :class:`Burst` s: page ``i`` makes ``bursts[i]``'s events here."""
        where = np.zeros(len(self.pfns), np.bool_)
        where[list(bursts)] = True
        self.bursts[len(self.cols)] = bursts
        self.cols.append(("", "", where, None, None))

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
            for c, (_fn, _event, where, _detail, _pfn) in enumerate(self.cols):
                if c in self.bursts:
                    for i, b in self.bursts[c].items():
                        per_page[i] += b.total
                    continue
                per_page += 1 if where is None else where
            kept = np.cumsum(per_page[::-1])
            first = n - int(np.searchsorted(kept, trace.ring_size)) - 1 if kept[-1] > trace.ring_size else 0
        if first:
            for c, (_fn, event, where, _detail, _pfn) in enumerate(self.cols):
                if c in self.bursts:
                    for i, b in self.bursts[c].items():
                        if i < first:
                            for name, k in b.counts.items():
                                trace.skip(name, k)
                    continue
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
            for c, (fn, event, where, detail, at) in enumerate(cols):
                if where is None or where[i]:
                    if c in self.bursts:
                        for args in self.bursts[c][i].make():
                            emit(*args)
                        continue
                    emit(fn, event, pfn if at is None else at(i), None if detail is None else detail(i))
