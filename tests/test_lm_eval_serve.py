"""lm-eval's default `local-completions` configuration (token-id prompts, echo + logprobs) against `hf-cachehooks
serve`: no HTTP 400, and the numbers of lm-eval's own `hf` model on the same weights."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from tests.conftest import make_llama, make_tokenizer  # noqa: E402
from tests.lm_eval_tasks import MULTIPLE_CHOICE, generate_until, write_task  # noqa: E402

MC = [
    {"question": "q : what is the color of the sky ?", "choices": ["blue", "red", "green"], "answer": 0},
    {"question": "q : what is the capital of france ?", "choices": ["paris", "red", "no"], "answer": 0},
    {"question": "q : is the sky green ?", "choices": ["yes", "no"], "answer": 1},
    {"question": "q : two plus two ?", "choices": ["four", "two", "blue"], "answer": 0},
]
GEN = [
    {"question": "q : what is the color of the sky ? a :", "answer": "blue"},
    {"question": "q : two plus two ? a :", "answer": "four"},
    {"question": "q : the capital of france ? a :", "answer": "paris"},
]
TASKS = ["serve_mc", "serve_gen"]


def write_tasks(folder, mc=MC, gen=GEN, max_gen_toks=8):
    """A multiple-choice task and a `generate_until` task with stop strings over local JSONL; returns a
    TaskManager that knows only them."""
    from lm_eval.tasks import TaskManager

    folder.mkdir()
    write_task(folder, "mc", "serve_mc", mc, MULTIPLE_CHOICE)
    write_task(folder, "gen", "serve_gen", gen, generate_until(["?", "sky"], max_gen_toks))
    return TaskManager(include_path=str(folder), include_defaults=False)


def evaluate(model, model_args, task_manager, **kw):
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=20,
        **kw,
    )


def local_completions_args(url, model_name, tokenizer_folder, max_length=None):
    """lm-eval's default `local-completions` setup (token-id prompts) against a server at `url`."""
    args = (
        f"model={model_name},base_url={url}/v1/completions,tokenizer={tokenizer_folder},"
        "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1,timeout=120"
    )
    return args + (f",max_length={max_length}" if max_length else "")


def answers(out):
    """Every request's raw answer per task: (loglikelihood, is_greedy) pairs, generated strings."""
    return {task: [s["resps"] for s in samples] for task, samples in out["samples"].items()}


def metrics(out):
    return {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()}


def close(a, b, tol):
    """`a` and `b` equal, floats within `tol` (nested lists, tuples and dicts)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def test_lm_evals_default_local_completions_gives_the_numbers_of_its_hf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_cachehooks.generation.backends import TransformersBackend
    from hf_cachehooks.generation.server import make_server, serve_in_thread

    model_path = tmp_path / "model"
    make_llama(seed=4, layers=3).save_pretrained(model_path)  # greedy answers in words, one cut by a stop string
    make_tokenizer().save_pretrained(model_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = write_tasks(tmp_path / "tasks")
    backend = TransformersBackend(
        AutoModelForCausalLM.from_pretrained(model_path).eval(), AutoTokenizer.from_pretrained(model_path)
    )
    server = make_server(backend, "tiny")
    serve_in_thread(server)
    try:
        served = evaluate("local-completions", local_completions_args(server.url, "tiny", model_path, 64), tasks)
    finally:
        server.shutdown()
        server.server_close()
    hf = evaluate("hf", f"pretrained={model_path},device=cpu,dtype=float32", tasks)
    ours, theirs = answers(served), answers(hf)
    assert close(ours["serve_mc"], theirs["serve_mc"], 1e-4), (ours["serve_mc"], theirs["serve_mc"])
    assert ours["serve_gen"] == theirs["serve_gen"] and sum(bool(g[0][0]) for g in ours["serve_gen"]) >= 2
    assert close(metrics(served), metrics(hf), 1e-6)
