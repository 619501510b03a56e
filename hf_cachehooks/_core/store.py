"""Where cache bytes hit the disk: root resolution, sealed JSON, atomic writes, file hashes and the cache tag.

    $HF_CACHEHOOKS_HOME (default outputs/cache)/
    ├── predictions/    CACHEDIR.TAG + prediction runs and per-example shards
    ├── identity/       CACHEDIR.TAG + memo of model identities per state of the model files
    ├── experiments/    CACHEDIR.TAG + the generation cache
    ├── activations/    activation stores, each folder with its own CACHEDIR.TAG
    └── conversations/  CACHEDIR.TAG + the conversation token cache

Every cache writes its entries through the contract in `entry.py`; this module holds the primitives
under it. Sealed JSON is pretty JSON whose last field is an xxh3 checksum of the bytes before it, so a
truncated, edited or bit-rotten file is detected. Every write goes to a temp file in the same folder
(named `.<name>.<random>.hfch-tmp`), is fsynced, then renamed over the target. CACHEDIR.TAG marks a
folder as this library's cache: the management commands delete nothing anywhere else.

A root on object storage (`s3://bucket/prefix`) resolves to its local copy here, by path arithmetic alone;
keeping the copy and the remote in step is `remote.py`'s job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import xxhash

from ..errors import ConfigError, CorruptEntryError
from .keys import hash_bytes

log = logging.getLogger(__name__)

DEFAULT_ROOT = "outputs/cache"
LOCAL_COPY_ENV = "HF_CACHEHOOKS_LOCAL_COPY"
_CHUNK = 8 << 20
TEMP_SUFFIX = ".hfch-tmp"  # a writer's temp file: `prune` removes only these, and only when old
_SEAL = b'\n  "checksum": "'
_TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n# Cache folder of hf_cachehooks.\n"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the cache root now (not at import): argument, else $HF_CACHEHOOKS_HOME, else outputs/cache."""
    return local_path(explicit or os.environ.get("HF_CACHEHOOKS_HOME") or DEFAULT_ROOT)


def local_path(value: str | os.PathLike) -> Path:
    """`value` as a local folder: a URL (`s3://bucket/prefix`) becomes its local copy (see `remote.py`).

    Raises:
        ConfigError: a URL with no bucket, or with a path part that is `..` or hidden.
    """
    if isinstance(value, str) and is_url(value):
        return _copy_of(value)
    return Path(value.removeprefix("file://") if isinstance(value, str) else value)


