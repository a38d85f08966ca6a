"""The page-cache-level design requested after v12 (not posted as code).

Sean Christopherson (``aeemS2wm38Cm4qAf@google.com``) asked that an
``AS_NO_DIRECT_MAP`` folio have no direct map for its whole page-cache life:
zap in ``filemap_add_folio()``, restore in ``filemap_remove_folio()``; Takahiro
Itazuri (``20260508081812.12345-1-itazur@amazon.com``) agreed to do so and to
drop the ``folio->private`` marker.  What the model runs, and the choices it
had to make where the proposal is silent:

* insertion: a folio of an ``AS_NO_DIRECT_MAP`` mapping is zeroed and marked
  uptodate while still direct-mapped, then zapped and flushed, before it is
  visible in the xarray; a failed zap fails the insertion (``-ENOMEM``).  (How to
  zero an unmapped folio was open in July 2026; zeroing first is the choice
  that needs nothing new.)
* removal: restored right after the folio leaves the xarray, *before*
  ``->free_folio``, i.e. before ``kvm_arch_gmem_invalidate()``.  That is the
  reverse of v12's "invalidate then restore", which matters where the arch
  invalidate acts (SNP); the checker reports it.
* guest_memfd's user fault and ``kvm_gmem_get_pfn()`` are mainline's (no zap);
  secretmem inserts a zeroed folio and lets the page cache zap it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import (
    Design,
    FaultResult,
    secretmem_fault_common,
    zero_if_not_uptodate,
)
from gmemlab.model.designs.v12 import V12
from gmemlab.model.mm.filemap import AddressSpace, filemap_add_folio, mapping_no_direct_map
from gmemlab.model.mm.folio import folio_mark_uptodate
from gmemlab.model.mm.memory import Vma
from gmemlab.model.mm.page_alloc import clear_page
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class PageCache(V12):
    name: ClassVar[str] = "pagecache"
    title: ClassVar[str] = "page-cache-level proposal: zap on insertion, restore on removal"
    source: ClassVar[str] = "aeemS2wm38Cm4qAf@google.com; 20260508081812.12345-1-itazur@amazon.com"
    uses_marker: ClassVar[bool] = False

    def __init__(self) -> None:
        self.filemap_add_hook = self._filemap_add_zap
        self.filemap_remove_hook = self._filemap_remove_restore

    def _filemap_add_zap(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[int]:
        if not mapping_no_direct_map(mapping):
            return 0
        yield from zero_if_not_uptodate(m, folio, "filemap_add_folio")
        m.trace.emit("filemap_add_folio", "zap", folio)
        return (yield from self.folio_zap_direct_map(m, folio))

    def filemap_add_undo(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        if mapping_no_direct_map(mapping):
            yield from self.folio_restore_direct_map(m, folio)

    def _filemap_remove_restore(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        if mapping_no_direct_map(mapping):
            m.trace.emit("filemap_remove_folio", "restore", folio)
            if m.inv.enabled and mapping.kind == "guest_memfd":  # kvm_arch_gmem_invalidate: gmem's
                m.inv.on_restore(folio)
            yield from self.folio_restore_direct_map(m, folio)

    # guest_memfd runs mainline's paths: the page cache already did the work.
    kvm_gmem_zap_for_handout = Design.kvm_gmem_zap_for_handout
    kvm_gmem_restore_on_free = Design.kvm_gmem_restore_on_free

    def _secretmem_insert(self, m: Machine, mapping: AddressSpace, folio: int,
                          offset: int) -> KGen[int]:
        yield from folio_mark_uptodate(m, folio)
        return (yield from filemap_add_folio(m, mapping, folio, offset))

    def secretmem_fault(self, m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
        return (yield from secretmem_fault_common(m, vma, page, self._secretmem_insert))

    def secretmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        yield from clear_page(m, pfn, "secretmem_free_folio")
