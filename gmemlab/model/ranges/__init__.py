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

They run only when nothing can tell the difference (:func:`usable`): a path run
straight through by ``Machine.run`` without a step hook, fault injection
disarmed, the exact designs whose code they mirror (``v12`` and ``base``; other
designs, even subclasses of v12, take the per-page paths), an x86 profile
whose CPA does not flush, and ``init_on_alloc`` off.  Each one handles the
longest run of pages it can prove regular (direct-map splits included), and
returns; the caller's per-page loop takes the next page (an error, an MMIO
exit, a folio lock held, a TLB at capacity...) and then tries a batch again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmemlab.model.designs.base import Design
from gmemlab.model.designs.v12 import V12

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

# Pages per batch: large enough to amortise the per-batch work, small enough that the
# arrays of a batch stay in cache and peak memory stays flat.
CHUNK = 1 << 15
# A fault batch starts this small and doubles while it goes straight through, so that
# a run that ends early (a folio that existed, an error) wastes little planning.
FIRST_WINDOW = 4096


def usable(m: Machine) -> bool:
    """May a batched path stand in for the per-page one on ``m`` now?"""
    if not m.range_paths_active or type(m.design) not in (V12, Design):
        return False
    prof = m.profile
    return (prof.arch == "x86_64" and prof.has_set_direct_map and not prof.set_direct_map_flushes
            and not m.faults.armed() and not m.config.init_on_alloc
            and ("cpa_lock",) not in m.locks.held)


def zaps(m: Machine) -> bool:
    """Does the design zap NO_DIRECT_MAP folios (v12), or leave the direct map alone (base)?"""
    return type(m.design) is V12
