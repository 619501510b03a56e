"""What an activation store is made from: the records, the extraction settings, and the key over both.

`ExtractionSpec` holds the settings once, so `cache_activations`, `cache_activations_from_path` and the CLI
pass one value around instead of the same ten keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._core.fingerprint import fingerprint_data
from .._core.keys import Key, make_key
from .._models.extraction import POSITIONS
from ..errors import ConfigError
from .store import DTYPES


@dataclass(frozen=True)
class ExtractionSpec:
    """The settings of one extraction; all are in the store's key except `batch_size` and `shard_size`.

    Args:
        layers: layer indices, 0..num_layers (kept sorted and unique).
        positions: "last" non-padding token, "first", "mean" over non-padding tokens, or "all" (a row per token).
        dtype: "float16", "bfloat16" (kept bit-exact) or "float32".
        text_field, label_field: record fields; the label field defaults to "type" when present, else "label".
        use_chat_template, system_prompt: wrap each text in the tokenizer's chat template first.
        max_length: truncate texts to this many tokens (None: the tokenizer's own limit).
        batch_size, shard_size: how to run (see `cache_activations`); they may change between runs.

    Raises:
        ConfigError: an unknown `positions` or `dtype` (names the choices).

    Example:
        >>> spec = ExtractionSpec((10, 20), positions="mean", dtype="bfloat16")
    """

    layers: tuple[int, ...]
    positions: str = "last"
    dtype: str = "float16"
    text_field: str = "text"
    label_field: str | None = None
    use_chat_template: bool = False
    system_prompt: str | None = None
    max_length: int | None = None
    batch_size: int = 8
    shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported. Use one of: {', '.join(DTYPES)}.")
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions={self.positions!r} is not supported. Use one of: {', '.join(POSITIONS)}.")
        object.__setattr__(self, "layers", tuple(sorted({int(layer) for layer in self.layers})))

    def records(self, data: Any) -> list[dict]:
        """The rows of `data` under these fields (see `load_records`)."""
        return load_records(data, self.text_field, self.label_field or "label")

    def key(self, model: dict, tokenizer: dict | None, rows: list[dict]) -> Key:
        """A store's key from model and tokenizer identities (a loaded model's, or the ones remembered for its
        files) and the rows."""
        return make_key(
            "activations",
            {
                "model": model,
                "tokenizer": tokenizer,
                "data": {
                    "fingerprint": fingerprint_data(rows),
                    "n": len(rows),
                    "text_field": self.text_field,
                    "label_field": default_label_field(rows, self.label_field),
                },
                "layers": list(self.layers),
                "positions": self.positions,
                "dtype": self.dtype,
                "max_length": self.max_length,
                "template": {"chat_template": self.use_chat_template, "system_prompt": self.system_prompt},
            },
        )


def load_records(data: Any, text_field: str = "text", label_field: str = "label") -> list[dict]:
    """Rows from a list, a `Dataset` or a JSON/JSONL file; contrastive pairs become two labelled rows.

    A pair is a record with `positive` and `negative` texts: it yields
    {text_field: positive, label_field: "positive", "pair": i} and the same for the negative.

    Raises:
        ConfigError: the records have no `text_field` (names the fields they have).
    """
    from .._core.rows import load_rows

    rows = load_rows(data)
    if rows and "positive" in rows[0] and "negative" in rows[0] and text_field not in rows[0]:
        rows = [
            {text_field: r[side], label_field: side, "pair": i}
            for i, r in enumerate(rows)
            for side in ("positive", "negative")
        ]
    if rows and text_field not in rows[0]:
        raise ConfigError(
            f"Records have no field {text_field!r} (fields: {', '.join(sorted(rows[0]))}). "
            "Set text_field=, or give contrastive pairs with 'positive' and 'negative'."
        )
    return rows


def default_label_field(rows: list[dict], label_field: str | None) -> str:
    """The label field in effect: the one given, else "type" when records have it (contrastive pairs), else "label"."""
    if label_field is not None:
        return label_field
    return "type" if rows and "type" in rows[0] else "label"
