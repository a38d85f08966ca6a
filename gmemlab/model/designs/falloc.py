"""v12 plus zap-at-fallocate: fallocate zeroes, zaps and flushes its range in chunks.

The idea: David Hildenbrand on v7 06/12
(``20250924152214.7292-3-roypat@amazon.co.uk``, ``series-spec.md`` §3.7):
flush once per fallocate range instead of once per fault.  Patrick Roy's
answer is the catch: Firecracker faults memory in on demand and never
preallocates, so it would not benefit.  Not posted as code.

What the model runs, on a ``GUEST_MEMFD_FLAG_NO_DIRECT_MAP`` file:

* ``kvm_gmem_allocate()`` takes each folio of the range locked, zeroes it while
  it is still direct-mapped (zero before zap, as v12), and clears its
  direct-map entry without flushing.  After every ``chunk`` folios (512 by
  default, one 2 MiB stretch of the file) one ``flush_tlb_kernel_range()``
  covers them; only then are their markers set and their locks dropped, so no
  fault can see a marked folio before its flush.  Holding up to ``chunk``
  folio locks is the price; taking them in index order keeps it deadlock-free
  against the page cache's other multi-folio lockers.
* Faults then find the marker and skip both the zap and the flush.  Faults on
  folios fallocate did not cover behave as v12 (zap and flush each).
* Files without the flag, and everything else, are v12.

Exposure: none added.  Stale contents of reused frames are zeroed at
fallocate time instead of at the first fault, which shortens that window.
Cost moves to fallocate, and memory that is preallocated but never touched is
zeroed and removed anyway.
"""

from __future__ import annotations

from errno import EINTR, EINVAL
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs._block import folio_zap_direct_map_noflush
from gmemlab.model.designs.base import has_marker, set_marker, zero_if_not_uptodate
from gmemlab.model.designs.v12 import V12
from gmemlab.model.kvm.guest_memfd import kvm_gmem_get_folio, kvm_gmem_no_direct_map
from gmemlab.model.mm.folio import folio_put, folio_unlock
from gmemlab.model.mm.locks import down_read, up_read
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGE_SHIFT, PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.fs import Inode
    from gmemlab.model.machine import Machine



class FallocRange(V12):
    name: ClassVar[str] = "falloc"
    title: ClassVar[str] = "v12 plus zap at fallocate: one flush per fallocate chunk"
    source: ClassVar[str] = "David Hildenbrand on v7 06/12 (20250924152214.7292-3-roypat@amazon.co.uk)"

    def __init__(self, chunk: int = PAGES_PER_PMD) -> None:
        if chunk < 1:
            raise ValueError("a chunk holds at least one folio")
        self.chunk = chunk

    def kvm_gmem_allocate(self, m: Machine, inode: Inode, offset: int, length: int) -> KGen[int]:
        if not kvm_gmem_no_direct_map(inode):
            return (yield from super().kvm_gmem_allocate(m, inode, offset, length))
        if offset + length > inode.size:
            return -EINVAL
        lock = inode.mapping.invalidate_lock
        yield from down_read(m, lock)
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        r = 0
        for first in range(start, end, self.chunk):
            r = yield from self._allocate_chunk(m, inode, first, min(end, first + self.chunk))
            if r:
                break
        yield from up_read(m, lock)
        return r

    def _allocate_chunk(self, m: Machine, inode: Inode, start: int, end: int) -> KGen[int]:
        fn = "kvm_gmem_allocate"
        held: list[int] = []  # zapped, locked, waiting for the chunk's flush
        r = 0
        for index in range(start, end):
            if m.faults.should_fail("signal_pending"):
                r = -EINTR
                break
            folio = yield from kvm_gmem_get_folio(m, inode, index)
            if folio < 0:
                r = folio
                break
            if not has_marker(m, folio):
                yield from zero_if_not_uptodate(m, folio, fn)
                m.trace.emit(fn, "zap", folio)
                r = yield from folio_zap_direct_map_noflush(m, folio)
                if not r:
                    held.append(folio)
                    continue
            yield from folio_unlock(m, folio)
            yield from folio_put(m, folio)
            if r:
                break
        if held:
            yield from flush_tlb_kernel_range(m, min(held), max(held) + 1, fn)
        for folio in held:
            yield from set_marker(m, folio, fn)
            yield from folio_unlock(m, folio)
            yield from folio_put(m, folio)
        return r
