"""The seed's three scripts as commands: cache-activations, generate-vectors, analyze-probe (+ info, verify)."""

import json
import subprocess
import sys

import pytest

from hf_cachehooks import cli
from tests.conftest import make_llama, make_tokenizer

TESTING = ["q what is two plus four ?", "q what is the capital of france ?", "q is the sky blue ?", "q two plus two ?"]
DEPLOY = ["yes paris no", "blue sky red green", "no no yes", "paris red sky"]

SEED_SNIPPET = """
import pandas as pd
from sklearn.metrics import roc_auc_score
import glob

for f in sorted(glob.glob('validation_exp1/probe_stats_layer*.csv')):
    df = pd.read_csv(f)
    if len(df[df['type']=='testing']) > 0 and len(df[df['type']=='deployment']) > 0:
        auroc = roc_auc_score((df['type']=='deployment').astype(int), df['mean_score'])
        layer = f.split('layer')[1].split('.')[0]
        print(f'Layer {layer}: AUROC = {auroc:.4f}')
"""


def _model_dir(path, seed=0):
    make_llama(seed=seed, layers=3).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def _data(path, n=12):
    rows = [
        {
            "text": (TESTING if i % 2 == 0 else DEPLOY)[(i // 2) % 4] + (" yes" * (i // 8)),
            "type": "testing" if i % 2 == 0 else "deployment",
            "id": i,
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture
def workflow(tmp_path, capsys):
    model = _model_dir(tmp_path / "model")
    data = _data(tmp_path / "train.json")
    assert (
        cli.main(
            [
                "cache-activations",
                "--model",
                model,
                "--data",
                data,
                "--layers",
                "1,2,3",
                "--output",
                "cache_train",
                "--dtype",
                "bfloat16",
                "--positions",
                "mean",
            ]
        )
        == 0
    )
    assert "Cached layers [1, 2, 3] for 12 examples (bfloat16" in capsys.readouterr().out
    return model, data


@pytest.mark.slow
def test_three_commands_and_the_seeds_auroc_snippet(workflow, tmp_path, capsys):
    model, data = workflow
    assert cli.main(["generate-vectors", "--cache", "cache_train", "--output", "run_exp1", "--layers", "1,3"]) == 0
    run = tmp_path / "run_exp1"
    assert sorted(p.name for p in (run / "normalized_vectors").iterdir()) == [
        "layer_1.safetensors",
        "layer_3.safetensors",
    ]
    assert (
        cli.main(
            [
                "analyze-probe",
                "--cache",
                "cache_train",
                "--vectors",
                str(run / "normalized_vectors"),
                "--data",
                data,
                "--output",
                "validation_exp1",
                "--visualize",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "positive: deployment" in printed
    out = tmp_path / "validation_exp1"
    assert (out / "auroc_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "scores_layer3.png").exists() and (out / "summary.csv").exists()
    header = (out / "probe_stats_layer3.csv").read_text().splitlines()[0]
    assert header == "index,type,mean_score,text"
    seed = subprocess.run(
        [sys.executable, "-c", SEED_SNIPPET], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [line.split(":")[0] for line in seed] == ["Layer 1", "Layer 3"]
    summary = {r["layer"]: r["auroc"] for r in json.loads((out / "summary.json").read_text())}
    for line in seed:  # our summary agrees with sklearn's AUROC on our CSV
        layer, value = int(line.split()[1].rstrip(":")), float(line.split("=")[1])
        assert abs(summary[layer] - value) < 1e-3
    assert summary[3] > 0.8  # the two classes use different words: separable


def test_probe_from_another_model_is_refused(workflow, tmp_path, capsys):
    _, data = workflow
    assert cli.main(["generate-vectors", "--cache", "cache_train", "--output", "run_a"]) == 0
    run = tmp_path / "run_a"
    other = _model_dir(tmp_path / "other", seed=1)
    assert (
        cli.main(
            ["cache-activations", "--model", other, "--data", data, "--layers", "1,2,3", "--output", "cache_other"]
        )
        == 0
    )
    code = cli.main(
        ["analyze-probe", "--cache", "cache_other", "--vectors", str(run / "normalized_vectors"), "--output", "val"]
    )
    assert code == 2 and "cache/probe mismatch" in capsys.readouterr().err


def test_wrong_data_and_missing_layer_are_named(workflow, tmp_path, capsys):
    _, data = workflow
    cli.main(["generate-vectors", "--cache", "cache_train", "--output", "run_b"])
    vectors = str(tmp_path / "run_b" / "normalized_vectors")
    other = _data(tmp_path / "other.json", n=10)
    assert (
        cli.main(["analyze-probe", "--cache", "cache_train", "--vectors", vectors, "--data", other, "--output", "v"])
        == 2
    )
    assert "was not built from" in capsys.readouterr().err
    assert cli.main(["generate-vectors", "--cache", "cache_train", "--output", "r", "--layers", "2,7"]) == 2
    assert "Layer 7 is not in this cache (cached: 1, 2, 3)" in capsys.readouterr().err


def test_traditional_path_fills_the_cache_on_the_way(workflow, tmp_path, caplog):
    model, data = workflow
    assert (
        cli.main(
            [
                "generate-vectors",
                "--model",
                model,
                "--data",
                data,
                "--layers",
                "2",
                "--output",
                "run_t",
                "--positions",
                "mean",
            ]
        )
        == 0
    )
    vectors = str(tmp_path / "run_t" / "normalized_vectors")
    caplog.set_level("INFO", logger="hf_cachehooks")
    assert (
        cli.main(
            [
                "analyze-probe",
                "--model",
                model,
                "--data",
                data,
                "--vectors",
                vectors,
                "--output",
                "val_t",
                "--positions",
                "mean",
            ]
        )
        == 0
    )
    assert "Loaded activations from cache" in caplog.text  # the second command reused the first's cache


def test_info_and_verify(workflow, tmp_path, capsys):
    assert cli.main(["info", "cache_train"]) == 0
    out = capsys.readouterr().out
    assert "layers      1, 2, 3" in out and "bfloat16 × 16" in out and "12 records" in out
    assert cli.main(["verify", "cache_train"]) == 0
    shard = tmp_path / "cache_train" / "data-00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert cli.main(["verify", "cache_train"]) == 1
    assert "data-00000.arrow: content does not match" in capsys.readouterr().out
