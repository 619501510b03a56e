"""The probe workflow as functions: vectors from a cache, then validation with CSVs and plots.

RUN/                                    generate_vectors (the same folder on every run: its vectors are replaced)
├── normalized_vectors/layer_{L}.safetensors
├── raw_vectors/layer_{L}.safetensors
└── summary.json                        per layer: norm, examples, in-sample AUROC
VAL/                                    analyze_probe
├── probe_stats_layer{L}.csv            one row per example: index, type (its label), mean_score, text
├── summary.csv, summary.json           AUROC with a bootstrap interval per layer
└── auroc_by_layer.png, scores_layer{L}.png   with visualize=True
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ..errors import ConfigError
from .probes import bootstrap_auroc, diff_of_means, project, unit
from .store import ActivationStore
from .vectors import SteeringVector, load_vectors, save_vectors

log = logging.getLogger(__name__)


def label_field(store: ActivationStore) -> str:
    """The cache's label column: the one it was built with, else `type` or `label`."""
    fields = store.tables()[0].column_names
    for name in (store.manifest.get("label_field"), "type", "label"):
        if name and name in fields:
            return name
    names = ", ".join(c for c in fields if not c.startswith("layer_"))
    raise ConfigError(
        f"The cache has no label column (columns: {names}). Re-run cache_activations with label_field= naming it."
    )


def split_labels(labels: list, positive: str | None) -> tuple[Any, str, str]:
    """A bool tensor for `labels == positive`, with the positive and negative label names.

    The default positive label is "deployment" when present (the usual AUROC snippet scores
    deployment as the positive class), else the larger of exactly two labels.
    """
    import torch

    names = sorted({str(v) for v in labels})
    if positive is None:
        positive = "deployment" if "deployment" in names else (names[-1] if len(names) == 2 else None)
    if positive is None or positive not in names or len(names) != 2:
        raise ConfigError(f"Need exactly two labels with positive= naming one of them (labels: {', '.join(names)}).")
    negative = next(n for n in names if n != positive)
    return torch.tensor([str(v) == positive for v in labels]), positive, negative


def generate_vectors(
    store: ActivationStore,
    output: str | Path,
    layers: Sequence[int] | None = None,
    positive: str | None = None,
    stamp: str | None = None,
) -> Path:
    """Difference-of-means steering vectors (raw and unit-normalized) per layer, from the cache only.

    A second run into the same folder replaces the vectors of the first (and removes those of layers it
    no longer writes), so one command gives the same paths every time.

    Args:
        output: the run folder; `stamp` (e.g. a timestamp) makes it `{output}_{stamp}` instead.

    Returns:
        The run folder holding `normalized_vectors/`, `raw_vectors/` and `summary.json`.

    Raises:
        ConfigError: the folder exists and holds something other than an earlier run's vectors.
    """
    labels = store.column(label_field(store))
    mask, pos, neg = split_labels(labels, positive)
    run = Path(f"{output}_{stamp}") if stamp else Path(output)
    _forget_earlier_run(run, keep=layers or store.layers)
    raw, normalized, summary = {}, {}, []
    for layer in layers or store.layers:
        x = store.layer(layer)
        vector = diff_of_means(x, mask)
        common: dict[str, Any] = dict(
            layer=layer,
            hidden_size=store.hidden_size,
            model=store.model,
            positive_label=pos,
            negative_label=neg,
            n_examples=len(labels),
        )
        raw[layer] = SteeringVector(vector=vector, normalized=False, **common)
        normalized[layer] = SteeringVector(vector=unit(vector), normalized=True, **common)
        point, low, high = bootstrap_auroc(project(x, vector), mask, n_resamples=200)
        summary.append(
            {
                "layer": layer,
                "norm": float(vector.norm()),
                "n": len(labels),
                "n_positive": int(mask.sum()),
                "in_sample_auroc": point,
                "auroc_low": low,
                "auroc_high": high,
            }
        )
    save_vectors(normalized, run / "normalized_vectors")
    save_vectors(raw, run / "raw_vectors")
    (run / "summary.json").write_bytes(
        orjson.dumps(
            {"cache": str(store.folder), "positive": pos, "negative": neg, "layers": summary},
            option=orjson.OPT_INDENT_2,
        )
    )
    log.info("Wrote %d vectors (%s − %s) to %s", len(normalized), pos, neg, run)
    return run


