"""CPA: changing the direct map's attributes (``arch/x86/mm/pat/set_memory.c``).

The kernel paths over :class:`~gmemlab.model.mm.direct_map.DirectMap`'s state:
``set_direct_map_valid_noflush()`` (v12 patch 01 signature),
``__change_page_attr()`` with its split-and-repeat loop, and
``split_large_page()``, which takes a page-table page from the page allocator,
fills it through the direct map and flushes every TLB.

arm64 (``arch/arm64/mm/pageattr.c`` and ``mmu.c`` as in mainline since 6.18):
``set_direct_map_valid_noflush()`` is ``set_memory_valid()`` ->
``__change_memory_common()`` -> ``update_range_prot()``, which first splits the
leaves the range cuts (``split_kernel_leaf_mapping()``, on BBML2_NOABORT
systems only; it allocates page tables, can fail with -ENOMEM, which
``update_range_prot()`` WARNs about and returns) and then walks the range,
changing whole PTE, PMD or PUD leaves; ``__change_memory_common()`` flushes
the range when it clears PTE_VALID, never when it only sets it.
"""

from __future__ import annotations

from errno import EFAULT, ENOMEM
from typing import TYPE_CHECKING

from gmemlab.model.mm.direct_map import (
    LEVEL_1G,
    LEVEL_2M,
    LEVEL_4K,
    LEVEL_NAMES,
    LEVEL_PAGES,
    PFN_PMD_SHIFT,
    PFN_PUD_SHIFT,
)
from gmemlab.model.mm.locks import mutex_lock, mutex_unlock, spin_lock, spin_unlock
from gmemlab.model.mm.page_alloc import GFP_KERNEL, alloc_page, free_page_to_allocator
from gmemlab.model.mm.tlb import flush_tlb_all, flush_tlb_kernel_range, kernel_access
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


def set_direct_map_valid_noflush(m: Machine, pfn: int, numpages: int, valid: bool) -> KGen[int]:
    """``set_direct_map_valid_noflush(addr, numpages, valid)`` (v12 patch 01 signature).

    x86: ``__set_pages_p``/``__set_pages_np`` -> ``__change_page_attr_set_clr()``.
    Splits large leaves as needed; does not flush the changed 4K entries (the
    caller must), but each split does ``flush_tlb_all()``.  Returns 0 or -errno.
    arm64: :func:`set_memory_valid`.
    """
    prof = m.profile
    if not prof.has_set_direct_map:
        return 0
    if prof.arch == "arm64":
        return (yield from set_memory_valid(m, pfn, numpages, valid))
    fn = "set_direct_map_valid_noflush"
    for p in range(pfn, pfn + numpages):
        r = yield from _change_page_attr(m, p, valid, fn)
        if r:
            return r
    return 0


def set_direct_map_invalid_noflush(m: Machine, pfn: int) -> KGen[int]:
    """``set_direct_map_invalid_noflush(addr)``: x86 ``__set_pages_np()``; arm64
    ``update_range_prot()`` clearing PTE_VALID, without ``set_memory_valid()``'s flush."""
    return (yield from _set_direct_map_page_noflush(m, pfn, False))


def set_direct_map_default_noflush(m: Machine, pfn: int) -> KGen[int]:
    """``set_direct_map_default_noflush(addr)``: x86 ``__set_pages_p()``; arm64
    ``update_range_prot()`` setting PTE_VALID (no flush there either)."""
    return (yield from _set_direct_map_page_noflush(m, pfn, True))


def _set_direct_map_page_noflush(m: Machine, pfn: int, valid: bool) -> KGen[int]:
    prof = m.profile
    if prof.arch != "arm64":
        return (yield from set_direct_map_valid_noflush(m, pfn, 1, valid))
    if not prof.has_set_direct_map or not prof.can_set_direct_map:
        return 0
    return (yield from update_range_prot(m, pfn, pfn + 1, valid))


