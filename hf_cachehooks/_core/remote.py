"""Cache roots on object storage: any fsspec URL as a root, with a verified local read-through copy.

    s3://bucket/team-cache/               the remote root, shared by every machine (gs://, az://, ... alike)
    └── predictions/…, experiments/…      the same layout as a local root: data files, then the manifest

    $HF_CACHEHOOKS_LOCAL_COPY/s3/bucket/team-cache/       (default ~/.cache/hf_cachehooks/remote)
    └── predictions/…                     the local copy every cache reads and writes as a local root
        ├── <data files>                  fetched whole, each checked against the manifest before use
        ├── <manifest>.json               written last, re-sealed with this machine's file stamps
        └── .<manifest>.json.remote       the remote manifest's ETag and xxh3 when it was last fetched

Caches keep their local code path (local disk, zero-copy reads); `store.local_path` maps a URL to its local
copy and `store.url_of` back. This module keeps the local copy and the remote root in step, one whole entry
at a time, through the three hooks of the entry contract (`entry.Mirror`), which it installs on import (the
core's `__init__` imports it, so they are in place before any entry is read or written):

- `push` (after `entry.commit`): upload the entry's data files, then its manifest last. A writer killed
  mid-upload leaves files without a manifest: no entry, for anyone.
- `refresh` (before `entry.open_entry`): one HEAD of the remote manifest; when its ETag is the one fetched
  last, the hit is served from the local copy. Otherwise the manifest is fetched, every file it lists is
  fetched (or found already identical in the local copy) and checked for size and xxh3, and only then is
  the local manifest written. A tampered or damaged remote file is a warning and a miss, never data. An
  entry gone from the remote is gone from the local copy; an unreachable remote serves the local copy.
- `delete` (in `entry.remove_entry`): the remote manifest goes first, then the files it lists.

Endpoint and credentials come from the standard environment of each store (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `GOOGLE_APPLICATION_CREDENTIALS`, ...), read by its fsspec driver.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from ..errors import ConfigError, CorruptEntryError, MissingDependencyError
from . import entry
from .keys import hash_bytes
from .store import atomic_target, atomic_write, copy_base, hash_file, unseal, url_of, write_entry

log = logging.getLogger(__name__)

LOCAL_ONLY = ("file-hashes", "last-miss", "conversation")  # per-machine memos, and the token cache's live files
_SIDE = ".remote"
_TAG_NAME = "CACHEDIR.TAG"
_pushed_tags: set[str] = set()
_JUST_SYNCED_S = 2.0  # a listing's refresh answers the open that follows it, once and only this soon
_just_synced: dict[str, float] = {}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`, listings never cached (other machines write too).

    Raises:
        MissingDependencyError: fsspec or the store's driver is missing (names the package to install).
    """
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise MissingDependencyError(f"Cache root {url!r} needs fsspec: pip install 'hf_cachehooks[remote]'.") from None
    try:
        return url_to_fs(url, use_listings_cache=False)
    except ValueError as exc:  # "Protocol not known"
        raise ConfigError(
            f"Cache root {url!r}: fsspec knows no store {url.split(':')[0]}:// ({exc}); use s3://, "
            "gs://, az://, or a local folder."
        ) from None
    except ImportError as exc:
        raise MissingDependencyError(
            f"Cache root {url!r} needs the fsspec driver for {url.split(':')[0]}:// ({exc}); "
            "pip install 'hf_cachehooks[remote]' for s3://, gcsfs for gs://, adlfs for az://."
        ) from None


def etag(fs: Any, path: str) -> str | None:
    """The store's version tag of one object (ETag, md5, ...), fetched now; None when the store has none.

    Raises:
        FileNotFoundError: no such object.
    """
    fs.invalidate_cache(path)
    info = fs.info(path)
    for name in ("ETag", "etag", "generation", "md5Hash", "mtime"):
        value = info.get(name)
        if value:
            return str(value)
    return None


def _side(path: Path) -> Path:
    return path.with_name(f".{path.name}{_SIDE}")


