"""``AS_NO_DIRECT_MAP`` on ALLOC_UNMAPPED and the mermap: the page cache's fast path as posted.

Brendan Jackman, "mm: Add __GFP_UNMAPPED" (RFC ``20260225-page_alloc-unmapped-v1-0-e8808a03cd66@google.com``,
2026-02-25; v2 ``20260320-page_alloc-unmapped-v2-0-28bf1bd54f41@google.com``, 2026-03-20,
reviewed in May; v3 ``20260726-page_alloc-unmapped-v3-0-6f5729aa9832@google.com``), whose
flag became the mm-internal ``ALLOC_UNMAPPED`` ("Then I'm gonna add alloc_flags to
the __ variant so filemap.c can set ALLOC_UNMAPPED for AS_NO_DIRECT_MAP", 2026-07-15,
in reply to ``fa67d62e-41bb-4d78-83d1-18461542aff1@kernel.org``'s thread).  The code
modelled is the v4 tree's (``bjackman/linux``: ``mm/filemap.c`` at ``0c5bffae10ec``,
``include/linux/pagemap.h`` at ``e267797c27b1``, ``include/linux/freetype.h``), its last
patch "mm: add fast path for AS_NO_DIRECT_MAP".  ``docs/next-shape.md`` has the
quotes, and what was not found.

* Allocation (``mapping_alloc_flags()``): ``__filemap_get_folio()`` allocates a
  folio of an ``AS_NO_DIRECT_MAP`` mapping with ``ALLOC_UNMAPPED``; it comes off the
  free list of freetype ``MIGRATE_UNMOVABLE|FREETYPE_UNMAPPED`` (the only unmapped
  freetype with a list, ``freetype_idx()``).  An empty list takes a whole pageblock
  of mapped memory, clears its direct map and flushes once
  (``__rmqueue_direct_map()``): "Doing this at pageblock granularity ensures that
  the pageblock flags can be used to infer which freetype a page belongs to. It
  also provides nice batching of TLB flushes".  ``ALLOC_UNMAPPED`` is incompatible
  with ``__GFP_ZERO``: the allocator never zeroes these pages.
* Insertion (fast ``prep_add_unmapped_folio()``): ``mermap_clear_folio()`` zeroes
  the folio through the mermap and ``mapping_set_mermap_stale()`` records that a
  mermap translation to it may survive in a TLB.
* Removal (fast ``prep_remove_unmapped_folio()``): "Folio is not going back in the
  direct map so no need to zero it here"; ``mapping_check_flush_mermap()`` flushes
  the mermap if the mapping is marked stale.  The folio then goes back to the
  unmapped free list: no direct-map change, no flush, no zeroing.

* The reverse flip: when the mapped free lists run dry, a wholly free unmapped
  pageblock is mapped back and zeroed ("when a block is mapped it needs to be
  zeroed to ensure no residual data is available", RFC 17/19).

Not modelled: compaction, partly free blocks changing sides, and the per-CPU
page lists (one extra pcplist bank per CPU for the unmapped freetype).
"""

from __future__ import annotations

from errno import ENOMEM
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs._block import set_direct_map_block_noflush
from gmemlab.model.designs.filemap_nodm import FilemapZap
from gmemlab.model.mm.filemap import AddressSpace, mapping_no_direct_map
from gmemlab.model.mm.folio import folio_put
from gmemlab.model.mm.memmap import FRAME_FREE, KIND_FILE, KIND_KERNEL, KIND_NONE
from gmemlab.model.mm.mermap import Mermap, mermap_flush_tlb, mermap_get, mermap_put
from gmemlab.model.mm.page_alloc import alloc_block, clear_page
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

PAGEBLOCK_ORDER = 9  # x86-64: pageblock_order = HPAGE_PMD_ORDER
# Bit numbers of enum mapping_flags.  The v4 tree has AS_NO_DIRECT_MAP = 11 and
# AS_MERMAP_STALE = 12; the model keeps v12's AS_NO_DIRECT_MAP = 12, so the stale bit
# takes the next one.
AS_MERMAP_STALE = 13


