"""Listing, sizing, pruning, clearing, verifying and explaining a cache (hf_cachehooks/management.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson
import pytest

from hf_cachehooks import CacheConfig, management
from hf_cachehooks._core.entry import commit
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import tag_folder
from hf_cachehooks.errors import ConfigError
from hf_cachehooks.evaluation.predictions import PredictionCache

DAY = 86400.0


def _inputs(model: str = "org/tiny-a", max_new_tokens: int = 32, n: int = 3) -> dict:
    return {
        "model": {"name": model, "params": "abc123"},
        "tokenizer": {"vocab": "v1"},
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": False},
        "prompt": {"template": "Q: {question}"},
        "data": {"fingerprint": "f" * 16, "n": n},
    }


def _doc(model: str, n: int, created_at: float) -> dict:
    return {
        "metadata": {"model_name": model, "dataset_size": n, "created_at": created_at},
        "predictions": [f"p{i}" for i in range(n)],
        "references": [f"r{i}" for i in range(n)],
        "metrics": {"exact_match": 0.5},
        "metric_versions": {"exact_match": "1"},
    }


def _save(cache: PredictionCache, *, model="org/tiny-a", max_new_tokens=32, n=3, age_days=0.0):
    key = make_key("predictions", _inputs(model, max_new_tokens, n))
    path = cache.save_run(key, model, _doc(model, n, time.time() - age_days * DAY))
    assert path is not None and path.is_file()
    return key, path


def _memo(root: Path, name: str = "org_new-model_1234") -> Path:
    """An identity memo, as evaluate_model remembers one for a model path."""
    tag_folder(root / "identity")
    path = root / "identity" / f"{name}.json"
    assert commit(
        path,
        "identity",
        {"kind": "identity", "digest": name, "inputs": {}},
        fields={"identity": {"model": {"name": "org/new-model"}}},
    )
    return path


@pytest.fixture
def populated(root, cache):
    """An old run, a fresh run, a per-example shard and an identity memo."""
    old_key, old = _save(cache, model="org/old-model", n=5, age_days=10)
    new_key, new = _save(cache, model="org/new-model", n=7)
    predictor = make_key("predictor", {k: v for k, v in _inputs("org/new-model").items() if k != "data"})
    assert cache.save_examples(predictor, {"h1": "a", "h2": "b"}, "b0001")
    return {
        "old": old,
        "new": new,
        "old_key": old_key,
        "new_key": new_key,
        "predictor": predictor,
        "shard": cache.examples_dir(predictor) / "b0001.json",
        "memo": _memo(root),
    }


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ls / du -----------------------------------------------------------------------------------------------


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
    shard = by_path[populated["shard"]]
    assert (shard.kind, shard.model, shard.examples) == ("example-predictions", "org/new-model", 2)
    assert shard.key == populated["predictor"].digest[:12]
    # Last used first (for these kinds, when made); memos and the tag are not listed unless asked.
    assert all(e.last_used == e.created_at for e in infos)
    assert [e.last_used for e in infos] == sorted((e.last_used for e in infos), reverse=True)
    assert infos[-1].path == populated["old"]
    assert populated["memo"] not in by_path
    assert populated["memo"] in {e.path for e in management.list_entries(root, bookkeeping=True)}


def test_list_entries_of_one_kind(root, populated):
    assert {e.kind for e in management.list_entries(root, "identity")} == {"identity"}
    assert {e.kind for e in management.list_entries(root, "predictions")} == {"predictions", "example-predictions"}
    assert {e.kind for e in management.list_entries(root, "example-predictions")} == {"example-predictions"}


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


def test_disk_usage_counts_every_entry_byte(root, populated):
    usage = management.disk_usage(root)
    assert set(usage) == {"example-predictions", "identity", "predictions"}
    on_disk = sum(p.stat().st_size for p in _files(root) if p.name != "CACHEDIR.TAG")
    assert sum(usage.values()) == on_disk


# prune / clear -----------------------------------------------------------------------------------------


def test_plan_prune_selects_only_old_entries(root, populated):
    before = _files(root)
    plan = management.plan_prune(root, 7 * DAY)
    assert plan.paths == [populated["old"]]
    assert _files(root) == before  # planning deletes nothing
    assert plan.execute() == 1
    assert _files(root) == before - {populated["old"]}
    assert populated["new"] in {e.path for e in management.list_entries(root, "predictions")}


def test_plan_prune_uses_now_and_kind(root, populated):
    later = time.time() + 30 * DAY
    everything = set(management.plan_prune(root, 7 * DAY, now=later).paths)
    assert everything == {populated["old"], populated["new"], populated["shard"], populated["memo"]}
    assert management.plan_prune(root, 7 * DAY, now=later, kind="identity").paths == [populated["memo"]]


def test_plan_prune_removes_only_old_temp_files_of_our_writers(root, populated):
    folder = root / "predictions"
    dead = folder / ".x.json.abc123.hfch-tmp"
    live = folder / ".y.json.def456.hfch-tmp"
    foreign = folder / ".editor-swap.tmp"
    outside = root / "notes" / ".old.json.abc.hfch-tmp"  # not in a folder marked as ours
    outside.parent.mkdir()
    stamp = time.time() - 2 * 3600
    for path in (dead, live, foreign, outside):
        path.write_bytes(b"half")
        if path is not live:
            os.utime(path, (stamp, stamp))
    paths = management.plan_prune(root, 7 * DAY).paths
    assert dead in paths
    assert live not in paths and foreign not in paths and outside not in paths


def test_plan_prune_skips_corrupt_entries(root, populated):
    raw = populated["old"].read_bytes()
    populated["old"].write_bytes(raw.replace(b"p0", b"P0"))
    assert management.plan_prune(root, 7 * DAY).paths == []


def test_plan_clear(root, populated):
    plan = management.plan_clear(root, "predictions")
    assert set(plan.paths) == {populated["old"], populated["new"], populated["shard"]}
    assert plan.size == sum(p.stat().st_size for p in plan.paths)
    plan.execute()
    assert not populated["shard"].parent.exists()  # an emptied entry folder goes with its last entry
    left = management.plan_clear(root)
    assert left.paths == [populated["memo"]]
    left.execute()
    assert {p.name for p in _files(root)} == {"CACHEDIR.TAG"}


def test_clear_on_a_folder_that_is_not_a_cache_deletes_nothing(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('hi')")
    (project / "data").mkdir()
    (project / "data" / "rows.json").write_text("[]")
    before = _files(project)
    with pytest.raises(ConfigError, match="not an hf_cachehooks cache"):
        management.plan_clear(project)
    with pytest.raises(ConfigError, match="not an hf_cachehooks cache"):
        management.plan_prune(project, 0)
    assert _files(project) == before


def test_entries_in_untagged_folders_are_never_touched(root, populated, tmp_path):
    stray = root / "mine"
    stray.mkdir()
    copy = stray / populated["new"].name
    copy.write_bytes(populated["new"].read_bytes())  # a manifest of ours, but in a folder not marked as cache
    assert copy not in {e.path for e in management.list_entries(root)}
    management.plan_clear(root).execute()
    assert copy.exists()


def test_unknown_kind_names_present_kinds(root, populated):
    with pytest.raises(ConfigError) as info:
        management.plan_clear(root, "nosuch")
    message = str(info.value)
    assert "'nosuch'" in message
    assert "example-predictions, identity, predictions" in message


# verify ------------------------------------------------------------------------------------------------


def test_verify_clean_cache(root, populated):
    checked, problems = management.verify(root)
    assert (checked, problems) == (4, [])  # two runs, one shard, one identity memo


def test_verify_reports_corrupt_entry(root, populated):
    target = populated["new"]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    checked, problems = management.verify(root)
    assert checked == 4
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
    with pytest.raises(ConfigError, match="is neither an entry file nor the key of an entry"):
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
    # The miss record is a memo: listed only when asked.
    assert all(e.path.name != "last_miss.json" for e in management.list_entries(root))
    assert any(e.kind == "last-miss" for e in management.list_entries(root, bookkeeping=True))
    assert not caplog.records


def test_listing_never_deletes_a_corrupt_entry(root, populated):
    populated["old"].write_bytes(populated["old"].read_bytes()[:-40])
    listed = {e.path for e in management.list_entries(root)}
    assert populated["old"] not in listed and populated["old"].exists()  # left for `verify` to report
    assert management.verify(root)[1][0][0] == populated["old"]


def test_prune_keeps_fresh_shards(root, cache, populated):
    later = time.time() + 8 * DAY
    later_cache = PredictionCache(CacheConfig(root=root, max_age=None, clock=lambda: later))
    later_cache.save_examples(populated["predictor"], {"h3": "c"}, "b2")
    paths = management.plan_prune(root, 7 * DAY, now=later + 1).paths
    assert populated["shard"] in paths
    assert populated["shard"].parent / "b2.json" not in paths


# an activation store outside the root (cache-activations --output) -------------------------------------

ROWS = [{"text": f"a b c {i}", "label": i % 2} for i in range(6)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ls(cli_main, capsys, root: Path) -> list[dict]:
    capsys.readouterr()
    assert cli_main(["--cache-dir", str(root), "ls", "--format", "json"]) == 0
    return orjson.loads(capsys.readouterr().out)


@pytest.fixture
def outside(tmp_path, capsys):
    """A store written by the CLI to `acts` beside the cache root `root` given as --cache-dir."""
    from hf_cachehooks.cli import main
    from tests.conftest import make_llama, make_tokenizer

    make_llama().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data.json").write_text(orjson.dumps(ROWS).decode())
    root, acts = tmp_path / "team-cache", tmp_path / "acts"
    assert (
        main(
            [
                "--cache-dir",
                str(root),
                "cache-activations",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "data.json"),
                "--layers",
                "1",
                "--output",
                str(acts),
            ]
        )
        == 0
    )
    return main, root, acts


def test_a_store_outside_the_root_is_listed_sized_and_verified_there(outside, capsys):
    main, root, acts = outside
    [listed] = _ls(main, capsys, root)
    link = Path(listed["link"])
    assert link.parent == root / "activations" and link.name.startswith("link-")
    assert (link.parent / "CACHEDIR.TAG").is_file()
    assert listed["kind"] == "activations" and listed["path"] == str(acts / "manifest.json")
    assert listed["size"] > 0 and listed["examples"] == len(ROWS)
    assert [{**e, "link": None} for e in _ls(main, capsys, acts)] == [{**listed, "link": None}]  # as there
    assert management.disk_usage(root)["activations"] == listed["size"]  # beside the model's identity memos
    assert main(["--cache-dir", str(root), "du"]) == 0 and "activations" in capsys.readouterr().out
    assert management.verify(root, "activations") == (1, [])


def test_clear_and_prune_remove_only_the_link_and_say_where_the_store_stays(outside, capsys):
    main, root, acts = outside
    before = _snapshot(acts)
    [link] = (root / "activations").glob("link-*.json")
    plan = management.plan_prune(root, DAY, now=time.time() + 2 * DAY, kind="activations")
    assert plan.entries == (link,) and plan.kept == {link: acts} and plan.size == link.stat().st_size
    capsys.readouterr()
    assert main(["--cache-dir", str(root), "clear", "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"the activation store in {acts} stays" in out and f"`hf-cachehooks --cache-dir {acts} clear`" in out
    assert not link.exists() and _snapshot(acts) == before
    assert _ls(main, capsys, root) == []
    assert [e["path"] for e in _ls(main, capsys, acts)] == [str(acts / "manifest.json")]
    here = acts.parent  # the same run again: a hit, recorded in the root again, the store unchanged
    assert (
        main(
            [
                "--cache-dir",
                str(root),
                "cache-activations",
                "--model",
                str(here / "model"),
                "--data",
                str(here / "data.json"),
                "--layers",
                "1",
                "--output",
                str(acts),
            ]
        )
        == 0
    )
    assert [e["link"] for e in _ls(main, capsys, root)] == [str(link)] and _snapshot(acts) == before


def test_a_link_to_a_damaged_or_missing_store_is_stale(outside, capsys):
    main, root, acts = outside
    [link] = (root / "activations").glob("link-*.json")
    shard = acts / "data-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-8])
    [stale] = _ls(main, capsys, root)
    assert stale["kind"] == management.LINK and stale["link"] == str(link)
    assert main(["--cache-dir", str(root), "ls"]) == 0 and f"Stale link {link}" in capsys.readouterr().out
    checked, problems = management.verify(root, "activations")
    assert checked == 1 and problems[0][0] == link and f"linked activation store {acts} is" in problems[0][1]
    left = _snapshot(acts)
    assert management.plan_prune(root, 30 * DAY).entries == (link,)  # stale: whatever its age
    assert main(["--cache-dir", str(root), "prune", "--older-than", "30d"]) == 0
    assert not link.exists() and _snapshot(acts) == left  # the damaged store is never touched from the root


def test_a_store_under_the_root_needs_no_link(root, tmp_path, tiny):
    from hf_cachehooks import CacheConfig
    from hf_cachehooks.activations.writer import cache_activations

    model, tok = tiny
    cache_activations(model, tok, ROWS, root / "activations" / "run", [1], progress=False, cache=CacheConfig(root=root))
    (tmp_path / "via").symlink_to(root, target_is_directory=True)  # real paths are compared
    cache_activations(model, tok, ROWS, tmp_path / "via" / "run2", [1], progress=False, cache=CacheConfig(root=root))
    assert not list(root.rglob("link-*.json"))
    assert len(management.list_entries(root, "activations")) == 2


def test_management_asks_once_whether_a_root_is_remote():
    """Local and remote roots differ behind `_core/roots.root_at` only: management never branches on it."""
    import inspect as source_of

    from hf_cachehooks import management
    from hf_cachehooks._core import roots

    text = source_of.getsource(management)
    assert "remote_sync" not in text and "url_of(root" not in text
    assert source_of.getsource(roots).count("url_of(") == 1
