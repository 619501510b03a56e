"""Single-flight leases across processes (hf_cachehooks/_core/locking.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest

from hf_cachehooks._core.locking import lease, single_flight


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    return caplog


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.skip("pid was reused at once")  # pragma: no cover


def _write_lease(path: Path, *, pid: int, host: str | None = None, age: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"host": host or socket.gethostname(), "pid": pid, "since": time.time() - age}))
    if age:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))


class _Acquirer(threading.Thread):
    """Takes the lease in a background thread and records when it got it."""

    def __init__(self, path: Path, **options) -> None:
        super().__init__(daemon=True)
        self.path, self.options = path, options
        self.acquired = threading.Event()
        self.release = threading.Event()
        self.got: bool | None = None
        self.started_at = self.acquired_at = 0.0

    def run(self) -> None:
        self.started_at = time.monotonic()
        with lease(self.path, **self.options) as got:
            self.got = got
            self.acquired_at = time.monotonic()
            self.acquired.set()
            self.release.wait(30)

    @property
    def waited(self) -> float:
        return self.acquired_at - self.started_at


# Four processes, one compute ----------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from hf_cachehooks._core.locking import single_flight
    from hf_cachehooks._core.store import read_entry, write_entry

    lock, counter, result, go = map(Path, sys.argv[1:5])
    lookups = []

    def lookup():
        found = read_entry(result)
        lookups.append(found is not None)
        return found

    def compute():
        time.sleep(1.0)
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        value = {"computed_by": os.getpid(), "answer": 42}
        write_entry(result, value)
        return value

    (go.parent / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 30
    while not go.exists():  # start barrier: all workers call single_flight together
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    value = single_flight(lock, lookup, compute, poll=0.02)
    print(json.dumps({"value": value, "first_lookup_hit": lookups[0]}), flush=True)
    """
)


def test_four_processes_compute_once(tmp_path):
    lock = tmp_path / "cache" / ".locks" / "k.lock"
    counter, result, go = tmp_path / "computes.txt", tmp_path / "cache" / "result.json", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(lock), str(counter), str(result), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("ready-*"))) < 4:  # all four interpreters are up
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), "a worker died before the start"
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    # They really raced: every worker missed on its first lookup, inside the 1 s compute.
    assert [r["first_lookup_hit"] for r in reports] == [False] * 4
    values = [r["value"] for r in reports]
    computes = counter.read_text().splitlines()
    assert len(computes) == 1, f"compute ran {len(computes)} times: {computes}"
    assert values[0]["answer"] == 42
    assert all(v == values[0] for v in values), values
    assert values[0]["computed_by"] == int(computes[0])
    assert values[0]["computed_by"] in {p.pid for p in procs}
    assert not lock.exists()  # the holder released its lease


def test_single_flight_returns_lookup_hit_without_locking(tmp_path):
    lock = tmp_path / "locks" / "k.lock"
    calls = []
    assert single_flight(lock, lambda: "cached", lambda: calls.append(1) or "fresh") == "cached"
    assert calls == []
    assert not lock.parent.exists()  # a hit never touches the lock folder


def test_single_flight_rechecks_after_waiting(tmp_path):
    """A waiter that finds the holder's result after the lease is released does not compute."""
    lock = tmp_path / "k.lock"
    store: dict = {}
    holder = _Acquirer(lock)
    holder.start()
    assert holder.acquired.wait(5)
    computed = []

    def lookup():
        return store.get("v")

    waiter_result: list = []
    waiter = threading.Thread(
        target=lambda: waiter_result.append(
            single_flight(lock, lookup, lambda: computed.append(1) or "waiter computed", poll=0.01)
        )
    )
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # blocked behind the holder
    store["v"] = "holder's value"
    holder.release.set()
    waiter.join(5)
    holder.join(5)
    assert waiter_result == ["holder's value"]
    assert computed == []


# Breaking stale leases ----------------------------------------------------------------------------


def test_lease_of_dead_process_is_broken_at_once(tmp_path, warnings_log):
    path = tmp_path / ".locks" / "k.lock"
    _write_lease(path, pid=_dead_pid())
    started = time.monotonic()
    with lease(path, stale_after=60.0) as got:
        waited = time.monotonic() - started
        assert got is True
        assert orjson.loads(path.read_bytes())["pid"] == os.getpid()
    assert waited < 2.0  # not stale_after (60 s)
    assert not path.exists()
    assert any("Breaking stale cache lock" in r.getMessage() for r in warnings_log.records)


def test_lease_of_dead_process_on_another_host_waits_for_stale_after(tmp_path):
    """The pid check only applies to this host; elsewhere only the heartbeat age counts."""
    path = tmp_path / "k.lock"
    _write_lease(path, pid=_dead_pid(), host="some-other-host.invalid")
    taker = _Acquirer(path, stale_after=0.6, poll=0.02)
    taker.start()
    assert taker.acquired.wait(10)
    taker.release.set()
    taker.join(5)
    assert taker.got is True
    assert taker.waited >= 0.5


def test_live_lease_with_old_heartbeat_is_broken(tmp_path, warnings_log):
    path = tmp_path / "k.lock"
    _write_lease(path, pid=os.getpid(), age=3600)  # alive, but silent for an hour
    started = time.monotonic()
    with lease(path, stale_after=60.0) as got:
        assert got is True
        assert time.monotonic() - started < 2.0
    assert any("Breaking stale cache lock" in r.getMessage() for r in warnings_log.records)


