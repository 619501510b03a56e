"""GenerationCache: the seed's high-level keying, banners, partial reuse, samples, failures, crashes."""

import logging
import pickle
import time
from pathlib import Path

import pytest

import hf_cachehooks.generation as generation
from hf_cachehooks import cli, management
from hf_cachehooks.backends import TransformersBackend
from hf_cachehooks.generation import GenerationCache
from hf_cachehooks.store import cache_root
from tests.conftest import make_llama, make_tokenizer

QUESTIONS = [f"what is {a} plus {b} ?" for a in ("two", "four") for b in ("two", "four", "q", "a")]
SETTINGS = {"prompt_name": "50-50", "subject_type": "all", "temperature": 0.0, "max_tokens": 3}


class Counting(TransformersBackend):
    """The real local backend, counting the prompts it is asked to complete."""

    asked = 0

    def complete(self, prompts, sampling):
        self.asked += len(prompts)
        return super().complete(prompts, sampling)


@pytest.fixture(scope="module")
def model_and_tok():
    return make_llama(), make_tokenizer()


@pytest.fixture
def backend(model_and_tok):
    model, tok = model_and_tok
    return Counting(model, tok, batch_size=4)


@pytest.fixture
def cache():
    return GenerationCache("org/Tiny-Chat", chunk_size=3)


def test_seed_layout_and_banners(cache, backend, caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    first = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    folder = cache_root() / "experiments" / "Tiny-Chat" / "generations" / "50-50" / "all"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["n4_t0.0_maxtok3_completions.jsonl", "n4_t0.0_maxtok3_full_texts.jsonl",
                     "n4_t0.0_maxtok3_metadata.json"]
    assert first.status == "miss" and backend.asked == 4
    assert "Checking for cached generations..." in caplog.text
    assert "No cache found - will generate and save" in caplog.text
    assert "Cache path:" in caplog.text and "✓ Cached 4 generations" in caplog.text
    second = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert second.status == "hit" and backend.asked == 4 and second.completions == first.completions
    assert "✓ Found cached generations!" in caplog.text and "Loaded 4 cached generations" in caplog.text
    assert "Cached on:" in caplog.text and "Model: org/Tiny-Chat" in caplog.text
    assert all(ft[0].startswith(q) for ft, q in zip(second.full_texts, QUESTIONS))
    meta = management._peek(folder / "n4_t0.0_maxtok3_metadata.json")
    assert {meta[k] for k in ("model", "subject_type", "prompt_name")} == {"org/Tiny-Chat", "all", "50-50"}
    assert meta["temperature"] == 0 and "timestamp" in meta


@pytest.mark.parametrize("change", [
    {"prompt_name": "benign"}, {"subject_type": "math"}, {"temperature": 0.7}, {"max_tokens": 4},
    {"top_p": 0.9}, {"seed": 3}, {"samples_per_prompt": 2},
])
def test_each_key_field_misses(cache, backend, change):
    cache.generate(QUESTIONS, backend, num_samples=3, **SETTINGS)
    again = cache.generate(QUESTIONS, backend, num_samples=3, **{**SETTINGS, **change})
    assert again.status == "miss" and again.reused == 0


def test_other_model_misses(cache, backend):
    cache.generate(QUESTIONS, backend, num_samples=3, **SETTINGS)
    other = GenerationCache("org/Other-Model").generate(QUESTIONS, backend, num_samples=3, **SETTINGS)
    assert other.status == "miss"


def test_different_questions_hit_and_warn_strict_regenerates(cache, backend, caplog):
    cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    others = list(reversed(QUESTIONS))
    hit = cache.generate(others, backend, num_samples=4, **SETTINGS)
    assert hit.status == "hit" and hit.prompts_differ == 4 and backend.asked == 4
    assert hit.prompts == QUESTIONS[:4]  # the prompts the served completions came from
    assert "made from different prompts" in caplog.text
    strict = cache.generate(others, backend, num_samples=4, strict=True, **SETTINGS)
    assert strict.status == "miss" and strict.prompts == others[:4] and backend.asked == 8


def test_partial_reuse_both_ways(cache, backend):
    cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    fewer = cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS)
    assert fewer.status == "hit" and len(fewer.completions) == 2 and backend.asked == 4
    more = cache.generate(QUESTIONS, backend, num_samples=8, **SETTINGS)
    assert more.status == "partial" and more.reused == 4 and backend.asked == 8
    folder = Path(more.path).parent
    assert sorted(p.name.split("_")[0] for p in folder.iterdir()) == ["n8"] * 3  # the entry grew, n4 is gone
    assert cache.generate(QUESTIONS, backend, num_samples=8, **SETTINGS).status == "hit"