def set_memory_valid(m: Machine, pfn: int, numpages: int, valid: bool) -> KGen[int]:
    """arm64 ``set_direct_map_valid_noflush()``: a silent no-op returning 0 unless
    ``can_set_direct_map()``, else ``set_memory_valid()`` -> ``__change_memory_common()``:
    ``update_range_prot()``, then ``flush_tlb_kernel_range()`` unless the change only sets
    PTE_VALID ("a non-valid entry cannot be cached in the TLB"), whatever it returned."""
    if not m.profile.can_set_direct_map:
        return 0
    ret = yield from update_range_prot(m, pfn, pfn + numpages, valid)
    if not valid:
        yield from flush_tlb_kernel_range(m, pfn, pfn + numpages, "__change_memory_common")
    return ret


def update_range_prot(m: Machine, start: int, end: int, valid: bool) -> KGen[int]:
    """arm64 ``update_range_prot()``: split the leaves [start, end) cuts (WARN and return the
    error if that fails), then change every leaf in the range whole (``pageattr_ops``)."""
    fn = "update_range_prot"
    ret = yield from split_kernel_leaf_mapping(m, start, end)
    if ret:
        m.trace.emit(fn, "warn_on_once", start, {"err": "ENOMEM"})
        return ret
    d = m.dmap
    pfn = start
    while pfn < end:
        yield ("dmap", pfn)
        leaf = d.leaf(pfn)
        if leaf is None:
            return -EFAULT  # walk_kernel_page_table_range_lockless(): nothing mapped there
        level, base, present = leaf
        if present != valid:
            if level == LEVEL_4K:
                d.set_pte(pfn, valid)
            elif level == LEVEL_2M:
                d.set_pmd_leaf(pfn >> PFN_PMD_SHIFT, valid)
            else:
                d.set_pud_leaf(pfn >> PFN_PUD_SHIFT, valid)
            # Named as x86's CPA names the same changes (a large leaf flipped whole: _2m/_1g).
            m.trace.emit(fn, ("dmap_set" if valid else "dmap_clear") + _LEAF_SUFFIX[level], pfn,
                         {"level": LEVEL_NAMES[level]})
            if m.inv.enabled:
                for p in range(base, base + LEVEL_PAGES[level]):
                    m.inv.on_direct_map_change(p, valid)
        pfn = base + LEVEL_PAGES[level]
    return 0


_LEAF_SUFFIX = {LEVEL_4K: "", LEVEL_2M: "_2m", LEVEL_1G: "_1g"}


def split_kernel_leaf_mapping(m: Machine, start: int, end: int) -> KGen[int]:
    """arm64 ``split_kernel_leaf_mapping(start, end)`` (``arch/arm64/mm/mmu.c``).

    Nothing to do unless ``split_leaf_mapping_possible()`` (BBML2_NOABORT and a linear
    map not page-mapped at boot).  Under ``pgtable_split_lock``: for one page, split at
    the less aligned of its two ends (the other then lies on a leaf boundary too); for
    more, at both ends.
    """
    if not m.profile.split_on_demand:
        return 0
    yield from mutex_lock(m, ("pgtable_split_lock",))
    if end - start == 1:
        ret = yield from _split_kernel_leaf_mapping_locked(m, start if _ffs(start) < _ffs(end) else end)
    else:
        ret = yield from _split_kernel_leaf_mapping_locked(m, start)
        if not ret:
            ret = yield from _split_kernel_leaf_mapping_locked(m, end)
    yield from mutex_unlock(m, ("pgtable_split_lock",))
    return ret


def _ffs(pfn: int) -> int:
    """``__ffs()`` of the page's address (an address of 0 counts as aligned to everything)."""
    return (pfn & -pfn).bit_length() if pfn else 64


def _split_kernel_leaf_mapping_locked(m: Machine, pfn: int) -> KGen[int]:
    """``split_kernel_leaf_mapping_locked(addr)``: make ``addr`` a leaf boundary.

    A PUD leaf is split to PMDs (``split_pud()``) unless ``addr`` is PUD aligned, then a
    PMD leaf to PTEs (``split_pmd()``) unless it is PMD aligned; each allocates a table.
    No TLB flush: with BBML2_NOABORT the larger entries may linger in the TLB.
    """
    d = m.dmap
    for level, fn in ((LEVEL_1G, "split_pud"), (LEVEL_2M, "split_pmd")):
        if pfn % LEVEL_PAGES[level] == 0:
            return 0
        yield ("dmap", pfn)
        leaf = d.leaf(pfn)
        if leaf is None:
            return 0
        if leaf[0] == level:
            base = yield from alloc_split_table(m, pfn, level, fn)
            if base < 0:
                return base
            yield from install_split_table(m, base, pfn, level, fn)
    return 0


