"""The invariant hooks of ``gmemlab.model.invariants``, judged on many frames at once.

Each function is the vectorised condition under which the hook of the same
name could fail; the frames that meet it go through the hook itself, which
judges and reports them exactly as on the per-page paths.  The batched paths
call these at the points where the per-page paths call the hooks, with the
frames' state as it is at that point.  ``check_all`` uses them too, so a sweep
of a 64 GiB machine takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.kvm.guest_memfd import KVM_GMEM_FOLIO_NO_DIRECT_MAP
from gmemlab.model.mm.direct_map import (
    E_LEAF_NP,
    LEVEL_1G,
    LEVEL_2M,
    LEVEL_4K,
    PTE_NOT_PRESENT,
    DirectMap,
)
from gmemlab.model.mm.filemap import AS_NO_DIRECT_MAP
from gmemlab.model.mm.memmap import FRAME_ALLOCATED, KIND_KERNEL, KIND_PGTABLE, PG_locked

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine
    from gmemlab.model.ranges.events import Events

Pfns = NDArray[np.int64]


def _mapping_ids(m: Machine, want: str) -> NDArray[np.int64]:
    """ids of the registered mappings with AS_NO_DIRECT_MAP (``ndm``), or of guest_memfd ones too."""
    return np.fromiter((mid for mid, a in m.mappings.items()
                        if a.test(AS_NO_DIRECT_MAP) and (want == "ndm" or a.kind == "guest_memfd")),
                       np.int64)


def no_direct_map(m: Machine, pfns: Pfns) -> NDArray[np.bool_]:
    """``Machine.folio_no_direct_map_mapping()`` for each of ``pfns``."""
    return np.isin(m.mem.views().mapping[pfns], _mapping_ids(m, "ndm"))


def cached_anywhere(m: Machine, pfns: Pfns) -> NDArray[np.bool_]:
    """``Tlbs.cached_anywhere()`` for each of ``pfns``."""
    out = np.zeros(len(pfns), np.bool_)
    for t in m.tlb.entries:
        for level, mask in ((LEVEL_4K, -1), (LEVEL_2M, ~511), (LEVEL_1G, ~0x3FFFF)):
            bases = np.fromiter((b for lv, b in t if lv == level), np.int64)
            if len(bases):
                out |= np.isin(pfns & mask, bases)
    return out


def _report(pfns: Pfns, bad: NDArray[np.bool_], hook: object, *args: object) -> None:
    for p in pfns[bad].tolist():
        hook(p, *args)  # type: ignore[operator]


def handout_suspects(m: Machine, pfns: Pfns, cached: NDArray[np.bool_] | None = None
                     ) -> NDArray[np.bool_]:
    """Which of ``pfns`` ``Invariants.on_handout()`` could fail; ``cached``: which a CPU
    caches at their handout, if not the TLBs' state now."""
    v = m.mem.views()
    ndm = no_direct_map(m, pfns)
    bad: NDArray[np.bool_] = v.state[pfns] != FRAME_ALLOCATED
    if ndm.any():
        bad |= ndm & (m.dmap.present_many(pfns) | (cached_anywhere(m, pfns) if cached is None
                                                    else cached))
    return bad


def _in_bulk(m: Machine, name: str, hit: NDArray[np.bool_], ev: Events,
             where: NDArray[np.bool_] | None) -> bool:
    """The violations of ``name`` at the frames ``hit`` marks (of the pages ``where`` marks
    in ``ev``'s batch), as ``Invariants.fail()`` makes them once it only counts: each an
    event in its place.  False if they must go through the hook (records still kept)."""
    if not hit.any():
        return True
    if not m.inv.only_counts(name):
        return False
    m.inv.counts[name] += int(np.count_nonzero(hit))
    col = hit.copy()
    if where is not None:
        col = np.zeros(len(where), np.bool_)
        col[np.flatnonzero(where)[hit]] = True
    ev.add("invariant", m.inv.event(name), col, lambda i: {"invariant": name})
    return True


def on_handout(m: Machine, pfns: Pfns, how: str, ev: Events | None = None,
               where: NDArray[np.bool_] | None = None, cached: NDArray[np.bool_] | None = None
               ) -> None:
    """``Invariants.on_handout()`` for ``pfns`` (the pages ``where`` marks of ``ev``'s batch).

    Violations the hook would only count (``Invariants.only_counts()``) become ``ev``'s
    events, right after the mapping's own, as the hook emits them; the others go
    through the hook.  ``cached``: as for :func:`handout_suspects`.
    """
    if not m.inv.enabled or not len(pfns):
        return
    bad = handout_suspects(m, pfns, cached)
    if ev is not None and where is not None and bad.any():
        ndm = no_direct_map(m, pfns)
        free = m.mem.views().state[pfns] != FRAME_ALLOCATED
        present = m.dmap.present_many(pfns)
        for name, hit in (("no-mapping-of-free-frame", free),
                          ("handout-zapped", ~free & ndm & present),
                          ("handout-flushed", ~free & ndm & ~present & bad)):
            if _in_bulk(m, name, hit, ev, where):
                bad &= ~hit
    _report(pfns, bad, m.inv.on_handout, how)


def unlock_suspects(m: Machine, pfns: Pfns) -> NDArray[np.bool_]:
    """Which of ``pfns`` ``Invariants.on_folio_unlock()`` could fail."""
    v = m.mem.views()
    bad = np.zeros(len(pfns), np.bool_)
    if m.design.uses_marker:
        gmem = np.isin(v.mapping[pfns], _mapping_ids(m, "gmem_ndm"))
        if gmem.any():
            marked = (v.private[pfns] & KVM_GMEM_FOLIO_NO_DIRECT_MAP) != 0
            bad = gmem & (marked == m.dmap.present_many(pfns))
    return bad