def _forget_earlier_run(run: Path, keep: Sequence[int]) -> None:
    """Remove the vectors an earlier run wrote into `run` for layers not in `keep` (it recorded them)."""
    if not run.exists():
        return
    try:
        recorded = orjson.loads((run / "summary.json").read_bytes())["layers"]
        layers = [int(row["layer"]) for row in recorded]
    except (OSError, ValueError, TypeError, KeyError):
        if run.is_dir() and not any(run.iterdir()):
            return
        raise ConfigError(
            f"{run} exists and is not a generate-vectors run (no readable summary.json). Choose another output "
            "folder, or remove that one."
        ) from None
    for layer in set(layers) - set(keep):
        for kind in ("normalized_vectors", "raw_vectors"):
            (run / kind / f"layer_{layer}.safetensors").unlink(missing_ok=True)


def find_vectors(path: str | Path) -> Path:
    """The vectors folder a user names: `RUN/normalized_vectors` as it is, or the run folder `RUN` itself."""
    path = Path(path)
    return path / "normalized_vectors" if (path / "normalized_vectors").is_dir() else path


def analyze_probe(
    store: ActivationStore,
    vectors_folder: str | Path,
    output: str | Path,
    layers: Sequence[int] | None = None,
    visualize: bool = False,
    n_resamples: int = 1000,
) -> list[dict]:
    """Score every cached example with each layer's vector; write per-layer CSVs, a summary and plots.

    Args:
        vectors_folder: a run's `normalized_vectors` (or `raw_vectors`) folder, or the run folder itself.

    Raises:
        ProbeMismatchError: the vectors come from another model, hidden size or layer ("cache/probe mismatch").
        ConfigError: a requested layer has no vector or is not in the cache.
    """
    vectors = load_vectors(find_vectors(vectors_folder))
    wanted = sorted(layers or vectors)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    labels = store.column(label_field(store))
    texts = store.column("text") if "text" in store.tables()[0].column_names else [""] * len(labels)
    index = store.column("example_index")
    rows, distributions = [], {}
    for layer in wanted:
        if layer not in vectors:
            raise ConfigError(
                f"No vector for layer {layer} in {vectors_folder} (vectors: {', '.join(map(str, sorted(vectors)))})."
            )
        vector = vectors[layer]
        vector.check_compatible(store.model, hidden_size=store.hidden_size, layer=layer)
        scores = project(store.layer(layer), vector.vector).tolist()
        with open(output / f"probe_stats_layer{layer}.csv", "w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["index", "type", "mean_score", "text"])
            out.writerows(zip(index, labels, scores, texts))
        mask, _, _ = split_labels(labels, vector.positive_label)
        point, low, high = bootstrap_auroc(scores, mask, n_resamples=n_resamples)
        rows.append(
            {
                "layer": layer,
                "auroc": point,
                "auroc_low": low,
                "auroc_high": high,
                "n": len(labels),
                "n_positive": int(mask.sum()),
                "positive": vector.positive_label,
            }
        )
        distributions[layer] = {
            name: [s for s, lab in zip(scores, labels) if str(lab) == name] for name in sorted({str(v) for v in labels})
        }
    with open(output / "summary.csv", "w", newline="") as handle:
        table = csv.DictWriter(handle, fieldnames=list(rows[0]))
        table.writeheader()
        table.writerows(rows)
    (output / "summary.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    if visualize:
        from .plots import plot_auroc_by_layer, plot_score_distributions

        title = f"Probe AUROC by layer ({store.model.get('name')})"
        plot_auroc_by_layer(rows, output / "auroc_by_layer.png", title=title)
        for layer, groups in distributions.items():
            plot_score_distributions(groups, output / f"scores_layer{layer}.png", title=f"Scores at layer {layer}")
    return rows
