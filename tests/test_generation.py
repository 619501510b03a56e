"""GenerationCache: the seed's high-level keying, banners, partial reuse, samples, failures, crashes."""

import logging
import pickle
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

import hf_cachehooks.generation.cache as generation
from hf_cachehooks import CacheConfig, cli, management
from hf_cachehooks._core.keys import hash_bytes
from hf_cachehooks._core.store import cache_root, seal, unseal
from hf_cachehooks.generation.backends import TransformersBackend
from hf_cachehooks.generation.cache import GenerationCache
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
    assert names == [
        "n4_t0.0_maxtok3_completions.jsonl",
        "n4_t0.0_maxtok3_full_texts.jsonl",
        "n4_t0.0_maxtok3_metadata.json",
    ]
    assert first.status == "miss" and backend.asked == 4
    assert "Checking for cached generations..." in caplog.text
    assert "No cache found - will generate and save" in caplog.text
    assert "Cache path:" in caplog.text and "✓ Cached 4 generations" in caplog.text
    second = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert second.status == "hit" and backend.asked == 4 and second.completions == first.completions
    assert "✓ Found cached generations!" in caplog.text and "Loaded 4 cached generations" in caplog.text
    assert "Cached on:" in caplog.text and "Model: org/Tiny-Chat" in caplog.text
    assert all(ft[0].startswith(q) for ft, q in zip(second.full_texts, QUESTIONS))
    meta = unseal((folder / "n4_t0.0_maxtok3_metadata.json").read_bytes())
    assert {meta[k] for k in ("model", "subject_type", "prompt_name")} == {"org/Tiny-Chat", "all", "50-50"}
    assert meta["temperature"] == 0 and "timestamp" in meta and meta["num_samples"] == 4
    assert meta["kind"] == "generations" and sorted(meta["files"]) == names[:2]  # the contract's manifest


@pytest.mark.parametrize(
    "change",
    [
        {"prompt_name": "benign"},
        {"subject_type": "math"},
        {"temperature": 0.7},
        {"max_tokens": 4},
        {"top_p": 0.9},
        {"seed": 3},
        {"stop": ["four"]},
    ],
)
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
    created = unseal(Path(cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS).path).read_bytes())
    fewer = cache.generate(QUESTIONS, backend, num_samples=2, **SETTINGS)
    assert fewer.status == "hit" and len(fewer.completions) == 2 and backend.asked == 4
    more = cache.generate(QUESTIONS, backend, num_samples=8, **SETTINGS)
    assert more.status == "partial" and more.reused == 4 and backend.asked == 8
    folder = Path(more.path).parent
    assert sorted(p.name.split("_")[0] for p in folder.iterdir()) == ["n8"] * 3  # the entry grew, n4 is gone
    grown = unseal(Path(more.path).read_bytes())
    assert grown["created_at"] == created["created_at"] and grown["updated_at"] >= created["updated_at"]
    assert cache.generate(QUESTIONS, backend, num_samples=8, **SETTINGS).status == "hit"


def test_samples_are_indexed_not_collapsed(cache, backend):
    gens = cache.generate(
        QUESTIONS,
        backend,
        num_samples=2,
        samples_per_prompt=3,
        seed=0,
        **{**SETTINGS, "temperature": 1.5, "max_tokens": 6},
    )
    assert [len(row) for row in gens.completions] == [3, 3] and backend.asked == 6
    rows = (Path(gens.path).parent / Path(gens.path).name.replace("metadata.json", "completions.jsonl")).read_text()
    assert rows.count('"s":2') == 2 and rows.count('"s":0') == 2
    assert len({c for row in gens.completions for c in row if c}) > 2  # distinct samples
    empty = sum(c is None for row in gens.completions for c in row)  # a random model may emit only specials
    more = cache.generate(
        QUESTIONS,
        backend,
        num_samples=2,
        samples_per_prompt=3,
        seed=0,
        **{**SETTINGS, "temperature": 1.5, "max_tokens": 6},
    )
    assert more.generated == empty and more.reused == 6 - empty
    assert all(m == g for mrow, grow in zip(more.completions, gens.completions) for m, g in zip(mrow, grow) if g)


