"""Posted v12 plus Firecracker's internal patch 0039: the flush behind a module parameter.

This is *not* Firecracker's kernel: that is v6.18 with a port of the series
(``fc-6.18``, :mod:`gmemlab.model.designs.fc618`), whose guest fault differs.
Here posted v12, on the kvm/next base it was posted against, gets only 0039
(``linux_patches/10-direct-map-removal/
0039-internal-x86-conditional-tlb-flush-after-zapping-dir.patch``, 2026-01-12):
it removes the flush from ``folio_zap_direct_map()`` and flushes in
``kvm_gmem_folio_zap_direct_map()`` only if the read-only module parameter
``guest_memfd_tlb_flush`` is set, default false.  The flush there follows the
zap whatever it returned (the marker is set only on success, the flush is not
inside that test).  As a side effect secretmem, which zaps through the same
helper since v11, loses its flush too.

A translation cached before the zap (the zeroing CPU always has one) stays
usable until something else evicts it: the window v7 06/12 admitted ("an
attacker could keep a stale TLB entry alive").
"""

from __future__ import annotations

from errno import EINVAL
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import has_marker, inode_no_direct_map, set_marker
from gmemlab.model.designs.v12 import V12
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class NoFlush(V12):
    name: ClassVar[str] = "noflush"
    title: ClassVar[str] = ("posted v12 + Firecracker's patch 0039 alone: the flush behind "
                            "guest_memfd_tlb_flush=false (not Firecracker's kernel: fc-6.18)")
    source: ClassVar[str] = ("20260410151746.61150-1-kalyazin@amazon.com + firecracker "
                             "feature/secret-hiding patch 0039")

    def __init__(self, guest_memfd_tlb_flush: bool = False) -> None:
        self.guest_memfd_tlb_flush = guest_memfd_tlb_flush

    @property
    def flushes(self) -> bool:  # type: ignore[override]
        return self.guest_memfd_tlb_flush

    def folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        """``folio_zap_direct_map()`` after 0039: ``set_direct_map_valid_noflush()`` alone."""
        if not m.profile.has_set_direct_map:
            return 0
        return (yield from set_direct_map_valid_noflush(m, folio, 1, False))

    def kvm_gmem_folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        """``kvm_gmem_folio_zap_direct_map()`` after 0039: v12's, then
        ``if (guest_memfd_tlb_flush) flush_tlb_kernel_range()`` whatever the zap returned."""
        fn = "kvm_gmem_folio_zap_direct_map"
        yield ("folio", folio)
        if not inode_no_direct_map(m, folio):
            m.trace.emit(fn, "warn_on_once", folio, {"err": "EINVAL"})
            return -EINVAL
        if has_marker(m, folio):
            return 0
        m.trace.emit(fn, "zap", folio)
        r = yield from self.folio_zap_direct_map(m, folio)
        if not r:
            yield from set_marker(m, folio, fn)
        if self.guest_memfd_tlb_flush:  # after a failed zap too
            yield from flush_tlb_kernel_range(m, folio, folio + 1, fn)
        return r