def on_folio_unlock(m: Machine, pfns: Pfns, ev: Events | None = None,
                    where: NDArray[np.bool_] | None = None) -> None:
    """``Invariants.on_folio_unlock()``; with ``ev``, as :func:`on_handout` does."""
    if m.inv.enabled and len(pfns):
        bad = unlock_suspects(m, pfns)
        if ev is not None and _in_bulk(m, "marker-matches-direct-map", bad, ev, where):
            return
        _report(pfns, bad, m.inv.on_folio_unlock)


def not_present_blocks(dmap: DirectMap, block: int = 1 << 18) -> Iterator[Pfns]:
    """The frames with a not-present 4K entry, region by region as ``dmap.pte`` lists them,
    ascending within each, then those under not-present 2M and 1G leaves, in arrays of
    about ``block``."""
    parts: list[Pfns] = []
    size = 0
    for r2, ptes in dmap.pte.items():
        if PTE_NOT_PRESENT not in ptes:
            continue
        parts.append((r2 << 9) + np.flatnonzero(np.frombuffer(ptes, np.uint8) == PTE_NOT_PRESENT))
        size += len(parts[-1])
        if size >= block:
            yield np.concatenate(parts)
            parts, size = [], 0
    # Large leaves with the present bit clear (2M zaps, a pool's pageblocks): every frame.
    for level, table in ((LEVEL_2M, dmap.pmd), (LEVEL_1G, dmap.pud)):
        for leaf in np.flatnonzero(np.frombuffer(table, np.uint8) == E_LEAF_NP).tolist():
            n = 512 if level == LEVEL_2M else 1 << 18
            parts.append(np.arange(leaf * n, (leaf + 1) * n, dtype=np.int64))
            size += n
            if size >= block:
                yield np.concatenate(parts)
                parts, size = [], 0
    if parts:
        yield np.concatenate(parts)


def out_of_direct_map_suspects(m: Machine, pfns: Pfns) -> NDArray[np.bool_]:
    """Which of ``pfns`` (not present in the direct map) ``check_all()`` could report:
    free ones, and those not in a page cache of an AS_NO_DIRECT_MAP or secretmem mapping."""
    v = m.mem.views()
    allowed = np.fromiter((mid for mid, a in m.mappings.items()
                           if a.test(AS_NO_DIRECT_MAP) or a.kind == "secretmem"), np.int64)
    bad: NDArray[np.bool_] = (v.state[pfns] != FRAME_ALLOCATED) | ~np.isin(v.mapping[pfns], allowed)
    return bad


def unowned_frames(m: Machine, owned: NDArray[np.bool_]) -> Pfns:
    """The allocated frames ``check_all()`` found in no page cache or page table (``owned``
    false), other than the kernel's own (its allocations and direct-map page tables, which
    the model never frees): the suspects of a leak, ascending."""
    v = m.mem.views()
    return np.flatnonzero((v.state == FRAME_ALLOCATED) & ~owned & (v.kind != KIND_KERNEL)
                          & (v.kind != KIND_PGTABLE)).astype(np.int64)


def on_direct_map_change(m: Machine, pfns: Pfns, valid: bool) -> None:
    if not m.inv.enabled or not len(pfns):
        return
    v = m.mem.views()
    in_cache = v.mapping[pfns] != 0
    bad = in_cache & ((v.flags[pfns] & PG_locked) == 0)
    if valid:
        bad |= v.guest_owned[pfns] != 0
    else:
        bad |= in_cache & ~no_direct_map(m, pfns)
    _report(pfns, bad, m.inv.on_direct_map_change, valid)


def on_arch_prepare(m: Machine, pfns: Pfns, ev: Events | None = None,
                    where: NDArray[np.bool_] | None = None) -> None:
    """``Invariants.on_arch_prepare()``; with ``ev``, as :func:`on_handout` does."""
    if not m.inv.enabled or not len(pfns):
        return
    bad = no_direct_map(m, pfns) & m.dmap.present_many(pfns)
    if ev is not None and _in_bulk(m, "zap-before-prepare", bad, ev, where):
        return
    _report(pfns, bad, m.inv.on_arch_prepare)


def on_restore(m: Machine, pfns: Pfns, ev: Events | None = None,
               where: NDArray[np.bool_] | None = None) -> None:
    """``Invariants.on_restore()``; with ``ev``, as :func:`on_handout` does."""
    if m.inv.enabled and len(pfns):
        bad = m.mem.views().invalidated[pfns] == 0
        if ev is not None and _in_bulk(m, "invalidate-before-restore", bad, ev, where):
            return
        _report(pfns, bad, m.inv.on_restore)


def on_free_to_allocator(m: Machine, pfns: Pfns, ev: Events | None = None,
                         where: NDArray[np.bool_] | None = None) -> None:
    """``Invariants.on_free_to_allocator()``; with ``ev``, a frame whose only fault is its
    missing direct-map entry as :func:`on_handout` does."""
    if not m.inv.enabled or not len(pfns):
        return
    v = m.mem.views()
    absent = ~m.dmap.present_many(pfns)
    other = (((v.private[pfns] & KVM_GMEM_FOLIO_NO_DIRECT_MAP) != 0) | (v.mapcount[pfns] != 0)
             | (v.s2count[pfns] != 0))
    if ev is not None and _in_bulk(m, "free-frame-in-direct-map", absent & ~other, ev, where):
        absent &= other
    _report(pfns, absent | other, m.inv.on_free_to_allocator)
