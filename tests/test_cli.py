"""The `hf-cachehooks` command line (hf_cachehooks/cli.py): exit codes and what it prints."""

from __future__ import annotations

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
    return {"model": {"name": model, "params": "abc123"}, "tokenizer": {"vocab": "v1"},
            "generation": {"max_new_tokens": max_new_tokens, "do_sample": False},
            "prompt": {"template": "Q: {question}"}, "data": {"fingerprint": "f" * 16, "n": 3}}


def _save(cache: PredictionCache, *, model="org/tiny-a", max_new_tokens=32, n=3, age_days=0.0):
    key = make_key("predictions", _inputs(model, max_new_tokens))
    doc = {"metadata": {"model_name": model, "dataset_size": n, "created_at": time.time() - age_days * DAY},
           "predictions": ["p"] * n, "references": ["r"] * n,
           "metrics": {"exact_match": 1.0}, "metric_versions": {"exact_match": "1"}}
    path = cache.save_run(key, model, doc)
    assert path is not None
    return key, path


@pytest.fixture
def populated(root, cache):
    old_key, old = _save(cache, model="org/old-model", n=5, age_days=10)
    new_key, new = _save(cache, model="org/new-model", n=7)
    tag_folder(root / "identity")
    assert commit(root / "identity" / "memo.json", "identity", {"kind": "identity", "digest": "memo", "inputs": {}},
                  fields={"identity": {"model": {"name": "org/new-model"}}})
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
    assert header == ["KIND", "MODEL", "EXAMPLES", "SIZE", "AGE", "KEY"]
    old = _row(out, "org/old-model")
    assert old[0] == "predictions"
    assert old[2] == "5"
    assert " ".join(old[3:5]) == _human(populated["old"].stat().st_size)
    assert old[5] == "10d"
    assert old[6] == populated["old_key"].short
    new = _row(out, "org/new-model")
    assert new[2] == "7"
    assert new[5].endswith("s")  # seconds old
    assert new[6] == populated["new_key"].short
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
    predictions = sum(p.stat().st_size for p in (root / "predictions").rglob("*")
                      if p.is_file() and p.name != "CACHEDIR.TAG")
    assert " ".join(lines[1].split()[:2]) == _human(predictions)


def test_du_empty_cache(capsys, root):
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


def test_explain_last_miss(capsys, cache):
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
    result = subprocess.run([sys.executable, "-m", "hf_cachehooks", "du"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "HF_CACHEHOOKS_HOME": str(root)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "predictions" in result.stdout
    assert f"total ({root})" in result.stdout
