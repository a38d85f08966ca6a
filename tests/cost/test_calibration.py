"""The calibration's arithmetic: what it fits reproduces the measurement, the rest follows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmemlab.cost.calibrate import (
    PRIORS,
    REF_GUEST_FAULT_US,
    CalibrationError,
    Composition,
    Measurement,
    Primitives,
    calibrate,
    compositions,
    load_measurement,
    load_primitives,
)
from gmemlab.cost.model import CostModel, CostParams

US = 1000.0  # ns per µs in the measurement JSON


def measurement_json(*, gmem: float = 3.0, memfd: float = 3.1, secret: float = 15.0, guest: float = 4.0,
                     gmem_free: float = 0.5, secret_free: float = 1.1, cpus: int = 2) -> dict[str, object]:
    def st(v: float) -> dict[str, object]:
        return {"median": v * US, "min": v * US * 0.9, "max": v * US * 1.2, "samples": []}

    return {
        "schema": "gmemlab.measure/1",
        "machine": {"kernel": "test", "cpus": cpus},
        "fault_ns_per_page": {"anon": st(1.5), "memfd": st(memfd), "guest_memfd": st(gmem),
                              "memfd_secret": st(secret)},
        "free_ns_per_page": {"anon": st(0.2), "memfd": st(0.6), "guest_memfd": st(gmem_free),
                             "memfd_secret": st(secret_free)},
        "guest": {"first_touch_ns_per_page": st(guest)},
        "ipis_per_page": {"memfd_secret": 0.98},
        "direct_map_kB": {"before": {"4k": 4096, "2M": 2 << 20, "1G": 8 << 20}},
    }


# A composition written by hand: one of each event per page, as the model's paths are.
HAND: Composition = {
    "guest fault": {"alloc_page": 1, "pagecache_add": 1, "zero_page": 1, "spte_map": 1},
    "guest_memfd fault": {"user_fault": 1, "alloc_page": 1, "pagecache_add": 1, "zero_page": 1},
    "memfd fault": {"user_fault": 1, "alloc_page": 1, "pagecache_add": 1, "zero_page": 1},
    "memfd_secret fault": {"user_fault": 1, "alloc_page": 1, "pagecache_add": 1, "zero_page": 1,
                           "dmap_clear": 1, "tlb_flush": 1},
    "guest_memfd free": {"free_page": 1},
    "memfd_secret free": {"free_page": 1, "dmap_set": 1, "zero_page": 1},
}


def test_fit_by_hand() -> None:
    meas = Measurement.from_json(measurement_json(), "test")
    cal = calibrate(meas, HAND)
    p = cal.params
    scale = 4.0 / REF_GUEST_FAULT_US
    assert p.zero_page == pytest.approx(0.25 * scale)
    assert p.alloc_page == pytest.approx(0.45 * scale) == pytest.approx(p.pagecache_add)
    assert p.alloc_block == pytest.approx(512 * p.alloc_page)
    assert p.guest_fault == pytest.approx(4.0 - 1.15 * scale)
    assert p.user_fault == pytest.approx(3.0 - 1.15 * scale)
    assert p.free_page == pytest.approx(0.5)
    # The IPI round trip at 2 CPUs is what the removal adds beyond the PTE change and the local flush.
    round_trip = 15.0 - 3.1 - PRIORS.pte_change - PRIORS.flush_local  # against memfd
    assert p.ipi_round(2) == pytest.approx(round_trip)
    assert p.ipi_per_cpu / p.ipi_base == pytest.approx(0.2)
    assert p.ipi_round(1) == 0.0
    assert p.ipi_round(8) == pytest.approx(p.ipi_base + 7 * p.ipi_per_cpu)
    # Fitted quantities come back exactly; the memfd_secret free is a prediction from priors.
    for name in ("guest_memfd fault", "guest first touch (kvm_gmem_get_pfn)", "guest_memfd free",
                 "memfd_secret - memfd fault"):
        assert cal.check(name).error == pytest.approx(0.0, abs=1e-12), name
    # memfd_secret = a guest_memfd-like fault + what removal adds to memfd's: off by gmem - memfd.
    secret = cal.check("memfd_secret fault")
    assert secret.predicted == pytest.approx(3.0 + (15.0 - 3.1))
    assert secret.error == pytest.approx((14.9 - 15.0) / 15.0)
    free = cal.check("memfd_secret free")
    assert free.predicted == pytest.approx(0.5 + PRIORS.pte_change + 0.25 * scale)
    assert free.error == pytest.approx((free.predicted - 1.1) / 1.1)
    assert cal.check("memfd fault").predicted == pytest.approx(3.0)


def primitives_json(split_extra_ns: float | None = 30_000.0) -> dict[str, object]:
    split: dict[str, object] = {"unavailable": "no split"} if split_extra_ns is None else {
        "extra_ns": split_extra_ns}
    return {"schema": "gmemlab.primitives/1", "machine": {"kernel": "test", "cpus": 2},
            "split_2m": split, "mprotect": {"pte_change_ns": 150.0, "flush_local_ns": 900.0},
            "copy_page_ns": {"median": 1000.0}}


def test_measured_primitives_replace_their_priors_and_say_so() -> None:
    meas = Measurement.from_json(measurement_json(), "test")
    priors = calibrate(meas, HAND)
    assert {priors.kind(k) for k in PRIORS.as_dict()} == {"fitted", "prior"}
    assert priors.kind("pte_change") == priors.kind("split") == "prior"
    cal = calibrate(meas, HAND, Primitives.from_json(primitives_json(), "prims"))
    p = cal.params
    assert (p.pte_change, p.flush_local, p.user_copy_page) == pytest.approx((0.15, 0.9, 1.0))
    assert p.mermap == pytest.approx(2 * 0.15 + 0.9)
    # The split fault's own flush_tlb_all() is counted apart by the model: taken out.
    assert p.split == pytest.approx(30.0 - 0.9 - p.ipi_round(2))
    for k in ("pte_change", "flush_local", "user_copy_page", "mermap", "split"):
        assert cal.kind(k) == "measured", k
        assert "prims" in cal.sources[k] or k == "mermap", k  # mermap: from the measured figures
    assert cal.kind("alloc_block") == "prior" and cal.kind("ipi") == "fitted"
    shares = cal.priced_by({"split": 1.0, "ipi": 2.0, "alloc_block": 1.0})
    assert shares == pytest.approx({"measured": 0.25, "fitted": 0.5, "prior": 0.25})
    # No fault split while measuring: the split stays a prior, and the notes say why.
    none = calibrate(meas, HAND, Primitives.from_json(primitives_json(None), "prims"))
    assert none.kind("split") == "prior" and none.params.split == PRIORS.split
    assert any("split" in n for n in none.notes)


def test_committed_primitives_load_with_provenance() -> None:
    prims = load_primitives()
    assert prims.provenance.get("command") == "gmemlab measure --primitives"
    assert prims.pte_change and prims.flush_local and prims.copy_page > 0


@pytest.mark.parametrize("doc", [{"schema": "gmemlab.measure/1"},
                                 {**primitives_json(), "mprotect": {"pte_change_ns": -1.0}},
                                 {**primitives_json(), "machine": {"kernel": "k"}}])
def test_bad_primitives_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(CalibrationError):
        Primitives.from_json(doc, "bad")


def test_ipi_fit_follows_the_cpu_count() -> None:
    cal2 = calibrate(Measurement.from_json(measurement_json(cpus=2), "t"), HAND)
    cal8 = calibrate(Measurement.from_json(measurement_json(cpus=8), "t"), HAND)
    # The same measured extra, spread over the shape at 8 CPUs: a smaller base.
    assert cal8.params.ipi_round(8) == pytest.approx(cal2.params.ipi_round(2))
    assert cal8.params.ipi_base < cal2.params.ipi_base


def test_negative_residuals_are_clamped_and_said() -> None:
    cal = calibrate(Measurement.from_json(measurement_json(gmem=0.5), "t"), HAND)
    assert cal.params.user_fault == 0.0
    assert any("user_fault" in n for n in cal.notes)


def test_the_model_composition_of_the_measured_runs() -> None:
    comp = compositions(2, pages=64)
    assert comp["memfd_secret fault"]["tlb_flush"] == pytest.approx(1.0)
    assert comp["memfd_secret fault"]["dmap_clear"] == pytest.approx(1.0)
    assert comp["guest_memfd fault"].get("tlb_flush", 0) == 0
    assert comp["guest fault"]["spte_map"] == pytest.approx(1.0)
    assert comp["memfd_secret free"]["dmap_set"] == pytest.approx(1.0)
    assert comp["memfd_secret free"]["zero_page"] == pytest.approx(1.0)


def test_cost_model_prices_counts_linearly() -> None:
    p = CostParams(**{k: 1.0 for k in PRIORS.as_dict()})
    m = CostModel(p, 4)
    counts = {"user_fault": 3, "tlb_flush": 2, "kernel_write": 99}
    # A flush: the local part plus a round trip waiting for 3 other CPUs.
    assert m.time_us(counts) == pytest.approx(3 + 2 * (1 + 1 + 3))
    assert m.ipis(counts) == 6
    assert sum(m.breakdown(counts).values()) == pytest.approx(m.time_us(counts))
    assert CostModel(p, 4, broadcast=True).time_us(counts) == pytest.approx(3 + 2)
    assert p.with_ipi_model("prior").ipi_round(2) == pytest.approx(1.2)


def test_committed_calibrations_load_and_fit() -> None:
    cal = calibrate(load_measurement())
    meas = cal.measurement
    assert meas.cpus == 2 and meas.provenance.get("command", "").startswith("gmemlab measure")
    secret = cal.check("memfd_secret fault")
    assert secret.predicted == pytest.approx(meas.gmem_fault + meas.secretmem_fault - meas.memfd_fault)
    assert cal.check("memfd_secret IPIs").predicted == pytest.approx(1.0)
    ref = calibrate(load_measurement(Path(__file__).parents[2] / "gmemlab/cost/data/"
                                     "calibration-realkernel-md.json"))
    # realkernel.md §4.5: 12.7 µs of removal and flush per page (secretmem - memfd), 2 CPUs.
    assert ref.params.ipi_round(2) == pytest.approx(14.975 - 2.290 - 0.3 - 0.1)


def test_bad_measurements_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(CalibrationError):
        load_measurement(bad)
    partial = measurement_json()
    del partial["guest"]
    bad.write_text(json.dumps(partial))
    with pytest.raises(CalibrationError, match="missing"):
        load_measurement(bad)
