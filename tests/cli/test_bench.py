"""``gmemlab bench``'s bookkeeping: the same work at every size, costs as CPU time over pages,
the scale targets judged on what was measured.  No timing is judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gmemlab.bench.lifecycle import GIB, OPS, combine
from gmemlab.bench.report import flatness, render, targets
from gmemlab.cli import main


def _op(pages: int, cpu_s: float) -> dict[str, float]:
    return {"pages": pages, "cpu_s": cpu_s, "wall_s": cpu_s, "us_per_page": cpu_s / pages * 1e6}


def _run(kind: str, size: float, us: dict[str, float], **extra: Any) -> dict[str, Any]:
    pages = int(size) >> 12
    ops = {op: _op(pages, us.get(op, 0.1) * pages / 1e6) for op in OPS[kind]}
    return {"kind": kind, "size_bytes": int(size), "pages": pages, "per_page_path": False,
            "boot": {"cpu_s": 0.1, "wall_s": 0.1}, "ops": ops, "lifecycle_wall_s": 1.0,
            "lifecycle_cpu_s": 1.0, "check_all": [{"cpu_s": 0.0, "wall_s": 0.01}] * 2,
            "violations": 0, "splits": {"1G": 1, "2M": 2}, "peak_rss_mib": 100.0, **extra}


def test_combine_is_cpu_time_over_pages_not_a_median() -> None:
    touch = "guest first touch"
    runs = [_run("guest", GIB, {touch: us}, lifecycle_wall_s=w, peak_rss_mib=rss, violations=v)
            for us, w, rss, v in ((1.0, 2.0, 100.0, 0), (1.0, 5.0, 300.0, 1), (4.0, 1.0, 200.0, 0))]
    out = combine(runs)
    assert out["ops"][touch]["us_per_page"] == pytest.approx(2.0)  # the median would say 1.0
    assert out["ops"][touch]["pages"] == 3 * (GIB >> 12)
    assert out["ops"][touch]["samples_us_per_page"] == pytest.approx([1.0, 1.0, 4.0])
    assert (out["lifecycles"], out["lifecycle_wall_s"], out["peak_rss_mib"], out["violations"]) == (
        3, 5.0, 300.0, 1)
    # Rounds of several lifecycles each: the lifecycles add up, the samples are the rounds'.
    again = combine([out, combine(runs[:1])])
    assert again["lifecycles"] == 4
    assert again["ops"][touch]["samples_us_per_page"] == pytest.approx([2.0, 1.0])
    assert again["ops"][touch]["us_per_page"] == pytest.approx(7 / 4)


def test_a_failed_run_is_the_result() -> None:
    failed = {"kind": "guest", "size_bytes": GIB, "error": "exit status 1"}
    assert combine([_run("guest", GIB, {}), failed]) is failed


def test_flatness_and_targets_judge_what_was_measured() -> None:
    touch = "guest first touch"
    runs = [combine([_run("guest", s * GIB, {touch: us})])
            for s, us in ((1, 0.5), (4, 0.55), (64, 0.65), (0.25, 5.0))]  # below 1 GiB: not judged
    flat = flatness(runs)
    assert flat[("guest", touch)] == pytest.approx(1.3)
    result = {"config": {"rounds": 2, "work_gib": 64.0}, "real": {"measure": None, "reason": "no"},
              "runs": runs, "per_page": []}
    verdicts = {t.split(" ")[0]: ok for t, _, ok in targets(result)}
    assert verdicts["cost"] is False and verdicts["64"] is True and verdicts["first"] is None
    runs[2]["ops"][touch] = _op(runs[2]["pages"], 0.55 * runs[2]["pages"] / 1e6)
    assert {t.split(" ")[0]: ok for t, _, ok in targets(result)}["cost"] is True
    text = render(result)
    assert "2 round(s) of 64 GiB" in text and "0.50" in text


def test_a_child_runs_lifecycles_until_the_work_is_done() -> None:
    out = subprocess.run([sys.executable, "-m", "gmemlab.bench.lifecycle", "0.015625", "guest",
                          "--work-gib", "0.03"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["lifecycles"] == 2 and result["violations"] == 0
    pages = (16 << 20) >> 12
    assert result["ops"]["guest first touch"]["pages"] == 2 * pages
    assert result["ops"]["punch half"]["pages"] == pages
    assert len(result["ops"]["close + free"]["samples_us_per_page"]) == 2


@pytest.mark.parametrize(("argv", "says"), [(["--rounds", "0"], "--rounds: 0 is outside [1, 1,000]"),
                                            (["--work", "0"], "--work: 0 is outside (0, 1024]"),
                                            (["--sizes", "x"], "--sizes: 'x' is not a number")])
def test_bad_options_are_usage_errors(argv: list[str], says: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--no-real", *argv])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def _bench(commit: str, us: float, work: float = 64.0) -> dict[str, Any]:
    touch = "guest first touch"
    rounds = [_run("guest", GIB, {touch: us}), _run("guest", GIB, {touch: us + 0.2})]
    return {"schema": "gmemlab.bench/2", "machine": {"commit": commit},
            "config": {"sizes_gib": [1.0], "rounds": 2, "work_gib": work, "per_page_mib": 16},
            "real": {"available": False, "reason": "no", "measure": None},
            "runs": [combine(rounds)], "per_page": []}


def test_merged_benches_pool_their_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for i, (commit, us) in enumerate((("abc", 1.0), ("def", 2.0))):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(_bench(commit, us)))
    out = tmp_path / "merged.json"
    assert main(["bench", "--merge", *map(str, paths), "--json", str(out)]) == 0
    assert "pooled: 2 benches (commits abc, def)" in capsys.readouterr().out
    merged = json.loads(out.read_text())
    touch = merged["runs"][0]["ops"]["guest first touch"]
    assert touch["samples_us_per_page"] == pytest.approx([1.0, 1.2, 2.0, 2.2])
    assert touch["us_per_page"] == pytest.approx(1.6)
    assert merged["config"]["rounds"] == 4 and merged["runs"][0]["lifecycles"] == 4


def test_benches_of_other_sizes_or_work_are_not_pooled(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_bench("abc", 1.0)))
    b.write_text(json.dumps(_bench("abc", 1.0, work=16.0)))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--merge", str(a), str(b)])
    assert exit_.value.code == 2
    assert "cannot be pooled: the benches differ in work_gib" in capsys.readouterr().err
