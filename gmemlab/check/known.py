"""The bugs review found in the series, as the checker finds them, and the catalogue of verdicts.

``KNOWN_BUGS``: each bug review found, as the checker reports it.
``EXPECTED``: for each design and scenario, every property the design is
expected to break there; ``gmemlab check`` exits 0 when every verdict is as
catalogued and names what is new (:func:`judge`).

Each entry names a design, a standard scenario and the invariant the
checker reports first, with the length of the shortest schedule that breaks
it.  The checker is told none of this: the entries record what it finds (the
tests hold it to them; the benchmark times it).  Where a design has several
bugs, ``ignore`` looks past those already reported, as a reviewer would after
the first fix.  ``functions`` are kernel functions the counterexample passes
through, for a reader to check it is the bug named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gmemlab.check.explore import Result


@dataclass(frozen=True, slots=True)
class KnownBug:
    name: str
    what: str
    design: str
    scenario: str
    ignore: tuple[str, ...]
    invariant: str
    length: int
    functions: tuple[str, ...]


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug("v7-and-marker", "v7 05/12: marker set with '&', so it is never set",
             "v7", "lifecycle", (), "marker-matches-direct-map", 16,
             ("kvm_gmem_fault_user_mapping", "finish_fault", "folio_unlock")),
    KnownBug("v7-free-without-restore", "v7: ->free_folio sees no marker and never restores",
             "v7", "lifecycle", ("marker-matches-direct-map",), "free-frame-in-direct-map", 32,
             ("kvm_gmem_punch_hole", "truncate_inode_pages_range", "free_page_to_allocator")),
    KnownBug("v7-oops-on-reuse", "v7: the frame's next user oopses in clear_page_erms "
             "(get_page_from_freelist), the crash reported with Firecracker",
             "v7", "lifecycle", ("marker-matches-direct-map", "free-frame-in-direct-map"),
             "kernel-oops", 34, ("alloc_page", "clear_page", "clear_page_erms")),
    KnownBug("v9-ignored-zap-error", "v7-v9: kvm_gmem_get_pfn() ignores the zap's error (ENOMEM "
             "at the direct-map split) and the guest maps a direct-mapped frame",
             "v9", "enomem-guest", ("zap-before-prepare", "marker-matches-direct-map"),
             "handout-zapped", 22, ("kvm_gmem_get_pfn", "split_large_page", "kvm_mmu_page_fault")),
    KnownBug("v9-marker-before-zap", "v9: marker set before the zap, so a failed zap (ENOMEM at "
             "the split) leaves the folio marked but still in the direct map",
             "v9", "enomem-split", ("zap-before-prepare",), "marker-matches-direct-map", 16,
             ("kvm_gmem_folio_zap_direct_map", "set_marker", "split_large_page", "fault_fail")),
    KnownBug("noflush-stale-tlb", "no TLB flush after the zap: a stale translation survives",
             "noflush", "zap-gadget", (), "handout-flushed", 19,
             ("kvm_gmem_get_pfn", "kvm_mmu_page_fault")),
    KnownBug("noflush-stale-read", "no TLB flush: a gadget on the other CPU reads the guest's "
             "page through the stale translation after the zap",
             "noflush", "zap-gadget", ("handout-flushed",), "gadget-blocked", 23,
             ("speculative_read",)),
    KnownBug("v9-prepare-before-zap", "<= v11: arch prepare before the zap",
             "v9", "fault-punch", (), "zap-before-prepare", 9,
             ("kvm_gmem_prepare_folio_tracked", "kvm_arch_gmem_prepare")),
    KnownBug("v9-restore-before-invalidate", "<= v11: restore before the arch invalidate",
             "v9", "fault-punch", ("zap-before-prepare",), "invalidate-before-restore", 26,
             ("kvm_gmem_free_folio", "kvm_gmem_folio_restore_direct_map")),
    KnownBug("pagecache-restore-before-invalidate", "the page-cache-level proposal restores on "
             "removal, before ->free_folio's invalidate",
             "pagecache", "fault-punch", (), "invalidate-before-restore", 24,
             ("filemap_free_folio",)),
)


# --- what each design is expected to break, cell by cell ------------------------------------------
ALL_PROFILES = ("*",)


@dataclass(frozen=True, slots=True)
class Expected:
    """Every property ``design`` breaks in ``scenario`` (explored with ``--all``), and why.

    ``profiles``: where this holds (``*``: every profile the design offers the
    flag on).  A cell not listed is expected to pass.
    """

    design: str
    scenario: str
    breaks: frozenset[str]
    why: str
    profiles: tuple[str, ...] = ALL_PROFILES


Status = Literal["ok", "new", "gone", "skip"]


@dataclass(frozen=True, slots=True)
class Judgement:
    """A cell's verdict held against the catalogue."""

    status: Status
    expected: frozenset[str]  # what the catalogue says breaks here (ignored properties left out)
    new: tuple[str, ...] = ()  # broken, not catalogued
    gone: tuple[str, ...] = ()  # catalogued, no longer broken
    note: str = ""  # catalogued properties a bounded or random search did not reach

    def describe(self) -> str:
        if self.status == "skip":
            return "skipped"
        parts = []
        if self.new:
            parts.append("NEW " + ", ".join(self.new))
        if self.gone:
            parts.append("GONE " + ", ".join(self.gone))
        if not parts:
            parts.append("as catalogued" if self.expected else "as expected")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def expected(design: str, scenario: str, profile: str) -> Expected | None:
    for e in EXPECTED:
        if e.design == design and e.scenario == scenario and (
                e.profiles == ALL_PROFILES or profile in e.profiles):
            return e
    return None


