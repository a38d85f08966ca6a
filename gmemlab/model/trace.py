"""The structured trace of kernel steps.

Every kernel step the model takes is an event: which task on which CPU, in
which kernel function, what happened, to which PFN, and details (direct-map
level, TLB effect, error code).  People read it as lines; tools read it as
:class:`TraceEvent` tuples or JSON.

Event *counts* are always kept, whatever the recording mode, because the cost
model turns them into time.  Recording modes: ``full`` keeps every event,
``ring`` the last ``ring_size`` events (enough to show what led to a
violation), ``off`` none.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any, Literal, NamedTuple

from gmemlab.model.task import Task

TraceMode = Literal["full", "ring", "off"]

Detail = dict[str, Any] | None


class TraceEvent(NamedTuple):
    seq: int
    task: str
    cpu: int
    fn: str
    event: str
    pfn: int
    detail: Detail

    def format(self) -> str:
        pfn = f" pfn={self.pfn:#x}" if self.pfn >= 0 else ""
        det = ""
        if self.detail:
            det = " " + " ".join(f"{k}={_fmt(v)}" for k, v in self.detail.items())
        return f"#{self.seq:<6} cpu{self.cpu} {self.task:<10} {self.fn:<34} {self.event}{pfn}{det}"

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "seq": self.seq,
            "task": self.task,
            "cpu": self.cpu,
            "fn": self.fn,
            "event": self.event,
        }
        if self.pfn >= 0:
            d["pfn"] = self.pfn
        if self.detail:
            d.update({k: _jsonable(v) for k, v in self.detail.items()})
        return d


def _fmt(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 4096:
        return hex(v)
    return str(v)


def _jsonable(v: object) -> object:
    return v if isinstance(v, int | float | str | bool) or v is None else str(v)


class Trace:
    __slots__ = ("_events", "counts", "current", "mode", "ring_size", "seq")

    def __init__(self, mode: TraceMode = "ring", ring_size: int = 4096) -> None:
        if mode not in ("full", "ring", "off"):
            raise ValueError(f"unknown trace mode {mode!r} (full, ring or off)")
        self.mode: TraceMode = mode
        self.ring_size = ring_size
        self.seq = 0
        self.counts: Counter[str] = Counter()
        self.current = Task("boot", 0)
        self._events: list[TraceEvent] | deque[TraceEvent] | None
        if mode == "full":
            self._events = []
        elif mode == "ring":
            self._events = deque(maxlen=ring_size)
        else:
            self._events = None

    def emit(self, fn: str, event: str, pfn: int = -1, detail: Detail = None) -> None:
        self.counts[event] += 1
        self.seq += 1
        ev = self._events
        if ev is not None:
            cur = self.current
            ev.append(TraceEvent(self.seq, cur.name, cur.cpu, fn, event, pfn, detail))

    def count(self, event: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``event`` without recording each (bulk paths)."""
        self.counts[event] += n

    def skip(self, event: str, n: int) -> None:
        """``n`` events ``event`` happened but are not recorded: counted, and numbered.

        What :meth:`emit` does minus the record; the batched range paths use it
        for the events the mode would not keep anyway (``off``, or older than the
        ring), so counts and sequence numbers stay those of the per-page paths.
        """
        self.counts[event] += n
        self.seq += n

    def events(self) -> list[TraceEvent]:
        return list(self._events) if self._events is not None else []

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self._events or ())

    def tail(self, n: int = 40, pfn: int | None = None) -> list[TraceEvent]:
        """The last ``n`` events, or the last ``n`` that concern ``pfn``."""
        evs: Iterable[TraceEvent] = self._events or ()
        if pfn is not None:
            evs = [e for e in evs if e.pfn == pfn]
        return list(evs)[-n:]

    def format(self, events: Iterable[TraceEvent] | None = None) -> str:
        return "\n".join(e.format() for e in (self if events is None else events))
