"""``gmemlab measure --primitives`` on the running kernel, and the parts it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmemlab import twin
from gmemlab.cost.calibrate import Primitives
from gmemlab.twin.primitives import format_primitives, measure_primitives, read_splits


def test_read_splits_sums_both_levels(tmp_path: Path) -> None:
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 10\ndirect_map_level2_splits 7\ndirect_map_level3_splits 2\n")
    assert read_splits(str(vmstat)) == 9
    vmstat.write_text("nr_free_pages 10\n")
    assert read_splits(str(vmstat)) == -1


def test_primitives_measure_and_calibrate(host: twin.TwinHost) -> None:
    try:
        host.memfd_secret().close()
    except OSError as e:
        pytest.skip(f"memfd_secret: {e}")
    r = measure_primitives(host, split_pages=64, reps=3, iterations=200)
    prims = Primitives.from_json(r, "live")
    assert prims.copy_page > 0
    # A loaded host may drown the PTE change in noise: then it says so instead of a figure.
    assert (prims.pte_change is None) == ("unavailable" in r["mprotect"])
    split = r["split_2m"]
    assert split["faults"] == 3 * 64 and ("extra_ns" in split) == bool(split["splits"])
    assert "PTE change" in format_primitives(r)
