"""The one entry contract under every cache: data files first, then a sealed manifest that lists them.

    <folder>/
    ├── <data files>       each written atomically (temp file + rename), never changed in place
    └── <manifest>.json    sealed JSON written last: its presence *is* the entry

    {"hf_cachehooks_entry": 1,                     always the first field (management finds entries by it)
     "kind": "predictions",                        predictions | example-predictions | generations | activations |
                                                   conversation | identity | file-hashes | last-miss | store-link
     "summary": {"model", "items", "bytes",        written by `commit` from the kind's `kinds.SUMMARIES`, near the
                 "created", "last_used"(, "pinned")},  top so ls/du/prune read it from the first bytes (`heads`)
     "key": {"kind", "digest", "inputs"},          what the entry was made from (`explain` diffs these)
     "created_at": 1764547200.0,                   epoch seconds; expiry and `prune` read it
     "writer": {"host", "pid", "version"},
     "files": {"data-00000.arrow": {"bytes": 123, "xxh3": "…", "stamp": [inode, mtime_ns, ctime_ns]}},
     …the cache's own fields…,
     "checksum": "…"}                              xxh3 of everything before it (see `store.seal`)

File names in `files` are plain names inside the manifest's folder; anything else makes the entry
corrupt, and so do a kind's own fields that fail its check in `kinds` (an activation store's
`chunks` naming a file that `files` does not list, say), whichever reader opens it. Opening an entry
checks the seal, the shape, the expiry and every file's size; a file's content is hashed when asked
(`check="hash"`, what `verify` does), when it is small, or when its stamp differs from the one
recorded at commit. A stamp includes `st_ctime_ns`, which user space cannot set, so rewriting a file
in place (`cp -p`, `rsync --inplace -t`) or flipping one byte is always noticed. A corrupt entry is
a warning, a removal and a miss, never data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import CorruptEntryError
from .freshness import describe_age, is_expired
from .keys import Key, hash_bytes, remember
from .kinds import fields_problem, summary_of
from .store import atomic_write, hash_file, unseal, write_entry

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
MARK = b'{\n  "hf_cachehooks_entry": 1,'
CHECKS = ("manifest", "size", "stamp", "hash")  # "manifest": seal, shape and names; the caller checks files
HASH_ALWAYS_BELOW = 1 << 20  # files under 1 MiB are hashed on every open: cheaper than trusting a stamp
OWN_HIDDEN = (".last_access", ".chunks")  # bookkeeping a cache keeps inside an entry's own folder
_TAG_NAME = "CACHEDIR.TAG"  # the folder's mark (see `store.tag_folder`): never an entry's file
_RACY_NS = 10_000_000  # file times tick by 1-10 ms (HZ=100 at worst): a stamp is trusted once its tick has passed
_verified: dict[str, tuple[list[int], str]] = {}  # path -> (stamp, xxh3) hashed in this process


class Mirror:
    """Where an entry lives besides its local folder: for a local root, nowhere, so each hook does nothing.

    `remote.py` replaces `mirror` with its own for roots on object storage (it pushes an entry after
    `commit`, refreshes the local copy before `open_entry`, deletes the remote one in `remove_entry`).
    The hooks keep this module free of any import of `remote`, which builds on it.
    """

    def push(self, path: Path) -> bool:
        return True

    def refresh(self, path: Path, kind: str | None) -> None:
        return None

    def delete(self, path: Path) -> None:
        return None


mirror = Mirror()  # replaced by `remote` on import; the core's `__init__` imports it, before any entry is used


@dataclass(frozen=True)
class Entry:
    """An opened entry: its manifest path and parsed manifest (`doc`), whose files all checked out.

    `shared`: `doc` is this process's remembered parse (`reuse`), to be read, never changed.
    """

    path: Path
    doc: dict
    shared: bool = False

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def key(self) -> dict:
        return self.doc["key"]

    @property
    def created_at(self) -> float:
        return float(self.doc["created_at"])

    @property
    def files(self) -> dict[str, dict]:
        return self.doc["files"]

    @property
    def folder(self) -> Path:
        return self.path.parent


def check_name(name: object) -> str:
    """Return `name` when it is a plain file name inside an entry's folder.

    Raises:
        CorruptEntryError: for paths (`../x`, `a/b`, absolute), hidden names, `.`/`..`, NUL or non-strings,
            and the folder's CACHEDIR.TAG (no entry owns the mark of the folder it lies in).
    """
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise CorruptEntryError(f"file name {name!r} is not a plain name inside the entry's folder")
    if name.casefold() == _TAG_NAME.casefold():
        raise CorruptEntryError(f"file name {name!r} is the cache folder's mark, never an entry's file")
    return name


def record_problem(name: str, rec: Any) -> str | None:
    """Why `rec` is not a file record (`{"bytes": int >= 0, "xxh3": str, ...}`), or None when it is one.

    `type(...) is int`: `true` is not a size, though Python counts it as 1.
    """
    if (
        not isinstance(rec, dict)
        or type(rec.get("bytes")) is not int
        or rec["bytes"] < 0
        or not isinstance(rec.get("xxh3"), str)
    ):
        return f"{name}: malformed file record {rec!r:.80}"
    return None


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def file_record(path: Path, xxh3: str | None = None) -> dict:
    """The manifest record of a file already written in place: size, content hash and stamp.

    Pass `xxh3` when the caller hashed the bytes it wrote, to skip reading the file back.
    """
    st = os.stat(path)
    return {"bytes": st.st_size, "xxh3": xxh3 or hash_file(path), "stamp": _stamp(st)}


def write_file(folder: Path, name: str, data: bytes) -> dict:
    """Write one data file of an entry atomically and return its manifest record.

    Raises:
        OSError: the folder is not writable (callers turn this into "not cached").
    """
    path = Path(folder) / check_name(name)
    atomic_write(path, data)
    return file_record(path, hash_bytes(data))


def _settle(folder: Path, files: Mapping[str, dict]) -> dict[str, dict]:
    """Records whose stamps are safe to trust: wait out the file-time tick of the newest big file.

    A change made in the same tick as our write would keep the stamp; once the tick has passed, any
    change moves `st_ctime_ns`. Small files are always hashed, so only big ones are waited for.
    """
    big = [r for r in files.values() if r.get("stamp") and r["bytes"] >= HASH_ALWAYS_BELOW]
    newest = max((r["stamp"][2] for r in big), default=0)
    wait = newest + _RACY_NS - time.time_ns()
    if wait > 0:
        time.sleep(wait / 1e9)
    settled = {}
    for name, rec in files.items():
        rec = dict(rec)
        if rec.get("stamp") and rec["bytes"] >= HASH_ALWAYS_BELOW:
            try:
                now = _stamp(os.stat(folder / name))
            except OSError:
                now = None
            if now != rec["stamp"]:  # changed since we wrote it: never trust a stamp, hash on every open
                rec["stamp"] = None
        else:
            rec.pop("stamp", None)
        settled[name] = rec
    return settled


def manifest_doc(
    kind: str, key: Key | Mapping[str, Any], files: Mapping[str, dict], fields: Mapping[str, Any], created_at: float
) -> dict:
    """The manifest as a dict: the reserved fields first (`summary` computed from the rest), then the cache's own."""
    if isinstance(key, Key):
        key = {"kind": key.kind, "digest": key.digest, "inputs": key.inputs}
    reserved = {
        "hf_cachehooks_entry": ENTRY_FORMAT,
        "kind": kind,
        "summary": {},
        "key": dict(key),
        "created_at": created_at,
        "writer": {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__},
        "files": {check_name(n): dict(r) for n, r in files.items()},
    }
    doc = {**reserved, **{k: v for k, v in fields.items() if k not in reserved}}  # a re-read doc's old summary goes
    doc["summary"] = summary_of(doc)  # keeps its place, after `kind`
    return doc


