"""The folio half of a guest_memfd fault, over a run of consecutive file indices.

Stands for what both fault paths do before they map the folio, page by page:
``kvm_gmem_get_folio()`` (``__filemap_get_folio(FGP_LOCK | FGP_CREAT)``: look up,
or ``alloc_page()`` + ``filemap_add_folio()``), ``zero_if_not_uptodate()``
(``clear_highpage()`` through the direct map, then ``folio_mark_uptodate()``)
and, in v12 for a NO_DIRECT_MAP inode, ``kvm_gmem_folio_zap_direct_map()``
(``set_direct_map_valid_noflush()``, ``flush_tlb_kernel_range()``, marker).
The caller maps the folios and unlocks them.

The first zap in a 2M region still mapped by a large leaf splits it
(``split_large_page()``: a page-table page from the same allocator, written
through the direct map, then ``flush_tlb_all()``; a 1G leaf is split first).
A run includes such zaps for new folios: :func:`_assign` walks the
allocator's coming frames region by region to know which folio splits which
region and which frames become page tables in between, and :func:`_zap`
replays each split's TLB accesses and flushes in order; every TLB is empty
after a split, so the pages after it need no more.

:func:`plan` finds how many pages from the start go straight through these
steps (:class:`FolioRun` ``.n``); :func:`run` does them.  A page that would do
anything else (wait for a folio lock, meet ENOMEM, hwpoison, oops, split for
a folio that already existed, break an invariant) ends the run before it, for
the per-page path to take.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.designs.unmapped_alloc import AS_MERMAP_STALE, PAGEBLOCK_ORDER
from gmemlab.model.kvm.guest_memfd import KVM_GMEM_FOLIO_NO_DIRECT_MAP, kvm_gmem_no_direct_map
from gmemlab.model.mm.direct_map import LEVEL_1G, LEVEL_2M, LEVEL_4K
from gmemlab.model.mm.memmap import KIND_FILE, KIND_KERNEL, KIND_PGTABLE, PG_hwpoison, PG_locked, PG_uptodate
from gmemlab.model.mm.mermap import MERMAP_CPU_SLOTS
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.ranges import checks, mirror, tlbsim, zaps
from gmemlab.model.ranges.events import Burst, Events, listed
from gmemlab.model.trace import Detail
from gmemlab.uapi import PAGE_SHIFT, PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.designs.batched import BatchedFlush
    from gmemlab.model.designs.unmapped_alloc import UnmappedAlloc
    from gmemlab.model.fs import Inode
    from gmemlab.model.machine import Machine

Mask = NDArray[np.bool_]
Arr = NDArray[np.int64]


@dataclass(slots=True)
class FolioRun:
    """Per page of the run: its folio and what the fault does to it (``fault`` false: nothing)."""

    inode: Inode
    index0: int
    n: int  # pages from the start that go straight through
    fault: Mask
    pfn: Arr  # the folio, -1 where the page does not fault
    new: Mask  # allocated and added to the page cache
    zero: Mask  # not uptodate: cleared through the direct map
    zap: Mask  # removed from the direct map (v12, NO_DIRECT_MAP)
    pt1g: Arr  # the page table of the 1G split this page's zap makes, or -1
    pt2m: Arr  # the page table of the 2M split this page's zap makes, or -1
    taken: Arr  # frames taken from the allocator by this page and the ones before
    mermap: bool = False  # new folios come off the unmapped free list, zeroed via the mermap
    flip: Arr | None = None  # (mermap) the pageblock this page's allocation unmaps first, or -1
    stale: Mask | None = None  # cached by a CPU when handed out, where the run worked it out
    around: Arr | None = None  # (fault-around) per page: the block its fault brings in, or -1

    def prefix(self, n: int) -> None:
        """Keep only the first ``n`` pages (``n`` <= ``self.n``)."""
        self.n = n
        for name in ("fault", "pfn", "new", "zero", "zap", "pt1g", "pt2m", "taken", "flip", "around"):
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, a[:n])


def first(bad: Mask) -> int:
    """Position of the first true entry, or the length."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else len(bad)


