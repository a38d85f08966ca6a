"""``gmemlab conformance``: every conformance case on the real kernel and on the model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gmemlab.cli import UsageError, name_list
from gmemlab.conformance.cases import CASES, Outcome
from gmemlab.conformance.recorded import DERIVED, DERIVED_FROM, RECORDED_ON, base_name
from gmemlab.conformance.runner import RECORDED_KERNEL, CaseResult, Report, compare
from gmemlab.report import dump_json, table

WIDTH = 46


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "conformance",
        help="run the conformance cases on the real kernel and on the model; show where they differ",
        description=(
            "Run each scenario on /dev/kvm (through the twin) and on the model given the running "
            "kernel's profile, and print case, real result, model result and whether they match. "
            "Without /dev/kvm the real side is the outcomes recorded on this project's machines. "
            "NO_DIRECT_MAP variants, which the running kernel cannot run, are listed apart."
        ),
    )
    p.add_argument("--case", action="append", metavar="NAME[,NAME]", type=name_list,
                   help="run only this case (repeatable; a prefix selects several)")
    p.add_argument("--recorded", action="store_true",
                   help="compare with the recorded outcomes even if /dev/kvm is present")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    names = None
    if args.case:
        wanted = [c for cases in args.case for c in cases]
        names = [n for n in CASES if any(n.startswith(c) for c in wanted)]
        if not names:
            raise UsageError(f"no case matches {', '.join(wanted)}; see --help or the list in "
                             "gmemlab/conformance/cases.py")
    real = None
    reason = ""
    if not args.recorded:
        from gmemlab import twin

        ok, reason = twin.available()
        if ok:
            real = twin.TwinHost()

    def progress(i: int, n: int, name: str) -> None:
        if sys.stderr.isatty():
            print(f"\r[{i + 1}/{n}] {name[:60]:<60}", end="", file=sys.stderr, flush=True)

    report = compare(real, names=names, progress=progress)
    if sys.stderr.isatty():
        print("\r" + " " * 72 + "\r", end="", file=sys.stderr)
    if args.json:
        dump_json(as_json(report))
    else:
        if not report.live and not args.recorded:
            print(f"(no live kernel: {reason}; comparing with the recorded outcomes)\n")
        print(render(report))
    bad_flag = [r for r in report.flag_results if not r.match]
    return 0 if not report.mismatches and not bad_flag else 1


def short(o: Outcome) -> str:
    s = o if isinstance(o, str) else json.dumps(o, separators=(",", ":"))
    return s if len(s) <= WIDTH else s[: WIDTH - 3] + "..."


def render(r: Report) -> str:
    real = "linux" if r.live else "linux (recorded)"
    out = [f"real:  {r.real_name}" + ("" if r.live else " [recorded]"), f"{r.model_name}", ""]
    derived = [c for c in r.results if base_name(c.case.name) in DERIVED and c.real is not None
               and (c.recorded or not r.live)]
    rows = [[c.case.name + (" *" if c.recorded else "") + (" +" if c in derived else ""),
             short(c.real), short(c.model), "yes" if c.match else "NO"] for c in r.results]
    out.append(table(["case", real, "model", "match"], rows, align="llll"))
    recorded = [c for c in r.results if c.recorded]
    if recorded:
        out.append(f"\n* {len(recorded)} cases need guest_memfd, which the running kernel lacks: "
                   f"compared with the outcomes recorded on {RECORDED_ON}, on the model of that "
                   f"kernel ({RECORDED_KERNEL.profile.name}, design {RECORDED_KERNEL.design}); "
                   f"{len(r.results) - len(recorded)} ran live.")
    if derived:
        out.append(f"+ {len(derived)} of them were never run on a kernel with guest_memfd: their "
                   f"outcomes are derived from {DERIVED_FROM}.")
    n, bad = len(r.results), len(r.mismatches)
    out.append(f"\n{n - bad} of {n} cases match" + ("." if not bad else f"; {bad} differ:"))
    for c in r.mismatches:
        out += [f"  {c.case.name}:", f"    {real}: {json.dumps(c.real)}", f"    model: {json.dumps(c.model)}"]
    if r.flag_results:
        out += ["", "Only with NO_DIRECT_MAP (the running kernel lacks it; the model runs v12):"]
        rows = [[c.case.name, short(c.real), short(c.model), "yes" if c.match else "NO", c.note]
                for c in r.flag_results]
        out.append(table(["case", "expected", "model v12", "as expected", "why"], rows, align="lllll"))
        wrong = [c for c in r.flag_results if not c.match]
        out.append(f"\n{len(r.flag_results) - len(wrong)} of {len(r.flag_results)} behave as the "
                   "flag should")
    return "\n".join(out)


def _result_json(c: CaseResult) -> dict[str, Any]:
    return {"case": c.case.name, "real": c.real, "model": c.model, "match": c.match,
            "flag_dependent": c.case.direct_map_dependent, "note": c.note or None,
            "recorded": c.recorded}


def as_json(r: Report) -> dict[str, Any]:
    return {
        "real": r.real_name,
        "live": r.live,
        "model": r.model_name,
        "cases": [_result_json(c) for c in r.results],
        "no_direct_map_cases": [_result_json(c) for c in r.flag_results],
        "matched": len(r.results) - len(r.mismatches),
        "total": len(r.results),
    }
