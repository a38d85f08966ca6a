"""The attacker of issue 5, watching every kernel step of a modelled machine.

Attacker: a transient-execution gadget in the host kernel on any CPU.  It reads
a frame whenever that CPU has a kernel translation to it: a present direct-map
entry (any CPU's page walk finds it), a stale entry still cached in that CPU's
TLB, or, for designs that zero frames through a per-CPU temporary mapping (the
unmapped pool's mermap) or through a vmap alias (Firecracker's pfncache for
kvm-clock), that mapping while it exists.  Secrets: the bytes the
guest or the VMM wrote into memory (the model's per-byte taint), wherever they
are now, including frames that were freed and not yet zeroed.

:class:`ExposureTracker` sits on ``Machine.step_hook`` and keeps, after every
step, the number of secret bytes the attacker can reach, without scanning
memory: it follows only the frames that hold secrets, and re-judges one of them
only when a step could have changed its answer:

* its contents changed (``MemMap.taint_watch`` names the frames written or zeroed);
* a direct-map entry of its 2 MiB region changed (the step key ``("dmap", pfn)``
  precedes every CPA change and split);
* a TLB lost entries: a flush step ``("tlb", cpu)``, or an access that filled a
  full TLB and so evicted one; only frames reachable through a TLB or a
  temporary mapping alone can lose reach that way, so only those are re-judged;
* a temporary mapping was made or dropped (``("mermap", (cpu, pfn))``), or a vmap
  alias of one frame (``("vmap", pfn)``: kvm-clock's pfncache with Firecracker's
  patches, reachable from every CPU while it lives; counted as ``temp``).

A fill never adds reach: the walker fills only from a present entry, which
already made the frame reachable (``modeling-notes.md``: the fill is atomic with
the walk).  :meth:`ExposureTracker.audit` recomputes everything from scratch;
the tests compare the two after every step, and against ``speculative_read``.

Time: each step advances a clock by the price of the events it emitted
(:class:`gmemlab.cost.model.CostModel`).  The exposure before a step is taken
to last for that step's time (its effects land when it completes), so
``byte_us`` is the integral of reachable bytes over modelled time and
``byte_steps`` the sum over steps of the bytes reachable after each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gmemlab.model.task import Step

if TYPE_CHECKING:
    from gmemlab.cost.model import CostModel
    from gmemlab.model.machine import Machine

# How a frame is reachable (index into the per-cause tallies).
NONE, DMAP, TLB, TEMP = 0, 1, 2, 3
CAUSES = ("dmap", "tlb", "temp")  # names of DMAP, TLB, TEMP

_REGION_SHIFT = 9  # pfn -> 2 MiB region


@runtime_checkable
class TemporaryMappings(Protocol):
    """A design that maps frames outside the direct map for the kernel's own use."""

    def temporary_mapping_cpus(self, pfn: int) -> list[int]: ...


@dataclass(slots=True)
class Phase:
    """A named part of a workload and its exposure."""

    name: str
    start_step: int
    start_us: float
    end_step: int = 0
    end_us: float = 0.0
    peak: int = 0
    byte_steps: int = 0
    byte_us: float = 0.0
    by_cause_us: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "steps": self.end_step - self.start_step,
            "time_us": self.end_us - self.start_us,
            "peak_bytes": self.peak,
            "byte_steps": self.byte_steps,
            "byte_us": self.byte_us,
            "byte_us_by_cause": dict(zip(CAUSES, self.by_cause_us, strict=True)),
        }


@dataclass(slots=True)
class Windows:
    """Per-frame windows: from a frame's secrets becoming reachable to their becoming unreachable."""

    count: int = 0
    total_steps: int = 0
    total_us: float = 0.0
    max_steps: int = 0
    max_us: float = 0.0

    def close(self, steps: int, us: float) -> None:
        self.count += 1
        self.total_steps += steps
        self.total_us += us
        self.max_steps = max(self.max_steps, steps)
        self.max_us = max(self.max_us, us)


