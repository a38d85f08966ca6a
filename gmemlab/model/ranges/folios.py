"""The folio half of a guest_memfd fault, over a run of consecutive file indices.

Stands for what both fault paths do before they map the folio, page by page:
``kvm_gmem_get_folio()`` (``__filemap_get_folio(FGP_LOCK | FGP_CREAT)``: look up,
or ``alloc_page()`` + ``filemap_add_folio()``), ``zero_if_not_uptodate()``
(``clear_highpage()`` through the direct map, then ``folio_mark_uptodate()``)
and, in v12 for a NO_DIRECT_MAP inode, ``kvm_gmem_folio_zap_direct_map()``
(``set_direct_map_valid_noflush()`` on a 4K entry, ``flush_tlb_kernel_range()``,
marker).  The caller maps the folios and unlocks them.

:func:`plan` finds how many pages from the start go straight through these
steps the same way every time (:class:`FolioRun` ``.n``); :func:`run` does them.
A page that would do anything else (split a direct-map leaf, wait for a
folio lock, meet ENOMEM, hwpoison, oops, break an invariant) ends the run
before it, for the per-page path to take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.kvm.guest_memfd import kvm_gmem_no_direct_map
from gmemlab.model.mm.direct_map import LEVEL_4K
from gmemlab.model.mm.memmap import KIND_FILE, PG_hwpoison, PG_locked, PG_uptodate
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.ranges import checks, tlbsim, zaps
from gmemlab.model.ranges.events import Events

if TYPE_CHECKING:
    from gmemlab.model.fs import Inode
    from gmemlab.model.machine import Machine

Mask = NDArray[np.bool_]


@dataclass(slots=True)
class FolioRun:
    """Per page of the run: its folio and what the fault does to it (``fault`` false: nothing)."""

    inode: Inode
    index0: int
    n: int  # pages from the start that go straight through
    fault: Mask
    pfn: NDArray[np.int64]  # the folio, -1 where the page does not fault
    new: Mask  # allocated and added to the page cache
    zero: Mask  # not uptodate: cleared through the direct map
    zap: Mask  # removed from the direct map (v12, NO_DIRECT_MAP)

    def prefix(self, n: int) -> None:
        """Keep only the first ``n`` pages (``n`` <= ``self.n``)."""
        self.n = n
        for name in ("fault", "pfn", "new", "zero", "zap"):
            setattr(self, name, getattr(self, name)[:n])


def first(bad: Mask) -> int:
    """Position of the first true entry, or the length."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else len(bad)


def plan(m: Machine, inode: Inode, index0: int, fault: Mask, *, hwpoison: bool,
         prepare: bool = True) -> FolioRun:
    """What faulting the pages ``fault`` marks, of indices ``index0 + i``, would do.

    ``hwpoison``: the path refuses hwpoisoned folios (``__kvm_gmem_get_pfn()``).
    ``prepare``: the folios are zeroed and zapped as a fault does; else only looked
    up or created, and unlocked again (``kvm_gmem_allocate()``).
    """
    n = len(fault)
    mapping = inode.mapping
    v = m.mem.views()
    cached = mapping.i_pages.load_range(index0, n)
    new = fault & (cached == EMPTY)
    new_at = np.flatnonzero(new)
    fresh = m.alloc.peek(len(new_at))
    if len(fresh) < len(new_at):  # the allocator runs dry there: -ENOMEM, per page
        n = int(new_at[len(fresh)])
    pfn = np.where(fault, cached, -1)
    pfn[new_at[: len(fresh)]] = fresh
    fault, pfn, new = fault[:n], pfn[:n], new[:n]
    old = fault & ~new
    op = np.where(old, pfn, 0)
    flags = v.flags[op]
    bad = old & (((flags & PG_locked) != 0) | (v.mapping[op] != mapping.id)
                 | (v.index[op] != np.arange(index0, index0 + n)))
    if hwpoison:
        bad |= old & ((flags & PG_hwpoison) != 0)
    level, present = m.dmap.lookup_many(np.where(fault, pfn, 0))
    ndm = zaps(m) and kvm_gmem_no_direct_map(inode)
    marked = old & ((v.private[op] & 1) != 0)
    if ndm:
        bad |= marked & present  # out of step: the unlock would report it
    zero = zap = np.zeros(n, np.bool_)
    if prepare:
        zero = fault & (new | ((flags & PG_uptodate) == 0))
        bad |= zero & ~present  # clear_page() would oops
        if ndm:
            zap = fault & ~marked
            bad |= zap & ((level != LEVEL_4K) | ~present)  # a split, or nothing to clear
    elif ndm:
        bad |= fault & ~marked & ~present  # out of step at the unlock
    n = first(bad)
    run = FolioRun(inode, index0, n, fault[:n], pfn[:n], new[:n], zero[:n], zap[:n])
    zapped = run.pfn[run.zap]
    if len(zapped) and not tlbsim.can_access_flush(m, m.current.cpu, zapped):
        run.prefix(first(run.zap))
    return run


