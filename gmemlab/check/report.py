"""Showing results: the design x scenario table, counterexample timelines, JSON.

A counterexample is replayed once more with the full trace and a record of
every transition (``Execution(capture=True)``), then drawn as one lane per
actor (with its CPU): each row is one step, in the lane of the actor that
took it, naming the kernel function that yielded it, what it touched, and
the trace events it emitted.  The kernel call chain at the breaking step is
printed in full, with the invariant and a command that replays the schedule.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

from gmemlab.check.execution import Broken, DesignSpec, Execution, StepRecord, describe
from gmemlab.check.explore import Counterexample, Result
from gmemlab.check.known import Judgement
from gmemlab.check.scenarios import Scenario, get_scenario
from gmemlab.model.task import Step
from gmemlab.model.trace import TraceEvent

WIDTH = 110  # of a timeline, lanes included
DEFAULT_PROFILE = "x86_64"


@dataclass(slots=True)
class Replayed:
    """A schedule replayed with everything recorded."""

    scenario: Scenario
    execution: Execution
    records: list[StepRecord]
    broken: list[tuple[int, Broken]]  # (step, property) in order; step 0: setup
    setup_events: list[TraceEvent]


class ScheduleError(ValueError):
    """A replayed schedule names an actor that cannot move at that point."""


def replay(scenario: Scenario, design: DesignSpec, schedule: tuple[int, ...], *,
           ignore: frozenset[str] = frozenset()) -> Replayed:
    """Replay all of ``schedule``, recording each step and every property broken on the way.

    The machine records a violation and goes on, so a schedule that breaks
    several properties (``--all``) replays to its last; an oops ends it.
    """
    ex = Execution(scenario, design, trace="full", ignore=ignore, capture=True)
    setup_events = ex.m.trace.events()
    broken = [(0, b) for b in ex.setup_broken]
    if broken or ex.crashed:
        return Replayed(scenario, ex, [], broken, setup_events)
    for n, a in enumerate(schedule, 1):
        if ex.crashed:
            raise ScheduleError(f"step {n}: the kernel crashed at step {n - 1}; "
                                f"{len(schedule) - n + 1} more step(s) cannot run")
        if a not in ex.enabled():
            names = ", ".join(f"{i}={r.name}" for i, r in enumerate(ex.actors))
            raise ScheduleError(f"step {n}: actor {a} cannot move there (actors: {names}; "
                                f"enabled: {ex.enabled()})")
        broken += [(n, b) for b in ex.step(a)]
    if not ex.enabled():
        broken += [(len(schedule), b) for b in ex.end_state()]
    return Replayed(scenario, ex, ex.records, broken, setup_events)


def replay_command(design: str, scenario: str, schedule: tuple[int, ...],
                   ignore: frozenset[str], profile: str = DEFAULT_PROFILE) -> str:
    steps = ",".join(map(str, schedule)) or "''"  # the empty schedule: setup alone
    cmd = f"gmemlab check --design {design} --scenario {scenario} --replay {steps}"
    if profile != DEFAULT_PROFILE:
        cmd += f" --profile {profile}"
    if ignore:
        cmd += " --ignore " + ",".join(sorted(ignore))
    return cmd


# --- timelines -------------------------------------------------------------------------------------
def step_label(step: Step) -> str:
    """What a step touches, for people (object identities left out)."""
    kind, key = step
    if kind == "wait":
        mode, what = key
        return f"wait {mode} {_key(what)}".rstrip()
    if kind == "tlb":
        return f"flush cpu{key}" if isinstance(key, int) else f"tlb cpu{key[0]} {key[1]:#x}"
    if kind in ("folio", "ref", "dmap", "frame", "vmap"):
        return f"{kind} {key:#x}"
    if kind == "spte":
        return f"spte vm{key[0]} gfn {key[1]:#x}"
    if kind == "pte":
        return f"pte {key[1]:#x}"
    if kind == "xa":
        return "pick target" if key == "target" else f"xa as{key[0]}[{key[1]}]"
    if kind in ("lock", "unlock"):
        return f"{kind} {_key(key)}"
    if kind == "kvm":
        return f"vm{key}"
    if kind in ("file", "slot"):
        return kind  # keyed by object identity, meaningless to a reader
    return f"{kind} {_key(key)}".rstrip()


def _key(key: Any) -> str:
    if isinstance(key, tuple):
        return ":".join(_key(k) for k in key)
    return "" if key is None else str(key)


def _event(e: TraceEvent) -> str:
    pfn = f" {e.pfn:#x}" if e.pfn >= 0 else ""
    det = ""
    if e.detail:
        det = " " + " ".join(f"{k}={_value(v)}" for k, v in e.detail.items())
    return f"{e.fn}: {e.event}{pfn}{det}"


def _value(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 4096:
        return hex(v)
    return str(v)


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False) or [""]


def timeline(rep: Replayed) -> list[str]:
    """One lane per actor; a row per step.  A lane ends after its actor's last step."""
    actors = rep.execution.actors
    width = max(28, (WIDTH - 8) // len(actors) - 2)
    head = "  step  " + "".join(f"{a.name} (cpu{a.task.cpu})".ljust(width + 2) for a in actors)
    lines = [head.rstrip(), "  " + "-" * (min(len(head), WIDTH) - 2)]
    last_step = {r.actor: n for n, r in enumerate(rep.records)}
    finished: set[int] = set()
    current_op: dict[int, int] = {}
    ops = rep.scenario.actors
    for n, r in enumerate(rep.records):
        cell = []
        if current_op.get(r.actor) != r.op:
            current_op[r.actor] = r.op
            cell += _wrap(f">> {ops[r.actor].ops[r.op].label}", width)
        fn = r.stack[-1] if r.stack else "(op)"
        caller = r.stack[-2] + " > " if len(r.stack) > 1 else ""
        cell += _wrap(f"{caller}{fn} [{step_label(r.step)}]", width)
        for e in r.events:
            if e.event != "violation":  # shown as !! below
                cell += _wrap(_event(e), width, "  ")
        for b in r.broken:
            cell += _wrap(f"!! {b.invariant}", width, "  ")
        for row, text in enumerate(cell):
            parts = [text.ljust(width) if i == r.actor else ("" if i in finished else "|").ljust(width)
                     for i in range(len(actors))]
            num = f"{n + 1:>5}" if row == 0 else "     "
            lines.append(f"  {num}  " + "  ".join(parts).rstrip())
        if actors[r.actor].done and last_step[r.actor] == n:
            finished.add(r.actor)
    return lines


def break_path(rep: Replayed, cx: Counterexample) -> tuple[str, ...]:
    """The kernel functions a counterexample breaks in (what tells two violations apart).

    An oops's own message names its path; a violation judged at the end or in
    setup has none of its own.
    """
    if cx.in_setup:
        return ("(setup)",)
    if cx.at_end or not rep.records:
        return ("(end state)",)
    return rep.records[-1].chain


def render_counterexample(scenario: Scenario, design: DesignSpec, design_name: str,
                          cx: Counterexample, *, ignore: frozenset[str] = frozenset(),
                          rep: Replayed | None = None) -> str:
    """The timeline of ``cx`` (``rep``: its replay, if already made)."""
    if rep is None:
        rep = replay(scenario, design, cx.schedule, ignore=ignore)
    summary, source = describe(cx.invariant)
    where = ("during setup" if cx.in_setup else
             f"at the end of a {len(cx.schedule)}-step schedule" if cx.at_end else
             f"after {len(cx.schedule)} steps")
    on = f" on {scenario.profile}" if scenario.profile != DEFAULT_PROFILE else ""
    lines = [f"{design_name} x {scenario.name}{on}: property '{cx.invariant}' broken {where}",
             f"  {summary}",
             f"  ({source})",
             f"  {cx.message}"]
    if ignore:
        lines.append(f"  (ignoring {', '.join(sorted(ignore))})")
    lines.append("")
    if cx.in_setup:
        lines.append("  setup (run sequentially, before any actor) did:")
        lines += ["    " + _event(e) for e in rep.setup_events[-25:]]
    else:
        lines += timeline(rep)
        last = rep.records[-1] if rep.records else None
        if last is not None and not cx.at_end:
            chain = " > ".join((rep.execution.actors[last.actor].name, *last.chain))
            lines += ["", f"  kernel functions at the break: {chain}"]
    lines += ["", "  replay: " + replay_command(design_name, scenario.name, cx.schedule, ignore,
                                                scenario.profile)]
    return "\n".join(lines)


def explain(results: list[Result], ignore: frozenset[str]) -> str:
    """One timeline per distinct violation: same property, same kernel path at the break.

    The shortest counterexample of each is drawn; the other cells that break it
    the same way are listed under it with their replay commands.
    """
    Member = tuple[Result, Counterexample, Replayed]
    groups: dict[tuple[str, tuple[str, ...]], list[Member]] = {}
    for r in results:
        if r.skipped is not None:
            continue
        scenario = get_scenario(r.scenario).on(r.profile)
        for cx in r.found:
            rep = replay(scenario, r.design, cx.schedule, ignore=ignore)
            groups.setdefault((cx.invariant, break_path(rep, cx)), []).append((r, cx, rep))
    if not groups:
        return "nothing to explain: no cell broke a property"
    out = [f"{len(groups)} distinct violation(s) (property and kernel path at the break):", ""]
    for members in groups.values():
        members.sort(key=lambda m: len(m[1].schedule))
        r, cx, rep = members[0]
        out.append(render_counterexample(rep.scenario, r.design, r.design, cx, ignore=ignore,
                                         rep=rep))
        if len(members) > 1:
            out.append(f"  the same violation in {len(members) - 1} more cell(s):")
            out += [f"    {m.design} x {m.scenario}: {len(c.schedule)} steps; replay: "
                    + replay_command(m.design, m.scenario, c.schedule, ignore, m.profile)
                    for m, c, _ in members[1:]]
        out.append("")
    return "\n".join(out).rstrip()


def render_replay(rep: Replayed, design_name: str) -> str:
    """A replayed schedule: its timeline and what (if anything) it broke."""
    ex = rep.execution
    lines = [f"{design_name} x {rep.scenario.name}: replayed {len(rep.records)} steps", ""]
    lines += timeline(rep)
    lines.append("")
    if rep.broken:
        for n, b in rep.broken:
            summary, source = describe(b.invariant)
            where = "in setup" if n == 0 else f"at step {n}"
            lines += [f"  BROKEN {b.invariant} {where}: {b.message}", f"    {summary} ({source})"]
    else:
        enabled = ex.enabled()
        states = [f"{a.name} {'done' if a.done else 'can go on' if i in enabled else 'waits'}"
                  for i, a in enumerate(ex.actors)]
        lines.append(f"  no property broken ({', '.join(states)})")
    return "\n".join(lines)


# --- tables and JSON --------------------------------------------------------------------------------
TABLE_HEAD = ("design", "profile", "scenario", "verdict", "catalogue", "states", "time s",
              "states/s")


def table(results: list[Result], judgements: list[Judgement]) -> str:
    """One row per cell; the profile column only when a cell runs off the default profile."""
    show_profile = any(r.profile != DEFAULT_PROFILE for r in results)
    rows = [TABLE_HEAD]
    for r, j in zip(results, judgements, strict=True):
        st = r.stats
        secs = max(st.seconds, 1e-9)
        if r.skipped is not None:
            rows.append((r.design, r.profile, r.scenario, "skip", r.skipped, "", "", ""))
            continue
        rows.append((r.design, r.profile, r.scenario, r.verdict(), j.describe(), str(st.states),
                     f"{st.seconds:.2f}", f"{st.states / secs:.0f}"))
    cols = [i for i in range(len(TABLE_HEAD)) if show_profile or TABLE_HEAD[i] != "profile"]
    widths = {i: max(len(row[i]) for row in rows) for i in cols}
    widths[4] = min(widths[4], 60)  # a skip's reason may run past the other columns
    right = {5, 6, 7}
    out = []
    for n, row in enumerate(rows):
        cells = [row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i]) for i in cols]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * widths[i] for i in cols))
    ran = [r for r in results if r.skipped is None]
    total_s = sum(r.stats.seconds for r in ran)
    states = sum(r.stats.states for r in ran)
    out.append(f"total: {len(ran)} cells run, {states} distinct states, {total_s:.1f} s "
               f"({states / max(total_s, 1e-9):.0f} states/s)")
    return "\n".join(out)


