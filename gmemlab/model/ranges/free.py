"""Range operations that walk what is populated: truncation, zaps, fallocate.

* :func:`truncate` stands for ``truncate_inode_pages_range()`` on a
  guest_memfd page cache (punch-hole, and the final ``iput()``): per folio,
  ``find_lock_entries()``'s reference and lock, ``unmap_mapping_folio()``
  (``zap_pte_range()`` in each VMA), ``page_cache_delete()``,
  ``filemap_free_folio()`` -> ``->free_folio`` (``kvm_arch_gmem_invalidate()``,
  and in v12 ``kvm_gmem_folio_restore_direct_map()`` for a marked folio), the
  page cache's reference, unlock, and the last reference, which frees the frame
  (``free_unref_folios()``, zeroing it with ``init_on_free``).
* :func:`unmap_gfn_range` stands for ``kvm_mmu_unmap_gfn_range()``: the stage-2
  entries of a gfn range.
* :func:`zap_user_range` stands for ``do_munmap()``'s ``zap_pte_range()`` over a
  whole VMA.
* :func:`allocate` stands for ``kvm_gmem_allocate()``'s loop: per index,
  ``kvm_gmem_get_folio()``, unlock, put.

All of them cost time per entry that exists (or per page asked for), never
per page of the file: the entries come from the xarray node by node.  Entries
that are not regular go one at a time through the per-page generator (run to
completion: nothing observes it), in their place in the order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import NDArray

from gmemlab.model.designs.unmapped_alloc import AS_MERMAP_STALE, PAGEBLOCK_ORDER
from gmemlab.model.kvm.guest_memfd import GMEM_AOPS, KVM_GMEM_FOLIO_NO_DIRECT_MAP
from gmemlab.model.kvm.pfncache import gpc_in_hva_range
from gmemlab.model.kvm.tdx import is_td
from gmemlab.model.mm.direct_map import LEVEL_4K
from gmemlab.model.mm.filemap import mapping_no_direct_map
from gmemlab.model.mm.memmap import PG_locked
from gmemlab.model.mm.memory import zap_pte
from gmemlab.model.mm.truncate import truncate_folio
from gmemlab.model.mm.xarray import XArray
from gmemlab.model.ranges import CHUNK, checks, folios, mirror, tlbsim, usable, zaps
from gmemlab.model.ranges.events import DetailFn, Events, listed
from gmemlab.model.task import KGen, run_sync
from gmemlab.uapi import PAGE_SHIFT

if TYPE_CHECKING:
    from gmemlab.model.designs.unmapped_alloc import UnmappedAlloc
    from gmemlab.model.fs import Inode
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.filemap import AddressSpace
    from gmemlab.model.mm.memory import Vma

Arr = NDArray[np.int64]
Mask = NDArray[np.bool_]
# After an irregular entry the next batch starts small and doubles, so a range where most
# entries are irregular costs little more than per page, and a regular one few batches.
AFTER_IRREGULAR_WINDOW = 64


class _Entries:
    """The present entries of an xarray range, ascending, read a node at a time as needed."""

    __slots__ = ("_nodes", "idx", "val")

    def __init__(self, xa: XArray, start: int, end: int | None) -> None:
        self._nodes: Iterator[tuple[Arr, Arr]] = xa.blocks(start, end)
        self.idx: Arr = np.zeros(0, np.int64)
        self.val: Arr = np.zeros(0, np.int64)

    def head(self, n: int) -> tuple[Arr, Arr]:
        """The next ``n`` entries (fewer at the end)."""
        if len(self.idx) < n:
            idx, val = [self.idx], [self.val]
            have = len(self.idx)
            for i, v in self._nodes:
                idx.append(i)
                val.append(v)
                have += len(i)
                if have >= n:
                    break
            self.idx, self.val = np.concatenate(idx), np.concatenate(val)
        return self.idx[:n], self.val[:n]

    def drop(self, n: int) -> None:
        self.idx, self.val = self.idx[n:], self.val[n:]


def _drive(entries: _Entries, regular: Callable[[Arr, Arr], Mask],
           batch: Callable[[Arr, Arr], None], single: Callable[[int, int], None]) -> None:
    """Every entry, in order: the regular ones in batches, the others through ``single``."""
    window = CHUNK
    while True:
        idx, val = entries.head(window)
        if not len(idx):
            return
        k = folios.first(~regular(idx, val))
        if k:
            batch(idx[:k], val[:k])
        if k < len(idx):
            single(int(idx[k]), int(val[k]))
            entries.drop(k + 1)
            window = AFTER_IRREGULAR_WINDOW
        else:
            entries.drop(k)
            window = min(window * 2, CHUNK)


def _drop(column: NDArray[np.int32], pfns: Arr) -> None:
    """One less in ``column`` for each of ``pfns``, which may repeat (rarely: ufunc.at is slow)."""
    if len(pfns) < 2 or (pfns[1:] > pfns[:-1]).all() or (pfns[1:] < pfns[:-1]).all() or len(
            np.unique(pfns)) == len(pfns):
        column[pfns] -= 1
    else:
        np.subtract.at(column, pfns, 1)


def _quiet(vma: Vma) -> bool:
    """Would zapping this VMA's PTEs notify no KVM (no memslot backed by its addresses, no
    pfncache mapping one of them)?"""
    return not any(kvm.hva_range_gfns(vma.start, vma.end) or gpc_in_hva_range(kvm, vma.start, vma.end)
                   for kvm in vma.mm.notifiers)


# --- truncate_inode_pages_range() ----------------------------------------------------------------
def truncate(m: Machine, mapping: AddressSpace, start: int, end: int | None) -> int | None:
    """``truncate_inode_pages_range()`` over [start, end); the folios removed, or None if it
    cannot stand in (then the per-page path runs)."""
    if not usable(m) or mapping.a_ops is not GMEM_AOPS:
        return None

    vmas = list(mapping.i_mmap)
    quiet = all(_quiet(vma) for vma in vmas)
    removed = 0
    # The page cache restores (and zeroes) every folio of an AS_NO_DIRECT_MAP mapping as it
    # leaves; v12's ->free_folio restores the marked ones.
    on_removal = zaps(m) and mirror(m).in_page_cache and mapping_no_direct_map(mapping)
    on_free = zaps(m) and not mirror(m).in_page_cache
    restore_first = mirror(m).restore_first
    # With ALLOC_UNMAPPED the folio is neither restored nor zeroed: it goes back to the
    # unmapped free list as it is.
    unmapped = on_removal and mirror(m).unmapped_alloc
    if unmapped:
        blocks = np.fromiter(cast("UnmappedAlloc", m.design).unmapped_blocks, np.int64)

    def regular(idx: Arr, pfn: Arr) -> Mask:
        if not quiet:
            return np.zeros(len(idx), np.bool_)
        v = m.mem.views()
        # An RMP-assigned frame's invalidate clflushes it through the direct map: per page.
        ok: Mask = (((v.flags[pfn] & PG_locked) == 0) & (v.mapping[pfn] == mapping.id)
                    & (v.index[pfn] == idx) & (v.s2count[pfn] == 0) & (v.guest_owned[pfn] == 0))
        ptes = np.zeros(len(idx), np.int64)
        for vma in vmas:
            ptes += _mapped_by(vma, idx, pfn)[0]
        ok &= (ptes == v.mapcount[pfn]) & (v.refcount[pfn] - ptes - 1 >= 0)
        level, present = m.dmap.lookup_many(pfn)
        marked = (v.private[pfn] & KVM_GMEM_FOLIO_NO_DIRECT_MAP) != 0
        if on_free:
            # v7 restores nothing: its frames go back to the allocator out of the direct map.
            leaked = mirror(m).marker_and and m.inv.only_counts("free-frame-in-direct-map")
            ok &= np.where(marked, (level == LEVEL_4K) & ~present, present | leaked)
            if (restore_first and marked.any()
                    and not m.inv.only_counts("invalidate-before-restore")):
                ok &= ~marked  # restored before the invalidate: its first ones per page
        elif unmapped:
            ok &= ~marked & ~present & np.isin(pfn >> PAGEBLOCK_ORDER, blocks)
            if mapping.test(AS_MERMAP_STALE) or m.config.init_on_free:
                ok[:] = False  # the first removal flushes the mermap (clears the flag): per page
        elif on_removal:
            ok &= ~marked & (level == LEVEL_4K) & ~present
            if not m.inv.only_counts("invalidate-before-restore"):
                ok[:] = False  # each removal breaks it, and its first ones are kept: per page
        else:
            ok &= ~marked & present
        return ok

    def batch(idx: Arr, pfn: Arr) -> None:
        nonlocal removed
        _truncate_batch(m, mapping, vmas, idx, pfn, on_removal and not unmapped, unmapped)
        removed += len(idx)

    def single(index: int, pfn: int) -> None:
        nonlocal removed
        removed += run_sync(truncate_folio(m, mapping, index, pfn))

    _drive(_Entries(mapping.i_pages, start, end), regular, batch, single)
    return removed


def _mapped_by(vma: Vma, idx: Arr, pfn: Arr) -> tuple[Mask, Arr]:
    """Which of the folios (at file indices ``idx``) ``vma`` maps, and at which of its pages."""
    page = idx - vma.pgoff
    inside = (page >= 0) & (page < vma.npages)
    hit = np.zeros(len(idx), np.bool_)
    if inside.any():
        hit[inside] = vma.ptes.load_many(page[inside]) == pfn[inside]
    return hit, page


def _addresses(vma: Vma, pages: Arr) -> DetailFn:
    """The detail of zap_pte_range()'s event for each of ``pages`` of ``vma``."""
    addrs = listed(vma.start + (pages << PAGE_SHIFT))
    return lambda i: {"addr": addrs(i)}


