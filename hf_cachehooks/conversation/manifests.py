"""The conversation cache's manifests on disk: read and validated once per change of their file, committed last.

One `conversation.json` per conversation folder is the entry (see `files.manifest_problem` for what makes one
sound); `.last_access` beside it is touched by reads at most once a second, so idle expiry can see them.
Each manifest records the model that wrote it (`model_record`): its hidden states and lens are that model's
alone, so a cache serving another model refuses it (`other_model`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from .._core import entry
from .._core.keys import diff_inputs
from .._core.store import unseal
from ..errors import CorruptEntryError
from .files import FORMAT_VERSION, KIND, MANIFEST, TOUCH, TOUCH_EVERY, manifest_problem

log = logging.getLogger(__name__)


def model_record(model: Any, tokenizer: Any) -> dict:
    """What a conversation records of the model that computes its tokens, hidden states and lens.

    The model's identity as the other caches key it (weights hashed as loaded, config, class, dtype,
    quantisation, adapters, mode), less its name and revision, plus the tokenizer's identity (vocabulary,
    special tokens, chat template, ...). Plain JSON data.
    """
    from .._models.identity import computed, model_identity, tokenizer_identity

    weights = computed(model_identity(model))
    return {"model": weights, "tokenizer": tokenizer_identity(tokenizer)}


def other_model(conv_id: str, doc: dict, record: dict | None) -> str | None:
    """Why conversation `conv_id` (its sound manifest `doc`) is not one the model of `record` may serve or
    continue; None when it is. A cache made without a model (`record` None) serves any conversation, and
    continues only those that record no model either."""
    recorded = doc.get("model")
    if record is None:
        if recorded is None:
            return None
        why = (
            "records the model that wrote it, and this TokenCache was made without one: pass model= and "
            "tokenizer= to TokenCache to continue it"
        )
    elif recorded == record:
        return None
    elif not isinstance(recorded, dict):
        why = (
            "was stored without the identity of the model that wrote it (by an older version, or by a "
            "TokenCache made without model=), so its hidden states and lens cannot be told to be this model's"
        )
    else:
        changes = diff_inputs(recorded, record)
        why = (
            f"was written by another model ({', '.join(changes[:3])}{', ...' if len(changes) > 3 else ''}); its "
            "hidden states and lens are that model's"
        )
    return (
        f"Conversation {conv_id!r} {why}. Start a new conversation id for another model, or serve this one "
        "with the model that wrote it."
    )


def started(conv_id: str, model: dict | None, dims: dict, now: float) -> dict:
    """A new conversation's manifest, before its first turn: a fresh uid, the `model_record` of the model that
    writes it, and `dims` (layers, hidden, hidden_dtype) that every turn of it shares."""
    return {
        "format": FORMAT_VERSION,
        "conv_id": conv_id,
        "uid": uuid.uuid4().hex,
        "created_at": now,
        "pinned": False,
        "tokens": 0,
        "turns": [],
        "meta": {},
        "k": None,
        "files": {},
        "model": model,
        **dims,
    }


def appended(doc: dict, count: int, k: int | None, compression: str, meta: dict, now: float) -> dict:
    """A copy of manifest `doc` with one more turn of `count` tokens, whose record names no file yet (the disk
    tier names them as it writes them), `meta` merged in, and, when `k` is given, the turn's top-k lens."""
    turn = {
        "file": None,
        "start": doc["tokens"],
        "count": count,
        "bytes": 0,
        "lens_file": None,
        "lens_bytes": 0,
        "k": k,
        "compression": compression,
        "created_at": now,
    }
    new = {
        **doc,
        "tokens": doc["tokens"] + count,
        "turns": [*doc["turns"], turn],
        "last_access": now,
        "meta": {**doc["meta"], **meta},
        "files": dict(doc["files"]),
    }
    if k is not None:
        new["k"] = k
    return new