def judge(result: Result, ignore: frozenset[str] = frozenset(), *,
          all_violations: bool = False) -> Judgement:
    """Hold ``result`` to the catalogue.

    New: a property broken that the catalogue does not list for the cell.  Gone:
    a catalogued property an exhaustive, unbounded search no longer finds (all
    of them with ``--all``; stopping at the first, the cell no longer fails).  A
    bounded or random search that misses one says so but is not a failure: it
    may not have reached it.
    """
    if result.skipped is not None:
        return Judgement("skip", frozenset())
    entry = expected(result.design, result.scenario, result.profile)
    want = (entry.breaks if entry else frozenset()) - ignore
    found = [c.invariant for c in result.found]
    new = tuple(p for p in found if p not in want)
    missing = sorted(want - set(found)) if all_violations else (
        sorted(want) if want and not found else [])
    exhaustive = (result.mode == "exhaustive" and not result.bound_hits
                  and result.bounds.preemptions is None)
    gone = tuple(missing) if exhaustive else ()
    note = "" if exhaustive or not missing else (
        f"catalogued {', '.join(missing)} not reached by this "
        f"{'random' if result.mode == 'random' else 'bounded'} search")
    return Judgement("new" if new else "gone" if gone else "ok", want, new, gone, note)

X86 = ("x86_64", "x86_64-kvm_pvm-6.18")  # arm64's set_memory_valid() flushes by itself (TLBI IS)
WHY = {
    "v9": "<= v11 order: arch prepare before the zap, restore before the invalidate (§8 bug 13); "
          "v9 also ignores the zap's error on guest faults and sets the marker before the zap "
          "(§8 bugs 3, 4), which the ENOMEM scenarios show",
    "v7": "v7: the marker set with '&' is never set, so ->free_folio never restores and the "
          "frame's next kernel user oopses (§8 bug 1); the zap ignores the creation flag, so "
          "files without NO_DIRECT_MAP leave the direct map too (§8 bug 2); <= v11 order (§8 bug 13)",
    "noflush": "no kernel TLB flush after the zap (§8 bug 10, Firecracker's opt-out): a stale "
               "translation outlives the handout; on arm64 set_memory_valid() flushes anyway",
    "fc-6.18": "Firecracker's 6.18 port: 6.18's guest fault prepares (zero, arch prepare) a folio "
               "that is not uptodate and only then zaps (0032), so zap-before-prepare, the "
               "series' stated ordering, does not hold (harmless for the default VM, whose arch "
               "prepare does nothing); no flush after the zap (0039's default), as noflush; on "
               "arm64 set_memory_valid() flushes anyway",
    "pagecache": "the page-cache-level proposal restores the direct map on removal, before "
                 "->free_folio's arch invalidate (the order v12 fixed, §8 bug 13)",
    "filemap": "the posted page-cache-level slow path (docs/next-shape.md) restores the direct "
               "map in filemap_remove_folio(), before ->free_folio's arch invalidate (the order "
               "v12 fixed, §8 bug 13; issue 11 asks whether that order is a safety rule at all)",
    "batch": "flushes batched until later: a folio is handed out (or unlocked) while another "
             "CPU still translates to it; on arm64 set_memory_valid() flushes anyway",
}


def _e(design: str, scenario: str, breaks: str, profiles: tuple[str, ...] = ALL_PROFILES) -> Expected:
    return Expected(design, scenario, frozenset(breaks.split()), WHY[design], profiles)


