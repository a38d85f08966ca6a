"""AMD SEV-SNP's guest_memfd hooks: what ``kvm_arch_gmem_prepare()``, ``kvm_arch_gmem_invalidate()``
and ``kvm_gmem_populate()``'s callback do to a frame on an SNP host.

Followed: ``arch/x86/kvm/svm/sev.c`` (``sev_gmem_prepare``, ``sev_gmem_invalidate``,
``sev_gmem_post_populate``) and ``arch/x86/virt/svm/sev.c`` (``rmp_make_private``,
``rmp_make_shared``, ``rmpupdate``), mainline as of v6.18 and kvm/next (kvm-x86
gmem, 2026).  The RMP entry of a frame is ``MemMap.guest_owned`` (``GUEST_OWNED_SNP``
while assigned).

Two of these touch the frame through the host direct map, whatever the series
does to it:

* ``sev_gmem_invalidate()``, after ``rmp_make_shared()``, flushes the page's cache
  lines with ``clflush_cache_range(__va(pfn_to_hpa(pfn)), PAGE_SIZE)``: CLFLUSH
  needs a present translation, so on a zapped page it faults like a load;
* ``sev_gmem_post_populate()`` copies the source into the page through
  ``kmap_local_pfn()``, which on x86-64 is ``page_address()``: the direct map.

``rmpupdate()`` also calls ``adjust_direct_map()``, which splits a 2M/1G direct-map
leaf around the page to 4K before the RMP changes; the model leaves it out (our
choice: it changes the DirectMap counters on SNP, never whether a page is present).
"""

from __future__ import annotations

from errno import EINVAL
from typing import TYPE_CHECKING

from gmemlab.model.mm.memmap import GUEST_OWNED_SNP
from gmemlab.model.mm.tlb import kernel_access
from gmemlab.model.task import KGen
from gmemlab.uapi import KVM_X86_SNP_VM, PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.machine import Machine


def sev_snp_guest(m: Machine, kvm: Kvm) -> bool:
    """``sev_snp_guest(kvm)``: an SNP VM on a host that runs them."""
    return m.profile.arch == "x86_64" and kvm.vm_type == KVM_X86_SNP_VM


def sev_gmem_prepare(m: Machine, kvm: Kvm, pfn: int) -> int:
    """``sev_gmem_prepare()``: assign the page to the guest in the RMP (``rmp_make_private()``).

    Not an SNP guest: nothing.  Already assigned (``snp_lookup_rmpentry()``): nothing
    either.  The RMP update needs no direct-map entry, present or not.
    """
    if not sev_snp_guest(m, kvm) or m.mem.guest_owned[pfn] == GUEST_OWNED_SNP:
        return 0
    m.mem.guest_owned[pfn] = GUEST_OWNED_SNP
    return 0


def sev_gmem_invalidate(m: Machine, pfn: int) -> KGen[bool]:
    """``sev_gmem_invalidate()`` for one page: True if it reclaimed an assigned one.

    ``rmp_make_shared()`` gives the page back to the hypervisor, then
    ``clflush_cache_range(__va(pfn_to_hpa(pfn)), PAGE_SIZE)`` writes back the guest's
    lines before the page is freed: a kernel access through the direct map.
    """
    if m.mem.guest_owned[pfn] != GUEST_OWNED_SNP:
        return False
    m.mem.guest_owned[pfn] = 0
    yield from kernel_access(m, pfn, "sev_gmem_invalidate", write=False)
    return True


def sev_gmem_post_populate(m: Machine, kvm: Kvm, gfn: int, pfn: int, src: bytes) -> KGen[int]:
    """``sev_gmem_post_populate()`` for one page (``KVM_SEV_SNP_LAUNCH_UPDATE``).

    A page already assigned is refused (-EINVAL).  The source page is copied in
    through ``kmap_local_pfn(pfn)`` (the direct map on x86-64), then the page is
    assigned with ``rmp_make_private()`` and measured.
    """
    yield ("folio", pfn)
    if m.mem.guest_owned[pfn] == GUEST_OWNED_SNP:
        return -EINVAL
    yield from kernel_access(m, pfn, "sev_gmem_post_populate", write=True)
    m.mem.write(pfn, 0, src[:PAGE_SIZE], secret=True)
    m.mem.guest_owned[pfn] = GUEST_OWNED_SNP
    m.trace.emit("sev_gmem_post_populate", "populate", pfn, {"gfn": gfn})
    return 0
