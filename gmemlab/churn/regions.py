"""The churn a region at a time: DirectMap4k/2M/1G over a modelled day, in seconds.

What is kept exact, and why it can be: the direct map's counters change only
when a leaf is split (``DirectMap.split_1g`` / ``split_2m``; restoring or
clearing an entry changes none), so the figures depend only on which 2 MiB and
1 GiB regions ever get split, which depends on where the buddy allocator puts
each VM's frames and each page-table page.  So placement is modelled exactly,
a run of frames at a time, with the model's own allocator's rules
(``PageAllocator``: freed frames on one LIFO stack, handed out last-freed
first; then never-used RAM in ascending order, ZONE_NORMAL first; order-9
blocks only from never-used RAM, aligned), and the direct map is the model's
own :class:`DirectMap` state.  The design's effect on a region is the
:class:`RegionRule` learnt from its real model (:mod:`gmemlab.churn.rules`):

* ``pages`` / ``split``: a VM's frames come off the allocator in order; the
  first frame of a region not yet split splits it (the 1 GiB leaf above first),
  each split taking the next frame for its page table, as the model's fault
  does (allocate the folio, then zap it); the rest of the region's frames
  follow in one step.  Teardown frees the VM's frames in file-index order
  (truncation), onto the stack.
* ``blocks`` / ``clear2m``, frames kept by the design: a VM takes frames off the
  design's unmapped free list (LIFO); when it is empty an aligned 2 MiB block
  of never-used RAM is flipped (the 1 GiB leaf above split, taking a
  page-table page from the allocator; the 2 MiB leaf cleared) and its frames
  join the list, lowest first out.  Teardown puts the frames back on the list.
* ``none``: frames in and out of the allocator; the direct map untouched.

Abstracted away: the contents of memory, TLBs, the page cache, the order of
frames within a run beyond what placement needs, the reverse pageblock flip
(an unmapped block mapped back when the mapped lists run dry: the run fails
with ENOMEM instead, which :func:`simulate` reports), compaction and the
per-CPU lists (the model has neither).  ``tests/churn`` runs a small churn
both ways and requires the same DirectMap figures after every event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gmemlab.churn.rules import RegionRule
from gmemlab.churn.schedule import LOW_RAM_MIB, Schedule
from gmemlab.model.machine import MachineConfig, ram_ranges
from gmemlab.model.mm.direct_map import E_LEAF, PFN_PMD_SHIFT, PFN_PUD_SHIFT, DirectMap
from gmemlab.model.mm.page_alloc import _NORMAL_START, _RESERVED_END
from gmemlab.uapi import PAGES_PER_PMD

Run = tuple[int, int]  # (first, last): handed out from last towards first


class ChurnError(RuntimeError):
    """The modelled host ran out of what a step needs (the model would fail with ENOMEM)."""


class RunStack:
    """``PageAllocator``'s placement a run at a time: a LIFO stack of freed runs over never-used RAM."""

    __slots__ = ("cursor", "free", "ranges", "runs")

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        usable = [(max(lo, _RESERVED_END), hi) for lo, hi in ranges if hi > _RESERVED_END]
        usable.sort(key=lambda r: (r[0] < _NORMAL_START, r[0]))
        self.ranges = [[lo, hi] for lo, hi in usable if lo < hi]
        self.cursor = 0
        self.runs: list[Run] = []
        self.free = sum(hi - lo for lo, hi in self.ranges)

    def next_run(self) -> tuple[int, int, int]:
        """(first frame handed out next, step, frames that follow it consecutively), or ChurnError."""
        if self.runs:
            first, last = self.runs[-1]
            step = -1 if last > first else 1
            return last, step, abs(last - first) + 1
        while self.cursor < len(self.ranges):
            lo, hi = self.ranges[self.cursor]
            if lo < hi:
                return lo, 1, hi - lo
            self.cursor += 1
        raise ChurnError("out of memory: no free frame")

    def take(self, k: int) -> Run:
        """The next ``k`` frames, which :meth:`next_run` said are consecutive."""
        self.free -= k
        if self.runs:
            first, last = self.runs[-1]
            step = -1 if last > first else 1
            if abs(last - first) + 1 == k:
                self.runs.pop()
            else:
                self.runs[-1] = (first, last + step * k)
            return last, last + step * (k - 1)
        r = self.ranges[self.cursor]
        r[0] += k
        return r[0] - k, r[0] - 1

    def take_one(self) -> int:
        self.next_run()
        return self.take(1)[0]

    def take_block(self) -> int | None:
        """``PageAllocator.take_block(512)``: an aligned 2 MiB block of never-used RAM."""
        for i in range(self.cursor, len(self.ranges)):
            lo, hi = self.ranges[i]
            base = -(-lo // PAGES_PER_PMD) * PAGES_PER_PMD
            if base + PAGES_PER_PMD <= hi:
                if base == lo:  # nothing skipped: no empty range left behind to scan past
                    self.ranges[i][0] = base + PAGES_PER_PMD
                else:
                    self.ranges[i][1] = base
                    self.ranges.insert(i + 1, [base + PAGES_PER_PMD, hi])
                self.free -= PAGES_PER_PMD
                return base
        return None

    def give(self, runs: list[Run]) -> None:
        """Free ``runs`` frame by frame in order (the last frame freed is handed out first)."""
        for first, last in runs:
            # A run pushed frame by frame from first to last hands out last first: kept as is.
            self.runs.append((first, last))
            self.free += abs(last - first) + 1


@dataclass(slots=True)
class Sample:
    hours: float
    event: str
    direct_map_kb: tuple[int, int, int]  # DirectMap4k, 2M, 1G
    splits_2m: int
    splits_1g: int
    pt_pages: int
    guest_pages: int  # guest memory of the VMs alive


@dataclass(slots=True)
class ChurnResult:
    design: str
    how: str  # "regions" or "full model"
    rule: str
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class RegionSim:
    """The host's allocator, the design's unmapped list and the direct map, a region at a time."""

    def __init__(self, rule: RegionRule, high_gib: float) -> None:
        if rule.unsupported:
            raise ChurnError(rule.describe())
        self.rule = rule
        ram = ram_ranges(MachineConfig(ram_gib=high_gib, low_ram_mib=LOW_RAM_MIB))
        self.dmap = DirectMap(ram[-1][1], ram, "blocks")
        self.alloc = RunStack(ram)
        self.unmapped = RunStack([])  # the design's unmapped free list
        self.vms: dict[int, list[Run]] = {}
        self.guest_pages = 0
        self.pt_pages = 0
        effect = rule.touch if rule.no_direct_map else "none"
        self._alloc_vm = {"split": self._alloc_split, "clear2m": self._alloc_blocks,
                          "none": self._alloc_plain}[effect]

    def _split(self, pfn: int) -> None:
        """``__change_page_attr()`` on ``pfn``'s leaf: the 1 GiB leaf, then the 2 MiB, each split
        taking a page-table page from the allocator."""
        dm, r1, r2 = self.dmap, pfn >> PFN_PUD_SHIFT, pfn >> PFN_PMD_SHIFT
        if dm.pud[r1] == E_LEAF:
            self.alloc.take_one()
            self.pt_pages += 1
            dm.split_1g(r1)
        if dm.pmd[r2] == E_LEAF:
            self.alloc.take_one()
            self.pt_pages += 1
            dm.split_2m(r2)

    def _alloc_plain(self, n: int) -> list[Run]:
        out = []
        while n:
            _, _, avail = self.alloc.next_run()
            k = min(n, avail)
            out.append(self.alloc.take(k))
            n -= k
        return out

    def _alloc_split(self, n: int) -> list[Run]:
        out: list[Run] = []
        dm = self.dmap
        while n:
            pfn, step, avail = self.alloc.next_run()
            if dm.pud[pfn >> PFN_PUD_SHIFT] == E_LEAF or dm.pmd[pfn >> PFN_PMD_SHIFT] == E_LEAF:
                out.append(self.alloc.take(1))
                n -= 1
                self._split(pfn)
                continue
            # The rest of this region's frames in this run: the region is split already.
            offset = pfn & (PAGES_PER_PMD - 1)
            to_edge = PAGES_PER_PMD - offset if step > 0 else offset + 1
            k = min(n, avail, to_edge)
            out.append(self.alloc.take(k))
            n -= k
        return out

    def _alloc_blocks(self, n: int) -> list[Run]:
        out: list[Run] = []
        while n:
            if not self.unmapped.runs:
                base = self.alloc.take_block()
                if base is None:
                    raise ChurnError("ENOMEM: no never-used 2 MiB block to unmap (the model has no "
                                     "compaction)")
                r1 = base >> PFN_PUD_SHIFT
                if self.dmap.pud[r1] == E_LEAF:
                    self.alloc.take_one()
                    self.pt_pages += 1
                    self.dmap.split_1g(r1)
                self.dmap.set_pmd_leaf(base >> PFN_PMD_SHIFT, False)
                self.unmapped.give([(base + PAGES_PER_PMD - 1, base)])
            _, _, avail = self.unmapped.next_run()
            k = min(n, avail)
            out.append(self.unmapped.take(k))
            n -= k
        return out

    def create(self, vm: int, pages: int) -> None:
        self.vms[vm] = self._alloc_vm(pages)
        self.guest_pages += pages

    def destroy(self, vm: int) -> None:
        runs = self.vms.pop(vm)
        self.guest_pages -= sum(abs(last - first) + 1 for first, last in runs)
        keep = self.rule.no_direct_map and self.rule.free == "design"
        (self.unmapped if keep else self.alloc).give(runs)

    def sample(self, hours: float, event: str) -> Sample:
        c = self.dmap.meminfo()
        return Sample(hours, event, (c.direct_map_4k, c.direct_map_2m, c.direct_map_1g),
                      self.dmap.splits_2m, self.dmap.splits_1g, self.pt_pages, self.guest_pages)


def simulate(rule: RegionRule, schedule: Schedule,
             progress: Callable[[int, int], None] | None = None) -> ChurnResult:
    """Run ``schedule`` on the region-level model of ``rule``'s design."""
    t0 = time.perf_counter()
    res = ChurnResult(rule.design, "regions", rule.describe())
    sim = RegionSim(rule, schedule.config.ram_gib_high)
    res.samples.append(sim.sample(0.0, "boot"))
    for i, e in enumerate(schedule.events):
        try:
            if e.kind == "create":
                sim.create(e.vm, e.pages)
            else:
                sim.destroy(e.vm)
        except ChurnError as err:
            res.error = f"at {e.hours:.2f} h, {e.kind} VM {e.vm}: {err}"
            break
        res.samples.append(sim.sample(e.hours, f"{e.kind} {e.vm}"))
        if progress and i % 50 == 0:
            progress(i, len(schedule.events))
    res.seconds = time.perf_counter() - t0
    return res