def run(m: Machine, r: FolioRun, ev: Events, zero_fn: str) -> None:
    """Do the folio steps of ``r`` (:func:`plan`), adding their events to ``ev``.

    The folios come back locked, with the reference the fault takes.
    """
    v = m.mem.views()
    mapping = r.inode.mapping
    pfn, new, zero, zap = r.pfn, r.new, r.zero, r.zap
    # __filemap_get_folio(): allocate and insert, or take a reference and lock.
    pn = pfn[new]
    m.alloc.take_many(len(pn))
    m.mem.reset_for_alloc_many(pn, KIND_FILE)
    v.flags[pn] |= PG_locked
    v.refcount[pn] += 1  # the page cache's reference
    v.mapping[pn] = mapping.id
    idx = np.arange(r.index0, r.index0 + r.n, dtype=np.int64)
    v.index[pn] = idx[new]
    mapping.i_pages.store_range(r.index0, np.where(new, pfn, EMPTY))
    po = pfn[r.fault & ~new]
    v.refcount[po] += 1
    v.flags[po] |= PG_locked
    ev.add("get_page_from_freelist", "alloc_page", new, lambda i: {"kind": "file"})
    index_list = idx.tolist()
    ev.add("__filemap_add_folio", "pagecache_add", new,
           lambda i: {"index": index_list[i], "as": mapping.kind})
    # zero_if_not_uptodate(): the faulting CPU writes the folio through the direct map.
    cpu = m.current.cpu
    pz = pfn[zero]
    details = [""] * r.n
    if zap.any():
        _zap(m, r, ev, cpu, details, zero_fn)
    else:
        for i, d in zip(np.flatnonzero(zero).tolist(), tlbsim.access_seq(m, cpu, pz), strict=True):
            details[i] = d
        m.mem.zero_many(pz)
        v.flags[pz] |= PG_uptodate
        ev.add(zero_fn, "kernel_write", zero, lambda i: {"tlb": details[i]})
        ev.add(zero_fn, "zero_page", zero)


def _zap(m: Machine, r: FolioRun, ev: Events, cpu: int, details: list[str], zero_fn: str) -> None:
    """Zeroing and v12's zap together: the TLB entry each access makes, each flush drops."""
    v = m.mem.views()
    pfn, zero, zap = r.pfn, r.zero, r.zap
    # Every zeroed page is zapped here (plan() lets no other through), so each access's
    # entry is dropped by the page's own flush before the next page's access.
    pz = pfn[zero]
    hit, dropped_a = tlbsim.access_flush(m, cpu, pz)
    for i, h in zip(np.flatnonzero(zero).tolist(), hit.tolist(), strict=True):
        details[i] = tlbsim.HIT_4K if h else tlbsim.FILL_4K
    m.mem.zero_many(pz)
    v.flags[pz] |= PG_uptodate
    ev.add(zero_fn, "kernel_write", zero, lambda i: {"tlb": details[i]})
    ev.add(zero_fn, "zero_page", zero)
    # kvm_gmem_folio_zap_direct_map() -> folio_zap_direct_map()
    pzap = pfn[zap]
    dropped = np.zeros(r.n, np.int64)
    dropped[zero] = dropped_a
    only = zap & ~zero
    dropped[only] = tlbsim.flush_only(m, pfn[only])
    m.dmap.set_ptes(pzap, False)
    checks.on_direct_map_change(m, pzap, False)
    v.private[pzap] |= 1  # KVM_GMEM_FOLIO_NO_DIRECT_MAP
    prof = m.profile
    ipis = 0 if prof.tlb_broadcast else m.tlb.ncpus - 1
    trace = m.trace
    trace.count("flush_tlb_kernel_range", len(pzap))
    if ipis:
        trace.count("ipi", ipis * len(pzap))
    dl = dropped.tolist()
    fn = "kvm_gmem_folio_zap_direct_map"
    ev.add(fn, "zap", zap)
    ev.add("set_direct_map_valid_noflush", "dmap_clear", zap, lambda i: {"level": "4K"})
    ev.add("folio_zap_direct_map", "tlb_flush", zap,
           lambda i: {"pages": 1, "full": False, "ipis": ipis, "dropped": dl[i]})
    ev.add(fn, "marker_set", zap)