def _assign(m: Machine, stream: Arr, wanted: int) -> tuple[Arr, Arr, Arr, Arr]:
    """Which of the allocator's coming frames ``stream`` become the next ``wanted`` folios.

    Each folio is zapped right after its allocation; the first one in a region
    still mapped by a large leaf splits it, taking the next frame (two, for a 1G
    leaf) as page tables.  Returns, per folio that can go straight through: its
    position in ``stream``, those of its 1G and 2M page tables (-1: none) and the
    position after all it took; it stops before a folio in a region neither split
    nor splittable, or whose page table would not be present.
    """
    size = len(stream)
    level, present = m.dmap.lookup_many(stream)
    large = ((level == LEVEL_2M) | (level == LEVEL_1G)) & present
    stops = np.flatnonzero(~large & ~((level == LEVEL_4K) & present)).tolist()
    regions = stream >> 9
    at = np.flatnonzero(large)
    # Each large region is split by its first frame that becomes a folio: in stream order,
    # its first frame, unless that one went to a page table (then the next, found later).
    cands = sorted(at[np.unique(regions[at], return_index=True)[1]].tolist())
    split2m: set[int] = set()
    split1g: set[int] = set()
    runs: list[tuple[int, int]] = []  # folios at consecutive positions: (first, how many)
    trig: list[tuple[int, int, int]] = []  # (folio number, 1G page table, 2M page table)
    got = pos = ci = si = 0
    while got < wanted:
        while ci < len(cands) and cands[ci] < pos:
            r = int(regions[cands[ci]])
            ci += 1
            if r not in split2m:  # its first frame became a page table
                later = np.flatnonzero(regions[pos:] == r)
                if len(later):
                    bisect.insort(cands, pos + int(later[0]), lo=ci)
        while si < len(stops) and stops[si] < pos:
            si += 1
        cand = cands[ci] if ci < len(cands) else size
        stop = stops[si] if si < len(stops) else size
        nxt = min(cand, stop)
        take = min(nxt - pos, wanted - got)
        if take:
            runs.append((pos, take))
            got += take
            pos += take
        if got == wanted or nxt == size or stop < cand:
            break
        ci += 1
        pfn = int(stream[cand])
        need_1g = level[cand] == LEVEL_1G and pfn >> 18 not in split1g
        tables = 2 if need_1g else 1
        if cand + tables >= size or not present[cand + 1 : cand + tables + 1].all():
            break
        trig.append((got, cand + 1 if need_1g else -1, cand + tables))
        runs.append((cand, 1))
        got += 1
        pos = cand + tables + 1
        split2m.add(pfn >> 9)
        if need_1g:
            split1g.add(pfn >> 18)
    where = np.concatenate([np.arange(a, a + k) for a, k in runs]) if runs else np.zeros(0, np.int64)
    pt1g = np.full(got, -1, np.int64)
    pt2m = np.full(got, -1, np.int64)
    end = where + 1
    for j, q1, q2 in trig:
        pt1g[j], pt2m[j], end[j] = q1, q2, q2 + 1
    return where.astype(np.int64), pt1g, pt2m, end


