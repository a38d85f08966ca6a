"""Batched range paths: the per-page kernel paths, many pages at a time.

The generator paths (``gmemlab.model.kvm``, ``gmemlab.model.mm``) define what
the kernel does; the checker interleaves them and the exposure analysis
watches every step.  A guest or VMM touching 64 GiB runs them 16.7M times,
though, which takes hours.  The functions here stand in for them on ranges of
pages, for the operations that dominate a VM's life:

* :mod:`.fault`: a guest's ``Touch``/``Fill``/``Check`` over unmapped gfns of a
  guest_memfd-only memslot (``kvm_mmu_page_fault`` -> ``kvm_gmem_get_pfn``), and
  a VMM access through a guest_memfd mapping (``handle_mm_fault`` ->
  ``kvm_gmem_fault_user_mapping`` -> ``finish_fault``);
* :mod:`.free`: truncation (``truncate_inode_pages_range``: punch-hole and the
  final ``iput``), stage-2 zaps (``kvm_mmu_unmap_gfn_range``: invalidation,
  release, memslot deletion), user PTE zaps (``munmap``) and ``fallocate``
  allocation (``kvm_gmem_allocate``).

They are an optimisation, never a definition: each one leaves exactly the state
the per-page paths would (same frames in the same order, direct map, per-CPU
TLB contents in LRU order, page caches, stage-2 and user page tables,
refcounts, marker, contents, taint, event counts and sequence numbers) and, in
``full`` trace mode, the same events in the same order with the same details;
``tests/scale`` holds them to it; in ``ring`` mode only the events that stay
in the ring are made, the others are counted and numbered in bulk, as in
``off`` mode.  They take only pages whose invariant hooks hold (the
conditions are checked first; a page that could break one is left to the
per-page path, which reports it), and judge them again as they go with
vectorised versions of the ``Invariants.on_*`` hooks, at the same points.

They run only where they can be shown to follow the code in front of them
(:mod:`.gate`): the machine's design and the shared kernel code must be,
function for function, the code ``tests/scale`` held them to (that of a design
in :data:`MIRRORS`: v12, mainline, noflush, filemap, unmapped, v9, v7, batch, zap2m, 6.18, fc-6.18); any
other design, a subclass that overrides anything, a ``--design-file``, a test's
monkeypatch, runs every page through its per-page
path, and ``Machine.gate`` says why.  Then, per call, only when nothing can
tell the difference (:func:`usable`): a path run straight through by
``Machine.run`` without a step hook, fault injection disarmed, an x86 profile
whose CPA does not flush, and ``init_on_alloc`` off.  Each one handles the
longest run of pages it can prove regular (direct-map splits included), and
returns; the caller's per-page loop takes the next page (an error, an MMIO
exit, a folio lock held, a TLB at capacity...) and then tries a batch again.

Kernel loops reach them through ``m.ranges`` (:class:`PerPage` or
:class:`.paths.Batched`), never by testing which one they have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gmemlab.guest import Check, Fill, Touch
    from gmemlab.model.fs import Inode
    from gmemlab.model.kvm.arch import ArchProfile
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.kvm.vcpu import Vcpu
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.filemap import AddressSpace
    from gmemlab.model.mm.memory import BulkOp, Process, UserOp, Vma
    from gmemlab.model.task import KGen

# Pages per batch: large enough to amortise the per-batch work, small enough that the
# arrays of a batch stay in cache and peak memory stays flat.
CHUNK = 1 << 15
# A fault batch starts this small and doubles while it goes straight through, so that
# a run that ends early (a folio that existed, an error) wastes little planning.
FIRST_WINDOW = 4096


def profile_unserved(prof: ArchProfile) -> str:
    """Why no batched path may run on this profile, whatever the code ("" if they may): they
    mirror x86's CPA over order-0 folios."""
    if prof.arch != "x86_64" or not prof.has_set_direct_map or prof.set_direct_map_flushes:
        return f"profile {prof.name}: the batched paths mirror x86's CPA"
    if prof.gmem_thp:
        return f"profile {prof.name}: guest_memfd's 2 MiB folios, which the batched paths do not know"
    return ""


def usable(m: Machine) -> bool:
    """May a batched path stand in for the per-page one on ``m`` now (``m.ranges`` is batched)?"""
    return (not profile_unserved(m.profile) and not m.faults.armed() and not m.config.init_on_alloc
            and ("cpa_lock",) not in m.locks.held)


