"""`cached_folder`: built once per key through the entry contract; another key, damage or a killed build rebuilds."""

from __future__ import annotations

import json

import pytest

from hf_cachehooks import ConfigError, cached_folder, make_key


def _builder(calls):
    def build(into):
        calls.append(into)
        (into / "model.safetensors").write_bytes(b"w" * (2 << 20))  # big enough to be checked by its stamp
        (into / "config.json").write_text(json.dumps({"steps": len(calls)}))

    return build


def test_built_once_then_reused_and_listed_in_a_sealed_manifest(tmp_path):
    calls, key = [], make_key("finetune", {"steps": 40})
    folder = cached_folder(tmp_path / "ckpt", key, _builder(calls))
    assert folder == tmp_path / "ckpt" and len(calls) == 1 and calls[0] != folder  # built aside, then renamed
    assert sorted(p.name for p in folder.iterdir()) == [".hf_cachehooks.json", "config.json", "model.safetensors"]
    manifest = json.loads((folder / ".hf_cachehooks.json").read_text())
    assert manifest["kind"] == "folder" and manifest["key"]["digest"] == key.digest
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors"]
    assert cached_folder(tmp_path / "ckpt", key, _builder(calls)) == folder and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no scratch folder left


def test_another_key_rebuilds_and_a_missing_file_rebuilds(tmp_path):
    calls = []
    cached_folder(tmp_path / "ckpt", make_key("finetune", {"steps": 40}), _builder(calls))
    cached_folder(tmp_path / "ckpt", make_key("finetune", {"steps": 41}), _builder(calls))
    assert len(calls) == 2 and json.loads((tmp_path / "ckpt" / "config.json").read_text()) == {"steps": 2}
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    cached_folder(tmp_path / "ckpt", make_key("finetune", {"steps": 41}), _builder(calls))
    assert len(calls) == 3 and (tmp_path / "ckpt" / "model.safetensors").stat().st_size == 2 << 20


def test_a_changed_file_is_never_reused_nor_deleted(tmp_path):
    calls, key = [], make_key("finetune", {})
    cached_folder(tmp_path / "ckpt", key, _builder(calls))
    (tmp_path / "ckpt" / "config.json").write_text('{"steps": 999}')  # edited after the build: not what was built
    with pytest.raises(ConfigError, match="holds no finished build.*never deleted"):
        cached_folder(tmp_path / "ckpt", key, _builder(calls))
    assert len(calls) == 1 and (tmp_path / "ckpt" / "config.json").read_text() == '{"steps": 999}'


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    def killed(into):
        (into / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_folder(tmp_path / "ckpt", make_key("finetune", {}), killed)
    assert list(tmp_path.iterdir()) == []
    calls = []
    cached_folder(tmp_path / "ckpt", make_key("finetune", {}), _builder(calls))
    assert len(calls) == 1


def test_a_folder_it_did_not_build_is_never_touched(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mine.txt").write_text("the user's")
    with pytest.raises(ConfigError, match="holds no finished build.*never deleted"):
        cached_folder(tmp_path / "ckpt", make_key("finetune", {}), _builder([]))
    assert (tmp_path / "ckpt" / "mine.txt").read_text() == "the user's"


def test_a_build_with_a_subfolder_is_refused(tmp_path):
    def nested(into):
        (into / "checkpoint-1").mkdir()

    with pytest.raises(ConfigError, match=r"\['checkpoint-1'\].*plain, visible files only"):
        cached_folder(tmp_path / "ckpt", make_key("finetune", {}), nested)
    assert list(tmp_path.iterdir()) == []
