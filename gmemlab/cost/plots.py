"""The cost plots: slowdown against CPU count, direct-map fragmentation, exposure against cost."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmemlab.cost.analysis import CostConfig, CostRow, crossing
from gmemlab.cost.strategies import BASELINE
from gmemlab.cost.workloads import COST_WORKLOADS

KB_PER_GIB = 1 << 20


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_slowdown(rows: Sequence[CostRow], cfg: CostConfig, path: Path) -> Path:
    """Slowdown against no removal, per CPU count, for the workloads the series quoted."""
    plt = _plt()
    workloads = [w for w in cfg.workloads if COST_WORKLOADS[w].series_slowdown]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.6), squeeze=False)
    strategies = [s for s in cfg.strategies if s != BASELINE]
    cmap = plt.get_cmap("tab10")
    markers = "os^vD<>px"
    for ax, workload in zip(axes[0], workloads, strict=True):
        w = COST_WORKLOADS[workload]
        for i, strategy in enumerate(strategies):
            row = next((r for r in rows if r.workload == workload and r.strategy == strategy), None)
            if row is None or not row.sweep:
                continue
            # Strategies that cost the same draw on top of each other: thinner lines and
            # different markers later in the list keep every one visible.
            ax.plot(cfg.sweep, row.sweep["scaled"], marker=markers[i % len(markers)], ms=7 - 0.5 * i,
                    lw=max(3.2 - 0.3 * i, 0.8), color=cmap(i % 10), label=strategy, mfc="none")
            ax.plot(cfg.sweep, row.sweep["prior"], ls=":", color=cmap(i % 10), lw=1)
            hit = crossing(row, cfg.sweep, w.series_slowdown or 0.0)
            if hit is not None:
                ax.plot([hit], [row.sweep["scaled"][cfg.sweep.index(hit)]], marker="*", ms=12,
                        color=cmap(i % 10), mec="black")
        level = w.series_slowdown or 1.0
        ax.axhline(level, color="black", ls="--", lw=1)
        ax.annotate(f"{w.series_label} ({level:g}x)", (cfg.sweep[-1], level), xytext=(-2, -11),
                    textcoords="offset points", fontsize=8, ha="right")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("CPUs (each kernel TLB flush interrupts every other CPU)")
        ax.set_ylabel(f"{workload}: time / time without removal")
        ax.set_title(f"{workload}: {w.summary}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
               title="solid: IPI round trip fitted on this machine; dotted: the bare-metal IPI prior",
               title_fontsize=8)
    fig.suptitle("Slowdown against CPU count (star: where the series' figure is reached)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fragmentation(rows: Sequence[CostRow], cfg: CostConfig, path: Path) -> Path:
    """DirectMap4k/2M/1G after each workload, per strategy (this machine's counters before)."""
    plt = _plt()
    workloads = [w for w in cfg.workloads if any(r.dm_after_kb for r in rows if r.workload == w)]
    fig, axes = plt.subplots(1, max(len(workloads), 1), figsize=(4.6 * max(len(workloads), 1), 4.2),
                             squeeze=False, sharey=True)
    colors = ("tab:red", "tab:orange", "tab:green")
    width = 0.27
    for ax, workload in zip(axes[0], workloads, strict=False):
        rs = [r for r in rows if r.workload == workload and r.dm_after_kb]
        xs = range(len(rs))
        for level, color in enumerate(colors):
            vals = [r.dm_after_kb[level] / KB_PER_GIB for r in rs if r.dm_after_kb]
            ax.bar([x + (level - 1) * width for x in xs], vals, width, color=color,
                   label=("DirectMap4k", "DirectMap2M", "DirectMap1G")[level])
        ax.set_xticks(list(xs), [r.strategy for r in rs], rotation=60, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"after {workload} of {cfg.gib:g} GiB", fontsize=10)
        ax.set_ylabel("GiB mapped at that size (log)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Direct-map fragmentation (splits are never merged back)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_exposure_cost(rows: Sequence[CostRow], cfg: CostConfig, path: Path) -> Path:
    """Mean share of secrets reachable against slowdown, per workload and strategy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    markers = "osD^v<>"
    cmap = plt.get_cmap("tab10")
    for j, workload in enumerate(cfg.workloads):
        ax.scatter([], [], marker=markers[j % len(markers)], color="grey", label=workload)
        for i, strategy in enumerate(cfg.strategies):
            r = next((r for r in rows if r.workload == workload and r.strategy == strategy), None)
            if r is None or r.exposure_mean is None:
                continue
            y = 100 * r.exposure_mean
            ax.scatter(r.slowdown, y, marker=markers[j % len(markers)], s=40, color=cmap(i % 10))
            ax.annotate(strategy, (r.slowdown, y), fontsize=7, xytext=(4, 3 + 6 * (i % 3)),
                        textcoords="offset points", color=cmap(i % 10))
    ax.set_xscale("log")
    ax.set_xlabel(f"slowdown against no removal ({cfg.ncpus} CPUs)")
    ax.set_ylabel("secret bytes reachable, mean over the measured phases (%)")
    ax.set_title("Exposure against cost", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
