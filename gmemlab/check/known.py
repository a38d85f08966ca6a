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
    profile: str = "x86_64"


WHAT_IF = "x86_64-what-if-snp-tdx"  # the series' SNP/TDX exclusion lifted (not a kernel)

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
             "v9", "enomem-guest", ("marker-matches-direct-map",),
             "handout-zapped", 22, ("kvm_gmem_get_pfn", "split_large_page", "kvm_mmu_page_fault")),
    KnownBug("v9-marker-before-zap", "v9: marker set before the zap, so a failed zap (ENOMEM at "
             "the split) leaves the folio marked but still in the direct map",
             "v9", "enomem-split", (), "marker-matches-direct-map", 16,
             ("kvm_gmem_folio_zap_direct_map", "set_marker", "split_large_page", "fault_fail")),
    KnownBug("noflush-stale-tlb", "no TLB flush after the zap: a stale translation survives",
             "noflush", "zap-gadget", (), "handout-flushed", 19,
             ("kvm_gmem_get_pfn", "kvm_mmu_page_fault")),
    KnownBug("noflush-stale-read", "no TLB flush: a gadget on the other CPU reads the guest's "
             "page through the stale translation after the zap",
             "noflush", "zap-gadget", ("handout-flushed",), "gadget-blocked", 23,
             ("speculative_read",)),
    KnownBug("v9-tdx-clflush-oops", "v9 offers NO_DIRECT_MAP to TDs: the first private fault "
             "zaps the page, then tdh_mem_page_aug()'s tdx_clflush_page() flushes it through the "
             "direct map and oopses (why v10 excludes KVM_X86_TDX_VM)",
             "v9", "tdx-fault-punch", (), "kernel-oops", 22,
             ("kvm_gmem_get_pfn", "tdx_sept_set_private_spte", "tdh_mem_page_aug")),
    KnownBug("what-if-v12-snp-invalidate-oops", "SNP let through (what if): ->free_folio's "
             "sev_gmem_invalidate() clflushes through __va() a page v12 restores only after it, "
             "and oopses (why v12 excludes KVM_X86_SNP_VM; v9's restore-then-invalidate would not)",
             "v12", "snp-fault-punch", (), "kernel-oops", 28,
             ("kvm_gmem_free_folio", "sev_gmem_invalidate"), WHAT_IF),
    KnownBug("what-if-filemap-snp-rmp-write", "SNP let through (what if): the posted page-cache "
             "shape zeroes a removed folio before ->free_folio gives it back to the host: a "
             "kernel write to an RMP-assigned page",
             "filemap", "snp-fault-punch", (), "host-write-guest-owned", 28,
             ("prep_remove_unmapped_folio", "folio_zero_segment"), WHAT_IF),
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

X86 = ("x86_64", "x86_64-kvm_pvm-6.18", WHAT_IF)  # arm64's set_memory_valid() flushes by itself
COCO_HOSTS = ("x86_64", WHAT_IF)  # the profiles that run SNP and TDX VMs
WHY = {
    "v9": "v9 ignores the zap's error on guest faults and sets the marker before the zap (§8 "
          "bugs 3, 4), which the ENOMEM scenarios show; it offers NO_DIRECT_MAP to TDs, whose "
          "tdh_mem_page_aug() clflushes the zapped page through the direct map (the reason v10 "
          "excludes TDX).  Its <= v11 order (prepare then zap, restore then invalidate) is "
          "reported as rationale only: on SNP it is the order that does not fault",
    "v7": "v7: the marker set with '&' is never set, so ->free_folio never restores and the "
          "frame's next kernel user oopses (§8 bug 1); the zap ignores the creation flag, so "
          "files without NO_DIRECT_MAP leave the direct map too (§8 bug 2); on SNP and TDX VMs "
          "(v7 excludes none) the arch hooks' clflush through the zapped direct map oopses",
    "noflush": "no kernel TLB flush after the zap (§8 bug 10, Firecracker's opt-out): a stale "
               "translation outlives the handout; on arm64 set_memory_valid() flushes anyway",
    "fc-6.18": "Firecracker's 6.18 port: 6.18's guest fault prepares (zero, arch prepare) a folio "
               "that is not uptodate and only then zaps (0032), so zap-before-prepare, the "
               "series' stated ordering, does not hold (harmless for the default VM, whose arch "
               "prepare does nothing); no flush after the zap (0039's default), as noflush; on "
               "arm64 set_memory_valid() flushes anyway",
    "batch": "flushes batched until later: a folio is handed out (or unlocked) while another "
             "CPU still translates to it; on arm64 set_memory_valid() flushes anyway",
    "what-if": "what if SNP and TDX VMs got NO_DIRECT_MAP (profile x86_64-what-if-snp-tdx): "
               "sev_gmem_invalidate() (SNP, ->free_folio) and tdh_mem_page_aug() (TDX, the first "
               "private fault) clflush the page through the direct map while it is zapped, and "
               "a design that zaps at insertion oopses in sev_gmem_post_populate()'s copy "
               "through kmap_local_pfn(): the kernel-oops is why the series excludes them",
    "what-if-filemap": "what if SNP got NO_DIRECT_MAP: the posted page-cache shape zeroes a "
                       "removed folio before ->free_folio's sev_gmem_invalidate() gives it back "
                       "to the host, a kernel write to an RMP-assigned page (RMP #PF)",
}


