"""What a newcomer trips on (issue 29): GGUF-only folders, commands run twice, missing roots, explain's
arguments, the speed-up summary without logging set up, CI's step lines, progress."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest

from hf_cachehooks import ConfigError
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import tag_folder
from hf_cachehooks.cli import main
from tests.conftest import make_llama, make_tokenizer

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# 1. a folder of GGUF weights without gguf_file= -------------------------------------------------------


@pytest.fixture
def gguf_folder(tmp_path):
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")  # the name is all the check reads
    (folder / "__init__.py").write_text("")
    return folder


def test_a_gguf_only_folder_without_gguf_file_names_its_files(gguf_folder):
    from hf_cachehooks._models.loading import load_config, load_model

    for load in (load_model, load_config):
        with pytest.raises(ConfigError) as info:
            load(str(gguf_folder))
        message = str(info.value)
        assert "holds no config.json, only GGUF weights: SmolLM2-135M-Instruct.Q4_1.gguf" in message
        assert 'gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"' in message


def test_evaluate_model_on_a_gguf_only_folder_says_it_before_loading(gguf_folder):
    from hf_cachehooks import EvalConfig, evaluate_model

    with pytest.raises(ConfigError, match=r'gguf_file="SmolLM2-135M-Instruct\.Q4_1\.gguf"'):
        evaluate_model(str(gguf_folder), [{"question": "q", "answer": "a"}], EvalConfig(prompt_template="{question}"))


def test_the_cli_names_the_flag_not_the_python_argument(gguf_folder, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"text": "a", "label": "x"}]))
    args = ["cache-activations", "--model", str(gguf_folder), "--data", str(data), "--layers", "1", "--output", "a"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert "only GGUF weights: SmolLM2-135M-Instruct.Q4_1.gguf" in err
    assert "--gguf-file SmolLM2-135M-Instruct.Q4_1.gguf" in err and "gguf_file=" not in err


def test_a_folder_with_a_config_is_not_refused(gguf_folder):
    from hf_cachehooks._models.sources import check_gguf_given

    check_gguf_given(str(gguf_folder), "SmolLM2-135M-Instruct.Q4_1.gguf")  # named: fine
    (gguf_folder / "config.json").write_text("{}")
    check_gguf_given(str(gguf_folder), None)  # a config of its own: transformers reads that


# 2. the README's activation commands, twice -----------------------------------------------------------


@pytest.mark.slow
def test_the_readme_activation_commands_work_twice(tmp_path, capsys):
    model = tmp_path / "model"
    make_llama(layers=3).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    rows = [
        {"text": "what is two plus four ?" if i % 2 else "yes paris no blue", "type": "ab"[i % 2]} for i in range(8)
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    commands = [
        ["cache-activations", "--model", str(model), "--data", "pairs.json", "--layers", "1,2,3", "--output", "acts"],
        ["generate-vectors", "--cache", "acts", "--output", "run1"],
        ["analyze-probe", "--cache", "acts", "--vectors", "run1/normalized_vectors", "--output", "val", "--visualize"],
    ]
    printed = []
    for _ in range(2):
        for argv in commands:
            code, out, err = run(capsys, *argv)
            assert code == 0, err
            printed.append(out)
    assert printed[:3][1:] == printed[3:][1:]  # the same vectors and the same AUROC table
    assert sorted(p.name for p in tmp_path.glob("run1*")) == ["run1"]
    assert (tmp_path / "val" / "auroc_by_layer.png").exists()
    # fewer layers into the same folder: the vectors of the others go, so analyze-probe sees only these
    assert run(capsys, "generate-vectors", "--cache", "acts", "--output", "run1", "--layers", "2")[0] == 0
    assert sorted(p.name for p in (tmp_path / "run1" / "normalized_vectors").iterdir()) == ["layer_2.safetensors"]
    assert run(capsys, "analyze-probe", "--cache", "acts", "--vectors", "run1", "--output", "val2")[0] == 0


def test_generate_vectors_refuses_a_folder_that_is_not_a_run(tmp_path):
    from hf_cachehooks.activations.probing import _forget_earlier_run

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="is not a generate-vectors run"):
        _forget_earlier_run(tmp_path / "mine", keep=[1])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# 3. a root that does not exist, or holds no cache, is said so by every command --------------------------

MANAGEMENT = [["ls"], ["du"], ["prune", "--older-than", "7d"], ["clear", "--yes"], ["verify"], ["explain"]]


@pytest.mark.parametrize("argv", MANAGEMENT, ids=lambda a: a[0])
def test_every_command_says_a_missing_root_the_same_way(capsys, tmp_path, argv):
    missing = tmp_path / "nowhere"
    code, out, err = run(capsys, "--cache-dir", str(missing), *argv)
    assert code == 2 and out == ""
    assert err == (
        f"error: No cache at {missing} (the folder does not exist). Point --cache-dir or $HF_CACHEHOOKS_HOME "
        "at your cache root.\n"
    )


@pytest.mark.parametrize("argv", MANAGEMENT, ids=lambda a: a[0])
def test_every_command_says_a_folder_without_our_cache_the_same_way(capsys, tmp_path, argv):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("x = 1\n")
    code, out, err = run(capsys, "--cache-dir", str(project), *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"error: No cache at {project} (it is not an hf_cachehooks cache: no CACHEDIR.TAG of ours")
    assert (project / "train.py").read_text() == "x = 1\n"


def test_push_says_a_missing_root_the_same_way(capsys, tmp_path):
    code, _, err = run(capsys, "--cache-dir", str(tmp_path / "nowhere"), "push", "s3://bucket/team", "--dry-run")
    assert code == 2 and "No cache at" in err and "(the folder does not exist)" in err


@pytest.mark.parametrize("argv", MANAGEMENT[:2] + [["verify"], ["explain"]], ids=lambda a: a[0])
def test_an_empty_real_cache_root_is_not_an_error(capsys, root, argv):
    tag_folder(root / "predictions")
    code, _, err = run(capsys, *argv)
    assert code == 0 and err == ""


# 4. explain: every key ls prints, one argument, a bad argument -------------------------------------------


def _entry_with_a_miss(cache, max_new_tokens=32):
    """A prediction run, and a last-miss memo recorded for the same key (as a miss, then the run's save)."""
    inputs = {"model": {"name": "org/tiny"}, "generation": {"max_new_tokens": max_new_tokens}}
    key = make_key("predictions", inputs)
    cache.explain_miss(key)
    doc = {"metadata": {"model_name": "org/tiny", "dataset_size": 1}, "predictions": ["p"], "references": ["r"]}
    assert cache.save_run(key, "org/tiny", doc) is not None
    return key


def test_every_key_ls_prints_works_in_explain(capsys, root, cache):
    a = _entry_with_a_miss(cache, 32)
    b = _entry_with_a_miss(cache, 64)
    code, out, _ = run(capsys, "ls")
    keys = re.findall(r"\b([0-9a-f]{12})\s*$", out, flags=re.M)
    assert sorted(keys) == sorted([a.short, b.short])
    code, out, err = run(capsys, "explain", a.short, b.short)
    assert code == 0, err
    assert "generation.max_new_tokens 32→64" in out


def test_explain_with_one_key_shows_what_it_was_made_from_and_its_miss(capsys, root, cache):
    key = _entry_with_a_miss(cache, 32)
    code, out, err = run(capsys, "explain", key.short)
    assert code == 0, err
    assert f"key {key.short}) was made from:" in out
    assert "  generation.max_new_tokens = 32" in out and "  model.name = org/tiny" in out
    assert "Last predictions miss (" in out and f"key {key.short}" in out


def test_explain_with_one_bad_argument_is_an_error(capsys, root, cache):
    _entry_with_a_miss(cache)
    code, out, err = run(capsys, "explain", "nonsense")
    assert code == 2 and out == ""
    assert "'nonsense' is neither an entry file nor the key of an entry" in err and "hf-cachehooks ls" in err


def test_a_memo_key_alone_still_resolves(root, cache):
    from hf_cachehooks import management

    _entry_with_a_miss(cache)
    missed = make_key("predictions", {"model": {"name": "org/other"}})
    cache.explain_miss(missed)  # only the memo has this key
    assert management.find_entry(missed.short, root).name == "last_miss.json"


# 5. SpeedupCallback's summary reaches a plain script -------------------------------------------------


def test_the_summary_reaches_stderr_where_logging_is_not_set_up(monkeypatch, capsys):
    from hf_cachehooks.training import callbacks

    monkeypatch.setattr(logging.root, "handlers", [])  # a plain script: no handler anywhere
    callbacks.announce("SpeedupCallback switched optimizer AdamW → adamw_torch_fused.")
    assert capsys.readouterr().err == "[hf_cachehooks] SpeedupCallback switched optimizer AdamW → adamw_torch_fused.\n"


def test_the_summary_follows_a_configured_logging(caplog, capsys):
    from hf_cachehooks.training import callbacks

    caplog.set_level(logging.WARNING)  # the script asked for warnings only
    callbacks.announce("SpeedupCallback switched nothing.")
    assert "switched nothing" not in caplog.text and capsys.readouterr().err == ""
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    callbacks.announce("SpeedupCallback switched nothing.")
    assert "switched nothing" in caplog.text


def test_a_user_who_planned_nothing_gets_advice_not_a_planned_warning():
    from hf_cachehooks.training.callbacks import Switch, summary

    text = summary(
        [Switch("optimizer", "AdamW", "adamw_torch_fused", "switched"), Switch("tf32", False, False, "not switched")],
        ["dataloader_num_workers: 0 stays (1 would be faster here; a built Trainer keeps it); fix: ..."],
        Path("out/speedups_report.json"),
    )
    first, advice, last = text.splitlines()
    assert first == "SpeedupCallback switched optimizer AdamW → adamw_torch_fused."
    assert advice.startswith("  Not switchable now: dataloader_num_workers: 0 stays") and "planned" not in text
    assert last.endswith("out/speedups_report.json")


# 7. .ci/run says each step ---------------------------------------------------------------------------


def test_ci_run_prints_each_step_with_the_time_the_one_before_took():
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    assert script.rstrip().endswith('python -m pytest -q --cov=hf_cachehooks --cov-report=term "$@"')
    functions = script[script.index('STEP="" ') : script.index("\n", script.index("trap '"))]
    body = f'set -euo pipefail\n{functions}\nstep "installing torch"\nstep "running the test suite"\nfalse\n'
    done = subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "[ci] 0:00:00 installing torch",
        "[ci] 0:00:00 running the test suite (installing torch took 0:00:00)",
        "[ci] 0:00:00 failed (exit 1) (running the test suite took 0:00:00)",
    ]