def test_more_samples_per_prompt_generate_only_the_new_ones(cache, backend):
    """samples_per_prompt is not in the key: sample s keeps its seed, so a set of 2 grows to 4 and shrinks to 1."""
    settings = {**SETTINGS, "temperature": 1.5, "max_tokens": 6, "seed": 0}
    two = cache.generate(QUESTIONS, backend, num_samples=3, samples_per_prompt=2, **settings)
    empty = sum(c is None for row in two.completions for c in row)  # a random model may emit only specials
    four = cache.generate(QUESTIONS, backend, num_samples=3, samples_per_prompt=4, **settings)
    assert four.status == "partial" and four.reused == 6 - empty and backend.asked == 6 + 6 + empty
    assert all(f == t for frow, trow in zip(four.completions, two.completions) for f, t in zip(frow, trow) if t)
    names = [p.name for p in Path(four.path).parent.iterdir()]
    assert len(names) == 3 and all("_t1.5_maxtok6_seed0_" in name and "_k" not in name for name in names)
    assert unseal(Path(four.path).read_bytes())["samples_per_prompt"] == 4
    one = cache.generate(QUESTIONS, backend, num_samples=3, samples_per_prompt=1, **settings)
    assert one.status == "hit" or one.generated == sum(c is None for c in four.first_samples)
    fresh = GenerationCache("org/Tiny-Chat", chunk_size=3, cache=CacheConfig(folder=cache.base.parent / "other"))
    direct = fresh.generate(QUESTIONS, backend, num_samples=3, samples_per_prompt=4, **settings)
    # same seeds: generated at once or grown from 2, sample s of a prompt is the same text
    assert [row[2:] for row in direct.completions] == [row[2:] for row in four.completions]
    assert all(d == t for drow, trow in zip(direct.completions, two.completions) for d, t in zip(drow, trow) if t)


def test_failed_generations_are_never_cached_and_empty_ones_are(cache, backend, caplog):
    real = Counting.complete

    def flaky(self, prompts, sampling):
        out = real(self, prompts, sampling)
        return [None if p == QUESTIONS[1] else ("" if p == QUESTIONS[2] else o) for p, o in zip(prompts, out)]

    Counting.complete = flaky
    try:
        first = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    finally:
        Counting.complete = real
    assert first.first_samples[1] is None and first.first_samples[2] == ""  # an empty completion is an answer
    assert "1 generations failed" in caplog.text
    retry = cache.generate(QUESTIONS, backend, num_samples=4, **SETTINGS)
    assert retry.status == "partial" and retry.generated == 1 and None not in retry.first_samples
    assert retry.first_samples[2] == ""  # served from the cache, not asked for again


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

    def crash(*args, **kwargs):
        raise SystemExit("killed before the metadata was written")

    monkeypatch.setattr(generation.entry, "commit", crash)
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
    cache = GenerationCache("org/Tiny-Chat", cache=CacheConfig(max_age=timedelta(days=7), clock=lambda: now[0]))
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
    assert [p.name for p in plan.entries] == ["n2_t0.0_maxtok3_metadata.json"]  # one entry, one row
    folder = plan.entries[0].parent
    assert plan.size == sum(p.stat().st_size for p in folder.iterdir())  # its true size: metadata + both JSONL
    plan.execute()
    assert not folder.exists()  # deleted whole
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


# The entry contract: nothing altered, swapped, malformed or outside the folder is ever served ----------


class Slow:
    """A fake backend that counts (thread-safely) and takes its time, so two callers overlap."""

    name = "fake"

    def __init__(self, delay=0.0):
        self.delay, self.asked, self.lock = delay, 0, threading.Lock()

    def render(self, prompts):
        return [f"<{p}>" for p in prompts]

    def complete(self, prompts, sampling):
        time.sleep(self.delay)
        with self.lock:
            self.asked += len(prompts)
        return [f"answer to {p}" for p in prompts]