# Found by ``gmemlab check --all`` on every design, scenario and profile that offers the flag
# (x86_64, x86_64-kvm_pvm-6.18, arm64); falloc, zap2m and pool break nothing.  The cells of
# free-reuse that fail do so in its setup (the guest's first fault), before any actor runs.
EXPECTED: tuple[Expected, ...] = (
    _e("v9", "fault-punch", "invalidate-before-restore zap-before-prepare"),
    _e("v9", "ufault-release", "invalidate-before-restore zap-before-prepare"),
    _e("v9", "two-vms", "invalidate-before-restore zap-before-prepare"),
    _e("v9", "zap-gadget", "zap-before-prepare"),
    _e("v9", "free-reuse", "zap-before-prepare"),
    _e("v9", "enomem-split", "handout-zapped marker-matches-direct-map zap-before-prepare"),
    _e("v9", "enomem-guest", "handout-zapped marker-matches-direct-map zap-before-prepare"),
    _e("v9", "fallocate-fault", "zap-before-prepare"),
    _e("v9", "lifecycle", "invalidate-before-restore zap-before-prepare"),
    _e("v9", "teardown", "invalidate-before-restore zap-before-prepare"),
    _e("v7", "fault-punch",
       "free-frame-in-direct-map kernel-oops marker-matches-direct-map zap-before-prepare"),
    _e("v7", "ufault-release", "free-frame-in-direct-map marker-matches-direct-map zap-before-prepare"),
    _e("v7", "two-vms", "free-frame-in-direct-map kernel-oops marker-matches-direct-map zap-before-prepare"),
    _e("v7", "zap-gadget", "marker-matches-direct-map zap-before-prepare"),
    _e("v7", "free-reuse", "marker-matches-direct-map zap-before-prepare"),
    _e("v7", "enomem-split", "handout-zapped marker-matches-direct-map zap-before-prepare"),
    _e("v7", "enomem-guest", "handout-zapped marker-matches-direct-map zap-before-prepare"),
    _e("v7", "fallocate-fault", "marker-matches-direct-map zap-before-prepare"),
    _e("v7", "lifecycle",
       "free-frame-in-direct-map kernel-oops marker-matches-direct-map zap-before-prepare"),
    _e("v7", "teardown", "free-frame-in-direct-map marker-matches-direct-map zap-before-prepare"),
    _e("v7", "plain-beside", "zap-only-no-direct-map"),
    _e("v7", "plain-populate", "zap-only-no-direct-map"),
    _e("v7", "gup-pfncache", "kernel-oops zap-only-no-direct-map"),
    _e("noflush", "fault-punch", "handout-flushed", X86),
    _e("noflush", "ufault-release", "handout-flushed", X86),
    _e("noflush", "two-vms", "handout-flushed", X86),
    _e("noflush", "zap-gadget", "gadget-blocked handout-flushed", X86),
    _e("noflush", "free-reuse", "handout-flushed", X86),
    _e("noflush", "fallocate-fault", "handout-flushed", X86),
    _e("noflush", "lifecycle", "handout-flushed", X86),
    _e("noflush", "teardown", "handout-flushed", X86),
    _e("noflush", "mlock-secretmem", "handout-flushed", X86),
    # fc-6.18: from `gmemlab check --design fc-6.18 --all --random --runs 40` on the three
    # profiles, with noflush's catalogued cells where both run the same paths.
    *(_e("fc-6.18", s, "zap-before-prepare handout-flushed", X86) for s in (
        "fault-punch", "ufault-release", "two-vms", "free-reuse", "fallocate-fault", "lifecycle",
        "teardown")),
    _e("fc-6.18", "zap-gadget", "zap-before-prepare gadget-blocked handout-flushed", X86),
    *(_e("fc-6.18", s, "zap-before-prepare", X86) for s in (
        "enomem-split", "enomem-guest", "gup-pfncache")),
    _e("fc-6.18", "mlock-secretmem", "handout-flushed", X86),
    *(_e("fc-6.18", s, "zap-before-prepare", ("arm64",)) for s in (
        "fault-punch", "ufault-release", "two-vms", "zap-gadget", "free-reuse", "fallocate-fault",
        "lifecycle", "teardown", "gup-pfncache")),
    _e("pagecache", "fault-punch", "invalidate-before-restore"),
    _e("pagecache", "ufault-release", "invalidate-before-restore"),
    _e("pagecache", "two-vms", "invalidate-before-restore"),
    _e("pagecache", "free-reuse", "invalidate-before-restore"),
    _e("pagecache", "lifecycle", "invalidate-before-restore"),
    _e("pagecache", "teardown", "invalidate-before-restore"),
    # filemap (found on x86_64 after the designs posted after v12 landed; unmapped breaks
    # nothing there): the same cells as pagecache, and the ENOMEM split and fallocate ones.
    *(_e("filemap", s, "invalidate-before-restore", ("x86_64",)) for s in (
        "fault-punch", "ufault-release", "two-vms", "free-reuse", "enomem-split", "fallocate-fault",
        "lifecycle", "teardown")),
    _e("batch", "fault-punch", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "ufault-release", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "two-vms", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "zap-gadget", "gadget-blocked handout-flushed zapped-frame-flushed", X86),
    _e("batch", "free-reuse", "handout-flushed", X86),
    _e("batch", "fallocate-fault", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "lifecycle", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "teardown", "handout-flushed zapped-frame-flushed", X86),
)