def _read_side(path: Path) -> dict:
    try:
        doc = orjson.loads(_side(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_side(path: Path, tag: str | None, digest: str) -> None:
    with contextlib.suppress(OSError):
        atomic_write(_side(path), orjson.dumps({"etag": tag, "xxh3": digest}))


def drop_local(path: Path) -> None:
    """Remove the local copy of one entry (never the remote one) and its remote stamp."""
    entry.remove_entry(path, everywhere=False)
    _side(path).unlink(missing_ok=True)


# Down: one entry from the remote into the local copy ---------------------------------------------------


def refresh(path: Path, kind: str | None = None) -> None:
    """Bring the local copy of the entry whose manifest is `path` in step with the remote (no-op when local)."""
    url = url_of(path)
    if url is None or kind in LOCAL_ONLY:
        return
    synced = _just_synced.pop(os.path.abspath(path), None)
    if synced is not None and time.monotonic() - synced < _JUST_SYNCED_S:
        return  # `sync_folder` refreshed it a moment ago, for this very lookup: no second HEAD
    _refresh(Path(path), url)


def _refresh(path: Path, url: str) -> None:
    fs, key = filesystem(url)
    try:
        tag = etag(fs, key)
        known = _read_side(path)
        if tag is not None and known.get("etag") == tag and path.exists():
            return  # unchanged: the hit is served from local disk
        raw = fs.cat_file(key)
    except FileNotFoundError:
        if path.exists() and _side(path).exists():  # it was on the remote once: removed there, so here too
            log.info("Cache entry %s is gone from %s; dropping the local copy.", path.name, url.rsplit("/", 1)[0])
            drop_local(path)
        return
    except Exception as exc:  # any store error (network, auth): the local copy is all we have
        log.warning("Cannot reach %s (%s); using the local copy as it is.", url, exc)
        return
    digest = hash_bytes(raw)
    if known.get("xxh3") == digest and path.exists():
        _write_side(path, tag, digest)
        return
    try:
        problem = fetch_entry(fs, key, raw, path)
    except Exception as exc:  # a store error mid-fetch: files already replaced fail their check on open
        log.warning("Cannot fetch cache entry %s (%s); using the local copy as it is.", url, exc)
        return
    if problem:
        log.warning("Remote cache entry %s is not usable (%s); not serving it, recomputing.", url, problem)
        if path.exists():
            drop_local(path)
        return
    _write_side(path, tag, digest)


def fetch_entry(fs: Any, key: str, raw: bytes, path: Path) -> str | None:
    """Fetch the files the remote manifest `raw` lists into `path`'s folder, check each, then write the manifest.

    Files already in the local copy with the listed size and xxh3 are kept (a resumed pull fetches only what
    is missing). Returns why the entry is not usable, or None when the local copy now holds it whole.
    """
    try:
        doc = unseal(raw)
    except CorruptEntryError as exc:
        return f"manifest: {exc}"
    problem = entry.shape_problem(doc)
    if problem:
        return problem
    folder = path.parent
    base = key.rsplit("/", 1)[0]
    big = False
    try:
        names = [entry.check_name(name) for name in doc["files"]]
        for name in names:
            rec = doc["files"][name]
            if entry.record_problem(name, rec):
                return f"{name}: malformed file record"
            big |= rec["bytes"] >= entry.HASH_ALWAYS_BELOW
            if entry.check_file(folder, name, rec, "hash") is None:
                continue
            problem = _download(fs, f"{base}/{name}", folder / name, rec)
            if problem:
                return problem
    except CorruptEntryError as exc:
        return str(exc)
    except OSError as exc:
        return f"fetch failed: {exc}"
    if big:
        time.sleep(0.011)  # let the file-time tick pass, so the stamps below are safe to trust
    local = dict(doc)
    local["files"] = {}
    for name in names:
        rec = dict(doc["files"][name])
        rec.pop("stamp", None)
        if rec["bytes"] >= entry.HASH_ALWAYS_BELOW:
            rec["stamp"] = entry.file_record(folder / name, rec["xxh3"])["stamp"]
        local["files"][name] = rec
    return None if write_entry(path, local) else "the local copy is not writable"


def _download(fs: Any, remote: str, target: Path, rec: dict) -> str | None:
    """Fetch one file to a temp beside `target`; rename it over `target` only when size and xxh3 match."""

    class _Mismatch(Exception):
        pass

    try:
        with atomic_target(target) as tmp:
            fs.get_file(remote, str(tmp))
            size = tmp.stat().st_size
            if size != rec["bytes"]:
                raise _Mismatch(f"{target.name}: {size} bytes, the manifest says {rec['bytes']}")
            if hash_file(tmp) != rec["xxh3"]:
                raise _Mismatch(f"{target.name}: content does not match the manifest")
    except _Mismatch as exc:
        return str(exc)
    except FileNotFoundError:
        return f"{target.name}: missing on the remote"
    return None


def sync_folder(folder: Path, pattern: str) -> None:
    """Make the local copy of `folder` hold exactly the remote entries whose manifest names match `pattern`.

    For caches that find entries by listing a folder (generations, per-example shards); no-op when local.
    """
    url = url_of(folder)
    if url is None:
        return
    fs, key = filesystem(url)
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(key, detail=False)}
    except FileNotFoundError:
        names = set()
    except Exception as exc:  # unreachable: keep what the local copy has
        log.warning("Cannot list %s (%s); using the local copy as it is.", url, exc)
        return
    wanted = sorted(n for n in names if fnmatch.fnmatch(n, pattern) and not n.startswith("."))
    for name in wanted:
        _refresh(Path(folder) / name, f"{url.rstrip('/')}/{name}")
        _just_synced[os.path.abspath(Path(folder) / name)] = time.monotonic()
    for path in Path(folder).glob(pattern):  # removed remotely; one that never got there (no stamp) stays
        if path.name not in names and _side(path).exists() and entry.is_entry_file(path):
            drop_local(path)


# Up: one entry from the local copy to the remote ---------------------------------------------------------


def push(path: Path) -> bool:
    """Upload the entry whose manifest (in a local copy) is `path`: its files first, the manifest last.

    Returns False (with a warning) when the upload failed: the entry then lives in the local copy only.
    """
    url = url_of(path)
    if url is None:
        return True
    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = unseal(raw)
    except (OSError, CorruptEntryError):
        return False
    if doc.get("kind") in LOCAL_ONLY:
        return True
    fs, key = filesystem(url)
    base = key.rsplit("/", 1)[0]
    try:
        _push_tags(fs, path.parent)
        for name in doc.get("files", {}):
            fs.put_file(str(path.parent / entry.check_name(name)), f"{base}/{name}")
        fs.pipe_file(key, raw)  # last: from here on the entry exists for every machine
        _write_side(path, etag(fs, key), hash_bytes(raw))
    except Exception as exc:  # any store error: the local copy still holds the entry
        log.warning("Cannot upload cache entry %s to %s (%s); it stays in the local copy only.", path.name, url, exc)
        return False
    return True


def _push_tags(fs: Any, folder: Path) -> None:
    """Upload the CACHEDIR.TAG of `folder` and its tagged parents, once per process (management needs them)."""
    from .store import is_tagged

    base = copy_base()
    here = folder
    while here != base and base in here.parents:
        url = url_of(here)
        if url is not None and url not in _pushed_tags and is_tagged(here):
            fs.put_file(str(here / _TAG_NAME), filesystem(url)[1] + "/" + _TAG_NAME)
            _pushed_tags.add(url)
        here = here.parent


def delete(path: Path) -> None:
    """Remove the remote entry `path` stands for: its manifest first (no machine sees it after), then its files."""
    url = url_of(path)
    if url is None:
        return
    fs, key = filesystem(url)
    try:
        raw = fs.cat_file(key)
    except FileNotFoundError:
        return
    except Exception as exc:
        log.warning("Cannot remove remote cache entry %s (%s).", url, exc)
        return
    delete_remote(fs, key, raw)


def remove_object(url: str) -> None:
    """Delete the one remote object at `url` (management's leftovers: dead writers' leases)."""
    fs, key = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(key)


def delete_remote(fs: Any, key: str, raw: bytes) -> int:
    """Delete a remote manifest, then the plain file names it lists; returns the bytes freed (best effort).

    An object that is not a manifest of ours (`entry.MARK`) is never deleted, nor is anything it names; a
    listed object goes only while its size is the recorded one (a listing, no download).
    """
    if not raw.startswith(entry.MARK):
        return 0
    base = key.rsplit("/", 1)[0]
    try:
        files = unseal(raw).get("files", {})
    except (CorruptEntryError, AttributeError):
        files = {}
    freed = 0
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(key)
        freed += len(raw)
    for name, rec in files.items() if isinstance(files, dict) else ():
        try:
            entry.check_name(name)
        except CorruptEntryError:
            continue
        if entry.record_problem(name, rec):
            continue
        with contextlib.suppress(FileNotFoundError):
            size = int(fs.info(f"{base}/{name}").get("size") or 0)
            if size == rec["bytes"]:
                fs.rm_file(f"{base}/{name}")
                freed += size
    return freed


class RemoteMirror(entry.Mirror):
    """The entry contract's hooks for roots on object storage; each is a no-op for a path outside a local copy."""

    def push(self, path: Path) -> bool:
        return push(path)

    def refresh(self, path: Path, kind: str | None) -> None:
        refresh(path, kind)

    def delete(self, path: Path) -> None:
        delete(path)


entry.mirror = RemoteMirror()
