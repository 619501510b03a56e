"""Metrics computed through `evaluate`, from metric scripts shipped in `metric_scripts/` (no Hub needed).

Each metric has a version (the hash of its script), stored with the predictions, so a changed or
added metric is recomputed from cached predictions without predicting again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._core.keys import hash_bytes
from ..errors import ConfigError, MissingDependencyError

_SCRIPTS = Path(__file__).parent / "metric_scripts"
METRICS = tuple(sorted(p.stem for p in _SCRIPTS.glob("*.py") if not p.stem.startswith("_")))
GENERATION_METRICS = ("contains_answer", "exact_match")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")


def metric_versions(names: Sequence[str]) -> dict[str, str]:
    """{name: version} for the requested metrics; an unknown name raises with the known ones."""
    versions = {}
    for name in names:
        script = _SCRIPTS / f"{name}.py"
        if name.startswith("_") or not script.is_file():
            raise ConfigError(f"Unknown metric {name!r}. Available: {', '.join(METRICS)}.")
        versions[name] = hash_bytes(script.read_bytes())[:12]
    return versions


def compute_metrics(names: Sequence[str], predictions: list, references: list) -> dict[str, Any]:
    """Run each metric through `evaluate.load(<shipped script>)` and merge their results."""
    try:
        import evaluate
    except ImportError as exc:
        raise MissingDependencyError("Metrics need `evaluate`: pip install 'hf_cachehooks[eval]'.") from exc
    results: dict[str, Any] = {}
    for name in names:
        metric_versions([name])
        module = evaluate.load(str(_SCRIPTS / f"{name}.py"))
        refs = references
        if name in GENERATION_METRICS:
            refs = [r if isinstance(r, list) else [str(r)] for r in references]
        results.update(module.compute(predictions=predictions, references=refs))
    return results
