"""The conversation cache's manifests on disk: read and validated once per change of their file, committed last.

One `conversation.json` per conversation folder is the entry (see `files.manifest_problem` for what makes one
sound); `.last_access` beside it is touched by reads at most once a second, so idle expiry can see them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from .._core import entry
from .._core.store import unseal
from ..errors import CorruptEntryError
from .files import KIND, MANIFEST, TOUCH, TOUCH_EVERY, manifest_problem

log = logging.getLogger(__name__)


class Manifests:
    """The manifests under one conversations folder, memoised by their file's (inode, mtime, size)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memo: dict[str, tuple[tuple, dict | None, list[int]]] = {}  # conv_id -> (stat, manifest, starts)
        self._touched: dict[str, float] = {}

    def read(self, conv_id: str) -> tuple[dict, list[int]] | None:
        """The sound manifest of `conv_id` and its turn starts, re-read only when its file changed (another
        process appended, pinned or deleted); None when there is none or it is refused (logged once)."""
        path = self.root / conv_id / MANIFEST
        try:
            st = path.stat()
        except OSError:
            self._memo.pop(conv_id, None)
            return None
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._memo.get(conv_id)
        if cached is not None and cached[0] == signature:
            return None if cached[1] is None else (cached[1], cached[2])
        doc = self._load(conv_id, path)
        starts = [] if doc is None else [t["start"] for t in doc["turns"]]
        self._memo[conv_id] = (signature, doc, starts)  # a refused manifest is refused once, not per lookup
        return None if doc is None else (doc, starts)

    def forget(self, conv_id: str) -> None:
        self._memo.pop(conv_id, None)

    def _load(self, conv_id: str, path: Path) -> dict | None:
        """The manifest at `path` when it is a sound manifest of conversation `conv_id`; else None, logged."""
        try:
            doc = unseal(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, CorruptEntryError) as exc:
            log.warning("Cannot read the manifest of conversation %s (%s); treating it as a miss.", conv_id, exc)
            return None
        problem = manifest_problem(doc, conv_id)
        if problem is not None:
            old = isinstance(doc, dict) and doc.get("hf_cachehooks_entry") is None and "format" in doc
            log.log(logging.INFO if old else logging.WARNING, "Manifest %s is not served as conversation %s (%s); "
                    "treating it as a miss.", path, conv_id, problem)
            return None
        return doc

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
        return entry.commit(self.root / conv_id / MANIFEST, KIND, key, doc["files"], doc,
                            created_at=doc["created_at"])

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
