"""Single-flight: when several processes miss the same key, one computes and the others wait, then read.

The lock is a lease file created with O_EXCL holding the owner's host, pid and a heartbeat that a
background thread refreshes. A lease whose heartbeat is older than `stale_after` seconds, or whose
owner process is gone on this host (exited, or a zombie not yet reaped), is broken, so a dead holder
never blocks anyone for long. A lease of the wrong shape counts as garbled: stale by age alone.
Locks only avoid duplicate work; correctness comes from atomic writes, so a lost lock is harmless:
when the lease cannot be written (a full disk), it is removed and the caller computes without it.

On object storage (a path in the local copy of a remote root) the lease is an object created with a
conditional write:

    s3://bucket/prefix/predictions/.locks/<key digest>.lock     {"host", "pid", "since"}

`fs.pipe_file(url, data, mode="create")` sends `If-None-Match: *` on S3 (s3fs), so of two machines that
miss the same key at once exactly one creates the lease and computes; the other waits, then reads the
entry the first one uploaded. The holder rewrites the object every `heartbeat` seconds; a lease whose
last write is older than `stale_after`, or whose holder is a dead process of this host, is broken. A
garbled lease object is broken at once: an object is created with its content in one request, so no live
holder's lease is ever seen half written (a local lease file is, for an instant).

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .remote import filesystem
from .store import url_of

log = logging.getLogger(__name__)
T = TypeVar("T")


def holder_gone(info: object) -> bool:
    """True when a lease's `info` ({"host", "pid", ...}) names a process of this host that no longer runs."""
    pid = info.get("pid") if isinstance(info, dict) else None
    return (
        isinstance(info, dict)
        and isinstance(pid, int)
        and not isinstance(pid, bool)
        and pid > 0
        and info.get("host") == socket.gethostname()
        and not _alive(pid)
    )


def _alive(pid: int) -> bool:
    """True while `pid` runs on this host; an exited process not yet reaped by its parent (zombie) is dead."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True  # no /proc (macOS) or it just exited: os.kill said it was there
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]  # "pid (comm) S ...": comm may hold ")"
    return state not in (b"Z", b"X")


def _stale(lease: Path, stale_after: float) -> tuple[float, int] | None:
    """(seconds since the last heartbeat, inode) when the lease is stale, else None."""
    try:
        st = lease.stat()
    except OSError:
        return None
    age = time.time() - st.st_mtime
    try:
        info = orjson.loads(lease.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        info = None  # empty or garbled: its writer died mid-write
    if holder_gone(info):
        return age, st.st_ino
    return (age, st.st_ino) if age > stale_after else None


def _break(lease: Path, inode: int) -> None:
    """Remove the stale lease with this inode, and only that one (another waiter may have replaced it)."""
    grave = lease.with_name(f"{lease.name}.stale-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(lease, grave)
    except OSError:
        return
    if grave.stat().st_ino != inode:  # we took a fresh lease by mistake: put it back unless replaced again
        with contextlib.suppress(OSError):
            os.link(grave, lease)
    grave.unlink(missing_ok=True)


@contextlib.contextmanager
def lease(path: Path, *, stale_after: float = 60.0, poll: float = 0.05, heartbeat: float = 5.0) -> Iterator[bool]:
    """Hold the lease at `path` for the duration of the block; yields False when the folder is unwritable."""
    url = url_of(path)
    if url is not None:  # a root on object storage: the lease is an object created with a conditional write
        with remote_lease(url, stale_after=stale_after, poll=poll, heartbeat=heartbeat) as held:
            yield held
        return
    _writable_parent(path)
    me = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    waiting = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale = _stale(path, stale_after)
            if stale is not None:
                log.warning("Breaking stale cache lock %s (holder gone, last heartbeat %.1fs ago).", path, stale[0])
                _break(path, stale[1])
                continue
            if not waiting:
                log.info("⏳ Another process is computing this entry (%s); waiting to read its result.", path.name)
                waiting = True
            time.sleep(poll)
            continue
        except OSError as exc:
            log.warning("Cannot take cache lock %s (%s); computing without it.", path, exc)
            yield False
            return
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(me)
        except OSError as exc:  # a full disk: an empty lease would stall the next run for stale_after
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("Cannot write cache lock %s (%s); computing without it.", path, exc)
            yield False
            return
        break
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(path, stop, heartbeat), daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            path.unlink()


def _writable_parent(path: Path) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False


def _beat(path: Path, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):
            os.utime(path)


def single_flight(path: Path, lookup: Callable[[], T | None], compute: Callable[[], T], **lease_options) -> T:
    """Return `lookup()` if it finds a value; otherwise compute once across processes.

    Waiters re-run `lookup` after the holder releases the lease, so they read its result.
    """
    found = lookup()
    if found is not None:
        return found
    with lease(path, **lease_options):
        found = lookup()  # the holder we waited for may have produced it
        if found is not None:
            return found
        return compute()


# On object storage -----------------------------------------------------------------------------------


def _remote_stale(fs: Any, path: str, stale_after: float) -> float | None:
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
            age = _remote_stale(fs, path, stale_after)
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
    beat = threading.Thread(target=_remote_beat, args=(fs, path, me, stop, heartbeat), daemon=True)
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


def _remote_beat(fs: Any, path: str, me: bytes, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(Exception):
            fs.pipe_file(path, me)
