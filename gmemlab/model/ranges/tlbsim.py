"""Kernel accesses and kernel TLB flushes of a batch, as the per-page paths make them.

The per-page paths touch the TLBs in two patterns:

* *access then flush* (a v12 fault: ``clear_page()`` on the faulting CPU, then
  ``folio_zap_direct_map()``'s ``flush_tlb_kernel_range(p, p + 1)`` on every
  CPU), on frames whose 2M region is already split.  Page by page, the access
  hits or fills ``(4K, p)`` and the flush drops it again, on every CPU that has
  it.  As long as the faulting CPU's TLB is below capacity (so the fill evicts
  nothing) and no 2M/1G entry covers these regions (a split flushed them all
  and a split region cannot be filled at 2M or 1G again), the net effect is
  that each ``(4K, p)`` leaves every TLB, whatever the order: that is
  :func:`access_flush`, vectorised.
* *access only* (zeroing without a zap, ``init_on_free``): entries accumulate in
  LRU order with evictions at capacity, which depends on the order; that is
  :func:`access_seq`, page by page through :class:`Tlbs` itself, except that the
  pages following one inside the same large entry hit it where it already is
  (the LRU tail).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.mm.direct_map import LEVEL_1G, LEVEL_2M, LEVEL_4K, LEVEL_NAMES, LEVEL_PAGES

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

_HIT = {lv: "hit " + name for lv, name in LEVEL_NAMES.items()}
_FILL = {lv: "fill " + name for lv, name in LEVEL_NAMES.items()}
HIT_4K, FILL_4K = _HIT[LEVEL_4K], _FILL[LEVEL_4K]


def _cached(m: Machine, cpu: int, level: int) -> NDArray[np.int64]:
    t = m.tlb.entries[cpu]
    return np.fromiter((b for lv, b in t if lv == level), np.int64)


def can_access_flush(m: Machine, cpu: int, pfns: NDArray[np.int64]) -> bool:
    """Do :func:`access_flush`'s conditions on the TLBs hold (the direct map is the caller's)?"""
    tlbs = m.tlb
    if len(tlbs.entries[cpu]) >= tlbs.capacity:
        return False
    return not large_cached(m, pfns)


def large_cached(m: Machine, pfns: NDArray[np.int64]) -> bool:
    """Does any CPU cache a 2M or 1G translation covering one of ``pfns``?"""
    for cpu in range(m.tlb.ncpus):
        r2 = _cached(m, cpu, LEVEL_2M)
        r1 = _cached(m, cpu, LEVEL_1G)
        if len(r2) and np.isin(pfns & ~511, r2).any():
            return True
        if len(r1) and np.isin(pfns & ~0x3FFFF, r1).any():
            return True
    return False


def _drop_4k(m: Machine, cpu: int, pfns: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Drop ``(4K, p)`` from ``cpu``'s TLB for each of ``pfns``; which ones it had."""
    cached = _cached(m, cpu, LEVEL_4K)
    if not len(cached):
        return np.zeros(len(pfns), np.bool_)
    had = np.isin(pfns, cached)
    t = m.tlb.entries[cpu]
    for p in pfns[had].tolist():
        del t[(LEVEL_4K, p)]
    return had


def access_flush(m: Machine, cpu: int, pfns: NDArray[np.int64]
                 ) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """Each of ``pfns`` accessed on ``cpu``, then flushed page by page on every CPU.

    Needs :func:`can_access_flush` and present 4K entries for ``pfns``.  Returns
    whether each access hit the TLB (else it filled it) and how many entries
    each flush dropped (the access's own, plus the other CPUs' copies).
    """
    hit = _drop_4k(m, cpu, pfns)
    dropped = np.ones(len(pfns), np.int64)
    for c in range(m.tlb.ncpus):
        if c != cpu:
            dropped += _drop_4k(m, c, pfns)
    return hit, dropped


def flush_only(m: Machine, pfns: NDArray[np.int64]) -> NDArray[np.int64]:
    """Each of ``pfns`` flushed page by page on every CPU; the entries each flush dropped.

    Needs no 2M/1G entry covering ``pfns`` (:func:`large_cached`).
    """
    dropped = np.zeros(len(pfns), np.int64)
    for c in range(m.tlb.ncpus):
        dropped += _drop_4k(m, c, pfns)
    return dropped


def access(m: Machine, cpu: int, pfn: int) -> tuple[str, tuple[int, int]]:
    """``kernel_access()``'s TLB lookup or fill for a present ``pfn``: its detail and the entry."""
    tlbs = m.tlb
    key = tlbs.lookup(cpu, pfn)
    if key is not None:
        return _HIT[key[0]], key
    leaf = m.dmap.leaf(pfn)
    assert leaf is not None and leaf[2], f"kernel access to a frame not present: {pfn:#x}"
    tlbs.fill(cpu, leaf[0], leaf[1])
    return _FILL[leaf[0]], (leaf[0], leaf[1])


def flush_all(m: Machine) -> int:
    """``flush_tlb_all()`` on every CPU; the entries it dropped."""
    dropped = 0
    for cpu in range(m.tlb.ncpus):
        dropped += m.tlb.invalidate_all(cpu)
    return dropped


def access_seq(m: Machine, cpu: int, pfns: NDArray[np.int64]) -> list[str]:
    """``kernel_access()`` on ``cpu`` to each of ``pfns`` in turn (all present in the direct map).

    Returns each access's TLB detail (``"hit 2M"``, ``"fill 4K"``...).
    """
    if _fresh_4k(m, cpu, pfns):
        _fill_4k(m, cpu, pfns)
        return [FILL_4K] * len(pfns)
    t = m.tlb.entries[cpu]
    out: list[str] = []
    pl = pfns.tolist()
    n = len(pl)
    i = 0
    while i < n:
        detail, key = access(m, cpu, pl[i])
        out.append(detail)
        i += 1
        level, base = key
        if level == LEVEL_4K:
            continue
        # Within the same large entry the next lookups find it first, already at the LRU
        # tail, unless a smaller entry sits before it in the lookup order.
        end = base + LEVEL_PAGES[level]
        while i < n and base <= pl[i] < end and (LEVEL_4K, pl[i]) not in t and (
                level == LEVEL_2M or (LEVEL_2M, pl[i] & ~511) not in t):
            out.append(_HIT[level])
            i += 1
    return out


def _fresh_4k(m: Machine, cpu: int, pfns: NDArray[np.int64]) -> bool:
    """Are ``pfns`` distinct, each under a present 4K leaf, and none cached on ``cpu``?  Then
    each access misses and fills its own entry, whatever the order."""
    if len(pfns) < 64:
        return False  # not worth the checks
    level, present = m.dmap.lookup_many(pfns)
    if not ((level == LEVEL_4K) & present).all() or len(np.unique(pfns)) != len(pfns):
        return False
    for lv, mask in ((LEVEL_4K, -1), (LEVEL_2M, ~511), (LEVEL_1G, ~0x3FFFF)):
        cached = _cached(m, cpu, lv)
        if len(cached) and np.isin(pfns & mask, cached).any():
            return False
    return True


def _fill_4k(m: Machine, cpu: int, pfns: NDArray[np.int64]) -> None:
    """What filling ``(4K, p)`` for each of ``pfns`` in turn leaves (:func:`_fresh_4k`): the
    new entries at the LRU tail, the oldest evicted down to capacity."""
    tlbs = m.tlb
    t = tlbs.entries[cpu]
    t.update(dict.fromkeys((LEVEL_4K, p) for p in pfns[-tlbs.capacity:].tolist()))
    for _ in range(len(t) - tlbs.capacity):
        t.popitem(last=False)
