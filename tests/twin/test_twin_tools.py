"""gmemlab probe and gmemlab measure: their logic and their command-line glue."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gmemlab import twin, uapi
from gmemlab.commands import measure as measure_cmd
from gmemlab.commands import probe as probe_cmd
from gmemlab.twin.measure import KINDS, SCHEMA, SHARED, MeasureConfig, format_report, run_measurement
from gmemlab.twin.probe import format_probe, probe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmemlab")
    sub = parser.add_subparsers()
    probe_cmd.register(sub)
    measure_cmd.register(sub)
    return parser


def test_probe_without_kvm() -> None:
    report = probe(twin.TwinHost(kvm_path="/nonexistent/kvm"))
    assert report["kvm"]["available"] is False
    assert "/nonexistent/kvm" in report["kvm"]["reason"]
    assert "unavailable" in format_probe(report)


def test_probe(host: twin.TwinHost) -> None:
    report = probe(host)
    json.dumps(report)
    kvm = report["kvm"]
    assert kvm["api_version"] == 12
    gmem = twin.guest_memfd_available()[0]
    assert kvm["caps"]["KVM_CAP_GUEST_MEMFD"] == int(gmem)
    default = kvm["vm_types"]["DEFAULT"]
    cap = default["guest_memfd_flags_cap"]
    assert sum(1 << b for b in default["guest_memfd_bits_accepted"]) == cap
    # Without guest_memfd, KVM_CREATE_GUEST_MEMFD is an unknown VM ioctl.
    assert default["guest_memfd_bits_rejected_with"] == ["EINVAL" if gmem else "ENOTTY"]
    assert report["memfd_secret"] == "ok"
    text = format_probe(report)
    assert "KVM_CAP_GUEST_MEMFD_FLAGS" in text and "NO_DIRECT_MAP" in text


def test_probe_command_json(host: twin.TwinHost, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["probe", "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["kvm"]["available"] is True


def test_measure_tiny(host: twin.TwinHost) -> None:
    """Every kind this kernel has; without MMAP|INIT_SHARED guest_memfd, those two kinds are
    named as not measured and the rest still is."""
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        offered = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
    gmem = offered & SHARED == SHARED
    config = MeasureConfig(size=256 * 1024, reps=2, roundtrip_iterations=20, cpu=None)
    messages: list[str] = []
    result = run_measurement(config, host, progress=messages.append)
    assert result["schema"] == SCHEMA
    assert result["config"]["pages"] == 64
    kinds = [k for k in KINDS if gmem or "guest_memfd" not in k]
    assert set(result["unavailable"]) == set(KINDS) - set(kinds)
    for kind in kinds:
        stats = result["guest"]["first_touch_ns_per_page"] if kind == "guest_memfd_guest" \
            else result["fault_ns_per_page"][kind]
        assert len(stats["samples"]) == 2
        assert stats["min"] <= stats["median"] <= stats["max"]
    if gmem:
        assert result["guest"]["pf_fixed_per_page"] >= 1
        assert result["guest"]["insn_emulation_per_page"] < 0.5
    else:
        assert result["guest"] is None and "guest_memfd" not in result["fault_ns_per_page"]
    assert result["kvm_run"]["exit_roundtrip_ns"]["median"] > 0
    assert set(result["direct_map_kB"]["total_delta"]) == {"4k", "2M", "1G"}
    assert all(f"rep 1/2: {k}" in messages for k in kinds)
    json.dumps(result)
    report = format_report(result)
    assert ("secretmem / guest_memfd fault" in report) is gmem
    assert ("guest_memfd          not measured" in report) is not gmem


def test_measure_command(host: twin.TwinHost, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    argv = ["measure", "--size-mib", "1", "--reps", "1", "--iterations", "10", "--quiet", "--cpu", "-1"]
    args = _parser().parse_args([*argv, "--out", str(out)])
    assert args.handler(args) == 0
    result = json.loads(out.read_text())
    assert result["config"]["size_bytes"] == 1 << 20
    assert result["machine"]["pinned_cpu"] is None


def test_measure_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["measure", "--size-mib", "0"])
    assert e.value.code == 2
    assert "argument --size-mib: 0 is outside" in capsys.readouterr().err


def test_quick_config() -> None:
    quick = MeasureConfig.quick()
    assert quick.size < MeasureConfig().size
    assert quick.pages == quick.size // uapi.PAGE_SIZE
