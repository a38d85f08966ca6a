"""Each strategy changes the counts it claims to change, and keeps the invariants it means to.

Workloads run on fresh hosts with 1024 pages of guest memory (two 2 MiB blocks).
"""

from __future__ import annotations

from collections import Counter

import pytest

from gmemlab.cost.strategies import UnknownStrategy, make_design
from gmemlab.cost.workloads import COST_WORKLOADS
from gmemlab.expose.scenario import Scenario, ScenarioConfig
from gmemlab.model.designs.batched import BatchedFlush
from gmemlab.model.designs.falloc import FallocRange

PAGES = 1024
BLOCKS = PAGES // 512
CPA = ("dmap_clear", "dmap_set", "dmap_clear_2m", "dmap_set_2m", "dmap_split_2m", "dmap_split_1g")


def run(design: str, workload: str, *, pages: int = PAGES, invariants: str = "stop",
        ncpus: int = 2) -> Scenario:
    sc = Scenario(make_design(design), ScenarioConfig(ram_gib=1.0, invariants=invariants,  # type: ignore[arg-type]
                                                      ncpus=ncpus))
    COST_WORKLOADS[workload].run(sc, pages)
    sc.finish()
    return sc


def ranged_flushes(c: Counter[str]) -> int:
    return c["flush_tlb_kernel_range"]


def test_v12_flushes_once_per_fault() -> None:
    c = run("v12", "boot").counts("first touch")
    assert ranged_flushes(c) == c["dmap_clear"] == PAGES
    assert c["ipi"] == c["tlb_flush"]  # 2 CPUs: one IPI per flush


def test_noflush_never_flushes_a_zap() -> None:
    c = run("noflush", "boot", invariants="record").counts("first touch")
    assert c["dmap_clear"] == PAGES and ranged_flushes(c) == 0
    assert c["tlb_flush"] == c["flush_tlb_all"] == c["dmap_split_2m"] + c["dmap_split_1g"]


@pytest.mark.parametrize("n", [32, 100, 512])
def test_batched_flush_flushes_once_per_n_zaps(n: int) -> None:
    sc = run(f"batch:{n}", "boot", invariants="record")
    c = sc.counts("first touch")
    assert c["dmap_clear"] == PAGES
    # Full batches, plus the rest at the return to user space.
    assert ranged_flushes(c) == PAGES // n + (1 if PAGES % n else 0)
    assert c["batch_flush"] == ranged_flushes(c)
    # Folios reach the guest before their flush: the one invariant it breaks, by design.
    assert {k for k, v in sc.m.inv.verdicts().items() if v} == {"handout-flushed"}


def test_the_batch_boundary_flushes_what_is_pending() -> None:
    sc = Scenario(BatchedFlush(1000), ScenarioConfig(invariants="record"))
    g = sc.new_guest(10)
    sc.guest_fill(g, 1)  # ten zaps, then the boundary after KVM_RUN
    assert sc.m.trace.counts["flush_tlb_kernel_range"] == 1
    design = sc.m.design
    assert isinstance(design, BatchedFlush) and design.pending == []


def test_zap_at_fallocate_moves_every_zap_and_flush_to_fallocate() -> None:
    sc = run("falloc", "boot-prealloc")
    falloc, touch = sc.counts("fallocate"), sc.counts("first touch")
    assert falloc["dmap_clear"] == falloc["zero_page"] == PAGES
    assert ranged_flushes(falloc) == PAGES // FallocRange().chunk == BLOCKS
    assert touch["dmap_clear"] == touch["zero_page"] == ranged_flushes(touch) == 0
    # Without fallocate it is v12.
    assert run("falloc", "boot").counts("first touch") == run("v12", "boot").counts("first touch")


def test_zap2m_zaps_each_block_with_one_entry_and_one_flush() -> None:
    sc = run("zap2m", "teardown")
    boot, teardown = sc.counts("first touch"), sc.counts("teardown")
    assert boot["dmap_clear_2m"] == ranged_flushes(boot) == boot["alloc_block"] == BLOCKS
    assert boot["dmap_clear"] == boot["dmap_split_2m"] == 0
    v12 = run("v12", "boot").counts("first touch")
    assert boot["tlb_flush"] < v12["tlb_flush"] / 100
    # Freeing one folio of a zapped block restores one 4K entry: the restore splits the block.
    assert teardown["dmap_split_2m"] == BLOCKS
    assert teardown["dmap_set"] == PAGES


def test_unmapped_pageblocks_change_no_direct_map_entry_in_steady_state() -> None:
    sc = Scenario(make_design("unmapped"), ScenarioConfig(ram_gib=1.0, invariants="stop"))
    first = sc.new_guest(PAGES)
    sc.phase("first VM")
    sc.guest_fill(first, 1)
    sc.close_guest(first)
    second = sc.new_guest(PAGES)
    sc.phase("second VM")
    sc.guest_fill(second, 2)
    sc.close_guest(second)
    sc.finish()
    warm, steady = sc.counts("first VM"), sc.counts("second VM")
    # One pageblock flip (a 2M PMD cleared, one ranged flush) per 512 pages.
    assert warm["dmap_clear_2m"] == warm["pageblock_unmapped"] == warm["flush_tlb_kernel_range"] == BLOCKS
    assert all(steady[k] == 0 for k in CPA)
    assert steady["tlb_flush"] == steady["pageblock_unmapped"] == 0
    # The second VM's folios come off the unmapped free list, zeroed through the mermap.
    assert steady["mermap_map"] == steady["free_page"] == steady["alloc_page"] == PAGES


@pytest.mark.parametrize("design", ["v12", "falloc", "zap2m", "unmapped"])
@pytest.mark.parametrize("workload", ["boot-prealloc", "restore", "teardown"])
def test_safe_strategies_keep_every_invariant(design: str, workload: str) -> None:
    sc = run(design, workload, pages=512)  # invariants="stop": the first violation would raise
    assert not any(sc.m.inv.verdicts().values())


def test_flushes_do_not_depend_on_the_cpu_count() -> None:
    two = run("v12", "boot", pages=512, ncpus=2).counts("first touch")
    four = run("v12", "boot", pages=512, ncpus=4).counts("first touch")
    assert two["tlb_flush"] == four["tlb_flush"]
    assert four["ipi"] == 3 * four["tlb_flush"] and two["ipi"] == two["tlb_flush"]


def test_strategy_names() -> None:
    assert isinstance(make_design("batch:7"), BatchedFlush)
    assert make_design("batch:7").batch == 7  # type: ignore[attr-defined]
    for bad in ("nope", "v12:3", "batch:x", "batch:0"):
        with pytest.raises(UnknownStrategy):
            make_design(bad)
