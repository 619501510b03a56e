"""Metrics computed by `evaluate` metric modules shipped in `metric_scripts/` (no Hub needed).

Each metric has a version (the hash of its script), stored with the predictions, so a changed or
added metric is recomputed from cached predictions without predicting again. Each script is an
`evaluate.Metric` loaded with `evaluate.load`; its `_compute` is called on the inputs encoded as its
declared features would encode them (`str`, `int`, ... per value). That skips `Metric.compute`'s Arrow
round trip, which for 100k predictions costs seconds and gives these scripts the very same lists.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from .._core.keys import hash_bytes
from ..errors import ConfigError, MissingDependencyError

_SCRIPTS = Path(__file__).parent / "metric_scripts"
METRICS = tuple(sorted(p.stem for p in _SCRIPTS.glob("*.py") if not p.stem.startswith("_")))
GENERATION_METRICS = ("contains_answer", "exact_match")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
_SCRIPT_DIR = str(_SCRIPTS)
_RACY_NS = 10_000_000  # file times tick by 1-10 ms: a stamp is trusted once its tick has passed
_versions: dict[str, tuple[tuple[int, int, int, int], str]] = {}  # script -> (its stamp, version): read once per change
_loaded: dict[str, Any] = {}  # script version -> its evaluate module (a changed script has a new version)


def metric_versions(names: Sequence[str]) -> dict[str, str]:
    """{name: version} for the requested metrics; an unknown name raises with the known ones."""
    versions = {}
    for name in names:
        script = os.path.join(_SCRIPT_DIR, f"{name}.py")
        try:
            st = os.stat(script)
        except (OSError, ValueError):
            st = None
        if name.startswith("_") or st is None or not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"Unknown metric {name!r}. Available: {', '.join(METRICS)}.")
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _versions.get(script)
        if known is not None and known[0] == stamp:  # unchanged since read: a cache hit reads no script
            versions[name] = known[1]
            continue
        with open(script, "rb") as handle:
            versions[name] = hash_bytes(handle.read())[:12]
        if time.time_ns() - st.st_ctime_ns > _RACY_NS:  # a change within the file-time tick could keep the stamp
            _versions[script] = (stamp, versions[name])
    return versions


def compute_metrics(names: Sequence[str], predictions: list, references: list) -> dict[str, Any]:
    """Run each metric's script on the predictions and references and merge their results."""
    try:
        import evaluate
    except ImportError as exc:
        raise MissingDependencyError("Metrics need `evaluate`: pip install 'hf_cachehooks[eval]'.") from exc
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    results: dict[str, Any] = {}
    listed: list | None = None
    for name, version in metric_versions(names).items():
        module = _loaded.get(version)
        if module is None:
            module = _loaded[version] = evaluate.load(str(_SCRIPTS / f"{name}.py"))
        refs = references
        if name in GENERATION_METRICS:
            if listed is None:  # once per call, shared by the generation metrics
                listed = [r if isinstance(r, list) else [str(r)] for r in references]
            refs = listed
        features = module.features
        results.update(
            module._compute(
                predictions=_encoded(features["predictions"], predictions),
                references=_encoded(features["references"], refs),
            )
        )
    return results


def _encoded(feature: Any, values: list) -> list:
    """`values` as `datasets` would encode them for `feature` (a `Value`, or a `Sequence`/`List` of one)."""
    inner = getattr(feature, "feature", None)  # `Sequence(...)` / `List(...)` across datasets versions
    if inner is None and isinstance(feature, list):  # the list spelling of a sequence feature
        inner = feature[0]
    if inner is not None:
        if getattr(inner, "feature", None) is None and not isinstance(inner, list):  # lists of plain values
            cast = _cast(inner)
            if set(map(type, values)) == {list} and set(map(type, chain.from_iterable(values))) <= {cast}:
                return values if isinstance(values, list) else list(values)  # already encoded: checked at C speed
        return [None if v is None else _encoded(inner, v) for v in values]
    cast = _cast(feature)
    if set(map(type, values)) <= {cast}:  # already plain values of the type: no copy
        return values if isinstance(values, list) else list(values)
    return [None if v is None else cast(v) for v in values]


def _cast(feature: Any) -> Any:
    dtype = getattr(feature, "dtype", None)
    if not isinstance(dtype, str) or getattr(feature, "feature", None) is not None:
        raise TypeError(f"metric feature {feature!r} is not a Value or a sequence of one")
    if dtype in ("string", "large_string"):
        return str
    if dtype == "bool":
        return bool
    if "int" in dtype:
        return int
    if "float" in dtype:
        return float
    raise TypeError(f"metric feature dtype {dtype!r} has no plain Python encoding here")
