"""A pool of frames kept out of the direct map (the ALLOC_UNMAPPED / "mermap" idea).

The idea: Brendan Jackman on v7 06/12 (``DDVS9ITBCE2Z.RSTLCU79EX8G@google.com``)
proposed grouping unmapped pages in whole pageblocks (a "freetype"), so flushes
are only needed when a pageblock changes sides; after v12 he tied the series to
his ALLOC_UNMAPPED allocator and the "mermap"
(``20260320-page_alloc-unmapped-v2-0-28bf1bd54f41@google.com``, ``series-spec.md``
§7.4), whose last patch makes the page cache allocate ``AS_NO_DIRECT_MAP`` folios
already unmapped.  The July 2026 discussion left zeroing open (an unmapped folio
cannot be zeroed through the direct map; ALLOC_UNMAPPED forbids ``__GFP_ZERO``).

What the model runs:

* The page cache takes every folio of a ``NO_DIRECT_MAP`` guest_memfd from the
  pool (:meth:`UnmappedPool.filemap_alloc_folio`).  An empty pool is refilled
  with a naturally aligned 2 MiB pageblock: one CPA call clears its 2 MiB leaf
  (no split unless it sits in a 1 GiB leaf) and one flush follows.  Without an
  aligned block the pool takes one order-0 frame and zaps it alone (v12's cost).
* The frame is zeroed through a per-CPU temporary mapping (the mermap): map it
  on this CPU, clear it, unmap it and flush this CPU's TLB only (no IPI: nobody
  else ever had the mapping).  It enters the page cache zeroed, uptodate and
  unmapped, so guest_memfd's faults are mainline's: no zap, no flush, no marker.
* ``->free_folio`` keeps the frame (the pool holds a reference, so it never
  reaches the page allocator) and puts it back in the pool, still unmapped: no
  restore, no direct-map change.  With ``init_on_free`` it is zeroed through the
  mermap on the way back.  The pool never shrinks.

Exposure: while a frame sits in the mermap of a CPU (map, clear, unmap: one
step holds data) a gadget on that CPU can read whatever the frame held, i.e.
the previous guest's data when frames are reused.  Guest data left in freed
frames is otherwise unreachable.  Cost: pageblock refills are rare; steady
state faults change no direct-map entry.  Memory taken by the pool is gone from
the rest of the kernel until a shrinker (not modelled) gives it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs._block import folio_zap_direct_map_noflush, set_direct_map_block_noflush
from gmemlab.model.designs.base import Design
from gmemlab.model.designs.v12 import V12
from gmemlab.model.mm.filemap import AddressSpace, mapping_no_direct_map
from gmemlab.model.mm.folio import folio_put
from gmemlab.model.mm.memmap import KIND_FILE, KIND_KERNEL, PG_locked, PG_uptodate
from gmemlab.model.mm.page_alloc import GFP_KERNEL, alloc_block, alloc_page
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class UnmappedPool(V12):
    name: ClassVar[str] = "pool"
    title: ClassVar[str] = "unmapped frame pool: 2 MiB pageblocks out of the direct map, zeroed via a mermap"
    source: ClassVar[str] = ("Brendan Jackman: DDVS9ITBCE2Z.RSTLCU79EX8G@google.com; "
                             "20260320-page_alloc-unmapped-v2-0-28bf1bd54f41@google.com")
    uses_marker: ClassVar[bool] = False

    def __init__(self) -> None:
        self.owned: set[int] = set()  # frames the pool took from the page allocator
        self.free: list[int] = []  # pool frames not in use, out of the direct map
        self.mermap: dict[int, list[int]] = {}  # cpu -> frames it has temporarily mapped

    def temporary_mapping_cpus(self, pfn: int) -> list[int]:
        """CPUs whose mermap maps ``pfn`` right now (a kernel translation to it)."""
        return [cpu for cpu, frames in self.mermap.items() if pfn in frames]

    # --- allocation ---------------------------------------------------------------------------
    def filemap_alloc_folio(self, m: Machine, mapping: AddressSpace, index: int) -> KGen[int]:
        if mapping.kind != "guest_memfd" or not mapping_no_direct_map(mapping):
            return (yield from super().filemap_alloc_folio(m, mapping, index))
        pfn = yield from self._take(m)
        if pfn < 0:
            return pfn
        m.mem.reset_for_alloc(pfn, KIND_FILE)
        yield from self.mermap_clear_page(m, pfn, "filemap_alloc_folio")
        m.mem.flags[pfn] |= PG_uptodate
        return pfn

    def _take(self, m: Machine) -> KGen[int]:
        """A free pool frame nobody else still references (refilling if there is none)."""
        while True:
            yield ("pool", id(self))
            mem = m.mem
            for i in range(len(self.free) - 1, -1, -1):
                pfn = self.free[i]
                # A frame whose truncation has not finished yet is still referenced or locked.
                if mem.refcount[pfn] == 1 and not mem.flags[pfn] & PG_locked:
                    del self.free[i]
                    return pfn
            r = yield from self._refill(m)
            if r:
                return r

    def _refill(self, m: Machine) -> KGen[int]:
        """Take a 2 MiB pageblock (or one frame) out of the direct map, with one flush."""
        fn = "unmapped_pool_refill"
        base = yield from alloc_block(m, KIND_KERNEL, fn)
        if base >= 0:
            frames = range(base, base + PAGES_PER_PMD)
            r = yield from set_direct_map_block_noflush(m, base, False)
        else:
            base = yield from alloc_page(m, GFP_KERNEL, kind="kernel")
            if base < 0:
                return base
            frames = range(base, base + 1)
            r = yield from folio_zap_direct_map_noflush(m, base)
        if r:
            for pfn in frames:
                yield from folio_put(m, pfn)  # still direct-mapped: back to the allocator as is
            return r
        yield from flush_tlb_kernel_range(m, frames.start, frames.stop, fn)
        self.owned.update(frames)
        self.free.extend(reversed(frames))  # handed out in ascending order
        m.trace.emit(fn, "pool_refill", base, {"pages": len(frames)})
        return 0

    def mermap_clear_page(self, m: Machine, pfn: int, fn: str) -> KGen[None]:
        """Zero ``pfn`` through this CPU's temporary mapping; only this CPU's TLB is flushed."""
        cpu = m.current.cpu
        mapped = self.mermap.setdefault(cpu, [])
        yield ("mermap", (cpu, pfn))
        mapped.append(pfn)
        m.trace.emit(fn, "mermap_map", pfn, {"cpu": cpu})
        yield ("mermap", (cpu, pfn))
        m.mem.zero(pfn)
        m.trace.emit(fn, "zero_page", pfn, {"via": "mermap"})
        yield ("mermap", (cpu, pfn))
        mapped.remove(pfn)
        m.trace.emit(fn, "mermap_unmap", pfn, {"cpu": cpu})
        m.trace.count("flush_tlb_local")

    # --- guest_memfd: the frames come unmapped, so the faults are mainline's --------------------
    kvm_gmem_zap_for_handout = Design.kvm_gmem_zap_for_handout
    kvm_gmem_restore_on_free = Design.kvm_gmem_restore_on_free

    def holds_unmapped(self, m: Machine, pfn: int) -> bool:
        """Every frame the pool took stays out of the direct map, in use or not."""
        return pfn in self.owned

    def free_unmapped_frame(self, m: Machine, pfn: int) -> KGen[bool]:
        """A pool frame's last reference went (truncation, or a lost insertion race):
        back to the pool, still unmapped, never to the page allocator."""
        if pfn not in self.owned:
            return False
        if m.config.init_on_free:
            yield from self.mermap_clear_page(m, pfn, "free_pages_prepare")
        mem = m.mem
        mem.kind[pfn] = KIND_KERNEL
        mem.refcount[pfn] = 1  # the pool's reference
        mem.flags[pfn] = 0
        mem.mapping[pfn] = 0
        self.free.append(pfn)
        m.trace.emit("free_unref_folios", "pool_free", pfn)
        return True
