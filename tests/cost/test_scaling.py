"""Scaling counts from two small runs: what it claims to be exact is exact."""

from __future__ import annotations

from collections import Counter

import pytest

from gmemlab.cost.analysis import GIB_PAGES, direct_map_after, extrapolate
from gmemlab.cost.strategies import make_design
from gmemlab.cost.workloads import COST_WORKLOADS
from gmemlab.expose.scenario import Scenario, ScenarioConfig

S = 512
# Events that happen once per page, per batch or per block: exact.
EXACT = ("user_fault", "spte_map", "zero_page", "pagecache_add", "dmap_clear", "dmap_set",
         "dmap_clear_2m", "flush_tlb_kernel_range", "alloc_block", "mermap_map", "user_copy_page")
# Once per 2 MiB region the frames cover: exact up to one at either end.
PER_REGION = ("dmap_split_2m", "pt_alloc", "tlb_flush", "ipi")


def measured(design: str, workload: str, pages: int) -> Counter[str]:
    sc = Scenario(make_design(design), ScenarioConfig(ram_gib=1.0, invariants="record"))
    w = COST_WORKLOADS[workload]
    w.run(sc, pages)
    sc.finish()
    return sc.counts(*w.measured)


@pytest.mark.parametrize(("design", "workload"), [
    ("v12", "boot"), ("batch", "restore"), ("falloc", "boot-prealloc"), ("zap2m", "boot"),
    ("zap2m", "teardown"), ("unmapped", "restore"), ("noflush", "boot"),
])
def test_two_runs_predict_the_fourth(design: str, workload: str) -> None:
    small, double, big = (measured(design, workload, k * S) for k in (1, 2, 4))
    predicted = extrapolate(small, double, S, 4 * S)
    for ev in EXACT:
        assert predicted.get(ev, 0) == pytest.approx(big.get(ev, 0)), ev
    for ev in PER_REGION:
        assert abs(predicted.get(ev, 0) - big.get(ev, 0)) <= 1, ev


def test_one_gib_splits_scale_per_gib() -> None:
    small = Counter({"dmap_split_1g": 1, "zero_page": 512})
    double = Counter({"dmap_split_1g": 1, "zero_page": 1024})
    assert extrapolate(small, double, 512, 3 * GIB_PAGES)["dmap_split_1g"] == 3
    assert extrapolate(Counter(), Counter(), 512, 3 * GIB_PAGES).get("dmap_split_1g", 0) == 0


def test_direct_map_after_moves_what_the_splits_move() -> None:
    before = (100, 10 << 20, 8 << 20)
    after = direct_map_after(before, {"dmap_split_2m": 3, "dmap_split_1g": 1})
    assert after is not None
    assert sum(after) == sum(before)
    assert list(after) == [100 + 3 * 2048, (10 << 20) - 3 * 2048 + (1 << 20), (8 << 20) - (1 << 20)]
    assert direct_map_after(None, {}) is None


def test_a_page_granular_linear_map_is_all_4k_and_never_splits() -> None:
    """arm64 before BBML2_NOABORT: force_pte_mapping() maps the same memory with pages."""
    before = (100, 10 << 20, 8 << 20)
    assert direct_map_after(before, {"dmap_split_2m": 3}, page_granular=True) == (sum(before), 0, 0)
