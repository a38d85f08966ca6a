"""The series' invariants, checked while the model runs.

Each invariant comes from ``series-spec.md`` §8/§9 (and anchors §F) and is
judged on model state at the moment something could break it: a frame going
back to the allocator, a user PTE or stage-2 mapping being installed, a folio
being unlocked, a direct-map entry changing, a kernel access through the
direct map.  None of them names a design or a bug; a design breaks one by
what its code does.

A violation either stops the run (:class:`InvariantViolation`, mode ``stop``)
or is recorded and the run goes on (mode ``record``, used by reports).  A
kernel oops always stops: the modelled kernel has crashed.

Some entries are the series' *rationale*, not safety: the orders v12 chose
(zap before ``kvm_arch_gmem_prepare()``, ``kvm_arch_gmem_invalidate()`` before the
restore) and the picture behind them (a guest-owned frame is out of the host
direct map).  The kernel does not fault when they are not followed: SNP keeps
RMP-assigned pages in its direct map (``rmpupdate()`` only splits it to 4K), and
``sev_gmem_invalidate()`` flushes caches *through* the direct map, so on SNP it is
v12's order that would fault.  A departure from a rationale entry is counted
and reported as such, never stops a run and never fails one; what is judged
is the consequence (``kernel-oops``, ``host-write-guest-owned``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from gmemlab.model.kvm.guest_memfd import KVM_GMEM_FOLIO_NO_DIRECT_MAP
from gmemlab.model.mm.filemap import AS_NO_DIRECT_MAP
from gmemlab.model.mm.folio import folio_pages
from gmemlab.model.mm.memmap import GUEST_OWNED_SNP, KIND_NAMES, PG_locked
from gmemlab.model.ranges import checks
from gmemlab.model.trace import TraceEvent

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    summary: str
    source: str
    rationale: bool = False  # a documented order or picture, not a safety property


INVARIANTS: dict[str, Invariant] = {
    inv.name: inv
    for inv in (
        Invariant(
            "kernel-oops",
            "the kernel never touches a frame whose direct-map entry is not present",
            "§8.1: v7 oops in clear_page_erms from get_page_from_freelist",
        ),
        Invariant(
            "free-frame-in-direct-map",
            "every frame returned to the page allocator is present in the direct map",
            "§8 I7; anchors §F I-free",
        ),
        Invariant(
            "handout-zapped",
            "no user PTE or stage-2 mapping of a NO_DIRECT_MAP folio while it is in the direct map",
            "§8 I3; anchors §F I-map",
        ),
        Invariant(
            "handout-flushed",
            "when a NO_DIRECT_MAP folio is handed out, no CPU's TLB still translates to it",
            "§8 I6; anchors §F I-tlb",
        ),
        Invariant(
            "marker-matches-direct-map",
            "an unlocked page-cache folio carries the NO_DIRECT_MAP marker iff its "
            "direct-map entry is not present",
            "§8 I2; bugs 4 and 5",
        ),
        Invariant(
            "zap-under-folio-lock",
            "the direct map of a folio in the page cache changes only under its folio lock",
            "§8 I4; v12 VM_WARN_ON_FOLIO(!folio_test_locked)",
        ),
        Invariant(
            "zap-only-no-direct-map",
            "only folios of AS_NO_DIRECT_MAP mappings leave the direct map",
            "§8 I4; bug 2",
        ),
        Invariant(
            "zap-before-prepare",
            "arch prepare of a NO_DIRECT_MAP folio happens only after its zap",
            "rationale of v12 10/16 (zap then prepare; series-spec §8 I8 calls it an invariant): "
            "sev_gmem_prepare() only updates the RMP, which needs no direct-map entry either way",
            rationale=True,
        ),
        Invariant(
            "invalidate-before-restore",
            "->free_folio restores the direct map only after the arch invalidate",
            "rationale of v12 10/16 (invalidate then restore; series-spec §8 I7 calls it an "
            "invariant): sev_gmem_invalidate() clflushes through __va(), so on SNP this order "
            "is the one that faults",
            rationale=True,
        ),
        Invariant(
            "guest-owned-not-host-mapped",
            "a frame the arch has given to the guest (e.g. SNP RMP-assigned) is never present "
            "in the host direct map",
            "rationale (series-spec §3.3, §3.5): mainline SNP keeps assigned pages direct-mapped "
            "(arch/x86/virt/svm/sev.c rmpupdate() -> adjust_direct_map() only splits to 4K); "
            "only a host write to them faults (host-write-guest-owned)",
            rationale=True,
        ),
        Invariant(
            "host-write-guest-owned",
            "the host kernel never writes a frame the arch has assigned to the guest",
            "SNP: a host write to an RMP-assigned page is an RMP violation #PF, fatal in the "
            "kernel (arch/x86/mm/fault.c); TDX: a write with the host KeyID to a TD-private "
            "page clears its TD bit and the TD takes #MC on its next read",
        ),
        Invariant(
            "gup-refuses-no-direct-map",
            "GUP never returns a folio of an AS_NO_DIRECT_MAP mapping",
            "§8 I9; §4.1-4.2",
        ),
        Invariant(
            "gadget-blocked",
            "a speculative kernel read through the direct map never reaches a NO_DIRECT_MAP "
            "folio that is mapped to the guest or to userspace",
            "§7.1 threat model; §3.7 stale TLB window",
        ),
        Invariant(
            "free-frame-unmarked",
            "a frame returned to the page allocator carries no KVM_GMEM_FOLIO_NO_DIRECT_MAP "
            "marker in folio->private (judged before the allocator's reset clears it)",
            "§8 bug 5 (v8: restore did not clear the marker); v12 10/16 "
            "kvm_gmem_folio_restore_direct_map() clears it",
        ),
        Invariant(
            "no-mapping-of-free-frame",
            "user PTEs and stage-2 mappings point only at allocated frames, and no frame is "
            "freed while mapped",
            "§9 lifetime; anchors §F I-trunc",
        ),
        Invariant(
            "refcount-sane",
            "folio refcounts never go negative and a frame is freed only at refcount zero",
            "lifetime sanity",
        ),
        Invariant(
            "frame-has-owner",
            "every allocated frame is held by a page cache, a user page table, a design's "
            "pool, or the kernel (an allocation or a direct-map page table): none leaks",
            "lifetime sanity; issue 12 (fallocate at negative offsets leaked its folios)",
        ),
    )
}

InvariantMode = Literal["stop", "record", "off"]
BLOCK_NODES = 4096  # check_all() judges page tables 256K entries at a time


@dataclass(slots=True)
class Violation:
    invariant: Invariant
    message: str
    pfn: int
    seq: int
    trace: list[TraceEvent] = field(default_factory=list)
    oops: bool = False  # the kernel crashed here (KernelOops)

    def format(self) -> str:
        head = f"invariant {self.invariant.name!r} violated at #{self.seq}: {self.message}"
        lines = [head, f"  ({self.invariant.summary}; {self.invariant.source})"]
        if self.trace:
            lines.append("  trace that led there:")
            lines.extend("    " + e.format() for e in self.trace)
        return "\n".join(lines)


class InvariantViolation(Exception):
    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.format())
        self.violation = violation

    @property
    def name(self) -> str:
        return self.violation.invariant.name


class KernelOops(InvariantViolation):
    """The modelled kernel took a fault on a not-present direct-map page and crashed."""


class Invariants:
    """Judges the invariants for one machine; the kernel paths call the ``on_*`` hooks."""

    __slots__ = ("counts", "m", "mode", "violations")

    # In ``record`` mode, keep the full record (with its trace) of this many violations of
    # each invariant; the rest are only counted.
    KEEP_PER_INVARIANT = 20

    def __init__(self, m: Machine, mode: InvariantMode = "stop") -> None:
        if mode not in ("stop", "record", "off"):
            raise ValueError(f"unknown invariant mode {mode!r} (stop, record or off)")
        self.m = m
        self.mode: InvariantMode = mode
        self.violations: list[Violation] = []
        self.counts: dict[str, int] = dict.fromkeys(INVARIANTS, 0)

    # --- reporting --------------------------------------------------------------------
    @staticmethod
    def event(name: str) -> str:
        """The trace event :meth:`fail` makes for ``name``."""
        return "rationale" if INVARIANTS[name].rationale else "violation"

    def only_counts(self, name: str) -> bool:
        """Would :meth:`fail` for ``name`` (not an oops) now only count and trace, keeping no
        record and not stopping (its records full), or do nothing (invariants off)?  Then a
        batched path may make its failures in bulk, as events in their place."""
        keep_going = INVARIANTS[name].rationale or self.mode != "stop"
        return not self.enabled or (keep_going and self.counts[name] >= self.KEEP_PER_INVARIANT)

    def fail(self, name: str, message: str, pfn: int = -1, *, oops: bool = False) -> None:
        trace = self.m.trace
        trace.emit("invariant", self.event(name), pfn, {"invariant": name})
        self.counts[name] += 1
        keep_going = INVARIANTS[name].rationale or self.mode != "stop"
        if self.counts[name] > self.KEEP_PER_INVARIANT and not oops and keep_going:
            return
        tail = trace.tail(25)
        if pfn >= 0:
            # The history of the frame at fault, and what happened just before, in order.
            mine = trace.tail(15, pfn)
            tail = sorted({e.seq: e for e in mine + tail[-10:]}.values(), key=lambda e: e.seq)
        v = Violation(INVARIANTS[name], message, pfn, trace.seq, tail, oops)
        self.violations.append(v)
        if oops:
            raise KernelOops(v)
        if not keep_going:
            raise InvariantViolation(v)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def verdicts(self) -> dict[str, int]:
        """Number of violations per safety invariant (0 = held), for reports."""
        return {n: k for n, k in self.counts.items() if not INVARIANTS[n].rationale}

    def departures(self) -> dict[str, int]:
        """How often each rationale entry was not followed (0 = followed), for reports."""
        return {n: k for n, k in self.counts.items() if INVARIANTS[n].rationale}

    # --- hooks ----------------------------------------------------------------------------
    def on_host_write(self, pfn: int, fn: str) -> None:
        """A kernel write reached ``pfn`` through its direct map: judge whom the frame belongs to.

        ``guest_owned`` says which arch assigned it: an SNP RMP violation in kernel mode
        has no fixup and oopses; on TDX the write goes through and poisons the TD's
        page, which the TD pays for later, so the run goes on.
        """
        owner = self.m.mem.guest_owned[pfn]
        if not owner:
            return
        snp = owner == GUEST_OWNED_SNP
        what = ("RMP violation #PF: kernel write to RMP-assigned" if snp else
                "write with the host KeyID to TD-private (the TD takes #MC on its next read)")
        self.fail("host-write-guest-owned", f"{what} pfn {pfn:#x} in {fn}", pfn, oops=snp)

    def on_kernel_access(self, pfn: int, fn: str, write: bool) -> None:
        """An architectural kernel access missed the TLB and found no present entry."""
        kind = "write" if write else "read"
        self.fail(
            "kernel-oops",
            f"BUG: unable to handle page fault: not-present page, kernel {kind} of the "
            f"direct map of pfn {pfn:#x} in {fn}",
            pfn,
            oops=True,
        )

    def on_free_to_allocator(self, pfn: int) -> None:
        m = self.m
        if not m.dmap.present(pfn):
            self.fail(
                "free-frame-in-direct-map",
                f"pfn {pfn:#x} returned to the page allocator with its direct-map entry "
                "not present",
                pfn,
            )
        mem = m.mem
        if mem.private[pfn] & KVM_GMEM_FOLIO_NO_DIRECT_MAP:
            self.fail(
                "free-frame-unmarked",
                f"pfn {pfn:#x} returned to the page allocator with KVM_GMEM_FOLIO_NO_DIRECT_MAP "
                "still set in folio->private",
                pfn,
            )
        if mem.mapcount[pfn] or mem.s2count[pfn]:
            self.fail(
                "no-mapping-of-free-frame",
                f"pfn {pfn:#x} freed while still mapped ({mem.mapcount[pfn]} user PTEs, "
                f"{mem.s2count[pfn]} stage-2 mappings)",
                pfn,
            )

    def on_handout(self, pfn: int, how: str) -> None:
        """A user PTE or stage-2 mapping to ``pfn`` was just installed."""
        m = self.m
        mem = m.mem
        if not mem.allocated(pfn):
            self.fail("no-mapping-of-free-frame", f"{how} maps free pfn {pfn:#x}", pfn)
            return
        if not m.folio_no_direct_map_mapping(pfn):
            return
        if m.dmap.present(pfn):
            self.fail(
                "handout-zapped",
                f"{how} maps NO_DIRECT_MAP pfn {pfn:#x} while its direct-map entry is present",
                pfn,
            )
        elif m.tlb.cached_anywhere(pfn):
            cpus = m.tlb.cpus_caching(pfn)
            self.fail(
                "handout-flushed",
                f"{how} maps NO_DIRECT_MAP pfn {pfn:#x} while CPU(s) {cpus} still cache a "
                "direct-map translation to it",
                pfn,
            )

    def on_folio_unlock(self, pfn: int) -> None:
        m = self.m
        if not m.design.uses_marker:
            return
        mapping = m.folio_mapping(pfn)
        if mapping is None or mapping.kind != "guest_memfd" or not m.folio_no_direct_map_mapping(pfn):
            return
        marked = bool(m.mem.private[pfn] & KVM_GMEM_FOLIO_NO_DIRECT_MAP)
        if marked == m.dmap.present(pfn):
            state = "set" if marked else "clear"
            dmap = "present" if m.dmap.present(pfn) else "not present"
            self.fail(
                "marker-matches-direct-map",
                f"folio pfn {pfn:#x} unlocked with marker {state} but direct map {dmap}",
                pfn,
            )

    def on_direct_map_change(self, pfn: int, valid: bool) -> None:
        m = self.m
        mem = m.mem
        if valid and mem.guest_owned[pfn]:
            self.fail(
                "guest-owned-not-host-mapped",
                f"direct map of pfn {pfn:#x} restored while the arch still assigns it to the "
                "guest",
                pfn,
            )
        if not mem.mapping[pfn]:
            return  # not (or no longer) in a page cache: secretmem pre-insert, free path
        # The model locks pages; a large folio is locked when the path holds any of its pages.
        if not mem.test_locked(pfn) and not any(mem.test_locked(p) for p in folio_pages(m, pfn)):
            self.fail(
                "zap-under-folio-lock",
                f"direct map of page-cache folio pfn {pfn:#x} changed without its folio lock",
                pfn,
            )
        if not valid and not m.folio_no_direct_map_mapping(pfn):
            self.fail(
                "zap-only-no-direct-map",
                f"folio pfn {pfn:#x} of a mapping without AS_NO_DIRECT_MAP removed from the "
                "direct map",
                pfn,
            )

    def on_arch_prepare(self, pfn: int) -> None:
        if self.m.folio_no_direct_map_mapping(pfn) and self.m.dmap.present(pfn):
            self.fail(
                "zap-before-prepare",
                f"arch prepare of NO_DIRECT_MAP folio pfn {pfn:#x} while it is still in the "
                "direct map",
                pfn,
            )

    def on_restore(self, pfn: int) -> None:
        if not self.m.mem.invalidated[pfn]:
            self.fail(
                "invalidate-before-restore",
                f"direct map of pfn {pfn:#x} restored before kvm_arch_gmem_invalidate",
                pfn,
            )

    def on_gup(self, pfn: int, fn: str) -> None:
        if self.m.folio_no_direct_map_mapping(pfn):
            self.fail(
                "gup-refuses-no-direct-map",
                f"{fn} returned NO_DIRECT_MAP folio pfn {pfn:#x}",
                pfn,
            )

    def on_gadget_read(self, pfn: int, cpu: int) -> None:
        m = self.m
        mem = m.mem
        if m.folio_no_direct_map_mapping(pfn) and (mem.mapcount[pfn] or mem.s2count[pfn]):
            how = "a stale TLB entry" if not m.dmap.present(pfn) else "a present entry"
            self.fail(
                "gadget-blocked",
                f"speculative read on cpu{cpu} reached NO_DIRECT_MAP pfn {pfn:#x} through {how}",
                pfn,
            )

    def on_refcount(self, pfn: int, ref: int) -> None:
        if ref < 0:
            self.fail("refcount-sane", f"refcount of pfn {pfn:#x} went to {ref}", pfn)

    def on_unowned(self, pfn: int) -> None:
        """``check_all()`` found ``pfn`` allocated but held by nothing that will free it."""
        mem = self.m.mem
        self.fail(
            "frame-has-owner",
            f"pfn {pfn:#x} ({KIND_NAMES[mem.kind[pfn]]}, refcount {mem.refcount[pfn]}) is "
            "allocated but in no page cache or page table: leaked",
            pfn,
        )

    # --- a sweep of the whole machine -------------------------------------------------------
    def check_all(self) -> None:
        """Judge every state invariant over the whole machine, between kernel paths.

        The hooks above judge each change as it happens; this sweep catches what
        no single change shows (a frame left out of the direct map, a stale
        mapping, a marker out of step), and is what property tests call after
        every operation.
        """

        # Each sweep picks, with numpy, the frames a check could fail on, and judges only
        # those one by one, in the order a frame-by-frame sweep would, a block of frames at
        # a time: a 64 GiB machine takes seconds and little memory.
        m = self.m
        mem = m.mem
        for pfns in checks.not_present_blocks(m.dmap):
            for pfn in pfns[checks.out_of_direct_map_suspects(m, pfns)].tolist():
                if m.design.holds_unmapped(m, pfn):
                    continue
                if not mem.allocated(pfn):
                    self.fail("free-frame-in-direct-map",
                              f"free pfn {pfn:#x} is not present in the direct map", pfn)
                    continue
                mapping = m.folio_mapping(pfn)
                # secretmem lacks AS_NO_DIRECT_MAP only without the series (design base).
                if mapping is None or not (mapping.test(AS_NO_DIRECT_MAP) or mapping.kind == "secretmem"):
                    self.fail("zap-only-no-direct-map",
                              f"pfn {pfn:#x} is out of the direct map but not a folio of an "
                              "AS_NO_DIRECT_MAP mapping", pfn)
        flags = mem.views().flags
        # Frames some page cache or user page table holds; what is left over and allocated
        # to neither the kernel nor a design's pool has leaked.
        owned = np.zeros(mem.nr_pages, np.bool_)
        for mapping in list(m.mappings.values()):
            for _index, pfns in mapping.i_pages.blocks(nodes_per_block=BLOCK_NODES):
                owned[pfns] = True
                pfns = pfns[(flags[pfns] & PG_locked) == 0]
                for pfn in pfns[checks.unlock_suspects(m, pfns)].tolist():
                    self.on_folio_unlock(pfn)
        tables = [(vma.ptes, "user PTE") for proc in m.processes for vma in proc.mm.vmas]
        tables += [(kvm.spte, "stage-2 mapping") for kvm in m.kvms.values()]
        for table, how in tables:
            for _index, pfns in table.blocks(nodes_per_block=BLOCK_NODES):
                if how == "user PTE":
                    owned[pfns] = True  # stage-2 entries hold no reference
                for pfn in pfns[checks.handout_suspects(m, pfns)].tolist():
                    self.on_handout(pfn, how)
        for pfn in checks.unowned_frames(m, owned).tolist():
            if not m.design.holds_unmapped(m, pfn):
                self.on_unowned(pfn)

