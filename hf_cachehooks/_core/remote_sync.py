"""Whole-root work on object storage: scan a remote root's entries (management), push and pull between roots.

A remote root has the layout of a local one, so an entry is found the same way: a `.json` object whose
first bytes are the manifest mark, in a folder that holds this library's CACHEDIR.TAG (or below one).
Its size is the manifest plus every object it lists; `heads` gives management the same summary-based
view of each entry as a local root's heads. `check="hash"` streams each listed object through
xxh3 (what `verify` does); `"size"` compares the listing's sizes only.

`push` uploads the local entries a remote root lacks (files first, manifest last); `pull` fetches the
remote entries a local root lacks, each verified against its manifest before the local manifest is
written. Both skip entries already there with the same manifest, and files already there with the same
content, so an interrupted copy resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ..errors import ConfigError, CorruptEntryError
from . import entry, remote
from .heads import Head, head_of
from .store import cache_folders, is_tagged, local_path, tag_folder, unseal, url_of

log = logging.getLogger(__name__)
_TAG = "CACHEDIR.TAG"


@dataclass(frozen=True)
class Scanned:
    """One remote manifest: `path` is its place in the local copy (`store.url_of(path)` is its URL)."""

    path: Path
    entry: entry.Entry | None
    problem: str | None
    size: int
    raw: bytes = field(repr=False, default=b"")


def root_url(root: Path) -> str:
    """The URL of the remote root whose local copy is `root`.

    Raises:
        ConfigError: `root` is not the local copy of a remote root.
    """
    url = url_of(root)
    if url is None:
        raise ConfigError(f"{root} is not a remote cache root; give a URL such as s3://bucket/prefix.")
    return url


def is_cache(root: Path) -> bool:
    """True when the remote root whose local copy is `root` holds a CACHEDIR.TAG (management acts only then)."""
    fs, base = remote.filesystem(root_url(root))
    try:
        return any(p.endswith("/" + _TAG) for p in fs.find(base.rstrip("/")))
    except FileNotFoundError:
        return False


def relative_key(base: str, key: str) -> str | None:
    """`key` relative to `base` when it is a plain relative name below it; None for anything else.

    An object key is text anyone with write access to the bucket chooses: `a/../../x`, `a//b`, `./a`
    or a NUL never becomes a local path (`root / key` would leave the local copy).
    """
    if not key.startswith(base + "/"):
        return None
    rel = key[len(base) + 1 :]
    parts = rel.split("/")
    if any(part in ("", ".", "..") or "\0" in part or "\\" in part for part in parts):
        return None
    return rel


def scan(root: Path, check: str = "size") -> Iterator[Scanned]:
    """Every manifest under the remote root whose local copy is `root`, with its problem (None when whole)."""
    fs, base = remote.filesystem(root_url(root))
    base = base.rstrip("/")
    try:
        listing = {p: int(info.get("size") or 0) for p, info in fs.find(base, detail=True).items()}
    except FileNotFoundError:
        return
    tagged = {p.rsplit("/", 1)[0] for p in listing if p.endswith("/" + _TAG)}
    for key in sorted(listing):
        rel = relative_key(base, key)
        folder = key.rsplit("/", 1)[0]
        if rel is None or not key.endswith(".json") or any(part.startswith(".") for part in rel.split("/")):
            continue
        if not any(folder == t or folder.startswith(t + "/") for t in tagged):
            continue
        raw = fs.cat_file(key)
        if not raw.startswith(entry.MARK):
            continue
        yield _checked(fs, root / rel, folder, raw, listing, check)


def heads(root: Path) -> Iterator[Head]:
    """The head of every whole entry under the remote root, as `heads.read_summary` gives a local one.

    Each manifest is fetched and parsed whole (a scan downloads them anyway); its summary, or for a manifest
    written before summaries one computed by the same kind functions. No `.last_access` is seen remotely.
    """
    for found in scan(root):
        if found.entry is not None:
            yield head_of(found.path, found.entry.doc, len(found.raw), touched=False)


def _checked(fs, path: Path, folder: str, raw: bytes, listing: dict[str, int], check: str) -> Scanned:
    try:
        doc = unseal(raw)
        problem = entry.shape_problem(doc)
        names = [entry.check_name(n) for n in doc["files"]] if problem is None else []
    except CorruptEntryError as exc:
        return Scanned(path, None, str(exc), len(raw), raw)
    if problem:
        return Scanned(path, None, problem, len(raw), raw)
    size = len(raw) + sum(listing.get(f"{folder}/{n}", 0) for n in names)
    for name in names:
        rec = doc["files"][name]
        have = listing.get(f"{folder}/{name}")
        if entry.record_problem(name, rec):
            problem = f"{name}: malformed file record"
        elif have is None:
            problem = f"{name}: missing"
        elif have != rec["bytes"]:
            problem = f"{name}: {have} bytes, the manifest says {rec['bytes']}"
        elif check == "hash" and _stream_hash(fs, f"{folder}/{name}") != rec.get("xxh3"):
            problem = f"{name}: content does not match the manifest"
        if problem:
            return Scanned(path, None, problem, size, raw)
    return Scanned(path, entry.Entry(path, doc), None, size, raw)


def _stream_hash(fs, key: str) -> str:
    digest = xxhash.xxh3_128()
    with fs.open(key, "rb", block_size=8 << 20) as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dead_leases(root: Path, now: float, grace: float) -> list[tuple[str, int]]:
    """(URL, bytes) of lease objects under the remote root last written over `grace` seconds ago.

    A live holder rewrites its lease every few seconds, so one this old belongs to a writer that died.
    Only keys `<plain names>/.locks/<name>.lock` count (see `relative_key`); a lease is named by its URL,
    never by a local path, so deleting it can only ever delete that object.
    """
    fs, base = remote.filesystem(root_url(root))
    base = base.rstrip("/")
    try:
        listing = fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    found = []
    url = root_url(root).rstrip("/")
    for key, info in listing.items():
        rel = relative_key(base, key)
        parts = rel.split("/") if rel is not None else []
        if len(parts) < 2 or parts[-2] != ".locks" or not parts[-1].endswith(".lock"):
            continue
        modified = info.get("LastModified") or info.get("mtime")
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or now)
        if now - stamp > grace:
            found.append((f"{url}/{rel}", int(info.get("size") or 0)))
    return sorted(found)


@dataclass
class Copied:
    """What a push or pull did: entries copied (and their bytes), already there, and not usable (why)."""

    copied: list[str] = field(default_factory=list)
    present: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _local_manifests(root: Path) -> Iterator[Path]:
    for folder, files in cache_folders(root):
        for name in files:
            if name.endswith(".json") and not (folder / name).is_symlink() and entry.is_entry_file(folder / name):
                yield folder / name


def push(local: Path, url: str, dry_run: bool = False) -> Copied:
    """Upload every whole local entry the remote root `url` lacks: files first (unless already there), manifest last."""
    fs, base = remote.filesystem(url)
    base = base.rstrip("/")
    done = Copied()
    for path in _local_manifests(local):
        found, problem = entry.inspect(path, check="stamp")
        rel = path.relative_to(local).as_posix()
        if found is None or found.kind in remote.LOCAL_ONLY:
            if problem:
                done.skipped.append((rel, problem))
            continue
        raw = path.read_bytes()
        key = f"{base}/{rel}"
        if _same_remote_manifest(fs, key, found):
            done.present += 1
            continue
        done.copied.append(rel)
        done.bytes += entry.entry_size(found)
        if dry_run:
            continue
        folder = key.rsplit("/", 1)[0]
        _push_tags(fs, local, path.parent, base)
        for name in found.files:
            if not _same_object(fs, f"{folder}/{name}", path.parent / name):
                fs.put_file(str(path.parent / name), f"{folder}/{name}")
        fs.pipe_file(key, raw)  # last
    return done


def _same_remote_manifest(fs, key: str, found: entry.Entry) -> bool:
    """True when the remote manifest at `key` lists the same key and the same file contents."""
    try:
        doc = unseal(fs.cat_file(key))
    except (FileNotFoundError, CorruptEntryError):
        return False
    files = doc.get("files") if isinstance(doc, dict) else None
    return bool(
        doc.get("key", {}).get("digest") == found.key["digest"]
        and isinstance(files, dict)
        and {n: r.get("xxh3") for n, r in files.items() if isinstance(r, dict)}
        == {n: r["xxh3"] for n, r in found.files.items()}
    )


def _same_object(fs, key: str, path: Path) -> bool:
    """True when the object at `key` holds the bytes of `path` (S3: a single-part ETag is the MD5)."""
    try:
        info = fs.info(key)
    except FileNotFoundError:
        return False
    tag = str(info.get("ETag") or "").strip('"')
    if int(info.get("size") or -1) != path.stat().st_size or not tag or "-" in tag:
        return False
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            md5.update(chunk)
    return md5.hexdigest() == tag


def _push_tags(fs, local: Path, folder: Path, base: str) -> None:
    here = folder
    while here == local or local in here.parents:
        if is_tagged(here):
            rel = here.relative_to(local).as_posix()
            target = f"{base}/{rel}/{_TAG}" if rel != "." else f"{base}/{_TAG}"
            if not fs.exists(target):
                fs.put_file(str(here / _TAG), target)
        here = here.parent


def pull(url: str, local: Path, dry_run: bool = False) -> Copied:
    """Fetch every whole remote entry the local root lacks, each file checked against the manifest, manifest last."""
    fs, base = remote.filesystem(url)
    base = base.rstrip("/")
    done = Copied()
    copy = local_path(url)
    for scanned in scan(copy, check="size"):
        rel = scanned.path.relative_to(copy).as_posix()
        if scanned.entry is None:
            done.skipped.append((rel, scanned.problem or "unreadable"))
            continue
        if scanned.entry.kind in remote.LOCAL_ONLY:
            continue
        target = local / rel
        mine, _ = entry.inspect(target, check="stamp")
        if (
            mine is not None
            and mine.key["digest"] == scanned.entry.key["digest"]
            and {n: r["xxh3"] for n, r in mine.files.items()} == {n: r["xxh3"] for n, r in scanned.entry.files.items()}
        ):
            done.present += 1
            continue
        if dry_run:
            done.copied.append(rel)
            done.bytes += scanned.size
            continue
        _tag_like_remote(fs, base, local, target.parent)
        problem = remote.fetch_entry(fs, f"{base}/{rel}", scanned.raw, target)
        if problem:
            done.skipped.append((rel, problem))
        else:
            done.copied.append(rel)
            done.bytes += scanned.size
    return done


def _tag_like_remote(fs, base: str, local: Path, folder: Path) -> None:
    """Tag the local folders whose remote counterparts carry a CACHEDIR.TAG (management acts only there)."""
    here = folder
    while here == local or local in here.parents:
        rel = here.relative_to(local).as_posix()
        if fs.exists(f"{base}/{rel}/{_TAG}" if rel != "." else f"{base}/{_TAG}"):
            tag_folder(here)
        here = here.parent