def plan(m: Machine, inode: Inode, index0: int, fault: Mask, *, hwpoison: bool,
         prepare: bool = True, arch_prepare: bool = False) -> FolioRun:
    """What faulting the pages ``fault`` marks, of indices ``index0 + i``, would do.

    ``hwpoison``: the path refuses hwpoisoned folios (``__kvm_gmem_get_pfn()``).
    ``arch_prepare``: ``kvm_arch_gmem_prepare()`` follows (the guest fault).
    ``prepare``: the folios are zeroed and zapped as a fault does; else only looked
    up or created, and unlocked again (``kvm_gmem_allocate()``).
    """
    n = len(fault)
    mapping = inode.mapping
    v = m.mem.views()
    cached = mapping.i_pages.load_range(index0, n)
    new = fault & (cached == EMPTY)
    new_at = np.flatnonzero(new)
    ndm = zaps(m) and kvm_gmem_no_direct_map(inode)
    if ndm and mirror(m).fault_around:
        around = _fault_around(m, inode, index0, fault, new)
        if around is not None:
            return around
    # The page cache zeroes and zaps on insertion whoever inserts; v12 only when a fault does.
    at_insert = ndm and mirror(m).in_page_cache
    splits = ndm and (prepare or at_insert)
    unmapped = at_insert and mirror(m).unmapped_alloc
    flips = np.zeros(0, np.int64)
    if unmapped:
        stream, flips = _unmapped_stream(m, len(new_at))
        k = len(stream)
        where = np.arange(k, dtype=np.int64)
        t1g = t2m = np.full(k, -1, np.int64)
        end = np.zeros(k, np.int64)
    elif splits:
        # Splits take a page table or two per 2M region from the same stream of frames.
        stream = m.alloc.peek(len(new_at) + 2 * (len(new_at) // 256) + 4)
        where, t1g, t2m, end = _assign(m, stream, len(new_at))
    else:
        stream = m.alloc.peek(len(new_at))
        where = np.arange(min(len(new_at), len(stream)), dtype=np.int64)
        t1g = t2m = np.full(len(where), -1, np.int64)
        end = where + 1
    got = len(where)
    if got < len(new_at):  # the allocator runs dry, or a frame the run cannot take
        n = int(new_at[got])
    placed = new_at[:got]
    pfn = np.where(fault, cached, -1)
    pfn[placed] = stream[where]
    pt1g = np.full(len(fault), -1, np.int64)
    pt2m = np.full(len(fault), -1, np.int64)
    taken = np.zeros(len(fault), np.int64)
    pt1g[placed] = np.where(t1g >= 0, stream[t1g], -1)
    pt2m[placed] = np.where(t2m >= 0, stream[t2m], -1)
    taken[placed] = end
    np.maximum.accumulate(taken, out=taken)
    fault, pfn, new = fault[:n], pfn[:n], new[:n]
    old = fault & ~new
    op = np.where(old, pfn, 0)
    flags = v.flags[op]
    bad = old & (((flags & PG_locked) != 0) | (v.mapping[op] != mapping.id)
                 | (v.index[op] != np.arange(index0, index0 + n)))
    if hwpoison:
        bad |= old & ((flags & PG_hwpoison) != 0)
    level, present = m.dmap.lookup_many(np.where(fault, pfn, 0))
    marked = old & ((v.private[op] & KVM_GMEM_FOLIO_NO_DIRECT_MAP) != 0)
    if ndm and not at_insert:
        bad |= marked & present  # out of step: the unlock would report it
    zero = zap = np.zeros(n, np.bool_)
    if unmapped:
        zero = new
        # A frame off the list must be out of the direct map (a flipped block's is still in it).
        listed_frames = new & ~np.isin(pfn >> PAGEBLOCK_ORDER, flips[flips >= 0] >> PAGEBLOCK_ORDER)
        bad |= (listed_frames & present) | (old & (present | ((flags & PG_uptodate) == 0)))
    elif at_insert:
        zero = zap = new
        # A folio already in the page cache was zeroed and zapped when it went in; one that
        # is present or not uptodate is out of step, for the per-page path to show.
        bad |= old & (present | ((flags & PG_uptodate) == 0))
    elif prepare:
        zero = fault & (new | ((flags & PG_uptodate) == 0))
        bad |= zero & ~present  # clear_page() would oops
        if ndm:
            zap = fault & ~marked
            # _assign() vouched for the new folios; one that existed must not need a split.
            bad |= zap & old & ((level != LEVEL_4K) | ~present)
    elif ndm:
        bad |= fault & ~marked & ~present  # out of step at the unlock
    if zaps(m) and mirror(m).marker_and and not ndm:
        bad |= fault  # v7 zaps the folios of every guest_memfd (bug 2): per page
    n = first(bad)
    flip = None
    if unmapped:
        flip = np.full(len(fault), -1, np.int64)
        flip[placed] = flips[where]
    run = FolioRun(inode, index0, n, fault[:n], pfn[:n], new[:n], zero[:n], zap[:n], pt1g[:n],
                   pt2m[:n], taken[:n], unmapped, None if flip is None else flip[:n])
    if not ndm:
        return run
    if arch_prepare and mirror(m).prepare_first and not m.inv.only_counts("zap-before-prepare"):
        run.prefix(first(run.zero & run.zap))  # prepared while mapped: its first ones per page
    if mirror(m).marker_and and not m.inv.only_counts("marker-matches-direct-map"):
        run.prefix(first(run.zap))  # unlocked unmarked but zapped: its first ones per page
    if mirror(m).flushes:
        # Before the first split the TLBs hold whatever they hold; see tlbsim.access_flush().
        before = run.zap & (np.arange(run.n) < first(run.pt2m >= 0))
        if before.any() and not tlbsim.can_access_flush(m, m.current.cpu, run.pfn[before]):
            run.prefix(first(run.zap))
    else:
        # Without the flush a page is still cached when it is handed out if its own zeroing
        # cached it (and no split of its own flushed everything since), or if it was cached
        # before the run and nothing evicted it: that depends on the run's order, so such a
        # page goes per page.
        stale = run.fault & ~run.zero
        if stale.any():
            stale[stale] = checks.cached_anywhere(m, run.pfn[stale])
            run.prefix(first(stale))
        # Each such page breaks handout-flushed: the first ones the invariants keep a record
        # of (with the trace up to them) go per page.
        if not m.inv.only_counts("handout-flushed"):
            run.prefix(first(stale_at_handout(run)))
    return run


def stale_at_handout(r: FolioRun) -> Mask:
    """The pages of a run of a mirror without the zap's flush (:func:`plan`) that a CPU still
    caches when they are handed out: as the run found them (a deferred flush), or those
    zeroed here, save the ones whose zap split a large leaf (``flush_tlb_all()`` came after
    their zeroing)."""
    return r.zero & (r.pt2m < 0) if r.stale is None else r.stale


def run(m: Machine, r: FolioRun, ev: Events, zero_fn: str,
        before_zap: Callable[[], None] | None = None) -> None:
    """Do the folio steps of ``r`` (:func:`plan`), adding their events to ``ev``.

    ``before_zap``: what the fault does between the zeroing and the zap (v9's
    prepare).  The folios come back locked, with the reference the fault takes.
    """
    v = m.mem.views()
    mapping = r.inode.mapping
    pfn, new, zero, zap = r.pfn, r.new, r.zero, r.zap
    # __filemap_get_folio(): allocate and insert, or take a reference and lock.
    pn = pfn[new]
    if r.around is not None:
        _fault_around_run(m, r, ev)  # the new folios: allocated, zeroed, zapped and marked
    elif r.mermap:
        _take_unmapped(m, r, ev)
    else:
        m.alloc.take_many(int(r.taken[-1]) if r.n else 0)
    if r.around is None:
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
    alloc = {"kind": "file", "freetype": "unmapped"} if r.mermap else {"kind": "file"}
    if r.around is None:
        ev.add("get_page_from_freelist", "alloc_page", new, lambda i: dict(alloc))
    index = listed(idx)

    def inserted() -> None:
        ev.add("__filemap_add_folio", "pagecache_add", new,
               lambda i: {"index": index(i), "as": mapping.kind})

    if r.mermap and zero.any():
        _mermap_clear(m, r, ev)
        inserted()
        return
    if mirror(m).in_page_cache and zap.any():
        # filemap_add_folio() -> prep_add_unmapped_folio(), before __filemap_add_folio()
        _zap(m, r, ev, "folio_zero_segment", "prep_add_unmapped_folio")
        inserted()
        return
    inserted()
    # zero_if_not_uptodate(): the faulting CPU writes the folio through the direct map.
    if zap.any():
        _zap(m, r, ev, zero_fn, "kvm_gmem_folio_zap_direct_map", before_zap)
        return
    pz = pfn[zero]
    details = dict(zip(np.flatnonzero(zero).tolist(), tlbsim.access_seq(m, m.current.cpu, pz),
                       strict=True))
    m.mem.zero_many(pz)
    v.flags[pz] |= PG_uptodate
    ev.add(zero_fn, "kernel_write", zero, lambda i: {"tlb": details[i]})
    ev.add(zero_fn, "zero_page", zero)
    if before_zap is not None:
        before_zap()


def _fault_around(m: Machine, inode: Inode, index0: int, fault: Mask, new: Mask) -> FolioRun | None:
    """The run of a fault-around mirror (zap2m) when its first new folio brings in its block.

    ``Zap2M.filemap_alloc_folio()``: a new folio whose whole 2 MiB file block is
    absent and inside ``i_size`` takes an order-9 block, zeroes it, inserts the
    other 511, zaps it with one CPA call (a present 2M leaf: the PMD's present
    bit) and one flush, and marks all 512.  The run takes such blocks in order
    (the next ones ``take_block()`` gives, each still a present 2M leaf, else the
    page goes per page); the block's other pages then fault as marked folios.
    It stops at a new folio that would not bring in its block (the caller plans
    the v12 way from there).  None if the first new folio is such a one.
    """
    n = len(fault)
    new_at = np.flatnonzero(new)
    if not len(new_at):
        return None
    idx = np.arange(index0, index0 + n, dtype=np.int64)
    blocks = idx >> PAGEBLOCK_ORDER
    cut = n
    trig: list[int] = []
    seen: set[int] = set()
    i_size = inode.size >> PAGE_SHIFT
    xa = inode.mapping.i_pages
    for i in new_at.tolist():
        b = int(blocks[i])
        if b in seen:
            continue
        first_index = b << PAGEBLOCK_ORDER
        if first_index + PAGES_PER_PMD > i_size or xa.first(first_index, first_index + PAGES_PER_PMD) >= 0:
            cut = i
            break
        seen.add(b)
        trig.append(i)
    if not trig:
        return None
    bases = np.array(m.alloc.peek_blocks(PAGES_PER_PMD, len(trig)), np.int64)
    level, present = m.dmap.lookup_many(bases)
    ok = first(~((level == LEVEL_2M) & present))
    if ok < len(trig):
        cut = min(cut, trig[ok])
        trig, bases = trig[:ok], bases[:ok]
    if not trig:  # the first block is not one present 2M leaf: its fault goes per page
        z, none = np.zeros(0, np.bool_), np.zeros(0, np.int64)
        return FolioRun(inode, index0, 0, z, none, z, z, z, none, none, none, around=none)
    base_of = dict(zip((int(blocks[i]) for i in trig), bases.tolist(), strict=True))
    fault, new, idx, blocks = fault[:cut], new[:cut], idx[:cut], blocks[:cut]
    inblock = np.array([base_of.get(int(b), -1) for b in blocks], np.int64)
    # The run keeps the triggered blocks' pages and old folios that need nothing but the
    # fault's reference and lock (marked, zapped, uptodate, unlocked); anything else ends it.
    cached = inode.mapping.i_pages.load_range(index0, cut)
    old_ok = fault & (cached != EMPTY) & (inblock < 0)
    v = m.mem.views()
    op = np.where(old_ok, cached, 0)
    marked = (v.private[op] & KVM_GMEM_FOLIO_NO_DIRECT_MAP) != 0
    _lv, op_present = m.dmap.lookup_many(op)
    fine = ~fault | (inblock >= 0) | (old_ok & marked & ~op_present & ((v.flags[op] & PG_locked) == 0)
                                      & ((v.flags[op] & PG_uptodate) != 0))
    k = first(~fine)
    trig_mask = np.zeros(cut, np.bool_)
    trig_mask[[i for i in trig if i < k]] = True
    pfn = np.where(inblock >= 0, inblock + (idx & (PAGES_PER_PMD - 1)), np.where(fault, cached, -1))
    around = np.where(trig_mask, inblock, -1)
    z = np.zeros(k, np.bool_)
    none = np.full(k, -1, np.int64)
    return FolioRun(inode, index0, k, fault[:k], pfn[:k], trig_mask[:k], z, z.copy(), none,
                    none.copy(), np.zeros(k, np.int64), around=around[:k])


def _fault_around_run(m: Machine, r: FolioRun, ev: Events) -> None:
    """``Zap2M.filemap_alloc_folio()`` for the trigger pages of ``r`` (:func:`_fault_around`),
    block by block, each block's events as one :class:`Burst` of its page."""
    assert r.around is not None
    v = m.mem.views()
    mapping = r.inode.mapping
    cpu = m.current.cpu
    ipis = 0 if m.profile.tlb_broadcast else m.tlb.ncpus - 1
    kind = mapping.kind
    fn = "kvm_gmem_fault_around"
    bursts: dict[int, Burst] = {}
    for i in np.flatnonzero(r.around >= 0).tolist():
        base = int(r.around[i])
        got = m.alloc.take_block(PAGES_PER_PMD)
        assert got == base, (got, base)
        frames = np.arange(base, base + PAGES_PER_PMD, dtype=np.int64)
        mine = int(r.pfn[i])
        index = r.index0 + i
        first_index = index - (index & (PAGES_PER_PMD - 1))
        m.mem.reset_for_alloc_many(frames, KIND_FILE)
        tlb = tlbsim.access_seq(m, cpu, frames)
        m.mem.zero_many(frames)
        v.flags[frames] |= PG_uptodate
        sib = frames[frames != mine]
        v.flags[sib] |= PG_locked
        v.refcount[sib] += 1
        v.mapping[sib] = mapping.id
        v.index[sib] = first_index + (sib - base)
        mapping.i_pages.store_range(first_index, np.where(frames == mine, EMPTY, frames))
        m.dmap.set_pmd_leaf(base // PAGES_PER_PMD, False)
        checks.on_direct_map_change(m, frames, False)
        dropped = tlbsim.flush_all(m)
        m.trace.count("flush_tlb_kernel_range")
        if ipis:
            m.trace.count("ipi", ipis)
        v.private[frames] |= KVM_GMEM_FOLIO_NO_DIRECT_MAP
        v.flags[sib] &= ~np.uint8(PG_locked)
        checks.on_folio_unlock(m, sib)
        v.refcount[sib] -= 1
        bursts[i] = _fault_around_burst(fn, base, mine, index, first_index, tlb, kind, ipis, dropped)
    ev.add_bursts(bursts)


def _fault_around_burst(fn: str, base: int, mine: int, index: int, first_index: int,
                        tlb: list[str], kind: str, ipis: int, dropped: int) -> Burst:
    """The events of one block's fault-around, in ``Zap2M.filemap_alloc_folio()``'s order."""
    others = [p for p in range(base, base + PAGES_PER_PMD) if p != mine]

    def make() -> list[tuple[str, str, int, Detail]]:
        out: list[tuple[str, str, int, Detail]] = [
            (fn, "alloc_block", base, {"order": PAGEBLOCK_ORDER, "large": False})]
        for k, p in enumerate(range(base, base + PAGES_PER_PMD)):
            out.append((fn, "kernel_write", p, {"tlb": tlb[k]}))
            out.append((fn, "zero_page", p, None))
        out.extend(("__filemap_add_folio", "pagecache_add", p,
                    {"index": first_index + p - base, "as": kind}) for p in others)
        out.append((fn, "zap", base, {"pages": PAGES_PER_PMD, "whole": True}))
        out.append(("__change_page_attr", "dmap_clear_2m", base, {"level": "2M"}))
        out.append((fn, "tlb_flush", base, {"pages": PAGES_PER_PMD, "full": True, "ipis": ipis,
                                             "dropped": dropped}))
        out.extend((fn, "marker_set", p, None) for p in [*others, mine])
        out.append((fn, "fault_around", mine, {"block": base, "index": index,
                                                "inserted": len(others)}))
        return out

    counts = {"alloc_block": 1, "kernel_write": PAGES_PER_PMD, "zero_page": PAGES_PER_PMD,
              "pagecache_add": len(others), "zap": 1, "dmap_clear_2m": 1, "tlb_flush": 1,
              "marker_set": PAGES_PER_PMD, "fault_around": 1}
    return Burst(counts, make)


def _unmapped_stream(m: Machine, wanted: int) -> tuple[Arr, Arr]:
    """The frames the next ``wanted`` ``rmqueue_unmapped()`` calls give, as far as a run can
    take them, and per frame the pageblock its call unmaps first (-1: none).

    The unmapped free list first (LIFO); then, each time it runs dry,
    ``rmqueue_direct_map()`` takes the allocator's next order-9 block, which must
    still be one present 2M leaf (the PMD's present bit flips, no split), and its
    frames follow in ascending order.  None while a mermap mapping is live.
    """
    design = cast("UnmappedAlloc", m.design)
    if design.mermap.ptes.get(m.current.cpu):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    fl = design.free_list
    k = min(wanted, len(fl))
    parts = [np.array(fl[len(fl) - k:][::-1], np.int64)]
    flips = [np.full(k, -1, np.int64)]
    if wanted > k and m.profile.can_set_direct_map:
        bases = np.array(m.alloc.peek_blocks(PAGES_PER_PMD, -(-(wanted - k) // PAGES_PER_PMD)),
                         np.int64)
        level, present = m.dmap.lookup_many(bases)
        bases = bases[: first(~((level == LEVEL_2M) & present))]
        for base in bases.tolist():
            parts.append(np.arange(base, base + PAGES_PER_PMD, dtype=np.int64))
            flip = np.full(PAGES_PER_PMD, -1, np.int64)
            flip[0] = base
            flips.append(flip)
    return np.concatenate(parts)[:wanted], np.concatenate(flips)[:wanted]


def _take_unmapped(m: Machine, r: FolioRun, ev: Events) -> None:
    """``rmqueue_unmapped()`` for the new folios of ``r`` (:func:`plan`): the pageblock flips
    of ``rmqueue_direct_map()`` where the list ran dry, and the pops off the list."""
    design = cast("UnmappedAlloc", m.design)
    assert r.flip is not None
    fn = "__rmqueue_direct_map"
    bases = r.flip[r.flip >= 0]
    dropped = np.zeros(r.n, np.int64)
    ipis = 0 if m.profile.tlb_broadcast else m.tlb.ncpus - 1
    for base in bases.tolist():
        # alloc_block(), set_direct_map_block_noflush() (the PMD's present bit),
        # flush_tlb_kernel_range() over the block (above the ceiling: everything)
        got = m.alloc.take_block(PAGES_PER_PMD)
        assert got == base, (got, base)
        frames = np.arange(base, base + PAGES_PER_PMD, dtype=np.int64)
        m.mem.reset_for_alloc_many(frames, KIND_KERNEL)
        m.dmap.set_pmd_leaf(base // PAGES_PER_PMD, False)
        checks.on_direct_map_change(m, frames, False)
        dropped[np.flatnonzero(r.flip == base)] = tlbsim.flush_all(m)
        design.unmapped_blocks.add(base >> PAGEBLOCK_ORDER)
        m.mem.mark_free_many(frames)
        design.nr_free[base >> PAGEBLOCK_ORDER] = PAGES_PER_PMD
    if len(bases):
        m.trace.count("flush_tlb_kernel_range", len(bases))
        if ipis:
            m.trace.count("ipi", ipis * len(bases))
    where = r.flip >= 0
    block = listed(r.flip)
    dl = listed(dropped)
    ev.add(fn, "alloc_block", where, lambda i: {"order": PAGEBLOCK_ORDER, "large": False}, block)
    ev.add("__change_page_attr", "dmap_clear_2m", where, lambda i: {"level": "2M"}, block)
    ev.add(fn, "tlb_flush", where, lambda i: {"pages": PAGES_PER_PMD, "full": True, "ipis": ipis,
                                              "dropped": dl(i)}, block)
    ev.add(fn, "pageblock_unmapped", where, lambda i: {"pages": PAGES_PER_PMD}, block)
    pfns = r.pfn[r.new]
    if not len(pfns):
        return
    # The list is popped dry before each flip, so what is left is the old list's bottom, or
    # the last flipped block's frames not handed out (pushed in reverse, popped ascending).
    fl = design.free_list
    del fl[max(len(fl) - len(pfns), 0):]
    if len(bases):
        last = int(bases[-1])
        used = int(np.count_nonzero((pfns >> PAGEBLOCK_ORDER) == last >> PAGEBLOCK_ORDER))
        fl.extend(range(last + PAGES_PER_PMD - 1, last + used - 1, -1))
    blocks, counts = np.unique(pfns >> PAGEBLOCK_ORDER, return_counts=True)
    for b, c in zip(blocks.tolist(), counts.tolist(), strict=True):
        design.nr_free[b] -= c


def _mermap_clear(m: Machine, r: FolioRun, ev: Events) -> None:
    """The fast ``prep_add_unmapped_folio()`` for the new folios of ``r``: ``mermap_get()``
    (a local flush of the CPU's mermap translations when its region is used up), the
    clear, ``mermap_put()``; then ``AS_MERMAP_STALE`` and uptodate."""
    design = cast("UnmappedAlloc", m.design)
    mm = design.mermap
    cpu = m.current.cpu
    used = mm.used.get(cpu, 0)
    cached = mm.tlb.setdefault(cpu, [])
    seen = set(cached)
    flushes: dict[int, int] = {}  # position in the run -> translations the flush dropped
    at = np.flatnonzero(r.zero)
    pz = r.pfn[at]
    for i, p in zip(at.tolist(), pz.tolist(), strict=True):
        if used + 1 > MERMAP_CPU_SLOTS:  # no live mapping (plan() made sure)
            flushes[i] = len(cached)
            cached.clear()
            seen.clear()
            used = 0
        used += 1
        if p not in seen:
            cached.append(p)
            seen.add(p)
    mm.used[cpu] = used
    mm.ptes.setdefault(cpu, [])
    if flushes:
        m.trace.count("mermap_flush_local", len(flushes))
    m.mem.zero_many(pz)
    m.mem.views().flags[pz] |= PG_uptodate
    r.inode.mapping.set(AS_MERMAP_STALE)
    where = np.zeros(r.n, np.bool_)
    where[list(flushes)] = True
    ev.add("mermap_alloc", "mermap_flush", where, lambda i: {"cpu": cpu, "dropped": flushes[i]},
           lambda i: -1)
    fn = "prep_add_unmapped_folio"
    ev.add(fn, "mermap_map", r.zero, lambda i: {"cpu": cpu})
    ev.add(fn, "zero_page", r.zero, lambda i: {"via": "mermap"})
    ev.add(fn, "mermap_unmap", r.zero, lambda i: {"cpu": cpu})


@dataclass(slots=True)
class _Deferred:
    """What the deferred flushes of a run did, page by page (:func:`_deferred_flushes`)."""

    pending: dict[int, int]  # page -> folios queued after its zap
    flushed: dict[int, tuple[int, int, bool, int, int]]  # page -> (lo, span, full, dropped, zaps)

    def add_events(self, ev: Events, zap: Mask, ipis: int) -> None:
        fn = "folio_zap_direct_map"
        pending, flushed = self.pending, self.flushed
        ev.add(fn, "flush_deferred", zap, lambda i: {"pending": pending[i]})
        where = np.zeros(len(zap), np.bool_)
        where[list(flushed)] = True
        ev.add(fn, "batch_flush", where, lambda i: {"zaps": flushed[i][4], "span": flushed[i][1]},
               lambda i: flushed[i][0])
        ev.add(fn, "tlb_flush", where, lambda i: {"pages": flushed[i][1], "full": flushed[i][2],
                                                  "ipis": ipis, "dropped": flushed[i][3]},
               lambda i: flushed[i][0])


def _deferred_flushes(m: Machine, r: FolioRun, split_at: Callable[[int], None],
                      zeroed: dict[int, str]) -> _Deferred:
    """The batch design's zaps, page by page: each zeroing's access, the splits, the
    queueing and, when the queue is full, ``flush_pending()``'s one
    ``flush_tlb_kernel_range()`` over its span (everything above the ceiling), so that
    what each CPU caches at each handout is known (``r.stale``)."""
    design = cast("BatchedFlush", m.design)
    tlbs = m.tlb
    cpu = m.current.cpu
    out = _Deferred({}, {})
    stale = np.zeros(r.n, np.bool_)
    ipis = 0 if m.profile.tlb_broadcast else tlbs.ncpus - 1
    pl = r.pfn.tolist()
    zero, zap, split = r.zero.tolist(), r.zap.tolist(), (r.pt2m >= 0).tolist()
    for i in range(r.n):
        p = pl[i]
        if split[i]:
            split_at(i)
        elif zero[i]:
            zeroed[i] = tlbsim.access(m, cpu, p)[0]
        if not zap[i]:
            continue
        design.pending.append(p)
        out.pending[i] = len(design.pending)
        if len(design.pending) >= design.batch:
            queued = design.pending
            design.pending = []
            lo, hi = min(queued), max(queued) + 1
            full = hi - lo > m.profile.tlb_flush_ceiling
            dropped = sum(tlbs.invalidate_all(c) if full else tlbs.invalidate(c, lo, hi)
                          for c in range(tlbs.ncpus))
            out.flushed[i] = (lo, hi - lo, full, dropped, len(queued))
            m.trace.count("flush_tlb_kernel_range")
            if ipis:
                m.trace.count("ipi", ipis)
        stale[i] = tlbs.cached_anywhere(p)
    r.stale = stale
    return out


def _zap(m: Machine, r: FolioRun, ev: Events, zero_fn: str, fn: str,
         before_zap: Callable[[], None] | None = None) -> None:
    """Zeroing and the zap together (v12's in ``fn``, or the page cache's), splits included.

    Every zeroed page is zapped here (plan() lets no other through).  With the
    zap's flush, each access's TLB entry is dropped by the page's own flush
    before the next page's access: up to the first split that is
    :func:`tlbsim.access_flush`; each split is replayed step by step; after one,
    every TLB is empty again when the next page comes, so its access fills and
    its flush drops just that.  Without it (``Mirror.flushes`` false) the
    accesses stay cached, in LRU order: :func:`tlbsim.access_seq` between the
    splits.
    """
    v = m.mem.views()
    cpu = m.current.cpu
    pfn, zero, zap = r.pfn, r.zero, r.zap
    split = r.pt2m >= 0
    tables = np.flatnonzero(split)
    flushes = mirror(m).flushes
    table_tlb: dict[int, str] = {}
    flushed: dict[int, int] = {}
    zeroed: dict[int, str] = {}  # the TLB detail of each zeroing, where not a plain 4K one

    def split_at(i: int) -> None:
        """The folio's zeroing, then per level the page table's allocation, its write
        through the direct map, the split and ``flush_tlb_all()``."""
        zeroed[i] = tlbsim.access(m, cpu, int(pfn[i]))[0]
        for q in (int(r.pt1g[i]), int(r.pt2m[i])):
            if q < 0:
                continue
            table_tlb[q] = tlbsim.access(m, cpu, q)[0]
            if q == r.pt1g[i]:
                m.dmap.split_1g(int(pfn[i]) >> 18)
            else:
                m.dmap.split_2m(int(pfn[i]) >> 9)
            flushed[q] = tlbsim.flush_all(m)

    dropped = np.zeros(r.n, np.int64)
    hits = np.zeros(r.n, np.bool_)
    if flushes:
        before = np.arange(r.n) < first(split)
        dropped[zero & ~before & ~split] = 1  # a split's own flush finds every TLB empty
        a = zero & before
        hits[a], dropped[a] = tlbsim.access_flush(m, cpu, pfn[a])
        c = zap & ~zero & before
        dropped[c] = tlbsim.flush_only(m, pfn[c])
        for i in tables.tolist():
            split_at(i)
    elif mirror(m).deferred_flush:
        deferred = _deferred_flushes(m, r, split_at, zeroed)
    else:
        start = 0
        for i in [*tables.tolist(), r.n]:
            seg = np.flatnonzero(zero[start:i]) + start
            zeroed.update(zip(seg.tolist(), tlbsim.access_seq(m, cpu, pfn[seg]), strict=True))
            if i < r.n:
                split_at(i)
            start = i + 1
    hit = listed(hits)
    pts = np.concatenate([r.pt1g[r.pt1g >= 0], r.pt2m[split]])
    m.mem.reset_for_alloc_many(pts, KIND_PGTABLE)
    m.mem.zero_many(pts)
    pz = pfn[zero]
    m.mem.zero_many(pz)
    v.flags[pz] |= PG_uptodate
    ev.add(zero_fn, "kernel_write", zero, lambda i: {
        "tlb": zeroed.get(i) or (tlbsim.HIT_4K if hit(i) else tlbsim.FILL_4K)})
    ev.add(zero_fn, "zero_page", zero)
    if before_zap is not None:
        before_zap()
    # kvm_gmem_folio_zap_direct_map() -> folio_zap_direct_map()
    pzap = pfn[zap]
    m.dmap.set_ptes(pzap, False)
    checks.on_direct_map_change(m, pzap, False)
    marker = not mirror(m).in_page_cache and not mirror(m).marker_and
    if marker:
        v.private[pzap] |= KVM_GMEM_FOLIO_NO_DIRECT_MAP
    elif mirror(m).marker_and:
        v.private[pzap] &= KVM_GMEM_FOLIO_NO_DIRECT_MAP  # sic: v7's '&'
        after = listed(v.private[np.where(zap, pfn, 0)])
    ipis = 0 if m.profile.tlb_broadcast else m.tlb.ncpus - 1
    trace = m.trace
    zap_flushes = len(pzap) if flushes else 0
    if zap_flushes:
        trace.count("flush_tlb_kernel_range", zap_flushes)
    nsplits = len(tables) + int(np.count_nonzero(r.pt1g >= 0))
    trace.count("flush_tlb_all", nsplits)
    if ipis:
        trace.count("ipi", ipis * (zap_flushes + nsplits))
    marker_first = marker and mirror(m).marker_first  # v9: the marker before the zap (bug 4)
    if marker_first:
        ev.add(fn, "marker_set", zap)
    ev.add(fn, "zap", zap)
    pl = listed(pfn)
    for where, pt, level, event in ((r.pt1g >= 0, listed(r.pt1g), "1G", "dmap_split_1g"),
                                    (split, listed(r.pt2m), "2M", "dmap_split_2m")):
        _split_events(ev, where, pt, pl, level, event, table_tlb, flushed, ipis)
    ev.add("set_direct_map_valid_noflush", "dmap_clear", zap, lambda i: {"level": "4K"})
    if mirror(m).deferred_flush:
        deferred.add_events(ev, zap, ipis)
    flusher = "folio_zap_direct_map"
    if mirror(m).marker_and:
        ev.add(fn, "marker_and", zap, lambda i: {"private": after(i)})
        flusher = fn  # v7 flushes in kvm_gmem_folio_zap_direct_map(), after the marker
    if flushes:
        dl = listed(dropped)
        ev.add(flusher, "tlb_flush", zap,
               lambda i: {"pages": 1, "full": False, "ipis": ipis, "dropped": dl(i)})
    if marker and not marker_first:
        ev.add(fn, "marker_set", zap)


def _split_events(ev: Events, where: Mask, pt: Callable[[int], int], pfn: Callable[[int], int],
                  level: str, event: str, table_tlb: dict[int, str], flushed: dict[int, int],
                  ipis: int) -> None:
    """The events of ``split_large_page()`` at ``level`` for the pages ``where`` marks."""
    ev.add("get_page_from_freelist", "alloc_page", where, lambda i: {"kind": "pgtable"}, pt)
    ev.add("split_large_page", "pt_alloc", where, lambda i: {"for_pfn": pfn(i), "level": level}, pt)
    ev.add("__split_large_page", "kernel_write", where, lambda i: {"tlb": table_tlb[pt(i)]}, pt)
    ev.add("__split_large_page", event, where, lambda i: {"pt": pt(i)})
    ev.add("__split_large_page", "tlb_flush", where,
           lambda i: {"pages": 0, "full": True, "ipis": ipis, "dropped": flushed[pt(i)]}, lambda i: 0)
