"""v9 as posted (Nikita Kalyazin, 2026-01-14), patches 01 and 07.

Message-ID ``20260114134510.1835-8-kalyazin@amazon.com`` (quoted in full in
Ackerley Tng's reply ``CAEvNRgFCwU7ezDV4Spj=H1JZohG9CSQRKMh_h1OGY1GrR2=7Eg``):

* ``kvm_gmem_folio_zap_direct_map()`` tests the marker and the inode flag itself,
  sets the marker *before* calling ``folio_zap_direct_map()`` (bug 4), and does
  not assert the folio lock.
* the user fault calls it unconditionally and handles its error;
  ``kvm_gmem_get_pfn()`` calls it *after* preparing the folio and ignores its
  return value (bugs 3 and 13: prepare then zap).
* ``->free_folio`` restores (if marked, WARN on error, clear the marker) and then
  invalidates (bug 13: restore then invalidate).
* ``folio_zap_direct_map()`` is per arch (patch 01): x86 flushes after the
  attribute change; arm64 relies on ``set_memory_valid()`` flushing.
* the arch hook takes no ``kvm``: x86 offers the flag to TDX and SNP VMs too;
  the system-wide answer is the arch hook's (no ``!kvm ||``).
* the guest fault path of that base tracks preparedness: ``kvm_gmem_prepare_folio()``
  zeroes, calls the arch prepare and marks the folio uptodate, only when not
  yet prepared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import (
    Design,
    GetPfnResult,
    clear_marker,
    gmem_mainline_flags,
    has_marker,
    inode_no_direct_map,
    kvm_gmem_get_pfn_done,
    kvm_gmem_get_pfn_folio,
    kvm_gmem_prepare_folio_tracked,
    set_marker,
)
from gmemlab.model.kvm.guest_memfd import kvm_arch_gmem_invalidate
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import GUEST_MEMFD_FLAG_NO_DIRECT_MAP

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm, Memslot
    from gmemlab.model.machine import Machine


class V9(Design):
    name: ClassVar[str] = "v9"
    title: ClassVar[str] = ("v9 as posted: marker before zap, prepare then zap with its error "
                            "ignored, restore then invalidate")
    source: ClassVar[str] = "20260114134510.1835-1-kalyazin@amazon.com"
    series: ClassVar[bool] = True
    uses_marker: ClassVar[bool] = True
    secretmem_sets_no_direct_map: ClassVar[bool] = True

    def kvm_gmem_get_supported_flags(self, m: Machine, vm_type: int | None) -> int:
        """No ``!kvm ||``: the system-wide answer is the arch hook's too."""
        flags = gmem_mainline_flags(m, vm_type)
        if self.kvm_arch_gmem_supports_no_direct_map(m, vm_type):
            flags |= GUEST_MEMFD_FLAG_NO_DIRECT_MAP
        return flags

    # kvm_arch_gmem_supports_no_direct_map(): base's with no VM type excluded (TDX from v10).

    def folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        """Per-arch ``folio_zap_direct_map()`` (v9 01/13)."""
        if not m.profile.has_set_direct_map:
            return 0
        ret = yield from set_direct_map_valid_noflush(m, folio, 1, False)
        if not m.profile.set_direct_map_flushes:
            yield from flush_tlb_kernel_range(m, folio, folio + 1, "folio_zap_direct_map")
        return ret

    def kvm_gmem_folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        fn = "kvm_gmem_folio_zap_direct_map"
        yield ("folio", folio)
        if has_marker(m, folio) or not inode_no_direct_map(m, folio):
            return 0
        yield from set_marker(m, folio, fn)
        m.trace.emit(fn, "zap", folio)
        return (yield from self.folio_zap_direct_map(m, folio))

    def kvm_gmem_folio_restore_direct_map(self, m: Machine, folio: int) -> KGen[None]:
        fn = "kvm_gmem_folio_restore_direct_map"
        if has_marker(m, folio):
            m.trace.emit(fn, "restore", folio)
            if m.inv.enabled:
                m.inv.on_restore(folio)
            yield from self.folio_restore_direct_map(m, folio)
            yield from clear_marker(m, folio, fn)

    def kvm_gmem_zap_for_handout(self, m: Machine, folio: int) -> KGen[int]:
        """The user fault zaps unconditionally (the helper checks the flag); handles the error."""
        return (yield from self.kvm_gmem_folio_zap_direct_map(m, folio))

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[GetPfnResult]:
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        r = 0
        if not m.mem.test_uptodate(folio):  # !is_prepared
            r = yield from kvm_gmem_prepare_folio_tracked(m, kvm, gfn, folio)
        yield from self.kvm_gmem_folio_zap_direct_map(m, folio)  # return value ignored
        return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))

    def kvm_gmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        yield from self.kvm_gmem_folio_restore_direct_map(m, pfn)
        yield from kvm_arch_gmem_invalidate(m, pfn)
    # secretmem moved onto the folio helpers only in v11: mainline's secretmem here.
