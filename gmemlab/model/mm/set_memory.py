"""CPA: changing the direct map's attributes (``arch/x86/mm/pat/set_memory.c``).

The kernel paths over :class:`~gmemlab.model.mm.direct_map.DirectMap`'s state:
``set_direct_map_valid_noflush()`` (v12 patch 01 signature),
``__change_page_attr()`` with its split-and-repeat loop, and
``split_large_page()``, which takes a page-table page from the page allocator,
fills it through the direct map and flushes every TLB.  arm64's
``pageattr.c`` answers are folded in where they differ.
"""

from __future__ import annotations

from errno import EFAULT, ENOMEM
from typing import TYPE_CHECKING

from gmemlab.model.mm.direct_map import LEVEL_1G, LEVEL_4K, LEVEL_NAMES, PFN_PMD_SHIFT, PFN_PUD_SHIFT
from gmemlab.model.mm.locks import spin_lock, spin_unlock
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
    arm64: no-op returning 0 unless ``can_set_direct_map()``; otherwise
    ``set_memory_valid()``, which flushes the range itself.
    """
    prof = m.profile
    if not prof.has_set_direct_map:
        return 0
    if prof.arch == "arm64" and not prof.can_set_direct_map:
        return 0  # arch/arm64/mm/pageattr.c: silent no-op
    fn = "set_direct_map_valid_noflush"
    for p in range(pfn, pfn + numpages):
        r = yield from _change_page_attr(m, p, valid, fn)
        if r:
            return r
    if prof.set_direct_map_flushes:
        yield from flush_tlb_kernel_range(m, pfn, pfn + numpages, "__change_memory_common")
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
    if m.faults.should_fail("pt_alloc"):
        m.trace.emit(fn, "pt_alloc_fail", pfn, {"level": LEVEL_NAMES[level], "err": "ENOMEM"})
        return -ENOMEM
    base = yield from alloc_page(m, GFP_KERNEL, kind="pgtable")
    if base < 0:
        m.trace.emit(fn, "pt_alloc_fail", pfn, {"level": LEVEL_NAMES[level], "err": "ENOMEM"})
        return -ENOMEM
    m.trace.emit(fn, "pt_alloc", base, {"for_pfn": pfn, "level": LEVEL_NAMES[level]})
    yield from spin_lock(m, ("cpa_lock",))
    yield ("dmap", pfn)
    leaf = m.dmap.leaf(pfn)
    if leaf is None or leaf[0] != level:
        # Another CPU split it while we allocated: __split_large_page() returns 1.
        yield from spin_unlock(m, ("cpa_lock",))
        yield from free_page_to_allocator(m, base)
        return 0
    # The new table is filled through the direct map (pbase = page_address(base)).
    yield from kernel_access(m, base, "__split_large_page", write=True)
    m.mem.zero(base)
    d = m.dmap
    if level == LEVEL_1G:
        d.split_1g(pfn >> PFN_PUD_SHIFT)
        m.trace.emit("__split_large_page", "dmap_split_1g", pfn, {"pt": base})
    else:
        d.split_2m(pfn >> PFN_PMD_SHIFT)
        m.trace.emit("__split_large_page", "dmap_split_2m", pfn, {"pt": base})
    yield from flush_tlb_all(m, "__split_large_page")
    yield from spin_unlock(m, ("cpa_lock",))
    return 0
