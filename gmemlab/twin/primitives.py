"""The prices of the cost model's primitives, measured through what the running kernel offers.

The cost model (:mod:`gmemlab.cost.model`) prices a direct-map split, a PTE
change, the flushing CPU's own invalidation and a page copy.  A kernel without
guest_memfd's NO_DIRECT_MAP still runs each of them on some path a process can
drive and time:

* **A direct-map split**: ``memfd_secret``'s fault removes its page from the
  direct map (``secretmem_fault()`` -> ``set_direct_map_invalid_noflush()``), and
  when the page lies in a 2 MiB (1 GiB) region still mapped by one leaf, CPA
  splits it first (``__change_page_attr()`` -> ``split_large_page()``: a
  page-table page allocated and filled, installed, then ``flush_tlb_all()``).
  Each fault is timed alone, and ``/proc/vmstat``'s
  ``direct_map_level2_splits`` / ``direct_map_level3_splits`` are read after it,
  so every fault is known to have split or not: the price of a split is the
  median split fault less the median fault that did not split.  It includes the
  page-table page's allocation and the ``flush_tlb_all()`` IPI round, which the
  calibration takes out again (the model counts that flush as a ``tlb_flush``).
* **A PTE change and the local flush**: ``mprotect()`` of populated anonymous
  memory rewrites its PTEs (``change_pte_range()``) and flushes the range
  (``flush_tlb_mm_range()``: one ``INVLPG`` per page up to
  ``tlb_single_page_flush_ceiling`` = 33 pages, a full local flush beyond; no
  IPI, the process runs on one CPU).  Each time is taken less the same
  ``mprotect()`` of an unpopulated range (the VMA work without PTEs or flush).
  Between 256 and 512 pages, both full flushes, the slope is one PTE change;
  one page costs one PTE change plus one ``INVLPG``, the local flush.  A user PTE
  change stands for CPA's kernel one (``__change_page_attr()`` also takes
  ``cpa_lock`` and walks with ``lookup_address()``): a lower bound, said so.
* **A page copy**: ``memmove()`` of 64 MiB between two populated buffers (larger
  than the last-level cache), per 4 KiB page: the VMM copying guest memory.

Times are medians over repetitions, in ns, pinned to one CPU as
:mod:`gmemlab.twin.measure` does.  JSON (schema ``gmemlab.primitives/1``)::

    {"schema": "gmemlab.primitives/1",
     "machine": {"kernel": str, "cpus": int, "pinned_cpu": int | null},
     "split_2m": {"fault_ns": {median, min, max}, "split_fault_ns": STATS, "splits": int, "faults": int,
                  "extra_ns": float} | {"unavailable": str},
     "mprotect": {"pages": [int, ...], "delta_ns": {str(pages): float, ...},
                  "pte_change_ns": float, "flush_local_ns": float} | {..., "unavailable": str},
     "copy_page_ns": STATS,
     "provenance": {...}}
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from gmemlab import uapi
from gmemlab.twin import _sys, native
from gmemlab.twin.host import TwinHost
from gmemlab.twin.measure import pinned, stats

SCHEMA = "gmemlab.primitives/1"
VMSTAT = "/proc/vmstat"
SPLIT_COUNTERS = ("direct_map_level2_splits", "direct_map_level3_splits")
MPROTECT_PAGES = (1, 256, 512)
COPY_BYTES = 64 << 20
BALLAST = 64 << 20
Progress = Callable[[str], None]


def read_splits(path: str = VMSTAT) -> int:
    """2 MiB plus 1 GiB direct-map splits so far (``/proc/vmstat``); -1 if the kernel has no counter."""
    found = -1
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in SPLIT_COUNTERS:
                found = max(found, 0) + int(value)
    return found


def measure_split(host: TwinHost, pages: int, reps: int) -> dict[str, Any]:
    """memfd_secret faults, each timed alone and classified by whether it split the direct map.

    Recently freed frames come back first (the per-CPU lists), and those of an earlier
    memfd_secret run lie in regions it split already: a populated anonymous ballast of
    :data:`BALLAST` takes them, and every rep's file stays open until the end, so each rep
    faults frames no run here has used.  What it splits stays split (x86 does not merge
    the direct map back): at most ``reps * pages / 512`` 2 MiB regions of this host.
    """
    if read_splits() < 0:
        return {"unavailable": f"{VMSTAT} has no direct_map_level2_splits"}
    touch = native.touch_pages()
    plain: list[float] = []
    split: list[float] = []
    with ExitStack() as stack:
        ballast = host.mmap_anonymous(BALLAST)
        stack.callback(ballast.munmap)
        touch(ballast.addr, BALLAST // uapi.PAGE_SIZE)
        for _ in range(reps):
            f = host.memfd_secret()
            stack.callback(f.close)
            f.ftruncate(pages * uapi.PAGE_SIZE)
            mapping = f.mmap(pages * uapi.PAGE_SIZE)
            stack.callback(mapping.munmap)
            for i in range(pages):
                before = read_splits()
                t0 = time.perf_counter_ns()
                touch(mapping.addr + i * uapi.PAGE_SIZE, 1)
                t1 = time.perf_counter_ns()
                (split if read_splits() != before else plain).append(float(t1 - t0))
    # Thousands of plain faults: their samples would only bulk up the committed calibration data.
    plain_stats = {k: v for k, v in stats(plain).items() if k != "samples"}
    out: dict[str, Any] = {"fault_ns": plain_stats, "splits": len(split), "faults": len(plain) + len(split)}
    if not split:
        out["unavailable"] = "no fault split the direct map (every region these pages used was split before)"
        return out
    out["split_fault_ns"] = stats(split)
    out["extra_ns"] = statistics.median(split) - statistics.median(plain)
    return out


def _mprotect_ns(addr: int, npages: int, iterations: int) -> float:
    """Mean ns of one ``mprotect()`` (read-only, then back) over ``npages`` at ``addr``."""
    length = npages * uapi.PAGE_SIZE
    ro, rw = _sys.PROT_READ, _sys.PROT_READ | _sys.PROT_WRITE
    t0 = time.perf_counter_ns()
    for _ in range(iterations):
        _sys.mprotect(addr, length, ro)
        _sys.mprotect(addr, length, rw)
    return (time.perf_counter_ns() - t0) / (2 * iterations)


def measure_mprotect(host: TwinHost, iterations: int, reps: int) -> dict[str, Any]:
    """PTE change and local flush from ``mprotect()`` of populated against unpopulated memory."""
    most = max(MPROTECT_PAGES)
    populated = host.mmap_anonymous(most * uapi.PAGE_SIZE)
    empty = host.mmap_anonymous(most * uapi.PAGE_SIZE)
    native.touch_pages()(populated.addr, most)
    try:
        delta = {n: statistics.median(
            _mprotect_ns(populated.addr, n, iterations) - _mprotect_ns(empty.addr, n, iterations)
            for _ in range(reps)) for n in MPROTECT_PAGES}
    finally:
        populated.munmap()
        empty.munmap()
    pte = (delta[512] - delta[256]) / 256
    out: dict[str, Any] = {"pages": list(MPROTECT_PAGES), "delta_ns": {str(n): d for n, d in delta.items()}}
    if pte <= 0 or delta[1] - pte <= 0:
        # Noise larger than the effect (a loaded or nested host): no figure rather than a wrong one.
        out["unavailable"] = "the populated - unpopulated differences were not positive (noise)"
        return out
    return out | {"pte_change_ns": pte, "flush_local_ns": delta[1] - pte}


def measure_copy(host: TwinHost, reps: int) -> dict[str, Any]:
    """ns per 4 KiB page of a ``memmove()`` of :data:`COPY_BYTES` between populated buffers."""
    src = host.mmap_anonymous(COPY_BYTES)
    dst = host.mmap_anonymous(COPY_BYTES)
    touch = native.touch_pages()
    touch(src.addr, COPY_BYTES // uapi.PAGE_SIZE)
    touch(dst.addr, COPY_BYTES // uapi.PAGE_SIZE)
    samples = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            ctypes.memmove(dst.addr, src.addr, COPY_BYTES)
            samples.append((time.perf_counter_ns() - t0) / (COPY_BYTES // uapi.PAGE_SIZE))
    finally:
        src.munmap()
        dst.munmap()
    return stats(samples)


def measure_primitives(host: TwinHost | None = None, *, split_pages: int = 2048, reps: int = 5,
                       iterations: int = 2000, cpu: int | None = 0,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Every primitive (see the module docstring); ``split_pages`` memfd_secret faults per rep."""
    host = host or TwinHost()
    say = progress or (lambda _: None)
    with pinned(cpu):
        say(f"direct-map split: {reps} x {split_pages} memfd_secret faults, each timed alone")
        split = measure_split(host, split_pages, reps)
        say(f"PTE change and local flush: mprotect of {', '.join(map(str, MPROTECT_PAGES))} pages")
        prot = measure_mprotect(host, iterations, reps)
        say(f"page copy: memmove of {COPY_BYTES >> 20} MiB")
        copy = measure_copy(host, reps)
    return {
        "schema": SCHEMA,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "pinned_cpu": cpu},
        "split_2m": split,
        "mprotect": prot,
        "copy_page_ns": copy,
    }