def _truncate_batch(m: Machine, mapping: AddressSpace, vmas: list[Vma], idx: Arr, pfn: Arr,
                    on_removal: bool, unmapped: bool) -> None:
    v = m.mem.views()
    ev = Events(m, pfn)
    ptes = np.zeros(len(idx), np.int64)
    # unmap_mapping_folio(): zap_pte_range() in each VMA mapping the folio, VMA by VMA
    for vma in vmas:
        hit, page = _mapped_by(vma, idx, pfn)
        if not hit.any():
            continue
        vma.ptes.erase_indices(page[hit])
        _drop(v.mapcount, pfn[hit])
        ptes += hit
        ev.add("zap_pte_range", "pte_unmap", hit, _addresses(vma, page))
    # page_cache_delete()
    mapping.i_pages.erase_indices(idx)
    v.mapping[pfn] = 0
    index = listed(idx)
    kind = mapping.kind
    ev.add("page_cache_delete", "pagecache_del", None, lambda i: {"index": index(i), "as": kind})
    if on_removal:
        # filemap_free_folio() -> prep_remove_unmapped_folio(): restore, then zero the folio
        # through the direct map, before ->free_folio.
        ev.add("prep_remove_unmapped_folio", "restore", None)
        checks.on_restore(m, pfn, ev)
        m.dmap.set_ptes(pfn, True)
        checks.on_direct_map_change(m, pfn, True)
        ev.add("set_direct_map_valid_noflush", "dmap_set", None, lambda i: {"level": "4K"})
        tlb = tlbsim.access_seq(m, m.current.cpu, pfn)
        m.mem.zero_many(pfn)
        ev.add("folio_zero_segment", "kernel_write", None, lambda i: {"tlb": tlb[i]})
        ev.add("folio_zero_segment", "zero_page", None)
    # ->free_folio: kvm_arch_gmem_invalidate() (nothing to reclaim: regular() left the
    # RMP-assigned frames to the per-page path), then (v12) the restore of a marked folio;
    # v9 restores first.
    restores = zaps(m) and not mirror(m).in_page_cache
    if restores and mirror(m).restore_first:
        _restore_marked(m, pfn, ev)
    v.invalidated[pfn] = 1
    ev.add("kvm_arch_gmem_invalidate", "invalidate", None, lambda i: {"rmp_reclaim": False})
    if restores and not mirror(m).restore_first:
        _restore_marked(m, pfn, ev)
    # references: truncation's +1, each PTE's, the page cache's, truncation's own put
    v.refcount[pfn] -= (ptes + 1).astype(np.int32)
    _free(m, pfn, v.refcount[pfn] == 0, ev, unmapped)
    ev.emit()


