"""Seeded random call sequences over the whole API, on every design and profile, held to a
data-integrity oracle and swept with ``check_all()`` after each (``driver.py``).

Short by default (one sequence per design and profile); ``--reliability-long`` or
``GMEMLAB_RELIABILITY_LONG=1`` runs many long ones.  A failure names its seed and a
shortened sequence that reproduces it.
"""

from __future__ import annotations

import os

import pytest

from gmemlab.model.designs import DESIGNS
from gmemlab.model.kvm.arch import PROFILES
from tests.reliability.driver import Op, World, outcome, play, run_sequence, shrink


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--reliability-long")
                or os.environ.get("GMEMLAB_RELIABILITY_LONG"))


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("design", list(DESIGNS))
def test_random_sequences(design: str, profile: str, long_run: bool) -> None:
    sequences, steps = (12, 400) if long_run else (1, 100)
    for seed in range(sequences):
        w = run_sequence(seed, design, profile, steps)
        assert len(w.ops) == steps or (w.crashed and design == "v7")  # v7 oopses reusing a frame


@pytest.mark.parametrize("profile", ["x86_64", "arm64"])
@pytest.mark.parametrize("design", list(DESIGNS))
def test_batched_and_per_page_paths_agree(design: str, profile: str, long_run: bool) -> None:
    """The same sequence with the batched range paths and with the per-page generator
    paths: the same answers (both held to the oracle), the same events, the same frames."""
    for seed in range(6 if long_run else 1):
        batched = run_sequence(seed, design, profile, 100)
        per_page = run_sequence(seed, design, profile, 100, range_paths=False)
        assert batched.ops == per_page.ops
        assert outcome(batched) == outcome(per_page), f"seed {seed}: {batched.ops}"


def test_a_broken_model_is_caught_with_seed_and_short_sequence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the model (a punch-hole that frees nothing): the driver fails, names the seed,
    and shortens the sequence to the few calls that show it."""
    from gmemlab.model.kvm import guest_memfd
    from gmemlab.model.task import KGen
    from tests.reliability.driver import SequenceFailure

    def punch_nothing(m: object, inode: object, offset: int, length: int) -> KGen[int]:
        yield ("file", 0)
        return 0

    monkeypatch.setattr(guest_memfd, "kvm_gmem_punch_hole", punch_nothing)
    with pytest.raises(SequenceFailure) as e:
        for seed in range(60):
            run_sequence(seed, "v12", "x86_64", 80)
    text = str(e.value)
    assert f"seed {e.value.seed}, design v12" in text
    # The hole is punched by fallocate or by madvise(MADV_REMOVE), which goes through it.
    assert any((op.name == "fallocate" and op.args[3]) or (op.name == "madvise" and op.args[3] == 1)
               for op in e.value.shortened)
    assert len(e.value.shortened) <= 12, text


def test_shrink_finds_a_minimal_subsequence() -> None:
    ops = [Op("x", (i,)) for i in range(40)]
    assert shrink(ops, lambda o: Op("x", (7,)) in o and Op("x", (31,)) in o) == [ops[7], ops[31]]


def test_replay_skips_calls_on_objects_it_never_made() -> None:
    """A shortened sequence may drop a creation: calls on that object then do nothing."""
    w = play([Op("vmm_fill", (3, 0, 1, 9)), Op("guest_read", (2, 0, 0, 0)), Op("close_gmem", (5,))],
             "v12", "x86_64")
    assert isinstance(w, World) and not w.maps
