"""Run a workload twice, per page and batched, and capture everything either left behind.

Used by the equivalence tests: the batched range paths (``gmemlab.model.ranges``)
must leave exactly what the per-page generator paths leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gmemlab.model import Host, MachineConfig
from gmemlab.model.machine import Machine

Workload = Callable[[Host], None]

CONFIG = MachineConfig(ram_gib=1, low_ram_mib=64, trace="full", invariants="record")


def state(m: Machine) -> dict[str, Any]:
    """Every piece of machine state a kernel path can change, in comparable form."""
    mem = m.mem
    columns = {name: bytes(getattr(mem, name)) for name in (
        "state", "kind", "flags", "private", "refcount", "mapcount", "s2count", "mapping",
        "index", "gen", "guest_owned", "invalidated", "fill", "taint_full", "patch_off",
        "patch_len", "patch_val", "patch_taint")}
    d = m.dmap
    return {
        "mem": columns,
        "dense": {p: bytes(b) for p, b in sorted(mem.dense.items())},
        "dense_taint": {p: bytes(b) for p, b in sorted(mem.dense_taint.items())},
        "dmap": (bytes(d.pud), bytes(d.pmd), sorted((r, bytes(t)) for r, t in d.pte.items()),
                 dict(d.count), d.splits_1g, d.splits_2m),
        "tlb": [list(t) for t in m.tlb.entries],  # LRU order included
        "alloc": (m.alloc.freed_stack(), [list(r) for r in m.alloc._ranges], m.alloc._cursor,
                  m.alloc.nr_free),
        "page_caches": {mid: (a.flags, list(a.i_pages.items())) for mid, a in m.mappings.items()},
        "vms": {kid: (k.users, k.destroyed, k.mmu_invalidate_seq, k.mmu_invalidate_in_progress,
                      k.tlb_flushes, list(k.spte.items()), sorted(k.memslots),
                      {vid: dict(v.stats) for vid, v in k.vcpus.items()},
                      {vid: (v.pc, v.off) for vid, v in k.vcpus.items()})
                for kid, k in m.kvms.items()},
        "ptes": [[(v.start, list(v.ptes.items())) for v in p.mm.vmas] for p in m.processes],
        "locks": m.locks.state(),
        "counts": dict(m.trace.counts),
        "seq": m.trace.seq,
        "events": m.trace.events(),
        "violations": [(v.invariant.name, v.message, v.pfn, v.seq) for v in m.inv.violations],
    }


def run_both(workload: Workload, *, design: str = "v12", profile: str = "x86_64",
             **config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The final state of ``workload`` per page, and batched."""
    out = []
    for batched in (False, True):
        cfg = replace(CONFIG, range_paths=batched, **config)
        host = Host(design=design, profile=profile, config=cfg)
        workload(host)
        out.append(state(host.m))
    return out[0], out[1]


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where two states differ first, readably (for assertion messages)."""
    for key in a:
        if a[key] == b[key]:
            continue
        if key == "events":
            for i, (x, y) in enumerate(zip(a[key], b[key], strict=False)):
                if x != y:
                    return f"event {i}: per page {x}\n batched {y}"
            return f"{len(a[key])} events per page, {len(b[key])} batched"
        if key == "mem":
            for col, data in a[key].items():
                other = b[key][col]
                if data != other:
                    at = next(i for i, (x, y) in enumerate(zip(data, other, strict=True)) if x != y)
                    return f"memmap column {col} differs at byte {at}"
        return f"{key}: per page {str(a[key])[:400]}\n batched {str(b[key])[:400]}"
    return ""
