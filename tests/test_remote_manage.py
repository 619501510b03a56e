"""Management of an S3 root (moto on loopback): ls, du, verify, prune and clear act on the bucket itself;
push and pull copy only what is missing, verified, and resume."""

from __future__ import annotations

import json

import pytest

from hf_cachehooks import CacheConfig, GenerationCache
from hf_cachehooks.cli import main
from tests import s3_server
from tests.s3_server import bucket_fs, other_machine

s3_endpoint, s3_root = s3_server.s3_endpoint, s3_server.s3_root  # the loopback S3 fixtures
SETTINGS = {"prompt_name": "50-50", "subject_type": "all", "max_tokens": 3}


class Echo:
    name = "echo"
    asked = 0

    def render(self, prompts):
        return list(prompts)

    def complete(self, prompts, sampling):
        self.asked += len(prompts)
        return [f"a:{p}" for p in prompts]


def _fill(root, temperatures=(0.0, 1.0)):
    for t in temperatures:
        GenerationCache("org/Tiny", cache=CacheConfig(root=root, max_age=None)).generate(
            [f"q{i}" for i in range(5)], Echo(), temperature=t, **SETTINGS
        )


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_ls_du_verify_on_the_bucket(s3_root, capsys, monkeypatch, tmp_path):
    _fill(s3_root)
    other_machine(monkeypatch, tmp_path)  # an empty local copy: everything below is read from the bucket
    code, out = _cli(capsys, "--cache-dir", s3_root, "ls", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and sorted(r["kind"] for r in rows) == ["generations", "generations"]
    assert all(r["path"].startswith(s3_root) and r["size"] > 0 for r in rows)
    code, out = _cli(capsys, "--cache-dir", s3_root, "du")
    assert "generations" in out and s3_root in out
    code, out = _cli(capsys, "--cache-dir", s3_root, "verify")
    assert code == 0 and "2 entries checked, 0 corrupt." in out
    fs = bucket_fs()
    (jsonl,) = [p for p in fs.find(s3_root) if p.endswith("t1.0_maxtok3_completions.jsonl")]
    raw = fs.cat_file(jsonl)
    fs.pipe_file(jsonl, raw.replace(b"a:q1", b"b:q1"))  # same size, other bytes
    code, out = _cli(capsys, "--cache-dir", s3_root, "verify")
    assert code == 1 and "content does not match the manifest" in out and "1 corrupt" in out


def test_prune_and_clear_delete_on_the_bucket(s3_root, capsys):
    _fill(s3_root)
    code, out = _cli(capsys, "--cache-dir", s3_root, "prune", "--older-than", "1d")
    assert code == 0 and "Removed 0 item(s)" in out
    code, out = _cli(capsys, "--cache-dir", s3_root, "clear", "--dry-run")
    assert "Would remove 2 item(s)" in out and s3_root in out
    code, out = _cli(capsys, "--cache-dir", s3_root, "clear", "--yes")
    assert code == 0 and "Removed 2 item(s)" in out
    left = [p for p in bucket_fs().find(s3_root) if not p.endswith("CACHEDIR.TAG")]
    assert left == []  # manifests and every file they list
    backend = Echo()
    GenerationCache("org/Tiny", cache=CacheConfig(root=s3_root)).generate(["q0"], backend, temperature=0.0, **SETTINGS)
    assert backend.asked == 1  # gone for every machine, the local copy included


def test_prune_removes_a_dead_writers_lease_object(s3_root, capsys, monkeypatch):
    import hf_cachehooks.management as management

    _fill(s3_root, temperatures=(0.0,))
    lease = f"{s3_root}/experiments/.locks/0123abcd.lock"
    bucket_fs().pipe_file(lease, b'{"host": "gone", "pid": 1, "since": 0}')
    code, out = _cli(capsys, "--cache-dir", s3_root, "prune", "--older-than", "1d")
    assert "Removed 0 item(s)" in out and bucket_fs().exists(lease)  # written just now: it may be live
    monkeypatch.setattr(management, "_LEFTOVER_GRACE", -1.0)  # as if an hour had passed
    code, out = _cli(capsys, "--cache-dir", s3_root, "prune", "--older-than", "1d")
    assert "0123abcd.lock  (left by a dead writer)" in out and "Removed 1 item(s)" in out
    assert not bucket_fs().exists(lease)


def test_an_untagged_bucket_is_refused(s3_root, capsys):
    bucket_fs().pipe_file(f"{s3_root}/notes.json", b"{}")
    code = main(["--cache-dir", s3_root, "clear", "--yes"])
    assert code == 2 and "not an hf_cachehooks cache" in capsys.readouterr().err
    assert bucket_fs().exists(f"{s3_root}/notes.json")


def test_push_then_pull_copies_only_what_is_missing(s3_root, capsys, tmp_path):
    local = tmp_path / "laptop"
    _fill(str(local))
    code, out = _cli(capsys, "--cache-dir", str(local), "push", s3_root)
    assert code == 0 and "Pushed 2 entries" in out and "0 already there" in out
    code, out = _cli(capsys, "--cache-dir", str(local), "push", s3_root)
    assert "Pushed 0 entries" in out and "2 already there" in out
    cluster = tmp_path / "cluster"
    code, out = _cli(capsys, "--cache-dir", str(cluster), "pull", s3_root)
    assert code == 0 and "Pulled 2 entries" in out
    backend = Echo()
    gens = GenerationCache("org/Tiny", cache=CacheConfig(root=str(cluster))).generate(
        [f"q{i}" for i in range(5)], backend, temperature=1.0, **SETTINGS
    )
    assert gens.status == "hit" and backend.asked == 0
    code, out = _cli(capsys, "--cache-dir", str(cluster), "verify")
    assert code == 0 and "2 entries checked, 0 corrupt." in out


def test_pull_resumes_and_never_takes_a_tampered_entry(s3_root, capsys, tmp_path):
    _fill(s3_root)
    fs = bucket_fs()
    (jsonl,) = [p for p in fs.find(s3_root) if p.endswith("t1.0_maxtok3_full_texts.jsonl")]
    raw = bytearray(fs.cat_file(jsonl))
    raw[5] ^= 1
    fs.pipe_file(jsonl, bytes(raw))
    cluster = tmp_path / "cluster"
    code, out = _cli(capsys, "--cache-dir", str(cluster), "pull", s3_root)
    assert code == 1 and "Pulled 1 entries" in out and "SKIPPED" in out and "1 not usable" in out
    assert not list(cluster.rglob("n5_t1.0_maxtok3_metadata.json"))
    code, out = _cli(capsys, "--cache-dir", str(cluster), "pull", s3_root)
    assert "Pulled 0 entries" in out and "1 already there" in out


def test_push_and_pull_need_one_local_and_one_remote_root(s3_root, capsys, tmp_path):
    assert main(["--cache-dir", s3_root, "push", s3_root]) == 2
    assert main(["--cache-dir", str(tmp_path), "pull", str(tmp_path)]) == 2
    assert "a URL such as" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["push", "pull"])
def test_help_names_the_environment(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "AWS_ENDPOINT_URL" in capsys.readouterr().out
