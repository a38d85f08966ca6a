"""The kernel direct map (linear map of all RAM) and its attribute changes.

Models ``arch/x86/mm/init.c`` (``init_memory_mapping`` / ``split_mem_range``:
4K head, 2M, 1G middle, 2M, 4K tail per RAM range) and
``arch/x86/mm/pat/set_memory.c`` (CPA): ``set_direct_map_valid_noflush()`` ->
``__change_page_attr_set_clr()`` -> ``__change_page_attr()``, which splits a 1G
or 2M leaf (``split_large_page``: allocate a page-table page, which can fail
with ``-ENOMEM``; fill it through the direct map; install it;
``flush_tlb_all()``) and repeats until the 4K PTE can be changed.  Nothing is
merged back when pages are restored, as measured on our machines
(``realkernel.md`` §3).  ``/proc/meminfo`` DirectMap4k/2M/1G and
``/proc/vmstat`` ``direct_map_level{2,3}_splits`` have the same meaning here.

Storage is per level: one byte per 1G region, one per 2M region, and a 512-entry
PTE page only for 2M regions that have been split, so a 64 GiB guest costs
kilobytes until its regions split.

arm64 with ``can_set_direct_map()`` (rodata_full and friends) maps the linear
map at page granularity at boot; without it the linear map uses blocks and the
``set_direct_map_*`` calls are silent no-ops returning 0 (``series-spec`` §3.9).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from gmemlab.api import DirectMapCounters
from gmemlab.model.task import KGen
from gmemlab.uapi import PAGES_PER_PMD, PAGES_PER_PUD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

PAGE_OFFSET = 0xFFFF_8880_0000_0000  # x86-64, 4-level paging, no KASLR

# Entry states of the PUD and PMD levels.
E_NONE = 0  # nothing mapped
E_LEAF = 1  # present large leaf
E_TABLE = 2  # points to a lower-level table
E_LEAF_NP = 3  # large leaf with the present bit clear (only the 2M-zap strategy makes these)
# PTE states.
PTE_NONE = 0
PTE_PRESENT = 1
PTE_NOT_PRESENT = 2

LEVEL_4K, LEVEL_2M, LEVEL_1G = 1, 2, 3  # x86 PG_LEVEL_*
LEVEL_NAMES = {LEVEL_4K: "4K", LEVEL_2M: "2M", LEVEL_1G: "1G"}
LEVEL_PAGES = {LEVEL_4K: 1, LEVEL_2M: PAGES_PER_PMD, LEVEL_1G: PAGES_PER_PUD}

Granularity = Literal["x86", "4k"]

_PMD_SHIFT = 9  # pfn -> 2M region
_PUD_SHIFT = 18  # pfn -> 1G region


def va(pfn: int) -> int:
    """``__va(PFN_PHYS(pfn))``: the page's direct-map address."""
    return PAGE_OFFSET + (pfn << 12)


