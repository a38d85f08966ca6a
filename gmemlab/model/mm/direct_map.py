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

arm64 (``arch/arm64/mm/mmu.c`` ``map_mem()``) maps the linear map at page
granularity at boot when ``force_pte_mapping()`` (rodata_full and friends
without BBML2_NOABORT, or debug_pagealloc), else with blocks, laid out here as
x86 lays them out (1G PUD, 2M PMD, 4K at the unaligned ends).  The contiguous
hint (PTE_CONT over 16 PTEs, 16 PMDs) is not modelled: ``split_contpte()`` and
``split_contpmd()`` allocate nothing and change no translation, only how much
one TLB entry may cover.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from gmemlab.api import DirectMapCounters
from gmemlab.uapi import PAGES_PER_PMD, PAGES_PER_PUD

if TYPE_CHECKING:
    pass

PAGE_OFFSET = 0xFFFF_8880_0000_0000  # x86-64, 4-level paging, no KASLR

# Entry states of the PUD and PMD levels.
E_NONE = 0  # nothing mapped
E_LEAF = 1  # present large leaf
E_TABLE = 2  # points to a lower-level table
E_LEAF_NP = 3  # large leaf with the present bit clear (a zap of a whole 2M block makes these)
# PTE states.
PTE_NONE = 0
PTE_PRESENT = 1
PTE_NOT_PRESENT = 2

LEVEL_4K, LEVEL_2M, LEVEL_1G = 1, 2, 3  # x86 PG_LEVEL_*
LEVEL_NAMES = {LEVEL_4K: "4K", LEVEL_2M: "2M", LEVEL_1G: "1G"}
LEVEL_PAGES = {LEVEL_4K: 1, LEVEL_2M: PAGES_PER_PMD, LEVEL_1G: PAGES_PER_PUD}

Granularity = Literal["blocks", "4k"]

PFN_PMD_SHIFT = 9  # pfn -> 2M region
PFN_PUD_SHIFT = 18  # pfn -> 1G region


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
            r1 = base >> PFN_PUD_SHIFT
            if level == LEVEL_1G:
                self.pud[r1] = E_LEAF
            else:
                self.pud[r1] = E_TABLE
                self.pmd[base >> PFN_PMD_SHIFT] = E_LEAF
            self.count[level] += 1

    def _map_4k(self, lo: int, hi: int) -> None:
        """Map [lo, hi) with 4K PTEs, one 2M region's PTE page at a time.

        Page by page would give the same entries, but booting a machine is on
        the checker's hot path (it rebuilds one per replayed schedule).
        """
        pos = lo
        while pos < hi:
            r2 = pos >> PFN_PMD_SHIFT
            end = min(hi, (r2 + 1) << PFN_PMD_SHIFT)
            self.pud[pos >> PFN_PUD_SHIFT] = E_TABLE
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
        r1 = pfn >> PFN_PUD_SHIFT
        s1 = self.pud[r1] if r1 < len(self.pud) else E_NONE
        if s1 == E_TABLE:
            r2 = pfn >> PFN_PMD_SHIFT
            s2 = self.pmd[r2]
            if s2 == E_TABLE:
                e = self.pte[r2][pfn & 511]
                if e == PTE_NONE:
                    return None
                return LEVEL_4K, pfn, e == PTE_PRESENT
            if s2 == E_NONE:
                return None
            return LEVEL_2M, r2 << PFN_PMD_SHIFT, s2 == E_LEAF
        if s1 == E_NONE:
            return None
        return LEVEL_1G, r1 << PFN_PUD_SHIFT, s1 == E_LEAF

    def present(self, pfn: int) -> bool:
        """``kernel_page_present()``."""
        r1 = pfn >> PFN_PUD_SHIFT
        s1 = self.pud[r1]
        if s1 == E_LEAF:
            return True
        if s1 != E_TABLE:
            return False
        r2 = pfn >> PFN_PMD_SHIFT
        s2 = self.pmd[r2]
        if s2 == E_TABLE:
            return self.pte[r2][pfn & 511] == PTE_PRESENT
        return s2 == E_LEAF

    def lookup_many(self, pfns: NDArray[np.int64]) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
        """:meth:`leaf` for each of ``pfns``: its level (0: unmapped) and whether it is present."""
        s1 = np.frombuffer(self.pud, np.uint8)[pfns >> PFN_PUD_SHIFT]
        r2 = pfns >> PFN_PMD_SHIFT
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
            e = ptes[(rank << PFN_PMD_SHIFT) | (pfns[at] & 511)]
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
        r2 = pfns >> PFN_PMD_SHIFT
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
        return (sum(t.count(PTE_NOT_PRESENT) for t in self.pte.values())
                + PAGES_PER_PMD * self.pmd.count(E_LEAF_NP) + PAGES_PER_PUD * self.pud.count(E_LEAF_NP))

    def split_regions_2m(self) -> list[int]:
        """2M regions (by index) now mapped with 4K PTEs, for the direct-map picture."""
        return sorted(self.pte)

    # --- the structural changes CPA makes (called from the generators below) -------------
    def split_1g(self, r1: int) -> None:
        present = self.pud[r1] == E_LEAF
        self.pud[r1] = E_TABLE
        base = r1 * 512
        self.pmd[base : base + 512] = bytes((E_LEAF if present else E_LEAF_NP,)) * 512
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
        ptes = self.pte[pfn >> PFN_PMD_SHIFT]
        new = PTE_PRESENT if valid else PTE_NOT_PRESENT
        old = ptes[pfn & 511]
        ptes[pfn & 511] = new
        return old != new

    def set_pmd_leaf(self, r2: int, valid: bool) -> None:
        self.pmd[r2] = E_LEAF if valid else E_LEAF_NP

    def set_pud_leaf(self, r1: int, valid: bool) -> None:
        self.pud[r1] = E_LEAF if valid else E_LEAF_NP


def _split_mem_range(start: int, end: int, granularity: Granularity,
                     gbpages: bool) -> list[tuple[int, int, int]]:
    """``split_mem_range()``: the page sizes x86 uses to map [start, end) (in pfns)."""
    if granularity == "4k":
        return [(start, end, LEVEL_4K)]  # arm64 NO_BLOCK_MAPPINGS | NO_CONT_MAPPINGS

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