def _restore_marked(m: Machine, pfn: Arr, ev: Events) -> None:
    """``kvm_gmem_folio_restore_direct_map()`` for the marked ones of ``pfn``."""
    v = m.mem.views()
    marked = (v.private[pfn] & KVM_GMEM_FOLIO_NO_DIRECT_MAP) != 0
    pm = pfn[marked]
    fn = "kvm_gmem_folio_restore_direct_map"
    ev.add(fn, "restore", marked)
    checks.on_restore(m, pm, ev, marked)
    m.dmap.set_ptes(pm, True)
    checks.on_direct_map_change(m, pm, True)
    v.private[pm] &= ~np.uint8(KVM_GMEM_FOLIO_NO_DIRECT_MAP)
    ev.add("set_direct_map_valid_noflush", "dmap_set", marked, lambda i: {"level": "4K"})
    ev.add(fn, "marker_clear", marked)


def _free(m: Machine, pfn: Arr, freed: Mask, ev: Events, unmapped: bool = False) -> None:
    """``free_page_to_allocator()`` for ``pfn[freed]``, in order; ``unmapped``: frames of
    unmapped pageblocks, which ``free_unmapped_frame()`` takes (``truncate()`` made sure)."""
    pf = pfn[freed]
    if not len(pf):
        return
    if unmapped:
        design = cast("UnmappedAlloc", m.design)
        m.mem.mark_free_many(pf)
        design.free_list.extend(pf.tolist())
        blocks, counts = np.unique(pf >> PAGEBLOCK_ORDER, return_counts=True)
        for b, c in zip(blocks.tolist(), counts.tolist(), strict=True):
            design.nr_free[b] = design.nr_free.get(b, 0) + c
        ev.add("free_unref_folios", "free_page", freed, lambda i: {"freetype": "unmapped"})
        return
    checks.on_free_to_allocator(m, pf, ev, freed)
    if m.config.init_on_free:
        details = tlbsim.access_seq(m, m.current.cpu, pf)
        m.mem.zero_many(pf)
        nth = listed(np.cumsum(freed) - 1)
        ev.add("free_pages_prepare", "kernel_write", freed, lambda i: {"tlb": details[nth(i)]})
        ev.add("free_pages_prepare", "zero_page", freed)
    m.mem.mark_free_many(pf)
    m.alloc.give_many(pf)
    ev.add("free_unref_folios", "free_page", freed)