def format_primitives(r: dict[str, Any]) -> str:
    """A readable summary of :func:`measure_primitives`."""
    s, p, c = r["split_2m"], r["mprotect"], r["copy_page_ns"]
    lines = [f"kernel {r['machine']['kernel']}, {r['machine']['cpus']} CPUs, pinned to "
             f"{r['machine']['pinned_cpu']}"]
    if "extra_ns" in s:
        lines.append(f"memfd_secret fault: {s['fault_ns']['median']:.0f} ns without a split, "
                     f"{s['split_fault_ns']['median']:.0f} ns with one ({s['splits']} of {s['faults']} "
                     f"faults split): a split adds {s['extra_ns']:.0f} ns")
    else:
        lines.append(f"direct-map split: not measured: {s['unavailable']}")
    lines.append("mprotect (populated - unpopulated), ns: " + ", ".join(
        f"{n} pages {d:.0f}" for n, d in p["delta_ns"].items()))
    lines.append(f"  not measured: {p['unavailable']}" if "unavailable" in p else
                 f"  PTE change {p['pte_change_ns']:.0f} ns (slope 256 -> 512 pages); local flush (INVLPG) "
                 f"{p['flush_local_ns']:.0f} ns (1 page less one PTE change)")
    lines += [
        f"page copy (memmove of {COPY_BYTES >> 20} MiB): {c['median']:.0f} ns per 4 KiB "
        f"(min {c['min']:.0f}, max {c['max']:.0f})",
    ]
    return "\n".join(lines)