def _paths(gens):
    meta = Path(gens.path)
    return (
        meta,
        meta.with_name(meta.name.replace("metadata.json", "completions.jsonl")),
        meta.with_name(meta.name.replace("metadata.json", "full_texts.jsonl")),
    )


def _reseal(meta, change):
    """Edit the metadata and seal it again (the seal is an unkeyed hash: anyone can)."""
    doc = unseal(meta.read_bytes())
    change(doc)
    meta.write_bytes(seal(doc))


def _record(path):
    raw = path.read_bytes()
    return {"bytes": len(raw), "xxh3": hash_bytes(raw)}


def test_a_traversal_name_is_refused_and_the_file_outside_is_untouched(cache, caplog):
    fake = Slow()
    first = cache.generate(QUESTIONS, fake, num_samples=2, **SETTINGS)
    meta, _, _ = _paths(first)
    victim = cache_root().parent / "victim.txt"
    victim.write_text("precious")
    name = "../" * (len(meta.parent.relative_to(cache_root().parent).parts)) + "victim.txt"
    assert (meta.parent / name).resolve() == victim.resolve()
    _reseal(meta, lambda doc: doc["files"].update({name: _record(victim)}))
    again = cache.generate(QUESTIONS, fake, num_samples=2, **SETTINGS)
    assert again.status == "miss" and fake.asked == 4 and "corrupt" in caplog.text.lower()
    grown = cache.generate(QUESTIONS, fake, num_samples=3, **SETTINGS)  # the grown entry replaces n2
    assert grown.status == "partial" and victim.read_text() == "precious"
    assert sorted(p.name.split("_")[0] for p in meta.parent.iterdir()) == ["n3"] * 3


@pytest.mark.parametrize("which", [1, 2])
def test_a_flipped_byte_in_a_jsonl_is_regenerated(cache, which, caplog):
    fake = Slow()
    first = cache.generate(QUESTIONS, fake, num_samples=3, **SETTINGS)
    data = _paths(first)[which]
    raw = bytearray(data.read_bytes())
    raw[raw.index(b"answer") + 1] ^= 0x20  # "answer" -> "aNswer", same size
    data.write_bytes(bytes(raw))
    again = cache.generate(QUESTIONS, fake, num_samples=3, **SETTINGS)
    assert again.status == "miss" and fake.asked == 6 and "corrupt" in caplog.text.lower()
    assert again.completions == first.completions and again.full_texts == first.full_texts


@pytest.mark.parametrize("resealed", [False, True])
def test_swapped_jsonl_files_are_not_served(cache, resealed, caplog):
    fake = Slow()
    first = cache.generate(QUESTIONS, fake, num_samples=3, **SETTINGS)
    meta, completions, full_texts = _paths(first)
    tmp = completions.with_name("swap")
    completions.rename(tmp)
    full_texts.rename(completions)
    tmp.rename(full_texts)
    if resealed:  # the manifest is made to match the swapped files: the lines' shape still gives it away
        _reseal(
            meta,
            lambda doc: doc["files"].update(
                {completions.name: _record(completions), full_texts.name: _record(full_texts)}
            ),
        )
    caplog.clear()
    again = cache.generate(QUESTIONS, fake, num_samples=3, **SETTINGS)
    assert again.status == "miss" and fake.asked == 6 and again.completions == first.completions
    assert "regenerating" in caplog.text or "corrupt" in caplog.text.lower()


def _garbage_line(path, line):
    def change(doc):
        path.write_bytes(line + b"\n")
        doc["files"][path.name] = _record(path)

    return change


