"""The KVM MMU's guest fault path (``arch/x86/kvm/mmu/mmu.c``), stage-2 side.

``kvm_mmu_page_fault()`` for a gfn without a stage-2 entry:

* no memslot: emulated MMIO (an exit to the VMM);
* private gfn (memory attributes) or a ``KVM_MEMSLOT_GMEM_ONLY`` slot:
  ``kvm_mmu_faultin_pfn_gmem()`` -> ``kvm_gmem_get_pfn()``; an error fills
  ``kvm_run.memory_fault`` (``KVM_EXIT_MEMORY_FAULT``) and returns the errno;
* otherwise the hva path: ``hva_to_pfn()`` GUPs ``userspace_addr``; failure is a
  bare ``-EFAULT``.

Then under ``mmu_lock``: if an invalidation raced with the lookup
(``mmu_invalidate_retry_gfn``), drop the page and retry; else install the
stage-2 entry (for a TD's private gfn, through the TDX module:
``tdx_sept_set_private_spte()``, ``gmemlab.model.kvm.tdx``).  The page
reference taken by the lookup is dropped after mapping
(``kvm_release_faultin_page``): stage-2 entries hold no reference,
invalidation keeps them honest.
"""

from __future__ import annotations

from errno import EFAULT
from typing import TYPE_CHECKING

from gmemlab.model.kvm.tdx import is_td, tdx_sept_set_private_spte
from gmemlab.model.mm.folio import folio_put
from gmemlab.model.mm.gup import FOLL_WRITE, get_user_pages
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.task import WAIT, KGen
from gmemlab.uapi import KVM_MEM_READONLY, KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SHIFT

if TYPE_CHECKING:
    from gmemlab.model.kvm.vcpu import Vcpu
    from gmemlab.model.machine import Machine

MMIO = -(1 << 30)  # not an errno: the access is emulated MMIO


def kvm_mmu_page_fault(m: Machine, vcpu: Vcpu, gpa: int, write: bool) -> KGen[int]:
    """Map ``gpa``; returns its pfn, :data:`MMIO`, or -errno (``vcpu.memory_fault`` set if gmem)."""
    kvm = vcpu.kvm
    gfn = gpa >> PAGE_SHIFT
    fn = "kvm_mmu_page_fault"
    vcpu.stats["pf_taken"] += 1
    while True:
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:
            vcpu.stats["pf_emulate"] += 1
            return MMIO
        yield ("kvm", kvm.id)
        mmu_seq = kvm.mmu_invalidate_seq
        is_private = m.profile.memory_attributes and kvm.mem_is_private(gfn)
        if is_private or slot.gmem_only:
            if not slot.has_gmem():
                vcpu.prepare_memory_fault(gpa, is_private)
                return -EFAULT
            r, pfn = yield from m.design.kvm_gmem_get_pfn(m, kvm, slot, gfn)
            if r:
                vcpu.prepare_memory_fault(gpa, is_private)
                return r
        else:
            hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
            pages = yield from get_user_pages(m, kvm.owner, hva, 1, FOLL_WRITE if write else 0,
                                              "hva_to_pfn")
            if isinstance(pages, int):
                m.trace.emit(fn, "hva_fault", -1, {"gpa": gpa, "hva": hva})
                return -EFAULT
            pfn = pages[0]
        yield from kvm.mmu_lock(m)
        if kvm.mmu_invalidate_retry_gfn(mmu_seq, gfn):
            yield from kvm.mmu_unlock(m)
            yield from folio_put(m, pfn)
            m.trace.emit(fn, "fault_retry", pfn, {"gfn": gfn})
            while kvm.mmu_invalidate_in_progress:
                yield (WAIT, ("mmu_invalidate", kvm.id))
            continue
        yield ("spte", (kvm.id, gfn))
        if kvm.spte.load(gfn) == EMPTY:
            if is_private and is_td(m, kvm):
                # set_external_spte(): the TDX module maps the page in the secure EPT
                yield from tdx_sept_set_private_spte(m, kvm, gfn, pfn)
            kvm.spte.store(gfn, pfn)
            m.mem.s2count[pfn] += 1
            m.trace.emit(fn, "spte_map", pfn, {"vm": kvm.id, "gfn": gfn})
            if m.inv.enabled:
                m.inv.on_handout(pfn, "stage-2 mapping")
        yield from kvm.mmu_unlock(m)
        yield from folio_put(m, pfn)  # kvm_release_faultin_page()
        vcpu.stats["pf_fixed"] += 1
        return pfn


def guest_translate(m: Machine, vcpu: Vcpu, gpa: int, write: bool) -> KGen[int]:
    """The guest's access to ``gpa``: the stage-2 entry, or a fault to make one.

    A write to a ``KVM_MEM_READONLY`` slot is emulated MMIO, whether or not the page is
    mapped: its stage-2 entries are never writable, and the write fault finds
    ``KVM_PFN_ERR_RO_FAULT`` (``__gfn_to_hva_many()`` refuses writes to a read-only
    slot), which ``kvm_handle_error_pfn()`` turns into ``RET_PF_EMULATE``; the emulator
    exits to userspace with ``KVM_EXIT_MMIO``, ``is_write`` set, memory unchanged.
    """
    kvm = vcpu.kvm
    gfn = gpa >> PAGE_SHIFT
    if write:
        slot = kvm.gfn_to_memslot(gfn)
        if slot is not None and slot.flags & KVM_MEM_READONLY:
            vcpu.stats["pf_emulate"] += 1
            return MMIO
    yield ("spte", (kvm.id, gfn))
    pfn = kvm.spte.load(gfn)
    if pfn != EMPTY:
        return pfn
    return (yield from kvm_mmu_page_fault(m, vcpu, gpa, write))


def memory_fault_flags(is_private: bool) -> int:
    return KVM_MEMORY_EXIT_FLAG_PRIVATE if is_private else 0

