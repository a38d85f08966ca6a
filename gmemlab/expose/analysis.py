"""Every design on every exposure workload: the attacker's view, summed up and plotted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmemlab.cost.model import CostModel
from gmemlab.cost.strategies import make_design
from gmemlab.expose.scenario import Scenario, ScenarioConfig
from gmemlab.expose.tracker import CAUSES, ExposureTracker, Phase
from gmemlab.expose.workloads import WORKLOADS
from gmemlab.model.designs import Design
from gmemlab.model.invariants import KernelOops
from gmemlab.report import Cell, table

DEFAULT_DESIGNS = ("base", "v12", "noflush", "fc-6.18", "batch", "falloc", "zap2m", "folio2m",
                   "unmapped", "filemap")


@dataclass(frozen=True, slots=True)
class ExposeConfig:
    designs: tuple[str, ...] = DEFAULT_DESIGNS
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    pages: int = 512  # one 2 MiB block: the 2 MiB strategies need a whole one
    init_on_free: tuple[bool, ...] = (False, True)
    ncpus: int = 2
    tlb_entries: int = 1536
    seed: int = 0


@dataclass(slots=True)
class CaseResult:
    """One design on one workload with one init_on_free setting."""

    design: str
    workload: str
    init_on_free: bool
    no_direct_map: bool  # the guest_memfd had the flag (the design offers it)
    pages: int
    secret_written: int
    peak: int
    byte_steps: int
    byte_us: float
    by_cause_us: list[float]
    steps: int
    time_us: float
    windows: int
    window_max_steps: int
    window_max_us: float
    window_mean_us: float
    window_mean_steps: float
    open_at_end: int  # frames whose secrets are still reachable when the workload ends
    exposed_at_end: int
    phases: list[Phase]
    timeline: list[tuple[int, float, int, int, int]]
    violations: dict[str, int] = field(default_factory=dict)
    oops: str | None = None

    def as_json(self, *, timeline: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "design": self.design,
            "workload": self.workload,
            "init_on_free": self.init_on_free,
            "no_direct_map": self.no_direct_map,
            "pages": self.pages,
            "secret_bytes_written": self.secret_written,
            "peak_bytes": self.peak,
            "byte_steps": self.byte_steps,
            "byte_us": self.byte_us,
            "byte_us_by_cause": dict(zip(CAUSES, self.by_cause_us, strict=True)),
            "steps": self.steps,
            "time_us": self.time_us,
            "windows": {"closed": self.windows, "max_steps": self.window_max_steps,
                        "max_us": self.window_max_us, "mean_us": self.window_mean_us,
                        "mean_steps": self.window_mean_steps,
                        "open_at_end": self.open_at_end},
            "exposed_bytes_at_end": self.exposed_at_end,
            "phases": [ph.as_json() for ph in self.phases],
            "violations": self.violations,
            "oops": self.oops,
        }
        if timeline:
            out["timeline"] = [list(t) for t in self.timeline]
        return out


def run_case(design: str | Design, workload: str, init_on_free: bool, cfg: ExposeConfig,
             cost: CostModel) -> CaseResult:
    """One design (a spec, or an instance with its options set) on one workload."""
    sc = Scenario(make_design(design) if isinstance(design, str) else design,
                  ScenarioConfig(ncpus=cfg.ncpus, init_on_free=init_on_free,
                                 tlb_entries=cfg.tlb_entries, seed=cfg.seed))
    tracker = ExposureTracker(sc.m, cost.at(cfg.ncpus))
    sc.tracker = tracker
    tracker.attach()
    oops = None
    try:
        WORKLOADS[workload].run(sc, cfg.pages)
    except KernelOops as e:
        oops = e.violation.message
    finally:
        sc.finish()
    w = tracker.windows
    return CaseResult(
        design=design if isinstance(design, str) else design.name, workload=workload,
        init_on_free=init_on_free, no_direct_map=sc.no_direct_map,
        pages=cfg.pages, secret_written=tracker.secret_written, peak=tracker.peak,
        byte_steps=tracker.byte_steps, byte_us=tracker.byte_us, by_cause_us=list(tracker.by_cause_us),
        steps=tracker.steps, time_us=tracker.time_us, windows=w.count, window_max_steps=w.max_steps,
        window_max_us=w.max_us, window_mean_us=w.total_us / w.count if w.count else 0.0,
        window_mean_steps=w.total_steps / w.count if w.count else 0.0,
        open_at_end=tracker.open_windows(), exposed_at_end=tracker.exposed, phases=tracker.phases,
        timeline=tracker.timeline, violations={k: v for k, v in sc.m.inv.verdicts().items() if v},
        oops=oops,
    )


def run_all(cfg: ExposeConfig, cost: CostModel,
            progress: Callable[[str], None] | None = None) -> list[CaseResult]:
    out = []
    cases = [(w, d, iof) for w in cfg.workloads for d in cfg.designs for iof in cfg.init_on_free]
    for i, (w, d, iof) in enumerate(cases, 1):
        if progress:
            progress(f"[{i}/{len(cases)}] {w} on {d}" + (" with init_on_free" if iof else ""))
        out.append(run_case(d, w, iof, cfg, cost))
    return out


# --- tables ----------------------------------------------------------------------------------
def _kb(n: float) -> float:
    return n / 1024


def summary_table(results: Sequence[CaseResult]) -> str:
    """One row per case: peak and integrated exposure, windows, what reached it."""
    headers = ["workload", "design", "iof", "flag", "peak kB", "kB*steps", "kB*ms", "via dmap/tlb/temp",
               "windows", "longest steps", "longest us", "open@end", "violations"]
    rows: list[list[Cell]] = []
    for r in results:
        total = sum(r.by_cause_us) or 1.0
        via = "/".join(f"{100 * c / total:.0f}" for c in r.by_cause_us) if r.byte_us else "-"
        viol = ", ".join(f"{k} x{v}" for k, v in r.violations.items())
        rows.append([r.workload, r.design, "on" if r.init_on_free else "off", r.no_direct_map,
                     _kb(r.peak), round(_kb(r.byte_steps)), _kb(r.byte_us) / 1000, via, r.windows,
                     r.window_max_steps, r.window_max_us, r.open_at_end,
                     ("OOPS: " + r.oops) if r.oops else (viol or "-")])
    return table(headers, rows, align="lllrrrrlrrrrl")


def phase_table(results: Sequence[CaseResult]) -> str:
    """Peak reachable kB per phase: where each design's exposure comes from."""
    blocks = []
    for workload in dict.fromkeys(r.workload for r in results):
        rs = [r for r in results if r.workload == workload]
        names = list(dict.fromkeys(ph.name for r in rs for ph in r.phases if ph.name != "setup"))
        rows: list[list[Cell]] = []
        for r in rs:
            peaks = {ph.name: ph.peak for ph in r.phases}
            rows.append([r.design, "on" if r.init_on_free else "off",
                         *(_kb(peaks[n]) if n in peaks else None for n in names)])
        blocks.append(f"{workload}: peak reachable kB per phase\n"
                      + table(["design", "iof", *names], rows, align="ll" + "r" * len(names)))
    return "\n\n".join(blocks)


