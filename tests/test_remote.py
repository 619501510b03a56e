"""Cache roots on S3 (a real S3 API: moto on loopback): the same cache behaviour as a local root, whole and
verified entries, a local read-through copy, and nothing tampered or half-uploaded ever served."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from hf_cachehooks import CacheConfig, GenerationCache
from hf_cachehooks._core import remote
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import cache_root, url_of
from hf_cachehooks.evaluation.predictions import PredictionCache
from tests import s3_server
from tests.s3_server import bucket_fs, other_machine

s3_endpoint, s3_root = s3_server.s3_endpoint, s3_server.s3_root  # the loopback S3 fixtures

QUESTIONS = [f"question {i} ?" for i in range(6)]
SETTINGS = {"prompt_name": "50-50", "subject_type": "all", "temperature": 0.0, "max_tokens": 3}


class Echo:
    """A backend without a model: completes every prompt with a fixed text, counting what it was asked."""

    name = "echo"

    def __init__(self, answer: str = "four") -> None:
        self.asked = 0
        self.answer = answer

    def render(self, prompts):
        return list(prompts)

    def complete(self, prompts, sampling):
        self.asked += len(prompts)
        return [f"{self.answer}:{p}" for p in prompts]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on a local root and on an S3 root."""
    if request.param == "local":
        return str(tmp_path / "local-root")
    return request.getfixturevalue("s3_root")


def _cache(root: str, **kwargs) -> GenerationCache:
    return GenerationCache("org/Tiny-Chat", chunk_size=4, cache=CacheConfig(root=root, max_age=None, **kwargs))


def test_url_roots_map_to_a_local_copy_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CACHEHOOKS_LOCAL_COPY", str(tmp_path / "copy"))
    local = cache_root("s3://bucket/team/cache")
    assert local == tmp_path / "copy" / "s3" / "bucket" / "team" / "cache"
    assert url_of(local / "predictions" / "x.json") == "s3://bucket/team/cache/predictions/x.json"
    assert url_of(tmp_path / "elsewhere" / "x.json") is None
    assert cache_root(str(tmp_path / "plain")) == tmp_path / "plain"
    for bad in ("s3://", "s3://bucket/../etc", "s3://bucket/.hidden"):
        with pytest.raises(ValueError, match="not a usable URL"):
            cache_root(bad)


def test_generations_miss_then_hit_then_partial(root):
    backend = Echo()
    first = _cache(root).generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert (first.status, backend.asked) == ("miss", 4)
    again = _cache(root).generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert (again.status, backend.asked, again.first_samples) == ("hit", 4, first.first_samples)
    more = _cache(root).generate(QUESTIONS, backend, num_samples=6, **SETTINGS)
    assert (more.status, more.reused, backend.asked) == ("partial", 4, 6)


def test_another_machine_hits_from_the_bucket(s3_root, monkeypatch, tmp_path):
    first = _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    listed = bucket_fs().find(s3_root)
    assert any(p.endswith("n6_t0.0_maxtok3_metadata.json") for p in listed)
    assert any(p.endswith("experiments/CACHEDIR.TAG") for p in listed)
    copy_b = other_machine(monkeypatch, tmp_path)
    backend = Echo()
    second = _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS)
    assert (second.status, backend.asked, second.completions) == ("hit", 0, first.completions)
    assert list(copy_b.rglob("n6_t0.0_maxtok3_completions.jsonl"))  # fetched whole into the local copy


def test_hf_cachehooks_home_may_be_a_url(s3_root, monkeypatch):
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", s3_root)
    GenerationCache("org/Tiny-Chat").generate(QUESTIONS, Echo(), **SETTINGS)
    assert any(p.endswith("_metadata.json") for p in bucket_fs().find(s3_root))


def test_prediction_runs_and_per_example_shards_are_shared(root, monkeypatch, tmp_path):
    """The prediction cache's two entry kinds, on a local root and on S3 (another machine for S3)."""
    key, predictor = make_key("predictions", {"n": 3}), make_key("predictor", {"model": "m"})
    doc = {"metadata": {"created_at": time.time()}, "predictions": ["a", "b"], "references": ["a", "c"], "metrics": {}}

    def cache():
        return PredictionCache(CacheConfig(root=root, max_age=None))

    cache().save_run(key, "org/m", doc)
    cache().save_examples(predictor, {"h1": "a"}, "b1")
    cache().save_examples(predictor, {"h2": "b"}, "b2")
    if root.startswith("s3://"):
        other_machine(monkeypatch, tmp_path)
    assert cache().load_run(key, "org/m")["predictions"] == ["a", "b"]
    assert cache().load_examples(predictor) == {"h1": "a", "h2": "b"}
    cache().compact(predictor)  # two shards merged into one, on the remote as well
    other_machine(monkeypatch, tmp_path, "copy-c")
    assert cache().load_examples(predictor) == {"h1": "a", "h2": "b"}
    if root.startswith("s3://"):
        shards = [p for p in bucket_fs().find(root) if "/examples/" in p and p.endswith(".json")]
        assert len(shards) == 1 and "merged-2" in shards[0]


