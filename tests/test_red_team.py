"""Red-team suite (slow): what an adversary or an accident does to a cache, and what must survive it.

Each test attacks one promise from outside, the way a user's machine would: crafted manifests and bucket
keys aimed at files that are not ours, user files lying where an entry would go, writers killed at random
moments, processes racing on one key, and clients that drop a streamed response. Nothing here mocks the
library: the bytes on disk, the bucket and the sockets are real.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_cachehooks import CacheConfig, EvalConfig, GenerationCache, evaluate_model
from hf_cachehooks._core.store import hash_file, seal
from hf_cachehooks.cli import main
from hf_cachehooks.management import plan_prune, verify
from tests import s3_server
from tests.conftest import make_llama, make_tokenizer

pytestmark = pytest.mark.slow

s3_endpoint, s3_root = s3_server.s3_endpoint, s3_server.s3_root  # the loopback S3 fixtures
REPO = Path(__file__).resolve().parent.parent
CFG = EvalConfig(max_new_tokens=4, batch_size=2, metrics=("exact_match",))


def _rows(n: int) -> list[dict]:
    words = ["what", "is", "the", "capital", "of", "france", "sky", "blue", "two", "plus"]
    rng = random.Random(7)
    return [
        {"question": " ".join(rng.choice(words) for _ in range(5)) + f" {i % 10}", "answer": "paris"} for i in range(n)
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(files: dict, kind: str = "predictions") -> bytes:
    """A manifest sealed exactly as the library seals its own: what anyone with write access can forge."""
    doc = {
        "hf_cachehooks_entry": 1,
        "kind": kind,
        "key": {"kind": kind, "digest": "f" * 32, "inputs": {}},
        "created_at": 1.0,
        "writer": {"host": "elsewhere", "pid": 1, "version": "0"},
        "files": files,
        "predictions": [],
        "references": [],
    }
    return seal(doc)


# ---------------------------------------------------------------------------------------------- crafted manifests


def test_crafted_manifests_never_take_a_user_file_or_leave_the_root(tmp_path, root, qa_rows, tiny):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)  # a real cache, its folders tagged
    folder = root / "predictions"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the cache's")
    notes = folder / "my_notes.txt"
    notes.write_text("a user's notes kept beside the cache")
    tag = (folder / "CACHEDIR.TAG").read_bytes()
    real = next(p for p in folder.glob("*.json") if p.read_bytes().startswith(b'{\n  "hf_cachehooks_entry"'))
    os.symlink(outside / "secret.txt", folder / "link.txt")
    wrong_hash = {"bytes": notes.stat().st_size, "xxh3": "0" * 32}
    crafted = {
        "evil_tag.json": {"CACHEDIR.TAG": {"bytes": len(tag), "xxh3": hash_file(folder / "CACHEDIR.TAG")}},
        "evil_other_manifest.json": {real.name: {"bytes": real.stat().st_size, "xxh3": hash_file(real)}},
        "evil_same_name.json": {"my_notes.txt": wrong_hash},  # a user file that merely shares a name
        "evil_bool.json": {"my_notes.txt": {"bytes": True, "xxh3": "0" * 32}},
        "evil_up.json": {"../../outside/secret.txt": {"bytes": 15, "xxh3": "0" * 32}},
        "evil_abs.json": {str(outside / "secret.txt"): {"bytes": 15, "xxh3": "0" * 32}},
        "evil_link.json": {"link.txt": {"bytes": 15, "xxh3": hash_file(outside / "secret.txt")}},
    }
    for name, files in crafted.items():
        (folder / name).write_bytes(_manifest(files))
    before_outside = _snapshot(outside)

    checked, problems = verify(root)
    flagged = {Path(p).name for p, _ in problems}
    assert set(crafted) <= flagged, f"verify passed a crafted manifest: {set(crafted) - flagged}"
    assert main(["--cache-dir", str(root), "ls", "--all", "--format", "json"]) == 0

    assert main(["--cache-dir", str(root), "clear", "--yes"]) == 0
    assert notes.read_text() == "a user's notes kept beside the cache"
    assert _snapshot(outside) == before_outside
    assert (folder / "link.txt").is_symlink() or not (folder / "link.txt").exists()
    assert (outside / "secret.txt").read_text() == "not the cache's"


# ------------------------------------------------------------------------------- user files where an entry would go


def test_user_files_at_our_names_are_never_deleted_or_overwritten(tmp_path, root):
    tree = tmp_path / "experiments"
    theirs = tree / "Tiny" / "generations" / "50-50" / "all"
    theirs.mkdir(parents=True)
    for suffix in ("completions.jsonl", "full_texts.jsonl", "metadata.json"):
        for n in (1, 2, 4):
            (theirs / f"n{n}_t1.0_maxtok3_{suffix}").write_text('{"completion": "EXPENSIVE answer from a 12B run"}\n')
    (theirs / "manifest.json").write_text('{"my": "dataset manifest"}')
    before = _snapshot(tree)

    cache = GenerationCache("org/Tiny", cache=CacheConfig(folder=tree))
    for _ in range(2):
        try:
            cache.generate(
                ["q0", "q1"], _EchoBackend(), prompt_name="50-50", subject_type="all", max_tokens=3, temperature=1.0
            )
        except Exception as exc:  # refusing is fine; losing the user's files is not
            assert type(exc).__module__.startswith("hf_cachehooks"), repr(exc)
    after = _snapshot(tree)
    assert {k: v for k, v in after.items() if k in before} == before

    for target in (str(tree), str(root)):
        if (Path(target) / "CACHEDIR.TAG").exists() or any(Path(target).rglob("CACHEDIR.TAG")):
            main(["--cache-dir", target, "clear", "--yes"])
    assert {k: v for k, v in _snapshot(tree).items() if k in before} == before


def test_an_activation_output_folder_of_the_users_is_refused_not_replaced(tmp_path, tiny):
    from hf_cachehooks import cache_activations
    from hf_cachehooks.errors import HFCacheHooksError

    model, tok = tiny
    folder = tmp_path / "experiment"
    folder.mkdir()
    user = {
        "manifest.json": '{"my": "dataset manifest, hand-written"}',
        "metadata.json": '{"run": 7}',
        "state.json": '{"owner": "me"}',
        "layer_info.json": "[1, 2]",
        "dataset_info.json": "{}",
        "notes.txt": "my notes",
    }
    for name, text in user.items():
        (folder / name).write_text(text)
    with pytest.raises(HFCacheHooksError) as refused:
        cache_activations(model, tok, [{"text": "what is the sky"}] * 4, folder, layers=[1])
    assert str(folder) in str(refused.value)
    assert {n: (folder / n).read_text() for n in user} == user
    assert not (folder / "CACHEDIR.TAG").exists()


# -------------------------------------------------------------------------------------------- crafted bucket keys


@pytest.mark.parametrize(
    "tail",
    [
        "predictions/.locks/../../{up}{victim}",
        "./predictions/.locks/x/../../../{up}{victim}",
        "predictions//.locks/../../{up}{victim}",
        "{up}{victim_dir}/x/.locks/../{victim_name}",
    ],
)
def test_crafted_bucket_keys_never_reach_a_local_file(s3_root, tmp_path, tail):
    from tests.s3_server import bucket_fs

    GenerationCache("org/Tiny", cache=CacheConfig(root=s3_root, max_age=None)).generate(
        ["q0"], _EchoBackend(), prompt_name="50-50", subject_type="all", max_tokens=3, temperature=0.0
    )
    local_copy = Path(os.environ["HF_CACHEHOOKS_LOCAL_COPY"])
    (local_copy / "predictions" / ".locks").mkdir(parents=True, exist_ok=True)  # an earlier local run left it
    victim = tmp_path / "victim" / "poetry.lock"
    victim.parent.mkdir()
    victim.write_text("a user's lock file")
    up = "../" * (len(local_copy.parts) + 8)
    key = (
        s3_root.removeprefix("s3://")
        + "/"
        + tail.format(
            up=up, victim=str(victim).lstrip("/"), victim_dir=str(victim.parent).lstrip("/"), victim_name=victim.name
        )
    )
    fs = bucket_fs()
    try:
        fs.pipe(key, b'{"host": "gone", "pid": 1}')
    except Exception:  # the store refused the key: nothing to attack with
        pytest.skip("the S3 server normalised the crafted key away")
    from hf_cachehooks._core.store import cache_root

    root = cache_root(s3_root)
    plan = plan_prune(root, older_than=30 * 86400, now=time.time() + 10 * 86400)
    for path in plan.paths:
        assert os.path.realpath(path) != os.path.realpath(victim)
    plan.execute()
    assert victim.read_text() == "a user's lock file"
    assert main(["--cache-dir", s3_root, "clear", "--yes"]) == 0
    assert victim.read_text() == "a user's lock file"


class _EchoBackend:
    name = "echo"

    def render(self, prompts):
        return list(prompts)

    def complete(self, prompts, sampling):
        return [f"a:{p}" for p in prompts]


# ------------------------------------------------------------------------------------------------ kills and races

_CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from tests.conftest import make_llama, make_tokenizer
from tests.test_red_team import CFG, _rows
from hf_cachehooks import evaluate_model
go = sys.argv[1]
cfg = CFG.with_(**{opts!r})
model, tok = make_llama(), make_tokenizer()
print("ready", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.005)
result = evaluate_model(model, _rows({n}), cfg, tokenizer=tok)
print(result.cache_status, flush=True)
print(repr(result.predictions), flush=True)
"""


