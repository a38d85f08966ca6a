"""One NO_DIRECT_MAP guest's life on the model, timed operation by operation.

Two lifecycles, each on a fresh machine with enough RAM for the guest plus its
direct-map page tables, trace off and invariants stopping at the first
violation:

* ``guest``: bind (VM, guest_memfd ``MMAP|INIT_SHARED|NO_DIRECT_MAP``, memslot
  without a userspace mapping), the guest's first touch of every page (one
  byte per page, as ``gmemlab measure`` does on the real kernel; 1 GiB per
  ``KVM_RUN``), punch the upper half (1 GiB per ``fallocate``), then close the
  guest_memfd, the vCPU and the VM, which frees every frame left.
* ``host``: the same, except that the VMM maps the guest_memfd, backs the
  memslot with the mapping, and touches every page first by filling it
  (``Mapping.fill``, 1 GiB at a time); the close also unmaps.

Each operation's time is per page it handles (the punch and the close handle
half each).  The invariant sweep (``check_all``) runs after the first touch
and at the end, timed apart, and must find nothing; every frame the guest had
must be back with the allocator.

``python -m gmemlab.bench.lifecycle SIZE_GIB KIND [--per-page] [--work-gib W]``
runs it, as many times as make up ``W`` GiB, and prints the lifecycles
combined (:func:`combine`) as JSON on stdout (progress on stderr);
``gmemlab bench`` runs it for each size and kind in its own process, the same
work for every size, a few rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gmemlab.api import IoOut
from gmemlab.guest import PORT_DONE, GuestProgram
from gmemlab.model import Host, MachineConfig
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SHIFT,
)

KINDS = ("guest", "host")
OPS = {"guest": ("bind", "guest first touch", "punch half", "close + free"),
       "host": ("bind", "host first touch", "punch half", "close + free")}
GIB = 1 << 30
GPA = 1 << 32
FLAGS = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
PORT_CHUNK = 0x80  # the guest's "another GiB done" exit
Progress = Callable[[str, int, int], None]  # (operation, pages done, pages in all)


@dataclass(slots=True)
class _Clock:
    """CPU and wall time of each operation, per page it handled."""

    ops: dict[str, dict[str, float]] = field(default_factory=dict)
    _cpu: float = field(default_factory=time.process_time)
    _wall: float = field(default_factory=time.perf_counter)

    def lap(self, name: str, pages: int) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.ops[name] = {"pages": pages, "cpu_s": cpu - self._cpu, "wall_s": wall - self._wall,
                          "us_per_page": (cpu - self._cpu) / pages * 1e6}
        self._cpu, self._wall = cpu, wall

    def restart(self) -> None:
        """Leave what ran since the last lap out of every operation."""
        self._cpu, self._wall = time.process_time(), time.perf_counter()


def _sweep(host: Host) -> dict[str, float]:
    """``check_all()``, timed (outside the operations' times)."""
    c, w = time.process_time(), time.perf_counter()
    host.machine.inv.check_all()
    return {"cpu_s": time.process_time() - c, "wall_s": time.perf_counter() - w}


def ram_gib_for(size: int) -> float:
    """Modelled RAM above 4 GiB for a guest of ``size`` bytes: the guest, its direct-map page
    tables (one per 2 MiB) and room to spare."""
    return size / GIB * (1 + 1 / 256) + 1


def run(size: int, kind: str, *, per_page: bool = False, progress: Progress | None = None,
        design: str = "v12", profile: str = "x86_64") -> dict[str, Any]:
    """Run the ``kind`` lifecycle of a ``size``-byte guest; see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"unknown lifecycle {kind!r} ({', '.join(KINDS)})")
    say = progress or (lambda op, done, total: None)
    pages = size >> PAGE_SHIFT
    chunk = min(size, GIB)
    t0c, t0w = time.process_time(), time.perf_counter()
    # Record, not stop: a design that breaks invariants by design (noflush, v7) is benched too,
    # and its violations counted; check_all()'s frame-has-owner judges that nothing leaked.
    config = MachineConfig(ram_gib=ram_gib_for(size), trace="off", invariants="record",
                           range_paths=not per_page)
    host = Host(config=config, design=design, profile=profile)
    m = host.machine
    boot = {"cpu_s": time.process_time() - t0c, "wall_s": time.perf_counter() - t0w}
    clock = _Clock()
    total = 2 * pages
    kvm = host.open_kvm()
    vm = kvm.create_vm()
    # A design without the series (base) runs the same lifecycle without the flag.
    gmem = vm.create_guest_memfd(size, FLAGS & vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS))
    mapping = gmem.mmap(size) if kind == "host" else None
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, size, mapping.addr if mapping else 0,
                               gmem, 0)
    vcpu = vm.create_vcpu(0)
    clock.lap("bind", pages)
    touch = OPS[kind][1]
    if mapping is None:
        prog = GuestProgram()
        for off in range(0, size, chunk):
            prog.touch(GPA + off, min(chunk, size - off)).out(PORT_CHUNK, 0)
        vcpu.load_program(prog)
        done = 0
        while True:
            ex = vcpu.run()
            if not isinstance(ex, IoOut):
                raise RuntimeError(f"the guest stopped with {ex}")
            if ex.port == PORT_DONE:
                break
            done = min(done + chunk, size)
            say(touch, done >> PAGE_SHIFT, total)
    else:
        for off in range(0, size, chunk):
            mapping.fill(off, min(chunk, size - off), 0x5A)
            say(touch, (off + chunk) >> PAGE_SHIFT, total)
    clock.lap(touch, pages)
    checks = [_sweep(host)]  # every page mapped: the sweep's largest case
    clock.restart()
    half = size // 2 // chunk * chunk if size >= 2 * chunk else size // 2
    for off in range(half, size, chunk):
        gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, min(chunk, size - off))
        say("punch half", pages + ((off + chunk - half) >> PAGE_SHIFT), total)
    clock.lap("punch half", (size - half) >> PAGE_SHIFT)
    if mapping is not None:
        mapping.munmap()
    gmem.close()
    vcpu.close()
    vm.close()
    kvm.close()
    say("close + free", total, total)
    clock.lap("close + free", half >> PAGE_SHIFT)
    checks.append(_sweep(host))
    return {
        "kind": kind,
        "design": m.design.name,
        "profile": m.profile.name,
        "size_bytes": size,
        "pages": pages,
        "per_page_path": per_page,
        "batched_paths": m.gate.mirror is not None,
        "paths_reason": m.gate.describe(),
        "boot": boot,
        "ops": clock.ops,
        "lifecycle_wall_s": sum(op["wall_s"] for op in clock.ops.values()),
        "lifecycle_cpu_s": sum(op["cpu_s"] for op in clock.ops.values()),
        "check_all": checks,
        "violations": sum(m.inv.verdicts().values()),
        "broken": {name: n for name, n in m.inv.verdicts().items() if n},
        "splits": {"1G": m.dmap.splits_1g, "2M": m.dmap.splits_2m},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def combine(runs: list[dict[str, Any]], *, pooled: bool = False) -> dict[str, Any]:
    """Several results of one size and kind (lifecycles in one process, or rounds), as one.

    Each operation's cost is its CPU time summed over the runs, per page summed:
    the mean, not the median nor the best.  This machine's speed swings by 2x
    from one tenth of a second to the next (a nested guest on a shared host), so
    a fair comparison of sizes needs each size measured over the same amount of
    work: :func:`main` runs as many lifecycles of a small guest as make up one of
    the largest, and the mean over that work leaves out nothing a large guest
    pays (a table growing, a free list reallocated).  ``samples_us_per_page``
    keeps each run's own cost, to show the spread (``pooled``: the runs are
    whole benches, and their rounds' samples are kept).  The lifecycle's time, peak
    RSS and sweep are the worst; violations and lifecycles add up.
    """
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    out = dict(runs[0])
    out["lifecycles"] = sum(r.get("lifecycles", 1) for r in runs)
    out["ops"] = {}
    for name in runs[0]["ops"]:
        parts = [r["ops"][name] for r in runs]
        pages, cpu = sum(p["pages"] for p in parts), sum(p["cpu_s"] for p in parts)
        out["ops"][name] = {"pages": pages, "cpu_s": cpu, "wall_s": sum(p["wall_s"] for p in parts),
                            "us_per_page": cpu / pages * 1e6,
                            "samples_us_per_page": [
                                x for p in parts
                                for x in (p.get("samples_us_per_page", [p["us_per_page"]])
                                          if pooled else [p["us_per_page"]])]}
    for key in ("lifecycle_wall_s", "lifecycle_cpu_s", "peak_rss_mib"):
        out[key] = max(r[key] for r in runs)
    out["boot"] = max((r["boot"] for r in runs), key=lambda b: b["wall_s"])
    out["check_all"] = max((r["check_all"] for r in runs), key=lambda cs: sum(c["wall_s"] for c in cs))
    out["violations"] = sum(r["violations"] for r in runs)
    broken: Counter[str] = Counter()
    for r in runs:
        broken.update(r.get("broken", {}))
    out["broken"] = dict(broken)
    return out


class Bar:
    """A progress bar on stderr, redrawn at most every 0.2 s (a line per quarter if not a tty)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.quarter = -1

    def __call__(self, op: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.tty:
            quarter = 4 * done // max(total, 1)
            if quarter != self.quarter:
                print(f"bench: {self.label}: {25 * quarter}% ({op})", file=sys.stderr, flush=True)
                self.quarter = quarter
            return
        if now - self.last < 0.2 and done < total:
            return
        self.last = now
        width = 30
        fill = width * done // max(total, 1)
        print(f"\r  {self.label:<22} [{'#' * fill}{'.' * (width - fill)}] {100 * done // max(total, 1):3d}%"
              f"  {op:<18}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


WARMUP_BYTES = 16 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmemlab.bench.lifecycle")
    p.add_argument("size_gib", type=float)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--per-page", action="store_true", help="force the per-page generator paths")
    p.add_argument("--design", default="v12", help="design name or design file (default: v12)")
    p.add_argument("--profile", default="x86_64", help="architecture profile (default: x86_64)")
    p.add_argument("--work-gib", type=float, default=0.0,
                   help="run lifecycles back to back until they have handled this many GiB "
                        "(default: one lifecycle)")
    args = p.parse_args(argv)
    size = int(args.size_gib * GIB) >> PAGE_SHIFT << PAGE_SHIFT
    if size <= 0:
        p.error("the guest needs at least one page")
    count = max(1, math.ceil(args.work_gib * GIB / size))
    label = (f"{args.size_gib:g} GiB {args.kind}" + (" per page" if args.per_page else "")
             + (f" ({args.design})" if args.design != "v12" else "")
             + (f" on {args.profile}" if args.profile != "x86_64" else ""))
    # Warm the process first (imports done lazily on first use, first calls into
    # numpy), so that every size measures the same steady state and a short run at
    # 1 GiB is not charged a fixed start-up cost the 64 GiB run spreads thinner.
    run(WARMUP_BYTES, args.kind, per_page=args.per_page, design=args.design, profile=args.profile)
    bar = Bar(label if count == 1 else f"{label} x{count}")
    results = []
    try:
        for i in range(count):
            def progress(op: str, done: int, total: int, i: int = i) -> None:
                bar(op, i * total + done, count * total)

            # A machine is a few large buffers held in reference cycles: collect the last
            # one now, or the next lifecycles pile up beside it and the peak RSS is not
            # one guest's (the count-based collector does not see the bytes).
            gc.collect()
            results.append(run(size, args.kind, per_page=args.per_page, progress=progress,
                               design=args.design, profile=args.profile))
    finally:
        bar.close()
    json.dump(combine(results), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
