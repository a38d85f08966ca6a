"""Kernel pieces the cost strategies share: zap without flush, 2 MiB blocks of frames.

None of these is code of the series; they are what the strategies discussed
around it (``series-spec.md`` §3.7, §7.3, §7.4) need from mm:

* :func:`folio_zap_direct_map_noflush`: the zap half of v12's
  ``folio_zap_direct_map()``, for strategies that flush later or elsewhere.
* :func:`set_direct_map_block_noflush`: CPA over a naturally aligned 2 MiB block
  (``page_alloc.alloc_block()``).  Where the block
  is still one 2 MiB leaf, ``__change_page_attr()`` keeps the large page and
  flips the present bit of the PMD (``try_preserve_large_page()``): one entry
  changes, nothing is split, no page table is allocated.  A block inside a 1 GiB
  leaf splits that leaf to 2 MiB first; a block already split to 4 KiB changes
  its 512 PTEs one by one.  arm64's ``update_range_prot()`` does the same by
  itself (and flushes an invalidation).
"""

from __future__ import annotations

from errno import EFAULT
from typing import TYPE_CHECKING

from gmemlab.model.mm.direct_map import LEVEL_1G, LEVEL_2M
from gmemlab.model.mm.locks import spin_lock, spin_unlock
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush, split_large_page
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


def folio_zap_direct_map_noflush(m: Machine, folio: int) -> KGen[int]:
    """``set_direct_map_valid_noflush(folio_address(folio), 1, false)`` behind the arch stub."""
    if not m.profile.has_set_direct_map:
        return 0  # !CONFIG_ARCH_HAS_SET_DIRECT_MAP: silent success, as v12's helper
    return (yield from set_direct_map_valid_noflush(m, folio, 1, False))


def set_direct_map_block_noflush(m: Machine, base: int, valid: bool) -> KGen[int]:
    """CPA over the 2 MiB-aligned block at ``base``, keeping a 2 MiB leaf whole; no flush."""
    prof = m.profile
    if not prof.has_set_direct_map:
        return 0
    if prof.arch == "arm64":
        # update_range_prot() changes a whole PMD block as one entry (pageattr_pmd_entry());
        # set_memory_valid() flushes an invalidation itself.
        return (yield from set_direct_map_valid_noflush(m, base, PAGES_PER_PMD, valid))
    d = m.dmap
    fn = "__change_page_attr"
    while True:
        yield from spin_lock(m, ("cpa_lock",))
        yield ("dmap", base)
        leaf = d.leaf(base)
        if leaf is None:
            yield from spin_unlock(m, ("cpa_lock",))
            m.trace.emit(fn, "cpa_fault", base)
            return -EFAULT
        level, _first, present = leaf
        if level == LEVEL_2M and present != valid:
            d.set_pmd_leaf(base // PAGES_PER_PMD, valid)
            m.trace.emit(fn, "dmap_set_2m" if valid else "dmap_clear_2m", base, {"level": "2M"})
            if m.inv.enabled:
                for pfn in range(base, base + PAGES_PER_PMD):
                    m.inv.on_direct_map_change(pfn, valid)
        if level == LEVEL_2M or (level == LEVEL_1G and present == valid):
            yield from spin_unlock(m, ("cpa_lock",))
            return 0
        yield from spin_unlock(m, ("cpa_lock",))
        if level == LEVEL_1G:
            r = yield from split_large_page(m, base, LEVEL_1G)
            if r:
                return r
            continue
        # Already split to 4 KiB: the ordinary per-page path.
        return (yield from set_direct_map_valid_noflush(m, base, PAGES_PER_PMD, valid))