def _child(tmp_path: Path, n: int, opts: dict, go: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO), n=n, opts=opts), go],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def test_writers_killed_at_random_moments_never_leave_a_wrong_or_corrupt_entry(tmp_path, root):
    n, opts = 60, {"batch_size": 1}
    reference = evaluate_model(
        make_llama(), _rows(n), CFG.with_(use_prediction_cache=False, **opts), tokenizer=make_tokenizer()
    ).predictions
    rng = random.Random(3)
    for round_ in range(4):
        child = _child(tmp_path, n, opts)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.5) if round_ else 0.8)
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        checked, problems = verify(root)
        assert problems == [], f"after kill {round_}: {problems}"
    result = evaluate_model(make_llama(), _rows(n), CFG.with_(**opts), tokenizer=make_tokenizer())
    assert result.predictions == reference
    assert evaluate_model(make_llama(), _rows(n), CFG.with_(**opts), tokenizer=make_tokenizer()).cache_status == "hit"


def test_processes_racing_on_one_sampled_key_compute_it_once_and_agree(tmp_path):
    go = tmp_path / "go"
    opts = {"do_sample": True, "temperature": 1.0}
    children = [_child(tmp_path, 12, opts, str(go)) for _ in range(3)]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    go.touch()
    outputs = []
    for child in children:
        out, _ = child.communicate(timeout=300)
        assert child.returncode == 0
        outputs.append(out.splitlines())
    statuses = sorted(lines[0] for lines in outputs)
    assert statuses.count("miss") == 1 and statuses.count("hit") == 2, statuses
    assert len({lines[1] for lines in outputs}) == 1  # one sample set, served to every racer


