"""Every bad command line: exit status 2 and one error line, before any work starts.

Run in-process through ``gmemlab.cli.main``.  "Before any work" is checked by
patching what each command would start with (the lifecycle, the checker, the
bench, the measurement, the analyses, the conformance run) to fail the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gmemlab.cli import main

# Work each command starts once its arguments are accepted.
WORK = [
    "gmemlab.commands.run.run_lifecycle",
    "gmemlab.check.suite.check_one",
    "gmemlab.bench.run.run_bench",
    "gmemlab.bench.run.merge",
    "gmemlab.twin.measure.run_measurement",
    "gmemlab.cost.analysis.analyse",
    "gmemlab.expose.analysis.run_all",
    "gmemlab.commands.conformance.compare",
]

HUGE = str(2**70)

# (command line, what the error line says); {d} is a scratch directory holding the files below.
BAD: list[tuple[str, list[str], str]] = [
    ("run: profile without guest_memfd", ["run", "--profile", "riscv64"], "invalid choice: 'riscv64'"),
    ("run: trace into a missing directory", ["run", "--trace", "{d}/no/t.jsonl"], "does not exist"),
    ("run: trace onto a directory", ["run", "--trace", "{d}"], "is a directory"),
    ("run: plot into a missing directory", ["run", "--plot", "{d}/no/x.png"], "does not exist"),
    ("run: plot onto a directory", ["run", "--plot", "{d}"], "is a directory"),
    ("run: 2^70 CPUs", ["run", "--cpus", HUGE], "ncpus must be within"),
    ("run: infinite RAM", ["run", "--ram-gib", "inf"], "inf is outside [0, 4096]"),
    ("check: empty design list", ["check", "--design", ""], "--design: an empty list"),
    ("check: empty scenario list", ["check", "--scenario", ","], "--scenario: an empty list"),
    ("check: empty ignore list", ["check", "--ignore", ""], "--ignore: an empty list"),
    ("check: unknown design", ["check", "--design", "v13"], "unknown design 'v13'"),
    ("check: no workers", ["check", "--workers", "0"], "--workers must be at least 1"),
    ("check: random search sharded", ["check", "--random", "--workers", "2"],
     "--random runs in one process"),
    ("conformance: empty case list", ["conformance", "--case", ""], "--case: an empty list"),
    ("conformance: no such case", ["conformance", "--case", "nope"], "no case matches nope"),
    ("cost: infinite GiB", ["cost", "--gib", "inf"], "--gib: inf is outside"),
    ("cost: NaN GiB", ["cost", "--gib", "nan"], "--gib: nan is outside"),
    ("cost: 2^70 CPUs", ["cost", "--cpus", HUGE], "--cpus: ncpus must be within"),
    ("cost: empty strategy list", ["cost", "--strategies", ""], "--strategies: an empty list"),
    ("cost: empty workload list", ["cost", "--workloads", " , "], "--workloads: an empty list"),
    ("cost: calibration not UTF-8", ["cost", "--calibration", "{d}/latin1.json"], "can't decode"),
    ("cost: calibration a list", ["cost", "--calibration", "{d}/list.json"], "a JSON list"),
    ("cost: calibration negative", ["cost", "--calibration", "{d}/negative.json"], "is not a positive"),
    ("cost: calibration strings", ["cost", "--calibration", "{d}/string.json"], "'fast' is not a positive"),
    ("cost: calibration missing", ["cost", "--calibration", "{d}/none.json"], "cannot read"),
    ("cost: plot dir two levels deep", ["cost", "--plot-dir", "{d}/no/plots"], "does not exist"),
    ("cost: plot dir is a file", ["cost", "--plot-dir", "{d}/list.json"], "not a directory"),
    ("cost: model pages not whole blocks", ["cost", "--model-pages", "1000"], "multiple of 512"),
    ("cost: save without measure", ["cost", "--save-measurement", "{d}/m.json"], "needs --measure"),
    ("expose: 2^70 pages", ["expose", "--pages", HUGE], "--pages: 1180591620717411303424 is outside"),
    ("expose: one CPU", ["expose", "--cpus", "1"], "--cpus: at least 2 CPUs"),
    ("expose: empty design list", ["expose", "--designs", ""], "--designs: an empty list"),
    ("expose: unknown workload", ["expose", "--workloads", "boot"], "unknown workload(s) boot"),
    ("expose: calibration a list", ["expose", "--calibration", "{d}/list.json"], "a JSON list"),
    ("expose: plot dir two levels deep", ["expose", "--plot-dir", "{d}/no/plots"], "does not exist"),
    ("bench: JSON into a missing directory", ["bench", "--json", "{d}/no/b.json"], "does not exist"),
    ("bench: JSON onto a directory", ["bench", "--json", "{d}"], "is a directory"),
    ("bench: compare with another schema", ["bench", "--compare", "{d}/negative.json"],
     "is not a gmemlab.bench/2 result"),
    ("bench: merge a list", ["bench", "--merge", "{d}/list.json"], "holds a JSON list"),
    ("bench: merge not UTF-8", ["bench", "--merge", "{d}/latin1.json"], "can't decode"),
    ("bench: infinite size", ["bench", "--sizes", "inf"], "--sizes: inf is outside"),
    ("bench: empty sizes", ["bench", "--sizes", ""], "--sizes: an empty list"),
    ("bench: no rounds", ["bench", "--rounds", "0"], "--rounds: 0 is outside"),
    ("measure: 2^70 MiB", ["measure", "--size-mib", HUGE], "--size-mib: 1180591620717411303424 is outside"),
    ("measure: CPU not ours", ["measure", "--cpu", "100000"], "--cpu: CPU 100000 is not one"),
    ("measure: output onto a directory", ["measure", "--out", "{d}"], "is a directory"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad-input")
    (d / "latin1.json").write_bytes(b'{"schema": "caf\xe9"}')
    (d / "list.json").write_text("[1, 2]")
    measure = {"schema": "gmemlab.measure/1", "machine": {"kernel": "6.18", "cpus": 2},
               "fault_ns_per_page": {"guest_memfd": {"median": -5.0}}}
    (d / "negative.json").write_text(json.dumps(measure))
    measure["fault_ns_per_page"] = {"guest_memfd": {"median": "fast"}}
    (d / "string.json").write_text(json.dumps(measure))
    return d


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import importlib

    for target in WORK:
        module, _, name = target.rpartition(".")

        def started(*_: object, _target: str = target, **__: object) -> None:
            raise AssertionError(f"{_target} started before the command line was refused")

        monkeypatch.setattr(importlib.import_module(module), name, started)
    yield


@pytest.mark.parametrize(("argv", "says"), [(argv, says) for _, argv, says in BAD],
                         ids=[name for name, _, _ in BAD])
@pytest.mark.usefixtures("no_work")
def test_refused_before_any_work(argv: list[str], says: str, scratch: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([a.format(d=scratch) for a in argv])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and says in errors[0], captured.err
    assert "Traceback" not in captured.err and not captured.out
    assert not (scratch / "no").exists()  # nothing created on the way