def test_an_unchanged_remote_manifest_is_served_from_local_disk(s3_root, monkeypatch):
    _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    fs = bucket_fs()
    data = [p for p in fs.find(s3_root) if p.endswith(".jsonl")]
    calls: list[str] = []
    for name in ("cat_file", "get_file"):
        real = getattr(fs, name)  # fsspec binds sync methods on the instance: patch it there
        monkeypatch.setattr(fs, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    for path in data:
        fs.rm_file(path)  # the data files are gone remotely, the manifest is unchanged
    calls.clear()
    hit = _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    assert hit.status == "hit" and calls == []  # one HEAD of the manifest, no byte of data transferred
    other = _cache(s3_root, force_recompute=True).generate(QUESTIONS, Echo("new"), **SETTINGS)
    assert other.first_samples[0].startswith("new")
    calls.clear()
    (copy,) = Path(other.path).parent.glob("*_completions.jsonl")
    copy.unlink()  # the local copy lost a file: fetched again, whole, from the bucket
    assert _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS).status == "hit" and "get_file" in calls


def test_a_tampered_remote_file_is_never_served(s3_root, monkeypatch, tmp_path, caplog):
    _cache(s3_root).generate(QUESTIONS, Echo("good"), **SETTINGS)
    fs = bucket_fs()
    (data,) = [p for p in fs.find(s3_root) if p.endswith("_completions.jsonl")]
    raw = fs.cat_file(data)
    fs.pipe_file(data, raw.replace(b"good:question 1", b"evil:question 1"))  # same size, other bytes
    other_machine(monkeypatch, tmp_path)
    backend = Echo("fresh")
    with caplog.at_level(logging.WARNING):
        gens = _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS)
    assert gens.status == "miss" and backend.asked == 6
    assert not any(c and c[0].startswith("evil") for c in gens.completions)
    assert "content does not match the manifest" in caplog.text


def test_a_tampered_remote_manifest_is_never_served(s3_root, monkeypatch, tmp_path, caplog):
    _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    fs = bucket_fs()
    (manifest,) = [p for p in fs.find(s3_root) if p.endswith("_metadata.json")]
    fs.pipe_file(manifest, fs.cat_file(manifest).replace(b'"temperature": 0.0', b'"temperature": 0.5'))
    other_machine(monkeypatch, tmp_path)
    backend = Echo()
    with caplog.at_level(logging.WARNING):
        assert _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS).status == "miss"
    assert backend.asked == 6 and "checksum mismatch" in caplog.text


def test_files_without_a_manifest_are_no_entry(s3_root, monkeypatch, tmp_path):
    """A writer killed between its data files and its manifest: another machine sees no entry."""
    fs = bucket_fs()
    real = fs.pipe_file

    def die_on_manifest(path, value, *args, **kwargs):
        if str(path).endswith("_metadata.json"):
            raise ConnectionError("killed mid-upload")
        return real(path, value, *args, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", die_on_manifest)
    _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    monkeypatch.setattr(fs, "pipe_file", real)
    assert [p for p in fs.find(s3_root) if p.endswith(".jsonl")]  # the data files did go up
    other_machine(monkeypatch, tmp_path)
    backend = Echo()
    assert _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS).status == "miss"
    assert backend.asked == 6


def test_an_entry_removed_remotely_is_gone_everywhere(s3_root, monkeypatch, tmp_path):
    _cache(s3_root).generate(QUESTIONS, Echo(), num_samples=4, **SETTINGS)
    grown = _cache(s3_root).generate(QUESTIONS, Echo(), num_samples=6, **SETTINGS)  # n4 replaced by n6
    names = sorted(Path(p).name for p in bucket_fs().find(s3_root) if "generations" in p)
    assert names == [
        "n6_t0.0_maxtok3_completions.jsonl",
        "n6_t0.0_maxtok3_full_texts.jsonl",
        "n6_t0.0_maxtok3_metadata.json",
    ]
    for path in bucket_fs().find(s3_root):
        if path.endswith("_metadata.json"):
            bucket_fs().rm_file(path)
    backend = Echo()
    again = _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS)
    assert again.status == "miss" and backend.asked == 6 and Path(grown.path).exists()


def test_a_read_only_bucket_keeps_results_in_the_local_copy(s3_root, monkeypatch, caplog):
    fs = bucket_fs()
    monkeypatch.setattr(fs, "put_file", lambda *a, **k: (_ for _ in ()).throw(PermissionError("AccessDenied")))
    with caplog.at_level(logging.WARNING):
        _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    assert "stays in the local copy only" in caplog.text
    backend = Echo()
    assert _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS).status == "hit" and backend.asked == 0
    assert not [p for p in fs.find(s3_root) if p.endswith("_metadata.json")]


def test_an_unreachable_store_serves_the_local_copy(s3_root, monkeypatch, caplog):
    _cache(s3_root).generate(QUESTIONS, Echo(), **SETTINGS)
    monkeypatch.setattr(remote, "etag", lambda fs, path: (_ for _ in ()).throw(ConnectionError("no route")))
    backend = Echo()
    with caplog.at_level(logging.WARNING):
        assert _cache(s3_root).generate(QUESTIONS, backend, **SETTINGS).status == "hit"
    assert backend.asked == 0 and "using the local copy as it is" in caplog.text


def test_a_missing_driver_or_unknown_store_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_CACHEHOOKS_LOCAL_COPY", str(tmp_path / "copy"))
    with pytest.raises(ValueError, match="knows no store nosuchstore://"):
        _cache("nosuchstore://bucket/x").generate(QUESTIONS, Echo(), **SETTINGS)
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gcsfs for gs://"):
            _cache("gs://bucket/x").generate(QUESTIONS, Echo(), **SETTINGS)