def _change_page_attr(m: Machine, pfn: int, valid: bool, fn: str) -> KGen[int]:
    """``__change_page_attr()`` for one page, with its split-and-repeat loop."""
    d = m.dmap
    while True:
        yield from spin_lock(m, ("cpa_lock",))
        yield ("dmap", pfn)
        leaf = d.leaf(pfn)
        if leaf is None:
            yield from spin_unlock(m, ("cpa_lock",))
            m.trace.emit(fn, "cpa_fault", pfn)
            return -EFAULT  # __cpa_process_fault() for an unmapped address
        level, _base, present = leaf
        if level == LEVEL_4K:
            if d.set_pte(pfn, valid):
                m.trace.emit(fn, "dmap_set" if valid else "dmap_clear", pfn, {"level": "4K"})
                if m.inv.enabled:
                    m.inv.on_direct_map_change(pfn, valid)
            yield from spin_unlock(m, ("cpa_lock",))
            return 0
        if present == valid:
            # try_preserve_large_page(): the whole leaf already has the wanted state.
            yield from spin_unlock(m, ("cpa_lock",))
            return 0
        yield from spin_unlock(m, ("cpa_lock",))
        r = yield from split_large_page(m, pfn, level)
        if r:
            return r


def split_large_page(m: Machine, pfn: int, level: int) -> KGen[int]:
    """``split_large_page()`` + ``__split_large_page()``: one level down, then flush_tlb_all()."""
    fn = "split_large_page"
    base = yield from alloc_split_table(m, pfn, level, fn)
    if base < 0:
        return base
    yield from spin_lock(m, ("cpa_lock",))
    yield ("dmap", pfn)
    leaf = m.dmap.leaf(pfn)
    if leaf is None or leaf[0] != level:
        # Another CPU split it while we allocated: __split_large_page() returns 1.
        yield from spin_unlock(m, ("cpa_lock",))
        yield from free_page_to_allocator(m, base)
        return 0
    yield from install_split_table(m, base, pfn, level, "__split_large_page")
    yield from flush_tlb_all(m, "__split_large_page")
    yield from spin_unlock(m, ("cpa_lock",))
    return 0


def alloc_split_table(m: Machine, pfn: int, level: int, fn: str) -> KGen[int]:
    """The page-table page a split of the ``level`` leaf at ``pfn`` needs, or -ENOMEM
    (x86 ``alloc_pages(GFP_KERNEL)``, arm64 ``try_pgd_pgtable_alloc_init_mm()``)."""
    if m.faults.should_fail("pt_alloc"):
        m.trace.emit(fn, "pt_alloc_fail", pfn, {"level": LEVEL_NAMES[level], "err": "ENOMEM"})
        return -ENOMEM
    base = yield from alloc_page(m, GFP_KERNEL, kind="pgtable")
    if base < 0:
        m.trace.emit(fn, "pt_alloc_fail", pfn, {"level": LEVEL_NAMES[level], "err": "ENOMEM"})
        return -ENOMEM
    m.trace.emit(fn, "pt_alloc", base, {"for_pfn": pfn, "level": LEVEL_NAMES[level]})
    return base


def install_split_table(m: Machine, base: int, pfn: int, level: int, fn: str) -> KGen[None]:
    """Fill the new table through the direct map (``page_address()`` / ``phys_to_virt()``),
    one entry per piece of the old leaf, with its attributes, and install it."""
    yield from kernel_access(m, base, fn, write=True)
    m.mem.zero(base)
    d = m.dmap
    if level == LEVEL_1G:
        d.split_1g(pfn >> PFN_PUD_SHIFT)
        m.trace.emit(fn, "dmap_split_1g", pfn, {"pt": base})
    else:
        d.split_2m(pfn >> PFN_PMD_SHIFT)
        m.trace.emit(fn, "dmap_split_2m", pfn, {"pt": base})