class ExposureTracker:
    """Reachable secret bytes after every step of ``m``, incrementally."""

    def __init__(self, m: Machine, cost: CostModel) -> None:
        self.m = m
        design = m.design
        self.temp = design if isinstance(design, TemporaryMappings) else None
        self.prices = list(cost.prices().items())
        self.secret: dict[int, int] = {}  # pfn -> secret bytes it holds (> 0)
        self.by_region: dict[int, set[int]] = {}  # 2 MiB region -> its pfns in self.secret
        self.reach: dict[int, int] = {}  # pfn -> cause, for frames in self.secret that are reachable
        self.indirect: set[int] = set()  # reachable only through a TLB entry or a temporary mapping
        self.opened: dict[int, tuple[int, float]] = {}  # pfn -> (step, µs) its window opened
        self.windows = Windows()
        self.exposed = 0
        self.by_cause = [0, 0, 0, 0]
        self.peak = 0
        self.steps = 0
        self.time_us = 0.0
        self.byte_steps = 0
        self.byte_us = 0.0
        self.by_cause_us = [0.0, 0.0, 0.0]
        self.secret_written = 0  # secret bytes that appeared (a bound for fractions)
        # Timeline: (step, µs, dmap, tlb, temp) whenever the exposure changed.
        self.timeline: list[tuple[int, float, int, int, int]] = [(0, 0.0, 0, 0, 0)]
        self.phases: list[Phase] = []
        self._prev_cause = [0, 0, 0]  # by_cause[1:] after the previous step
        self._t0 = 0.0
        # Windows that opened or closed in the step being judged; settled once its time is known.
        self._opening: list[int] = []
        self._closing: list[int] = []
        self._attached = False

    # --- wiring ----------------------------------------------------------------------------
    def attach(self) -> None:
        """Start observing: scan memory once, then follow every step."""
        m = self.m
        if m.step_hook is not None:
            raise RuntimeError("the machine already has a step hook")
        m.mem.taint_watch = set(self.secret_frames())
        self._t0 = self._priced()  # the clock starts at zero here
        m.step_hook = self.on_step
        self._attached = True
        self._drain()
        self._settle()
        self._record()

    def detach(self) -> None:
        if self._attached:
            self.m.step_hook = None
            self.m.mem.taint_watch = None
            self._attached = False

    def secret_frames(self) -> list[int]:
        """Every frame holding a secret byte (a full scan)."""
        return self.m.mem.secret_frames()

    # --- phases ----------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """End the current phase and start ``name``."""
        self._end_phase()
        self.phases.append(Phase(name, self.steps, self.time_us, peak=self.exposed))

    def finish(self) -> None:
        self._end_phase()
        self.detach()

    def _end_phase(self) -> None:
        if self.phases:
            ph = self.phases[-1]
            ph.end_step, ph.end_us = self.steps, self.time_us

    # --- the attacker --------------------------------------------------------------------------
    def cause(self, pfn: int) -> int:
        """How the attacker reaches ``pfn`` now (NONE, DMAP, TLB or TEMP)."""
        m = self.m
        if m.dmap.present(pfn):
            return DMAP
        tlb = m.tlb
        if any(tlb.covers(cpu, pfn) for cpu in range(tlb.ncpus)):
            return TLB
        if self.temp is not None and self.temp.temporary_mapping_cpus(pfn):
            return TEMP
        return NONE

    def reachable_cpus(self, pfn: int) -> list[int]:
        """The CPUs whose gadget reaches ``pfn`` now."""
        m = self.m
        if m.dmap.present(pfn):
            return list(range(m.tlb.ncpus))
        cpus = {cpu for cpu in range(m.tlb.ncpus) if m.tlb.covers(cpu, pfn)}
        if self.temp is not None:
            cpus.update(self.temp.temporary_mapping_cpus(pfn))
        return sorted(cpus)

    # --- per step --------------------------------------------------------------------------------
    def on_step(self, step: Step) -> None:
        before = self.exposed
        kind, key = step
        self._drain()
        if kind == "dmap":
            for pfn in list(self.by_region.get(key >> _REGION_SHIFT, ())):
                self._judge(pfn)
        elif kind == "tlb" and self.indirect:
            tlb = self.m.tlb
            # An access (key (cpu, pfn)) can only drop an entry by filling a full TLB.
            if not isinstance(key, tuple) or len(tlb.entries[key[0]]) >= tlb.capacity:
                for pfn in list(self.indirect):
                    self._judge(pfn)
        elif kind == "mermap":
            self._judge(key[1])
        elif kind == "vmap":  # a pfncache's vmap alias made or dropped (Firecracker 0042)
            self._judge(key)
        self.steps += 1
        now = self._priced() - self._t0
        dt = now - self.time_us
        self.time_us = now
        if dt:
            self.byte_us += before * dt
            for i in range(3):
                self.by_cause_us[i] += self._prev_cause[i] * dt
        self.byte_steps += self.exposed
        if self.phases:
            ph = self.phases[-1]
            ph.byte_steps += self.exposed
            if dt:
                ph.byte_us += before * dt
                for i in range(3):
                    ph.by_cause_us[i] += self._prev_cause[i] * dt
            ph.peak = max(ph.peak, self.exposed)
        self.peak = max(self.peak, self.exposed)
        self._settle()
        if self.exposed != before or self.by_cause[1:] != self._prev_cause:
            self._record()

    def _priced(self) -> float:
        counts = self.m.trace.counts
        return sum(counts.get(ev, 0) * c for ev, c in self.prices)

    def _settle(self) -> None:
        """Date the windows the last step opened and closed: it ended at (steps, time_us)."""
        now = (self.steps, self.time_us)
        for pfn in self._opening:
            self.opened[pfn] = now
        for pfn in self._closing:
            step, us = self.opened.pop(pfn)
            self.windows.close(self.steps - step, self.time_us - us)
        self._opening.clear()
        self._closing.clear()

    def _record(self) -> None:
        c = self.by_cause
        self._prev_cause = c[1:]
        self.timeline.append((self.steps, self.time_us, c[DMAP], c[TLB], c[TEMP]))

    def _drain(self) -> None:
        mem = self.m.mem
        dirty = mem.taint_watch
        if not dirty:
            return
        mem.taint_watch = set()
        secret = self.secret
        for pfn in dirty:
            n = mem.secret_bytes(pfn)
            old = secret.get(pfn, 0)
            if n == old:
                continue
            if n > old:
                self.secret_written += n - old
            region = pfn >> _REGION_SHIFT
            if n:
                secret[pfn] = n
                self.by_region.setdefault(region, set()).add(pfn)
            else:
                del secret[pfn]
                frames = self.by_region[region]
                frames.discard(pfn)
                if not frames:
                    del self.by_region[region]
            self._account(pfn, old, self.reach.get(pfn, NONE), n, self.cause(pfn) if n else NONE)

    def _judge(self, pfn: int) -> None:
        n = self.secret.get(pfn, 0)
        if not n:
            return
        self._account(pfn, n, self.reach.get(pfn, NONE), n, self.cause(pfn))

    def _account(self, pfn: int, old_n: int, old_cause: int, n: int, cause: int) -> None:
        """Move ``pfn`` from (old_n bytes, old_cause) to (n bytes, cause) in every tally."""
        if old_cause:
            self.exposed -= old_n
            self.by_cause[old_cause] -= old_n
        if cause:
            self.exposed += n
            self.by_cause[cause] += n
            self.reach[pfn] = cause
        else:
            self.reach.pop(pfn, None)
        if cause in (TLB, TEMP):
            self.indirect.add(pfn)
        else:
            self.indirect.discard(pfn)
        if cause and not old_cause:
            self._opening.append(pfn)
        elif old_cause and not cause:
            self._closing.append(pfn)

    # --- results ----------------------------------------------------------------------------------
    def open_windows(self) -> int:
        return len(self.opened)

    def audit(self) -> list[str]:
        """Recompute the attacker's view from scratch; the differences, if any."""
        problems = []
        frames = set(self.secret_frames())
        mem = self.m.mem
        if frames != set(self.secret):
            problems.append(f"secret frames differ: {sorted(frames ^ set(self.secret))[:8]}")
        exposed = 0
        for pfn in frames:
            n = mem.secret_bytes(pfn)
            if self.secret.get(pfn) != n:
                problems.append(f"pfn {pfn:#x}: {n} secret bytes, tracker has {self.secret.get(pfn)}")
            cause = self.cause(pfn)
            if cause:
                exposed += n
            if self.reach.get(pfn, NONE) != cause:
                problems.append(f"pfn {pfn:#x}: reach {cause}, tracker has {self.reach.get(pfn, NONE)}")
        if exposed != self.exposed:
            problems.append(f"exposed {exposed} bytes, tracker has {self.exposed}")
        return problems
