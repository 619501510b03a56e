"""The `hf-cachehooks` command line (hf_cachehooks/cli.py): exit codes and what it prints."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from hf_cachehooks._core.entry import commit
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import tag_folder
from hf_cachehooks.cli import main
from hf_cachehooks.evaluation.predictions import PredictionCache

DAY = 86400.0


def _inputs(model: str = "org/tiny-a", max_new_tokens: int = 32) -> dict:
    return {
        "model": {"name": model, "params": "abc123"},
        "tokenizer": {"vocab": "v1"},
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": False},
        "prompt": {"template": "Q: {question}"},
        "data": {"fingerprint": "f" * 16, "n": 3},
    }


def _save(cache: PredictionCache, *, model="org/tiny-a", max_new_tokens=32, n=3, age_days=0.0):
    key = make_key("predictions", _inputs(model, max_new_tokens))
    doc = {
        "metadata": {"model_name": model, "dataset_size": n, "created_at": time.time() - age_days * DAY},
        "predictions": ["p"] * n,
        "references": ["r"] * n,
        "metrics": {"exact_match": 1.0},
        "metric_versions": {"exact_match": "1"},
    }
    path = cache.save_run(key, model, doc)
    assert path is not None
    return key, path


@pytest.fixture
def populated(root, cache):
    old_key, old = _save(cache, model="org/old-model", n=5, age_days=10)
    new_key, new = _save(cache, model="org/new-model", n=7)
    tag_folder(root / "identity")
    assert commit(
        root / "identity" / "memo.json",
        "identity",
        {"kind": "identity", "digest": "memo", "inputs": {}},
        fields={"identity": {"model": {"name": "org/new-model"}}},
    )
    return {"old": old, "new": new, "old_key": old_key, "new_key": new_key}


def _human(n: int) -> str:
    """The size format the CLI promises: bytes below 1 KiB, else one decimal in KB/MB."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _row(out: str, needle: str) -> list[str]:
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out
    return lines[0].split()


# ls ----------------------------------------------------------------------------------------------------


def test_ls_table(capsys, root, populated):
    code, out, err = run(capsys, "ls")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["KIND", "MODEL", "EXAMPLES", "SIZE", "AGE", "LAST", "USED", "KEY"]
    old = _row(out, "org/old-model")
    assert old[0] == "predictions"
    assert old[2] == "5"
    assert " ".join(old[3:5]) == _human(populated["old"].stat().st_size)
    assert old[5] == old[6] == "10d"  # made and last used 10 days ago
    assert old[7] == populated["old_key"].short
    new = _row(out, "org/new-model")
    assert new[2] == "7"
    assert new[5].endswith("s")  # seconds old
    assert new[7] == populated["new_key"].short
    assert out.index("org/new-model") < out.index("org/old-model")  # newest first
    assert out.rstrip().endswith(f"2 entries under {root}")  # the identity memo shows with --all
    assert run(capsys, "ls", "--all")[1].rstrip().endswith(f"3 entries under {root}")


def test_ls_json(capsys, root, populated):
    code, out, _ = run(capsys, "ls", "--format", "json")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)}
    old = rows["org/old-model"]
    assert old["kind"] == "predictions"
    assert old["size"] == populated["old"].stat().st_size
    assert old["key"] == populated["old_key"].short
    assert old["examples"] == 5
    assert old["path"] == str(populated["old"])
    assert time.time() - old["created_at"] == pytest.approx(10 * DAY, abs=60)
    assert rows["org/new-model"]["key"] == populated["new_key"].short


def test_ls_kind_filter_and_cache_dir(capsys, tmp_path, populated):
    code, out, _ = run(capsys, "ls", "--kind", "identity")
    assert code == 0
    assert "org/old-model" not in out and "1 entries" in out
    other = tmp_path / "elsewhere"
    tag_folder(other / "predictions")  # a real cache root with no entries
    code, out, _ = run(capsys, "--cache-dir", str(other), "ls")
    assert code == 0
    assert out.rstrip().endswith(f"0 entries under {other}")


# du ----------------------------------------------------------------------------------------------------