@dataclass(frozen=True, slots=True)
class Mirror:
    """What the per-page code of a pinned design does, in the terms the batched paths take.

    Each pinned design (:data:`MIRRORS`) is one setting of these; the gate lets a
    path run with a setting only while the code in front of it is, function for
    function, the code ``tests/scale`` held that setting to.
    """

    name: str
    # The fault zaps a NO_DIRECT_MAP folio after zeroing it and sets the marker; the free path
    # restores a marked folio after the invalidate (v12 10/16).
    zaps: bool
    # folio_zap_direct_map() flushes the zapped page (v12 02/16); without it the zeroing CPU's
    # translation outlives the zap (Firecracker's patch 0039, guest_memfd_tlb_flush=false).
    flushes: bool = True
    # The page cache does it instead, for every folio of an AS_NO_DIRECT_MAP mapping: zero and
    # zap before the insertion, restore and zero after the removal, no marker
    # (prep_{add,remove}_unmapped_folio(), designs.filemap_nodm).
    in_page_cache: bool = False
    # ... with ALLOC_UNMAPPED and the mermap: such folios come off the unmapped free list
    # (already out of the direct map), are zeroed through the mermap, and go back to that
    # list on free, never restored (designs.unmapped_alloc).
    unmapped_alloc: bool = False
    # The guest fault zeroes and prepares a folio that is not uptodate, then zaps
    # (kvm_gmem_prepare_folio() of the v7..v9 bases and of v6.18; bugs 3 and 13).
    prepare_first: bool = False
    # The marker is set before the zap (v9 bug 4).
    marker_first: bool = False
    # ->free_folio restores, then invalidates (v7..v9, bug 13).
    restore_first: bool = False
    # v7: the marker is "set" with '&' (never set), the flush follows it in
    # kvm_gmem_folio_zap_direct_map(), and nothing is ever restored (v7 06/12, bug 1).
    marker_and: bool = False
    # The zap's flush is deferred: queued, one flush_tlb_kernel_range() over the queue's span
    # when it holds `batch` folios (designs.batched).
    deferred_flush: bool = False
    # A new folio whose whole 2 MiB file block is absent (and inside i_size) comes with its
    # block: an order-9 allocation zeroed, inserted, zapped with one 2M CPA and one flush,
    # marked (designs.zap2m).
    fault_around: bool = False


MIRRORS: dict[str, Mirror] = {
    "v12": Mirror("v12", zaps=True),
    "base": Mirror("base", zaps=False),
    "noflush": Mirror("noflush", zaps=True, flushes=False),
    "filemap": Mirror("filemap", zaps=True, in_page_cache=True),
    "unmapped": Mirror("unmapped", zaps=True, in_page_cache=True, unmapped_alloc=True),
    "v9": Mirror("v9", zaps=True, prepare_first=True, marker_first=True, restore_first=True),
    "v7": Mirror("v7", zaps=True, prepare_first=True, restore_first=True, marker_and=True),
    "6.18": Mirror("6.18", zaps=False, prepare_first=True),
    "fc-6.18": Mirror("fc-6.18", zaps=True, flushes=False, prepare_first=True),
    "batch": Mirror("batch", zaps=True, flushes=False, deferred_flush=True),
    "zap2m": Mirror("zap2m", zaps=True, fault_around=True),
}
MAINLINE = MIRRORS["base"]


def zaps(m: Machine) -> bool:
    """Does the path running now mirror a design that zaps NO_DIRECT_MAP folios (v12), or
    mainline, which leaves the direct map alone?"""
    return m.ranges.mirror.zaps


def mirror(m: Machine) -> Mirror:
    """The per-page code the path running now stands for."""
    return m.ranges.mirror


class PerPage:
    """No batched paths: every kernel loop runs its per-page body for every page.

    Each method is a loop head of a kernel path; it answers "nothing done here",
    so the caller's per-page body takes the next page.
    """

    __slots__ = ("mirror",)

    def __init__(self) -> None:
        self.mirror = MAINLINE  # what the batched path running now mirrors (see paths.Batched)

    def guest_access(self, m: Machine, vcpu: Vcpu, op: Touch | Fill | Check) -> bool:
        """``_run_touch()``/``_run_range()``: True when the caller should look at ``vcpu.off`` again."""
        return False

    def user_access(self, m: Machine, proc: Process, addr: int, length: int, done: int, write: bool,
                    op: UserOp, bulk: BulkOp | None) -> tuple[int, bool]:
        """``walk_user()``: (bytes done, look again)."""
        return 0, False

    def unmap_gfn_range(self, m: Machine, kvm: Kvm, start: int, end: int, fn: str) -> int | None:
        """``kvm_mmu_unmap_gfn_range()``: the entries zapped, or None (not done)."""
        return None

    def truncate(self, m: Machine, mapping: AddressSpace, start: int, end: int | None) -> int | None:
        """``truncate_inode_pages_range()``: the folios removed, or None (not done)."""
        return None

    def zap_user_range(self, m: Machine, vma: Vma) -> bool:
        """``do_munmap()``'s ``zap_pte_range()`` over the whole VMA: done or not."""
        return False

    def allocate(self, m: Machine, inode: Inode, start: int, end: int,
                 one: Callable[[int], KGen[int]]) -> int | None:
        """``kvm_gmem_allocate()``'s loop: its return value, or None (not done)."""
        return None


PER_PAGE = PerPage()
