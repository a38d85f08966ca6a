"""``gmemlab cost`` and ``gmemlab expose`` as a user runs them, at small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmemlab.cli import main


def test_cost_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--strategies", "v12,zap2m", "--workloads", "boot,restore", "--gib", "0.25",
                 "--plot-dir", str(tmp_path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["workload"], r["strategy"]): r for r in out["rows"]}
    assert set(rows) == {(w, s) for w in ("boot", "restore") for s in ("base", "v12", "zap2m")}
    assert rows["boot", "base"]["slowdown"] == pytest.approx(1.0)
    assert rows["boot", "v12"]["slowdown"] > rows["boot", "zap2m"]["slowdown"] > 1.0
    assert rows["boot", "v12"]["flushes"] >= 65536
    assert rows["boot", "v12"]["exposure"]["peak_share"] == 0.0
    assert rows["boot", "base"]["exposure"]["peak_share"] == 1.0
    sources = out["calibration"]["param_sources"]
    assert sources["split"]["kind"] == "measured" and sources["alloc_block"]["kind"] == "prior"
    assert sum(rows["boot", "v12"]["priced_by"].values()) == pytest.approx(1.0)
    checks = {c["name"]: c for c in out["calibration"]["checks"]}
    assert abs(checks["memfd_secret fault"]["error"]) < 0.2
    assert len(rows["boot", "v12"]["slowdown_by_cpus"]["scaled"]) == len(out["config"]["sweep"])
    assert {Path(p).name for p in out["plots"]} == {
        "cost-slowdown-vs-cpus.png", "cost-fragmentation.png", "cost-exposure-vs-cost.png"}
    assert all(Path(p).stat().st_size > 1000 for p in out["plots"])


def test_cost_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--strategies", "v12", "--workloads", "teardown", "--gib", "0.01",
                 "--no-plot", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "memfd_secret per-page fault: model" in out
    assert "teardown" in out and "v12" in out
    # Every per-event figure says where it comes from; each row how much of its time priors price.
    figures = out[out.index("Per-event costs"):out.index("IPI round trip")]
    assert "pte_change" in figures and figures.count("measured") >= 5 and " prior " in figures
    assert "m/f/p %" in out


@pytest.mark.parametrize("bad", [["--model-pages", "100"], ["--strategies", "nope"],
                                 ["--workloads", "nope"], ["--gib", "0.001"],
                                 ["--save-measurement", "x.json"]])
def test_cost_usage_errors(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["cost", "--quiet", "--no-plot", *bad])
    assert e.value.code == 2


def test_expose_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["expose", "--designs", "base,v12,filemap", "--workloads", "guest-boot", "--pages", "8",
                 "--init-on-free", "off", "--plot-dir", str(tmp_path), "--json", "--quiet",
                 "--timeline"]) == 0
    out = json.loads(capsys.readouterr().out)
    res = {r["design"]: r for r in out["results"]}
    assert res["base"]["peak_bytes"] == 8 * 4096 and not res["base"]["no_direct_map"]
    assert res["filemap"]["peak_bytes"] == 4096 and res["filemap"]["no_direct_map"]
    assert res["v12"]["timeline"][0] == [0, 0.0, 0, 0, 0]
    assert [Path(p).name for p in out["plots"]] == ["expose-guest-boot.png"]


def test_expose_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["expose", "--designs", "v12", "--workloads", "secretmem", "--pages", "4", "--no-plot",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "secretmem: peak reachable kB per phase" in out
    assert "5 measured, 5 fitted, 4 prior per-event figures" in out  # the committed primitives


def test_expose_usage_errors() -> None:
    with pytest.raises(SystemExit):
        main(["expose", "--designs", "nope", "--quiet"])
    with pytest.raises(SystemExit):
        main(["expose", "--cpus", "1", "--quiet"])