# --- plots -----------------------------------------------------------------------------------------
def plot_timelines(results: Sequence[CaseResult], out_dir: Path) -> list[Path]:
    """One PNG per workload: reachable kB over modelled time, a panel per design, by cause."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(exist_ok=True)  # its parent exists: the command line checked (cli.output_dir)
    written = []
    colors = {"dmap": "tab:red", "tlb": "tab:orange", "temp": "tab:purple"}
    for workload in dict.fromkeys(r.workload for r in results):
        rs = [r for r in results if r.workload == workload]
        designs = list(dict.fromkeys(r.design for r in rs))
        ncols = min(4, len(designs))
        nrows = -(-len(designs) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False,
                                 sharey=True)
        for ax, design in zip(axes.flat, designs, strict=False):
            for r in (r for r in rs if r.design == design):
                xs = [t[1] / 1000 for t in r.timeline] + [r.time_us / 1000]
                layers = [[_kb(t[i]) for t in r.timeline] for i in (2, 3, 4)]
                for layer in layers:
                    layer.append(layer[-1])
                if not r.init_on_free:
                    ax.stackplot(xs, layers, step="post", colors=[colors[c] for c in CAUSES],
                                 labels=[f"via {c}" for c in CAUSES], alpha=0.55)
                    for ph in r.phases[1:]:
                        ax.axvline(ph.start_us / 1000, color="grey", lw=0.6, ls=":")
                        ax.text(ph.start_us / 1000, 1.0, ph.name, rotation=90, va="top", ha="right",
                                fontsize=6, color="grey", transform=ax.get_xaxis_transform())
                else:
                    total = [sum(v) for v in zip(*layers, strict=True)]
                    ax.step(xs, total, where="post", color="black", lw=0.9, ls="--",
                            label="total, init_on_free")
            ax.set_title(design, fontsize=9)
            ax.set_xlabel("modelled time (ms)", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.flat[len(designs):]:
            ax.set_visible(False)
        axes[0][0].set_ylabel("reachable secret kB", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
        fig.suptitle(f"exposure over time: {workload} ({rs[0].pages} pages)", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        path = out_dir / f"expose-{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
