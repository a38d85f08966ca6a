"""v7 as posted (Patrick Roy, 2025-09-24), patches 05 and 06.

``20250924151101.2225820-*`` / ``20250924152214.7292-*-roypat@amazon.co.uk``
(05/12 quoted by David Hildenbrand, 06/12 by several reviewers):

* ``kvm_gmem_folio_zap_direct_map()`` neither checks the inode flag (bug 2: every
  guest_memfd folio is zapped) nor the folio lock; on success it "sets" the
  marker with ``&`` (bug 1: the bit never becomes 1) and flushes only if the
  read-only module parameter ``guest_memfd_tlb_flush`` (default true) says so.
* ``kvm_gmem_folio_restore_direct_map()`` restores only if marked (never, given
  bug 1) and does not clear the marker; ``->free_folio`` restores, then
  invalidates.
* guest fault: prepare, then zap with its error ignored, as in v9.

The flag bit and the capability follow the v12 uAPI here (v7 used its own
capability), so the same scenarios run on every design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import Design, has_marker
from gmemlab.model.designs.v9 import V9
from gmemlab.model.kvm.guest_memfd import KVM_GMEM_FOLIO_NO_DIRECT_MAP
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class V7(Design):
    name: ClassVar[str] = "v7"
    title: ClassVar[str] = "v7 as posted: marker set with '&', no flag check, optional flush"
    source: ClassVar[str] = "20250924151101.2225820-1-patrick.roy@campus.lmu.de"
    series: ClassVar[bool] = True
    uses_marker: ClassVar[bool] = True
    secretmem_sets_no_direct_map: ClassVar[bool] = True

    # What v7 shares with v9, line for line: the capability, the handout in the user fault,
    # the guest fault (prepare, then zap with the error ignored), restore-then-invalidate.
    kvm_gmem_get_supported_flags = V9.kvm_gmem_get_supported_flags
    kvm_gmem_zap_for_handout = V9.kvm_gmem_zap_for_handout
    kvm_gmem_get_pfn = V9.kvm_gmem_get_pfn
    kvm_gmem_free_folio = V9.kvm_gmem_free_folio

    def __init__(self, guest_memfd_tlb_flush: bool = True) -> None:
        self.guest_memfd_tlb_flush = guest_memfd_tlb_flush

    @property
    def flushes(self) -> bool:  # type: ignore[override]
        return self.guest_memfd_tlb_flush

    def kvm_gmem_folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        fn = "kvm_gmem_folio_zap_direct_map"
        yield ("folio", folio)
        if has_marker(m, folio):
            return 0
        m.trace.emit(fn, "zap", folio)
        r = yield from set_direct_map_valid_noflush(m, folio, 1, False)
        if not r:
            yield ("folio", folio)
            m.mem.private[folio] &= KVM_GMEM_FOLIO_NO_DIRECT_MAP  # sic: '&', not '|'
            m.trace.emit(fn, "marker_and", folio, {"private": m.mem.private[folio]})
            if self.guest_memfd_tlb_flush:
                yield from flush_tlb_kernel_range(m, folio, folio + 1, fn)
        return r

    def kvm_gmem_folio_restore_direct_map(self, m: Machine, folio: int) -> KGen[None]:
        if has_marker(m, folio):
            m.trace.emit("kvm_gmem_folio_restore_direct_map", "restore", folio)
            if m.inv.enabled:
                m.inv.on_restore(folio)
            yield from set_direct_map_valid_noflush(m, folio, 1, True)
