"""Listing, sizing, pruning, clearing, verifying and explaining a cache (hf_cachehooks/management.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson
import pytest

from hf_cachehooks import management
from hf_cachehooks.errors import ConfigError
from hf_cachehooks.keys import make_key
from hf_cachehooks.predictions import PredictionCache
from hf_cachehooks.store import read_entry, write_entry

DAY = 86400.0


def _inputs(model: str = "org/tiny-a", max_new_tokens: int = 32, n: int = 3) -> dict:
    return {"model": {"name": model, "params": "abc123"}, "tokenizer": {"vocab": "v1"},
            "generation": {"max_new_tokens": max_new_tokens, "do_sample": False},
            "prompt": {"template": "Q: {question}"}, "data": {"fingerprint": "f" * 16, "n": n}}


def _doc(model: str, n: int, created_at: float) -> dict:
    return {"metadata": {"model_name": model, "dataset_size": n, "created_at": created_at},
            "predictions": [f"p{i}" for i in range(n)], "references": [f"r{i}" for i in range(n)],
            "metrics": {"exact_match": 0.5}, "metric_versions": {"exact_match": "1"}}


def _save(cache: PredictionCache, *, model="org/tiny-a", max_new_tokens=32, n=3, age_days=0.0):
    key = make_key("predictions", _inputs(model, max_new_tokens, n))
    path = cache.save_run(key, model, _doc(model, n, time.time() - age_days * DAY))
    assert path is not None and path.is_file()
    return key, path


@pytest.fixture
def populated(root, cache):
    """An old run, a fresh run, a per-example shard folder and an identity memo."""
    old_key, old = _save(cache, model="org/old-model", n=5, age_days=10)
    new_key, new = _save(cache, model="org/new-model", n=7)
    predictor = make_key("predictor", {k: v for k, v in _inputs("org/new-model").items() if k != "data"})
    assert cache.save_examples(predictor, {"h1": "a", "h2": "b"}, "b0001")
    assert write_entry(root / "identity" / "org_new-model_1234.json", {"identity": {"x": 1}})
    return {"old": old, "new": new, "old_key": old_key, "new_key": new_key, "predictor": predictor,
            "shards": cache.examples_dir(predictor)}


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# kinds / ls / du ---------------------------------------------------------------------------------------


def test_kinds(root, populated):
    assert management.kinds(root) == ["identity", "predictions"]
    assert management.kinds(root / "missing") == []


def test_list_entries(root, populated):
    infos = management.list_entries(root)
    by_path = {e.path: e for e in infos}
    old, new = by_path[populated["old"]], by_path[populated["new"]]
    assert (old.kind, old.model, old.examples) == ("predictions", "org/old-model", 5)
    assert (new.kind, new.model, new.examples) == ("predictions", "org/new-model", 7)
    assert old.key == populated["old_key"].digest[:12]
    assert new.key == populated["new_key"].digest[:12]
    assert old.size == populated["old"].stat().st_size > 0
    assert time.time() - old.created_at == pytest.approx(10 * DAY, abs=60)
    shard = by_path[populated["shards"]]
    assert shard.kind == "predictions/examples"
    assert shard.model == "org/new-model"
    assert shard.key == populated["predictor"].digest[:12]
    assert shard.size == sum(p.stat().st_size for p in populated["shards"].iterdir())
    # Newest first, and no bookkeeping files listed.
    assert [e.created_at for e in infos] == sorted((e.created_at for e in infos), reverse=True)
    assert infos[-1].path == populated["old"]
    assert not any(e.path.name in {"last_miss.json", "predictor.json", "CACHEDIR.TAG"} for e in infos)


def test_list_entries_of_one_kind(root, populated):
    assert {e.kind for e in management.list_entries(root, "identity")} == {"identity"}
    assert {e.kind for e in management.list_entries(root, "predictions")} == {"predictions", "predictions/examples"}


def test_list_entries_on_missing_root_is_empty(tmp_path):
    assert management.list_entries(tmp_path / "nothing") == []


def test_to_json(root, populated):
    rows = orjson.loads(management.to_json(management.list_entries(root)))
    row = next(r for r in rows if r["path"] == str(populated["new"]))
    assert row["kind"] == "predictions"
    assert row["model"] == "org/new-model"
    assert row["key"] == populated["new_key"].digest[:12]
    assert row["size"] == populated["new"].stat().st_size
    assert row["examples"] == 7


def test_disk_usage(root, populated):
    usage = management.disk_usage(root)
    assert set(usage) == {"identity", "predictions"}
    assert usage["predictions"] == sum(p.stat().st_size for p in _files(root / "predictions"))
    assert usage["identity"] == sum(p.stat().st_size for p in _files(root / "identity"))


# prune / clear -----------------------------------------------------------------------------------------


def test_plan_prune_selects_only_old_entries(root, populated):
    before = _files(root)
    plan = management.plan_prune(root, 7 * DAY)
    assert plan.paths == [populated["old"]]
    assert plan.size == populated["old"].stat().st_size
    assert _files(root) == before  # planning deletes nothing
    assert plan.execute() == 1
    assert _files(root) == before - {populated["old"]}
    assert read_entry(populated["new"]) is not None


def test_plan_prune_uses_now_and_kind(root, populated):
    later = time.time() + 30 * DAY
    everything = set(management.plan_prune(root, 7 * DAY, now=later).paths)
    # every shard is old, so the shard folder goes whole, predictor header included
    assert everything == {populated["old"], populated["new"], populated["shards"]}
    assert management.plan_prune(root, 7 * DAY, now=later, kind="identity").paths == []  # no created_at


def test_plan_prune_removes_old_temp_files_of_dead_writers(root, populated):
    folder = root / "predictions"
    dead = folder / ".x.json.abc123.tmp"
    live = folder / ".y.json.def456.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    stamp = time.time() - 2 * 3600
    os.utime(dead, (stamp, stamp))
    paths = management.plan_prune(root, 7 * DAY).paths
    assert dead in paths
    assert live not in paths


def test_plan_prune_skips_corrupt_entries(root, populated):
    raw = populated["old"].read_bytes()
    populated["old"].write_bytes(raw.replace(b"p0", b"P0"))
    assert management.plan_prune(root, 7 * DAY).paths == []


def test_plan_clear(root, populated):
    plan = management.plan_clear(root, "predictions")
    assert plan.paths == [root / "predictions"]
    assert plan.size == management.disk_usage(root)["predictions"]
    assert (root / "predictions").is_dir()
    plan.execute()
    assert management.kinds(root) == ["identity"]
    assert management.plan_clear(root).paths == [root / "identity"]


def test_unknown_kind_names_present_kinds(root, populated):
    with pytest.raises(ConfigError) as info:
        management.plan_clear(root, "nosuch")
    message = str(info.value)
    assert "'nosuch'" in message
    assert "identity, predictions" in message


# verify ------------------------------------------------------------------------------------------------


def test_verify_clean_cache(root, populated):
    checked, problems = management.verify(root)
    assert problems == []
    # old + new runs, one shard, one identity memo
    assert checked == 5  # 4 entries + the sealed predictor header


def test_verify_reports_corrupt_entry(root, populated):
    target = populated["new"]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    checked, problems = management.verify(root)
    assert checked == 5  # 4 entries + the sealed predictor header
    assert [p for p, _ in problems] == [target]
    assert target.exists()  # verify reports, it does not delete
    checked, problems = management.verify(root, "identity")
    assert (checked, problems) == (1, [])


# explain -----------------------------------------------------------------------------------------------


def test_explain_two_entries_by_path_and_by_key(root, cache):
    key_a, a = _save(cache, max_new_tokens=32)
    key_b, b = _save(cache, max_new_tokens=64)
    for ref_a, ref_b in [(str(a), str(b)), (key_a.short, key_b.short), (key_a.digest, str(b))]:
        lines = management.explain(root, ref_a, ref_b)
        assert lines[0] == f"{a.name} → {b.name}:"
        assert lines[1:] == ["  generation.max_new_tokens 32→64"]


def test_explain_same_inputs(root, cache):
    _, a = _save(cache)
    assert management.explain(root, str(a), str(a))[1:] == ["  same key inputs"]


def test_explain_unknown_reference(root, cache):
    _save(cache)
    with pytest.raises(ConfigError, match="names 0 entries"):
        management.explain(root, "0123456789ab", "ba9876543210")


def test_explain_last_miss(root, cache, caplog):
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    assert management.explain(root) == [f"No recorded miss under {root}."]
    _, a = _save(cache, max_new_tokens=32)
    reason = cache.explain_miss(make_key("predictions", _inputs(max_new_tokens=64)))
    assert a.name in reason and "generation.max_new_tokens 32→64" in reason
    lines = management.explain(root)
    assert lines[0].startswith("Last predictions miss (")
    assert reason in lines[0]
    assert lines[1:] == ["  generation.max_new_tokens 32→64"]
    # The miss record is not itself an entry.
    assert all(e.path.name != "last_miss.json" for e in management.list_entries(root))
    assert not caplog.records


def test_listing_never_deletes_a_corrupt_entry(root, populated):
    populated["old"].write_bytes(populated["old"].read_bytes()[:-40])
    listed = {e.path for e in management.list_entries(root)}
    assert populated["old"] not in listed and populated["old"].exists()  # left for `verify` to report
    assert management.verify(root)[1][0][0] == populated["old"]


def test_prune_keeps_a_shard_folder_with_fresh_shards(root, cache, populated):
    later = time.time() + 8 * DAY
    PredictionCache(root / "predictions", lambda: later, None).save_examples(populated["predictor"], {"h3": "c"}, "b2")
    paths = management.plan_prune(root, 7 * DAY, now=later + 1).paths
    assert populated["shards"] not in paths and populated["shards"] / "b0001.json" in paths
    assert populated["shards"] / "b2.json" not in paths
