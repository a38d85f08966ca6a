"""The design interface, and the kernel without the series (``base``).

A *design* is the kernel code of one version of the series for the paths the
series touches: what ``KVM_CAP_GUEST_MEMFD_FLAGS`` advertises, the guest_memfd
user fault, ``kvm_gmem_get_pfn()``, ``->free_folio``, the zap/restore helpers,
GUP's refusal, secretmem's fault and free, and (for the page-cache-level
proposal) hooks in the page cache.  Every other path is shared code in
``gmemlab.model``.

:class:`Design` itself is mainline without the series (guest_memfd with
``MMAP``/``INIT_SHARED`` only; secretmem special-cased by GUP) as kvm/next has it
now, the base v12 was posted against: ``kvm_gmem_get_pfn()`` zeroes a folio
that is not uptodate and calls the arch prepare on every fault.  The kernel our
machines run is 6.18 (``realkernel.md``), whose fault still tracks
preparedness: that is the ``6.18`` design (``linux618.py``), the one the model
is held to by the recorded conformance outcomes.

A design is one class that starts from :class:`Design` and overrides what its
version changes.  The named hooks are where the series' versions differ:

* capability: ``kvm_arch_gmem_supports_no_direct_map``, ``kvm_gmem_get_supported_flags``;
* handout and free: ``kvm_gmem_zap_for_handout`` (user fault and ``kvm_gmem_get_pfn``),
  ``kvm_gmem_restore_on_free`` (``->free_folio``), or the three paths whole;
* zap, flush, restore: ``folio_zap_direct_map``, ``flush_after_zap``,
  ``folio_restore_direct_map`` (the series' mm helpers, v12 02/16);
* marker: :func:`set_marker`, :func:`clear_marker`, :func:`has_marker`
  (``folio->private``), used by the guest_memfd wrappers a version writes;
* allocation: ``filemap_alloc_folio``, ``kvm_gmem_allocate``, ``free_unmapped_frame``;
  page cache: ``filemap_add_hook``, ``filemap_remove_hook``, ``filemap_add_undo``;
* secretmem: ``secretmem_fault``, ``secretmem_free_folio``.

Pieces several versions share verbatim are functions here, named for the
kernel lines they stand for.
"""

from __future__ import annotations

from collections.abc import Callable
from errno import EAGAIN, EEXIST, EFAULT, EINVAL
from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.fs import fput
from gmemlab.model.kvm.guest_memfd import (
    KVM_GMEM_FOLIO_NO_DIRECT_MAP,
    __kvm_gmem_get_pfn,
    folio_inode,
    kvm_arch_gmem_invalidate,
    kvm_arch_gmem_prepare,
    kvm_gmem_allocate,
    kvm_gmem_get_file,
    kvm_gmem_get_folio,
    kvm_gmem_get_huge_folio,
    kvm_gmem_get_index,
    kvm_gmem_no_direct_map,
)
from gmemlab.model.mm.filemap import (
    AS_NO_DIRECT_MAP,
    FGP_LOCK,
    AddressSpace,
    filemap_add_folio,
    filemap_get_folio,
)
from gmemlab.model.mm.folio import (
    folio_mark_uptodate,
    folio_pages,
    folio_put,
    folio_test_large,
    folio_unlock,
)
from gmemlab.model.mm.gup import FOLL_WRITE, get_user_pages
from gmemlab.model.mm.locks import down_read, up_read
from gmemlab.model.mm.memory import (
    VM_FAULT_LOCKED,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    Vma,
    vmf_error,
)
from gmemlab.model.mm.page_alloc import GFP_HIGHUSER_ZERO, alloc_page, clear_page
from gmemlab.model.mm.set_memory import (
    set_direct_map_default_noflush,
    set_direct_map_invalid_noflush,
    set_direct_map_valid_noflush,
)
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    PAGE_SHIFT,
)