def _e(design: str, scenario: str, breaks: str, profiles: tuple[str, ...] = ALL_PROFILES,
       why: str | None = None) -> Expected:
    return Expected(design, scenario, frozenset(breaks.split()), WHY[why or design], profiles)


def _what_if(design: str, breaks: dict[str, str], why: str = "what-if") -> tuple[Expected, ...]:
    return tuple(_e(design, sc, b, (WHAT_IF,), why) for sc, b in breaks.items())


_OOPS_ALL = {"snp-fault-punch": "kernel-oops", "snp-populate": "kernel-oops",
             "tdx-fault-punch": "kernel-oops"}
_V7_COCO = {"snp-fault-punch": "marker-matches-direct-map kernel-oops",
            "snp-populate": "marker-matches-direct-map kernel-oops",
            "tdx-fault-punch": "marker-matches-direct-map kernel-oops free-frame-in-direct-map"}
_BATCHED_COCO = dict.fromkeys(_OOPS_ALL, "zapped-frame-flushed handout-flushed kernel-oops")


BBML2 = ("arm64-bbml2",)
# arch/arm64/mm/pageattr.c update_range_prot(): "if (WARN_ON_ONCE(ret)) return ret;" after
# split_kernel_leaf_mapping() -- an ENOMEM while splitting the linear map is a WARN splat (a
# panic with panic_on_warn) on arm64 with BBML2_NOABORT, where x86's CPA returns it quietly.
WHY_BBML2 = ("arm64 with BBML2_NOABORT: update_range_prot() WARNs when split_kernel_leaf_mapping() "
             "fails with ENOMEM, whatever the design")


def _bbml2(design: str, scenario: str, breaks: str = "") -> Expected:
    """An ENOMEM cell on arm64-bbml2: the WARN, and what the design breaks there anyway."""
    why = f"{WHY_BBML2}; {WHY[design]}" if breaks else WHY_BBML2
    return Expected(design, scenario, frozenset(("no-warn " + breaks).split()), why, BBML2)


