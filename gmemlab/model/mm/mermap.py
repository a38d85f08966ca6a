"""The mermap: per-CPU, mm-local temporary kernel mappings (``mm/mermap.c``).

Brendan Jackman's "mermap" (formerly "ephmap"), "x86/mm: introduce the mermap"
in the ALLOC_UNMAPPED series (v2 ``20260320-page_alloc-unmapped-v2-0-28bf1bd54f41@google.com``;
the code read is ``bjackman/linux`` ``mm/mermap.c`` at ``40bd0e25c484``).  What
the model keeps of it, function by function:

* ``mermap_get()`` -> ``mermap_alloc()``: a "stupid" bump allocator over this
  CPU's region of the current mm's mermap area.  Freed space is not reused
  until the region runs out; then this CPU's TLB is flushed
  (``arch_mermap_flush_tlb()``, local: no IPI) and allocation restarts at the
  base.  ``__mermap_get()`` then writes the PTE (``apply_to_existing_page_range``).
* ``mermap_put()`` -> ``__mermap_put()``: the PTE is replaced by a not-present
  sentinel, *without* a TLB flush: the CPU that used the mapping may keep a
  translation to the frame until a flush.  "The caller must also perform a
  full TLB flush of the region before freeing the pages that have been mapped
  here."

The page cache's use of it (``mermap_clear_folio()``, ``AS_MERMAP_STALE`` and
``mapping_check_flush_mermap()``) is in ``gmemlab.model.designs.unmapped_alloc``.

Choices of the model where the code read says nothing (each marked in the
docstring that makes it): the region's size (:data:`MERMAP_CPU_SLOTS`), and what
the remote flush of ``mapping_check_flush_mermap()`` reaches.  The mermap is
mm-local; the model has one kernel address space, so a translation is
reachable from its CPU whatever process runs there (the gadget model of
``gmemlab.expose``): an upper bound on the real reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine

# MERMAP_CPU_REGION_SIZE / PAGE_SIZE.  Not in the code read (it is an x86 define in a
# header not stored here): our choice is one page table's worth (2 MiB), which is what
# mermap_mm_init() preallocates per CPU at the least.
MERMAP_CPU_SLOTS = 512


@dataclass(slots=True)
class Mermap:
    """``struct mermap_cpu`` for every CPU: live mappings, cached translations, bump pointer.

    ``ptes[cpu]``: frames this CPU's region maps now (``alloc->in_use``).
    ``tlb[cpu]``: frames this CPU may still translate through its region: every
    frame it mapped since its last flush (a kernel access fills the TLB, and
    ``mermap_put()`` does not flush).  ``used[cpu]``: slots handed out since the
    last flush (``mc->next_addr - mermap_cpu_base(cpu)``).
    """

    ptes: dict[int, list[int]] = field(default_factory=dict)
    tlb: dict[int, list[int]] = field(default_factory=dict)
    used: dict[int, int] = field(default_factory=dict)

    def cpus_reaching(self, pfn: int) -> list[int]:
        """CPUs with a kernel translation to ``pfn`` through the mermap (mapped or stale)."""
        return sorted({cpu for cpu, frames in self.ptes.items() if pfn in frames}
                      | {cpu for cpu, frames in self.tlb.items() if pfn in frames})

    def stale(self) -> int:
        """Cached translations whose mapping was already put (flush pending)."""
        return sum(len(set(frames) - set(self.ptes.get(cpu, ())))
                   for cpu, frames in self.tlb.items())


def mermap_flush_tlb(m: Machine, mm: Mermap, cpu: int, fn: str) -> KGen[int]:
    """``mermap_flush_tlb()`` -> ``arch_mermap_flush_tlb()`` on ``cpu``: its cached translations go.

    Returns the number dropped.  One step per translation dropped, so an observer
    re-judges each frame as its last translation goes.
    """
    cached = mm.tlb.get(cpu, [])
    live = mm.ptes.get(cpu, [])
    dropped = 0
    for pfn in list(cached):
        if pfn in live:
            continue  # still mapped: the walker would refill it at once
        yield ("mermap", (cpu, pfn))
        cached.remove(pfn)
        dropped += 1
    m.trace.emit(fn, "mermap_flush", -1, {"cpu": cpu, "dropped": dropped})
    return dropped


def mermap_get(m: Machine, mm: Mermap, pfn: int, fn: str) -> KGen[None]:
    """``mermap_get(page, PAGE_SIZE, prot)`` on this CPU: map ``pfn`` in this CPU's region.

    Models ``mermap_alloc()`` (wrap-around with a local flush when the region is
    used up) and the PTE write of ``__mermap_get()``.  The model never fails it:
    a region of :data:`MERMAP_CPU_SLOTS` slots always has room after the flush for
    the one page at a time the page cache maps (``mermap_get_reserved()`` is the
    kernel's never-failing variant).
    """
    cpu = m.current.cpu
    if mm.used.get(cpu, 0) + 1 > MERMAP_CPU_SLOTS - len(mm.ptes.get(cpu, ())):
        m.trace.count("mermap_flush_local")
        yield from mermap_flush_tlb(m, mm, cpu, "mermap_alloc")
        mm.used[cpu] = len(mm.ptes.get(cpu, ()))
    yield ("mermap", (cpu, pfn))
    mm.used[cpu] = mm.used.get(cpu, 0) + 1
    mm.ptes.setdefault(cpu, []).append(pfn)
    cached = mm.tlb.setdefault(cpu, [])
    if pfn not in cached:
        cached.append(pfn)  # the access through the mapping fills this CPU's TLB
    m.trace.emit(fn, "mermap_map", pfn, {"cpu": cpu})


def mermap_put(m: Machine, mm: Mermap, pfn: int, fn: str) -> KGen[None]:
    """``mermap_put()``: the PTE goes (a not-present sentinel); the TLB is not flushed."""
    cpu = m.current.cpu
    yield ("mermap", (cpu, pfn))
    mm.ptes[cpu].remove(pfn)
    m.trace.emit(fn, "mermap_unmap", pfn, {"cpu": cpu})