class Manifests:
    """The manifests under one conversations folder, each parsed again only when its file changed.

    Whether the file changed is the entry contract's call (`entry.inspect(..., reuse=True)`: inode, size,
    mtime and ctime, so a manifest rewritten in place with its size and mtime restored is read again);
    this class only remembers what it derived from the parse it was handed: the verdict and the turn starts.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memo: dict[str, tuple[dict, str | None, list[int]]] = {}  # conv_id -> (parsed doc, problem, starts)
        self._refused: dict[str, str] = {}  # conv_id -> the problem last logged, so each is logged once
        self._touched: dict[str, float] = {}

    def read(self, conv_id: str) -> tuple[dict, list[int]] | None:
        """The sound manifest of `conv_id` and its turn starts, re-read only when its file changed (another
        process appended, pinned or deleted); None when there is none or it is refused (logged once)."""
        path = self.root / conv_id / MANIFEST
        found, problem = entry.inspect(path, check="manifest", reuse=True)
        if found is None:
            self._memo.pop(conv_id, None)
            if problem is None:  # no manifest (deleted, or never written)
                self._refused.pop(conv_id, None)
            else:
                self._refuse(conv_id, path, problem, None)
            return None
        known = self._memo.get(conv_id)
        if known is None or known[0] is not found.doc:  # another parse: the file changed, or was not remembered
            problem = manifest_problem(found.doc, conv_id)
            known = (found.doc, problem, [] if problem else [t["start"] for t in found.doc["turns"]])
            self._memo[conv_id] = known  # holds the doc, so `is` above never meets a recycled id
        if known[1] is not None:
            self._refuse(conv_id, path, known[1], found.doc)
            return None
        self._refused.pop(conv_id, None)
        return found.doc, known[2]

    def forget(self, conv_id: str) -> None:
        self._memo.pop(conv_id, None)

    def _refuse(self, conv_id: str, path: Path, problem: str, doc: dict | None) -> None:
        """Log why the manifest at `path` is not served, once per conversation and problem."""
        if self._refused.get(conv_id) == problem:
            return
        self._refused[conv_id] = problem
        if doc is None:
            with contextlib.suppress(OSError, CorruptEntryError):
                doc = unseal(path.read_bytes())
        old = isinstance(doc, dict) and doc.get("hf_cachehooks_entry") is None and "format" in doc
        log.log(
            logging.INFO if old else logging.WARNING,
            "Manifest %s is not served as conversation %s (%s); treating it as a miss.",
            path,
            conv_id,
            problem,
        )

    def foreign_owner(self, conv_id: str) -> str | None:
        """The id of another conversation whose sound manifest sits in `conv_id`'s folder (folders swapped)."""
        try:
            doc = unseal((self.root / conv_id / MANIFEST).read_bytes())
        except (OSError, CorruptEntryError):
            return None
        other = doc.get("conv_id") if isinstance(doc, dict) and doc.get("kind") == KIND else None
        return other if isinstance(other, str) and other != conv_id and manifest_problem(doc, other) is None else None

    def commit(self, conv_id: str, doc: dict) -> bool:
        """Write `doc` as the conversation's manifest, last, after the files its `files` lists."""
        key = {"kind": KIND, "digest": doc["uid"], "inputs": {"conv_id": conv_id, "uid": doc["uid"]}}
        return entry.commit(self.root / conv_id / MANIFEST, KIND, key, doc["files"], doc, created_at=doc["created_at"])

    def touch(self, conv_id: str, now: float) -> None:
        """Stamp the conversation's last access (at most once a second, so reads stay nearly write-free)."""
        if now - self._touched.get(conv_id, float("-inf")) < TOUCH_EVERY:
            return
        self._touched[conv_id] = now
        path = self.root / conv_id / TOUCH
        with contextlib.suppress(OSError):  # the folder may be gone or read-only; never recreate it
            if not path.exists():
                path.write_bytes(b"")
            os.utime(path, (now, now))

    def last_access(self, conv_id: str, doc: dict) -> float:
        """The later of the manifest's `last_access` and the `.last_access` stamp."""
        try:
            touched = (self.root / conv_id / TOUCH).stat().st_mtime
        except OSError:
            touched = 0.0
        return max(float(doc.get("last_access", doc["created_at"])), touched)
