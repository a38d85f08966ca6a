"""The churn's figures: DirectMap after the day, the share split, what the TLB reach costs.

TLB reach, our choice of measure (nothing posted gives one): the host kernel's
accesses through the direct map, uniformly spread over RAM, served by one fully
associative TLB of ``tlb_entries`` entries that may hold any page size (the
model's ``MachineConfig.tlb_entries``, an STLB's size) and holds the largest
leaves (an ideal TLB: a lower bound on misses).  A miss walks the page table:
2 memory references for a 1 GiB leaf, 3 for 2 MiB, 4 for 4 KiB (x86-64,
4-level paging; the paging-structure caches are ignored).  Reported: the miss
share and the walk references per 1,000 accesses, both against the same host
with its boot-time direct map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmemlab.churn.regions import ChurnResult, Sample
from gmemlab.report import Cell, table

KB_4K, KB_2M, KB_1G = 4, 2048, 1 << 20
WALK_REFS = {KB_1G: 2, KB_2M: 3, KB_4K: 4}
TLB_ENTRIES = 1536


@dataclass(frozen=True, slots=True)
class Reach:
    miss: float  # share of accesses that miss the ideal TLB
    walk_refs_per_1k: float


def tlb_reach(direct_map_kb: tuple[int, int, int], entries: int = TLB_ENTRIES) -> Reach:
    """The ideal TLB's misses and walk references for a direct map of these DirectMap counters."""
    k4, m2, g1 = direct_map_kb
    total = k4 + m2 + g1
    left = entries
    miss = 0.0
    refs = 0.0
    for size, kb in ((KB_1G, g1), (KB_2M, m2), (KB_4K, k4)):
        leaves = kb // size
        held = min(left, leaves)
        left -= held
        uncovered = (leaves - held) * size / total
        miss += uncovered
        refs += uncovered * WALK_REFS[size]
    return Reach(miss, 1000 * refs)


def _split_share(s: Sample) -> float:
    """The share of RAM the direct map maps with 4 KiB pages."""
    return s.direct_map_kb[0] / sum(s.direct_map_kb)


@dataclass(frozen=True, slots=True)
class Summary:
    design: str
    how: str
    after: Sample
    peak_split_share: float
    mean_split_share: float  # over the day's events
    reach: Reach
    boot_reach: Reach
    seconds: float
    error: str | None

    def as_json(self) -> dict[str, Any]:
        a = self.after
        return {
            "design": self.design, "how": self.how, "seconds": self.seconds, "error": self.error,
            "direct_map_kB_after": dict(zip(("4k", "2M", "1G"), a.direct_map_kb, strict=True)),
            "splits_2m": a.splits_2m, "splits_1g": a.splits_1g, "page_table_pages": a.pt_pages,
            "split_share": {"after": _split_share(a), "peak": self.peak_split_share,
                            "mean": self.mean_split_share},
            "tlb": {"miss": self.reach.miss, "walk_refs_per_1k": self.reach.walk_refs_per_1k,
                    "boot_miss": self.boot_reach.miss,
                    "boot_walk_refs_per_1k": self.boot_reach.walk_refs_per_1k},
        }


def summarise(res: ChurnResult, entries: int = TLB_ENTRIES) -> Summary:
    shares = [_split_share(s) for s in res.samples]
    after = res.samples[-1]
    return Summary(res.design, res.how, after, max(shares), sum(shares) / len(shares),
                   tlb_reach(after.direct_map_kb, entries), tlb_reach(res.samples[0].direct_map_kb, entries),
                   res.seconds, res.error)


def churn_table(summaries: Sequence[Summary]) -> str:
    rows: list[list[Cell]] = []
    for s in summaries:
        k4, m2, g1 = (v / (1 << 20) for v in s.after.direct_map_kb)
        rows.append([s.design, s.how, k4, m2, g1, s.after.splits_2m, s.after.splits_1g,
                     f"{100 * _split_share(s.after):.1f}", f"{100 * s.peak_split_share:.1f}",
                     f"{100 * s.reach.miss:.1f} ({100 * s.boot_reach.miss:.1f})",
                     f"{s.reach.walk_refs_per_1k:,.0f} ({s.boot_reach.walk_refs_per_1k:,.0f})",
                     f"{s.seconds:.1f}", s.error or "-"])
    return table(["design", "how", "DM4k GiB", "DM2M GiB", "DM1G GiB", "2M splits", "1G splits",
                  "4k share %", "peak %", "TLB miss % (boot)", "walk refs/1k (boot)", "s", "stopped"],
                 rows, align="llrrrrrrrrrrl")


def plot_churn(results: Sequence[ChurnResult], path: Path, title: str) -> Path:
    """DirectMap4k/2M/1G over the day, one panel per design, and the 4 KiB share side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results, strict=False):
        hours = [s.hours for s in res.samples]
        for i, label in enumerate(("DirectMap4k", "DirectMap2M", "DirectMap1G")):
            ax.step(hours, [s.direct_map_kb[i] / (1 << 20) for s in res.samples], where="post", label=label)
        ax.set_title(res.design + (" (stopped)" if res.error else ""))
        ax.set_xlabel("hours")
        ax.set_ylabel("GiB")
    axes[0][0].legend(fontsize=7)
    share = axes[0][n]
    for res in results:
        share.step([s.hours for s in res.samples], [100 * _split_share(s) for s in res.samples],
                   where="post", label=res.design)
    share.set_title("direct map in 4 KiB pages")
    share.set_xlabel("hours")
    share.set_ylabel("% of RAM")
    share.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