# --- kvm_mmu_unmap_gfn_range() -------------------------------------------------------------------
def unmap_gfn_range(m: Machine, kvm: Kvm, start: int, end: int, fn: str) -> int | None:
    """``Kvm.unmap_gfn_range()``: the entries zapped, or None if it cannot stand in."""
    if not usable(m) or is_td(m, kvm):
        return None
    s2count = m.mem.views().s2count
    zapped = 0
    entries = _Entries(kvm.spte, start, end)
    while True:
        gfns, pfns = entries.head(CHUNK)
        if not len(gfns):
            return zapped
        entries.drop(len(gfns))
        kvm.spte.erase_indices(gfns)
        _drop(s2count, pfns)
        ev = Events(m, pfns)
        ev.add(fn, "spte_zap", None, _gfns(kvm.id, gfns))
        ev.emit()
        zapped += len(gfns)


def _gfns(vm: int, gfns: Arr) -> DetailFn:
    gl = listed(gfns)
    return lambda i: {"vm": vm, "gfn": gl(i)}


# --- do_munmap()'s zap ------------------------------------------------------------------------------
def zap_user_range(m: Machine, vma: Vma) -> bool:
    """``zap_pte()`` for every PTE of ``vma``, in order; False if it cannot stand in."""
    if not usable(m):
        return False

    quiet = _quiet(vma)
    v = m.mem.views()

    def regular(pages: Arr, pfn: Arr) -> Mask:
        if not quiet:
            return np.zeros(len(pages), np.bool_)
        return v.refcount[pfn] > 1  # the PTE's put is not the last: nothing is freed

    def batch(pages: Arr, pfn: Arr) -> None:
        vma.ptes.erase_indices(pages)
        _drop(v.mapcount, pfn)
        _drop(v.refcount, pfn)
        ev = Events(m, pfn)
        ev.add("zap_pte_range", "pte_unmap", None, _addresses(vma, pages))
        ev.emit()

    def single(page: int, _pfn: int) -> None:
        run_sync(zap_pte(m, vma, page))

    _drive(_Entries(vma.ptes, 0, None), regular, batch, single)
    return True


# --- kvm_gmem_allocate() ------------------------------------------------------------------------------
def allocate(m: Machine, inode: Inode, start: int, end: int,
             one: Callable[[int], KGen[int]]) -> int | None:
    """``kvm_gmem_allocate()``'s loop over [start, end): 0 or -errno, None if it cannot stand in.

    ``one(index)`` is the loop body, for the pages that are not regular.
    """
    if not usable(m):
        return None
    pos = start
    window = CHUNK
    while pos < end:
        n = min(window, end - pos)
        r = folios.plan(m, inode, pos, np.ones(n, np.bool_), hwpoison=False, prepare=False)
        v = m.mem.views()
        if r.n:
            ev = Events(m, r.pfn)
            folios.run(m, r, ev, "")
            v.flags[r.pfn] &= ~np.uint8(PG_locked)
            checks.on_folio_unlock(m, r.pfn)
            v.refcount[r.pfn] -= 1
            ev.emit()
            pos += r.n
        if r.n < n:
            err = run_sync(one(pos))
            if err:
                return err
            pos += 1
            window = AFTER_IRREGULAR_WINDOW
        else:
            window = min(window * 2, CHUNK)
    return 0
