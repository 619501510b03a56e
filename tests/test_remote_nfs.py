"""The file lease on a shared POSIX filesystem (NFS): processes that present different host names, as nodes of
a cluster sharing a home folder do. A holder on another host is never judged by its pid (that pid means
nothing here), only by its heartbeat; a dead holder of the same host is broken at once; a live one is waited for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One node: take the lease at argv[1] under host name argv[2], hold it argv[3] seconds (heartbeat every 0.2 s),
# "kill" in argv[4] dies (SIGKILL) while holding it; argv[5] is stale_after. Prints when it got the lease.
_NODE = """
import json, os, signal, socket, sys, time
socket.gethostname = lambda: sys.argv[2]
from pathlib import Path
from hf_cachehooks._core.locking import lease

started = time.time()
with lease(Path(sys.argv[1]), stale_after=float(sys.argv[5]), poll=0.02, heartbeat=0.2) as held:
    got = time.time()
    print(json.dumps({"held": held, "waited": got - started, "got": got}), flush=True)
    if sys.argv[4] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[3]))
print(json.dumps({"released": time.time()}), flush=True)
"""


def _node(lock: Path, host: str, hold: float = 0.0, mode: str = "run", stale_after: float = 60.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-c", _NODE, str(lock), host, str(hold), mode, str(stale_after)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _report(proc: subprocess.Popen) -> tuple[list[dict], str]:
    out, err = proc.communicate(timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def _wait_for(lock: Path) -> None:
    deadline = time.monotonic() + 30
    while not lock.exists():
        assert time.monotonic() < deadline, "the first node never took the lease"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_live_holder_on_another_host_is_waited_for_past_stale_after(tmp_path):
    lock = tmp_path / "shared" / ".locks" / "k.lock"
    holder = _node(lock, "node-a", hold=2.5)
    _wait_for(lock)
    waiter = _node(lock, "node-b", stale_after=1.0)  # its heartbeat keeps the lease fresh: never broken
    (got_a, released_a), _ = _report(holder)
    (got_b, _), err = _report(waiter)
    assert got_b["got"] >= released_a["released"] - 0.05 and "Breaking" not in err


@pytest.mark.slow
def test_a_dead_holder_of_another_host_is_broken_only_by_age(tmp_path):
    lock = tmp_path / "shared" / ".locks" / "k.lock"
    _report(_node(lock, "node-a", mode="kill"))
    assert json.loads(lock.read_text())["host"] == "node-a"  # left behind; its pid is dead on this machine
    (got, _), err = _report(_node(lock, "node-b", stale_after=1.5))
    assert got["held"] and got["waited"] >= 1.0 and "Breaking stale cache lock" in err  # by age, not by pid


@pytest.mark.slow
def test_a_dead_holder_of_the_same_host_is_broken_at_once(tmp_path):
    lock = tmp_path / "shared" / ".locks" / "k.lock"
    _report(_node(lock, "node-a", mode="kill"))
    (got, _), err = _report(_node(lock, "node-a", stale_after=60.0))
    assert got["held"] and got["waited"] < 5.0 and "Breaking stale cache lock" in err
