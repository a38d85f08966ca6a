"""The page cache owns the direct map of ``AS_NO_DIRECT_MAP`` folios (the shape posted after v12).

Where it comes from (details, quotes and what was not found: ``docs/next-shape.md``):

* Sean Christopherson on v12 10/16 (``aeemS2wm38Cm4qAf@google.com``, 2026-04-21):
  do it "automagically in e.g. filemap_add_folio() and filemap_remove_folio()";
  "the kernel must *always* assume the direct map is invalid for folios from
  AS_NO_DIRECT_MAP mappings".
* Takahiro Itazuri, taking the series over (``20260508081812.12345-1-itazur@amazon.com``,
  2026-05-08): move the zap/restore hooks into the page cache, "the direct map is
  invalid for the entire time the folio resides in the page cache", drop the
  ``folio->private`` marker.  No v13 was found in the archives reachable here.
* Brendan Jackman's ALLOC_UNMAPPED series carries the mm half: patches 1-3 of
  its v4 are this series' folio helpers, secretmem conversion and
  ``AS_NO_DIRECT_MAP``, and the page cache's ``prep_add_unmapped_folio()`` /
  ``prep_remove_unmapped_folio()`` (read in ``bjackman/linux`` ``mm/filemap.c`` at
  ``0c5bffae10ec``).  That code has two versions: with ``CONFIG_MERMAP`` the folio
  arrives unmapped from the allocator (:mod:`gmemlab.model.designs.unmapped_alloc`);
  with only ``CONFIG_ARCH_HAS_SET_DIRECT_MAP`` it is zapped on insertion and
  restored on removal (:class:`FilemapZap`, here).

:class:`FilemapZap` is the slow path, and what the fast path keeps of it: the UAPI
and guest_memfd side (mainline's paths, no marker), GUP's refusal, and
secretmem on the page cache.
"""

from __future__ import annotations

from errno import EINVAL
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import Design, FaultResult
from gmemlab.model.mm.filemap import (
    FGP_ACCESSED,
    FGP_CREAT,
    FGP_LOCK,
    AddressSpace,
    filemap_get_folio,
    mapping_no_direct_map,
)
from gmemlab.model.mm.folio import folio_mark_uptodate
from gmemlab.model.mm.locks import down_read, up_read
from gmemlab.model.mm.memory import VM_FAULT_LOCKED, Vma, vmf_error
from gmemlab.model.mm.page_alloc import clear_page
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import KVM_X86_SNP_VM, KVM_X86_TDX_VM, PAGE_SHIFT

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine



