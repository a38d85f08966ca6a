"""One execution: a fresh machine, a scenario's setup, and its actors stepped one at a time.

Generators cannot be copied, so the explorer reaches a state by *replaying* a
schedule (the list of actor indices that moved) on a new execution; setup is
cheap (a 4 MiB machine boots in tens of microseconds).  A transition resumes
one actor's generator: the atomic action after its pending step runs, up to
its next yield.

An actor waiting on a lock (``("wait", (mode, key))``) is enabled only once
``Locks.blocked`` says it may go on.  When no actor is enabled the execution
has ended: all actors finished, or the rest wait for something that never
comes, which is a valid end ("waiting is not failing").  A kernel oops ends it
too: the machine is dead.

Properties: the model's invariants (``gmemlab.model.invariants``), recorded by
the machine as the kernel paths run and read here after every step, plus what
only the checker can judge:

* ``zapped-frame-flushed``: in a design that flushes, once a zap has returned
  (the folio is unlocked again) no CPU's TLB still translates to the folio.
  The model judges the TLB when the folio is handed out; this judges it when
  the zap returns, so a zap that is never handed out (fallocate, a fault that
  fails after zapping) is held to it too, and an eviction in between cannot
  hide it;

* ``end-locks-released``: once every actor has finished, no lock, folio lock
  or KVM invalidation is left held; and when the others wait forever, no
  lock is held by an actor that has finished (a leak, not a wait);
* ``end-refcount-balanced``: once every actor has finished, each page-cache
  folio's refcount is the page cache's reference plus one per user PTE, and no
  file folio is left allocated outside a page cache;
* ``no-warn``: no ``WARN_ON_ONCE`` fires (a ``warn_on_once`` trace event, counted
  whatever the trace mode): v12 turns its "cannot happen" cases into WARNs
  (zap of a file without the flag, restore failure), so one firing is a bug;
* ``plain-fault-succeeds``: a fault or GUP that reaches an open guest_memfd
  without NO_DIRECT_MAP succeeds (the operation's ``judge``);
* ``kernel-crash``: a kernel path raised an exception (a NULL ``folio->mapping``
  dereferenced as a ``KeyError``, a ``BUG_ON`` as an ``AssertionError``...): the
  kernel under check oopsed, reported with the kernel functions of the traceback;
* ``checker-error``: the checker itself raised (its setup, an actor's entry code,
  a judge): a bug in gmemlab, not in the code under check.
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from types import GeneratorType
from typing import Any, cast

from gmemlab.api import KernelError
from gmemlab.check.digest import Namer
from gmemlab.check.scenarios import Scenario
from gmemlab.check.world import Op, World
from gmemlab.model.designs import Design, get_design
from gmemlab.model.invariants import INVARIANTS, KernelOops
from gmemlab.model.machine import Machine
from gmemlab.model.mm.filemap import mapping_no_direct_map
from gmemlab.model.mm.memmap import FRAME_ALLOCATED, KIND_FILE, PG_locked
from gmemlab.model.task import WAIT, Step, Task
from gmemlab.model.trace import TraceEvent, TraceMode

DesignSpec = str | Design | Callable[[], Design]

CHECKER_PROPERTIES: dict[str, tuple[str, str]] = {
    "zapped-frame-flushed": (
        "in a design that flushes, no CPU's TLB translates to a NO_DIRECT_MAP page-cache folio "
        "once its zap has returned (the folio is unlocked and out of the direct map)",
        "issue 4; §8 I6; anchors §F I-tlb",
    ),
    "end-locks-released": (
        "no lock is held by an actor that has finished; once all have, no lock, folio lock or "
        "KVM invalidation is left held",
        "lifetime sanity (checker)",
    ),
    "end-refcount-balanced": (
        "once every actor has finished, a page-cache folio holds one reference for the page "
        "cache and one per user PTE, and no file folio is left outside a page cache",
        "refcount and lifetime sanity (checker)",
    ),
    "no-warn": (
        "no WARN_ON_ONCE fires in the kernel under check",
        "v12 10/16 kvm_gmem_folio_zap_direct_map(): WARN_ON_ONCE(!NO_DIRECT_MAP) -> -EINVAL; "
        "v12 02/16 folio_restore_direct_map() WARNs on failure; §8 bugs 2, 6, 17",
    ),
    "plain-fault-succeeds": (
        "a fault or GUP that reaches an open guest_memfd without NO_DIRECT_MAP succeeds",
        "§8 bug 2 (v7 zapped every guest_memfd): the flag is opt-in, a file without it "
        "behaves as before the series",
    ),
    "kernel-crash": (
        "the kernel under check never crashes (an exception raised in a kernel path is an oops, "
        "reported with its kernel functions)",
        "kernel sanity (checker)",
    ),
    "checker-error": (
        "the checker's own code (scenario setup, actors' entry code, judges) raises nothing",
        "checker sanity: a bug in gmemlab, not in the code under check",
    ),
}
WARN_EVENT = "warn_on_once"
_CHECK_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PACKAGE_DIR = os.path.dirname(_CHECK_DIR.rstrip(os.sep)) + os.sep
_LIBRARY_DIRS = tuple({os.path.abspath(p) + os.sep for k, p in sysconfig.get_paths().items()
                       if k in ("stdlib", "platstdlib", "purelib", "platlib")})


def describe(name: str) -> tuple[str, str]:
    """(summary, source) of an invariant or checker property."""
    inv = INVARIANTS.get(name)
    if inv is not None:
        return inv.summary, inv.source
    return CHECKER_PROPERTIES[name]


@dataclass(frozen=True, slots=True)
class Broken:
    """A property that failed in a step (or at the end of an execution)."""

    invariant: str
    message: str
    pfn: int = -1
    oops: bool = False


@dataclass(slots=True)
class StepRecord:
    """What one transition did, for counterexample timelines."""

    actor: int
    op: int  # which of the actor's operations the step belongs to
    step: Step
    stack: tuple[str, ...]  # the call chain that yielded the step
    events: list[TraceEvent]
    broken: list[Broken]
    after: tuple[str, ...] = ()  # the chain where the actor stopped next (empty if it ended)

    @property
    def chain(self) -> tuple[str, ...]:
        """The kernel functions the step ran in: where it stopped, or where it started."""
        return self.after or self.stack


@dataclass(eq=False, slots=True)
class ActorRun:
    name: str
    task: Task
    gen: Generator[Step, None, None]
    results: list[Any]
    ops: tuple[Op, ...]
    pending: Step | None = None
    done: bool = False
    digest: int | None = None  # hash of the actor's part of the fingerprint; None once it moved


def _actor_body(world: World, task: Task, ops: tuple[Op, ...],
                results: list[Any]) -> Generator[Step, None, None]:
    for op in ops:
        results.append((yield from op.run(world, task)))


def make_design(design: DesignSpec) -> Design:
    if isinstance(design, str | Design):
        return get_design(design)
    return design()


class Execution:
    """A scenario on a fresh machine, ready to be stepped."""

    __slots__ = ("actors", "capture", "crashed", "departures", "ignore", "m", "namer", "records",
                 "setup_broken", "world")

    def __init__(self, scenario: Scenario, design: DesignSpec, *, trace: TraceMode = "off",
                 ignore: frozenset[str] = frozenset(), capture: bool = False,
                 departures: set[str] | None = None) -> None:
        self.m = m = Machine(scenario.machine_config(trace), profile=scenario.profile,
                             design=make_design(design))
        self.ignore = ignore
        # Rationale entries (model.invariants) not followed: reported, never a failure.
        self.departures: set[str] = set() if departures is None else departures
        self.capture = capture
        self.records: list[StepRecord] = []
        self.crashed = False
        self.actors: list[ActorRun] = []
        self.namer = Namer()
        failed: list[Broken] = []
        try:
            self.world = scenario.setup(m)
        except KernelOops:
            self.crashed = True
        except KernelError as e:
            # A call of the setup the kernel refused: the scenario cannot run here.
            self.crashed = True
            failed.append(Broken("checker-error", f"setup failed: {e}"))
        except Exception as e:
            self.crashed = True
            failed.append(crash_report(e, "setup"))
        self.setup_broken = self._new_broken(0) + failed
        if self.crashed:
            return
        for a in scenario.actors:
            task = m.task(a.name, a.cpu)
            results: list[Any] = []
            run = ActorRun(a.name, task, _actor_body(self.world, task, a.ops, results), results,
                           a.ops)
            self.actors.append(run)
            try:
                run.pending = next(run.gen)
            except StopIteration:
                run.done = True
            except Exception as e:  # an operation that raised before its first yield
                run.done = True
                self.crashed = True
                self.setup_broken.append(crash_report(e, f"actor {a.name}, before its first step"))
                return
        self.namer.name_world(self.world, ((r.task, a.ops) for r, a in zip(self.actors, scenario.actors,
                                                                           strict=True)))

    # --- scheduling ---------------------------------------------------------------------------
    def enabled(self) -> list[int]:
        if self.crashed:
            return []
        out = []
        m = self.m
        for i, a in enumerate(self.actors):
            if a.done:
                continue
            step = a.pending
            assert step is not None
            if step[0] == WAIT and m.locks.blocked(step[1][0], step[1][1], m):
                continue
            out.append(i)
        return out

    def step(self, i: int, *, judge: bool = True) -> list[Broken]:
        """Resume actor ``i`` for one atomic action; the properties it broke (not ignored).

        ``judge=False`` skips the checker's own state properties (the model still
        judges its invariants): for replays of steps already judged when explored.
        """
        m = self.m
        a = self.actors[i]
        m.switch_to(a.task)
        seen = len(m.inv.violations)
        record = None
        if self.capture:
            assert a.pending is not None
            record = StepRecord(i, len(a.results), a.pending, call_stack(a.gen), [], [])
            seq = m.trace.seq
        error: Broken | None = None
        a.digest = None
        counts = m.trace.counts
        warns = counts[WARN_EVENT]
        ops_done = len(a.results)
        try:
            a.pending = a.gen.send(None)
        except StopIteration:
            a.done = True
            a.pending = None
        except KernelOops:
            a.done = True
            self.crashed = True
        except Exception as e:
            a.done = True
            self.crashed = True
            error = crash_report(e, f"actor {a.name}")
        broken = self._new_broken(seen)
        if error is not None:
            if error.invariant not in self.ignore:
                broken.append(error)
        elif judge and not self.crashed:
            ignore = self.ignore
            if counts[WARN_EVENT] > warns and "no-warn" not in ignore:
                where = " > ".join(call_stack(a.gen)) or "its last operation"
                broken.append(Broken("no-warn", f"WARN_ON_ONCE fired in actor {a.name} "
                                                f"(which then stopped in {where})"))
            if len(a.results) > ops_done and "plain-fault-succeeds" not in ignore:
                op = a.ops[ops_done]
                msg = op.judge(self.world, op.args, a.results[-1]) if op.judge else None
                if msg is not None:
                    broken.append(Broken("plain-fault-succeeds", f"{op.label} ({a.name}) {msg}"))
            if "zapped-frame-flushed" not in ignore:
                broken += self._stale_after_zap()
        if record is not None:
            record.events = [e for e in m.trace.events() if e.seq > seq]
            record.broken = broken
            if not a.done:
                record.after = call_stack(a.gen)
            self.records.append(record)
        return broken

    def run(self, schedule: tuple[int, ...] | list[int]) -> list[Broken]:
        """Replay ``schedule``; the properties broken on the way (the first step that broke any)."""
        for i in schedule:
            broken = self.step(i)
            if broken:
                return broken
        return []

    def _stale_after_zap(self) -> list[Broken]:
        m = self.m
        if not m.design.flushes:
            return []
        out = []
        for mapping in m.mappings.values():
            if not mapping_no_direct_map(mapping):
                continue
            for _, pfn in mapping.i_pages.items():
                if m.mem.test_locked(pfn) or m.dmap.present(pfn):
                    continue  # zap still in progress, or not zapped
                cpus = m.tlb.cpus_caching(pfn)
                if cpus:
                    out.append(Broken("zapped-frame-flushed",
                                      f"NO_DIRECT_MAP folio pfn {pfn:#x} is zapped and unlocked but "
                                      f"CPU(s) {cpus} still cache a direct-map translation to it", pfn))
        return out

    def _new_broken(self, seen: int) -> list[Broken]:
        out = []
        for v in self.m.inv.violations[seen:]:
            name = v.invariant.name
            if v.invariant.rationale:
                self.departures.add(name)
            elif name not in self.ignore:
                out.append(Broken(name, v.message, v.pfn, v.oops))
        return out

    # --- end states ---------------------------------------------------------------------------
    @property
    def all_done(self) -> bool:
        return all(a.done for a in self.actors)

    def end_state(self) -> list[Broken]:
        """Properties judged when the execution can go no further (no oops)."""
        if self.crashed:
            return []
        m = self.m
        finished = {a.task.name for a in self.actors if a.done}
        # Spinlocks and mutexes know their holder: one held by a finished actor is leaked
        # even while others wait.  Anything else can only be judged once all are done.
        held = [f"{k} (by {who})" for k, who in m.locks.held.items() if who in finished]
        if not self.all_done:
            return self._judged([], held)
        mem = m.mem
        out: list[Broken] = []
        held += [str(k) for k, n in m.locks.readers.items() if n]
        held += [f"mmu_invalidate of VM {k}" for k, kvm in m.kvms.items()
                 if kvm.mmu_invalidate_in_progress]
        for pfn in range(mem.nr_pages):
            if mem.state[pfn] != FRAME_ALLOCATED:
                continue
            if mem.flags[pfn] & PG_locked:
                held.append(f"folio lock of pfn {pfn:#x}")
            if mem.mapping[pfn]:
                want = 1 + mem.mapcount[pfn]
                if mem.refcount[pfn] != want:
                    out.append(Broken("end-refcount-balanced",
                                      f"page-cache folio pfn {pfn:#x} ends with refcount "
                                      f"{mem.refcount[pfn]}, expected {want}", pfn))
            elif mem.kind[pfn] == KIND_FILE:
                out.append(Broken("end-refcount-balanced",
                                  f"file folio pfn {pfn:#x} left allocated outside any page cache "
                                  f"(refcount {mem.refcount[pfn]})", pfn))
        return self._judged(out, held)

    def _judged(self, out: list[Broken], held: list[str]) -> list[Broken]:
        if held:
            out.append(Broken("end-locks-released", "left held at the end: " + ", ".join(held)))
        return [b for b in out if b.invariant not in self.ignore]

    # --- fingerprints --------------------------------------------------------------------------
    def fingerprint(self) -> int:
        """A hash of the state (64-bit: collisions are negligible at these state counts).

        An actor's digest is kept until it moves: other actors cannot change its
        locals, and the shared objects its locals reach are named, or digested
        with the machine, so a kept digest can only tell equal states apart,
        never merge different ones.
        """
        namer = self.namer
        actors = []
        for a in self.actors:
            if a.digest is None:
                a.digest = hash((a.done, namer.canon(a.results), namer.generator(a.gen)))
            actors.append(a.digest)
        return hash((self.crashed, namer.machine(self.m), *actors))


    def actor_digests(self) -> tuple[int | None, ...]:
        """Each actor's part of the last fingerprint (None: it moved since)."""
        return tuple(a.digest for a in self.actors)

    def set_actor_digests(self, digests: tuple[int | None, ...]) -> None:
        """Take the actors' parts of the fingerprint of the state a replay reached (computed
        by the execution that found it: equal states have equal parts)."""
        for a, d in zip(self.actors, digests, strict=True):
            a.digest = d