def test_samples_are_indexed_not_collapsed(cache, backend):
    gens = cache.generate(QUESTIONS, backend, num_samples=2, samples_per_prompt=3, seed=0,
                          **{**SETTINGS, "temperature": 1.5, "max_tokens": 6})
    assert [len(row) for row in gens.completions] == [3, 3] and backend.asked == 6
    rows = (Path(gens.path).parent / Path(gens.path).name.replace("metadata.json", "completions.jsonl")).read_text()
    assert rows.count('"s":2') == 2 and rows.count('"s":0') == 2
    assert len({c for row in gens.completions for c in row if c}) > 2  # distinct samples
    empty = sum(c is None for row in gens.completions for c in row)  # a random model may emit only specials
    more = cache.generate(QUESTIONS, backend, num_samples=2, samples_per_prompt=3, seed=0,
                          **{**SETTINGS, "temperature": 1.5, "max_tokens": 6})
    assert more.generated == empty and more.reused == 6 - empty
    assert all(m == g for mrow, grow in zip(more.completions, gens.completions) for m, g in zip(mrow, grow) if g)


def test_failed_or_empty_generations_are_never_cached(cache, backend, caplog):
    real = Counting.complete

    def flaky(self, prompts, sampling):
        out = real(self, prompts, sampling)
        return [None if p == QUESTIONS[1] else ("" if p == QUESTIONS[2] else o) for p, o in zip(prompts, out)]

    Counting.complete = flaky
    try:
        first = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    finally:
        Counting.complete = real
    assert first.first_samples[1] is None and first.first_samples[2] is None
    assert "not cached" in caplog.text
    retry = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert retry.status == "partial" and retry.generated == 2 and None not in retry.first_samples


def test_interrupted_generation_keeps_finished_chunks_and_no_partial_entry(cache, backend):
    calls = []
    real = Counting.complete

    def dying(self, prompts, sampling):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, prompts, sampling)

    Counting.complete = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.generate(QUESTIONS, backend, num_samples=6, **SETTINGS)
    finally:
        Counting.complete = real
    assert management.verify(cache_root())[1] == []  # every visible entry is whole
    resumed = cache.generate(QUESTIONS, backend, num_samples=6, **SETTINGS)
    assert resumed.status == "partial" and resumed.reused == 3  # the first chunk (chunk_size=3) survived


def test_crash_between_data_and_metadata_is_not_a_hit(cache, backend, monkeypatch):
    first = cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS)

    def crash(path, doc):
        raise SystemExit("killed before the metadata was written")

    monkeypatch.setattr(generation, "write_entry", crash)
    with pytest.raises(SystemExit):
        cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    monkeypatch.undo()
    after = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert after.reused == 2 and after.first_samples[:2] == first.first_samples  # the old entry still served


def test_corrupt_jsonl_is_ignored_with_a_warning(cache, backend, caplog):
    first = cache.generate(QUESTIONS, backend, num_samples=3, **SETTINGS)
    data = Path(first.path.replace("metadata.json", "completions.jsonl"))
    data.write_text(data.read_text().replace("what", "WHAT"))
    again = cache.generate(QUESTIONS, backend, num_samples=3, **SETTINGS)
    assert again.status == "miss" and "corrupt" in caplog.text


def test_expiry_and_force(backend):
    now = [1_000_000.0]
    cache = GenerationCache("org/Tiny-Chat", max_age_days=7, clock=lambda: now[0])
    cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS)
    now[0] += 6 * 86400
    assert cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS).status == "hit"
    now[0] += 2 * 86400
    assert cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS).status == "miss"
    assert cache.generate(QUESTIONS, backend, num_samples=2, force_recompute=True, **SETTINGS).status == "miss"


def test_read_path_never_unpickles(cache, backend, monkeypatch):
    cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle on a read path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    assert cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS).status == "hit"


def test_management_lists_and_prunes_generations(cache, backend, capsys):
    cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS)
    assert cli.main(["ls", "--kind", "generations"]) == 0
    out = capsys.readouterr().out
    assert "generations" in out and "org/Tiny-Chat" in out and "1 entries" in out
    root = cache_root()
    assert management.plan_prune(root, 7 * 86400).paths == []
    plan = management.plan_prune(root, 7 * 86400, now=time.time() + 8 * 86400, kind="generations")
    assert sorted(p.suffix for p in plan.paths) == [".json", ".jsonl", ".jsonl"]  # metadata and its data files
    plan.execute()
    assert cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS).status == "miss"


def test_bad_arguments_name_the_fix(cache, backend):
    from hf_cachehooks.errors import ConfigError

    with pytest.raises(ConfigError, match="only 8 prompts"):
        cache.generate(QUESTIONS, backend, num_samples=9, **SETTINGS)
    with pytest.raises(ConfigError, match="plain folder name"):
        cache.generate(QUESTIONS, backend, num_samples=2, **{**SETTINGS, "prompt_name": "../x"})


def test_chat_template_backend_full_texts_start_with_the_rendered_prompt(model_and_tok):
    model, tok = model_and_tok
    backend = TransformersBackend(model, tok, use_chat_template=True, system_prompt="yes")
    gens = GenerationCache("org/Tiny-Chat").generate(QUESTIONS, backend, num_samples=2, **SETTINGS)
    for question, row in zip(QUESTIONS, gens.full_texts):
        assert row[0].startswith(f"<|system|> yes <|user|> {question} <|assistant|>")