def is_url(value: object) -> bool:
    """True for `scheme://...` (not `file://`): a root on object storage."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def copy_base() -> Path:
    """Where local copies of remote roots live: $HF_CACHEHOOKS_LOCAL_COPY, else ~/.cache/hf_cachehooks/remote."""
    value = os.environ.get(LOCAL_COPY_ENV)
    if value:
        return Path(os.path.abspath(value))
    return Path(os.path.expanduser("~/.cache")) / "hf_cachehooks" / "remote"


def _copy_of(url: str) -> Path:
    """The local copy of `url`: `<copy base>/<scheme>/<bucket>/<path>`."""
    scheme, _, rest = url.partition("://")
    parts = [p for p in rest.split("/") if p]
    if not scheme.isidentifier() or not parts or any(p in (".", "..") or p.startswith(".") for p in parts):
        raise ConfigError(f"Cache root {url!r} is not a usable URL; use e.g. s3://bucket/prefix.")
    return copy_base().joinpath(scheme, *parts)


@functools.lru_cache(maxsize=8)
def _copy_prefix(value: str | None, home: str | None) -> str:
    """`copy_base()` as a normalised string ending in a separator (per setting and home folder)."""
    top = os.path.abspath(value) if value else os.path.join(os.path.expanduser("~/.cache"), "hf_cachehooks", "remote")
    return os.path.join(os.path.normpath(top), "")


def url_of(path: Path | str) -> str | None:
    """The remote URL a local-copy path stands for, or None for an ordinary local path (cheap: no I/O)."""
    base = _copy_prefix(os.environ.get(LOCAL_COPY_ENV), os.environ.get("HOME"))  # a string: no pathlib per lookup
    here = os.path.abspath(path)
    if not here.startswith(base):
        return None
    scheme, _, rest = here[len(base) :].partition(os.sep)
    return f"{scheme}://{rest.replace(os.sep, '/')}" if rest else None


def seal(doc: dict) -> bytes:
    """Serialise `doc` as indented JSON with a trailing checksum field."""
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    head = body[:-2] if doc else b"{"  # drop the closing "\n}" ("{}" has none)
    return head + (b"," if doc else b"") + _SEAL + hash_bytes(head).encode() + b'"\n}\n'


def unseal(raw: bytes) -> dict:
    """Check the checksum and parse; raise CorruptEntryError on any mismatch."""
    cut = raw.rfind(_SEAL)
    if cut < 0:
        raise CorruptEntryError("no checksum field (truncated or hand-edited)")
    view = memoryview(raw)  # hash the body where it lies: no copy of a large entry
    head = view[: cut - 1] if raw[cut - 1 : cut] == b"," else view[:cut]
    if raw[cut:] != _SEAL + hash_bytes(head).encode() + b'"\n}\n':
        raise CorruptEntryError("checksum mismatch")  # also catches anything written after the checksum
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptEntryError(f"invalid JSON: {exc}") from exc
    doc.pop("checksum", None)
    return doc


@contextlib.contextmanager
def atomic_target(path: Path, durable: bool = True, sync_folder: bool | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, else remove it.

    Readers see the old file, the new file, or nothing; never half a file. `durable=False` skips the
    fsyncs: only for sealed files whose loss or tearing in a power cut reads as absent (a redo).
    `sync_folder=False` fsyncs the file but not its folder (a later manifest commit syncs the folder).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared team cache must be readable
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable if sync_folder is None else sync_folder:
        _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` atomically (see `atomic_target`)."""
    with atomic_target(path, durable) as tmp:
        tmp.write_bytes(data)


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's content, read in chunks (the same hash as `keys.hash_bytes` of its bytes)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_entry(path: Path) -> dict | None:
    """Read a sealed entry; None when absent. A corrupt one is logged, removed and read as None."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("Cannot read cache entry %s (%s); treating it as a miss.", path, exc)
        return None
    try:
        return unseal(raw)
    except CorruptEntryError as exc:
        log.warning("Corrupt cache entry %s (%s); removing it and recomputing.", path, exc)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def write_entry(path: Path, doc: dict[str, Any], durable: bool = True) -> bool:
    """Seal and atomically write `doc`. An unwritable cache is a warning, never an error."""
    try:
        atomic_write(path, seal(doc), durable)
        return True
    except OSError as exc:
        log.warning("Cannot write cache entry %s (%s); continuing without caching it.", path, exc)
        return False


def is_tagged(folder: Path) -> bool:
    """True when `folder` holds this library's CACHEDIR.TAG (written by `tag_folder` on first use)."""
    try:
        with open(folder / "CACHEDIR.TAG", "rb") as handle:
            return handle.read(len(_TAG)) == _TAG
    except OSError:
        return False


def cache_folders(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, file names) of every folder under `root` that lies in a tagged cache folder.

    Hidden folders (locks, trash, a store's chunk sidecars) and links are never entered.
    """
    tagged: set[Path] = set()
    for top, dirs, files in os.walk(root):
        here = Path(top)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if here in tagged or is_tagged(here):
            tagged.update(here / d for d in dirs)
            yield here, sorted(files)


def tag_folder(folder: Path, required: bool = False) -> None:
    """Create `folder` with a CACHEDIR.TAG in it; an unwritable place is logged, not raised.

    Raises:
        OSError: the folder is not writable and `required` (a store that is the result: it cannot go uncached).
    """
    tag = folder / "CACHEDIR.TAG"
    if tag.exists():
        return
    try:
        atomic_write(tag, _TAG)
    except OSError as exc:
        if required:
            raise
        log.warning("Cache folder %s is not writable (%s); results will not be cached.", folder, exc)