class DirectMap:
    """Direct-map page-table state (no generators here; CPA is below)."""

    __slots__ = ("count", "pmd", "pte", "pud", "splits_1g", "splits_2m")

    def __init__(self, nr_pages: int, ram: Iterable[tuple[int, int]], granularity: Granularity,
                 gbpages: bool = True) -> None:
        n1g = -(-nr_pages // PAGES_PER_PUD)
        self.pud = bytearray(n1g)
        self.pmd = bytearray(n1g * 512)
        self.pte: dict[int, bytearray] = {}
        self.count = {LEVEL_4K: 0, LEVEL_2M: 0, LEVEL_1G: 0}
        self.splits_2m = 0  # vmstat direct_map_level2_splits
        self.splits_1g = 0  # vmstat direct_map_level3_splits
        for start, end in ram:
            for lo, hi, level in _split_mem_range(start, end, granularity, gbpages):
                self._map(lo, hi, level)

    def _map(self, lo: int, hi: int, level: int) -> None:
        if level == LEVEL_4K:
            self._map_4k(lo, hi)
            return
        for base in range(lo, hi, LEVEL_PAGES[level]):
            r1 = base >> _PUD_SHIFT
            if level == LEVEL_1G:
                self.pud[r1] = E_LEAF
            else:
                self.pud[r1] = E_TABLE
                self.pmd[base >> _PMD_SHIFT] = E_LEAF
            self.count[level] += 1

    def _map_4k(self, lo: int, hi: int) -> None:
        """Map [lo, hi) with 4K PTEs, one 2M region's PTE page at a time.

        Page by page would give the same entries, but booting a machine is on
        the checker's hot path (it rebuilds one per replayed schedule).
        """
        pos = lo
        while pos < hi:
            r2 = pos >> _PMD_SHIFT
            end = min(hi, (r2 + 1) << _PMD_SHIFT)
            self.pud[pos >> _PUD_SHIFT] = E_TABLE
            self.pmd[r2] = E_TABLE
            ptes = self.pte.get(r2)
            if ptes is None:
                ptes = self.pte[r2] = bytearray(PAGES_PER_PMD)
            ptes[pos & 511 : ((end - 1) & 511) + 1] = bytes((PTE_PRESENT,)) * (end - pos)
            self.count[LEVEL_4K] += end - pos
            pos = end

    # --- lookups ------------------------------------------------------------------------
    def leaf(self, pfn: int) -> tuple[int, int, bool] | None:
        """``lookup_address()``: (level, first pfn of the leaf, present), or None if unmapped."""
        r1 = pfn >> _PUD_SHIFT
        s1 = self.pud[r1] if r1 < len(self.pud) else E_NONE
        if s1 == E_TABLE:
            r2 = pfn >> _PMD_SHIFT
            s2 = self.pmd[r2]
            if s2 == E_TABLE:
                e = self.pte[r2][pfn & 511]
                if e == PTE_NONE:
                    return None
                return LEVEL_4K, pfn, e == PTE_PRESENT
            if s2 == E_NONE:
                return None
            return LEVEL_2M, r2 << _PMD_SHIFT, s2 == E_LEAF
        if s1 == E_NONE:
            return None
        return LEVEL_1G, r1 << _PUD_SHIFT, s1 == E_LEAF

    def present(self, pfn: int) -> bool:
        """``kernel_page_present()``."""
        r1 = pfn >> _PUD_SHIFT
        s1 = self.pud[r1]
        if s1 == E_LEAF:
            return True
        if s1 != E_TABLE:
            return False
        r2 = pfn >> _PMD_SHIFT
        s2 = self.pmd[r2]
        if s2 == E_TABLE:
            return self.pte[r2][pfn & 511] == PTE_PRESENT
        return s2 == E_LEAF

    def lookup_many(self, pfns: NDArray[np.int64]) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
        """:meth:`leaf` for each of ``pfns``: its level (0: unmapped) and whether it is present."""
        s1 = np.frombuffer(self.pud, np.uint8)[pfns >> _PUD_SHIFT]
        r2 = pfns >> _PMD_SHIFT
        s2 = np.frombuffer(self.pmd, np.uint8)[r2]
        level = np.where(s1 == E_NONE, 0, LEVEL_1G).astype(np.uint8)
        present = s1 == E_LEAF
        in_pmd = s1 == E_TABLE
        level[in_pmd & (s2 != E_NONE)] = LEVEL_2M
        present[in_pmd] = s2[in_pmd] == E_LEAF
        at = np.flatnonzero(in_pmd & (s2 == E_TABLE))
        if len(at):
            # The PTE pages of the regions involved, joined: one lookup for all of them.
            regions, rank = np.unique(r2[at], return_inverse=True)
            ptes = np.frombuffer(b"".join([self.pte[r] for r in regions.tolist()]), np.uint8)
            e = ptes[(rank << _PMD_SHIFT) | (pfns[at] & 511)]
            level[at] = np.where(e == PTE_NONE, 0, LEVEL_4K)
            present[at] = e == PTE_PRESENT
        return level, present

    def present_many(self, pfns: NDArray[np.int64]) -> NDArray[np.bool_]:
        """:meth:`present` for each of ``pfns``."""
        return self.lookup_many(pfns)[1]

    def set_ptes(self, pfns: NDArray[np.int64], valid: bool) -> None:
        """:meth:`set_pte` for each of ``pfns``, all mapped by 4K entries."""
        if not len(pfns):
            return
        new = PTE_PRESENT if valid else PTE_NOT_PRESENT
        r2 = pfns >> _PMD_SHIFT
        order = None if (r2[1:] >= r2[:-1]).all() else np.argsort(r2, kind="stable")
        if order is not None:
            r2 = r2[order]
        cuts = (np.flatnonzero(r2[1:] != r2[:-1]) + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, len(pfns)], strict=True):
            at = slice(lo, hi) if order is None else order[lo:hi]
            np.frombuffer(self.pte[int(r2[lo])], np.uint8)[pfns[at] & 511] = new

    def meminfo(self) -> DirectMapCounters:
        c = self.count
        return DirectMapCounters(c[LEVEL_4K] * 4, c[LEVEL_2M] * 2048, c[LEVEL_1G] * 1024 * 1024)

    def not_present_pages(self) -> int:
        return sum(t.count(PTE_NOT_PRESENT) for t in self.pte.values()) + PAGES_PER_PMD * sum(
            1 for s in self.pmd if s == E_LEAF_NP
        )

    def split_regions_2m(self) -> list[int]:
        """2M regions (by index) now mapped with 4K PTEs, for the direct-map picture."""
        return sorted(self.pte)

    # --- the structural changes CPA makes (called from the generators below) -------------
    def split_1g(self, r1: int) -> None:
        self.pud[r1] = E_TABLE
        base = r1 * 512
        self.pmd[base : base + 512] = bytes((E_LEAF,)) * 512
        self.count[LEVEL_1G] -= 1
        self.count[LEVEL_2M] += 512
        self.splits_1g += 1

    def split_2m(self, r2: int) -> None:
        present = self.pmd[r2] == E_LEAF
        self.pmd[r2] = E_TABLE
        self.pte[r2] = bytearray((PTE_PRESENT if present else PTE_NOT_PRESENT,)) * PAGES_PER_PMD
        self.count[LEVEL_2M] -= 1
        self.count[LEVEL_4K] += PAGES_PER_PMD
        self.splits_2m += 1

    def set_pte(self, pfn: int, valid: bool) -> bool:
        """Set a 4K entry's present bit; returns whether it changed."""
        ptes = self.pte[pfn >> _PMD_SHIFT]
        new = PTE_PRESENT if valid else PTE_NOT_PRESENT
        old = ptes[pfn & 511]
        ptes[pfn & 511] = new
        return old != new

    def set_pmd_leaf(self, r2: int, valid: bool) -> None:
        self.pmd[r2] = E_LEAF if valid else E_LEAF_NP


