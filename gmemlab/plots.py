"""Pictures: the direct map.  (Matplotlib with the Agg backend: no display needed.)"""

from __future__ import annotations

from pathlib import Path

from gmemlab.model.mm.direct_map import E_LEAF, E_LEAF_NP, E_NONE, E_TABLE, PTE_NOT_PRESENT, DirectMap

# Region classes, in the legend's order.
LEGEND = (
    ("not RAM", "#ffffff"),
    ("in a 1G leaf", "#c6dbef"),
    ("2M leaf", "#6baed6"),
    ("split to 4K", "#fdae6b"),
    ("split, pages removed", "#d62728"),
)


def direct_map_grid(d: DirectMap) -> list[list[int]]:
    """One row per 1G region, one cell per 2M region: an index into :data:`LEGEND`."""
    rows = []
    for r1, s1 in enumerate(d.pud):
        row = []
        for i in range(512):
            r2 = r1 * 512 + i
            if s1 == E_NONE:
                row.append(0)
            elif s1 != E_TABLE:
                row.append(1)
            else:
                s2 = d.pmd[r2]
                if s2 == E_NONE:
                    row.append(0)
                elif s2 in (E_LEAF, E_LEAF_NP):
                    row.append(2 if s2 == E_LEAF else 4)
                elif s2 == E_TABLE:
                    row.append(4 if PTE_NOT_PRESENT in d.pte[r2] else 3)
        rows.append(row)
    return rows


def plot_direct_map(d: DirectMap, path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = direct_map_grid(d)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(grid) + 1.6))
    ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=0, vmax=len(LEGEND) - 1,
              cmap=ListedColormap([c for _, c in LEGEND]))
    ax.set_yticks(range(len(grid)), [f"{i} GiB" for i in range(len(grid))])
    ax.set_xlabel("2 MiB region within the 1 GiB region")
    ax.set_title(title)
    handles = [Patch(facecolor=c, edgecolor="#777777", label=n) for n, c in LEGEND]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(LEGEND),
              frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
