"""Processes against one bucket (moto's S3 on loopback): a race on one key computes once, a writer killed
mid-upload leaves no entry (and its lease does not block the next machine), evaluate_model shares results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_cachehooks import CacheConfig, EvalConfig, evaluate_model
from tests import s3_server
from tests.s3_server import bucket_fs, other_machine

s3_endpoint, s3_root = s3_server.s3_endpoint, s3_server.s3_root  # the loopback S3 fixtures

# One "machine": its own host name and local copy, generating 6 completions slowly against the bucket root.
_MACHINE = """
import json, socket, sys, time
socket.gethostname = lambda: sys.argv[2]
from hf_cachehooks import CacheConfig, GenerationCache

class Slow:
    name = "slow"
    asked = 0
    def render(self, prompts):
        return list(prompts)
    def complete(self, prompts, sampling):
        Slow.asked += len(prompts)
        time.sleep(0.5)
        return [f"answer:{p}" for p in prompts]

kill = sys.argv[3] == "kill"
if kill:  # SIGKILL (no clean-up at all) right after the first data file reached the bucket
    import os, signal
    from hf_cachehooks._core.remote import filesystem
    fs = filesystem("s3://any")[0]
    real = fs.put_file
    def put_then_die(*args, **kwargs):
        real(*args, **kwargs)
        if str(args[0]).endswith(".jsonl"):
            os.kill(os.getpid(), signal.SIGKILL)
    fs.put_file = put_then_die
cache = GenerationCache("org/Tiny", chunk_size=6, cache=CacheConfig(root=sys.argv[1], max_age=None,
                        lock_stale_after=__import__("datetime").timedelta(seconds=float(sys.argv[4]))))
gens = cache.generate([f"q{i}" for i in range(6)], Slow(), prompt_name="p", temperature=0.0, max_tokens=3)
print(json.dumps({"status": gens.status, "asked": Slow.asked, "first": gens.first_samples}))
"""


def _machine(root, tmp_path, name, host, mode="run", stale_after=60.0):
    """Start one machine (`mode` "kill": it dies after its first upload) with its own local copy and host name."""
    env = {
        **os.environ,
        "HF_CACHEHOOKS_LOCAL_COPY": str(tmp_path / name),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(s3_server.__file__).resolve().parents[1]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", _MACHINE, root, host, mode, str(stale_after)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_machines_racing_one_key_compute_once(s3_root, tmp_path):
    procs = [_machine(s3_root, tmp_path, f"copy-{h}", f"node-{h}") for h in ("a", "b")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["asked"] for o in outs) == [0, 6]  # one machine generated, the other waited and read
    assert sorted(o["status"] for o in outs) == ["hit", "miss"]
    assert outs[0]["first"] == outs[1]["first"]
    assert not [p for p in bucket_fs().find(s3_root) if p.endswith(".lock")]  # the lease is released


@pytest.mark.slow
def test_a_writer_killed_mid_upload_leaves_no_entry_and_no_blocking_lease(s3_root, tmp_path):
    proc = _machine(s3_root, tmp_path, "copy-a", os.uname().nodename, mode="kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    listed = bucket_fs().find(s3_root)
    assert any(p.endswith(".jsonl") for p in listed) and not any(p.endswith("_metadata.json") for p in listed)
    assert any(p.endswith(".lock") for p in listed)  # the dead writer's lease is still there
    started = time.time()
    proc = _machine(s3_root, tmp_path, "copy-b", os.uname().nodename)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["asked"] == 6  # no entry was visible: generated whole
    assert "Breaking stale cache lock" in err and time.time() - started < 30  # a dead holder of this host


@pytest.mark.slow
def test_a_silent_holder_on_another_host_is_broken_after_stale_after(s3_root, tmp_path):
    """A lease of another host is never judged by pid (that pid means nothing here): only its heartbeat ages."""
    proc = _machine(s3_root, tmp_path, "copy-a", "node-far", mode="kill")
    proc.communicate(timeout=120)
    proc = _machine(s3_root, tmp_path, "copy-b", "node-near", stale_after=3.0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    waited = float(err.split("last heartbeat ")[1].split("s ago")[0])
    assert waited >= 3.0  # not broken by pid, only once its heartbeat was older than stale_after


@pytest.mark.slow
def test_evaluate_model_results_are_shared_through_the_bucket(s3_root, tiny, qa_rows, monkeypatch, tmp_path):
    model, tok = tiny
    config = EvalConfig(max_new_tokens=3, batch_size=2, metrics=("exact_match",), cache=CacheConfig(root=s3_root))
    first = evaluate_model(model, qa_rows[:3], config, tokenizer=tok)
    assert first.cache_status == "miss"
    assert evaluate_model(model, qa_rows[:3], config, tokenizer=tok).cache_status == "hit"
    other_machine(monkeypatch, tmp_path)
    again = evaluate_model(model, qa_rows[:3], config, tokenizer=tok)
    assert (again.cache_status, again.predictions) == ("hit", first.predictions)
    other_machine(monkeypatch, tmp_path, "copy-c")
    more = evaluate_model(model, qa_rows, config, tokenizer=tok)  # per-example shards come from the bucket too
    assert (more.cache_status, more.reused) == ("partial", 3)
    assert more.predictions[:3] == first.predictions


@pytest.mark.parametrize("content", [b"", b"{garbled", b"[]", b'{"host": "h"}', b'{"host": "h", "pid": true}'])
def test_a_garbled_lease_object_is_broken_at_once(s3_root, content):
    """An object is created whole with its content, so a garbled lease never belongs to a live holder."""
    from hf_cachehooks._core.locking import remote_lease

    url = f"{s3_root}/experiments/.locks/0123abcd.lock"
    bucket_fs().pipe_file(url, content)
    started = time.monotonic()
    with remote_lease(url, stale_after=60.0, poll=0.02) as held:
        assert held is True
    assert time.monotonic() - started < 10.0  # not the 60 s of stale_after
    assert not bucket_fs().exists(url)
