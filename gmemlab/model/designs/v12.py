"""v12, the reference design (Nikita Kalyazin, 2026-04-10).

Patches 02 (``folio_{zap,restore}_direct_map`` in ``mm/memory.c``), 03
(secretmem on those helpers), 06 (``AS_NO_DIRECT_MAP``), 08/09 (arch hooks) and
10 (the flag), Message-ID ``20260410151746.61150-*-kalyazin@amazon.com``.

* Zap when a mapping is established (user fault, ``kvm_gmem_get_pfn``), under
  the folio lock, marker set only after a successful zap; zap then prepare.
* ``folio_zap_direct_map()`` always flushes the kernel TLB after the attribute
  change, even when the change failed; it rejects large folios.
* ``->free_folio``: invalidate then restore (if marked), restore clears the marker.
* Advertised per VM: x86 except TDX and SNP; arm64 with can_set_direct_map() and
  S2FWB; always in the system-wide answer.
"""

from __future__ import annotations

from errno import EINVAL
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import (
    Design,
    FaultResult,
    clear_marker,
    has_marker,
    inode_no_direct_map,
    secretmem_fault_common,
    set_marker,
)
from gmemlab.model.kvm.guest_memfd import (
    folio_inode,
    kvm_gmem_no_direct_map,
)
from gmemlab.model.mm.filemap import AddressSpace, filemap_add_folio
from gmemlab.model.mm.folio import folio_mark_uptodate
from gmemlab.model.mm.memory import Vma
from gmemlab.model.task import KGen
from gmemlab.uapi import KVM_X86_SNP_VM, KVM_X86_TDX_VM

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine



class V12(Design):
    """v12: mainline's paths with the zap at handout and the restore at free (hooks)."""

    name: ClassVar[str] = "v12"
    title: ClassVar[str] = "v12 as posted (reference): zap then prepare, invalidate then restore"
    source: ClassVar[str] = "20260410151746.61150-1-kalyazin@amazon.com"
    series: ClassVar[bool] = True
    uses_marker: ClassVar[bool] = True
    secretmem_sets_no_direct_map: ClassVar[bool] = True
    # The capability is base's with the series (v12 10/16): TDX excluded since v10, SNP since
    # v12 (both use kvm_gmem_populate()).
    excluded_vm_types: ClassVar[tuple[int, ...]] = (KVM_X86_TDX_VM, KVM_X86_SNP_VM)

    # --- guest_memfd (v12 10/16) ------------------------------------------------------------
    def kvm_gmem_folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        fn = "kvm_gmem_folio_zap_direct_map"
        yield ("folio", folio)
        # VM_WARN_ON_FOLIO(!folio_test_locked(folio)): judged by invariant zap-under-folio-lock.
        if not kvm_gmem_no_direct_map(folio_inode(m, folio)):
            m.trace.emit(fn, "warn_on_once", folio, {"err": "EINVAL"})
            return -EINVAL
        if has_marker(m, folio):
            return 0
        m.trace.emit(fn, "zap", folio)
        r = yield from self.folio_zap_direct_map(m, folio)
        if not r:
            yield from set_marker(m, folio, fn)
        return r

    def kvm_gmem_folio_restore_direct_map(self, m: Machine, folio: int) -> KGen[None]:
        fn = "kvm_gmem_folio_restore_direct_map"
        m.trace.emit(fn, "restore", folio)
        if m.inv.enabled:
            m.inv.on_restore(folio)
        yield from self.folio_restore_direct_map(m, folio)
        yield from clear_marker(m, folio, fn)

    def kvm_gmem_zap_for_handout(self, m: Machine, folio: int) -> KGen[int]:
        """The user fault and ``kvm_gmem_get_pfn()`` (before ``kvm_arch_gmem_prepare()``):
        ``if (kvm_gmem_no_direct_map(inode)) kvm_gmem_folio_zap_direct_map(folio)``."""
        if inode_no_direct_map(m, folio):
            return (yield from self.kvm_gmem_folio_zap_direct_map(m, folio))
        return 0

    def kvm_gmem_restore_on_free(self, m: Machine, pfn: int) -> KGen[None]:
        """``kvm_gmem_free_folio()``, after the invalidate: restore a marked folio."""
        if has_marker(m, pfn):
            yield from self.kvm_gmem_folio_restore_direct_map(m, pfn)

    # --- secretmem (v12 03/16) ----------------------------------------------------------------
    def secretmem_fault(self, m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
        """``secretmem_fault()`` on the folio helpers: the flush now comes with the zap."""
        return (yield from secretmem_fault_common(m, vma, page, self._secretmem_insert))

    def _secretmem_insert(self, m: Machine, mapping: AddressSpace, folio: int,
                          offset: int) -> KGen[int]:
        err = yield from self.folio_zap_direct_map(m, folio)
        if err:
            return err
        yield from folio_mark_uptodate(m, folio)
        err = yield from filemap_add_folio(m, mapping, folio, offset)
        if err:
            yield from self.folio_restore_direct_map(m, folio)
            return err
        return 0

    # secretmem_free_folio() is mainline's: 03/16 moves the fault and its error path onto the
    # folio helpers, the free path keeps set_direct_map_default_noflush().