# ----------------------------------------------------------------------------------------------- dropped streams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict, timeout: float) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _drop_stream(port: int, body: dict) -> None:
    """Send a streamed request, read its first bytes, then vanish without a word (RST on close)."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
        )
        head = s.recv(64)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert head.startswith(b"HTTP/1.1 200"), head


def test_serve_survives_dropped_streams_and_stops_on_sigterm(tmp_path):
    folder = tmp_path / "tiny-model"
    make_llama(vocab_size=64).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "hf_cachehooks", "serve", "--model", str(folder), "--port", str(port), "--name", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, _ = _post(port, "/v1/completions", {"model": "tiny", "prompt": "q", "max_tokens": 1}, 5)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "serve did not start"
                time.sleep(0.5)
        assert status == 200
        # sampled: n > 1 with greedy decoding is refused, as vLLM refuses it
        long = {"model": "tiny", "prompt": "what is the sky", "max_tokens": 60, "stream": True, "temperature": 1.0}
        for _ in range(3):
            _drop_stream(port, {**long, "max_tokens": 60, "n": 4})
        started = time.time()
        status, body = _post(
            port,
            "/v1/completions",
            {"model": "tiny", "prompt": "is the sky blue", "max_tokens": 3, "temperature": 0},
            timeout=30,
        )
        assert status == 200 and b"choices" in body
        assert time.time() - started < 20, "the model stayed busy after its clients left"
        _drop_stream(port, long)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not stop within 15 s of SIGTERM")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stdout.close()
