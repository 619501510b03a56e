"""PNG plots of probe results: AUROC by layer with its confidence band, and score distributions per label.

matplotlib is the optional extra `plots`; it is imported inside each function, so the rest of the package
never needs it. Figures are drawn on an Agg canvas without pyplot: nothing opens a window, nothing switches
the backend of a notebook the caller is in, and no figure lingers in pyplot's registry.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

DPI = 120
_SIZE = (6.4, 4.0)  # inches: 768 x 480 pixels at 120 dpi


def _new_figure() -> Any:
    """A Figure on an Agg canvas, or MissingDependencyError naming the extra."""
    try:
        import matplotlib  # noqa: F401  (import the package first: a blocked parent must fail here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError("Plots need matplotlib: pip install 'hf_cachehooks[plots]'") from exc
    figure = Figure(figsize=_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    figure.clear()  # the canvas is ours, not pyplot's: dropping the last reference frees it
    log.info("Wrote %s.", path)
    return path


def plot_auroc_by_layer(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot AUROC against layer, with the bootstrap interval as a shaded band and error bars.

    Args:
        rows: `probes.layer_report` output: dicts with "layer", "auroc" and optionally "auroc_low",
            "auroc_high" (NaN or missing bounds draw no bar).
        path: where to write the PNG.
        title: figure title; defaults to "AUROC by layer (n=...)".

    Returns:
        The path written.

    Raises:
        ConfigError: when `rows` is empty or a row has no "layer"/"auroc".
        MissingDependencyError: when matplotlib is not installed.

    Example:
        >>> plot_auroc_by_layer(layer_report(x_by_layer, labels), "auroc.png")  # doctest: +SKIP
    """
    if not rows:
        raise ConfigError("No rows to plot; pass the output of layer_report for at least one layer.")
    try:
        rows = sorted(rows, key=lambda row: row["layer"])
        layers = np.array([row["layer"] for row in rows], dtype=float)
        point = np.array([row["auroc"] for row in rows], dtype=float)
    except KeyError as exc:
        raise ConfigError(f"Each row needs 'layer' and 'auroc' (layer_report rows); one lacks {exc}.") from exc
    low = np.array([row.get("auroc_low", math.nan) for row in rows], dtype=float)
    high = np.array([row.get("auroc_high", math.nan) for row in rows], dtype=float)
    figure = _new_figure()
    axes = figure.add_subplot()
    has_ci = ~(np.isnan(low) | np.isnan(high))
    if has_ci.any():
        axes.fill_between(layers, low, high, where=has_ci, alpha=0.2, color="C0", linewidth=0, label="bootstrap CI")
        below = np.where(has_ci, np.clip(point - low, 0, None), 0.0)
        above = np.where(has_ci, np.clip(high - point, 0, None), 0.0)
        axes.errorbar(layers, point, yerr=[below, above], fmt="none", ecolor="C0", capsize=3, linewidth=1)
    axes.plot(layers, point, marker="o", color="C0", label="AUROC")
    axes.axhline(0.5, linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("layer")
    axes.set_ylabel("AUROC")
    if len(layers) <= 40 and np.all(layers == np.round(layers)):
        axes.set_xticks(layers)
    n = rows[0].get("n")
    axes.set_title(title if title is not None else "AUROC by layer" + (f" (n={n})" if n is not None else ""))
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_score_distributions(
    scores: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None, bins: int = 40
) -> Path:
    """Overlay one histogram per label (shared bins, alpha 0.5) with a legend.

    Args:
        scores: label -> scores (lists, numpy arrays or CPU tensors); NaNs are dropped.
        path: where to write the PNG.
        title: figure title; defaults to "Score distributions".
        bins: number of shared bins.

    Returns:
        The path written.

    Raises:
        ConfigError: when there are no finite scores at all.
        MissingDependencyError: when matplotlib is not installed.

    Example:
        >>> plot_score_distributions({"true": s[labels], "false": s[~labels]}, "scores.png")  # doctest: +SKIP
    """
    arrays = {str(label): np.asarray(values, dtype=float).reshape(-1) for label, values in scores.items()}
    arrays = {label: values[np.isfinite(values)] for label, values in arrays.items()}
    finite = [values for values in arrays.values() if values.size]
    if not finite:
        raise ConfigError(f"No finite scores to plot (labels: {', '.join(arrays) or 'none'}).")
    edges = np.histogram_bin_edges(np.concatenate(finite), bins=bins)
    figure = _new_figure()
    axes = figure.add_subplot()
    for label, values in arrays.items():
        axes.hist(values, bins=edges, alpha=0.5, label=f"{label} (n={values.size})")
    axes.set_xlabel("score")
    axes.set_ylabel("examples")
    axes.set_title(title if title is not None else "Score distributions")
    axes.legend()
    return _save(figure, path)
