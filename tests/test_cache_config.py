"""One cache vocabulary: `CacheConfig`, the keyword adapter, and every cache taking it (fake clocks, tiny models)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pickle
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import hf_cachehooks
import hf_cachehooks._models.runners as runners
import hf_cachehooks.activations.writer as writer
from hf_cachehooks import CacheConfig, EvalConfig, evaluate_model, management
from hf_cachehooks._core.cache_config import DEFAULT_MAX_AGE, KEYWORDS, OWN_DEFAULT, days, settle
from hf_cachehooks.activations.writer import cache_activations
from hf_cachehooks.cli import build_parser, main
from hf_cachehooks.cli.words import in_cli_words
from hf_cachehooks.conversation.cache import TokenCache, TokenCacheConfig
from hf_cachehooks.errors import ConfigError
from hf_cachehooks.evaluation.predictions import PredictionCache
from hf_cachehooks.generation.backends import TransformersBackend
from hf_cachehooks.generation.cache import GenerationCache
from hf_cachehooks.training.config import SpeedupConfig
from tests.conftest import make_llama, make_tokenizer

DAY = 86400.0
T0 = 1_700_000_000.0
CFG = EvalConfig(max_new_tokens=3, batch_size=2, metrics=("exact_match",))
QUESTIONS = [f"what is {a} plus {b} ?" for a in ("two", "four") for b in ("two", "four")]
SETTINGS = {"prompt_name": "p", "subject_type": "all", "temperature": 0.0, "max_tokens": 3}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def predicted(monkeypatch):
    """Counts examples sent to the model by `evaluate_model`."""
    count = [0]
    real = runners.generate

    def counting(model, tokenizer, prompts, config):
        count[0] += len(prompts)
        return real(model, tokenizer, prompts, config)

    monkeypatch.setattr(runners, "generate", counting)
    return count


# The object -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"max_age": timedelta(days=-1)}, "max_age=datetime.timedelta(days=-1)"),
        ({"max_age": 7}, "max_age=7 is not a duration"),
        ({"lock_stale_after": timedelta(0)}, "lock_stale_after"),
        ({"lock_stale_after": 60}, "lock_stale_after=60 is not a duration"),
        ({"force_recompute": "yes"}, "force_recompute='yes'"),
        ({"enabled": None}, "enabled=None"),
        ({"root": 3}, "root=3 is not a path"),
        ({"folder": ""}, "folder='' is empty"),
    ],
)
def test_bad_values_are_refused_naming_the_value_and_the_fix(changes, named):
    with pytest.raises(ConfigError) as info:
        CacheConfig(**changes)
    assert named in str(info.value) and ("pass" in str(info.value) or "must" in str(info.value))


def test_defaults_root_resolution_and_folders(tmp_path, monkeypatch):
    config = CacheConfig()
    assert config.max_age is OWN_DEFAULT and (config.force_recompute, config.enabled) == (False, True)
    assert config.lock_stale_after == timedelta(seconds=60) and config.stale_after_seconds == 60
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "later"))  # read when used, not when made
    assert config.resolve_root() == tmp_path / "later"
    assert config.folder_for("predictions") == tmp_path / "later" / "predictions"
    monkeypatch.delenv("HF_CACHEHOOKS_HOME")
    assert config.resolve_root() == Path("outputs/cache")
    assert CacheConfig(root=tmp_path, folder="elsewhere").folder_for("predictions") == Path("elsewhere")


def test_expiry_is_a_pure_function_of_created_at_now_and_max_age():
    week = CacheConfig(max_age=timedelta(days=7), clock=Clock(T0 + 7 * DAY + 1))
    assert week.max_age_days == 7.0 and days(timedelta(hours=12)) == 0.5 and days(None) is None
    assert not week.expired(T0, T0 + 7 * DAY) and week.expired(T0, T0 + 7 * DAY + 1)
    assert week.expired(T0)  # now from its clock
    assert not CacheConfig(max_age=None).expired(0, T0 + 1e9)


def _effective_age(kind, cache, monkeypatch, tmp_path):
    """The `max_age` a cache puts in effect, built with `cache` (None: no `cache=` at all)."""
    given = {} if cache is None else {"cache": cache}
    if kind == "predictions":
        return EvalConfig(**given).resolved_cache.max_age
    if kind == "generations":
        return GenerationCache("org/Tiny", **given).cache.max_age
    if kind == "conversations":
        return TokenCacheConfig(**given).resolved_cache.max_age
    settled = []  # activations: the settings cache_activations settles, caught before any model work

    def catch(*args):
        settled.append(settle(*args))
        raise _Settled

    monkeypatch.setattr(writer, "settle", catch)
    with pytest.raises(_Settled):
        cache_activations(None, None, [], tmp_path / "acts", [1], **given)
    return settled[0].max_age


class _Settled(Exception):
    pass


@pytest.mark.parametrize(
    ("kind", "age"),
    [
        ("predictions", timedelta(days=30)),
        ("generations", None),
        ("activations", None),
        ("conversations", timedelta(days=7)),
    ],
)
def test_each_cache_expires_the_same_with_or_without_a_default_cache_config(kind, age, monkeypatch, tmp_path):
    without = _effective_age(kind, None, monkeypatch, tmp_path)
    assert _effective_age(kind, CacheConfig(), monkeypatch, tmp_path) == without == age
    assert _effective_age(kind, CacheConfig(root=tmp_path, clock=Clock()), monkeypatch, tmp_path) == age
    assert _effective_age(kind, CacheConfig(max_age=timedelta(hours=1)), monkeypatch, tmp_path) == timedelta(hours=1)
    assert _effective_age(kind, CacheConfig(max_age=None), monkeypatch, tmp_path) is None


def test_each_default_age_is_stated_once():
    assert DEFAULT_MAX_AGE == {
        "EvalConfig": timedelta(days=30),
        "GenerationCache": None,
        "cache_activations": None,
        "TokenCacheConfig": timedelta(days=7),
    }
    assert EvalConfig().cache_max_age_days == 30 and TokenCacheConfig().disk_ttl_seconds == 7 * DAY
    assert TokenCacheConfig.from_yaml_dict({}).resolved_cache.max_age == timedelta(days=7)


def test_a_cache_config_left_to_the_cache_has_no_age_of_its_own():
    assert CacheConfig() != CacheConfig(max_age=timedelta(0)) and CacheConfig() != CacheConfig(max_age=None)
    assert repr(CacheConfig()).count("max_age=OWN_DEFAULT") == 1
    assert copy.deepcopy(CacheConfig()).max_age is OWN_DEFAULT
    assert pickle.loads(pickle.dumps(CacheConfig())).max_age is OWN_DEFAULT
    with pytest.raises(ConfigError, match="own default"):
        CacheConfig().max_age_days  # noqa: B018  (only a cache knows its own age)


def test_the_clock_is_not_part_of_equality_and_the_object_is_frozen():
    assert CacheConfig(clock=Clock()) == CacheConfig() and hash(CacheConfig(clock=Clock())) == hash(CacheConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        CacheConfig().enabled = False  # type: ignore[misc]


def test_from_keywords_maps_every_older_spelling():
    built = CacheConfig.from_keywords(
        use_prediction_cache=False,
        force_recompute=True,
        cache_max_age_days=0.5,
        cache_dir="root",
        predictions_cache_dir="preds",
        lock_stale_after=5,
    )
    assert built == CacheConfig(
        root="root",
        folder="preds",
        max_age=timedelta(hours=12),
        force_recompute=True,
        enabled=False,
        lock_stale_after=timedelta(seconds=5),
    )
    assert CacheConfig.from_keywords(max_age_days=-1).max_age is None  # negative days: never expires, as before
    assert CacheConfig.from_keywords(disk_ttl_seconds=60).max_age == timedelta(minutes=1)
    assert CacheConfig.from_keywords(experiments_dir="e").folder == CacheConfig.from_keywords(directory="e").folder
    assert set(KEYWORDS) >= {"use_prediction_cache", "force_recompute", "cache_max_age_days", "predictions_cache_dir"}
    with pytest.raises(ConfigError, match="Unknown cache keyword 'max_age_weeks'"):
        CacheConfig.from_keywords(max_age_weeks=1)


def test_the_package_root_exports_it_without_importing_torch():
    import subprocess
    import sys

    assert hf_cachehooks.CacheConfig is CacheConfig and "CacheConfig" in hf_cachehooks.__all__
    code = (
        "import sys, hf_cachehooks; hf_cachehooks.EvalConfig(cache=hf_cachehooks.CacheConfig(), "
        "generation_config={'max_new_tokens': 3}); print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# EvalConfig: one adapter for the keywords ----------------------------------------------------------------


def test_eval_config_keywords_and_cache_describe_the_same_settings():
    by_keywords = EvalConfig(
        use_prediction_cache=False,
        cache_max_age_days=7,
        predictions_cache_dir="r",
        lock_stale_after=timedelta(seconds=5),
    )
    by_object = EvalConfig(
        cache=CacheConfig(folder="r", max_age=timedelta(days=7), enabled=False, lock_stale_after=timedelta(seconds=5))
    )
    assert by_keywords.resolved_cache == by_object.resolved_cache and by_keywords == by_object
    assert by_keywords != EvalConfig(cache_max_age_days=8)
    assert EvalConfig().resolved_cache == CacheConfig(max_age=timedelta(days=30))  # the predictions' own age


def test_eval_config_lock_stale_after_is_a_timedelta_and_still_takes_seconds():
    by_duration = EvalConfig(lock_stale_after=timedelta(seconds=5))
    with pytest.warns(
        FutureWarning,
        match=r"EvalConfig\(lock_stale_after=<seconds>\) is deprecated; "
        r"pass lock_stale_after=timedelta\(seconds=\.\.\.\)",
    ):
        by_seconds = EvalConfig(lock_stale_after=5)
    assert by_duration == by_seconds and by_seconds.lock_stale_after == timedelta(seconds=5)
    assert by_duration.resolved_cache.stale_after_seconds == 5 == by_seconds.resolved_cache.stale_after_seconds
    assert EvalConfig().lock_stale_after == timedelta(seconds=60) == EvalConfig(lock_stale_after=60.0).lock_stale_after
    assert by_seconds != EvalConfig()  # lock settings take part in equality as before (never in a key)
    assert EvalConfig(cache=CacheConfig(lock_stale_after=timedelta(seconds=5)), lock_stale_after=5) == by_seconds
    assert dataclasses.replace(by_seconds, batch_size=4).lock_stale_after == timedelta(seconds=5)
    with pytest.raises(ConfigError, match="lock_stale_after=datetime.timedelta"):
        EvalConfig(cache=CacheConfig(lock_stale_after=timedelta(seconds=5)), lock_stale_after=timedelta(seconds=6))
    with pytest.raises(ConfigError, match="'soon' is neither a timedelta nor a number of seconds"):
        EvalConfig(lock_stale_after="soon")  # type: ignore[arg-type]


def test_eval_config_replace_re_settles_the_keywords():
    config = EvalConfig(cache_max_age_days=7)
    forced = dataclasses.replace(config, force_recompute=True)
    assert forced.resolved_cache.force_recompute and forced.resolved_cache.max_age == timedelta(days=7)
    assert config.with_(cache_max_age_days=None).resolved_cache.max_age is None
    own = EvalConfig(cache=CacheConfig(max_age=None))
    assert dataclasses.replace(own, batch_size=4).resolved_cache.max_age is None
    assert dataclasses.replace(own, cache=CacheConfig(enabled=False)).resolved_cache.enabled is False


@pytest.mark.filterwarnings("ignore::FutureWarning")  # cache_dir, clock, a number of seconds: deprecated
@pytest.mark.parametrize(
    "keyword, value",
    [
        ("force_recompute", True),
        ("use_prediction_cache", False),
        ("cache_max_age_days", 7),
        ("predictions_cache_dir", "p"),
        ("cache_dir", "r"),
        ("lock_stale_after", 5.0),
        ("clock", Clock()),
    ],
)
def test_a_keyword_that_disagrees_with_cache_is_refused(keyword, value):
    with pytest.raises(ConfigError, match=f"EvalConfig got cache=CacheConfig.*{keyword}=.*set it in one place"):
        EvalConfig(cache=CacheConfig(), **{keyword: value})


def test_a_keyword_that_agrees_with_cache_is_accepted():
    config = EvalConfig(
        cache=CacheConfig(force_recompute=True, max_age=timedelta(days=7)), force_recompute=True, cache_max_age_days=7
    )
    assert config.resolved_cache.force_recompute and config.resolved_cache.max_age == timedelta(days=7)
    with pytest.raises(ConfigError, match="pass a hf_cachehooks.CacheConfig"):
        EvalConfig(cache={"max_age": 7})  # type: ignore[arg-type]


def test_evaluate_model_reads_every_setting_from_the_cache_object(tiny, qa_rows, tmp_path, predicted):
    model, tok = tiny
    clock = Clock()
    cache = CacheConfig(root=tmp_path / "mine", max_age=timedelta(days=2), clock=clock)
    config = dataclasses.replace(CFG, cache=cache)
    first = evaluate_model(model, qa_rows, config, tokenizer=tok)
    assert first.cache_status == "miss" and Path(first.path).is_relative_to(tmp_path / "mine" / "predictions")
    assert first.metadata["created_at"] == T0  # the object's clock
    clock.now += 1 * DAY
    assert evaluate_model(model, qa_rows, config, tokenizer=tok).cache_status == "hit"
    clock.now += 1.5 * DAY  # 2.5 days old: expired
    assert evaluate_model(model, qa_rows, config, tokenizer=tok).cache_status in ("miss", "partial")
    forced = dataclasses.replace(CFG, cache=dataclasses.replace(cache, force_recompute=True))
    assert evaluate_model(model, qa_rows, forced, tokenizer=tok).cache_status == "recomputed"
    before = predicted[0]
    off = dataclasses.replace(CFG, cache=CacheConfig(root=tmp_path / "off", enabled=False))
    assert evaluate_model(model, qa_rows, off, tokenizer=tok).cache_status == "disabled"
    assert predicted[0] == before + len(qa_rows) and not (tmp_path / "off").exists()


def test_the_keyword_spelling_and_the_object_share_entries(tiny, qa_rows, tmp_path):
    model, tok = tiny
    first = evaluate_model(
        model, qa_rows, CFG.with_(predictions_cache_dir=str(tmp_path / "r" / "predictions")), tokenizer=tok
    )
    again = evaluate_model(
        model, qa_rows, dataclasses.replace(CFG, cache=CacheConfig(root=tmp_path / "r")), tokenizer=tok
    )
    assert (first.cache_status, again.cache_status) == ("miss", "hit") and again.path == first.path


# EvalConfig: generation_config ------------------------------------------------------------------------


class OnlyToDict:
    def to_dict(self):
        return {"max_new_tokens": 3, "temperature": None, "_private": 1}


def test_generation_config_and_the_fields_give_the_same_key(tiny, qa_rows, predicted):
    from transformers import GenerationConfig

    model, tok = tiny
    fields = EvalConfig(max_new_tokens=3, batch_size=2, metrics=("exact_match",))
    first = evaluate_model(model, qa_rows, fields, tokenizer=tok)
    spellings = [GenerationConfig(max_new_tokens=3), {"max_new_tokens": 3}, OnlyToDict()]
    for spelling in spellings:
        config = EvalConfig(generation_config=spelling, batch_size=2, metrics=("exact_match",))
        assert (
            config.generation_overrides() == fields.generation_overrides() == {"max_new_tokens": 3, "do_sample": False}
        )
        again = evaluate_model(model, qa_rows, config, tokenizer=tok)
        assert again.cache_status == "hit" and again.key == first.key
    assert predicted[0] == len(qa_rows)
    sampled = EvalConfig(generation_config=GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.7))
    assert sampled.generation_overrides() == {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7}


def test_generation_config_next_to_a_generation_field_is_refused():
    with pytest.raises(ConfigError, match="generation_config and max_new_tokens; put max_new_tokens inside"):
        EvalConfig(generation_config={"max_new_tokens": 3}, max_new_tokens=4)
    with pytest.raises(ConfigError, match="generation_kwargs"):
        EvalConfig(generation_config={"max_new_tokens": 3}, generation_kwargs={"num_beams": 2})
    with pytest.raises(ConfigError, match="neither a mapping nor a transformers GenerationConfig"):
        EvalConfig(generation_config=42)  # type: ignore[arg-type]
    kept = EvalConfig(generation_config={"num_beams": 2})
    assert kept.with_(batch_size=1).generation_overrides()["num_beams"] == 2  # replace keeps it


# GenerationCache -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_backend():
    return TransformersBackend(make_llama(), make_tokenizer(), batch_size=4)


def test_generation_cache_takes_the_object(local_backend, tmp_path):
    clock = Clock()
    cache = GenerationCache(
        "org/Tiny", cache=CacheConfig(folder=tmp_path / "exp", max_age=timedelta(days=7), clock=clock)
    )
    first = cache.generate(QUESTIONS, local_backend, **SETTINGS)
    assert first.status == "miss" and Path(first.path).is_relative_to(tmp_path / "exp")
    clock.now += 6 * DAY
    assert cache.generate(QUESTIONS, local_backend, **SETTINGS).status == "hit"
    clock.now += 2 * DAY
    assert cache.generate(QUESTIONS, local_backend, **SETTINGS).status == "miss"  # 8 days: expired
    forced = GenerationCache("org/Tiny", cache=CacheConfig(folder=tmp_path / "exp", force_recompute=True, clock=clock))
    assert forced.generate(QUESTIONS, local_backend, **SETTINGS).status == "miss"
    with pytest.warns(FutureWarning, match="GenerationCache"):
        keywords = GenerationCache("org/Tiny", experiments_dir=tmp_path / "exp", max_age_days=7, clock=clock)
    assert keywords.cache == cache.cache and keywords.generate(QUESTIONS, local_backend, **SETTINGS).status == "hit"


def test_generation_cache_disabled_writes_nothing(local_backend, tmp_path):
    off = GenerationCache("org/Tiny", cache=CacheConfig(root=tmp_path / "r", enabled=False))
    gens = off.generate(QUESTIONS, local_backend, **SETTINGS)
    assert gens.status == "disabled" and gens.path == "" and all(gens.first_samples)
    assert not (tmp_path / "r").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # max_age_days: deprecated
def test_generation_cache_refuses_a_disagreeing_keyword(tmp_path):
    with pytest.raises(ConfigError, match="GenerationCache got cache=CacheConfig.*max_age_days=7"):
        GenerationCache("org/Tiny", max_age_days=7, cache=CacheConfig())
    default = GenerationCache("org/Tiny")
    assert default.cache.max_age is None and default.base == Path(os.environ["HF_CACHEHOOKS_HOME"]) / "experiments"


# cache_activations ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return make_llama(layers=2), make_tokenizer()


def _records():
    return [{"text": f"what is {w}", "label": i % 2} for i, w in enumerate(("the sky", "a cat", "two", "four"))]


@pytest.fixture
def extractions(monkeypatch):
    calls = []
    real = writer.capture
    monkeypatch.setattr(writer, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_activations_force_recompute_re_extracts_the_same_inputs(llama, tmp_path, extractions, caplog):
    model, tok = llama
    folder = tmp_path / "acts"
    first = cache_activations(model, tok, _records(), folder, [1], progress=False)
    extractions.clear()
    assert cache_activations(model, tok, _records(), folder, [1], progress=False).manifest == first.manifest
    assert extractions == []
    with caplog.at_level(logging.INFO, logger="hf_cachehooks"):
        again = cache_activations(
            model, tok, _records(), folder, [1], progress=False, cache=CacheConfig(force_recompute=True)
        )
    assert extractions and "force_recompute is set" in caplog.text
    assert again.manifest["key"] == first.manifest["key"]
    assert again.manifest["created_at"] >= first.manifest["created_at"]
    other = _records()[:2]
    with pytest.raises(ConfigError, match="made from other inputs"):  # other inputs still need `force`
        cache_activations(model, tok, other, folder, [1], progress=False, cache=CacheConfig(force_recompute=True))


def test_activations_expire_by_the_object(llama, tmp_path, extractions):
    model, tok = llama
    folder = tmp_path / "acts"
    clock = Clock(T0)
    cache_activations(model, tok, _records(), folder, [1], progress=False, cache=CacheConfig(clock=clock))
    extractions.clear()
    clock.now += 3 * DAY
    week = CacheConfig(max_age=timedelta(days=7), clock=clock)
    cache_activations(model, tok, _records(), folder, [1], progress=False, cache=week)
    assert extractions == []
    cache_activations(
        model, tok, _records(), folder, [1], progress=False, cache=dataclasses.replace(week, max_age=timedelta(days=1))
    )
    assert extractions


@pytest.mark.filterwarnings("ignore::FutureWarning")  # max_age_days: deprecated
def test_activations_refuse_disagreeing_settings(llama, tmp_path):
    model, tok = llama
    with pytest.raises(ConfigError, match="cache_activations got cache=CacheConfig.*max_age_days=7"):
        cache_activations(model, tok, _records(), tmp_path / "a", [1], max_age_days=7, cache=CacheConfig())
    with pytest.raises(ConfigError, match="pass the store's folder once"):
        cache_activations(model, tok, _records(), tmp_path / "a", [1], cache=CacheConfig(folder=tmp_path / "b"))


# The token cache's disk tier ------------------------------------------------------------------------------


def _turn(n=3, layers=2, hidden=4, k=2):
    return (
        np.arange(n),
        np.zeros((n, layers, hidden), np.float16),
        np.zeros((n, layers, k), np.int32),
        np.zeros((n, layers, k), np.float32),
    )


def test_token_cache_disk_tier_takes_the_object(tmp_path):
    clock = Clock()
    config = TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv", max_age=timedelta(seconds=60), clock=clock))
    cache = TokenCache(config)
    assert cache.root == tmp_path / "conv"
    cache.append_turn("a", *_turn())
    assert (tmp_path / "conv" / "a" / "conversation.json").exists()
    clock.now += 59
    assert cache.evict() == []
    clock.now += 2  # idle 61 s > 60 s: its clock and its max_age
    assert cache.evict() == ["a"]
    under_root = TokenCache(TokenCacheConfig(cache=CacheConfig(root=tmp_path / "r")))
    assert under_root.root == tmp_path / "r" / "conversations"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # directory, disk_ttl_seconds, memory_ttl_seconds
def test_token_cache_keywords_and_the_object_are_one_setting(tmp_path):
    keywords = TokenCacheConfig(directory=str(tmp_path), disk_ttl_seconds=86400)
    assert keywords == TokenCacheConfig(cache=CacheConfig(folder=str(tmp_path), max_age=timedelta(days=1)))
    assert TokenCacheConfig().resolved_cache.max_age == timedelta(days=7)  # the disk tier's default, as before
    assert TokenCacheConfig(disk_ttl_seconds=None).resolved_cache.max_age is None
    assert TokenCacheConfig(memory_ttl_seconds=90).memory_ttl == timedelta(seconds=90)
    assert TokenCacheConfig(memory_ttl_seconds=90) == TokenCacheConfig(memory_ttl=timedelta(seconds=90))
    assert TokenCacheConfig(memory_ttl_seconds=None).memory_ttl is None
    with pytest.raises(ConfigError, match="TokenCacheConfig got cache=CacheConfig.*directory="):
        TokenCacheConfig(directory="x", cache=CacheConfig())
    with pytest.raises(ConfigError, match="memory_ttl=.*memory_ttl_seconds=90; set it in one place"):
        TokenCacheConfig(memory_ttl=timedelta(seconds=30), memory_ttl_seconds=90)
    with pytest.raises(ConfigError, match="memory_ttl=60 is not a duration"):
        TokenCacheConfig(memory_ttl=60)  # type: ignore[arg-type]
    for flag in ({"force_recompute": True}, {"enabled": False}):
        with pytest.raises(ConfigError, match="conversations are stored, not recomputed"):
            TokenCacheConfig(cache=CacheConfig(**flag))


def test_yaml_still_reads_into_the_object():
    config = TokenCacheConfig.from_yaml_dict({"cache": {"disk": {"directory": "./c"}, "ttl": {"disk_days": 2}}})
    assert config.resolved_cache.folder == "./c" and config.resolved_cache.max_age == timedelta(days=2)
    assert TokenCacheConfig.from_yaml_dict({"ttl": {"disk_days": -1}}).resolved_cache.max_age is None
    # what chat-server --config --directory does
    moved = dataclasses.replace(config, cache=dataclasses.replace(config.resolved_cache, folder="./d"))
    assert moved.resolved_cache.folder == "./d" and moved.resolved_cache.max_age == timedelta(days=2)


def test_yaml_ttls_take_durations_with_a_unit():
    config = TokenCacheConfig.from_yaml_dict({"cache": {"ttl": {"memory": "30m", "disk": "2w"}}})
    assert config.memory_ttl == timedelta(minutes=30) and config.resolved_cache.max_age == timedelta(weeks=2)
    older = TokenCacheConfig.from_yaml_dict({"ttl": {"memory_minutes": 30, "disk_days": "12h"}})
    assert older.memory_ttl == timedelta(minutes=30) and older.resolved_cache.max_age == timedelta(hours=12)
    assert TokenCacheConfig.from_yaml_dict({"ttl": {"disk": None, "memory": None}}).memory_ttl is None
    with pytest.raises(ConfigError, match=r"ttl.disk: Duration 7 has no unit\. Add one, e\.g\. 7d"):
        TokenCacheConfig.from_yaml_dict({"ttl": {"disk": 7}})
    with pytest.raises(ConfigError, match=r"ttl.memory: Cannot read duration 'soon'.*12h"):
        TokenCacheConfig.from_yaml_dict({"ttl": {"memory": "soon"}})
    with pytest.raises(ConfigError, match="ttl.disk and ttl.disk_days set the same limit"):
        TokenCacheConfig.from_yaml_dict({"ttl": {"disk": "7d", "disk_days": 7}})


# Deprecated spellings: each warns once per process, naming its replacement ------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp: GenerationCache("m", experiments_dir=tmp),
            "GenerationCache(experiments_dir=...) is deprecated; pass cache=CacheConfig(folder=...).",
        ),
        (
            lambda tmp: GenerationCache("m", max_age_days=7),
            "GenerationCache(max_age_days=...) is deprecated; pass cache=CacheConfig(max_age=timedelta(days=...)).",
        ),
        (
            lambda tmp: GenerationCache("m", clock=Clock()),
            "GenerationCache(clock=...) is deprecated; pass cache=CacheConfig(clock=...).",
        ),
        (
            lambda tmp: TokenCacheConfig(directory=str(tmp)),
            "TokenCacheConfig(directory=...) is deprecated; pass cache=CacheConfig(folder=...).",
        ),
        (
            lambda tmp: TokenCacheConfig(disk_ttl_seconds=60),
            "TokenCacheConfig(disk_ttl_seconds=...) is deprecated; "
            "pass cache=CacheConfig(max_age=timedelta(seconds=...)).",
        ),
        (
            lambda tmp: TokenCacheConfig(memory_ttl_seconds=60),
            "TokenCacheConfig(memory_ttl_seconds=...) is deprecated; pass memory_ttl=timedelta(seconds=...).",
        ),
        (
            lambda tmp: EvalConfig(cache_dir=str(tmp)),
            "EvalConfig(cache_dir=...) is deprecated; pass cache=CacheConfig(root=...).",
        ),
        (
            lambda tmp: EvalConfig(clock=Clock()),
            "EvalConfig(clock=...) is deprecated; pass cache=CacheConfig(clock=...).",
        ),
        (
            lambda tmp: settle(None, {"max_age_days": 7}, {"max_age_days": None}, "cache_activations"),
            "cache_activations(max_age_days=...) is deprecated; pass cache=CacheConfig(max_age=timedelta(days=...)).",
        ),
    ],
)
def test_an_old_spelling_warns_once_naming_its_replacement(make, message, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(tmp_path)
        make(tmp_path)  # the second use is quiet
    assert [(w.category, str(w.message)) for w in caught] == [(FutureWarning, message)]
    assert caught[0].filename == __file__  # it points at the caller, not at the package


def test_eval_configs_familiar_keywords_never_warn(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = EvalConfig(
            use_prediction_cache=False,
            force_recompute=True,
            cache_max_age_days=3,
            predictions_cache_dir=str(tmp_path),
            lock_stale_after=timedelta(seconds=5),
        )
        config.with_(batch_size=2, cache_max_age_days=4)
        EvalConfig(cache=CacheConfig(max_age=timedelta(days=3)), cache_max_age_days=3)
        GenerationCache("m", cache=CacheConfig(folder=tmp_path))
        TokenCacheConfig(memory_ttl=timedelta(minutes=5), cache=CacheConfig(folder=tmp_path))
    assert caught == []
    assert config.resolved_cache == CacheConfig(
        folder=str(tmp_path),
        max_age=timedelta(days=3),
        force_recompute=True,
        enabled=False,
        lock_stale_after=timedelta(seconds=5),
    )


def test_a_number_of_seconds_for_lock_stale_after_warns_once():
    with pytest.warns(FutureWarning, match="lock_stale_after=<seconds>"):
        assert EvalConfig(lock_stale_after=5).lock_stale_after == timedelta(seconds=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert EvalConfig(lock_stale_after=6).resolved_cache.lock_stale_after == timedelta(seconds=6)
    assert caught == []


def test_prediction_cache_takes_the_object(tmp_path):
    cache = PredictionCache(CacheConfig(root=tmp_path, max_age=timedelta(days=7), clock=Clock()))
    assert cache.folder == tmp_path / "predictions" and cache.max_age_days == 7 and cache.clock() == T0
    assert PredictionCache(CacheConfig()).max_age_days == days(DEFAULT_MAX_AGE["EvalConfig"])  # its own 30 days
    assert PredictionCache(CacheConfig(folder=tmp_path / "p", max_age=None)).folder == tmp_path / "p"
    with pytest.raises(ConfigError, match="pass a hf_cachehooks.CacheConfig"):
        PredictionCache(tmp_path)  # type: ignore[arg-type]  (the older (folder, clock, max_age_days) spelling)


# The command line: durations and flags ---------------------------------------------------------------------


def _cache_activations_args(*extra):
    return build_parser().parse_args(
        ["cache-activations", "--model", "m", "--data", "d.json", "--layers", "1", "--output", "o", *extra]
    )


def test_cli_max_age_takes_a_duration(capsys):
    assert _cache_activations_args("--max-age", "7d").max_age == timedelta(days=7)
    assert _cache_activations_args("--max-age", "12h").max_age == timedelta(hours=12)
    assert _cache_activations_args().max_age is None  # never expires
    assert _cache_activations_args("--max-age-days", "2").max_age == timedelta(days=2)  # the older flag, in days
    assert "--max-age-days is deprecated here; use --max-age" in capsys.readouterr().err
    for bad, said in (("soon", "Cannot read duration 'soon'"), ("7", "Duration '7' has no unit. Add one, e.g. 7d")):
        with pytest.raises(SystemExit):
            _cache_activations_args("--max-age", bad)
        err = capsys.readouterr().err
        assert f"argument --max-age: {said}" in err and "7d" in err


def test_a_library_error_names_the_argument_and_the_cli_names_the_flag(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(ConfigError) as info:
        management.plan_clear(project)
    assert "Check the root argument or HF_CACHEHOOKS_HOME" in str(info.value) and "--" not in str(info.value)
    assert main(["--cache-dir", str(project), "clear", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "--cache-dir" in err and "root argument" not in err
    assert in_cli_words("pass cache=CacheConfig(root=...)") == "pass --cache-dir DIR"


# SpeedupConfig ---------------------------------------------------------------------------------------------


def test_speedup_config_holds_training_settings_only():
    names = {f.name for f in dataclasses.fields(SpeedupConfig)}
    assert not names & {"use_prediction_cache", "force_recompute", "cache_max_age_days", "predictions_cache_dir"}
    with pytest.raises(TypeError):
        SpeedupConfig(use_prediction_cache=True)  # type: ignore[call-arg]
