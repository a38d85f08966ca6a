"""What a design does to the direct map, per 2 MiB region, learnt by running its real model.

:func:`learn_rule` boots a small model machine with the design, creates a VM
whose guest_memfd (NO_DIRECT_MAP where the design offers it) spans two 2 MiB
regions, lets the guest touch all of it, tears it down, and reads what the
design's own code did:

* ``source``: where the guest's frames came from: the page allocator, frame by
  frame (``alloc_page`` only), or whole 2 MiB blocks (``alloc_block``: an order-9
  allocation, as ALLOC_UNMAPPED's pageblock flip and 2 MiB fault-around take);
* ``touch``: what the first touch left in each region holding guest frames:
  ``split`` (its 2 MiB leaf split to 4 KiB PTEs, some of them cleared: v12,
  filemap), ``clear2m`` (the 2 MiB leaf cleared whole: a pageblock flip) or
  ``none`` (mainline);
* ``free``: where the frames went at teardown: back to the ``allocator`` (the
  LIFO stack of freed frames), or kept by the ``design`` (an unmapped free list);
* how many page-table pages a split took (one per level, from the page
  allocator, as ``split_large_page()`` takes them);
* whether teardown split anything (a 2 MiB-cleared block restored 4 KiB at a
  time splits: ``zap2m``).

The region-level simulation (:mod:`gmemlab.churn.regions`) applies the rule.
A design whose probe shows something the rule cannot state (teardown splits,
a split taking other than one page-table page per level, frames neither
freed nor kept) is refused there, naming what it saw; ``gmemlab churn --full``
runs such a design on the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gmemlab.expose.scenario import Scenario, ScenarioConfig
from gmemlab.model.designs import Design, get_design
from gmemlab.model.mm.direct_map import E_LEAF_NP, PFN_PMD_SHIFT
from gmemlab.uapi import PAGE_SIZE, PAGES_PER_PMD

PROBE_PAGES = 2 * PAGES_PER_PMD

Source = Literal["pages", "blocks"]
Touch = Literal["none", "split", "clear2m"]
Free = Literal["allocator", "design"]
# What gmemlab.churn.regions knows how to run: per-frame designs that split (or leave the direct
# map alone) and free to the allocator; pageblock designs that clear whole 2 MiB leaves and keep
# their frames.
STATED: frozenset[tuple[str, str, str]] = frozenset({
    ("pages", "split", "allocator"), ("pages", "none", "allocator"), ("blocks", "clear2m", "design")})


@dataclass(frozen=True, slots=True)
class RegionRule:
    design: str
    no_direct_map: bool  # the design offers the flag, so the guest_memfd has it
    source: Source
    touch: Touch
    free: Free
    unsupported: str | None = None  # why the region-level simulation cannot run this design

    def describe(self) -> str:
        if self.unsupported:
            return f"{self.design}: not at region level: {self.unsupported}"
        src = "page allocator, frame by frame" if self.source == "pages" else "2 MiB blocks"
        touch = {"none": "direct map untouched", "split": "2 MiB leaf split to 4 KiB on first touch",
                 "clear2m": "2 MiB leaf cleared whole (no 4 KiB split)"}[self.touch]
        free = ("freed frames back to the page allocator" if self.free == "allocator"
                else "freed frames kept unmapped by the design")
        return f"{self.design}: {src}; {touch}; {free}"


def learn_rule(design: str | Design) -> RegionRule:
    """Probe ``design`` on the model (see the module docstring); a few hundred ms."""
    d = get_design(design)
    sc = Scenario(d, ScenarioConfig(ram_gib=2.0, invariants="off"))
    m = sc.m
    before = (m.dmap.splits_1g, m.dmap.splits_2m, m.trace.counts["pt_alloc"])
    g = sc.new_guest(PROBE_PAGES)
    sc.guest_fill(g, 0x5A)
    frames = [g.gmem.pfn(i * PAGE_SIZE) for i in range(PROBE_PAGES)]
    regions = {pfn >> PFN_PMD_SHIFT for pfn in frames}
    splits = m.dmap.splits_1g - before[0] + m.dmap.splits_2m - before[1]
    pt_pages = m.trace.counts["pt_alloc"] - before[2]
    split = sum(1 for r in regions if r in m.dmap.pte)
    cleared = sum(1 for r in regions if m.dmap.pmd[r] == E_LEAF_NP)
    touch: Touch = "split" if split == len(regions) else "clear2m" if cleared == len(regions) else "none"
    source: Source = "blocks" if m.trace.counts["alloc_block"] else "pages"
    odd: list[str] = []
    if (split and cleared) or (touch == "none" and (split or cleared)):
        odd.append(f"the first touch left {split} of {len(regions)} regions split and {cleared} cleared")
    if pt_pages != splits:
        odd.append(f"{splits} splits took {pt_pages} page-table pages")
    at_close = m.dmap.splits_2m
    sc.close_guest(g)
    if m.dmap.splits_2m != at_close:
        odd.append(f"teardown split {m.dmap.splits_2m - at_close} regions (restored 4 KiB at a time)")
    kept = sum(1 for pfn in frames if d.holds_unmapped(m, pfn))
    freed = sum(1 for pfn in frames if not m.mem.allocated(pfn))
    free: Free = "design" if kept == len(frames) else "allocator"
    if freed != len(frames) or kept not in (0, len(frames)):
        odd.append(f"teardown freed {freed} and the design kept {kept} of {len(frames)} frames")
    if source == "blocks" and free == "allocator":
        odd.append("blocks taken whole but freed frame by frame to the page allocator")
    elif (source, touch, free) not in STATED and not odd:
        odd.append(f"frames from {source}, first touch {touch}, freed to the {free}: a combination "
                   "the region level does not state")
    return RegionRule(d.name, sc.no_direct_map, source, touch, free, "; ".join(odd) or None)
