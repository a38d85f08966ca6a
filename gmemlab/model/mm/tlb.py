"""Per-CPU TLBs for the direct map, kernel TLB flushes, and kernel accesses.

Models the hardware a kernel access goes through: a TLB lookup and, on a miss,
a page walk that fills the TLB with the leaf it found (1G, 2M or 4K) in the
same atomic step (``modeling-notes.md``: a fill is atomic with its page-table
read; splitting them would invent stale entries real hardware cannot make).
A cached translation stays usable after its PTE is cleared until a flush
removes it: that is the window a missing flush leaves.

Flushes model ``arch/x86/mm/tlb.c``: ``flush_tlb_kernel_range()`` runs
``on_each_cpu()`` (an IPI to every other online CPU), invalidating page by page
up to ``tlb_single_page_flush_ceiling`` (33) pages and everything above (arm64:
``__flush_tlb_kernel_range()`` up to MAX_DVM_OPS, 512 pages); an
``INVLPG`` of an address drops a large entry covering it too.
``flush_tlb_all()`` drops everything.  With broadcast invalidation (arm64
``TLBI ...IS``, AMD ``INVLPGB``) no IPIs are sent.  Each CPU's invalidation is
its own step, so a gadget on a CPU not yet reached can still read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from gmemlab.model.mm.direct_map import LEVEL_1G, LEVEL_2M, LEVEL_4K, LEVEL_NAMES
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine



class Tlbs:
    __slots__ = ("capacity", "entries", "ncpus")

    def __init__(self, ncpus: int, capacity: int = 1536) -> None:
        if ncpus < 1:
            raise ValueError("need at least one CPU")
        self.ncpus = ncpus
        self.capacity = capacity
        # Per CPU: (level, first pfn of the leaf) in LRU order (oldest first).  An OrderedDict:
        # a plain dict finds its oldest key in time that grows with the keys deleted before it.
        self.entries: list[OrderedDict[tuple[int, int], None]] = [OrderedDict() for _ in range(ncpus)]

    def lookup(self, cpu: int, pfn: int) -> tuple[int, int] | None:
        t = self.entries[cpu]
        for key in ((LEVEL_4K, pfn), (LEVEL_2M, pfn & ~511), (LEVEL_1G, pfn & ~0x3FFFF)):
            if key in t:
                t.move_to_end(key)  # the LRU tail
                return key
        return None

    def fill(self, cpu: int, level: int, base: int) -> None:
        t = self.entries[cpu]
        t[(level, base)] = None
        if len(t) > self.capacity:
            t.popitem(last=False)

    def covers(self, cpu: int, pfn: int) -> bool:
        t = self.entries[cpu]
        return (LEVEL_4K, pfn) in t or (LEVEL_2M, pfn & ~511) in t or (LEVEL_1G, pfn & ~0x3FFFF) in t

    def cached_anywhere(self, pfn: int) -> bool:
        return any(self.covers(c, pfn) for c in range(self.ncpus))

    def cpus_caching(self, pfn: int) -> list[int]:
        return [c for c in range(self.ncpus) if self.covers(c, pfn)]

    def invalidate(self, cpu: int, lo: int, hi: int) -> int:
        """INVLPG each page of [lo, hi); returns the number of entries dropped."""
        t = self.entries[cpu]
        dropped = 0
        for pfn in range(lo, hi):
            for key in ((LEVEL_4K, pfn), (LEVEL_2M, pfn & ~511), (LEVEL_1G, pfn & ~0x3FFFF)):
                if key in t:
                    del t[key]
                    dropped += 1
        return dropped

    def invalidate_all(self, cpu: int) -> int:
        n = len(self.entries[cpu])
        self.entries[cpu].clear()
        return n

    def evict(self, cpu: int, pfn: int) -> bool:
        """Drop the entry covering ``pfn`` (capacity pressure, a context switch...)."""
        t = self.entries[cpu]
        for key in ((LEVEL_4K, pfn), (LEVEL_2M, pfn & ~511), (LEVEL_1G, pfn & ~0x3FFFF)):
            if key in t:
                del t[key]
                return True
        return False

    def state(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        return tuple(tuple(sorted(t)) for t in self.entries)


def _flush_each_cpu(m: Machine, lo: int, hi: int, full: bool, fn: str) -> KGen[int]:
    """``on_each_cpu(do_kernel_range_flush / do_flush_tlb_all)``: this CPU, then the others."""
    tlbs = m.tlb
    me = m.current.cpu
    order = [me] + [c for c in range(tlbs.ncpus) if c != me]
    dropped = 0
    for cpu in order:
        yield ("tlb", cpu)
        dropped += tlbs.invalidate_all(cpu) if full else tlbs.invalidate(cpu, lo, hi)
    ipis = 0 if m.profile.tlb_broadcast else tlbs.ncpus - 1
    if ipis:
        m.trace.count("ipi", ipis)
    m.trace.emit(fn, "tlb_flush", lo, {"pages": hi - lo, "full": full, "ipis": ipis,
                                       "dropped": dropped})
    return dropped


def flush_tlb_kernel_range(m: Machine, lo: int, hi: int, caller: str) -> KGen[None]:
    """``flush_tlb_kernel_range(start, end)`` over the direct-map addresses of [lo, hi)."""
    m.trace.count("flush_tlb_kernel_range")
    full = hi - lo > m.profile.tlb_flush_ceiling
    yield from _flush_each_cpu(m, lo, hi, full, caller)


def flush_tlb_all(m: Machine, caller: str) -> KGen[None]:
    """``flush_tlb_all()``."""
    m.trace.count("flush_tlb_all")
    yield from _flush_each_cpu(m, 0, 0, True, caller)


def kernel_access(m: Machine, pfn: int, fn: str, *, write: bool) -> KGen[None]:
    """An architectural kernel access to ``pfn`` through the direct map on this CPU.

    A TLB hit succeeds even if the PTE has since been cleared; a miss walks the
    direct map and fills the TLB, or oopses on a not-present entry.  A write that
    gets through is then judged against the frame's owner (SNP's RMP, a TD).
    Cache maintenance (``clflush_cache_range()``) is a read here: it needs a
    present translation and faults like a load on a not-present one.
    """
    cpu = m.current.cpu
    yield ("tlb", (cpu, pfn))
    tlbs = m.tlb
    hit = tlbs.lookup(cpu, pfn)
    if hit is not None:
        how = "hit " + LEVEL_NAMES[hit[0]]
    else:
        leaf = m.dmap.leaf(pfn)
        if leaf is None or not leaf[2]:
            m.trace.emit(fn, "oops", pfn, {"access": "write" if write else "read"})
            m.inv.on_kernel_access(pfn, fn, write)
            return
        tlbs.fill(cpu, leaf[0], leaf[1])
        how = "fill " + LEVEL_NAMES[leaf[0]]
    m.trace.emit(fn, "kernel_write" if write else "kernel_read", pfn, {"tlb": how})
    if write and m.inv.enabled:
        m.inv.on_host_write(pfn, fn)


def speculative_read(m: Machine, cpu: int, pfn: int) -> KGen[bool]:
    """A transient-execution gadget on ``cpu`` loading from ``__va(pfn)``.

    Succeeds through a cached translation or a present entry (filling the TLB,
    as the walker does speculatively); a not-present entry stops it silently.
    """
    yield ("tlb", (cpu, pfn))
    tlbs = m.tlb
    how: str | None = None
    if tlbs.lookup(cpu, pfn) is not None:
        how = "tlb"
    else:
        leaf = m.dmap.leaf(pfn)
        if leaf is not None and leaf[2]:
            tlbs.fill(cpu, leaf[0], leaf[1])
            how = "walk"
    secret = m.mem.secret_bytes(pfn) if how else 0
    m.trace.emit("gadget", "speculative_read", pfn,
                 {"cpu": cpu, "reached": how or "blocked", "secret_bytes": secret})
    if how and m.inv.enabled:
        m.inv.on_gadget_read(pfn, cpu)
    return how is not None
