"""Files the library did not write are never deleted or overwritten: crafted object keys, user folders and
trees, crafted manifests; and the errors that used to hide behind a crash (issue 23: 9, 10, 11, 16, 18)."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hf_cachehooks import CacheConfig, GenerationCache, management
from hf_cachehooks._core import entry
from hf_cachehooks._core.keys import hash_bytes, make_key
from hf_cachehooks._core.remote_sync import relative_key
from hf_cachehooks._core.store import cache_root, local_path, seal, tag_folder
from hf_cachehooks.activations.store import ActivationStore
from hf_cachehooks.activations.writer import cache_activations
from hf_cachehooks.cli import main
from hf_cachehooks.errors import CacheError, ConfigError, ServerError
from hf_cachehooks.generation.remote import OpenAIBackend
from tests import s3_server
from tests.conftest import make_llama, make_tokenizer
from tests.s3_server import bucket_fs

s3_endpoint, s3_root = s3_server.s3_endpoint, s3_server.s3_root  # the loopback S3 fixtures
ROWS = [{"text": f"a b c {i}", "label": i % 2} for i in range(6)]
SETTINGS = {"prompt_name": "50-50", "subject_type": "all", "temperature": 1.0, "max_tokens": 8}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _age(path: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


class Echo:
    name = "echo"
    asked = 0

    def render(self, prompts):
        return list(prompts)

    def complete(self, prompts, sampling):
        self.asked += len(prompts)
        return [f"a:{p}" for p in prompts]


# 9. object keys are names, never paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, rel",
    [
        ("b/team/experiments/.locks/k.lock", "experiments/.locks/k.lock"),
        ("b/team/../../x/.locks/k.lock", None),
        ("b/team/a/./.locks/k.lock", None),
        ("b/team/a//.locks/k.lock", None),
        ("b/team//etc/.locks/k.lock", None),
        ("b/teamx/.locks/k.lock", None),
        ("b/team/a\0/.locks/k.lock", None),
    ],
)
def test_an_object_key_becomes_a_relative_name_only_when_it_is_one(key, rel):
    assert relative_key("b/team", key) == rel


def test_prune_on_a_bucket_never_deletes_a_local_file_through_a_crafted_lease_key(
    s3_root, tmp_path, capsys, monkeypatch
):
    GenerationCache("org/Tiny", cache=CacheConfig(root=s3_root)).generate(["q0"], Echo(), **SETTINGS)
    project = tmp_path / "victim"
    (project / "outputs" / "cache" / "predictions" / ".locks").mkdir(parents=True)
    victim = project / "poetry.lock"
    victim.write_text("my lock file")
    local_root = local_path(s3_root)  # copy-a/s3/<bucket>/team
    up = "../" * len(local_root.relative_to(tmp_path).parts)
    rel = f"{up}victim/outputs/cache/predictions/.locks/../../../../poetry.lock"
    assert (local_root / rel).resolve() == victim.resolve()  # what the kernel would unlink
    crafted = f"{s3_root}/{rel}"
    bucket_fs().pipe_file(crafted, b"{}")
    monkeypatch.setattr(management, "_LEFTOVER_GRACE", -1.0)  # as if the grace hour had passed
    assert main(["--cache-dir", s3_root, "prune", "--older-than", "30d"]) == 0
    out = capsys.readouterr().out
    assert victim.read_text() == "my lock file"
    assert "poetry.lock" not in out and "Removed 0 item(s)" in out


def test_prune_never_follows_a_linked_locks_folder_out_of_the_root(tmp_path):
    root = cache_root()
    GenerationCache("org/Tiny").generate(["q0"], Echo(), **SETTINGS)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "mine.lock").write_text("not a cache file")
    _age(outside / "mine.lock")
    (root / "experiments" / ".locks").rmdir()
    (root / "experiments" / ".locks").symlink_to(outside)
    management.plan_prune(root, 30 * 86400).execute()
    assert (outside / "mine.lock").read_text() == "not a cache file"


# 10. an activation store is written only into a folder that is ours ------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return make_llama(), make_tokenizer()


def _user_experiment(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"my": "dataset manifest, hand-written, not a cache file"}')
    (folder / "metadata.json").write_text('{"run": 7, "notes": "my own experiment metadata"}')
    (folder / "state.json").write_text('{"owner": "me"}')
    (folder / "notes.txt").write_text("my notes")
    return _snapshot(folder)


@pytest.mark.parametrize("force", [False, True])
def test_cache_activations_refuses_a_users_folder_and_changes_nothing(llama, tmp_path, force):
    model, tok = llama
    folder = tmp_path / "experiment"
    before = _user_experiment(folder)
    with pytest.raises(ConfigError, match="manifest.json is not an activation cache of hf_cachehooks"):
        cache_activations(model, tok, ROWS, folder, [1], force=force, progress=False)
    assert _snapshot(folder) == before  # nothing deleted, overwritten or added (no CACHEDIR.TAG either)


def test_a_non_empty_folder_needs_force_and_then_keeps_every_file(llama, tmp_path):
    model, tok = llama
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"is not empty .* notes.txt.*force=True"):
        cache_activations(model, tok, ROWS, folder, [1], progress=False)
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    (folder / "state.json").write_text('{"owner": "me"}')
    with pytest.raises(ConfigError, match="holds state.json, which the activation store would overwrite"):
        cache_activations(model, tok, ROWS, folder, [1], force=True, progress=False)
    (folder / "state.json").unlink()
    store = cache_activations(model, tok, ROWS, folder, [1], force=True, progress=False)
    assert len(store) == 6 and (folder / "notes.txt").read_text() == "my notes"
    assert main(["--cache-dir", str(folder), "clear", "--yes"]) == 0
    assert sorted(os.listdir(folder)) == ["CACHEDIR.TAG", "notes.txt"]


def test_a_foreign_manifest_in_a_store_folder_is_never_removed(llama, tmp_path):
    model, tok = llama
    folder = tmp_path / "acts"
    cache_activations(model, tok, ROWS, folder, [1], progress=False)
    (folder / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match="never removed or overwritten"):
        cache_activations(model, tok, ROWS, folder, [1], force=True, progress=False)
    assert (folder / "manifest.json").read_text() == '{"mine": true}'


def test_the_cli_refuses_an_existing_folder_as_output(llama, tmp_path, capsys, monkeypatch):
    import hf_cachehooks._models.inference as inference

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(inference, "load_planned", no_load)
    model, tok = llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    folder = tmp_path / "experiment"
    before = _user_experiment(folder)
    code = main(
        [
            "cache-activations",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(data),
            "--layers",
            "1",
            "--output",
            str(folder),
            "--force",
        ]
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of save_pretrained
    assert code == 2 and last.startswith("error: ") and "manifest.json is not an activation cache" in last
    assert _snapshot(folder) == before


def test_a_full_disk_is_a_cache_error_naming_the_folder(llama, tmp_path):
    model, tok = llama
    folder = tmp_path / "acts"
    rows = [{"text": " ".join(["a b c"] * 8), "label": i % 2} for i in range(64)]
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, not a signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # every file over 2 KiB fails, as on a full disk
    try:
        with pytest.raises(CacheError, match=f"Cannot write the activation store in {folder}") as info:
            cache_activations(model, tok, rows, folder, [1, 2], dtype="float32", progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "needs about" in str(info.value) and "another folder=" in str(info.value)
    assert isinstance(info.value, OSError)
    with pytest.raises(ConfigError):
        ActivationStore(folder)  # no store was claimed


# 11. a generation tree shared with the user ------------------------------------------------------------------


def _sweep_tree(base: Path) -> tuple[Path, dict[str, bytes]]:
    folder = base / "Tiny" / "generations" / "50-50" / "all"
    folder.mkdir(parents=True)
    stem = "n4_t1.0_maxtok8"
    (folder / f"{stem}_completions.jsonl").write_text(
        "".join(json.dumps({"i": i, "completion": f"EXPENSIVE answer {i}"}) + "\n" for i in range(4))
    )
    (folder / f"{stem}_full_texts.jsonl").write_text(
        "".join(json.dumps({"i": i, "full_text": f"Q{i} EXPENSIVE answer {i}"}) + "\n" for i in range(4))
    )
    (folder / f"{stem}_metadata.json").write_text(json.dumps({"model": "my 12B run", "n": 4}))
    return folder, _snapshot(base)


def test_generation_cache_on_a_users_sweep_tree_keeps_their_files(tmp_path, caplog):
    base = tmp_path / "experiments"
    folder, before = _sweep_tree(base)
    cache = GenerationCache("org/Tiny", cache=CacheConfig(folder=base))
    backend = Echo()
    gens = cache.generate([f"Q{i}" for i in range(4)], backend, **SETTINGS)
    assert gens.status == "miss" and gens.first_samples == [f"a:Q{i}" for i in range(4)]
    after = _snapshot(base)
    assert {name: after[name] for name in before} == before  # every file of theirs, byte for byte
    assert "is not a cache entry of hf_cachehooks" in caplog.text
    assert "Not caching these generations" in caplog.text and "n4_t1.0_maxtok8_metadata.json" in caplog.text
    again = cache.generate([f"Q{i}" for i in range(4)], backend, **SETTINGS)
    assert again.status == "miss" and backend.asked == 8
    assert {name: _snapshot(base)[name] for name in before} == before


def test_a_hand_edited_cache_file_is_kept_and_named(tmp_path, caplog):
    cache = GenerationCache("org/Tiny")
    first = cache.generate([f"Q{i}" for i in range(4)], Echo(), **SETTINGS)
    data = Path(first.path.replace("metadata.json", "completions.jsonl"))
    edited = data.read_bytes().replace(b"a:Q1", b"my fix")
    data.write_bytes(edited)
    again = cache.generate([f"Q{i}" for i in range(4)], Echo(), **SETTINGS)
    assert again.status == "miss" and data.read_bytes() == edited  # regenerated, the user's edit kept
    assert f"{data} is in the way" in caplog.text


def test_a_run_killed_between_its_files_and_its_manifest_caches_on_the_next_run(tmp_path, monkeypatch):
    cache = GenerationCache("org/Tiny")

    def killed(*args, **kwargs):
        raise SystemExit("killed before the manifest")

    monkeypatch.setattr(entry, "commit", killed)
    with pytest.raises(SystemExit):
        cache.generate([f"Q{i}" for i in range(4)], Echo(), **SETTINGS)
    monkeypatch.undo()
    assert cache.generate([f"Q{i}" for i in range(4)], Echo(), **SETTINGS).status == "miss"
    assert cache.generate([f"Q{i}" for i in range(4)], Echo(), **SETTINGS).status == "hit"
    assert not [p for p in cache_root().rglob("*") if p.name.endswith(".hfch-tmp")]


# 16. a crafted manifest deletes nothing it did not write -------------------------------------------------------


def _craft(folder: Path, name: str, files: dict, age_days: float = 0) -> Path:
    doc = entry.manifest_doc(
        "predictions", make_key("predictions", {"x": name}), {}, {}, time.time() - 86400 * age_days
    )
    doc["files"] = files
    path = folder / name
    path.write_bytes(seal(doc))
    return path


def _rec(raw: bytes) -> dict:
    return {"bytes": len(raw), "xxh3": hash_bytes(raw)}


def test_prune_deletes_no_other_manifest_and_no_file_that_merely_shares_a_name(capsys):
    folder = cache_root() / "predictions"
    tag_folder(folder)
    other = _craft(folder, "other.json", {})
    notes = folder / "my_notes.txt"
    notes.write_text("my notes")
    _craft(
        folder,
        "evil.json",
        {
            "other.json": _rec(other.read_bytes()),  # another entry's manifest, its true size and hash
            "my_notes.txt": _rec(b"our note"),  # the size of the user's file, other bytes: a name clash
        },
        age_days=90,
    )
    problems = dict(management.verify(cache_root())[1])
    assert problems[folder / "evil.json"] == "other.json: is a cache entry's manifest, never an entry's data file"
    assert main(["prune", "--older-than", "30d"]) == 0
    assert "evil.json" in capsys.readouterr().out and not (folder / "evil.json").exists()
    assert notes.read_text() == "my notes" and other.exists()


def test_a_manifest_listing_the_folders_tag_is_corrupt_and_removing_it_keeps_the_tag():
    folder = cache_root() / "predictions"
    tag_folder(folder)
    tag = (folder / "CACHEDIR.TAG").read_bytes()
    evil = _craft(folder, "evil.json", {"CACHEDIR.TAG": _rec(tag)})
    assert "the cache folder's mark" in entry.inspect(evil, check="size")[1]
    entry.remove_entry(evil)
    assert not evil.exists() and (folder / "CACHEDIR.TAG").read_bytes() == tag


def test_a_file_record_of_true_bytes_is_malformed(tmp_path, capsys):
    folder = cache_root() / "predictions"
    tag_folder(folder)
    (folder / "x.txt").write_bytes(b"x")
    _craft(folder, "evil_bool.json", {"x.txt": {"bytes": True, "xxh3": hash_bytes(b"x")}})
    found, problem = entry.inspect(folder / "evil_bool.json", check="size")
    assert found is None and "malformed file record" in problem
    assert main(["ls", "--all", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# 18. the real error, not `max() arg is an empty sequence` --------------------------------------------------------


def test_a_server_that_is_not_up_raises_the_server_error(tmp_path):
    backend = OpenAIBackend(["http://127.0.0.1:9"], model="m", retries=1, backoff=0.0, timeout=2.0)
    with pytest.raises(ServerError, match=r"All 1 completion server\(s\) failed .*127.0.0.1:9"):
        GenerationCache("org/Tiny").generate(["Q0", "Q1"], backend, **SETTINGS)
    assert not list(cache_root().rglob("*_metadata.json"))


class _Refusing(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(
            {"error": {"message": "best_of must be 1 when using greedy sampling", "code": "invalid_request"}}
        ).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_every_prompt_refused_returns_the_servers_reason_and_caches_nothing(caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = OpenAIBackend([f"http://127.0.0.1:{server.server_port}"], model="m", retries=1, backoff=0.0)
        caplog.set_level(logging.WARNING, logger="hf_cachehooks")
        gens = GenerationCache("org/Tiny").generate(
            ["Q0", "Q1"], backend, samples_per_prompt=2, **{**SETTINGS, "temperature": 1.0}
        )
    finally:
        server.shutdown()
        server.server_close()
    assert gens.completions == [[None, None], [None, None]] and gens.status == "miss"
    assert "best_of must be 1" in gens.errors[0] and "All 4 generations failed" in caplog.text
    assert "best_of must be 1" in caplog.text
    assert not list(cache_root().rglob("*_metadata.json"))
