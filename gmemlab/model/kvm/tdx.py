"""Intel TDX's private-page hooks: what the secure-EPT updates do to a frame on a TDX host.

Followed: ``arch/x86/kvm/vmx/tdx.c`` (``tdx_sept_set_private_spte``,
``tdx_sept_remove_private_spte``) and
``arch/x86/virt/vmx/tdx/tdx.c`` (``tdh_mem_page_aug``, ``tdh_mem_page_add``,
``tdx_clflush_page``, ``tdx_quirk_reset_page``), mainline v6.18 and kvm/next.
TDX sets no ``gmem_prepare``/``gmem_invalidate``: a page becomes the TD's when the
TDX module maps it in the secure EPT, and the host's again when it is removed.
The owner is ``MemMap.guest_owned`` (``GUEST_OWNED_TDX``).

Both directions touch the page through the host direct map, which is why Rick
Edgecombe asked that TDs not use NO_DIRECT_MAP files (reply to v9 10/13,
2026-01-15, linux-doc msg48017: "TDX does some clearing at the direct map mapping
... It also does some clflushing at the direct map address"), and why v10 and
later exclude ``KVM_X86_TDX_VM``:

* ``tdh_mem_page_aug()``/``tdh_mem_page_add()`` first call ``tdx_clflush_page()``:
  ``clflush_cache_range(page_to_virt(page), PAGE_SIZE)``;
* after ``tdh_mem_page_remove()`` and ``tdh_phymem_page_wbinvd_hkid()``,
  ``tdx_quirk_reset_page()`` zeroes the page with MOVDIR64B through ``__va()`` on
  hosts with the partial-write erratum (``X86_BUG_TDX_PW_MCE``; the profile's
  ``tdx_pw_mce``), and does nothing on the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmemlab.model.mm.memmap import GUEST_OWNED_TDX
from gmemlab.model.mm.tlb import kernel_access
from gmemlab.model.task import KGen
from gmemlab.uapi import KVM_X86_TDX_VM

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.machine import Machine


def is_td(m: Machine, kvm: Kvm) -> bool:
    """``is_td(kvm)``: a TDX VM on a host that runs them."""
    return m.profile.arch == "x86_64" and kvm.vm_type == KVM_X86_TDX_VM


def tdx_clflush_page(m: Machine, pfn: int, fn: str) -> KGen[None]:
    """``tdx_clflush_page()``: ``clflush_cache_range(page_to_virt(page), PAGE_SIZE)``."""
    yield from kernel_access(m, pfn, fn, write=False)


def tdx_sept_set_private_spte(m: Machine, kvm: Kvm, gfn: int, pfn: int) -> KGen[None]:
    """``tdx_sept_set_private_spte()`` -> ``tdh_mem_page_aug()``: flush, then the TD owns it."""
    yield from tdx_clflush_page(m, pfn, "tdh_mem_page_aug")
    m.mem.guest_owned[pfn] = GUEST_OWNED_TDX
    m.trace.emit("tdx_sept_set_private_spte", "tdx_page_aug", pfn, {"vm": kvm.id, "gfn": gfn})


def tdx_sept_remove_private_spte(m: Machine, kvm: Kvm, gfn: int, pfn: int) -> KGen[None]:
    """``tdx_sept_remove_private_spte()``: remove and write back (SEAMCALLs), then
    ``tdx_quirk_reset_page()``."""
    m.mem.guest_owned[pfn] = 0
    m.trace.emit("tdx_sept_remove_private_spte", "tdx_page_remove", pfn, {"vm": kvm.id, "gfn": gfn})
    if m.profile.tdx_pw_mce:
        yield from kernel_access(m, pfn, "tdx_quirk_reset_page", write=True)
        m.mem.zero(pfn)

