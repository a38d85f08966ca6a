"""A user's design: one file, loaded by path or module, run through the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmemlab.cli import main
from gmemlab.model import Host
from gmemlab.model.designs import UnknownDesign, get_design, load_design
from tests.scale.test_mutations import lifecycle

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "zap_at_handout.py"


def test_the_example_runs_clean_and_per_page() -> None:
    host = Host(design=str(EXAMPLE))
    lifecycle(host)
    assert host.m.design.name == "zap-at-handout"
    assert not host.m.inv.violations
    gate = host.m.gate
    assert "design.kvm_gmem_zap_for_handout" in gate.differs
    assert {p.path for p in gate.paths if p.mirror is None} >= {"guest_access", "user_access"}
    counts = host.m.trace.counts
    assert counts["dmap_clear"] and counts["dmap_set"]  # it zapped and restored


def test_named_class_and_module_forms(tmp_path: Path) -> None:
    f = tmp_path / "two.py"
    f.write_text("from gmemlab.model.designs.v12 import V12\n"
                 "class A(V12):\n    name = 'a'\n"
                 "class B(V12):\n    name = 'b'\n")
    with pytest.raises(UnknownDesign, match="defines 2 Design subclasses"):
        load_design(str(f))
    assert get_design(f"{f}:B").name == "b"
    assert get_design("gmemlab.model.designs.v9:V9").name == "v9"
    # A subclass that changes nothing is v12's code: the batched paths mirror it.
    host = Host(design=f"{f}:A")
    lifecycle(host)
    assert host.m.gate.mirror == "v12"


@pytest.mark.parametrize("spec, message", [
    ("nowhere.py", "no such file"),
    ("gmemlab.model.designs.v9:Nope", "is not a Design subclass"),
    ("no_such_module_anywhere:X", "does not load: ModuleNotFoundError"),
])
def test_bad_design_files_are_refused_up_front(spec: str, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownDesign, match=message):
        get_design(spec)
    with pytest.raises(SystemExit) as e:
        main(["run", "--design-file", spec])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_a_design_file_that_raises_says_so(tmp_path: Path) -> None:
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('half-written')\n")
    with pytest.raises(UnknownDesign, match="does not load: RuntimeError: half-written"):
        get_design(str(f))


def test_a_design_file_runs_through_expose_and_cost() -> None:
    """The strategy specs of expose and cost take design files beside NAME and NAME:N."""
    from gmemlab.cost.strategies import UnknownStrategy, make_design, parse_designs

    assert make_design(str(EXAMPLE)).name == "zap-at-handout"
    assert make_design("batch:8").name == "batch"
    assert parse_designs(f"v12,{EXAMPLE}") == ("v12", str(EXAMPLE))
    with pytest.raises(UnknownStrategy, match="no such file"):
        make_design("missing/design.py")
