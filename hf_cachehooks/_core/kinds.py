"""What each kind's own manifest fields must hold: part of the entry contract, so every reader applies it.

`entry.shape_problem` calls `fields_problem` after the reserved fields, so `inspect`, `open_entry`, the
management commands (ls, du, prune, clear, verify) and a pull from object storage all give one verdict,
whichever feature is imported. The checks live here, not in the features, because the contract may
import nothing above it: a check is pure over the parsed manifest, and a kind that names files in its
own fields names only files its `files` lists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")  # the activation store's `dtype` (bf16 travels as its bits)
LINK_KIND = "store-link"  # the root's record of an activation store outside it (written by the store)


def _activations_problem(doc: dict) -> str | None:
    """The activation store (`activations/store.py`): layers, sizes, and chunks that name listed shards."""
    chunks, layers = doc.get("chunks"), doc.get("layers")
    if (
        not isinstance(chunks, list)
        or not chunks
        or not isinstance(layers, list)
        or not all(isinstance(x, int) for x in layers)
        or not isinstance(doc.get("hidden_size"), int)
        or not isinstance(doc.get("num_examples"), int)
        or doc.get("dtype") not in ACTIVATION_DTYPES
        or not isinstance(doc.get("positions"), str)
    ):
        return "manifest fields chunks/layers/hidden_size/num_examples/dtype/positions are missing or malformed"
    for chunk in chunks:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("rows"), int) or chunk["rows"] < 0:
            return f"malformed chunk record {chunk!r:.80}"
        if not isinstance(chunk.get("file"), str) or chunk["file"] not in doc["files"]:
            return f"chunk file {chunk.get('file')!r:.80} is not a file the manifest lists"
        offsets = chunk.get("offsets", {})
        if not isinstance(offsets, dict) or not all(isinstance(v, int) and v >= 0 for v in offsets.values()):
            return f"malformed layer offsets in chunk record {chunk!r:.80}"
    return None


FIELD_CHECKS: dict[str, Callable[[dict], str | None]] = {  # kind -> why its own fields are unusable
    "activations": _activations_problem,
}


def fields_problem(doc: dict[str, Any]) -> str | None:
    """Why the kind's own fields of a manifest whose reserved fields are sound are unusable, or None.

    A kind without a check here is judged by the reserved fields alone.
    """
    check = FIELD_CHECKS.get(doc["kind"])
    return check(doc) if check is not None else None