def _split_mem_range(start: int, end: int, granularity: Granularity,
                     gbpages: bool) -> list[tuple[int, int, int]]:
    """``split_mem_range()``: the page sizes x86 uses to map [start, end) (in pfns)."""
    if granularity == "4k":
        return [(start, end, LEVEL_4K)]

    def up(x: int, a: int) -> int:
        return -(-x // a) * a

    def down(x: int, a: int) -> int:
        return x // a * a

    out: list[tuple[int, int, int]] = []
    pos = start
    head_end = min(up(pos, PAGES_PER_PMD), end)
    if pos < head_end:
        out.append((pos, head_end, LEVEL_4K))
        pos = head_end
    if gbpages:
        mid_2m_end = min(up(pos, PAGES_PER_PUD), down(end, PAGES_PER_PMD))
        if pos < mid_2m_end:
            out.append((pos, mid_2m_end, LEVEL_2M))
            pos = mid_2m_end
        g_end = down(end, PAGES_PER_PUD)
        if pos < g_end:
            out.append((pos, g_end, LEVEL_1G))
            pos = g_end
    m_end = down(end, PAGES_PER_PMD)
    if pos < m_end:
        out.append((pos, m_end, LEVEL_2M))
        pos = m_end
    if pos < end:
        out.append((pos, end, LEVEL_4K))
    return out


# --- CPA: the kernel paths -------------------------------------------------------------------
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
        from gmemlab.model.mm.tlb import flush_tlb_kernel_range

        yield from flush_tlb_kernel_range(m, pfn, pfn + numpages, "__change_memory_common")
    return 0


def _change_page_attr(m: Machine, pfn: int, valid: bool, fn: str) -> KGen[int]:
    """``__change_page_attr()`` for one page, with its split-and-repeat loop."""
    from gmemlab.model.mm.locks import spin_lock, spin_unlock

    d = m.dmap
    while True:
        yield from spin_lock(m, ("cpa_lock",))
        yield ("dmap", pfn)
        leaf = d.leaf(pfn)
        if leaf is None:
            yield from spin_unlock(m, ("cpa_lock",))
            m.trace.emit(fn, "cpa_fault", pfn)
            return -14  # -EFAULT: __cpa_process_fault() for an unmapped address
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
    from gmemlab.model.mm.locks import spin_lock, spin_unlock
    from gmemlab.model.mm.page_alloc import GFP_KERNEL, alloc_page, free_page_to_allocator
    from gmemlab.model.mm.tlb import flush_tlb_all, kernel_access

    fn = "split_large_page"
    if m.faults.should_fail("pt_alloc"):
        m.trace.emit(fn, "pt_alloc_fail", pfn, {"level": LEVEL_NAMES[level], "err": "ENOMEM"})
        return -12
    base = yield from alloc_page(m, GFP_KERNEL, kind="pgtable")
    if base < 0:
        m.trace.emit(fn, "pt_alloc_fail", pfn, {"level": LEVEL_NAMES[level], "err": "ENOMEM"})
        return -12
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
        d.split_1g(pfn >> _PUD_SHIFT)
        m.trace.emit("__split_large_page", "dmap_split_1g", pfn, {"pt": base})
    else:
        d.split_2m(pfn >> _PMD_SHIFT)
        m.trace.emit("__split_large_page", "dmap_split_2m", pfn, {"pt": base})
    yield from flush_tlb_all(m, "__split_large_page")
    yield from spin_unlock(m, ("cpa_lock",))
    return 0