def test_du(capsys, root, populated):
    code, out, _ = run(capsys, "du")
    assert code == 0
    lines = out.splitlines()
    kinds = [line.split()[-1] for line in lines[:-1]]
    assert kinds == ["identity", "predictions"]
    assert lines[-1].split()[-2:] == ["total", f"({root})"]
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "CACHEDIR.TAG")
    assert " ".join(lines[-1].split()[:2]) == _human(total)
    predictions = sum(
        p.stat().st_size for p in (root / "predictions").rglob("*") if p.is_file() and p.name != "CACHEDIR.TAG"
    )
    assert " ".join(lines[1].split()[:2]) == _human(predictions)


def test_du_empty_cache(capsys, root):
    tag_folder(root / "predictions")  # a real cache root with no entries (a missing one: test_newcomer.py)
    code, out, _ = run(capsys, "du")
    assert code == 0
    assert out.split() == ["0", "B", "total", f"({root})"]


# prune -------------------------------------------------------------------------------------------------


def test_prune_dry_run_then_real(capsys, populated):
    code, out, _ = run(capsys, "prune", "--older-than", "7d", "--dry-run")
    assert code == 0
    assert str(populated["old"]) in out
    assert str(populated["new"]) not in out
    assert "Would remove 1 item(s)" in out and "nothing deleted" in out
    assert populated["old"].exists() and populated["new"].exists()

    code, out, _ = run(capsys, "prune", "--older-than", "7d")
    assert code == 0
    assert "Removed 1 item(s)" in out
    assert not populated["old"].exists()
    assert populated["new"].exists()

    code, out, _ = run(capsys, "prune", "--older-than", "7d")
    assert "Removed 0 item(s)" in out
    assert populated["new"].exists()


def test_prune_shorter_duration_takes_more(capsys, populated):
    code, out, _ = run(capsys, "prune", "--older-than", "0s")
    assert code == 0
    assert not populated["old"].exists() and not populated["new"].exists()


def test_prune_bad_duration(capsys, populated):
    code, out, err = run(capsys, "prune", "--older-than", "soon")
    assert code == 2
    assert "error:" in err and "'soon'" in err
    assert populated["old"].exists()


# clear -------------------------------------------------------------------------------------------------


def test_clear_kind_dry_run_then_real(capsys, root, populated):
    code, out, _ = run(capsys, "clear", "--kind", "predictions", "--dry-run")
    assert code == 0
    assert str(populated["old"]) in out and str(populated["new"]) in out
    assert "Would remove 2 item(s)" in out
    assert populated["old"].exists() and populated["new"].exists()

    code, out, _ = run(capsys, "clear", "--kind", "predictions", "--yes")
    assert code == 0
    assert "Removed 2 item(s)" in out
    assert not populated["old"].exists() and not populated["new"].exists()
    assert (root / "identity" / "memo.json").exists()


def test_clear_needs_yes_without_a_terminal(capsys, root, populated):
    code, out, err = run(capsys, "clear")
    assert code == 1
    assert "pass --yes to confirm" in err and "3 item(s)" in err
    assert "Nothing deleted." in out
    assert populated["old"].exists() and populated["new"].exists()


@pytest.mark.parametrize(("answer", "deleted"), [("y\n", True), ("\n", False), ("no\n", False)])
def test_clear_asks_on_a_terminal(capsys, monkeypatch, populated, answer, deleted):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal(answer))
    code, out, _ = run(capsys, "clear")
    assert "Delete 3 item(s)" in out
    assert code == (0 if deleted else 1)
    assert populated["old"].exists() is not deleted


def test_clear_everything(capsys, root, populated):
    code, out, _ = run(capsys, "clear", "--yes")
    assert code == 0
    assert "Removed 3 item(s)" in out
    assert {p.name for p in root.rglob("*") if p.is_file()} == {"CACHEDIR.TAG"}