def crash_report(e: BaseException, where: str) -> Broken:
    """An exception out of a kernel path (``kernel-crash``, an oops) or the checker's own code.

    The traceback's frames past the checker's last one are the kernel path (the
    model's code, or a design under test wherever it lives; the standard library
    left out).  None: the checker raised it itself.
    """
    frames = traceback.extract_tb(e.__traceback__)
    last_checker = max((i for i, f in enumerate(frames) if f.filename.startswith(_CHECK_DIR)),
                       default=-1)
    kernel = [f.name for f in frames[last_checker + 1:]
              if f.filename.startswith(_PACKAGE_DIR) or not f.filename.startswith(_LIBRARY_DIRS)]
    what = f"{type(e).__name__}: {e}"
    if not kernel:
        site = frames[-1] if frames else None
        at = f" at {os.path.basename(site.filename)}:{site.lineno} ({site.name})" if site else ""
        return Broken("checker-error", f"{what} in the checker{at} ({where})")
    return Broken("kernel-crash", f"oops: {what} in {where}: {' > '.join(kernel)}", oops=True)


def call_stack(gen: Generator[Any, Any, Any]) -> tuple[str, ...]:
    """Function names of a suspended generator chain, outermost first (the actor body left out)."""
    names = []
    g: Any = cast("GeneratorType[Any, Any, Any]", gen).gi_yieldfrom
    while g is not None and hasattr(g, "gi_code"):
        names.append(g.gi_code.co_name)
        g = g.gi_yieldfrom
    return tuple(names)
