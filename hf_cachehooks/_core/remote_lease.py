"""Single-flight on object storage: the lease is an object created with a conditional write.

    s3://bucket/prefix/predictions/.locks/<key digest>.lock     {"host", "pid", "since"}

`fs.pipe_file(url, data, mode="create")` sends `If-None-Match: *` on S3 (s3fs), so of two machines that
miss the same key at once exactly one creates the lease and computes; the other waits, then reads the
entry the first one uploaded. The holder rewrites the object every `heartbeat` seconds; a lease whose
last write is older than `stale_after`, or whose holder is a dead process of this host, is broken. A
garbled lease is broken at once: an object is created with its content in one request, so no live
holder's lease is ever seen half written (a local lease file is, for an instant: see `locking`).

Stores whose fsspec driver has no conditional create fall back to "create if absent" (check, then
write): two machines racing within one round trip may then both compute. That costs time, never
correctness: entries are whole and verified, and the manifest uploaded last wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson

from .locking import holder_gone
from .remote import filesystem

log = logging.getLogger(__name__)


def _stale(fs: Any, path: str, stale_after: float) -> float | None:
    """Seconds since the lease's last heartbeat when it is stale (holder dead or silent), else None."""
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
    age = time.time() - stamp
    try:
        holder = orjson.loads(raw)
    except orjson.JSONDecodeError:
        holder = None
    if not _well_formed(holder):  # created whole with its content (one PUT): garbled is never a live holder
        return age
    if holder_gone(holder):
        return age
    return age if age > stale_after else None


def _well_formed(holder: object) -> bool:
    """True for a lease as `remote_lease` writes it: {"host": str, "pid": int > 0, ...}."""
    pid = holder.get("pid") if isinstance(holder, dict) else None
    return isinstance(holder, dict) and isinstance(holder.get("host"), str) and type(pid) is int and pid > 0


@contextlib.contextmanager
def remote_lease(url: str, *, stale_after: float = 60.0, poll: float = 0.05, heartbeat: float = 5.0) -> Iterator[bool]:
    """Hold the lease object at `url` for the block; yields False when the store cannot be written."""
    fs, path = filesystem(url)
    me = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    waiting = False
    while True:
        try:
            _create(fs, path, me)
            break
        except FileExistsError:
            age = _stale(fs, path, stale_after)
            if age is not None:
                log.warning("Breaking stale cache lock %s (holder gone, last heartbeat %.1fs ago).", url, age)
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                continue
            if not waiting:
                log.info(
                    "⏳ Another machine is computing this entry (%s); waiting to read its result.",
                    url.rsplit("/", 1)[-1],
                )
                waiting = True
            time.sleep(poll)
        except Exception as exc:  # any store error: locks only save work, so compute without it
            log.warning("Cannot take cache lock %s (%s); computing without it.", url, exc)
            yield False
            return
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(fs, path, me, stop, heartbeat), daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(Exception):
            fs.rm_file(path)


def _create(fs: Any, path: str, data: bytes) -> None:
    """Create the object at `path`, or raise FileExistsError (conditional where the driver can)."""
    try:
        fs.pipe_file(path, data, mode="create")
    except TypeError:  # a driver without the `mode` argument: check, then write (see the module's note)
        if fs.exists(path):
            raise FileExistsError(path) from None
        fs.pipe_file(path, data)


def _beat(fs: Any, path: str, me: bytes, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(Exception):
            fs.pipe_file(path, me)