def commit(
    path: Path,
    kind: str,
    key: Key | Mapping[str, Any],
    files: Mapping[str, dict] | None = None,
    fields: Mapping[str, Any] | None = None,
    created_at: float | None = None,
) -> bool:
    """Write the manifest at `path` last, after the data files its `files` records describe.

    A cache whose folder may hold the user's files (a generation tree, an activation store's `--output`)
    checks `replaceable(path)` and its data files' names before it writes anything.

    Returns:
        False (with a warning) when the folder is not writable: the entry then does not exist.
    """
    path = Path(path)
    records = _settle(path.parent, files or {})
    written = write_entry(
        path, manifest_doc(kind, key, records, fields or {}, time.time() if created_at is None else created_at)
    )
    if written:
        mirror.push(path)  # a root on object storage: files up, then the manifest last (no-op when local)
    return written


def is_entry_file(path: Path) -> bool:
    """True when `path` starts like a manifest of this contract (cheap: reads 32 bytes)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MARK)) == MARK
    except OSError:
        return False


def replaceable(path: Path) -> bool:
    """True when nothing lies at `path`, or a file this library wrote: a manifest (`MARK`) or sealed JSON.

    A file of the user's at a manifest's path (a hand-written `metadata.json`, say) is never overwritten.
    Sealed JSON counts as ours: an earlier version's cache file is replaced as a memo is rebuilt.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return True  # nothing there (or no folder to hold it: the write itself reports that)
    if not stat.S_ISREG(st.st_mode):
        return False
    if is_entry_file(path):
        return True
    try:
        unseal(Path(path).read_bytes())
    except (OSError, CorruptEntryError):
        return False
    return True