def test_clear_refuses_a_folder_that_is_not_a_cache(capsys, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("x = 1\n")
    code, _, err = run(capsys, "--cache-dir", str(project), "clear", "--yes")
    assert code == 2
    assert "not an hf_cachehooks cache" in err
    assert (project / "src" / "train.py").read_text() == "x = 1\n"


def test_clear_unknown_kind(capsys, root, populated):
    code, out, err = run(capsys, "clear", "--kind", "nosuch")
    assert code == 2
    assert "'nosuch'" in err
    assert "identity, predictions" in err
    assert populated["old"].exists()


# verify ------------------------------------------------------------------------------------------------


def test_verify_clean(capsys, populated):
    code, out, _ = run(capsys, "verify")
    assert code == 0
    assert "3 entries checked, 0 corrupt." in out
    assert "CORRUPT" not in out


def test_verify_corrupt(capsys, populated):
    path = populated["new"]
    path.write_bytes(path.read_bytes().replace(b'"p"', b'"q"', 1))
    code, out, _ = run(capsys, "verify")
    assert code == 1
    assert f"CORRUPT {path}: checksum mismatch" in out
    assert str(populated["old"]) not in out
    assert "3 entries checked, 1 corrupt." in out
    assert run(capsys, "verify", "--kind", "identity")[0] == 0


def test_verify_truncated(capsys, populated):
    path = populated["old"]
    path.write_bytes(path.read_bytes()[:100])
    code, out, _ = run(capsys, "verify")
    assert code == 1
    assert f"CORRUPT {path}" in out


# explain -----------------------------------------------------------------------------------------------


def test_explain_two_entries(capsys, cache):
    key_a, a = _save(cache, max_new_tokens=32)
    key_b, b = _save(cache, max_new_tokens=64)
    code, out, _ = run(capsys, "explain", str(a), str(b))
    assert code == 0
    assert "generation.max_new_tokens 32→64" in out
    assert a.name in out and b.name in out
    code, out, _ = run(capsys, "explain", key_b.short, key_a.short)
    assert code == 0
    assert "generation.max_new_tokens 64→32" in out


def test_explain_bad_reference(capsys, cache):
    _save(cache)
    code, _, err = run(capsys, "explain", "deadbeef0000", "feedface0000")
    assert code == 2
    assert "'deadbeef0000'" in err


def test_explain_last_miss(capsys, cache, root):
    tag_folder(root / "predictions")  # a real cache root with no entries yet
    code, out, _ = run(capsys, "explain")
    assert code == 0
    assert "No recorded miss" in out
    _, a = _save(cache, max_new_tokens=32)
    missed = make_key("predictions", _inputs(max_new_tokens=64))
    cache.explain_miss(missed)
    code, out, _ = run(capsys, "explain")
    assert code == 0
    assert f"key {missed.short}" in out
    assert a.name in out
    assert "generation.max_new_tokens 32→64" in out


# entry points ------------------------------------------------------------------------------------------


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_python_dash_m(root, populated, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_cachehooks", "du"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_CACHEHOOKS_HOME": str(root)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "predictions" in result.stdout
    assert f"total ({root})" in result.stdout


# global options, durations, names, help -----------------------------------------------------------------


def test_cache_dir_after_the_command_and_it_wins_over_one_before(capsys, tmp_path, populated):
    other = tmp_path / "elsewhere"
    tag_folder(other / "predictions")  # a real cache root with no entries
    code, out, _ = run(capsys, "ls", "--cache-dir", str(other))
    assert code == 0 and out.rstrip().endswith(f"0 entries under {other}")
    code, out, _ = run(capsys, "--cache-dir", str(tmp_path / "first"), "du", "--cache-dir", str(other))
    assert code == 0 and f"total ({other})" in out
    code, out, _ = run(capsys, "--cache-dir", str(other), "ls")  # before still works, not reset by the command
    assert out.rstrip().endswith(f"0 entries under {other}")


def _commands():
    """Every subcommand's parser, and argv that satisfies its required arguments."""
    from hf_cachehooks.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        argv = []
        for action in command._actions:
            if action.option_strings and action.required:
                argv += [action.option_strings[0], "x"]
            elif not action.option_strings and action.nargs not in ("?", "*"):
                argv.append("x")
        yield parser, name, command, argv


def test_every_command_takes_the_global_options_before_its_name(tmp_path):
    """An option declared on the command and globally: the command's default never hides the global value."""
    names = []
    for parser, name, command, argv in _commands():
        names.append(name)
        shared = {a.dest for a in parser._actions if a.option_strings} - {"help"}
        for action in command._actions:
            if action.dest in shared:  # declared both ways: only a value typed after the name may override
                assert action.default == argparse.SUPPRESS, (name, action.dest, action.default)
        args = parser.parse_args(["--cache-dir", str(tmp_path / "root"), name, *argv])
        assert args.cache_dir == str(tmp_path / "root"), name
        assert parser.parse_args([name, *argv, "--cache-dir", "after"]).cache_dir == "after", name
    assert {"chat-server", "k-sweep", "cache-activations", "serve", "ls"} <= set(names)


def test_chat_server_stores_conversations_under_the_global_cache_dir(capsys, monkeypatch, tmp_path):
    """`hf-cachehooks --cache-dir ROOT chat-server` used to write ./outputs/cache/conversations (finding 19)."""
    import uvicorn

    from hf_cachehooks.cli import models
    from tests.conftest import make_llama, make_tokenizer

    monkeypatch.setattr(models, "_load", lambda args: (make_llama(), make_tokenizer()))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "default-root"
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(default))
    root = tmp_path / "root"
    code, out, err = run(capsys, "--cache-dir", str(root), "chat-server", "--model", "org/tiny")
    assert code == 0, err
    assert f"Token cache {root / 'conversations'}:" in out
    assert not default.exists() and not (tmp_path / "outputs").exists()
    code, out, err = run(
        capsys, "--cache-dir", str(root), "chat-server", "--model", "org/tiny", "--directory", str(tmp_path / "mine")
    )
    assert code == 0 and f"Token cache {tmp_path / 'mine'}:" in out  # --directory still names the folder itself


def test_prune_needs_a_unit(capsys, populated):
    code, out, err = run(capsys, "prune", "--older-than", "7")
    assert code == 2
    assert err.startswith("error: ") and "'7' has no unit" in err and "7d" in err
    assert err.count("\n") == 1  # one line
    assert populated["old"].exists() and populated["new"].exists()


def test_dtype_means_storage_and_model_dtype_means_load():
    from hf_cachehooks.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "cache-activations",
            "--model",
            "m",
            "--data",
            "d",
            "--layers",
            "1",
            "--output",
            "o",
            "--dtype",
            "bfloat16",
            "--model-dtype",
            "float16",
        ]
    )
    assert (args.dtype, args.model_dtype) == ("bfloat16", "float16")
    for command in ("serve", "chat-server"):
        assert parser.parse_args([command, "--model", "m", "--model-dtype", "bfloat16"]).model_dtype == "bfloat16"
        assert parser.parse_args([command, "--model", "m"]).model_dtype == "float32"


