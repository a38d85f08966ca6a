"""v12 on 2 MiB guest_memfd folios: one zap and one flush per folio, restored whole.

What VMM users ask for next (issue 11 item 5: Firecracker cannot combine secret
hiding with huge pages), and what v12 refuses: mainline's user fault
``WARN_ON_ONCE(folio_test_large(folio))`` -> SIGBUS, and v12 02/16's
``folio_zap_direct_map()`` returns -EINVAL for a large folio, so a guest fault
fails (profile ``x86_64-gmem-thp`` shows both).  Patrick Roy's answer to
"fault-around" on v7 06/12 (``20250924152214.7292-3-roypat@amazon.co.uk``) was
that hugepage-backed guest_memfd would cut the flushes 512x; no posting combines
the two.  This design is that combination, written from:

* the allocation of guest_memfd's THP patch (Sean Christopherson,
  ``KVM_GUEST_MEMFD_ALLOW_HUGEPAGE``, ``20231027182217.3615211-18-seanjc@google.com``):
  a PMD-order folio where the 2 MiB of the file lies inside ``i_size`` and none
  of it is cached (``kvm_gmem_huge_index()``), else order 0.  The hugetlb
  guest_memfd series (Ackerley Tng, ``GUEST_MEMFD_FLAG_HUGETLB``) allocates from
  a hugetlb pool instead and splits shared folios to 4 KiB
  (``__maybe_split_fresh_folio()``); the direct map sees the same 2 MiB either way
  while a folio stays whole;
* v11's ``folio_zap_direct_map()``, which v12 narrowed to order 0:
  ``set_direct_map_valid_noflush(folio_address(folio), folio_nr_pages(folio), false)``
  and one ``flush_tlb_kernel_range()`` over the folio (``series-spec.md`` §8 bug 15).
  On a 2 MiB leaf, CPA keeps the large page and clears the PMD's present bit
  (x86 ``try_preserve_large_page()``, arm64 ``pageattr_pmd_entry()``): no split,
  no page table;
* :class:`~gmemlab.model.designs.zap2m.Zap2M`'s block path, whose frames become
  one folio (``alloc_block(large=True)``): zeroed, inserted, zapped and flushed
  once when the page cache first needs one of its indices.

The difference from ``zap2m`` is the free: a large folio leaves the page cache
and reaches ``->free_folio`` and the allocator as one.  The model's page cache
holds an entry per index, so its pages are truncated one by one: each runs the
arch invalidate as it goes (``kvm_gmem_free_folio()``), and its frame is held,
still out of the direct map, until the folio's last page is freed; then the
folio is restored with one CPA call (the 2 MiB leaf becomes present again,
nothing was split) and its 512 frames go back to the allocator together.  A
punch-hole inside a folio therefore frees nothing until the rest of it goes
(our choice: THP's ``truncate_inode_partial_folio()`` would try to split it,
hugetlb guest_memfd refuses an unaligned punch with -EINVAL).

Costs: the first fault of each 2 MiB zeroes 512 pages and keeps them resident;
memory freed inside a folio is not reusable until the whole folio is freed.
Exposure: none of a folio's pages is reachable through the direct map from its
zap to its free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs._block import set_direct_map_block_noflush
from gmemlab.model.designs.base import clear_marker, has_marker
from gmemlab.model.designs.zap2m import Zap2M
from gmemlab.model.mm.filemap import AddressSpace
from gmemlab.model.mm.folio import folio_pages, folio_test_large
from gmemlab.model.mm.page_alloc import free_frame
from gmemlab.model.mm.tlb import flush_tlb_kernel_range
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class Folio2M(Zap2M):
    name: ClassVar[str] = "folio2m"
    title: ClassVar[str] = ("v12 on 2 MiB guest_memfd folios: zap, flush and restore a whole folio "
                            "at once")
    source: ClassVar[str] = ("20231027182217.3615211-18-seanjc@google.com (THP guest_memfd); v11's "
                             "folio_zap_direct_map(); 20250924152214.7292-3-roypat@amazon.co.uk")
    large_folios: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        # Pages of each large folio (by first pfn) freed so far: out of the page cache and
        # unreferenced, kept from the allocator until the whole folio is.
        self.freed: dict[int, set[int]] = {}

    def folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        """v11's helper for a large folio (a handout whose folio the allocation could not zap,
        e.g. ENOMEM splitting a 1 GiB leaf): the whole folio, then one flush."""
        if not folio_test_large(m, folio):
            return (yield from super().folio_zap_direct_map(m, folio))
        pages = folio_pages(m, folio)
        ret = yield from set_direct_map_block_noflush(m, pages.start, False)
        yield from flush_tlb_kernel_range(m, pages.start, pages.stop, "folio_zap_direct_map")
        return ret

    def filemap_add_undo(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[None]:
        """A page of a large folio lost its insertion race: it is restored with its folio."""
        if not folio_test_large(m, folio):
            yield from super().filemap_add_undo(m, mapping, folio)

    def kvm_gmem_restore_on_free(self, m: Machine, pfn: int) -> KGen[None]:
        """``->free_folio`` of a page of a large folio: restored with the folio's last page."""
        if not folio_test_large(m, pfn):
            yield from super().kvm_gmem_restore_on_free(m, pfn)

    def holds_unmapped(self, m: Machine, pfn: int) -> bool:
        """A freed page of a large folio whose other pages are not all freed yet."""
        return pfn in self.freed.get(pfn & ~(PAGES_PER_PMD - 1), ())

    def free_unmapped_frame(self, m: Machine, pfn: int) -> KGen[bool]:
        """Hold a page of a large folio until the folio's last page is freed; then restore the
        folio whole (one CPA call, no flush: making entries present needs none) if it was
        zapped, and free its 512 frames."""
        if not folio_test_large(m, pfn):
            return (yield from super().free_unmapped_frame(m, pfn))
        pages = folio_pages(m, pfn)
        freed = self.freed.setdefault(pages.start, set())
        freed.add(pfn)
        yield ("folio", pages.start)
        if len(freed) < PAGES_PER_PMD:
            return True
        del self.freed[pages.start]
        fn = "kvm_gmem_folio_restore_direct_map"
        if has_marker(m, pages.start):
            m.trace.emit(fn, "restore", pages.start, {"pages": PAGES_PER_PMD})
            if m.inv.enabled:
                # A page that lost its insertion race never reached the page cache, was
                # never prepared, and has nothing to invalidate.
                for page in pages:
                    if m.mem.invalidated[page]:
                        m.inv.on_restore(page)
            r = yield from set_direct_map_block_noflush(m, pages.start, True)
            if r:
                m.trace.emit("folio_restore_direct_map", "warn_on_once", pages.start, {"err": -r})
            yield from clear_marker(m, pages.start, fn)
        for page in pages:
            yield from free_frame(m, page)
        return True