def result_json(r: Result, ignore: frozenset[str], j: Judgement) -> dict[str, Any]:
    st = r.stats
    secs = max(st.seconds, 1e-9)
    out: dict[str, Any] = {
        "design": r.design,
        "scenario": r.scenario,
        "profile": r.profile,
        "mode": r.mode,
        "verdict": r.verdict(),
        "skipped": r.skipped,
        "passed": r.passed,
        "rationale_not_followed": sorted(r.rationale),
        "catalogue": {"status": j.status, "expected": sorted(j.expected), "new": list(j.new),
                      "gone": list(j.gone), "note": j.note},
        "complete": r.complete,
        "bounds": {"preemptions": r.bounds.preemptions, "max_steps": r.bounds.max_steps,
                   "cut_at_max_steps": r.bound_hits},
        "executions": st.executions,
        "states": st.states,
        "transitions": st.transitions,
        "max_depth": st.depth,
        "seconds": round(st.seconds, 4),
        "executions_per_second": round(st.executions / secs, 1),
        "states_per_second": round(st.states / secs, 1),
        "ignored": sorted(ignore),
        "counterexamples": [
            {"invariant": c.invariant, "summary": describe(c.invariant)[0], "message": c.message,
             "pfn": c.pfn, "length": len(c.schedule), "schedule": list(c.schedule),
             "in_setup": c.in_setup, "at_end": c.at_end, "oops": c.oops,
             "replay": replay_command(r.design, r.scenario, c.schedule, ignore, r.profile)}
            for c in r.found
        ],
    }
    if r.mode == "random":
        out["seed"] = r.seed
        out["runs"] = r.runs
    return out
