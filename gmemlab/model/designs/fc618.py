"""Firecracker's kernel: v6.18 with its port of the series, patch 0039 and the pfncache patches.

``firecracker-microvm/firecracker`` branch ``feature/secret-hiding`` (commit
``c695671fa``), ``resources/hiding_ci/kernels/6.18-amazon-linux/linux_patches/``:

* ``10-direct-map-removal/0023``-``0038``: the series ported to v6.18.  The port of
  ``kvm_gmem_get_pfn()`` (0032 "KVM: guest_memfd: Add flag to remove from direct
  map") keeps 6.18's preparedness tracking and appends the zap after it:
  ``if (!is_prepared) { r = kvm_gmem_prepare_folio(); if (r) goto out_unlock; }``
  then ``if (kvm_gmem_no_direct_map(inode)) r = kvm_gmem_folio_zap_direct_map()``.
  So the guest fault *prepares, then zaps* (``kvm_gmem_prepare_folio()`` zeroes
  through the direct map and calls the arch hook first), where posted v12 on
  kvm/next zaps, then prepares.  A folio the user fault made uptodate is never
  arch-prepared (6.18).  The capability (0030), the user fault, ``->free_folio``
  (invalidate, then restore) and secretmem (0025) are v12's.
* ``0039-internal-x86-conditional-tlb-flush-after-zapping-dir.patch``: the flush
  leaves ``folio_zap_direct_map()`` and follows the zap in
  ``kvm_gmem_folio_zap_direct_map()`` only ``if (guest_memfd_tlb_flush)``
  (module parameter, 0444, default false), after a failed zap too
  (:class:`~gmemlab.model.designs.noflush.NoFlush`).
* ``11-kvm-clock/0040``-``0046``: Takahiro Itazuri's pfncache series
  (:mod:`gmemlab.model.kvm.pfncache`): kvm-clock resolves a gmem-backed gpa with
  ``kvm_gmem_get_pfn()`` (0041), maps a NO_DIRECT_MAP page with ``vmap()`` (0042)
  and is invalidated with guest_memfd (0046).  The vmap is a kernel mapping of
  guest memory outside the direct map: every CPU's page walk finds it while it
  lives, from the refresh to ``gpc_unmap()`` (a refresh to another pfn, or
  ``kvm_gpc_deactivate()``).  Invalidation only clears ``valid``: after a punch-hole
  the alias keeps mapping the freed frame until then.  ``vunmap()`` flushes lazily
  (``free_vmap_area_noflush()``); the model ends the alias at ``vunmap()``, so the
  reach it reports is a lower bound.

Left out: the other patch groups of that stack (NUMA mempolicy, KVM_MEM_USERFAULT,
write(), userfaultfd, async PF) do not touch the paths modelled here.
"""

from __future__ import annotations

from errno import EFAULT
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import (
    GetPfnResult,
    inode_no_direct_map,
    kvm_gmem_get_pfn_done,
    kvm_gmem_get_pfn_folio,
    kvm_gmem_prepare_folio_tracked,
)
from gmemlab.model.designs.noflush import NoFlush
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm, Memslot
    from gmemlab.model.machine import Machine


class Firecracker618(NoFlush):
    name: ClassVar[str] = "fc-6.18"
    title: ClassVar[str] = ("Firecracker's 6.18 kernel: the series ported to 6.18 (prepare, then "
                            "zap), 0039's flush gate, the pfncache patches (kvm-clock via vmap)")
    source: ClassVar[str] = ("firecracker feature/secret-hiding resources/hiding_ci/kernels/"
                             "6.18-amazon-linux/linux_patches 0023-0046")

    def __init__(self, guest_memfd_tlb_flush: bool = False, pfncache_gmem: bool = True) -> None:
        super().__init__(guest_memfd_tlb_flush)
        self.pfncache_gmem = pfncache_gmem  # False: the kernel without 11-kvm-clock
        self.vmapped: dict[int, int] = {}  # pfn -> live vmap aliases (gpc_map)
        self.vmap_cpus: list[int] = []

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[GetPfnResult]:
        """``kvm_gmem_get_pfn()`` (6.18 + 0032): prepare if not prepared, then zap."""
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        r = 0
        if not m.mem.test_uptodate(folio):  # !is_prepared
            r = yield from kvm_gmem_prepare_folio_tracked(m, kvm, gfn, folio)
        if not r and inode_no_direct_map(m, folio):
            r = yield from self.kvm_gmem_folio_zap_direct_map(m, folio)
        return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))

    # --- pfncache (11-kvm-clock) -------------------------------------------------------------
    def gpc_to_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int, uhva: int) -> KGen[int]:
        """0041 ``gpc_to_pfn()``: ``kvm_gmem_get_pfn()`` if ``gpc_is_gmem_backed()`` (a gmem
        slot that is GMEM_ONLY or a private gfn), any error ``KVM_PFN_ERR_FAULT``; else
        ``hva_to_pfn()``."""
        private = m.profile.memory_attributes and kvm.mem_is_private(gfn)
        if self.pfncache_gmem and slot.has_gmem() and (slot.gmem_only or private):
            r, pfn = yield from self.kvm_gmem_get_pfn(m, kvm, slot, gfn)
            return -EFAULT if r else pfn
        return (yield from super().gpc_to_pfn(m, kvm, slot, gfn, uhva))

    def gpc_map(self, m: Machine, pfn: int) -> KGen[bool]:
        """0042 ``gpc_map()``: ``vmap(pages, 1, VM_MAP, PAGE_KERNEL)`` for a page of an
        ``AS_NO_DIRECT_MAP`` mapping, else ``kmap()``."""
        if not (self.pfncache_gmem and m.folio_no_direct_map_mapping(pfn)):
            return (yield from super().gpc_map(m, pfn))
        yield ("vmap", pfn)
        self.vmap_cpus = list(range(m.tlb.ncpus))
        self.vmapped[pfn] = self.vmapped.get(pfn, 0) + 1
        m.trace.emit("gpc_map", "vmap", pfn)
        return True

    def gpc_unmap(self, m: Machine, pfn: int, vmap: bool) -> KGen[None]:
        """0042 ``gpc_unmap()``: ``vunmap()`` if ``is_vmalloc_addr(khva)``, else ``kunmap()``."""
        if not vmap:
            yield from super().gpc_unmap(m, pfn, vmap)
            return
        yield ("vmap", pfn)
        self.vmapped[pfn] -= 1
        if not self.vmapped[pfn]:
            del self.vmapped[pfn]
        m.trace.emit("gpc_unmap", "vunmap", pfn)

    def temporary_mapping_cpus(self, pfn: int) -> list[int]:
        """The CPUs that reach ``pfn`` through a live vmap alias: all of them (a kernel
        mapping every page walk finds), for :mod:`gmemlab.expose`."""
        return self.vmap_cpus if self.vmapped.get(pfn) else []
