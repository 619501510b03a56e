"""Steering vectors on disk: one safetensors file per layer, carrying the model, layer and labels it came from.

A vector refuses to score a cache of another model, hidden size or layer ("cache/probe mismatch").
Files are read with safetensors only: never pickle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from .._core.store import atomic_write
from ..errors import ConfigError, CorruptEntryError, HFCacheHooksError, ProbeMismatchError

log = logging.getLogger(__name__)

VECTOR_FORMAT_VERSION = 1
_MODEL_KEYS = ("name", "weights")  # identity fields a probe and a cache must agree on


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A direction in one layer's residual stream, with the model, layer and labels it was trained on."""

    vector: torch.Tensor  # (hidden,) float32
    layer: int
    hidden_size: int
    model: dict  # model identity, e.g. {"name": ..., "weights": ...}
    normalized: bool
    positive_label: str
    negative_label: str
    n_examples: int

    def __post_init__(self) -> None:
        vector = self.vector.detach().reshape(-1).to("cpu", torch.float32).contiguous()
        object.__setattr__(self, "vector", vector)
        if vector.numel() != self.hidden_size:
            raise ConfigError(f"Vector has {vector.numel()} entries but hidden_size is {self.hidden_size}.")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vector and its metadata to one safetensors file, atomically.

        Raises:
            ConfigError: when the model identity is not JSON data.

        Example:
            >>> vector.save("vectors/layer_12.safetensors")  # doctest: +SKIP
        """
        from safetensors.torch import save

        try:
            model = orjson.dumps(self.model, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError as exc:
            raise ConfigError(f"The model identity must be plain JSON data: {exc}.") from exc
        metadata = {
            "format": "hf_cachehooks.steering_vector",
            "format_version": str(VECTOR_FORMAT_VERSION),
            "layer": str(self.layer),
            "hidden_size": str(self.hidden_size),
            "model": model,
            "normalized": "true" if self.normalized else "false",
            "positive_label": self.positive_label,
            "negative_label": self.negative_label,
            "n_examples": str(self.n_examples),
        }
        path = Path(path)
        atomic_write(path, save({"vector": self.vector}, metadata=metadata))  # temp file + os.replace
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a vector written by `save` (safetensors only; nothing is unpickled).

        Raises:
            ConfigError: when there is no file at `path`.
            CorruptEntryError: when the file is not a readable steering vector.

        Example:
            >>> SteeringVector.load("vectors/layer_12.safetensors").layer  # doctest: +SKIP
            12
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"No steering vector at {path}. Run generate-vectors to create it.")
        try:
            tensors = load_file(path)
            with safe_open(path, framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("format") != "hf_cachehooks.steering_vector" or "vector" not in tensors:
                raise CorruptEntryError(f"{path} is not a steering vector file (no hf_cachehooks metadata).")
            if int(meta["format_version"]) > VECTOR_FORMAT_VERSION:
                raise CorruptEntryError(
                    f"{path} has vector format {meta['format_version']}; this version reads up to "
                    f"{VECTOR_FORMAT_VERSION}. Upgrade hf_cachehooks."
                )
            return cls(
                vector=tensors["vector"],
                layer=int(meta["layer"]),
                hidden_size=int(meta["hidden_size"]),
                model=orjson.loads(meta["model"]),
                normalized=meta["normalized"] == "true",
                positive_label=meta["positive_label"],
                negative_label=meta["negative_label"],
                n_examples=int(meta["n_examples"]),
            )
        except HFCacheHooksError:
            raise
        except Exception as exc:  # safetensors' own errors, a missing key, a bad number
            raise CorruptEntryError(f"Cannot read steering vector {path}: {type(exc).__name__}: {exc}") from exc

    def check_compatible(self, model_identity: Mapping[str, Any], hidden_size: int, layer: int | None = None) -> None:
        """Raise unless this vector fits activations from `model_identity` at `hidden_size` (and `layer`).

        Model identity is compared on the keys among ("name", "weights") present in both dicts.

        Raises:
            ProbeMismatchError: naming every field that differs, and the fix.

        Example:
            >>> vector.check_compatible(cache_meta["model"], hidden_size=576, layer=12)  # doctest: +SKIP
        """
        problems = []
        for key in _MODEL_KEYS:
            ours, theirs = self.model.get(key), model_identity.get(key)
            if ours is not None and theirs is not None and ours != theirs:
                label = "weights fingerprint" if key == "weights" else "model name"
                problems.append(f"{label} {_short(ours)} (probe) vs {_short(theirs)} (cache)")
        if hidden_size != self.hidden_size:
            problems.append(f"hidden size {self.hidden_size} (probe) vs {hidden_size} (cache)")
        if layer is not None and layer != self.layer:
            problems.append(f"layer {self.layer} (probe) vs {layer} (cache)")
        if problems:
            fix = "re-run generate-vectors on a cache of the same model"
            if len(problems) == 1 and problems[0].startswith("layer"):
                fix = f"use the vector for layer {layer}, or re-run generate-vectors with that layer"
            raise ProbeMismatchError(f"cache/probe mismatch: {'; '.join(problems)}. Fix: {fix}.")


def _short(value: Any) -> str:
    text = str(value)
    return repr(text if len(text) <= 16 else text[:12] + "…")


def save_vectors(vectors: Mapping[int, SteeringVector], folder: str | os.PathLike) -> list[Path]:
    """Write each vector to `folder/layer_{L}.safetensors`.

    Raises:
        ConfigError: when a dict key differs from its vector's layer.

    Example:
        >>> save_vectors({12: vector}, "outputs/vectors/truth")  # doctest: +SKIP
    """
    folder = Path(folder)
    paths = []
    for layer, vector in sorted(vectors.items()):
        if layer != vector.layer:
            raise ConfigError(f"Vector stored under layer {layer} says it is for layer {vector.layer}.")
        paths.append(vector.save(folder / f"layer_{layer}.safetensors"))
    stale = sorted(p.name for p in folder.glob("layer_*.safetensors") if p not in paths)
    if stale:
        log.warning("%s also holds vectors not written now: %s.", folder, ", ".join(stale))
    return paths


def load_vectors(folder: str | os.PathLike) -> dict[int, SteeringVector]:
    """Read every `layer_{L}.safetensors` in `folder`, keyed by layer.

    Raises:
        ConfigError: when the folder holds no vectors.
        CorruptEntryError: when a file is unreadable or its layer differs from its name.

    Example:
        >>> sorted(load_vectors("outputs/vectors/truth"))  # doctest: +SKIP
        [10, 11, 12]
    """
    folder = Path(folder)
    vectors = {}
    for path in folder.glob("layer_*.safetensors"):
        suffix = path.name[len("layer_") : -len(".safetensors")]
        if not suffix.isdigit():
            continue
        vector = SteeringVector.load(path)
        if vector.layer != int(suffix):
            raise CorruptEntryError(f"{path} holds the vector for layer {vector.layer}; rename or regenerate it.")
        vectors[vector.layer] = vector
    if not vectors:
        raise ConfigError(f"No steering vectors (layer_*.safetensors) in {folder}. Run generate-vectors first.")
    return dict(sorted(vectors.items()))
