"""`--model hf-cachehooks` under torchrun (2 gloo CPU processes): each rank answers its share into one cache,
the results equal a 1-process run of lm-eval's `hf`, and the cache ignores the process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.test_harness import TASKS, _close, _write_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# One rank of `torchrun`: our model through lm-eval's evaluator, writing what it saw to <out>/rank<r>.json.
WORKER = """
import functools, json, os, sys
import torch
from lm_eval.models import huggingface

# lm-eval's `hf` splits requests across ranks (and gathers inside its methods) only under accelerate with 2
# GPUs or more: accelerate on CPU (`accelerate launch --cpu`), and pretend two GPUs, so that the model this rank
# builds takes that data-parallel path.
os.environ["ACCELERATE_USE_CPU"] = "1"
torch.cuda.device_count = lambda: 2
loads = []
real_init = huggingface.HFLM.__init__

@functools.wraps(real_init)  # keeps HFLM's signature, which our model reads for its key
def counted_init(self, *args, **kwargs):
    loads.append(1)
    real_init(self, *args, **kwargs)

huggingface.HFLM.__init__ = counted_init
from tests.test_harness_distributed import evaluate

model_path, tasks, out = sys.argv[1:4]
lm, results = evaluate("hf-cachehooks", model_path, tasks)
rank = int(os.environ["RANK"])
report = {"rank": lm.rank, "world_size": lm.world_size, "loads": len(loads), "results": results}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
"""


def evaluate(model: str, model_path, task_folder, samples=None) -> tuple:
    """Run lm-eval on the three local tasks; (the model object, {"answers", "metrics"} or None off rank 0)."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import hf_cachehooks.harness.model  # noqa: F401  registers hf-cachehooks

    lm = get_model(model).create_from_arg_string(f"pretrained={model_path},device=cpu,dtype=float32")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=20,
        samples=samples,
    )
    return lm, None if out is None else json.loads(json.dumps(_summary(out)))


def _summary(out) -> dict:
    """Each document's raw answers by task and doc id (ranks gather in their own order), and every metric.

    A rank with fewer documents than another repeats its last request (lm-eval's padding), whose answer is
    appended to that request's answers: the first answer of each request is its own (these tasks repeat none).
    """
    answers = {
        task: {s["doc_id"]: [resps[:1] for resps in s["resps"]] for s in rows} for task, rows in out["samples"].items()
    }
    metrics = {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()}
    return {"answers": answers, "metrics": metrics}


def _same_metrics(ours: dict, theirs: dict) -> bool:
    """Every metric and closed-form stderr within 1e-5. A bootstrapped stderr (perplexities) resamples the
    documents in the order the ranks gathered them, as with lm-eval's `hf` on several processes: only compared
    as present."""
    for task, values in theirs.items():
        bootstrapped = {k for k in values if task == "hch_ppl" and "_stderr" in k}
        if ours[task].keys() != values.keys():
            return False
        if not _close(
            {k: ours[task][k] for k in values if k not in bootstrapped},
            {k: v for k, v in values.items() if k not in bootstrapped},
        ):
            return False
    return True


def _launch(model_path, tasks, out: Path) -> list[dict]:
    out.mkdir()
    worker = out / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    done = subprocess.run(
        [*command, str(model_path), str(tasks), str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (out / "stderr.txt").write_text(done.stderr)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_processes_share_the_work_and_the_cache_ignores_the_process_count(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = _write_tasks(tmp_path / "tasks")
    _, theirs = evaluate("hf", model_path, tasks)  # lm-eval's own model, one process: the reference

    # One process answers the even documents: on two, rank 0's share (docs 0, 2) all hits, rank 1's all misses.
    evaluate("hf-cachehooks", model_path, tasks, samples={task: [0, 2] for task in TASKS})
    ranks = _launch(model_path, tasks, tmp_path / "mixed")
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [r["loads"] for r in ranks] == [0, 1]  # only the rank with misses built the model, and nothing hung
    ours = ranks[0]["results"]
    assert ranks[1]["results"] is None  # lm-eval gathers the results on rank 0
    assert _close(ours["answers"], theirs["answers"])  # every document, loglikelihoods within 1e-5
    assert ours["answers"]["hch_gen"] == theirs["answers"]["hch_gen"]  # greedy generations identical
    assert _same_metrics(ours["metrics"], theirs["metrics"])
    assert ours["metrics"]["hch_mc"] == theirs["metrics"]["hch_mc"]

    again = _launch(model_path, tasks, tmp_path / "again")  # everything cached: no rank loads the model
    assert [r["loads"] for r in again] == [0, 0] and again[0]["results"] == ours

    from lm_eval.models import huggingface

    def no_load(*args, **kwargs):
        raise AssertionError("a run made on 2 processes must be a full hit on 1")

    monkeypatch.setattr(huggingface.HFLM, "__init__", no_load)
    lm, one = evaluate("hf-cachehooks", model_path, tasks)
    assert lm.world_size == 1 and _close(one["answers"], ours["answers"])
    assert one["answers"]["hch_gen"] == ours["answers"]["hch_gen"]


def test_tensor_parallelism_under_a_launcher_is_refused_before_anything_starts(monkeypatch):
    import torch.distributed as dist

    from hf_cachehooks.errors import ConfigError
    from hf_cachehooks.harness.model import CachedHFLM

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="tp_plan='auto'"):
        CachedHFLM("path/to/model", tp_plan="auto")
    assert not dist.is_initialized()  # no process group waits for a rank that will never come