def trusted(path: str, st: os.stat_result, rec: dict) -> bool:
    """True when a big file's stat (taken on the open file, say) matches its record: no need to hash it.

    The fast path of `check_file` for a caller that opens the file anyway (the activation store maps it).
    """
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == rec.get("bytes")
        and st.st_size >= HASH_ALWAYS_BELOW
        and (rec.get("stamp") == _stamp(st) or _verified.get(path) == (_stamp(st), rec.get("xxh3")))
    )


def check_file(folder: Path, name: str, rec: Any, check: str = "stamp") -> str | None:
    """Why the file `name` in `folder` does not match its manifest record `rec`, or None when it does."""
    problem = record_problem(name, rec)
    if problem:
        return problem
    path = folder / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: {exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{name}: not a regular file (a link or folder is never followed)"
    if st.st_size != rec["bytes"]:
        return f"{name}: {st.st_size} bytes, the manifest says {rec['bytes']}"
    if check == "size" or (check == "stamp" and trusted(str(path), st, rec)):
        return None
    stamp = _stamp(st)
    try:
        ok = hash_file(path) == rec["xxh3"]
    except OSError as exc:
        return f"{name}: {exc}"
    if not ok:
        return f"{name}: content does not match the manifest"
    if is_entry_file(path):  # read whole anyway: a manifest is never another entry's data file
        return f"{name}: is a cache entry's manifest, never an entry's data file"
    if time.time_ns() - stamp[2] > _RACY_NS:  # remember only stamps whose tick has passed
        _verified[str(path)] = (stamp, rec["xxh3"])
    return None


_parsed: dict[str, tuple[tuple[int, int, int, int], dict | None]] = {}  # manifest path -> (stamp, parsed doc)
_PARSED_FILES = 32  # the manifests remembered (the oldest go first), each at most:
_PARSED_BYTES = 16 << 20


def _read_manifest(path: Path, reuse: bool) -> tuple[dict, bool]:
    """Read and unseal a manifest: (doc, shared). With `reuse`, a manifest whose stamp is unchanged since
    this process parsed it is not opened again (its ctime moves on any rewrite or rename over it: see
    `_settle`): the doc is then the remembered one, shared. It is remembered from its second read on, so a
    manifest read once costs no more than without `reuse`."""
    if not reuse:
        return unseal(path.read_bytes()), False
    name = str(path)
    known = _parsed.get(name)
    if known is not None and known[1] is not None and known[0] == _manifest_stamp(os.stat(name)):
        return known[1], True  # the file now at the path has the stamp of the very file parsed
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())  # the stamp of the very file read
        doc = unseal(handle.read())
    stamp = _manifest_stamp(st)
    if time.time_ns() - st.st_ctime_ns > _RACY_NS and st.st_size <= _PARSED_BYTES:  # only stamps whose tick passed
        seen_before = known is not None and known[0] == stamp
        remember(_parsed, name, (stamp, doc if seen_before else None), _PARSED_FILES)  # a first read: the stamp
        if seen_before:
            return doc, True
    return doc, False


def _manifest_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def inspect(path: Path, check: str = "stamp", reuse: bool = False) -> tuple[Entry | None, str | None]:
    """(entry, None) when the manifest at `path` and its files check out; (None, problem) otherwise.

    A missing manifest is (None, None). Never deletes anything (management reports with it). With
    `reuse`, an unchanged manifest parsed earlier in this process is not parsed again: its `doc` is
    then shared, so the caller must not change it (small memos that are read on every hit).
    """
    if check not in CHECKS:
        raise ValueError(f"check={check!r}; use one of {CHECKS}")
    path = path if isinstance(path, Path) else Path(path)
    try:
        doc, shared = _read_manifest(path, reuse)
    except FileNotFoundError:
        return None, None
    except (OSError, CorruptEntryError) as exc:
        return None, str(exc)
    problem = shape_problem(doc)
    if problem:
        return None, problem
    try:
        names = [check_name(name) for name in doc["files"]]
    except CorruptEntryError as exc:
        return None, str(exc)
    for name in names if check != "manifest" else ():
        problem = check_file(path.parent, name, doc["files"][name], check)
        if problem:
            return None, problem
    return Entry(path, doc, shared), None