class FilemapZap(Design):
    """``AS_NO_DIRECT_MAP`` without the mermap: zero and zap on insertion, restore and zero on removal.

    The ``#elif defined(CONFIG_ARCH_HAS_SET_DIRECT_MAP)`` versions of
    ``prep_{add,remove}_unmapped_folio()`` in ``mm/filemap.c`` of the ALLOC_UNMAPPED
    v4 tree (``bjackman/linux`` at ``0c5bffae10ec``).  Every folio costs a zap and a
    flush, as in v12, but at one place and for every owner of the mapping.  The
    fast path (:class:`gmemlab.model.designs.unmapped_alloc.UnmappedAlloc`) replaces
    the two steps and the allocation, as ``CONFIG_MERMAP`` does.
    """

    name: ClassVar[str] = "filemap"
    title: ClassVar[str] = ("page cache zaps AS_NO_DIRECT_MAP folios on insertion, "
                            "restores and zeroes them on removal (slow path as posted)")
    source: ClassVar[str] = ("aeemS2wm38Cm4qAf@google.com; 20260508081812.12345-1-itazur@amazon.com; "
                             "bjackman/linux mm/filemap.c@0c5bffae10ec")

    series: ClassVar[bool] = True
    secretmem_sets_no_direct_map: ClassVar[bool] = True
    # Takahiro (20260508081812.12345-1-itazur@amazon.com): kvm_gmem_populate() is TDX/SNP
    # only, and NO_DIRECT_MAP stays unavailable on those VM types.
    excluded_vm_types: ClassVar[tuple[int, ...]] = (KVM_X86_TDX_VM, KVM_X86_SNP_VM)

    def __init__(self) -> None:
        self.filemap_add_hook = self.prep_add_unmapped_folio
        self.filemap_remove_hook = self.prep_remove_unmapped_folio

    # --- the two steps the page cache runs (mm/filemap.c) --------------------------------
    def prep_add_unmapped_folio(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[int]:
        """Slow ``prep_add_unmapped_folio()``: ``folio_zero_segment()``, then ``folio_zap_direct_map()``.

        "we could have just allocated with __GFP_ZERO. But for consistency with the
        ALLOC_UNMAPPED version it's forbidden, so zero manually."  A failed zap fails
        the insertion (``goto err``: nothing to undo, the folio is still mapped).
        """
        if not mapping_no_direct_map(mapping):
            return 0
        yield from clear_page(m, folio, "folio_zero_segment")
        m.trace.emit("prep_add_unmapped_folio", "zap", folio)
        r = yield from folio_zap_direct_map(m, folio)
        if not r:
            yield from self.mark_zeroed(m, folio)
        return r

    def prep_remove_unmapped_folio(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        """Slow ``prep_remove_unmapped_folio()``: ``folio_restore_direct_map()``, then zero it.

        This runs before ``filemap_free_folio()``, so before guest_memfd's
        ``->free_folio`` and its ``kvm_arch_gmem_invalidate()``: the reverse of
        v12's "invalidate then restore" (the checker reports it).
        """
        if not mapping_no_direct_map(mapping):
            return
        m.trace.emit("prep_remove_unmapped_folio", "restore", folio)
        if m.inv.enabled and mapping.kind == "guest_memfd":  # kvm_arch_gmem_invalidate is gmem's
            m.inv.on_restore(folio)
        yield from folio_restore_direct_map(m, folio)
        yield from clear_page(m, folio, "folio_zero_segment")

    def filemap_add_undo(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        """``filemap_add_folio()``'s ``err_restore:`` when ``__filemap_add_folio()`` fails (-EEXIST)."""
        yield from self.prep_remove_unmapped_folio(m, mapping, folio)

    def mark_zeroed(self, m: Machine, folio: int) -> KGen[None]:
        """Our choice (no v13 posted): the page cache zeroed the folio, so it is uptodate.

        guest_memfd's mainline paths zero a folio that is not uptodate with
        ``clear_highpage()``, through the direct map: on an ``AS_NO_DIRECT_MAP``
        folio that oopses.  ``AS_NO_DIRECT_MAP``'s comment in the posted
        ``pagemap.h`` ("zeroed before being added to the mapping") makes that
        zeroing redundant; the guest_memfd side of it was not found posted, so the
        model marks the folio uptodate where the page cache zeroed it.
        """
        yield from folio_mark_uptodate(m, folio)

    # Capability, UAPI and GUP's refusal: base's with the series (v12 10/16, unchanged by the
    # rework as announced; mapping_no_direct_map() in gup_fast_folio_allowed(), v4 3/26).

    # guest_memfd: the user fault, kvm_gmem_get_pfn() and ->free_folio are mainline's
    # (Design's): "the existence of the folio in the mapping is itself the state".

    # --- secretmem (bjackman/linux mm/secretmem.c at 5196022255e1) ---------------------------
    def secretmem_fault(self, m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
        """``secretmem_fault()`` on the page cache: ``filemap_grab_folio()``, then uptodate.

        No allocation, zap or flush of its own any more: ``filemap_grab_folio()``
        (``FGP_LOCK|FGP_ACCESSED|FGP_CREAT``) allocates and inserts, and the page
        cache takes the folio out of the direct map.
        """
        assert vma.file is not None
        inode = vma.file.inode
        mapping = inode.mapping
        offset = vma.pgoff + page
        if offset << PAGE_SHIFT >= inode.size:
            return vmf_error(-EINVAL), -1
        yield from down_read(m, mapping.invalidate_lock)
        folio = yield from filemap_get_folio(m, mapping, offset, FGP_LOCK | FGP_ACCESSED | FGP_CREAT)
        ret: FaultResult = (vmf_error(folio), -1)
        if folio >= 0:
            yield from folio_mark_uptodate(m, folio)
            ret = VM_FAULT_LOCKED, folio
        yield from up_read(m, mapping.invalidate_lock)
        return ret

    def secretmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        """``secretmem_aops`` has no ``->free_folio`` any more: the page cache restores and zeroes."""
        yield from ()


# --- mm/memory.c helpers (v4 1/26) ------------------------------------------------------------------
def folio_zap_direct_map(m: Machine, folio: int) -> KGen[int]:
    """``folio_zap_direct_map()`` ("set_memory: add folio_{zap,restore}_direct_map helpers",
    ALLOC_UNMAPPED v4 1/26, v12 02/16): invalidate, then flush whatever the outcome."""
    if not m.profile.has_set_direct_map:
        return 0  # !CONFIG_ARCH_HAS_SET_DIRECT_MAP stub
    ret = yield from set_direct_map_valid_noflush(m, folio, 1, False)
    yield from flush_tlb_kernel_range(m, folio, folio + 1, "folio_zap_direct_map")
    return ret


def folio_restore_direct_map(m: Machine, folio: int) -> KGen[None]:
    """``folio_restore_direct_map()``: cannot fail once the zap split the leaf; WARN if it does."""
    if not m.profile.has_set_direct_map:
        return
    r = yield from set_direct_map_valid_noflush(m, folio, 1, True)
    if r:
        m.trace.emit("folio_restore_direct_map", "warn_on_once", folio, {"err": -r})
