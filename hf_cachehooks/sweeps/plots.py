"""The K-sweep figure: score against K on a log-2 axis, bootstrap intervals as error bars, a line per temperature.

Drawn on an Agg canvas without pyplot (nothing opens a window or changes a notebook's backend); matplotlib
is the optional extra `plots`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError

PANELS = (("best_of_k", "best-of-K (first K samples)"), ("pass_at_k", "pass@k (unbiased, all samples)"))


def plot_k_sweep(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the PNG: one panel per estimator, one line per temperature, K on a log-2 axis.

    Raises:
        MissingDependencyError: matplotlib is not installed (names the extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError("The K-sweep plot needs matplotlib: pip install 'hf_cachehooks[plots]'") from exc
    figure = Figure(figsize=(10.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS), sharey=True)
    temperatures = sorted({r["temperature"] for r in records})
    ks = sorted({r["k"] for r in records})
    for ax, (estimator, label) in zip(axes, PANELS):
        for temperature in temperatures:
            rows = sorted(
                (r for r in records if r["estimator"] == estimator and r["temperature"] == temperature),
                key=lambda r: r["k"],
            )
            x = [r["k"] for r in rows]
            y = [r["score"] for r in rows]
            err = [[r["score"] - r["ci_low"] for r in rows], [r["ci_high"] - r["score"] for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"T = {temperature:g}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (samples per prompt)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if all(0.0 <= r["ci_low"] and r["ci_high"] <= 1.0 for r in records):  # a rate: show all of 0..1
        axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("score (95% bootstrap interval)")
    axes[-1].legend(title="temperature")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