# 9. progress within seconds -------------------------------------------------------------------------


def test_progress_counts_examples_by_batch_and_shows_each_token(monkeypatch, tiny, qa_rows):
    import tqdm.auto

    from hf_cachehooks import EvalConfig, evaluate_model

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})
            self.steps, self.postfixes = [], []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

        def set_postfix_str(self, s="", refresh=True):
            self.postfixes.append(s)
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    model, tok = tiny
    config = EvalConfig(prompt_template="q {question} a", max_new_tokens=3, batch_size=2)
    evaluate_model(model, qa_rows, config, tokenizer=tok)
    (bar,) = bars
    assert bar.total == len(qa_rows) == 5 and bar.steps == [2, 2, 1]
    assert "batch 1/3, token 1/3" in bar.postfixes  # the first token shows before the first batch ends


def test_counting_tokens_never_changes_a_completion(tiny):
    from hf_cachehooks._models.runners import generate_texts, on_each_token

    model, tok = tiny
    options = {"max_new_tokens": 4, "do_sample": False}
    texts = ["q what is two plus two ? a", "q is the sky blue ? a"]
    plain = generate_texts(model, tok, texts, options)
    seen = []
    with on_each_token(seen.append):
        counted = generate_texts(model, tok, texts, options)
    assert counted == plain and seen == [1, 2, 3, 4]
