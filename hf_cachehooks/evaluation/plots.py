"""The checkpoints figure: each metric against the training step, the best step of each marked.

Drawn on an Agg canvas without pyplot (nothing opens a window or changes a notebook's backend); matplotlib
is the optional extra `plots`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError


def plot_checkpoints(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write the PNG: one line per metric over the steps of `records` ({"step", "metrics"}; a record whose
    step is None, a final model of unknown step, is left out), the best step of each ringed.

    Raises:
        MissingDependencyError: matplotlib is not installed (names the extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "The checkpoints plot needs matplotlib: pip install 'hf_cachehooks[plots]'"
        ) from exc
    figure = Figure(figsize=(7.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    stepped = sorted((r for r in records if r.get("step") is not None), key=lambda r: r["step"])
    for name in metrics:
        points = [(r["step"], r["metrics"][name]) for r in stepped if isinstance(r["metrics"].get(name), (int, float))]
        if not points:
            continue
        line = ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)[0]
        best = max(points, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], marker="o", markersize=12, fillstyle="none", color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("score (higher is better; ring: best step)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if title:
        ax.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
