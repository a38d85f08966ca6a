"""v12 with 2 MiB fault-around: a file's 2 MiB block is allocated, zeroed and zapped at once.

The idea: David Hildenbrand on v7 06/12
(``20250924152214.7292-3-roypat@amazon.co.uk``, ``series-spec.md`` §3.7):
"fault-around" a 2 MiB chunk with one flush.  Patrick Roy's objection was that
consecutive guest_memfd indices are not physically contiguous, so their
direct-map entries cannot be changed as one range; hugepage-backed guest_memfd
would cut flushes 512x.  Not posted as code.

The model answers the objection the way large folios would: when the page
cache needs a folio for index ``i`` of a ``NO_DIRECT_MAP`` guest_memfd and the
whole 2 MiB block of the file around ``i`` is absent (and inside ``i_size``:
``kvm_gmem_huge_index()``, the test of guest_memfd's THP patch),
:meth:`Zap2M.filemap_alloc_folio` takes a naturally aligned order-9 block of
frames and

1. zeroes all 512 frames while they are direct-mapped (zero before zap);
2. inserts the 511 siblings into the page cache, locked;
3. clears the block's direct map with one CPA call: where the block is still
   one 2 MiB leaf only the PMD's present bit changes, so nothing is split and
   no page table is allocated (a 1 GiB leaf is split to 2 MiB first);
4. flushes once, sets every marker, unlocks the siblings, and hands frame
   ``i`` back to the page cache, already zeroed, zapped and marked.

Faults on the other 511 indices then find a marked folio: no zap, no flush.
Otherwise (a partly populated block, a block crossing ``i_size``, no aligned
block free, or a lost insertion race) the folio is allocated and zapped as in
v12, one flush each.

What it costs elsewhere, honestly: the first fault pays for 512 zeroings and
keeps 2 MiB resident even if the guest touches one page; and the zap is no
longer at base-page granularity (v10's comment to Rick Edgecombe): freeing a
single folio restores one 4 KiB entry inside a not-present 2 MiB leaf, so the
*restore* now splits the leaf and needs a page-table allocation, which can
fail (``folio_restore_direct_map()`` then WARNs and the frame goes back to the
allocator unmapped).  Splits move from fault time to teardown time; a
workload that frees everything ends up as fragmented as v12.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs._block import set_direct_map_block_noflush
from gmemlab.model.designs.base import clear_marker, has_marker, set_marker
from gmemlab.model.designs.v12 import V12
from gmemlab.model.kvm.guest_memfd import kvm_gmem_huge_index
from gmemlab.model.mm.filemap import AddressSpace, filemap_add_folio, mapping_no_direct_map
from gmemlab.model.mm.folio import folio_put, folio_unlock
from gmemlab.model.mm.memmap import KIND_FILE, PG_uptodate
from gmemlab.model.mm.page_alloc import alloc_block, clear_page
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

FN = "kvm_gmem_fault_around"


class Zap2M(V12):
    name: ClassVar[str] = "zap2m"
    title: ClassVar[str] = "v12 with 2 MiB fault-around: allocate, zero, zap and flush a 2 MiB block at once"
    source: ClassVar[str] = "David Hildenbrand on v7 06/12 (20250924152214.7292-3-roypat@amazon.co.uk)"

    def __init__(self) -> None:
        # A no-op insertion hook, so that the page cache calls filemap_add_undo() when
        # inserting an already-zapped frame loses a race.
        self.filemap_add_hook = self._insert

    def _insert(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[int]:
        yield from ()
        return 0

    def filemap_add_undo(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        """The frame of a block lost its insertion race: restore it before it is freed."""
        if has_marker(m, folio):
            # Never prepared, so nothing to invalidate first.
            yield from self.folio_restore_direct_map(m, folio)
            yield from clear_marker(m, folio, "filemap_add_undo")

    def filemap_alloc_folio(self, m: Machine, mapping: AddressSpace, index: int) -> KGen[int]:
        first = kvm_gmem_huge_index(mapping, index)
        if mapping.kind != "guest_memfd" or not mapping_no_direct_map(mapping) or first < 0:
            return (yield from super().filemap_alloc_folio(m, mapping, index))
        base = yield from alloc_block(m, KIND_FILE, FN, large=self.large_folios)
        if base < 0:
            return (yield from super().filemap_alloc_folio(m, mapping, index))
        mine = base + index - first
        mem = m.mem
        for pfn in range(base, base + PAGES_PER_PMD):
            yield from clear_page(m, pfn, FN)
            mem.flags[pfn] |= PG_uptodate
        inserted: list[int] = []
        for k in range(PAGES_PER_PMD):
            pfn = base + k
            if pfn == mine:
                continue
            if (yield from filemap_add_folio(m, mapping, pfn, first + k)):
                yield from folio_put(m, pfn)  # lost a race: still direct-mapped, freed as is
            else:
                inserted.append(pfn)
        zapped = yield from self._zap(m, base, [*inserted, mine], whole=len(inserted) == PAGES_PER_PMD - 1)
        yield from flush_tlb_kernel_range(m, base, base + PAGES_PER_PMD, FN)
        for pfn in zapped:
            if not has_marker(m, pfn):  # set for the whole folio at its first page if large
                yield from set_marker(m, pfn, FN)
        for pfn in inserted:
            yield from folio_unlock(m, pfn)
            yield from folio_put(m, pfn)  # the allocation's reference; the page cache keeps its own
        m.trace.emit(FN, "fault_around", mine, {"block": base, "index": index, "inserted": len(inserted)})
        return mine

    def _zap(self, m: Machine, base: int, frames: list[int], *, whole: bool) -> KGen[list[int]]:
        """Clear the direct map of ``frames``: one 2 MiB CPA call if the block is whole."""
        m.trace.emit(FN, "zap", base, {"pages": len(frames), "whole": whole})
        if whole:
            r = yield from set_direct_map_block_noflush(m, base, False)
            return [] if r else frames
        zapped = []
        for pfn in frames:
            if not (yield from set_direct_map_valid_noflush(m, pfn, 1, False)):
                zapped.append(pfn)
        return zapped