class UnmappedAlloc(FilemapZap):
    """The page cache allocates ``AS_NO_DIRECT_MAP`` folios unmapped and zeroes them via the mermap."""

    name: ClassVar[str] = "unmapped"
    title: ClassVar[str] = ("page cache allocates AS_NO_DIRECT_MAP folios with ALLOC_UNMAPPED "
                            "(pageblock flips) and zeroes them through the mermap (fast path as posted)")
    source: ClassVar[str] = ("20260320-page_alloc-unmapped-v2-0-28bf1bd54f41@google.com; "
                             "bjackman/linux mm/filemap.c@0c5bffae10ec")

    def __init__(self) -> None:
        super().__init__()
        # Pageblocks (pfn >> PAGEBLOCK_ORDER) whose freetype has FREETYPE_UNMAPPED.
        self.unmapped_blocks: set[int] = set()
        # free_area[0].free_list[MIGRATE_UNMOVABLE | FREETYPE_UNMAPPED]: LIFO, as the
        # pcplists hand back the page freed last.
        self.free_list: list[int] = []
        self.nr_free: dict[int, int] = {}  # pageblock -> its pages on the unmapped free list
        self.mermap = Mermap()

    # --- mm/page_alloc.c: the unmapped freetype -----------------------------------------------
    def filemap_alloc_folio(self, m: Machine, mapping: AddressSpace, index: int) -> KGen[int]:
        """``__filemap_alloc_folio(gfp, order, policy, mapping_alloc_flags(mapping))``.

        ``mapping_alloc_flags()``: ``ALLOC_UNMAPPED`` for an ``AS_NO_DIRECT_MAP``
        mapping (with ``CONFIG_MERMAP``), ``ALLOC_DEFAULT`` otherwise.
        """
        if not mapping_no_direct_map(mapping):
            return (yield from super().filemap_alloc_folio(m, mapping, index))
        return (yield from self.rmqueue_unmapped(m))

    def rmqueue_unmapped(self, m: Machine) -> KGen[int]:
        """``get_page_from_freelist()`` for ``ALLOC_UNMAPPED``: the unmapped list, else a flip.

        No zeroing, whatever ``init_on_alloc`` says: the page is not in the direct map
        and ``ALLOC_UNMAPPED`` excludes ``__GFP_ZERO`` (``mapping_set_no_direct_map()``
        WARNs on a mapping gfp with it); the page cache zeroes it.
        """
        fn = "get_page_from_freelist"
        while True:
            yield ("alloc", "zone")
            if self.free_list:
                if m.faults.should_fail("page_alloc"):
                    m.trace.emit(fn, "alloc_fail", -1, {"err": "ENOMEM"})
                    return -ENOMEM
                pfn = self.free_list.pop()
                self.nr_free[pfn >> PAGEBLOCK_ORDER] -= 1
                m.mem.reset_for_alloc(pfn, KIND_FILE)
                m.trace.emit(fn, "alloc_page", pfn, {"kind": "file", "freetype": "unmapped"})
                return pfn
            r = yield from self.rmqueue_direct_map(m)
            if r:
                return r

    def rmqueue_direct_map(self, m: Machine) -> KGen[int]:
        """``__rmqueue_direct_map()`` towards ``FREETYPE_UNMAPPED`` (RFC 17/19; v4 "implement
        FREETYPE_UNMAPPED allocations"): take a pageblock of mapped memory, unmap it, flush.

        "Need to [un]map a whole pageblock (otherwise it might require allocating
        pagetables)": ``__rmqueue(zone, max(order, pageblock_order), ft_other)``, then,
        with the zone lock dropped, ``set_direct_map_valid_noflush()`` and one
        ``flush_tlb_kernel_range()`` over the block; gated on ``can_set_direct_map()``.
        Where the block is still one 2 MiB leaf the PMD's present bit flips: no split,
        no page-table allocation.  The block's frames join the unmapped free list.

        Our choices (not in what was read): a CPA failure gives the block back to the
        mapped lists as it is; with no free pageblock the allocation fails (-ENOMEM),
        as the model has no compaction ("always direct compact for unmapped allocs").
        """
        fn = "__rmqueue_direct_map"
        if not m.profile.can_set_direct_map:
            return -ENOMEM
        base = yield from alloc_block(m, KIND_KERNEL, fn)
        if base < 0:
            return base
        frames = range(base, base + PAGES_PER_PMD)
        r = yield from set_direct_map_block_noflush(m, base, False)
        if r:
            for pfn in frames:
                yield from folio_put(m, pfn)  # still mapped: back to the mapped lists
            return r
        yield from flush_tlb_kernel_range(m, frames.start, frames.stop, fn)
        yield ("alloc", "zone")
        self.unmapped_blocks.add(base >> PAGEBLOCK_ORDER)  # set_pageblock_freetype(): FREETYPE_UNMAPPED
        for pfn in reversed(frames):  # handed out in ascending order
            self._free_to_unmapped_list(m, pfn)
        m.trace.emit(fn, "pageblock_unmapped", base, {"pages": len(frames)})
        return 0

    def _free_to_unmapped_list(self, m: Machine, pfn: int) -> None:
        m.mem.mark_free(pfn)
        self.free_list.append(pfn)
        block = pfn >> PAGEBLOCK_ORDER
        self.nr_free[block] = self.nr_free.get(block, 0) + 1

    def map_unmapped_block(self, m: Machine) -> KGen[bool]:
        """``__rmqueue_direct_map()`` towards the mapped freetype: a free unmapped pageblock
        goes back to the direct map, zeroed, and its pages to the mapped free lists.

        RFC 17/19: "when a block is mapped it needs to be zeroed to ensure no
        residual data is available" (the stored excerpt stops there), and the
        block is taken whole under the zone lock, then mapped with the lock
        dropped.  Mapping needs no flush.  Our choices: only a wholly free block
        (the model has no buddy merging of partly free ones), the lowest first;
        it is zeroed through the direct map once mapped.
        """
        fn = "__rmqueue_direct_map"
        yield ("alloc", "zone")
        free = sorted(b for b, n in self.nr_free.items() if n == PAGES_PER_PMD)
        if not free:
            return False
        block = free[0]
        base = block << PAGEBLOCK_ORDER
        frames = range(base, base + PAGES_PER_PMD)
        self.free_list = [pfn for pfn in self.free_list if pfn >> PAGEBLOCK_ORDER != block]
        del self.nr_free[block]
        self.unmapped_blocks.discard(block)  # set_pageblock_freetype(): mapped again
        mem = m.mem
        for pfn in frames:
            mem.reset_for_alloc(pfn, KIND_KERNEL)
        r = yield from set_direct_map_block_noflush(m, base, True)
        if r:  # still unmapped: back to the unmapped list
            self.unmapped_blocks.add(block)
            for pfn in frames:
                self._free_to_unmapped_list(m, pfn)
            return False
        for pfn in frames:
            yield from clear_page(m, pfn, fn)
        yield ("alloc", "zone")
        for pfn in frames:
            mem.state[pfn] = FRAME_FREE
            mem.kind[pfn] = KIND_NONE
            mem.refcount[pfn] = 0
            m.alloc.give(pfn)
        m.trace.emit(fn, "pageblock_mapped", base, {"pages": len(frames)})
        return True

    def free_unmapped_frame(self, m: Machine, pfn: int) -> KGen[bool]:
        """``free_unref_folios()`` -> ``__free_one_page()`` with the pageblock's freetype.

        A page of an unmapped pageblock goes back to the unmapped free list, still
        out of the direct map and not zeroed.  With ``init_on_free`` the kernel
        would zero it through the direct map and oops; what the series does about
        that was not found: our choice zeroes it through the mermap.
        """
        if pfn >> PAGEBLOCK_ORDER not in self.unmapped_blocks:
            return False
        if m.config.init_on_free:
            yield from self.mermap_clear_folio(m, pfn, "free_pages_prepare")
        self._free_to_unmapped_list(m, pfn)
        m.trace.emit("free_unref_folios", "free_page", pfn, {"freetype": "unmapped"})
        return True

    def holds_unmapped(self, m: Machine, pfn: int) -> bool:
        """A free page of a ``FREETYPE_UNMAPPED`` pageblock: out of the direct map on purpose."""
        return pfn >> PAGEBLOCK_ORDER in self.unmapped_blocks and not m.mem.allocated(pfn)

    # --- mm/filemap.c: the fast path ------------------------------------------------------------
    def prep_add_unmapped_folio(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[int]:
        """Fast ``prep_add_unmapped_folio()``: ``mermap_mm_prepare()``, ``mermap_clear_folio()``,
        ``mapping_set_mermap_stale()``.

        ``mermap_mm_prepare(current->mm)`` sets up the mm's mermap once (it can fail
        with -ENOMEM allocating per-CPU data); the model's exists from boot.
        """
        if not mapping_no_direct_map(mapping):
            return 0
        yield from self.mermap_clear_folio(m, folio, "prep_add_unmapped_folio")
        yield ("mapping_flags", mapping.id)
        mapping.set(AS_MERMAP_STALE)
        yield from self.mark_zeroed(m, folio)
        return 0

    def prep_remove_unmapped_folio(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        """Fast ``prep_remove_unmapped_folio()``: only ``mapping_check_flush_mermap(mapping)``."""
        if not mapping_no_direct_map(mapping):
            return
        yield from self.mapping_check_flush_mermap(m, mapping)

    def mapping_check_flush_mermap(self, m: Machine, mapping: AddressSpace) -> KGen[None]:
        """``mapping_check_flush_mermap()``: if ``mapping_grab_mermap_stale()`` (test-and-clear
        ``AS_MERMAP_STALE``), flush the mermap.

        The body was not found in the archives reachable here (it is in
        ``mm/internal.h`` of patch 26/26).  Our choice follows ``mermap_get()``'s
        contract ("The caller must also perform a full TLB flush of the region
        before freeing the pages that have been mapped here"): every CPU's mermap
        translations go, this CPU first, the others by IPI.
        """
        yield ("mapping_flags", mapping.id)
        if not mapping.test(AS_MERMAP_STALE):
            return
        mapping.flags &= ~(1 << AS_MERMAP_STALE)
        me = m.current.cpu
        ncpus = m.tlb.ncpus
        for cpu in [me, *(c for c in range(ncpus) if c != me)]:
            yield from mermap_flush_tlb(m, self.mermap, cpu, "mapping_check_flush_mermap")
        ipis = 0 if m.profile.tlb_broadcast else ncpus - 1
        m.trace.count("flush_tlb_mermap")
        if ipis:
            m.trace.count("ipi", ipis)

    def mermap_clear_folio(self, m: Machine, pfn: int, fn: str) -> KGen[None]:
        """``mermap_clear_folio()``: zero a page the direct map does not cover.

        Its body was not found here; what the model runs is ``mermap_get()``, a
        clear through that mapping, ``mermap_put()`` (RFC v2 20/22 zeroed
        ``__GFP_UNMAPPED|__GFP_ZERO`` pages the same way, falling back to
        ``mermap_get_reserved()``).  No TLB flush: the translation this CPU filled
        survives until its region wraps or the mapping's next
        ``mapping_check_flush_mermap()``.
        """
        yield from mermap_get(m, self.mermap, pfn, fn)
        yield ("mermap", (m.current.cpu, pfn))
        m.mem.zero(pfn)
        m.trace.emit(fn, "zero_page", pfn, {"via": "mermap"})
        yield from mermap_put(m, self.mermap, pfn, fn)

    def temporary_mapping_cpus(self, pfn: int) -> list[int]:
        """CPUs with a mermap translation to ``pfn``, live or stale (for ``gmemlab expose``)."""
        return self.mermap.cpus_reaching(pfn)
