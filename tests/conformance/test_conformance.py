"""The conformance suite as tests: the model against the real kernel.

With the profile of the kernel on our machines, the model must give every case
the outcome that kernel gave (recorded, so this runs anywhere) and, where
/dev/kvm is present, the outcome it gives now.  NO_DIRECT_MAP variants run on
the model with v12 and must follow the flag's rule.
"""

from __future__ import annotations

import pytest

from gmemlab.conformance import CASES
from gmemlab.conformance.recorded import RECORDED_ON, expected
from gmemlab.conformance.runner import (
    RECORDED_KERNEL,
    _design_of,
    compare,
    model_factory,
    outcome_of,
)

model = model_factory(RECORDED_KERNEL.profile, RECORDED_KERNEL.design)


@pytest.mark.parametrize("name", [n for n in CASES if "NO_DIRECT_MAP" not in n])
def test_model_matches_recorded_kernel(name: str) -> None:
    c = CASES[name]
    assert outcome_of(c, model()) == expected(c), f"differs from {RECORDED_ON}"


def test_no_direct_map_variants_follow_the_flag() -> None:
    report = compare(None, names=[n for n in CASES if "NO_DIRECT_MAP" in n])
    assert len(report.flag_results) == len([n for n in CASES if "NO_DIRECT_MAP" in n])
    wrong = {r.case.name: (r.real, r.model) for r in report.flag_results if not r.match}
    assert not wrong
    assert any(r.case.direct_map_dependent and r.real != expected(CASES[r.case.name.replace(
        "|NO_DIRECT_MAP", "")]) for r in report.flag_results), "no case shows the flag's effect"


def test_model_matches_live_kernel() -> None:
    from gmemlab import twin

    ok, reason = twin.available()
    if not ok:
        pytest.skip(reason)
    report = compare(twin.TwinHost())
    assert report.live
    assert not [(r.case.name, r.real, r.model) for r in report.mismatches]


def test_the_running_kernel_is_held_to_its_own_code() -> None:
    """6.18 is the 6.18 design (preparedness tracked), Firecracker's 6.18 the port; kvm/next
    kernels are base and v12."""
    assert RECORDED_KERNEL.design == "6.18"
    assert _design_of("6.18.44-fc-v1300", False) == "6.18"
    assert _design_of("6.18.44-fc-v1300", True) == "fc-6.18"
    assert _design_of("7.1.0-rc2", True) == "v12" and _design_of("7.1.0", False) == "base"
