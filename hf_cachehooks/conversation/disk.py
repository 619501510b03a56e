"""The token cache's disk tier: per conversation a folder of turn files and, written last, the manifest listing them.

The tree is drawn in `cache`. Writes to one conversation serialize on a thread lock and a cross-process lease. A
conversation whose write the disk refused (full, read-only, locked, a folder holding another conversation's manifest)
keeps its manifest here in memory only, and its turns live in the memory tier alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .._core import entry
from .._core.cache_config import CacheConfig
from .._core.locking import lease
from .._core.store import tag_folder
from ..errors import MissingDependencyError
from .files import CONV_ID, MANIFEST, SUFFIX, codec
from .manifests import Manifests, other_model

log = logging.getLogger(__name__)
LOCK_REFUSED = "cannot take the conversation's lock"


class DiskTier:
    """The manifests and turn files of the conversations under `root`, and the manifests of those kept in memory only.

    Args:
        root: the conversations folder.
        settings: the disk tier's `CacheConfig` (its lease's staleness; the idle limit is the caller's).
        compression: the codec turn files are written with: "none", "lz4" or "zstd".
        model_record: the identity of the model whose conversations `read` serves (None: every conversation).

    Raises:
        MissingDependencyError: the codec's package is not installed (now, not mid-chat).
    """

    def __init__(self, root: Path, settings: CacheConfig, compression: str, model_record: dict | None) -> None:
        self.root, self.model_record = root, model_record
        self._stale_after = settings.stale_after_seconds
        self._compression, self._codec = compression, codec(compression)
        self._manifests = Manifests(root)  # re-read only when their file changed
        self._memory_only: dict[str, dict] = {}  # conv_id -> manifest, for conversations the disk refused
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._refusals: set[tuple[str, str]] = set()  # (conv_id, reason) already logged
        self._tagged = False

    # Reading manifests -----------------------------------------------------------------------------

    def read(self, conv_id: str, served: bool = True) -> tuple[dict, list[int]] | None:
        """The manifest and its turn starts: a memory-only conversation's, else the disk's (see `Manifests`).

        `served`: only a conversation this tier's model may serve (another model's is None, logged once).
        """
        if conv_id in self._memory_only:
            doc = self._memory_only[conv_id]
            return doc, [t["start"] for t in doc["turns"]]
        found = self._manifests.read(conv_id)
        if found is None or not served or self.model_record is None:
            return found
        refused = other_model(conv_id, found[0], self.model_record)
        if refused is None:
            return found
        if (conv_id, refused) not in self._refusals:
            self._refusals.add((conv_id, refused))
            log.warning("%s Its tokens are not served here.", refused)
        return None

    def manifest(self, conv_id: str, served: bool = True) -> dict | None:
        """The manifest alone, as `read` finds it."""
        found = self.read(conv_id, served)
        return None if found is None else found[0]

    def turn_starting(self, conv_id: str, start: int) -> tuple[dict, int] | None:
        """The manifest and the number of the turn that begins at token `start`; None when there is none."""
        found = self.read(conv_id)
        if found is None or start not in found[1]:
            return None
        return found[0], found[1].index(start)

    def memory_only(self, conv_id: str) -> bool:
        """Whether the conversation's manifest is kept in memory only (the disk refused a write)."""
        return conv_id in self._memory_only

    def names(self) -> list[str]:
        """Every conversation id, sorted: those kept in memory only and those with a folder here."""
        names = set(self._memory_only)
        with contextlib.suppress(OSError):
            names |= {p.name for p in self.root.iterdir() if p.is_dir() and CONV_ID.fullmatch(p.name)}
        return sorted(names)

    def row(self, conv_id: str) -> dict | None:
        """conv_id, tokens, turns, bytes, pinned, last_access and created_at of a conversation, whatever model
        wrote it; None when it is unknown."""
        doc = self.manifest(conv_id, served=False)
        if doc is None:
            return None
        return {
            "conv_id": conv_id,
            "tokens": doc["tokens"],
            "turns": len(doc["turns"]),
            "bytes": sum(t["bytes"] + t["lens_bytes"] for t in doc["turns"]),
            "pinned": doc["pinned"],
            "last_access": self._manifests.last_access(conv_id, doc),
            "created_at": doc["created_at"],
        }

    def touch(self, conv_id: str, now: float) -> None:
        """Stamp a read of the conversation (see `Manifests.touch`); nothing for a memory-only one."""
        if conv_id not in self._memory_only:
            self._manifests.touch(conv_id, now)

    # Writing ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, conv_id: str) -> Iterator[bool]:
        """Hold the conversation's thread lock and its cross-process lease for the block; yields False when
        the lease cannot be taken (the folder is unwritable): then nothing may be written to disk."""
        with self._guard:
            lock = self._locks.setdefault(conv_id, threading.Lock())
        with lock, lease(self.root / ".locks" / f"{conv_id}.lock", stale_after=self._stale_after) as locked:
            yield locked

    def tag(self) -> None:
        """Mark the folder as this library's cache (once per instance)."""
        if not self._tagged:
            self._tagged = True
            tag_folder(self.root)

    def append(self, conv_id: str, doc: dict, arrays: dict[str, np.ndarray], locked: bool) -> None:
        """Store manifest `doc`, whose last turn holds `arrays`: the turn's files, then the manifest, last.

        Call under `hold` (`locked` is what it yielded). A memory-only conversation, or one whose write the disk
        refuses (logged as a warning), keeps `doc` in memory only, and its new turn names no file.
        """
        if conv_id not in self._memory_only and (why := self._write_turn(conv_id, doc, arrays, locked)):
            log.warning(
                "Cannot write turn %d of conversation %s under %s (%s); keeping it in memory only.",
                len(doc["turns"]) - 1,
                conv_id,
                self.root,
                why,
            )
        if doc["turns"][-1]["file"] is None:
            self._memory_only[conv_id] = doc

    def _write_turn(self, conv_id: str, doc: dict, arrays: dict[str, np.ndarray], locked: bool) -> str | None:
        """Write the last turn of `doc`, then `doc` as the manifest; None, or why not (the turn then names no file)."""
        turn_no, turn = len(doc["turns"]) - 1, doc["turns"][-1]
        if not locked:
            return LOCK_REFUSED
        if turn_no == 0 and (owner := self._manifests.foreign_owner(conv_id)):
            return f"its folder holds conversation {owner!r:.80}'s manifest; not overwriting it"
        try:
            turn.update(self._write_part(conv_id, doc["uid"], turn_no, arrays, doc["files"], lens=False))
            if "topk_ids" in arrays:
                turn.update(self._write_part(conv_id, doc["uid"], turn_no, arrays, doc["files"], lens=True))
            if self._manifests.commit(conv_id, doc):
                return None
            why = "manifest not written"
        except OSError as exc:
            why = str(exc)
        turn.update(file=None, bytes=0, lens_file=None, lens_bytes=0)  # files written so far stay listed, unnamed
        return why

    def add_lens(self, conv_id: str, doc: dict, turn_no: int, lens: dict[str, np.ndarray], locked: bool) -> None:
        """Store the lens of turn `turn_no` of manifest `doc`: its file (unless the turn is in memory only),
        then the manifest. Call under `hold`. A write the disk refuses is logged: the lens stays in memory."""
        turn = doc["turns"][turn_no]
        k = int(lens["topk_ids"].shape[2])
        new_turn, files = {**turn, "k": k, "stats": "stats" in lens}, dict(doc["files"])
        why = None
        if turn["file"] is not None and not locked:
            why = LOCK_REFUSED
        elif turn["file"] is not None:
            try:
                new_turn.update(self._write_part(conv_id, doc["uid"], turn_no, lens, files, lens=True))
            except OSError as exc:
                why = str(exc)
        if why is not None:
            log.warning(
                "Cannot write the lens of turn %d of conversation %s (%s); it stays in memory.", turn_no, conv_id, why
            )
        turns = [*doc["turns"][:turn_no], new_turn, *doc["turns"][turn_no + 1 :]]
        new = {**doc, "k": k, "turns": turns, "files": files}
        if (conv_id in self._memory_only or new_turn["lens_file"]) and not self.save(conv_id, new):
            log.warning(
                "Cannot update the manifest of conversation %s; the lens of turn %d stays in memory.", conv_id, turn_no
            )

    def save(self, conv_id: str, doc: dict) -> bool:
        """Replace the conversation's manifest with `doc`: in memory for a memory-only conversation, else on disk
        (False when the disk refused). Call under `hold`."""
        if conv_id in self._memory_only:
            self._memory_only[conv_id] = doc
            return True
        return self._manifests.commit(conv_id, doc)

    def _write_part(
        self, conv_id: str, uid: str, turn_no: int, arrays: dict[str, np.ndarray], files: dict, lens: bool
    ) -> dict:
        """Write a turn's hidden part or its lens part, record it in `files`; return the turn fields that name it.

        Raises:
            OSError: the disk refused it (full, read-only): the caller keeps the turn in memory.
        """
        try:
            from safetensors.numpy import save
        except ImportError as exc:
            raise MissingDependencyError("The token cache writes safetensors: pip install safetensors.") from exc
        parts = ("topk_ids", "topk_probs", "stats") if lens else ("token_ids", "hidden")
        names = [n for n in parts if n in arrays]
        data = save(
            {n: arrays[n] for n in names},
            metadata={
                "format": "hf_cachehooks.conversation.cache",
                "uid": uid,
                "turn": f"{turn_no}-lens" if lens else str(turn_no),
            },
        )
        if self._codec is not None:
            data = self._codec[0](data)
        name = f"{'lens' if lens else 'turn'}-{turn_no:05d}{SUFFIX[self._compression]}"
        files[name] = entry.write_file(self.root / conv_id, name, data)
        return {"lens_file": name, "lens_bytes": len(data)} if lens else {"file": name, "bytes": len(data)}

    # Removing --------------------------------------------------------------------------------------

    def knows(self, conv_id: str) -> bool:
        """Whether the conversation may be here: kept in memory only, or with a folder (checked before `hold`,
        so removing an unknown id creates no lock file)."""
        return conv_id in self._memory_only or (self.root / conv_id).is_dir()

    def unchanged(self, conv_id: str, last_access: float) -> bool:
        """Whether the conversation is still here, unpinned and last accessed at `last_access` (as eviction
        planned it: not used, pinned or removed since)."""
        doc = self.manifest(conv_id, served=False)
        return doc is not None and not doc["pinned"] and self._manifests.last_access(conv_id, doc) == last_access

    def remove(self, conv_id: str) -> bool:
        """Forget the conversation's memory-only manifest, and remove its manifest and the files it lists from disk.

        Call under `hold`. A file the manifest does not list stays, and so does a folder holding another
        conversation's manifest; a damaged manifest goes. False when there was nothing to remove.
        """
        existed = self._memory_only.pop(conv_id, None) is not None
        self._manifests.forget(conv_id)
        path = self.root / conv_id / MANIFEST  # the disk's entry, also under a memory-only conversation
        ours = self._manifests.read(conv_id) is not None
        if ours or (path.exists() and self._manifests.foreign_owner(conv_id) is None):
            entry.remove_entry(path)  # manifest renamed away first; then only the files it lists (plain names)
            self._manifests.forget(conv_id)
            existed = True
        return existed