# Found by ``gmemlab check --all`` on every design, scenario and profile that offers the flag
# (x86_64, x86_64-kvm_pvm-6.18, arm64, arm64-bbml2, and the what-if profile for the SNP/TDX
# scenarios); falloc, zap2m, folio2m and unmapped break nothing on real hosts but
# arm64-bbml2's WARN.  The cells of free-reuse that fail do so in its setup (the guest's first
# fault), before any actor runs.  The series' orders
# (zap-before-prepare, invalidate-before-restore, guest-owned-not-host-mapped) are rationale,
# reported but never expected or failed: v9 and filemap break nothing on the
# default VM type, where no arch hook acts.
EXPECTED: tuple[Expected, ...] = (
    # arm64-bbml2 (first: the first entry that matches a cell is its own).  v7's
    # handout-flushed there was found by gmemlab check --all and not analysed further.
    *(_bbml2(d, sc) for d in ("v12", "noflush", "batch", "falloc", "zap2m", "folio2m", "filemap")
      for sc in ("enomem-split", "enomem-guest")),
    _bbml2("v9", "enomem-split", "handout-zapped marker-matches-direct-map"),
    _bbml2("v9", "enomem-guest", "handout-zapped marker-matches-direct-map"),
    _bbml2("v7", "enomem-split", "handout-flushed handout-zapped marker-matches-direct-map"),
    _bbml2("v7", "enomem-guest", "handout-zapped marker-matches-direct-map"),
    _e("v9", "enomem-split", "handout-zapped marker-matches-direct-map"),
    _e("v9", "enomem-guest", "handout-zapped marker-matches-direct-map"),
    _e("v9", "tdx-fault-punch", "kernel-oops", COCO_HOSTS),
    _e("v7", "fault-punch", "free-frame-in-direct-map kernel-oops marker-matches-direct-map"),
    _e("v7", "ufault-release", "free-frame-in-direct-map marker-matches-direct-map"),
    _e("v7", "two-vms", "free-frame-in-direct-map kernel-oops marker-matches-direct-map"),
    _e("v7", "zap-gadget", "marker-matches-direct-map"),
    _e("v7", "free-reuse", "marker-matches-direct-map"),
    _e("v7", "enomem-split", "handout-zapped marker-matches-direct-map"),
    _e("v7", "enomem-guest", "handout-zapped marker-matches-direct-map"),
    _e("v7", "fallocate-fault", "marker-matches-direct-map"),
    _e("v7", "lifecycle", "free-frame-in-direct-map kernel-oops marker-matches-direct-map"),
    _e("v7", "teardown", "free-frame-in-direct-map marker-matches-direct-map"),
    _e("v7", "plain-beside", "zap-only-no-direct-map"),
    _e("v7", "plain-populate", "zap-only-no-direct-map"),
    _e("v7", "gup-pfncache", "kernel-oops zap-only-no-direct-map"),
    *(_e("v7", sc, b, COCO_HOSTS) for sc, b in _V7_COCO.items()),
    _e("noflush", "fault-punch", "handout-flushed", X86),
    _e("noflush", "ufault-release", "handout-flushed", X86),
    _e("noflush", "two-vms", "handout-flushed", X86),
    _e("noflush", "zap-gadget", "gadget-blocked handout-flushed", X86),
    _e("noflush", "free-reuse", "handout-flushed", X86),
    _e("noflush", "fallocate-fault", "handout-flushed", X86),
    _e("noflush", "lifecycle", "handout-flushed", X86),
    _e("noflush", "teardown", "handout-flushed", X86),
    _e("noflush", "mlock-secretmem", "handout-flushed", X86),
    # fc-6.18: from `gmemlab check --design fc-6.18 --all` on the three profiles, with
    # noflush's catalogued cells where both run the same paths (its prepare-then-zap is the
    # series' rationale, reported, not expected).
    *(_e("fc-6.18", s, "handout-flushed", X86) for s in (
        "fault-punch", "ufault-release", "two-vms", "free-reuse", "fallocate-fault", "lifecycle",
        "teardown", "mlock-secretmem")),
    _e("fc-6.18", "zap-gadget", "gadget-blocked handout-flushed", X86),
    _e("batch", "fault-punch", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "ufault-release", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "two-vms", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "zap-gadget", "gadget-blocked handout-flushed zapped-frame-flushed", X86),
    _e("batch", "free-reuse", "handout-flushed", X86),
    _e("batch", "fallocate-fault", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "lifecycle", "handout-flushed zapped-frame-flushed", X86),
    _e("batch", "teardown", "handout-flushed zapped-frame-flushed", X86),
    # The what-if profile: what the series' VM-type exclusion keeps from happening.
    *(x for d in ("v12", "falloc", "zap2m", "unmapped") for x in _what_if(d, _OOPS_ALL)),
    *_what_if("noflush", dict.fromkeys(_OOPS_ALL, "handout-flushed kernel-oops")),
    *_what_if("batch", _BATCHED_COCO),
    *_what_if("filemap", {"snp-populate": "kernel-oops", "tdx-fault-punch": "kernel-oops"}),
    *_what_if("filemap", {"snp-fault-punch": "host-write-guest-owned"}, "what-if-filemap"),
)
