"""Every subcommand of the ``gmemlab`` the tests import, run once as a user runs it.

From a temporary directory outside the tree, through the console script when gmemlab
is installed (``pip install .``: this is what catches a file missing from the wheel),
with the smallest arguments that still do the command's real work.  Each run is
time-boxed; together they take about 15 s of CPU.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gmemlab import twin
from tests.conftest import ROOT, gmemlab_command

TIMEOUT_S = 120

# (subcommand and arguments, exit status, a line the output must contain)
RUNS: dict[str, tuple[list[str], int, str]] = {
    "run": (["run", "--guest-mib", "4", "--vmm-write-mib", "1", "--punch-mib", "1", "--ram-gib", "1"],
            0, "Invariants: all 14 held"),
    "check": (["check", "--design", "v12", "--scenario", "enomem-guest", "--quiet"], 0,
              "v12     enomem-guest  pass (exhaustive)"),
    "conformance": (["conformance", "--case", "mlock.,mmap.anonymous_sizes,secretmem.create_flags"], 0,
                    "5 of 5 cases match."),
    "bench": (["bench", "--no-real", "--sizes", "0.015625", "--rounds", "1", "--work", "0.015625"], 0,
              "guest first touch"),
    "probe": (["probe"], 0, "memfd_secret: ok"),
    "expose": (["expose", "--designs", "v12", "--workloads", "guest-boot", "--pages", "64",
                "--init-on-free", "off", "--quiet"], 0, "timelines: plots/expose-guest-boot.png"),
    "cost": (["cost", "--strategies", "v12", "--workloads", "boot", "--gib", "0.01", "--no-plot", "--quiet"],
             0, "Calibration: gmemlab/cost/data/calibration-6.18.44-fc-v657.json"),
    "churn": (["churn", "--host-gib", "4", "--vms", "10", "--sizes-gib", "1-1", "--designs", "v12",
               "--quiet"], 0, "DM4k GiB"),
    "compare": (["compare", "v12", "noflush", "--quick", "--churn-host-gib", "4", "--churn-vms", "6",
                 "--churn-sizes-gib", "1-1", "--quiet"], 1, "B breaks 2 properties A holds"),
}


def _measure() -> tuple[list[str], int, str]:
    """``measure`` needs /dev/kvm: where it is missing, the run says why (status 1)."""
    ok, reason = twin.available()
    if ok:
        return (["measure", "--quick", "--size-mib", "1", "--reps", "1", "--iterations", "10", "--quiet"], 0,
                "KVM_RUN exit round trip")
    return ["measure", "--quick"], 1, reason


def test_every_subcommand_is_covered() -> None:
    from gmemlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices or ()) == {*RUNS, "measure"}


@pytest.mark.parametrize("command", [*RUNS, "measure"])
def test_subcommand_runs_from_outside_the_tree(command: str, tmp_path: Path) -> None:
    argv, status, says = RUNS[command] if command in RUNS else _measure()
    base, env = gmemlab_command()
    proc = subprocess.run([*base, *argv], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == status, output
    assert says in output, output
    assert "Traceback" not in proc.stderr
    assert not tmp_path.resolve().is_relative_to(ROOT)
    if command == "expose":
        assert (tmp_path / "plots" / "expose-guest-boot.png").stat().st_size > 1000