def test_serve_dtype_is_a_hidden_deprecated_alias(capsys):
    from hf_cachehooks.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "m", "--dtype", "bfloat16"]).model_dtype == "bfloat16"
    assert "use --model-dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "--model-dtype" in shown and "--dtype" not in shown.replace("--model-dtype", "")


def _subparsers():
    import argparse

    from hf_cachehooks.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("", parser), *action.choices.items()]


def test_every_option_has_help_and_shows_its_default():
    import argparse

    for name, parser in _subparsers():
        shown = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in shown, f"{name} {action.option_strings[0]}"


# errors: one line with the fix, never a traceback -----------------------------------------------------


def test_verify_a_folder_that_does_not_exist(capsys, tmp_path):
    code, out, err = run(capsys, "verify", str(tmp_path / "nope"))
    assert code == 2 and "CORRUPT" not in out + err
    assert (
        err == f"error: {tmp_path / 'nope'} does not exist. Give an activation cache folder "
        "(cache-activations --output DIR).\n"
    )
    code, out, err = run(capsys, "--cache-dir", str(tmp_path / "nothing"), "verify")
    assert code == 2 and "does not exist" in err and "CORRUPT" not in out


def test_a_missing_extra_names_the_pip_command(capsys, monkeypatch, root):
    from hf_cachehooks import cli

    def needs_pyarrow(args):
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")

    monkeypatch.setattr(cli, "cmd_du", needs_pyarrow)
    code, _, err = run(capsys, "du")
    assert code == 2 and err == "error: hf-cachehooks du needs pyarrow: pip install 'hf_cachehooks[activations]'\n"

    def our_bug(args):
        raise ModuleNotFoundError("No module named 'hf_cachehooks.nothing'", name="hf_cachehooks.nothing")

    monkeypatch.setattr(cli, "cmd_du", our_bug)
    with pytest.raises(ModuleNotFoundError):  # not an extra: a bug keeps its traceback
        main(["du"])