def test_live_fresh_lease_is_broken_only_after_stale_after(tmp_path):
    path = tmp_path / "k.lock"
    _write_lease(path, pid=os.getpid())
    taker = _Acquirer(path, stale_after=0.8, poll=0.02)
    taker.start()
    assert not taker.acquired.wait(0.5)  # still fresh: wait
    assert taker.acquired.wait(10)
    taker.release.set()
    taker.join(5)
    assert taker.got is True
    assert taker.waited >= 0.75


def test_live_fresh_lease_is_respected(tmp_path):
    path = tmp_path / "k.lock"
    _write_lease(path, pid=os.getpid())
    taker = _Acquirer(path, stale_after=60.0, poll=0.02)
    taker.start()
    assert not taker.acquired.wait(0.6)
    assert orjson.loads(path.read_bytes())["pid"] == os.getpid()  # untouched
    path.unlink()  # the holder finishes
    assert taker.acquired.wait(5)
    taker.release.set()
    taker.join(5)
    assert taker.got is True


def test_heartbeat_keeps_a_long_holder_alive(tmp_path):
    """A holder that outlives stale_after is not broken while its heartbeat runs."""
    path = tmp_path / "k.lock"
    holder = _Acquirer(path, stale_after=0.5, heartbeat=0.05)
    holder.start()
    assert holder.acquired.wait(5)
    taker = _Acquirer(path, stale_after=0.5, poll=0.02)
    taker.start()
    assert not taker.acquired.wait(1.5)  # three times stale_after, still held
    holder.release.set()
    holder.join(5)
    assert taker.acquired.wait(5)
    taker.release.set()
    taker.join(5)
    assert taker.got is True


def test_lease_is_released_when_the_body_raises(tmp_path):
    path = tmp_path / "k.lock"
    with pytest.raises(RuntimeError, match="boom"):
        with lease(path):
            assert path.exists()
            raise RuntimeError("boom")
    assert not path.exists()


def test_empty_lease_left_by_a_crash_is_broken_after_stale_after(tmp_path):
    path = tmp_path / "k.lock"
    path.write_bytes(b"")
    stamp = time.time() - 3600
    os.utime(path, (stamp, stamp))
    taker = _Acquirer(path, stale_after=0.3, poll=0.02)
    taker.start()
    try:
        got_it = taker.acquired.wait(1.5)
    finally:
        path.unlink(missing_ok=True)  # let the thread finish either way
        taker.acquired.wait(5)
        taker.release.set()
        taker.join(5)
    assert got_it


# Unwritable lock location ---------------------------------------------------------------------------


def test_unwritable_lock_location_yields_false_and_runs_body(tmp_path, warnings_log):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    ran = []
    with lease(afile / ".locks" / "k.lock") as got:
        ran.append(got)
    assert ran == [False]
    assert any("Cannot take cache lock" in r.getMessage() for r in warnings_log.records)


def test_single_flight_computes_without_a_lock(tmp_path, warnings_log):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    calls = []
    value = single_flight(afile / "k.lock", lambda: None, lambda: calls.append(1) or {"v": 7})
    assert value == {"v": 7}
    assert calls == [1]
    assert any("Cannot take cache lock" in r.getMessage() for r in warnings_log.records)


def test_single_flight_under_proc_computes(warnings_log):
    assert single_flight(Path("/proc/hf_cachehooks_ro/k.lock"), lambda: None, lambda: "ok") == "ok"
    assert any("Cannot take cache lock" in r.getMessage() for r in warnings_log.records)


# Wrong shapes, zombies and full disks -------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b'"text"',
        b"7",
        b"null",
        *(
            b'{"host": "%s", "pid": %s}' % (socket.gethostname().encode(), pid)
            for pid in (b'"x"', b"null", b"true", b"-1", b"0", b"1.5", b"99999999999999999999", b"[1]")
        ),
    ],
)
def test_lease_of_the_wrong_shape_is_garbled_stale_by_age(tmp_path, content):
    from hf_cachehooks._core.locking import _stale

    path = tmp_path / "k.lock"
    path.write_bytes(content)
    assert _stale(path, 60.0) is None  # fresh: its writer may still be alive
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert _stale(path, 60.0) is not None
    with lease(path, stale_after=60.0) as got:  # broken at once, never a TypeError/ValueError
        assert got is True


def test_zombie_holder_is_dead(tmp_path, warnings_log):
    """A holder killed but not yet reaped by its parent answers os.kill(pid, 0): /proc says it is a zombie."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_bytes().rsplit(b")", 1)[1][1:2] != b"Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        os.kill(proc.pid, 0)  # still "there"
        path = tmp_path / "k.lock"
        _write_lease(path, pid=proc.pid)
        started = time.monotonic()
        with lease(path, stale_after=60.0) as got:
            assert got is True
        assert time.monotonic() - started < 2.0
        assert any("Breaking stale cache lock" in r.getMessage() for r in warnings_log.records)
    finally:
        proc.wait()


class _FullDiskFile:
    """A file object on a full disk: writes fail with ENOSPC when flushed."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_lease_that_cannot_be_written_is_removed_and_not_held(tmp_path, monkeypatch, warnings_log):
    """ENOSPC: O_EXCL creates the file but its content cannot be written; an empty lease must not stay."""
    import hf_cachehooks._core.locking as locking

    real_fdopen = os.fdopen
    monkeypatch.setattr(locking.os, "fdopen", lambda fd, *a, **k: _FullDiskFile(real_fdopen(fd, *a, **k)))
    path = tmp_path / "k.lock"
    with lease(path) as got:
        assert got is False
        assert not path.exists()
    monkeypatch.undo()
    assert not path.exists()
    assert any("Cannot write cache lock" in r.getMessage() for r in warnings_log.records)
    started = time.monotonic()
    with lease(path, stale_after=60.0) as got:  # the next run takes it at once
        assert got is True
    assert time.monotonic() - started < 1.0