if TYPE_CHECKING:
    from gmemlab.model.fs import File, Inode
    from gmemlab.model.kvm.kvm_main import Kvm, Memslot
    from gmemlab.model.machine import Machine


FaultResult = tuple[int, int]  # (vm_fault_t, pfn of the locked folio or -1)
GetPfnResult = tuple[int, int]  # (0 or -errno, pfn)
Hook = Callable[["Machine", AddressSpace, int], KGen[int]]


class Design:
    """Mainline without the series: the reference the series is applied to."""

    name: ClassVar[str] = "base"
    title: ClassVar[str] = "mainline without the series"
    source: ClassVar[str] = "torvalds/linux virt/kvm/guest_memfd.c, mm/secretmem.c, mm/gup.c"
    series: ClassVar[bool] = False  # AS_NO_DIRECT_MAP and GUEST_MEMFD_FLAG_NO_DIRECT_MAP exist
    uses_marker: ClassVar[bool] = False  # KVM_GMEM_FOLIO_NO_DIRECT_MAP in folio->private
    flushes: ClassVar[bool] = True  # a zap is followed by a kernel TLB flush
    filemap_add_hook: Hook | None = None
    filemap_remove_hook: Callable[[Machine, AddressSpace, int], KGen[None]] | None = None

    excluded_vm_types: ClassVar[tuple[int, ...]] = ()  # VM types a version refuses the flag
    # The version's guest_memfd paths take large folios; mainline's user fault WARNs and
    # SIGBUSes on one, and v12's folio_zap_direct_map() refuses it.
    large_folios: ClassVar[bool] = False

    # --- capability --------------------------------------------------------------------
    def kvm_arch_gmem_supports_no_direct_map(self, m: Machine, vm_type: int | None) -> bool:
        """``kvm_arch_gmem_supports_no_direct_map()`` (v12 08-10/16): per arch, minus the VM
        types the version excludes; mainline has no such flag."""
        return self.series and arch_supports_no_direct_map(m, vm_type, exclude=self.excluded_vm_types)

    def kvm_gmem_get_supported_flags(self, m: Machine, vm_type: int | None) -> int:
        """``kvm_gmem_get_supported_flags(kvm)``; ``vm_type=None`` is the system-wide query.

        v12 10/16 adds ``if (!kvm || kvm_arch_gmem_supports_no_direct_map(kvm))``:
        the system-wide answer offers the flag wherever the series is.
        """
        flags = gmem_mainline_flags(m, vm_type)
        if self.series and (vm_type is None or self.kvm_arch_gmem_supports_no_direct_map(m, vm_type)):
            flags |= GUEST_MEMFD_FLAG_NO_DIRECT_MAP
        return flags

    # --- mm --------------------------------------------------------------------------------
    def mapping_refuses_gup(self, m: Machine, mapping: AddressSpace) -> bool:
        """GUP's refusal: ``secretmem_mapping()`` before the series, ``mapping_no_direct_map()``
        (``gup_fast_folio_allowed``/``check_vma_flags``) once it has ``AS_NO_DIRECT_MAP``."""
        if self.series:
            return mapping.test(AS_NO_DIRECT_MAP)
        return mapping.kind == "secretmem"

    def folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        """Hook *zap*: ``folio_zap_direct_map()`` (v12 02/16, ``mm/memory.c``).

        Invalidate, then the *flush* hook whatever the outcome.  A large folio is
        refused first, -EINVAL and no flush ("order-0 only", David Hildenbrand on v11).
        Mainline has no such helper and never calls it; the series' designs do.
        """
        if folio_test_large(m, folio):
            m.trace.emit("folio_zap_direct_map", "refuse_large", folio, {"err": "EINVAL"})
            return -EINVAL
        if not m.profile.has_set_direct_map:
            return 0  # !CONFIG_ARCH_HAS_SET_DIRECT_MAP stub: silent success
        ret = yield from set_direct_map_valid_noflush(m, folio, 1, False)
        yield from self.flush_after_zap(m, folio)
        return ret

    def flush_after_zap(self, m: Machine, folio: int) -> KGen[None]:
        """Hook *flush*: ``flush_tlb_kernel_range()`` over the zapped folio (v12 02/16)."""
        yield from flush_tlb_kernel_range(m, folio, folio + 1, "folio_zap_direct_map")

    def folio_restore_direct_map(self, m: Machine, folio: int) -> KGen[None]:
        """Hook *restore*: ``folio_restore_direct_map()`` (v12 02/16): cannot fail after the
        zap split; WARN if it does."""
        if not m.profile.has_set_direct_map:
            return
        r = yield from set_direct_map_valid_noflush(m, folio, 1, True)
        if r:
            m.trace.emit("folio_restore_direct_map", "warn_on_once", folio, {"err": -r})

    # --- guest_memfd ---------------------------------------------------------------------------
    def kvm_gmem_zap_for_handout(self, m: Machine, folio: int) -> KGen[int]:
        """Hook: a locked, uptodate folio is about to be handed out (mapped by the user fault,
        or returned by ``kvm_gmem_get_pfn()`` before it is prepared).  Mainline: nothing.
        v12: ``if (kvm_gmem_no_direct_map(inode)) kvm_gmem_folio_zap_direct_map(folio)``."""
        yield from ()
        return 0

    def kvm_gmem_restore_on_free(self, m: Machine, pfn: int) -> KGen[None]:
        """Hook: in ``->free_folio``, after ``kvm_arch_gmem_invalidate()``.  Mainline: nothing;
        v12 restores a marked folio."""
        yield from ()

    def kvm_gmem_fault_user_mapping(self, m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
        """``kvm_gmem_fault_user_mapping()``: zero if not uptodate, hand out, map."""
        ret, folio = yield from kvm_gmem_fault_uptodate_folio(m, vma, page)
        if ret:
            return ret, -1
        err = yield from self.kvm_gmem_zap_for_handout(m, folio)
        if err:
            return (yield from fault_fail(m, folio, vmf_error(err)))
        return VM_FAULT_LOCKED, folio

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[GetPfnResult]:
        """``kvm_gmem_get_pfn()`` (kvm/next, after "KVM: guest_memfd: Remove preparation
        tracking"): zero if not uptodate, hand out, ``kvm_arch_gmem_prepare()`` every time."""
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        yield from zero_if_not_uptodate(m, folio, "kvm_gmem_get_pfn")
        r = yield from self.kvm_gmem_zap_for_handout(m, folio)
        if r:
            return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))
        r = yield from kvm_arch_gmem_prepare(m, kvm, gfn, folio)
        return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))

    def kvm_gmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        """``kvm_gmem_free_folio()``: ``kvm_arch_gmem_invalidate()``, then the restore hook."""
        yield from kvm_arch_gmem_invalidate(m, pfn)
        yield from self.kvm_gmem_restore_on_free(m, pfn)

    # --- secretmem ---------------------------------------------------------------------------
    secretmem_sets_no_direct_map: ClassVar[bool] = False

    def secretmem_fault(self, m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
        """``secretmem_fault()`` before v11: invalid_noflush, insert, then flush."""
        return (yield from secretmem_fault_common(m, vma, page, self._secretmem_insert))

    def _secretmem_insert(self, m: Machine, mapping: AddressSpace, folio: int,
                          offset: int) -> KGen[int]:
        err = yield from set_direct_map_invalid_noflush(m, folio)
        if err:
            return err
        yield from folio_mark_uptodate(m, folio)
        err = yield from filemap_add_folio(m, mapping, folio, offset)
        if err:
            # "If a split of large page was required, it already happened when we
            # marked the page invalid which guarantees that this call won't fail."
            yield from set_direct_map_default_noflush(m, folio)
            return err
        yield from flush_tlb_kernel_range(m, folio, folio + 1, "secretmem_fault")
        return 0

    def secretmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        """``secretmem_free_folio()``: ``set_direct_map_default_noflush()``, then zero the folio
        (unchanged by v12, whose 03/16 converts only the fault and its error path)."""
        yield from set_direct_map_default_noflush(m, pfn)
        yield from clear_page(m, pfn, "secretmem_free_folio")

    def holds_unmapped(self, m: Machine, pfn: int) -> bool:
        """Does the design keep ``pfn`` out of the direct map on purpose outside any page cache?

        (A pool of pre-unmapped frames would; no posted version does.)
        """
        return False

    def free_unmapped_frame(self, m: Machine, pfn: int) -> KGen[bool]:
        """Take back a frame whose last reference went (True), instead of the page allocator."""
        yield from ()
        return False

    def map_unmapped_block(self, m: Machine) -> KGen[bool]:
        """The mapped free lists ran dry: map back a free unmapped block (True), if the design has one."""
        yield from ()
        return False

    def filemap_add_undo(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        """Undo ``filemap_add_hook`` when the insertion lost a race (-EEXIST)."""
        yield from ()

    def filemap_alloc_folio(self, m: Machine, mapping: AddressSpace, index: int) -> KGen[int]:
        """``filemap_alloc_folio()``: a new folio for ``index`` of ``mapping`` (pfn or -ENOMEM);
        guest_memfd on a ``gmem_thp`` profile tries a PMD-order one first."""
        if m.profile.gmem_thp and mapping.kind == "guest_memfd":
            pfn = yield from kvm_gmem_get_huge_folio(m, mapping, index)
            if pfn >= 0:
                return pfn
        return (yield from alloc_page(m, mapping.gfp_mask, kind="file"))

    def kvm_gmem_allocate(self, m: Machine, inode: Inode, offset: int, length: int) -> KGen[int]:
        """``kvm_gmem_allocate()``, the allocating half of ``kvm_gmem_fallocate()``."""
        return (yield from kvm_gmem_allocate(m, inode, offset, length))

    # --- KVM's pfncache (virt/kvm/pfncache.c, gmemlab.model.kvm.pfncache) ------------------------
    pfncache_gmem: bool = False  # Firecracker's 0040-0046: the pfncache serves guest_memfd itself

    def gpc_to_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int, uhva: int) -> KGen[int]:
        """``hva_to_pfn()`` as ``hva_to_pfn_retry()`` calls it (``FOLL_WRITE``): GUP on the
        slot's userspace address; a referenced pfn, or -EFAULT (``KVM_PFN_ERR_FAULT``)."""
        pages = yield from get_user_pages(m, kvm.owner, uhva, 1, FOLL_WRITE, "hva_to_pfn")
        return -EFAULT if isinstance(pages, int) else pages[0]

    def gpc_map(self, m: Machine, pfn: int) -> KGen[bool]:
        """``gpc_map()``: ``kmap()``, which is the direct-map address (False: no vmap)."""
        yield from ()
        return False

    def gpc_unmap(self, m: Machine, pfn: int, vmap: bool) -> KGen[None]:
        """``gpc_unmap()``: ``kunmap()`` of a direct-map address undoes nothing on 64-bit."""
        yield from ()

    def describe(self) -> str:
        return f"{self.name}: {self.title}"


# --- shared pieces ---------------------------------------------------------------------------------
def secretmem_fault_common(m: Machine, vma: Vma, page: int,
                           insert: Callable[[Machine, AddressSpace, int, int], KGen[int]]
                           ) -> KGen[FaultResult]:
    """``secretmem_fault()`` around the version-specific "remove, insert, flush" step.

    SIGBUS past i_size; under the shared invalidate lock: find-and-lock, or
    allocate a zeroed folio and ``insert`` it (retrying on -EEXIST).
    """

    assert vma.file is not None
    inode = vma.file.inode
    mapping = inode.mapping
    offset = vma.pgoff + page
    if offset << PAGE_SHIFT >= inode.size:
        return vmf_error(-EINVAL), -1
    yield from down_read(m, mapping.invalidate_lock)
    ret: FaultResult
    while True:
        folio = yield from filemap_get_folio(m, mapping, offset, FGP_LOCK)
        if folio >= 0:
            ret = VM_FAULT_LOCKED, folio
            break
        folio = yield from alloc_page(m, GFP_HIGHUSER_ZERO, kind="file")
        if folio < 0:
            ret = VM_FAULT_OOM, -1
            break
        err = yield from insert(m, mapping, folio, offset)
        if err:
            yield from folio_put(m, folio)
            if err == -EEXIST:
                continue
            ret = vmf_error(err), -1
            break
        ret = VM_FAULT_LOCKED, folio
        break
    yield from up_read(m, mapping.invalidate_lock)
    return ret


def gmem_mainline_flags(m: Machine, vm_type: int | None) -> int:
    """Mainline's ``kvm_gmem_get_supported_flags()``: MMAP, and INIT_SHARED where the VM type
    has no private memory of its own (every type in the system-wide answer)."""
    flags = GUEST_MEMFD_FLAG_MMAP
    if vm_type is None or m.profile.supports_gmem_init_shared(vm_type):
        flags |= GUEST_MEMFD_FLAG_INIT_SHARED
    return flags


def zero_if_not_uptodate(m: Machine, folio: int, fn: str) -> KGen[None]:
    """``if (!folio_test_uptodate(folio)) { clear_highpage(); folio_mark_uptodate(); }``."""
    if not m.mem.test_uptodate(folio):
        yield from clear_page(m, folio, fn)
        yield from folio_mark_uptodate(m, folio)


def kvm_gmem_prepare_folio_tracked(m: Machine, kvm: Kvm, gfn: int, folio: int) -> KGen[int]:
    """``kvm_gmem_prepare_folio()`` up to v6.18 (and the v7..v9 bases): zero, arch prepare,
    ``kvm_gmem_mark_prepared()`` (uptodate) on success.  kvm/next dropped the tracking
    ("KVM: guest_memfd: Remove preparation tracking"): it zeroes a folio that is not uptodate and
    prepares every time (:meth:`Design.kvm_gmem_get_pfn`)."""
    yield from clear_page(m, folio, "kvm_gmem_prepare_folio")
    r = yield from kvm_arch_gmem_prepare(m, kvm, gfn, folio)
    if not r:
        yield from folio_mark_uptodate(m, folio)  # kvm_gmem_mark_prepared()
    return r


def kvm_gmem_fault_uptodate_folio(m: Machine, vma: Vma, page: int) -> KGen[FaultResult]:
    """``kvm_gmem_fault_user_mapping()`` up to the zeroing, as every version has it.

    SIGBUS past ``i_size`` and without ``INIT_SHARED``; ``kvm_gmem_get_folio()``
    (``-EAGAIN`` -> ``VM_FAULT_RETRY``); ``WARN_ON_ONCE(folio_test_large(folio))`` ->
    SIGBUS (mainline since mmap support, 6.18) unless the version takes large folios;
    zero a folio that is not uptodate.
    Returns ``(0, locked folio)`` or ``(vm_fault_t, -1)``.
    """
    assert vma.file is not None
    inode = vma.file.inode
    pgoff = vma.pgoff + page
    if pgoff << PAGE_SHIFT >= inode.size:
        return VM_FAULT_SIGBUS, -1
    if not inode.private & GUEST_MEMFD_FLAG_INIT_SHARED:
        return VM_FAULT_SIGBUS, -1
    folio = yield from kvm_gmem_get_folio(m, inode, pgoff)
    if folio < 0:
        return (VM_FAULT_RETRY if folio == -EAGAIN else vmf_error(folio)), -1
    if folio_test_large(m, folio) and not m.design.large_folios:
        m.trace.emit("kvm_gmem_fault_user_mapping", "warn_on_once", folio, {"large": True})
        return (yield from fault_fail(m, folio, VM_FAULT_SIGBUS))
    yield from zero_if_not_uptodate(m, folio, "kvm_gmem_fault_user_mapping")
    return 0, folio


def fault_fail(m: Machine, folio: int, ret: int) -> KGen[FaultResult]:
    """``out_folio:``: unlock and put the folio, return the fault code."""
    yield from folio_unlock(m, folio)
    yield from folio_put(m, folio)
    return ret, -1


def kvm_gmem_get_pfn_folio(m: Machine, slot: Memslot, gfn: int) -> KGen[tuple[File | None, int]]:
    """``kvm_gmem_get_pfn()`` up to ``__kvm_gmem_get_pfn()``: (file, locked folio or -errno)."""
    index = kvm_gmem_get_index(slot, gfn)
    file = yield from kvm_gmem_get_file(m, slot)
    if file is None:
        return None, -EFAULT
    folio = yield from __kvm_gmem_get_pfn(m, file, slot, index)
    return file, folio


def kvm_gmem_get_pfn_done(m: Machine, file: File | None, r: int, folio: int) -> KGen[GetPfnResult]:
    """The tail of ``kvm_gmem_get_pfn()``: unlock; on error also put; drop the file ref."""

    if folio >= 0:
        yield from folio_unlock(m, folio)
        if r:
            yield from folio_put(m, folio)
    if file is not None:
        yield from fput(m, file)
    if r:
        m.trace.emit("kvm_gmem_get_pfn", "get_pfn_error", folio, {"err": -r})
        return r, -1
    m.trace.emit("kvm_gmem_get_pfn", "get_pfn", folio)
    return 0, folio


def set_marker(m: Machine, pfn: int, fn: str) -> KGen[None]:
    """``folio->private |= KVM_GMEM_FOLIO_NO_DIRECT_MAP`` (kept on every page of a large folio)."""
    yield ("folio", pfn)
    private = m.mem.private
    for page in folio_pages(m, pfn):
        private[page] |= KVM_GMEM_FOLIO_NO_DIRECT_MAP
    m.trace.emit(fn, "marker_set", pfn)


def clear_marker(m: Machine, pfn: int, fn: str) -> KGen[None]:
    """``folio->private &= ~KVM_GMEM_FOLIO_NO_DIRECT_MAP`` (on every page of a large folio)."""
    yield ("folio", pfn)
    private = m.mem.private
    for page in folio_pages(m, pfn):
        private[page] &= ~KVM_GMEM_FOLIO_NO_DIRECT_MAP
    m.trace.emit(fn, "marker_clear", pfn)


def has_marker(m: Machine, pfn: int) -> bool:
    """``kvm_gmem_folio_no_direct_map()``."""
    return bool(m.mem.private[pfn] & KVM_GMEM_FOLIO_NO_DIRECT_MAP)


def inode_no_direct_map(m: Machine, pfn: int) -> bool:
    """``GMEM_I(folio_inode(folio))->flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP``."""
    return kvm_gmem_no_direct_map(folio_inode(m, pfn))


def arch_supports_no_direct_map(m: Machine, vm_type: int | None, *, exclude: tuple[int, ...]) -> bool:
    """``kvm_arch_gmem_supports_no_direct_map()``, per arch, with the VM types a version excludes.

    x86: ``can_set_direct_map()`` minus ``exclude``; arm64: ``can_set_direct_map() &&
    cpus_have_final_cap(ARM64_HAS_STAGE2_FWB)``; other arches: not defined (false).
    A what-if profile (``what_if_coco_no_direct_map``) lifts ``exclude``: no kernel does.
    """
    prof = m.profile
    if prof.arch == "x86_64":
        excluded = () if prof.what_if_coco_no_direct_map else exclude
        return prof.can_set_direct_map and vm_type not in excluded
    if prof.arch == "arm64":
        return prof.can_set_direct_map and prof.s2fwb
    return False