def test_a_missing_user_file_is_one_line(capsys, monkeypatch, root, tmp_path):
    from hf_cachehooks import cli

    def reads(args):
        (tmp_path / "gone.json").read_text()

    monkeypatch.setattr(cli, "cmd_du", reads)
    code, _, err = run(capsys, "du")
    assert code == 2 and err == f"error: {tmp_path / 'gone.json'}: No such file or directory. Check the path.\n"


# cache-activations and friends check their inputs before any model loads -------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test; the model folder has a config (3 blocks) but no weights at all."""
    from hf_cachehooks._models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_weights", refuse)


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 64,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            }
        )
    )
    return str(folder)


def _data(tmp_path, rows=None, text=None) -> str:
    path = tmp_path / "data.json"
    path.write_text(text if text is not None else json.dumps(rows))
    return str(path)


GOOD = [{"text": "a b", "type": "testing"}, {"text": "c d", "type": "deployment"}]


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing file", None, "no such file"),
        ("bad json", "[{not json", "is not valid JSON/JSONL"),
        ("no records", "[]", "holds no records"),
        ("text field", [{"text": "a"}, {"body": "b"}], "record 1 (and 0 more) has no 'text' field"),
        ("layers not integers", GOOD, "--layers '1,x' must be comma-separated integers"),
        ("negative layer", GOOD, "layers count from 0"),
        ("layer past the model", GOOD, "--layers 9 not in 0..3"),
        ("label field", GOOD, "not every record has a 'label' field"),
    ],
)
def test_cache_activations_checks_inputs_before_loading(capsys, tmp_path, no_weights, model_dir, case, extra, message):
    data = (
        str(tmp_path / "absent.json")
        if case == "missing file"
        else _data(tmp_path, text=extra)
        if isinstance(extra, str)
        else _data(tmp_path, rows=extra)
    )
    layers = {"layers not integers": "1,x", "negative layer": "-1,2", "layer past the model": "1,9"}.get(case, "1,2")
    argv = ["cache-activations", "--model", model_dir, "--data", data, f"--layers={layers}", "--output", "out"]
    if case == "label field":
        argv += ["--label-field", "label"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_model_path_that_is_not_a_folder_is_named(capsys, tmp_path, no_weights):
    data = _data(tmp_path, GOOD)
    for command in (["serve"], ["cache-activations", "--data", data, "--layers", "1", "--output", "o"]):
        code, _, err = run(capsys, *command, "--model", str(tmp_path / "nope"))
        assert (
            code == 2
            and err
            == f"error: --model {tmp_path / 'nope'}: no such folder. Give a model folder "
            "(with --gguf-file FILE for a GGUF model) or a Hub name such as HuggingFaceTB/SmolLM2-135M-Instruct.\n"
        )


def test_sizes_must_be_positive(capsys, model_dir, tmp_path, no_weights):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "cache-activations",
                "--model",
                model_dir,
                "--data",
                _data(tmp_path, GOOD),
                "--layers",
                "1",
                "--output",
                "o",
                "--batch-size",
                "0",
            ]
        )
    assert info.value.code == 2 and "'0' is not a positive integer" in capsys.readouterr().err


def test_generate_vectors_from_a_model_checks_labels_before_loading(capsys, tmp_path, model_dir, no_weights):
    data = _data(tmp_path, rows=[{"text": "a"}, {"text": "b"}])
    code, _, err = run(
        capsys, "generate-vectors", "--model", model_dir, "--data", data, "--layers", "1", "--output", "run"
    )
    assert code == 2 and "not every record has a 'type' or 'label' field" in err


# examples/main.py ----------------------------------------------------------------------------------------


def test_main_example_clear_cache_help_says_it_clears_every_entry():
    from pathlib import Path

    main_py = Path(__file__).parents[1] / "examples" / "main.py"
    result = subprocess.run([sys.executable, str(main_py), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "delete every cache entry under the cache root" in " ".join(result.stdout.split())
