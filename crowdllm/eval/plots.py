"""Figures with matplotlib (Agg backend, no display): kappa heatmap, accuracy per group, cost vs accuracy.

Each function writes one figure to ``path`` (the format follows the extension: ``.png``, or
``.svg`` on request) and returns the path. They take plain tables (the rows that
:mod:`crowdllm.eval.evaluate` and :mod:`crowdllm.eval.cost` return), so a notebook can call
them on its own numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["kappa_heatmap", "accuracy_by_group", "cost_vs_accuracy", "accuracy_bars"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return p


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def kappa_heatmap(matrix: np.ma.MaskedArray, names: Sequence[Any], path: str | Path, *,
                  title: str = "Cohen's kappa between annotators") -> Path:
    """Heatmap of a symmetric kappa matrix (masked cells, undefined pairs, are shown grey)."""
    plt = _plt()
    m = len(names)
    size = min(max(4.0, 0.35 * m + 2.5), 16.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-1, vmax=1)
    labels = [_short(str(n)) for n in names]
    ax.set_xticks(range(m), labels, rotation=90, fontsize=7 if m > 20 else 9)
    ax.set_yticks(range(m), labels, fontsize=7 if m > 20 else 9)
    if m <= 12:
        for i in range(m):
            for j in range(m):
                if not np.ma.getmaskarray(matrix)[i, j]:
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="kappa")
    ax.set_title(title)
    return _save(fig, path)


def accuracy_by_group(table: Sequence[Mapping[str, Any]], systems: Sequence[str], path: str | Path,
                      *, title: str = "Accuracy per group", highlight: str | None = None) -> Path:
    """Grouped bars: accuracy of each system in each group (rows from ``group_table``)."""
    plt = _plt()
    groups = [str(r["group"]) for r in table]
    k = max(len(systems), 1)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * max(1, k / 3) + 2), 4.2))
    x = np.arange(len(groups))
    for i, s in enumerate(systems):
        vals = [r.get(s) for r in table]
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(x + (i - (k - 1) / 2) * width, heights, width,
                      label=_short(str(s), 30), hatch="//" if s == highlight else None,
                      edgecolor="black" if s == highlight else None, linewidth=0.6)
        for b, v in zip(bars, vals):
            if v is None:
                b.set_alpha(0.0)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on gold")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(k, 4), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def accuracy_bars(rows: Sequence[Mapping[str, Any]], path: str | Path, *,
                  title: str = "Accuracy on gold") -> Path:
    """Horizontal bars, one per system (``system``, ``accuracy``, ``kind`` rows)."""
    plt = _plt()
    rows = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(rows) + 1.2))
    colors = {"annotator": "#9ecae1", "crowd": "#bdbdbd", "method": "#e6550d", "prediction": "#31a354"}
    y = np.arange(len(rows))
    ax.barh(y, [r["accuracy"] for r in rows], color=[colors.get(r.get("kind"), "#756bb1") for r in rows])
    ax.set_yticks(y, [_short(str(r["system"]), 30) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy on gold")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def cost_vs_accuracy(rows: Sequence[Mapping[str, Any]], path: str | Path, *, currency: str = "USD",
                     title: str = "Cost vs accuracy (panel subsets x methods)") -> Path:
    """Scatter of ``cost`` vs ``accuracy`` per row, one marker per method, the Pareto front joined."""
    plt = _plt()
    ok = [r for r in rows if r.get("accuracy") is not None and r.get("cost") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^v<>Pp*hX"
    for i, m in enumerate(dict.fromkeys(r["method"] for r in ok)):
        pts = [r for r in ok if r["method"] == m]
        ax.scatter([r["cost"] for r in pts], [r["accuracy"] for r in pts], marker=markers[i % len(markers)],
                   label=m, alpha=0.75)
    front = sorted((r for r in ok if r.get("frontier")), key=lambda r: r["cost"])
    if front:
        ax.plot([r["cost"] for r in front], [r["accuracy"] for r in front], "k--", lw=1,
                label="Pareto front")
        seen: set[tuple[float, float]] = set()
        for r in front:
            if (r["cost"], r["accuracy"]) in seen:  # one label per point (methods may tie)
                continue
            seen.add((r["cost"], r["accuracy"]))
            ax.annotate(_short(r["subset"], 28), (r["cost"], r["accuracy"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel(f"cost ({currency})")
    ax.set_ylabel("accuracy on gold")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
