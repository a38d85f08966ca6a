"""``gmemlab run``, as a user runs it: the default lifecycle, JSON, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gmemlab.cli import main

SMALL = ["--guest-mib", "4", "--vmm-write-mib", "1", "--punch-mib", "1", "--ram-gib", "1"]


def test_default_lifecycle_holds_every_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "Invariants: all 14 held" in out
    assert "gadget on cpu1 reads a guest page" in out and "blocked" in out
    assert "DirectMap4k" in out


def test_json_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    plot = tmp_path / "dm.png"
    assert main(["run", *SMALL, "--json", "--trace", str(trace), "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["design"] == "v12" and report["crashed"] is None
    assert set(report["invariants"].values()) == {0}
    assert report["counts"]["zaps"] == report["counts"]["restores"] > 0
    assert report["direct_map"]["splits"]["2M"] > 0
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    # --trace asks for the full trace: every event from the first, not the default ring.
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len(events) > 4096
    assert any(e["event"] == "dmap_clear" and e["fn"] == "set_direct_map_valid_noflush" for e in events)
    assert plot.stat().st_size > 1000


def test_v7_crashes_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *SMALL, "--design", "v7"]) == 1
    out = capsys.readouterr().out
    assert "The modelled kernel crashed" in out and "not-present page" in out
    assert "free-frame-in-direct-map" in out


def test_baseline_without_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *SMALL, "--design", "base", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "does not offer NO_DIRECT_MAP" in report["note"]
    assert report["flags"] == "MMAP|INIT_SHARED" and report["counts"]["zaps"] == 0


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["run", *SMALL, *args, "--json"]) == 0
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


def test_v12_on_large_folios_reports_the_sigbus_and_the_kvm_run_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    """v12 refuses 2 MiB folios: the VMM's write dies of SIGBUS after the user fault's WARN;
    without it, KVM_RUN fails with EINVAL from folio_zap_direct_map(); nothing is zapped."""
    failed = [s for s in _report(capsys, "--profile", "x86_64-gmem-thp")["steps"]  # type: ignore[union-attr]
              if not s["ok"]]
    assert [s["step"] for s in failed] == ["(VMM killed by SIGBUS)"]
    assert "kvm_gmem_fault_user_mapping WARNs" in failed[0]["outcome"]
    r = _report(capsys, "--profile", "x86_64-gmem-thp", "--vmm-write-mib", "0")
    guest = next(s for s in r["steps"] if s["step"].startswith("guest runs"))  # type: ignore[union-attr]
    assert guest["outcome"] == "KVM_RUN fails with EINVAL: folio_zap_direct_map() refuses the large folio"
    assert guest["zaps"] == 0  # nothing of the large folio is zapped (a later order-0 refault is)


def test_arm64_flushes_twice_per_zap_and_never_on_restore(capsys: pytest.CaptureFixture[str]) -> None:
    counts = _report(capsys, "--profile", "arm64")["counts"]
    assert counts["restores"] == counts["zaps"] > 0  # type: ignore[index]
    assert counts["flushes"] == 2 * counts["zaps"] and counts["ipis"] == 0  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--design", "v13"], "unknown design 'v13'"),
        (["--guest-mib", "0"], "at least 1 MiB"),
        (["--guest-mib", "100000", "--ram-gib", "4"], "does not fit"),
        (["--cpus", "0"], "ncpus must be"),
        (["--punch-mib", "1000"], "--punch-mib"),
        (["--profile", "sparc"], "invalid choice: 'sparc'"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gmemlab", "run", *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("vm_type", "where"), [("snp", "sev_gmem_invalidate"),
                                                 ("tdx", "tdh_mem_page_aug")])
def test_the_what_if_profile_finds_why_the_series_excludes_snp_and_tdx(
        capsys: pytest.CaptureFixture[str], vm_type: str, where: str) -> None:
    argv = ["run", *SMALL, "--vm-type", vm_type, "--json"]
    assert main([*argv, "--profile", "x86_64-what-if-snp-tdx"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert where in report["crashed"] and "not-present page" in report["crashed"]
    # Without the what-if, v12 does not offer the flag to the VM type: the baseline runs.
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["crashed"] is None and "does not offer NO_DIRECT_MAP" in report["note"]


def test_v9_on_snp_departs_from_the_rationale_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *SMALL, "--design", "v9", "--vm-type", "snp", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["crashed"] is None and not any(report["invariants"].values())
    assert set(report["rationale_not_followed"]) == {
        "zap-before-prepare", "invalidate-before-restore", "guest-owned-not-host-mapped"}


def test_a_vm_type_the_profile_lacks_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", *SMALL, "--profile", "x86_64-kvm_pvm-6.18", "--vm-type", "tdx"])
    assert e.value.code == 2
    assert "runs no tdx VMs" in capsys.readouterr().err
