"""The manifest's `summary` (written by `entry.commit` from `kinds.SUMMARIES`) and the head reader that
management lists, sizes and prunes with (hf_cachehooks/_core/heads.py)."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from hf_cachehooks import CacheConfig, cli, management
from hf_cachehooks._core import entry, heads, kinds
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import seal, tag_folder, unseal
from hf_cachehooks.conversation.cache import TokenCache, TokenCacheConfig

DAY = 86400.0
MODEL = {"name": "org/tiny", "params": "abc"}

# (kind, key inputs, the kind's own fields as its writer commits them, expected (model, items))
KINDS = [
    ("predictions", {"model": MODEL}, {"metadata": {"model_name": "org/tiny", "dataset_size": 3}}, ("org/tiny", 3)),
    ("example-predictions", {"model": MODEL}, {"rows": {"h1": "a", "h2": "b"}}, ("org/tiny", 2)),
    ("generations", {"model": "tiny"}, {"model": "org/tiny", "num_samples": 4, "num_rows": 8}, ("org/tiny", 4)),
    (
        "activations",
        {"model": MODEL},
        {
            "num_examples": 6,
            "chunks": [{"file": "d.arrow", "rows": 6}],
            "layers": [1],
            "hidden_size": 8,
            "dtype": "float16",
            "positions": "last",
        },
        ("org/tiny", 6),
    ),
    (
        "conversation",
        {"conv_id": "c1", "uid": "u"},
        {"conv_id": "c1", "tokens": 12, "meta": {}, "pinned": True, "last_access": 2e9},
        ("c1", 12),
    ),
    ("identity", {}, {"identity": {"model": {"name": "org/tiny"}}}, ("org/tiny", 0)),
    ("file-hashes", {}, {"hashes": {"a": "b"}}, ("-", 0)),
    ("last-miss", {"model": MODEL}, {"reason": "r", "changes": []}, ("org/tiny", 0)),
    (kinds.LINK_KIND, {"folder": "/x"}, {"folder": "/x"}, ("-", 0)),
]


def _commit(folder: Path, kind: str, inputs: dict, fields: dict, created: float = 1e9) -> Path:
    tag_folder(folder)
    files = {"d.arrow": entry.write_file(folder, "d.arrow", b"0123456789")}
    path = folder / f"{kind}.json"
    assert entry.commit(path, kind, make_key(kind, inputs), files, fields, created_at=created)
    return path


@pytest.mark.parametrize(("kind", "inputs", "fields", "expected"), KINDS, ids=[k[0] for k in KINDS])
def test_every_kind_writes_a_summary_with_its_model_and_items(tmp_path, kind, inputs, fields, expected):
    path = _commit(tmp_path / "root" / "x", kind, inputs, fields)
    doc = unseal(path.read_bytes())
    assert list(doc)[:4] == ["hf_cachehooks_entry", "kind", "summary", "key"]  # in the head, before the key
    summary = doc["summary"]
    assert (summary["model"], summary["items"]) == expected
    assert summary["bytes"] == 10 and summary["created"] == 1e9
    assert summary["last_used"] == (2e9 if kind == "conversation" else 1e9)
    assert summary.get("pinned", False) is (kind == "conversation")
    head = heads.read_summary(path)
    assert head is not None and (head.kind, head.digest, head.summary) == (kind, doc["key"]["digest"], summary)
    assert head.size == 10 + path.stat().st_size  # the listed files and the manifest itself


def test_a_summary_in_fields_is_replaced_by_the_contracts(tmp_path):
    path = _commit(
        tmp_path, "generations", {}, {"model": "org/b", "num_samples": 2, "summary": {"model": "org/a", "items": 99}}
    )
    assert unseal(path.read_bytes())["summary"]["model"] == "org/b"  # a re-read doc's old summary never survives


def _big_run(folder: Path, n: int = 3000, summary: bool = True, created: float | None = None) -> Path:
    """A prediction run whose manifest is far longer than the head: only its first bytes are read."""
    tag_folder(folder)
    doc = entry.manifest_doc(
        "predictions",
        make_key("predictions", {"model": MODEL, "n": n}),
        {},
        {"metadata": {"model_name": "org/big", "dataset_size": n}, "predictions": [f"p{i}" for i in range(n)]},
        created or time.time(),
    )
    if not summary:
        del doc["summary"]  # as written before summaries existed
    path = folder / f"big-{n}-{summary}.json"
    path.write_bytes(seal(doc))
    assert (path.stat().st_size > heads.HEAD_BYTES) is (n > 100)
    return path


def test_a_long_manifest_is_listed_from_its_head_alone(root, monkeypatch):
    path = _big_run(root / "predictions")

    def whole(*args, **kwargs):
        raise AssertionError("parsed whole")

    monkeypatch.setattr(heads, "unseal", whole)
    monkeypatch.setattr(heads, "inspect", whole)
    [info] = management.list_entries(root)
    assert (info.path, info.model, info.examples, info.size) == (path, "org/big", 3000, path.stat().st_size)


@pytest.mark.parametrize("n", [3, 3000], ids=["short", "long"])
def test_a_manifest_without_summary_still_lists_and_prunes(root, n):
    old = _big_run(root / "predictions", n, summary=False, created=time.time() - 10 * DAY)
    assert b'"summary"' not in old.read_bytes()
    [info] = management.list_entries(root)
    assert (info.path, info.model, info.examples, info.size) == (old, "org/big", n, old.stat().st_size)
    assert management.disk_usage(root) == {"predictions": old.stat().st_size}
    assert management.plan_prune(root, 7 * DAY).entries == (old,)


def test_management_names_no_kind_and_reads_no_kind_field():
    source = Path(management.__file__).read_text()
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert strings & (set(kinds.SUMMARIES) | set(kinds.BOOKKEEPING) | {"conversation", "activations"}) == set()
    for field in ("dataset_size", "num_samples", "num_examples", "conv_id", "model_name", "last_access", "tokens"):
        assert f'"{field}"' not in source, field
    assert "def _model(" not in source and "def _count(" not in source and "def _last_used(" not in source


def _conversation(root: Path, clock) -> TokenCache:
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=root / "conversations")), clock=clock)
    count, layers, hidden = 4, 2, 8
    assert cache.append_turn("c1", np.arange(count), np.zeros((count, layers, hidden), np.float16))
    return cache


def test_a_conversation_read_moves_last_used_and_keeps_it_from_prune(root):
    now = [time.time() - 10 * DAY]
    cache = _conversation(root, lambda: now[0])
    [before] = management.list_entries(root)
    assert (before.kind, before.model, before.examples) == ("conversation", "c1", 4)
    assert before.created_at == before.last_used == pytest.approx(now[0])
    manifest = before.path
    assert management.plan_prune(root, 7 * DAY).entries == (manifest,)  # unread for 10 days
    now[0] = time.time()
    assert cache.token("c1", 1) is not None  # a read touches .last_access, never the manifest
    [after] = management.list_entries(root)
    assert after.created_at == before.created_at and after.last_used == pytest.approx(now[0], abs=1)
    assert management.plan_prune(root, 7 * DAY).entries == ()


def test_a_pinned_conversation_is_never_pruned(root):
    now = [time.time() - 30 * DAY]
    cache = _conversation(root, lambda: now[0])
    assert cache.pin("c1")
    [info] = management.list_entries(root)
    assert info.pinned and management.plan_prune(root, DAY).entries == ()
    assert cache.pin("c1", False)
    assert management.plan_prune(root, DAY).entries == (info.path,)


def test_ls_shows_last_used_and_json_carries_both_times(root, capsys):
    path = _commit(
        root / "predictions",
        "predictions",
        {"model": MODEL},
        {"metadata": {"model_name": "org/tiny", "dataset_size": 3}},
        created=time.time() - 3 * DAY,
    )
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "LAST USED" in out and "org/tiny" in out
    assert cli.main(["ls", "--format", "json"]) == 0
    [row] = orjson.loads(capsys.readouterr().out)
    assert row["path"] == str(path) and row["created_at"] == row["last_used"] and row["pinned"] is False


def test_a_corrupt_short_manifest_is_not_listed(root):
    path = _commit(root / "predictions", "predictions", {}, {"metadata": {"model_name": "m", "dataset_size": 1}})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"m"', b'"n"'))  # the seal no longer matches: a short manifest is read whole
    assert management.list_entries(root) == [] and path.exists()
    os.remove(path)


def test_read_head_still_reads_kind_and_key_from_the_head(root, monkeypatch):
    path = _big_run(root / "predictions")
    doc = unseal(path.read_bytes())

    def whole(*args, **kwargs):
        raise AssertionError("parsed whole")

    monkeypatch.setattr(entry, "inspect", whole)
    assert heads.read_head(path) == ("predictions", doc["key"])  # `explain` past the summary, never whole
