"""The page allocator (``mm/page_alloc.c``), order 0 only.

A freed frame goes to the head of a LIFO list and is handed out first, as the
per-CPU page lists do: after a punch-hole the next fault may get the very same
frame back (``modeling-notes.md``).  Beyond the freed frames, never-used RAM is
handed out in ascending order, ZONE_NORMAL (above 4 GiB) before ZONE_DMA32.

``prep_new_page()`` zeroes through the direct map for ``__GFP_ZERO`` or
``init_on_alloc``; ``free_pages_prepare()`` zeroes for ``init_on_free``.  Both
are kernel writes through the direct map: a frame returned while still zapped
oopses there, the crash reported on v7 (``clear_page_erms`` from
``get_page_from_freelist``).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from errno import ENOMEM
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.mm.memmap import (
    FRAME_ALLOCATED,
    FRAME_FREE,
    KIND_KERNEL,
    KIND_NAMES,
    MemMap,
    PG_large,
)
from gmemlab.model.mm.tlb import kernel_access
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD, PMD_ORDER

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

GFP_KERNEL = 1 << 0
GFP_HIGHUSER = 1 << 1
__GFP_ZERO = 1 << 8
GFP_HIGHUSER_ZERO = GFP_HIGHUSER | __GFP_ZERO

_KIND_BY_NAME = {v: k for k, v in KIND_NAMES.items()}
_NORMAL_START = 1 << 20  # pfn of 4 GiB
_RESERVED_END = 0x100  # pfn of 1 MiB


class PageAllocator:
    """Which frames are free (state only; the kernel paths are the functions below).

    The freed frames are one LIFO stack, kept as runs of consecutive frames (a
    punch-hole of a file faulted in order frees runs of thousands): ``_runs``
    holds (first, last) pairs, bottom to top, and a run hands out ``last``
    first, stepping towards ``first``, exactly as the frames would come off a
    stack they were pushed on one by one.  So freeing a 32 GiB half costs
    bytes, not 8 bytes a frame.
    """

    __slots__ = ("_cursor", "_ranges", "_runs", "nr_free")

    def __init__(self, mem: MemMap, ram: Iterable[tuple[int, int]]) -> None:
        # x86 reserves the first 1 MiB at boot (reserve_real_mode & co.): RAM, in the
        # direct map, owned by the kernel, never handed out.
        ranges = []
        for lo, hi in ram:
            if lo < _RESERVED_END:
                mem.state[lo : min(hi, _RESERVED_END)] = bytes((FRAME_ALLOCATED,)) * (
                    min(hi, _RESERVED_END) - lo)
                mem.kind[lo : min(hi, _RESERVED_END)] = bytes((KIND_KERNEL,)) * (
                    min(hi, _RESERVED_END) - lo)
                lo = _RESERVED_END
            if lo < hi:
                ranges.append((lo, hi))
        ranges.sort(key=lambda r: (r[0] < _NORMAL_START, r[0]))
        self._ranges = [list(r) for r in ranges]  # [next never-used pfn, end]
        self._cursor = 0
        self._runs = array("q")
        self.nr_free = 0
        for lo, hi in ranges:
            mem.state[lo:hi] = bytes((FRAME_FREE,)) * (hi - lo)
            self.nr_free += hi - lo

    @property
    def nr_runs(self) -> int:
        """How many runs the freed frames are kept in."""
        return len(self._runs) // 2

    def freed_stack(self) -> list[int]:
        """The freed frames, bottom of the stack first (the last one is handed out next)."""
        runs = self._runs
        out: list[int] = []
        for i in range(0, len(runs), 2):
            first, last = runs[i], runs[i + 1]
            out.extend(range(first, last + 1) if last >= first else range(first, last - 1, -1))
        return out

    def take(self) -> int | None:
        runs = self._runs
        if runs:
            self.nr_free -= 1
            first, last = runs[-2], runs[-1]
            if first == last:
                del runs[-2:]
            else:
                runs[-1] = last - 1 if last > first else last + 1
            return last
        while self._cursor < len(self._ranges):
            r = self._ranges[self._cursor]
            if r[0] < r[1]:
                pfn = r[0]
                r[0] += 1
                self.nr_free -= 1
                return pfn
            self._cursor += 1
        return None

    def _freed_top(self, n: int) -> list[NDArray[np.int64]]:
        """Up to ``n`` freed frames from the top of the stack down, as arrays, one per run."""
        runs = self._runs
        parts: list[NDArray[np.int64]] = []
        got, i = 0, len(runs)
        while got < n and i:
            first, last = runs[i - 2], runs[i - 1]
            step = 1 if first >= last else -1  # from last back towards first
            k = min(n - got, abs(last - first) + 1)
            parts.append(np.arange(last, last + step * k, step, dtype=np.int64))
            got += k
            i -= 2
        return parts

    def take_many(self, n: int) -> NDArray[np.int64]:
        """Up to ``n`` frames in the order :meth:`take` would give them (bulk paths)."""
        out = self.peek(n)
        runs = self._runs
        left = len(out)
        while left and runs:  # off the stack: whole runs, then the last one's head
            first, last = runs[-2], runs[-1]
            size = abs(last - first) + 1
            if size <= left:
                del runs[-2:]
                left -= size
            else:
                runs[-1] = last + (left if first > last else -left)
                left = 0
        while left:  # then never-used RAM, in order
            r = self._ranges[self._cursor]
            k = min(left, r[1] - r[0])
            r[0] += k
            left -= k
            if r[0] >= r[1]:
                self._cursor += 1
        self.nr_free -= len(out)
        return out

    def peek(self, n: int) -> NDArray[np.int64]:
        """The next (up to) ``n`` frames :meth:`take` would give, without taking them."""
        parts = self._freed_top(n)
        k = sum(len(p) for p in parts)
        for lo, hi in self._ranges[self._cursor :]:
            if k >= n:
                break
            c = min(n - k, hi - lo)
            if c > 0:
                parts.append(np.arange(lo, lo + c, dtype=np.int64))
                k += c
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def give_many(self, pfns: NDArray[np.int64]) -> None:
        """:meth:`give` each of ``pfns``, in order."""
        n = len(pfns)
        if not n:
            return
        pfns = np.asarray(pfns, np.int64)
        # A run starts where the step is not +-1 or turns round (possibly a run
        # early: runs are a compact form, not a unique one).
        new = np.ones(n, np.bool_)
        if n > 1:
            step = np.diff(pfns)
            new[1:] = np.abs(step) != 1
            new[2:] |= step[1:] != step[:-1]
        starts = np.flatnonzero(new)
        firsts, lasts = pfns[starts], pfns[np.r_[starts[1:], n] - 1]
        if self._continues(int(firsts[0]), int(lasts[0])):
            self._runs[-1] = int(lasts[0])
            firsts, lasts = firsts[1:], lasts[1:]
        pairs = np.empty(2 * len(firsts), np.int64)
        pairs[0::2], pairs[1::2] = firsts, lasts
        self._runs.frombytes(pairs.tobytes())
        self.nr_free += n

    def _continues(self, a: int, b: int) -> bool:
        """Whether the run ``a``..``b`` can join the run on top of the stack as one run."""
        runs = self._runs
        if not runs:
            return False
        first, last = runs[-2], runs[-1]
        d = (last > first) - (last < first) or a - last  # a single frame takes the new direction
        return (d == 1 or d == -1) and a == last + d and (a == b or (b > a) == (d > 0))

    def take_block(self, nr: int) -> int | None:
        """The first frame of a naturally aligned run of ``nr`` (a power of two) frames.

        Only never-used RAM is searched: the model keeps no buddy lists, so freed
        frames never merge back into runs.  Frames skipped to reach the alignment
        stay first in line, as a buddy allocator keeps them as smaller free blocks.
        """
        ranges = self._ranges
        for i in range(self._cursor, len(ranges)):
            lo, hi = ranges[i]
            base = -(-lo // nr) * nr
            if base + nr <= hi:
                ranges[i][1] = base
                ranges.insert(i + 1, [base + nr, hi])
                self.nr_free -= nr
                return base
        return None

    def peek_blocks(self, nr: int, k: int) -> list[int]:
        """The first frames of the next (up to) ``k`` blocks :meth:`take_block` would give,
        one after another with nothing else taken in between, without taking them."""
        out: list[int] = []
        for lo, hi in self._ranges[self._cursor :]:
            base = -(-lo // nr) * nr
            while len(out) < k and base + nr <= hi:
                out.append(base)
                base += nr  # the next call starts from the tail take_block() leaves
            if len(out) == k:
                break
        return out

    def give(self, pfn: int) -> None:
        if self._continues(pfn, pfn):
            self._runs[-1] = pfn
        else:
            self._runs.extend((pfn, pfn))
        self.nr_free += 1


def alloc_page(m: Machine, gfp: int, *, kind: str) -> KGen[int]:
    """``alloc_pages(gfp, 0)`` -> ``get_page_from_freelist()``; returns a pfn or -ENOMEM."""
    yield ("alloc", "zone")
    fn = "get_page_from_freelist"
    failed = m.faults.should_fail("page_alloc")
    pfn = None if failed else m.alloc.take()
    if pfn is None and not failed and (yield from m.design.map_unmapped_block(m)):
        pfn = m.alloc.take()
    if pfn is None:
        m.trace.emit(fn, "alloc_fail", -1, {"err": "ENOMEM"})
        return -ENOMEM
    m.mem.reset_for_alloc(pfn, _KIND_BY_NAME[kind])
    m.trace.emit(fn, "alloc_page", pfn, {"kind": kind})
    if gfp & __GFP_ZERO or m.config.init_on_alloc:
        yield from clear_page(m, pfn, "clear_page_erms")
    return pfn


def alloc_block(m: Machine, kind: int, fn: str, *, large: bool = False) -> KGen[int]:
    """``alloc_pages(gfp, 9)``: 512 naturally aligned frames, the first pfn, or -ENOMEM.

    Handed out as 512 order-0 frames, or with ``large`` (``__GFP_COMP``) as one
    PMD-order folio whose pages carry ``PG_large``.  ``post_alloc_hook()`` zeroes
    it through the direct map with ``init_on_alloc``.
    """
    yield ("alloc", "zone")
    base = None if m.faults.should_fail("page_alloc") else m.alloc.take_block(PAGES_PER_PMD)
    if base is None:
        m.trace.emit(fn, "alloc_block_fail", -1, {"order": PMD_ORDER, "err": "ENOMEM"})
        return -ENOMEM
    mem = m.mem
    for pfn in range(base, base + PAGES_PER_PMD):
        mem.reset_for_alloc(pfn, kind)
        if large:
            mem.flags[pfn] = PG_large
    m.trace.emit(fn, "alloc_block", base, {"order": PMD_ORDER, "large": large})
    if m.config.init_on_alloc:
        for pfn in range(base, base + PAGES_PER_PMD):
            yield from clear_page(m, pfn, "post_alloc_hook")
    return base


def clear_page(m: Machine, pfn: int, fn: str) -> KGen[None]:
    """``clear_page()`` / ``clear_highpage()``: zero a frame through the direct map."""
    yield from kernel_access(m, pfn, fn, write=True)
    m.mem.zero(pfn)
    m.trace.emit(fn, "zero_page", pfn)


def free_page_to_allocator(m: Machine, pfn: int) -> KGen[None]:
    """``free_unref_folios()`` / ``__free_pages()``: the frame goes back to the allocator.

    A design that keeps frames out of the direct map outside any page cache (an
    unmapped pool) takes its frames back here, as ALLOC_UNMAPPED's free lists would.
    """
    yield ("alloc", "zone")
    if (yield from m.design.free_unmapped_frame(m, pfn)):
        return
    yield from free_frame(m, pfn)


def free_frame(m: Machine, pfn: int) -> KGen[None]:
    """``free_pages_prepare()`` and the free list, for a frame nothing holds any more."""
    if m.inv.enabled:
        m.inv.on_free_to_allocator(pfn)
    if m.config.init_on_free:
        yield from clear_page(m, pfn, "free_pages_prepare")
    m.mem.mark_free(pfn)
    m.alloc.give(pfn)
    m.trace.emit("free_unref_folios", "free_page", pfn)
