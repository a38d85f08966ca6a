"""Fixed per-event costs for the exposure tests (no dependence on a measurement file)."""

from __future__ import annotations

import pytest

from gmemlab.cost.model import CostModel, CostParams

PARAMS = CostParams(user_fault=2.0, guest_fault=3.8, alloc_page=0.7, alloc_block=358.4, pagecache_add=0.7,
                    zero_page=0.4, pte_change=0.3, split=1.0, flush_local=0.1, ipi_base=14.0,
                    ipi_per_cpu=2.8, free_page=0.7, user_copy_page=0.4, mermap=0.7)


@pytest.fixture
def cost() -> CostModel:
    return CostModel(PARAMS, 2)