def shape_problem(doc: Any) -> str | None:
    """Why a parsed manifest does not have the contract's reserved fields and its kind's own, or None when it does."""
    if not isinstance(doc, dict) or doc.get("hf_cachehooks_entry") != ENTRY_FORMAT:
        return "not an entry of this cache format (written by another version, or not a cache file)"
    key = doc.get("key")
    if (
        not isinstance(doc.get("kind"), str)
        or not isinstance(key, dict)
        or not isinstance(key.get("digest"), str)
        or not isinstance(key.get("inputs"), dict)
        or not isinstance(doc.get("files"), dict)
        or not isinstance(doc.get("created_at"), (int, float))
        or isinstance(doc.get("created_at"), bool)
    ):
        return "manifest fields kind/key/files/created_at are missing or of the wrong type"
    return fields_problem(doc)  # the kind's own fields (`kinds`): one verdict for every reader


def open_entry(
    path: Path,
    *,
    kind: str | None = None,
    digest: str | None = None,
    max_age_days: float | None = None,
    now: float | None = None,
    check: str = "stamp",
    remove_corrupt: bool = True,
    reuse: bool = False,
) -> Entry | None:
    """The entry at `path` when it exists, checks out, is of `kind` and `digest`, and is not expired; else None.

    A corrupt entry (seal, shape, a file missing, resized or altered, a name outside the folder) is
    logged and removed (`remove_corrupt`, see `remove_entry`), so the caller recomputes. A file that does
    not start with `MARK` is not an entry at all: a miss, logged and left alone. Another key or an
    expired entry is left in place: it is someone else's valid data. `reuse`: see `inspect` (the doc is then shared).
    """
    path = path if isinstance(path, Path) else Path(path)
    mirror.refresh(path, kind)  # a root on object storage: bring the local copy in step (no-op when local)
    entry, problem = inspect(path, check, reuse)
    if problem and not is_entry_file(path):  # not ours: a file of the user's, or another program's
        log.warning("%s is not a cache entry of hf_cachehooks (%s): a miss; the file is not removed.", path, problem)
        return None
    if problem:
        log.warning(
            "Corrupt cache entry %s (%s); %s and recomputing.",
            path,
            problem,
            "removing it" if remove_corrupt else "ignoring it",
        )
        if remove_corrupt:
            remove_entry(path, everywhere=False)
        return None
    if entry is None:
        return None
    if kind is not None and entry.kind != kind:
        log.warning("Cache file %s holds a %s entry, not %s; ignoring it.", path, entry.kind, kind)
        return None
    if digest is not None and entry.key["digest"] != digest:
        log.info("Cache entry %s belongs to another key; ignoring it.", path)
        return None
    now = time.time() if now is None else now
    if is_expired(entry.created_at, now, max_age_days):
        log.info(
            "Cache entry %s is %s old (max %s days): expired.",
            path.name,
            describe_age(now - entry.created_at),
            max_age_days,
        )
        return None
    return entry


def remove_entry(path: Path, also: Mapping[str, Any] | None = None, *, everywhere: bool = True) -> int:
    """Delete an entry whole: rename its manifest away (readers see no entry at once), then its files.

    Only a manifest of ours (`MARK`) is touched. A file it lists (checked as a plain name) goes only while
    it still holds what was recorded: its size, and its stamp or else its content hash (`check_file`), and
    only when it is not itself a manifest. A file that no longer matches (edited by hand, or a user's file
    that merely shares the name) stays where it is. `also` maps more names to their records (a killed
    run's shards), checked the same way; the cache's own bookkeeping (`OWN_HIDDEN`) goes too, and the
    folder only if that left it empty. Returns the bytes freed. An unreadable manifest is removed alone.
    In the local copy of a root on object storage, the remote entry goes too unless `everywhere=False`.
    """
    import shutil

    path = Path(path)
    if everywhere:
        mirror.delete(path)
    if not is_entry_file(path):
        return 0  # not a manifest of ours (or already gone): never removed
    grave = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except OSError:
        return 0
    freed = 0
    files: dict = {}
    try:
        raw = grave.read_bytes()
        freed += len(raw)
        doc = unseal(raw)
        if isinstance(doc.get("files"), dict):
            files = dict(doc["files"])
    except (OSError, CorruptEntryError, AttributeError):
        files = {}
    files.update(also or {})
    for name, rec in files.items():
        try:
            check_name(name)
        except CorruptEntryError:
            continue
        target = path.parent / name
        if check_file(path.parent, name, rec, "stamp") is not None or is_entry_file(target):
            if target.exists():
                log.info("Keeping %s: it no longer holds what the entry recorded (maybe yours).", target)
            continue
        with contextlib.suppress(OSError):
            size = target.stat().st_size
            target.unlink()
            freed += size
    for name in OWN_HIDDEN:
        target = path.parent / name
        if target.is_dir() and not target.is_symlink():
            freed += sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                target.unlink()
    grave.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty
    return freed


def entry_size(entry: Entry) -> int:
    """Bytes on disk of the manifest and every file it lists (what `ls` and `du` show)."""
    total = 0
    for path in [entry.path, *(entry.folder / name for name in entry.files)]:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total