@pytest.mark.parametrize(
    "damage",
    [
        "files: []",
        "key: null",
        "created_at: x",
        "record: 1",
        "extra file",
        "line: list",
        "line: i str",
        "line: missing field",
        "line: not json",
        "rows differ",
    ],
)
def test_wrong_shape_metadata_or_rows_are_a_miss_with_a_warning(cache, damage, caplog):
    fake = Slow()
    first = cache.generate(QUESTIONS, fake, num_samples=2, **SETTINGS)
    meta, completions, full_texts = _paths(first)
    ok_line = b'{"i":0,"s":0,"prompt":"p","prompt_hash":"h","completion":"c"}'
    change = {
        "files: []": lambda doc: doc.update(files=[]),
        "key: null": lambda doc: doc.update(key=None),
        "created_at: x": lambda doc: doc.update(created_at="x"),
        "record: 1": lambda doc: doc["files"].update({completions.name: 1}),
        "extra file": lambda doc: doc["files"].update({"other.jsonl": _record(full_texts)}),
        "line: list": _garbage_line(completions, b"[1, 2]"),
        "line: i str": _garbage_line(completions, ok_line.replace(b'"i":0', b'"i":"0"')),
        "line: missing field": _garbage_line(full_texts, b'{"i":0,"s":0}'),
        "line: not json": _garbage_line(full_texts, b"{nope"),
        "rows differ": _garbage_line(completions, ok_line),  # full_texts has rows 0 and 1, completions row 0
    }[damage]
    _reseal(meta, change)
    caplog.clear()
    again = cache.generate(QUESTIONS, fake, num_samples=2, **SETTINGS)
    assert again.status == "miss" and fake.asked == 4 and again.completions == first.completions
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_two_callers_missing_the_same_entry_generate_once(caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    fake = Slow(delay=0.3)
    results = []

    def run():
        results.append(
            GenerationCache("org/Tiny-Chat", chunk_size=2).generate(QUESTIONS, fake, num_samples=4, **SETTINGS)
        )

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.asked == 4  # once per prompt in total, not once per caller
    assert sorted(r.status for r in results) == ["hit", "miss"]
    assert results[0].completions == results[1].completions
    assert "Another process is computing this entry" in caplog.text
    assert not list((cache_root() / "experiments" / ".locks").iterdir())  # the lease is released


def test_an_unwritable_lock_folder_still_generates(cache, monkeypatch):
    from hf_cachehooks._core import locking

    real = locking.os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError("read-only lock folder")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(locking.os, "open", refuse)
    fake = Slow()
    assert cache.generate(QUESTIONS, fake, num_samples=2, **SETTINGS).status == "miss" and fake.asked == 2
    assert cache.generate(QUESTIONS, fake, num_samples=2, **SETTINGS).status == "hit" and fake.asked == 2


def test_chat_formatted_prompts_are_their_own_entry(cache, model_and_tok):
    """A completion of the chat-wrapped prompt is never served for the plain prompt (or another system prompt)."""
    model, tok = model_and_tok
    plain = Counting(model, tok, batch_size=4)
    chat = Counting(model, tok, batch_size=4, use_chat_template=True)
    other = Counting(model, tok, batch_size=4, use_chat_template=True, system_prompt="Answer in French.")
    assert cache.generate(QUESTIONS, plain, num_samples=2, **SETTINGS).status == "miss"
    as_chat = cache.generate(QUESTIONS, chat, num_samples=2, **SETTINGS)
    assert as_chat.status == "miss" and chat.asked == 2 and "_chat" in Path(as_chat.path).name
    assert cache.generate(QUESTIONS, other, num_samples=2, **SETTINGS).status == "miss"
    assert cache.generate(QUESTIONS, plain, num_samples=2, **SETTINGS).status == "hit"
    assert cache.generate(QUESTIONS, chat, num_samples=2, **SETTINGS).status == "hit" and chat.asked == 2
    tok.chat_template = tok.chat_template + " "  # another template: another prompt
    try:
        assert cache.generate(QUESTIONS, chat, num_samples=2, **SETTINGS).status == "miss"
    finally:
        tok.chat_template = tok.chat_template[:-1]
