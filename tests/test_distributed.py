"""`evaluate_model` under a launcher: sharding, and runs on 2 and 3 gloo CPU processes that share one cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_cachehooks._core.launch import World, world_from_env
from hf_cachehooks.evaluation.distributed import shard
from tests.conftest import make_llama, make_tokenizer
from tests.distributed_worker import CONFIG

WORKER = Path(__file__).with_name("distributed_worker.py")
QUESTIONS = [
    "what is the capital of france ?",
    "what is two plus two ?",
    "what color is the sky ?",
    "is the sky green ?",
    "is paris the capital of france ?",
    "two plus four ?",
    "red or blue ?",
    "what is the answer ?",
    "is the sky blue or green or red ?",
    "yes or no ?",
    "paris ?",
    "what is the color of the sky of paris ?",
]


def test_shard_balances_lengths_and_covers_everything():
    lengths = [len(q) for q in QUESTIONS]
    for size in (1, 2, 3, 5):
        parts = shard(lengths, size)
        assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in part) for part in parts]
        assert max(loads) - min(loads) <= max(lengths)  # greedy longest-first bound
        assert all([lengths[i] for i in part] == sorted((lengths[i] for i in part), reverse=True) for part in parts)
    assert shard(lengths, 3) == shard(list(lengths), 3)  # every rank computes the same split
    assert shard([], 2) == [[], []]


def test_world_from_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == World(0, 1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert world_from_env() == World(2, 3) and not world_from_env().is_main
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert world_from_env() == World(0, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, a data file, and the single-process predictions (no cache) to compare with."""
    from hf_cachehooks import evaluate_model

    base = tmp_path_factory.mktemp("dist")
    model = base / "tiny"
    make_llama(seed=3).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = base / "qa.json"
    data.write_text(json.dumps([{"question": q, "answer": "paris"} for q in QUESTIONS]))
    reference = evaluate_model(str(model), str(data), CONFIG.with_(use_prediction_cache=False))
    return model, data, reference.predictions


def launch(n: int, setup, root: Path, out: Path, *extra: str) -> tuple[int, list[dict]]:
    model, data, _ = setup
    env = {
        **os.environ,
        "HF_CACHEHOOKS_HOME": str(root),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            str(WORKER),
            str(model),
            str(data),
            str(out),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))] if out.is_dir() else []
    return done.returncode, ranks


def in_process(setup, root: Path, monkeypatch):
    from hf_cachehooks import evaluate_model

    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(root))
    model, data, _ = setup
    return evaluate_model(str(model), str(data), CONFIG)


@pytest.mark.slow
def test_two_processes_equal_one_and_the_cache_ignores_the_process_count(setup, tmp_path, monkeypatch):
    reference = setup[2]
    rc, ranks = launch(2, setup, tmp_path / "made_by_2", tmp_path / "out2")
    assert rc == 0 and len(ranks) == 2
    assert all(r["predictions"] == reference for r in ranks)  # greedy: exactly the single-process answers
    assert all(r == ranks[0] for r in ranks[1:])  # every rank returns the same result
    assert ranks[0]["status"] == "miss" and ranks[0]["metadata"]["processes"]["count"] == 2
    assert 0 < ranks[0]["generated"] < len(QUESTIONS) and sum(r["generated"] for r in ranks) == len(QUESTIONS)

    one = in_process(setup, tmp_path / "made_by_2", monkeypatch)  # made on 2: a full hit on 1
    assert one.cache_status == "hit" and one.predictions == reference and one.key == ranks[0]["key"]

    made_by_1 = in_process(setup, tmp_path / "made_by_1", monkeypatch)
    assert made_by_1.cache_status == "miss"
    rc, ranks = launch(3, setup, tmp_path / "made_by_1", tmp_path / "out3")  # made on 1: a full hit on 3
    assert rc == 0 and [r["status"] for r in ranks] == ["hit"] * 3
    assert all(r["generated"] == 0 and r["predictions"] == reference for r in ranks)


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_three(setup, tmp_path):
    reference = setup[2]
    rc, ranks = launch(2, setup, tmp_path / "cache", tmp_path / "killed", "--die-after", "1")
    assert rc != 0 and ranks == []
    rc, ranks = launch(3, setup, tmp_path / "cache", tmp_path / "resumed")
    assert rc == 0 and len(ranks) == 3
    reused = ranks[0]["reused"]
    assert reused >= CONFIG.batch_size  # at least the batch rank 1 saved before it died
    assert sum(r["generated"] for r in ranks) == len(QUESTIONS) - reused  # only what was missing
    assert all(r["predictions"] == reference and r["status"] == "partial" for r in ranks)


def test_distributed_false_evaluates_alone_under_a_launcher(tiny, qa_rows, monkeypatch):
    """A script that calls evaluate_model on rank 0 only must not wait for ranks that never come."""
    from hf_cachehooks import EvalConfig, evaluate_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    model, tokenizer = tiny
    result = evaluate_model(model, qa_rows, EvalConfig(max_new_tokens=2, distributed=False), tokenizer=tokenizer)
    assert result.cache_status == "miss" and len(result.predictions) == len(qa_rows)
    assert "processes" not in result.metadata


@pytest.mark.slow
def test_a_group_the_library_started_is_destroyed_at_exit():
    """Left to the interpreter's teardown, a gloo group can abort the process ("terminate called without an
    active exception"); the group `Collective` starts is destroyed by an exit handler, and only that one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import atexit, torch.distributed as dist\n"
        "from hf_cachehooks._core.launch import World\n"
        "from hf_cachehooks.evaluation.distributed import Collective\n"
        "Collective(World(0, 1))\n"
        "assert dist.is_initialized()\n"
        "atexit._run_exitfuncs()\n"
        "print('initialized after exit handlers:', dist.is_initialized())\n"
    )
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "1",
        "RANK": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "initialized after exit handlers: False" in run.stdout
