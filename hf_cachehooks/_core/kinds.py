"""What each kind's own manifest fields must hold: part of the entry contract, so every reader applies it.

`entry.shape_problem` calls `fields_problem` after the reserved fields, so `inspect`, `open_entry`, the
management commands (ls, du, prune, clear, verify) and a pull from object storage all give one verdict,
whichever feature is imported. The checks live here, not in the features, because the contract may
import nothing above it: a check is pure over the parsed manifest, and a kind that names files in its
own fields names only files its `files` lists.

Each kind also says what its entry holds in a line (`SUMMARIES`: the model it was made with, how many
items, when it was last used), so `entry.commit` writes one `summary` at the top of every manifest and
the management commands read that alone, without knowing any kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")  # the activation store's `dtype` (bf16 travels as its bits)
LINK_KIND = "store-link"  # the root's record of an activation store outside it (written by the store)
LINKED_KIND, LINKED_MANIFEST = "activations", "manifest.json"  # what a link names: the store's manifest in its folder
MISS_KIND = "last-miss"  # a cache's record of why its last lookup missed (`explain` shows it)
BOOKKEEPING = ("file-hashes", "identity", "last-miss")  # recomputable memos: `ls` shows them only when asked
TOUCHED_BY_READS = frozenset({"conversation"})  # kinds whose reads touch `.last_access` in the entry's folder


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


def _name(value: Any) -> str | None:
    """A model name given as a string or as an identity record (`{"name": ...}`)."""
    if isinstance(value, dict):
        value = value.get("name")
    return value if isinstance(value, str) and value else None


def _of(doc: dict, *names: str) -> Any:
    """`doc[a][b]...`, or None where a level is missing or not a dict."""
    value: Any = doc
    for name in names:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _keyed_model(doc: dict) -> str | None:
    return _name(_of(doc, "key", "inputs", "model"))


def _predictions(doc: dict) -> dict:
    """A run made during training (`CachedEvalCallback` records its `step`) shows as `model@step-N`."""
    model = _name(_of(doc, "metadata", "model_name")) or _keyed_model(doc)
    step = _of(doc, "metadata", "step")
    if model and type(step) is int:
        model = f"{model}@step-{step}"
    return {"model": model, "items": _of(doc, "metadata", "dataset_size")}


def _example_predictions(doc: dict) -> dict:
    rows = doc.get("rows")
    return {"model": _keyed_model(doc), "items": len(rows) if isinstance(rows, dict) else None}


def _conversation(doc: dict) -> dict:
    """A conversation is used by reading it: its `last_access` at the last append, and reads' `.last_access`."""
    return {
        "model": _name(_of(doc, "meta", "model")) or _name(doc.get("conv_id")),
        "items": doc.get("tokens"),
        "last_used": doc.get("last_access"),
        "pinned": doc.get("pinned") is True,
    }


SUMMARIES: dict[str, Callable[[dict], dict[str, Any]]] = {  # kind -> its summary fields, from its whole manifest
    "predictions": _predictions,
    "example-predictions": _example_predictions,
    "generations": lambda d: {"model": _name(d.get("model")) or _keyed_model(d), "items": d.get("num_samples")},
    "activations": lambda d: {"model": _keyed_model(d), "items": d.get("num_examples")},
    "conversation": _conversation,
    "identity": lambda d: {"model": _name(_of(d, "identity", "model"))},
    "last-miss": lambda d: {"model": _keyed_model(d)},
    "trainer-eval": lambda d: {"model": _name(d.get("model")) or _keyed_model(d), "items": d.get("num_samples")},
    "lm-eval-results": lambda d: {"model": _name(d.get("model")), "items": d.get("requests")},  # `harness/results.py`
}


def summary_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The `summary` of a manifest whose reserved fields are sound: what `ls`, `du` and `prune` read.

    `{"model": str ("-" when unknown), "items": int, "bytes": int (the listed files' recorded sizes; not the
    manifest's own), "created": epoch s, "last_used": epoch s}`, plus `"pinned": true` for an entry `prune`
    must keep. A kind without a function here is summarised by its reserved fields alone.
    """
    own = SUMMARIES.get(doc["kind"], dict)(doc)
    items, last = own.get("items"), own.get("last_used")
    created = float(doc["created_at"])
    used = max(created, float(last)) if isinstance(last, (int, float)) and not isinstance(last, bool) else created
    summary: dict[str, Any] = {
        "model": own.get("model") if isinstance(own.get("model"), str) and own["model"] else "-",
        "items": items if type(items) is int and items >= 0 else 0,
        "bytes": sum(r["bytes"] for r in doc["files"].values() if isinstance(r, dict) and type(r.get("bytes")) is int),
        "created": created,
        "last_used": used,
    }
    if own.get("pinned") is True:
        summary["pinned"] = True
    return summary
