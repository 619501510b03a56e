"""Conversation token cache (hf_cachehooks/conversation/cache.py): tiers, eviction, TTLs, concurrency, corruption."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import types
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from hf_cachehooks import CacheConfig
from hf_cachehooks._core import entry
from hf_cachehooks._core.keys import hash_bytes
from hf_cachehooks._core.store import read_entry, seal, unseal
from hf_cachehooks.conversation import cache as token_cache
from hf_cachehooks.conversation import memory as memory_tier
from hf_cachehooks.conversation.cache import TokenCache, TokenCacheConfig, validate_conv_id
from hf_cachehooks.conversation.files import STATS, read_turn, turn_nbytes
from hf_cachehooks.errors import ConfigError, MissingDependencyError

L, H, K = 3, 8, 4
TURN_BYTES = lambda t: t * (L * (H * 2 + K * 6) + 4)  # noqa: E731  bytes one turn of t tokens holds in memory


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_turn(start: int, count: int, tag: int = 0, bf16: bool = False):
    """Arrays whose every value encodes (tag, global index), so a token's data identifies its origin."""
    idx = np.arange(start, start + count)
    token_ids = idx + 100_000 * tag
    base = (tag * 1000 + idx)[:, None, None]
    hidden = (base * 64 + np.arange(L)[:, None] * H + np.arange(H)).astype(np.uint16 if bf16 else np.float32)
    hidden = hidden if bf16 else (hidden / 1024).astype(np.float16)
    topk_ids = np.broadcast_to(base * 10 + np.arange(L)[:, None], (count, L, K)).astype(np.int64)
    topk_probs = np.broadcast_to(((idx % 7) / 8)[:, None, None] + np.arange(K) / 64, (count, L, K)).astype(np.float32)
    return token_ids, hidden, topk_ids, topk_probs


def check(record, start: int, count: int, index: int, tag: int = 0, bf16: bool = False) -> None:
    token_ids, hidden, topk_ids, topk_probs = make_turn(start, count, tag, bf16)
    row = index - start
    assert record is not None and record.index == index
    assert record.token_id == token_ids[row]
    np.testing.assert_array_equal(record.hidden, hidden[row])
    np.testing.assert_array_equal(record.topk_ids, topk_ids[row])
    np.testing.assert_array_equal(record.topk_probs, topk_probs[row].astype(np.float16))
    assert record.hidden.shape == (L, H) and record.topk_ids.shape == (L, K)


@pytest.fixture
def folder(tmp_path) -> Path:
    return tmp_path / "conversations"


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.DEBUG, logger="hf_cachehooks")
    return caplog


def cache_at(folder: Path, clock=None, max_age: timedelta | None = None, **options) -> TokenCache:
    """A token cache in `folder`; `max_age` is the disk tier's idle limit (None: its own, 7 days)."""
    disk = CacheConfig(folder=folder) if max_age is None else CacheConfig(folder=folder, max_age=max_age)
    config = TokenCacheConfig(cache=disk, **options)
    return TokenCache(config) if clock is None else TokenCache(config, clock=clock)


# Round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_multi_turn_round_trip_keeps_global_indices_and_each_tokens_own_arrays(folder, bf16):
    cache = cache_at(folder)
    turns = [(0, 4), (4, 1), (5, 6)]
    for start, count in turns:
        assert cache.append_turn("chat-1", *make_turn(start, count, bf16=bf16), meta={"model": "tiny"}) == (
            start,
            start + count,
        )
    assert cache.length("chat-1") == 11
    for index in range(11):
        start, count = next(t for t in turns if t[0] <= index < t[0] + t[1])
        record = cache.token("chat-1", index)
        check(record, start, count, index, bf16=bf16)
        assert record.hidden_dtype == ("bfloat16" if bf16 else "float16")
    manifest = read_entry(folder / "chat-1" / "conversation.json")
    assert [(t["start"], t["count"], t["file"]) for t in manifest["turns"]] == [
        (0, 4, "turn-00000.safetensors"),
        (4, 1, "turn-00001.safetensors"),
        (5, 6, "turn-00002.safetensors"),
    ]
    assert (manifest["layers"], manifest["hidden"], manifest["k"]) == (L, H, K)
    assert manifest["meta"] == {"model": "tiny", "hidden_dtype": "bfloat16" if bf16 else "float16"}


def test_turn_files_are_plain_safetensors(folder):
    from safetensors.numpy import load_file

    cache_at(folder).append_turn("c", *make_turn(0, 3))
    loaded = load_file(folder / "c" / "turn-00000.safetensors") | load_file(folder / "c" / "lens-00000.safetensors")
    assert {k: v.shape for k, v in loaded.items()} == {
        "token_ids": (3,),
        "hidden": (3, L, H),
        "topk_ids": (3, L, K),
        "topk_probs": (3, L, K),
    }


def test_a_turn_stored_without_its_lens_gets_it_later_in_memory_and_on_disk(folder):
    token_ids, hidden, topk_ids, topk_probs = make_turn(0, 4)
    cache = cache_at(folder)
    cache.append_turn("c", token_ids, hidden)
    record = cache.token("c", 2)
    assert record.topk_ids is None and record.topk_probs is None and record.token_id == token_ids[2]
    assert cache.pending_lens() == [("c", 0, 4)] and not (folder / "c" / "lens-00000.safetensors").exists()
    assert cache_at(folder).token("c", 1).topk_ids is None  # a restart sees the same pending turn

    assert cache.add_lens("c", 0, topk_ids, topk_probs) is True
    check(cache.token("c", 2), 0, 4, 2)  # the memory tier now has the lens
    assert cache.pending_lens() == []
    check(cache_at(folder).token("c", 3), 0, 4, 3)  # and so does the disk
    assert cache.add_lens("c", 99, topk_ids, topk_probs) is False  # no turn starts there
    assert cache.add_lens("gone", 0, topk_ids, topk_probs) is False
    with pytest.raises(ConfigError, match="T=4"):
        cache.add_lens("c", 0, topk_ids[:2], topk_probs[:2])
    with pytest.raises(ConfigError, match="top-4"):  # one k per conversation
        cache.append_turn("c", *make_turn(4, 2)[:2], np.zeros((2, L, 5), np.int32), np.zeros((2, L, 5)))
    with pytest.raises(ConfigError, match="both"):
        cache.append_turn("c", *make_turn(4, 2)[:3])


def test_a_lens_file_from_another_turn_is_never_served_the_lens_is_computed_again(folder, warnings_log):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3))
    cache.append_turn("c", *make_turn(3, 3))
    lens0, lens1 = folder / "c" / "lens-00000.safetensors", folder / "c" / "lens-00001.safetensors"
    lens1.write_bytes(lens0.read_bytes())  # same size, the other turn's predictions
    record = cache_at(folder).token("c", 4)
    assert record.topk_ids is None and record.topk_probs is None  # the chat server computes it on click
    assert record.token_id == make_turn(3, 3)[0][1]  # the turn's own data is still good
    assert "lens-00001.safetensors: content does not match the manifest" in warnings_log.text


def test_memory_hit_then_disk_hit_after_a_restart(folder):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 5))
    check(cache.token("c", 3), 0, 5, 3)
    assert cache.status()["memory_hits"] == 1 and cache.status()["disk_hits"] == 0

    restarted = cache_at(folder)  # a new server process: nothing in memory
    check(record := restarted.token("c", 2), 0, 5, 2)
    assert not record.hidden.flags.writeable  # a view of the mapped turn file, not a private copy
    check(restarted.token("c", 4), 0, 5, 4)  # the first lookup promoted the whole turn
    status = restarted.status()
    assert (status["disk_hits"], status["memory_hits"], status["misses"]) == (1, 1, 0)
    assert restarted.append_turn("c", *make_turn(5, 2)) == (5, 7)  # appends continue after a restart
    check(cache_at(folder).token("c", 6), 5, 2, 6)


def test_out_of_range_and_unknown_are_none(folder):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3))
    assert [cache.token("c", i) for i in (-1, 3, 10**9)] == [None, None, None]
    assert cache.token("nobody", 0) is None and cache.length("nobody") == 0
    assert cache.status()["misses"] == 4
    assert [r.index for r in cache.tokens("c", -5, 99)] == [0, 1, 2]
    assert cache.pin("nobody") is False and cache.delete("nobody") is False


def test_a_turn_with_other_shapes_is_refused(folder):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 2))
    ids, hidden, top, probs = make_turn(2, 2)
    with pytest.raises(ConfigError, match="another model"):
        cache.append_turn("c", ids, hidden[:, :2], top[:, :2], probs[:, :2])
    with pytest.raises(ConfigError, match="float16"):
        cache.append_turn("c", ids, hidden.astype(np.float32), top, probs)
    assert cache.length("c") == 2


# Ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 65, "a\x00b", "..", "a\\b", "a b", None])
def test_malformed_conversation_ids_raise_before_touching_the_disk(folder, bad):
    cache = cache_at(folder)
    calls = [
        lambda: cache.append_turn(bad, *make_turn(0, 1)),
        lambda: cache.token(bad, 0),
        lambda: cache.tokens(bad, 0, 2),
        lambda: cache.length(bad),
        lambda: cache.pin(bad),
        lambda: cache.delete(bad),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match="Invalid conversation id"):
            call()
    assert not folder.exists() and not (folder.parent / "x").exists()
    assert validate_conv_id("A-z_09" + "x" * 58) == "A-z_09" + "x" * 58


# Memory tier -------------------------------------------------------------------------------------


def test_memory_tier_stays_under_its_limit_and_evicts_least_recently_used(folder, warnings_log):
    cache = cache_at(folder, memory_max_bytes=int(TURN_BYTES(10) * 2.5))
    cache.append_turn("c", *make_turn(0, 10))
    cache.append_turn("c", *make_turn(10, 10))
    cache.token("c", 0)  # turn 0 is now more recent than turn 1
    cache.append_turn("c", *make_turn(20, 10))  # over the limit: turn 1 goes
    assert cache.status()["memory_bytes"] == TURN_BYTES(10) * 2
    before = cache.status()
    check(cache.token("c", 5), 0, 10, 5)
    check(cache.token("c", 25), 20, 10, 25)
    assert cache.status()["memory_hits"] == before["memory_hits"] + 2
    check(cache.token("c", 15), 10, 10, 15)
    assert cache.status()["disk_hits"] == before["disk_hits"] + 1
    assert "Memory tier evicted conversation c turn 1" in warnings_log.text
    assert {r.levelno for r in warnings_log.records if "evicted" in r.getMessage()} == {logging.DEBUG}  # routine
    for n in range(3, 12):
        cache.append_turn("c", *make_turn(n * 10, 10))
        assert cache.status()["memory_bytes"] <= cache.status()["memory_limit"]


def test_memory_tier_holds_a_bounded_number_of_turns(folder, monkeypatch):
    monkeypatch.setattr(memory_tier, "MAX_TURNS", 3)  # mapped turns hold file descriptors
    cache = cache_at(folder)
    for n in range(6):
        cache.append_turn("c", *make_turn(n, 1))
    assert cache.status()["memory_bytes"] == 3 * TURN_BYTES(1)
    check(cache.token("c", 0), 0, 1, 0)
    assert cache.status()["disk_hits"] == 1


def test_a_turn_bigger_than_the_memory_tier_is_served_from_disk_and_evicts_nothing(folder):
    cache = cache_at(folder, memory_max_bytes=TURN_BYTES(4) - 1)
    cache.append_turn("small", *make_turn(0, 1))
    cache.append_turn("c", *make_turn(0, 4))
    assert cache.status()["memory_bytes"] == TURN_BYTES(1)  # the small turn stays
    check(cache.token("c", 1), 0, 4, 1)
    check(cache.token("c", 3), 0, 4, 3)
    check(cache.token("small", 0), 0, 1, 0)
    assert cache.status()["disk_hits"] == 2 and cache.status()["memory_hits"] == 1
    assert cache.status()["memory_bytes"] == TURN_BYTES(1)


def test_a_context_window_across_turns_reads_each_turn_once(folder, monkeypatch):
    cache = cache_at(folder, memory_max_bytes=TURN_BYTES(4) - 1)  # no 4-token turn fits: rows come from disk
    for start in (0, 4, 8):
        cache.append_turn("c", *make_turn(start, 4))
    reads = []
    real = token_cache.read_turn
    monkeypatch.setattr(token_cache, "read_turn", lambda *a: reads.append(a[2:]) or real(*a))
    records = cache.tokens("c", 2, 11)
    assert [r.index for r in records] == list(range(2, 11)) and reads == [
        (0, slice(2, 4)),
        (1, slice(0, 4)),
        (2, slice(0, 3)),
    ]
    for record in records:
        check(record, record.index // 4 * 4, 4, record.index)
    assert cache.tokens("c", -5, 2)[0].index == 0 and cache.tokens("c", 11, 99)[-1].index == 11


# Disk tier ---------------------------------------------------------------------------------------


def test_disk_limit_evicts_least_recently_accessed_unpinned_conversation(folder, warnings_log):
    clock = FakeClock()
    per_conv = None
    cache = cache_at(folder, clock)
    for name in ("a", "b", "c"):
        cache.append_turn(name, *make_turn(0, 4))
        clock.now += 10
    per_conv = cache.conversations()[0]["bytes"]
    limited = cache_at(folder, clock, disk_max_bytes=3 * per_conv)
    assert limited.pin("a")  # oldest, but pinned
    clock.now += 10
    assert limited.token("b", 0) is not None  # b is now more recent than c
    clock.now += 10
    limited.append_turn("d", *make_turn(0, 4))  # 4 conversations > 3 allowed
    assert [r["conv_id"] for r in limited.conversations()] == ["a", "b", "d"]
    assert not (folder / "c").exists()
    assert limited.token("c", 0) is None
    assert "removed conversation c from disk: least recently used" in warnings_log.text

    tiny = cache_at(folder, clock, disk_max_bytes=1)
    assert sorted(tiny.evict()) == ["b", "d"]
    assert [r["conv_id"] for r in tiny.conversations()] == ["a"]  # pinned survives, over the limit
    assert "over its 1-byte limit, all in pinned conversations" in warnings_log.text
    assert tiny.status()["disk_bytes"] == per_conv


def test_ttls_expire_both_tiers_with_a_fake_clock(folder, warnings_log):
    clock = FakeClock()
    cache = cache_at(folder, clock, memory_ttl=timedelta(seconds=60), max_age=timedelta(hours=1))
    cache.append_turn("keep", *make_turn(0, 2))
    cache.append_turn("old", *make_turn(0, 2))
    cache.pin("keep")
    clock.now += 59
    cache.token("old", 0)
    assert cache.status()["memory_hits"] == 1
    clock.now += 2  # memory entries are 61 s old: dropped, read again from disk
    check(cache.token("old", 1), 0, 2, 1)
    assert cache.status()["disk_hits"] == 1
    assert "old turn 0: expired" in warnings_log.text
    clock.now += 3601  # idle just over 3600 s since that read
    assert cache.evict() == ["old"]
    assert cache.token("old", 0) is None and cache.token("keep", 1) is not None
    assert [r["conv_id"] for r in cache.conversations()] == ["keep"]
    assert "idle for" in warnings_log.text


def test_pin_persists_and_delete_removes_everything(folder):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 2))
    assert cache.pin("c") and cache_at(folder).conversations()[0]["pinned"] is True
    assert cache.pin("c", pinned=False) and cache_at(folder).conversations()[0]["pinned"] is False
    row = cache.conversations()[0]
    assert row.keys() == {"conv_id", "tokens", "turns", "bytes", "pinned", "last_access", "created_at"}
    assert (row["tokens"], row["turns"]) == (2, 1) and row["bytes"] > TURN_BYTES(2)
    assert cache.delete("c") is True
    assert not (folder / "c").exists() and cache.token("c", 0) is None and cache.status()["memory_bytes"] == 0


# Concurrency -------------------------------------------------------------------------------------


def test_ten_threads_on_ten_conversations_never_cross_talk(folder):
    cache = cache_at(folder, memory_max_bytes=TURN_BYTES(5) * 12)  # small enough to force disk reads too
    errors: list[BaseException] = []

    def chat(n: int) -> None:
        try:
            for turn in range(4):
                assert cache.append_turn(f"conv-{n}", *make_turn(turn * 5, 5, tag=n)) == (turn * 5, turn * 5 + 5)
                for index in range(turn * 5 + 5):
                    check(cache.token(f"conv-{n}", index), index // 5 * 5, 5, index, tag=n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.status()["conversations"] == 10 and cache.status()["memory_bytes"] <= TURN_BYTES(5) * 12
    fresh = cache_at(folder)
    for n in range(10):
        for index in range(20):
            check(fresh.token(f"conv-{n}", index), index // 5 * 5, 5, index, tag=n)


def _append_from_process(directory: str, tag: int, turns: int, barrier) -> None:
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=directory)))
    barrier.wait(30)  # both processes append at the same time
    for turn in range(turns):
        count = 2 + (turn + tag) % 3
        start, end = cache.append_turn("shared", *make_turn(0, count, tag=tag * 100 + turn))
        assert end - start == count


def test_two_processes_appending_to_one_conversation_never_interleave(folder):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    procs = [context.Process(target=_append_from_process, args=(str(folder), tag, 6, barrier)) for tag in (1, 2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    manifest = read_entry(folder / "shared" / "conversation.json")
    turns = manifest["turns"]
    assert len(turns) == 12 and manifest["tokens"] == sum(t["count"] for t in turns)
    assert [t["start"] for t in turns] == list(np.cumsum([0] + [t["count"] for t in turns])[:-1])
    cache = cache_at(folder)
    seen = []
    for turn in turns:
        records = cache.tokens("shared", turn["start"], turn["start"] + turn["count"])
        tags = {int(r.token_id) // 100_000 for r in records}
        assert len(records) == turn["count"] and len(tags) == 1  # a turn is one process's turn, whole
        seen.append(tags.pop())
    for tag in (1, 2):
        assert [s for s in seen if s // 100 == tag] == [tag * 100 + t for t in range(6)]


# Damage and degradation --------------------------------------------------------------------------


def test_a_truncated_or_swapped_turn_file_is_a_warning_and_a_miss(folder, warnings_log):
    cache = cache_at(folder)
    for start in (0, 4, 8):
        cache.append_turn("c", *make_turn(start, 4))
    turn1, turn2 = folder / "c" / "turn-00001.safetensors", folder / "c" / "turn-00002.safetensors"
    turn1.write_bytes(turn1.read_bytes()[:-100])
    turn2.write_bytes((folder / "c" / "turn-00000.safetensors").read_bytes())  # same size, another turn's data
    fresh = cache_at(folder)
    assert fresh.token("c", 5) is None
    assert fresh.token("c", 9) is None
    check(fresh.token("c", 2), 0, 4, 2)
    assert "Cannot read cached turn" in warnings_log.text and "the manifest says" in warnings_log.text
    assert "content does not match the manifest" in warnings_log.text
    turn1.write_bytes(b"\xff" * 8 + b"{")  # a garbage header of any size: still no exception
    assert cache_at(folder, memory_max_bytes=0).token("c", 5) is None


def test_an_unwritable_directory_keeps_the_turn_in_memory(tmp_path, warnings_log):
    (tmp_path / "file").write_text("not a folder")
    cache = cache_at(tmp_path / "file" / "conversations")
    assert cache.append_turn("c", *make_turn(0, 3)) == (0, 3)
    assert cache.append_turn("c", *make_turn(3, 2)) == (3, 5)
    check(cache.token("c", 4), 3, 2, 4)
    assert cache.length("c") == 5 and cache.conversations()[0]["tokens"] == 5
    assert "keeping it in memory only" in warnings_log.text


def test_reads_never_unpickle(folder, monkeypatch):
    cache_at(folder).append_turn("c", *make_turn(0, 3))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on a read path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    fresh = cache_at(folder)
    check(fresh.token("c", 1), 0, 3, 1)  # disk
    check(fresh.token("c", 2), 0, 3, 2)  # memory
    assert fresh.conversations()[0]["tokens"] == 3 and fresh.status()["conversations"] == 1


# Configuration and codecs ------------------------------------------------------------------------


SEED_YAML = {
    "cache": {
        "memory": {"max_size_mb": 1024, "eviction_policy": "lru"},
        "disk": {"max_size_gb": 10, "directory": "./cache", "compression": "lz4"},
        "prefetch": {"enabled": True, "range": 5},
        "ttl": {"memory_minutes": 60, "disk_days": 7},
    }
}


def test_from_yaml_dict_reads_the_seed_block():
    config = TokenCacheConfig.from_yaml_dict(SEED_YAML)
    assert config == TokenCacheConfig(
        memory_max_bytes=2**30,
        disk_max_bytes=10 * 2**30,
        compression="lz4",
        prefetch_range=5,
        memory_ttl=timedelta(hours=1),
        cache=CacheConfig(folder="./cache", max_age=timedelta(days=7)),
    )
    off = TokenCacheConfig.from_yaml_dict({"prefetch": {"enabled": False}, "ttl": {"disk_days": None}})
    assert off.prefetch_range == 0 and off.resolved_cache.max_age is None and off.resolved_cache.folder is None
    assert config.resolved_cache.max_age == timedelta(days=7) and config.memory_ttl == timedelta(hours=1)
    with pytest.raises(ConfigError, match="max_size_tb"):
        TokenCacheConfig.from_yaml_dict({"cache": {"disk": {"max_size_tb": 1}}})
    with pytest.raises(ConfigError, match="brotli"):
        TokenCacheConfig(compression="brotli")


def test_default_directory_is_resolved_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "elsewhere"))
    cache = TokenCache(TokenCacheConfig())
    cache.append_turn("c", *make_turn(0, 1))
    assert (tmp_path / "elsewhere" / "conversations" / "c" / "turn-00000.safetensors").is_file()


def test_a_missing_codec_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "lz4", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'hf_cachehooks\[compression\]'"):
        cache_at(folder, compression="lz4")


def test_compressed_turns_round_trip(folder, monkeypatch):
    fake = types.ModuleType("zstandard")  # zlib stands in for zstd: this checks our plumbing, not the codec
    fake.ZstdCompressor = lambda level: types.SimpleNamespace(compress=zlib.compress)  # type: ignore[attr-defined]
    fake.ZstdDecompressor = lambda: types.SimpleNamespace(decompress=zlib.decompress)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zstandard", fake)
    cache = cache_at(folder, compression="zstd")
    cache.append_turn("c", *make_turn(0, 4))
    path = folder / "c" / "turn-00000.safetensors.zst"
    assert zlib.decompress(path.read_bytes())[8:9] == b"{"  # a compressed safetensors file
    check(cache_at(folder).token("c", 3), 0, 4, 3)
    check(cache_at(folder, memory_max_bytes=0).token("c", 1), 0, 4, 1)


# The entry contract: what a demanding user and an attacker try ----------------------------------


def reseal(path: Path, change) -> None:
    """Edit a sealed manifest and seal it again, as anyone can (the seal is an unkeyed hash)."""
    doc = unseal(path.read_bytes())
    change(doc)
    path.write_bytes(seal(doc))


def test_the_manifest_is_an_entry_listing_every_turn_and_lens_file(folder):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3))
    cache.append_turn("c", *make_turn(3, 2)[:2])
    cache.add_lens("c", 3, *make_turn(3, 2)[2:])
    opened = entry.open_entry(folder / "c" / "conversation.json", kind="conversation", check="hash")
    assert opened is not None and opened.doc["format"] == 3 and opened.doc["conv_id"] == "c"
    assert opened.key == {
        "kind": "conversation",
        "digest": opened.doc["uid"],
        "inputs": {"conv_id": "c", "uid": opened.doc["uid"]},
    }
    on_disk = {p.name for p in (folder / "c").iterdir() if not p.name.startswith(".")} - {"conversation.json"}
    assert (
        set(opened.files)
        == on_disk
        == {"turn-00000.safetensors", "lens-00000.safetensors", "turn-00001.safetensors", "lens-00001.safetensors"}
    )
    for name, record in opened.files.items():
        data = (folder / "c" / name).read_bytes()
        assert (record["bytes"], record["xxh3"]) == (len(data), hash_bytes(data))
    assert (folder / "CACHEDIR.TAG").is_file()


def test_an_old_format_manifest_is_a_miss(folder, warnings_log):
    cache_at(folder).append_turn("c", *make_turn(0, 3))
    reseal(folder / "c" / "conversation.json", lambda doc: doc.update(format=2))
    fresh = cache_at(folder)
    assert fresh.token("c", 0) is None and fresh.length("c") == 0 and fresh.conversations() == []


def flip_byte(path: Path, keep_times: bool = True) -> None:
    """Flip one byte in place and put size and mtime back, as `cp -p` or a bit rot would leave them."""
    st = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(st.st_size - 3)
        byte = handle.read(1)
        handle.seek(st.st_size - 3)
        handle.write(bytes([byte[0] ^ 0x01]))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_a_flipped_byte_in_a_turn_file_is_never_served(folder, warnings_log):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 4))
    flip_byte(folder / "c" / "turn-00000.safetensors")
    fresh = cache_at(folder)
    assert fresh.token("c", 3) is None and fresh.tokens("c", 0, 4) == []
    assert cache_at(folder, memory_max_bytes=0).token("c", 3) is None  # the rows-only read path too
    assert "turn-00000.safetensors: content does not match the manifest" in warnings_log.text


def test_a_flipped_byte_in_a_lens_file_is_never_served(folder, warnings_log):
    cache_at(folder).append_turn("c", *make_turn(0, 4))
    flip_byte(folder / "c" / "lens-00000.safetensors")
    for fresh in (cache_at(folder), cache_at(folder, memory_max_bytes=0)):
        record = fresh.token("c", 3)
        assert record.topk_ids is None and record.topk_probs is None  # recomputed by the chat server, not served
        np.testing.assert_array_equal(record.hidden, make_turn(0, 4)[1][3])
    assert "lens-00000.safetensors: content does not match the manifest" in warnings_log.text


def test_a_flipped_byte_in_a_big_turn_file_with_its_mtime_restored_is_never_served(folder, warnings_log):
    t, layers, hidden_size = 520, 4, 256  # a 1 MiB+ turn: checked by its stamp (inode, mtime, ctime), not hashed
    hidden = np.arange(t * layers * hidden_size, dtype=np.float16).reshape(t, layers, hidden_size)
    cache_at(folder).append_turn("big", np.arange(t), hidden)
    path = folder / "big" / "turn-00000.safetensors"
    assert path.stat().st_size >= entry.HASH_ALWAYS_BELOW
    np.testing.assert_array_equal(cache_at(folder).token("big", t - 1).hidden, hidden[-1])  # sound: served
    flip_byte(path)  # same size, same mtime; only st_ctime moved
    assert cache_at(folder).token("big", t - 1) is None
    assert "content does not match the manifest" in warnings_log.text


def make_conversations(folder: Path, ids=("a", "b"), tokens: int = 40) -> TokenCache:
    cache = cache_at(folder)
    for tag, conv_id in enumerate(ids):
        for start in range(0, tokens, 10):
            cache.append_turn(conv_id, *make_turn(start, 10, tag=tag))
    return cache


def swap_folders(folder: Path, a: str, b: str) -> None:
    (folder / a).rename(folder / "swap-tmp")
    (folder / b).rename(folder / a)
    (folder / "swap-tmp").rename(folder / b)


def test_swapped_conversation_folders_serve_nothing_from_the_wrong_conversation(folder, warnings_log):
    running = make_conversations(folder)
    swap_folders(folder, "a", "b")
    for cache in (running, cache_at(folder), cache_at(folder, memory_max_bytes=0)):
        for conv_id, tag in (("a", 0), ("b", 1)):
            served = [cache.token(conv_id, i) for i in range(40)] + cache.tokens(conv_id, 0, 40)
            assert not any(r is not None and r.token_id // 100_000 != tag for r in served)
        assert cache.conversations() == []
    fresh = cache_at(folder)
    assert [fresh.token(c, i) for c in ("a", "b") for i in range(40)] == [None] * 80
    assert fresh.length("a") == fresh.length("b") == 0 and len(fresh.token_ids("a")) == 0
    assert "it is the manifest of conversation 'b' (folders renamed or swapped?)" in warnings_log.text


def test_appending_to_or_deleting_a_swapped_folder_leaves_the_other_conversations_files_alone(folder, warnings_log):
    make_conversations(folder)
    swap_folders(folder, "a", "b")
    before = {p.name: p.read_bytes() for p in (folder / "a").iterdir()}  # conversation b's files
    cache = cache_at(folder)
    assert cache.append_turn("a", *make_turn(0, 3, tag=7)) == (0, 3)  # a new conversation "a", in memory only
    check(cache.token("a", 2), 0, 3, 2, tag=7)
    assert "holds conversation 'b'" in warnings_log.text
    assert cache.delete("a") is True and cache.token("a", 0) is None
    assert cache.evict() == []
    assert {p.name: p.read_bytes() for p in (folder / "a").iterdir()} == before


def test_a_turn_file_of_another_conversation_is_never_served(folder, warnings_log):
    make_conversations(folder, tokens=10)
    (folder / "a" / "turn-00000.safetensors").write_bytes((folder / "b" / "turn-00000.safetensors").read_bytes())
    assert cache_at(folder).token("a", 3) is None
    assert "content does not match the manifest" in warnings_log.text


# The model that wrote a conversation ------------------------------------------------------------------


def model_cache(folder: Path, model, tokenizer) -> TokenCache:
    return TokenCache(TokenCacheConfig(cache=CacheConfig(folder=folder)), model=model, tokenizer=tokenizer)


def test_another_model_of_the_same_shape_neither_serves_nor_continues_a_conversation(folder, warnings_log):
    """A chat server restarted with a fine-tune served the old model's hidden states and lens as its own (finding 6)."""
    from tests.conftest import make_llama, make_tokenizer

    tok = make_tokenizer()
    a = model_cache(folder, make_llama(seed=0), tok)
    a.append_turn("demo", *make_turn(0, 4))
    a.append_turn("demo", *make_turn(4, 2)[:2])  # its lens still pending: another model must not compute it
    b = model_cache(folder, make_llama(seed=1), tok)  # same architecture and tokenizer, other weights
    assert b.token("demo", 1) is None and b.tokens("demo", 0, 6) == [] and b.length("demo") == 0
    assert b.meta("demo") is None and b.turns("demo") == [] and b.turn_arrays("demo", 0) is None
    assert b.token_ids("demo").size == 0 and b.pending_lens() == []
    assert b.add_lens("demo", 4, *make_turn(4, 2)[2:]) is False
    reason = b.refusal("demo")
    assert "written by another model (model.weights" in reason  # names what differs
    assert "Start a new conversation id for another model" in reason
    assert reason in warnings_log.text  # a read says why it missed
    with pytest.raises(ConfigError, match=r"model\.weights.*Start a new conversation id for another model"):
        b.append_turn("demo", *make_turn(6, 2))
    again = model_cache(folder, make_llama(seed=0), tok)  # the model that wrote it: untouched, served
    assert again.refusal("demo") is None and again.length("demo") == 6 and again.pending_lens() == [("demo", 4, 6)]
    check(again.token("demo", 1), 0, 4, 1)
    assert [r["conv_id"] for r in b.conversations()] == ["demo"] and b.pin("demo")  # listed, managed
    other_template = model_cache(folder, make_llama(seed=0), make_tokenizer(chat_template="{{ messages }}"))
    assert "tokenizer.chat_template" in other_template.refusal("demo") and other_template.length("demo") == 0
    assert b.delete("demo") and not (folder / "demo").exists()


def test_a_conversation_that_records_no_model_is_not_taken_for_the_servers(folder):
    """Written before this version, or by a cache made without a model: never served as a model's own."""
    from tests.conftest import make_llama, make_tokenizer

    model, tok = make_llama(), make_tokenizer()
    cache_at(folder).append_turn("old", *make_turn(0, 3))
    served = model_cache(folder, model, tok)
    assert served.token("old", 0) is None and "stored without the identity" in served.refusal("old")
    with pytest.raises(ConfigError, match="Start a new conversation id for another model"):
        served.append_turn("old", *make_turn(3, 1))
    check(cache_at(folder).token("old", 0), 0, 3, 0)  # a cache without a model still reads it
    served.append_turn("new", *make_turn(0, 2))
    plain = cache_at(folder)
    check(plain.token("new", 1), 0, 2, 1)  # and reads a model's, but does not continue it
    with pytest.raises(ConfigError, match="pass model= and tokenizer= to TokenCache"):
        plain.append_turn("new", *make_turn(2, 1))
    assert unseal((folder / "new" / "conversation.json").read_bytes())["model"] == served.model_record


def test_a_manifest_rewritten_in_place_with_size_and_mtime_restored_is_read_again(folder):
    """The memo of one process must see it too, as a fresh TokenCache does (finding 17: ctime was not compared)."""
    import time

    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 4), meta={"note": "aaaa"})
    path = folder / "c" / "conversation.json"
    time.sleep(0.02)  # past the file system's tick, so the stamp can be remembered
    for _ in range(3):
        assert cache.meta("c")["note"] == "aaaa"  # remembered from the second read on
    before = path.stat()
    doc = unseal(path.read_bytes())
    doc["meta"]["note"] = "bbbb"
    raw = seal(doc)
    assert len(raw) == before.st_size
    with open(path, "r+b") as handle:  # in place: same inode, same size
        handle.write(raw)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert cache_at(folder).meta("c")["note"] == "bbbb"  # a fresh cache reads the new file
    assert cache.meta("c")["note"] == "bbbb"  # and so does the one that remembered the old one


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.update(turns="x"),
        lambda doc: doc.update(turns=[1]),
        lambda doc: doc.update(turns=[None]),
        lambda doc: doc.update(tokens="5"),
        lambda doc: doc.update(layers=None),
        lambda doc: doc.update(hidden_dtype="float64"),
        lambda doc: doc.update(pinned="yes"),
        lambda doc: doc.update(meta=[]),
        lambda doc: doc.update(k="4"),
        lambda doc: doc.update(files=[]),
        lambda doc: doc.update(key=None),
        lambda doc: doc.update(uid="another"),
        lambda doc: doc.update(last_access="soon"),
        lambda doc: doc["turns"][0].update(count=-1),
        lambda doc: doc["turns"][0].update(start=1),
        lambda doc: doc["turns"][0].update(file=["turn-00000.safetensors"]),
        lambda doc: doc["turns"][0].update(file="turn-00009.safetensors"),
        lambda doc: doc["turns"][0].update(bytes=10),
        lambda doc: doc["turns"][0].update(k=5),
        lambda doc: doc["turns"][0].update(compression="rar"),
        lambda doc: doc["files"].update({"turn-00000.safetensors": "x"}),
        lambda doc: doc.pop("hidden"),
    ],
    ids=lambda _: "",
)
def test_a_resealed_manifest_of_the_wrong_shape_is_a_miss_not_a_crash(folder, warnings_log, change):
    cache_at(folder).append_turn("c", *make_turn(0, 4))
    reseal(folder / "c" / "conversation.json", change)
    fresh = cache_at(folder)
    assert fresh.token("c", 1) is None and fresh.tokens("c", 0, 4) == [] and fresh.length("c") == 0
    assert fresh.turns("c") == [] and fresh.meta("c") is None and fresh.conversations() == []
    assert fresh.turn_arrays("c", 0) is None and fresh.pending_lens() == [] and fresh.evict() == []
    assert fresh.status()["conversations"] == 0 and fresh.pin("c") is False
    assert "is not served as conversation c" in warnings_log.text


@pytest.mark.parametrize(
    "name", ["../../victim.safetensors", "/abs/victim.safetensors", "sub/victim.safetensors", ".hidden.safetensors"]
)
def test_a_traversal_name_in_a_resealed_manifest_is_neither_read_nor_deleted(folder, warnings_log, name):
    cache_at(folder).append_turn("c", *make_turn(0, 4))
    conv = folder / "c"
    good = (conv / "turn-00000.safetensors").read_bytes()
    target = (conv / name) if not name.startswith("/") else Path(name)
    victim = folder.parent / "victim.safetensors"
    victim.write_bytes(good)  # the real turn's bytes: served if the name were followed
    if name == "../../victim.safetensors":
        assert target.resolve() == victim.resolve()

    def point_at(doc: dict) -> None:
        doc["files"][name] = doc["files"].pop("turn-00000.safetensors")
        doc["turns"][0]["file"] = name

    reseal(conv / "conversation.json", point_at)
    assert cache_at(folder).token("c", 1) is None
    assert "is not a plain name inside the entry's folder" in warnings_log.text
    assert cache_at(folder).delete("c") is True  # the damaged manifest goes, and nothing it names
    assert victim.read_bytes() == good and (conv / "turn-00000.safetensors").read_bytes() == good
    assert not (conv / "conversation.json").exists()


def test_delete_and_eviction_remove_only_the_files_the_manifest_lists(folder):
    clock = FakeClock()
    cache = cache_at(folder, clock=clock, max_age=timedelta(seconds=60))
    for conv_id in ("c", "d"):
        cache.append_turn(conv_id, *make_turn(0, 3))
        cache.append_turn(conv_id, *make_turn(3, 2))
        (folder / conv_id / "notes.txt").write_text("mine")  # a user's file in the conversation's folder
        (folder / conv_id / "turn-00099.safetensors").write_bytes(b"not listed")
    cache.token("c", 0)
    assert cache.delete("c") is True
    clock.now += 61
    assert cache.evict() == ["d"]
    for conv_id in ("c", "d"):
        assert sorted(p.name for p in (folder / conv_id).iterdir()) == ["notes.txt", "turn-00099.safetensors"]
        assert cache.token(conv_id, 0) is None
    cache.append_turn("e", *make_turn(0, 3))
    assert cache.delete("e") is True and not (folder / "e").exists()  # nothing else there: the folder goes too


def test_delete_leaves_nothing_of_a_conversation_that_was_on_disk_before_a_write_failed(folder, monkeypatch):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3))
    monkeypatch.setattr(entry, "atomic_write", enospc)
    cache.append_turn("c", *make_turn(3, 2))  # memory only from now on
    monkeypatch.undo()
    assert cache.delete("c") is True and not (folder / "c").exists()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_keeps_the_turn_in_memory(folder, warnings_log, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", enospc)  # every atomic write: turn, lens, manifest, tag
    cache = cache_at(folder)
    assert cache.append_turn("c", *make_turn(0, 3)) == (0, 3)
    assert cache.append_turn("c", *make_turn(3, 2)) == (3, 5)
    check(cache.token("c", 4), 3, 2, 4)
    check(cache.token("c", 1), 0, 3, 1)
    assert cache.length("c") == 5 and "keeping it in memory only" in warnings_log.text
    assert "No space left on device" in warnings_log.text
    left = [p.name for p in folder.rglob("*") if p.is_file()]
    assert not any(
        n.endswith(".safetensors") or n == "conversation.json" or "tmp" in n or n.endswith(".lock") for n in left
    ), left


def test_a_lens_the_disk_refuses_stays_in_memory(folder, warnings_log, monkeypatch):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3)[:2])
    monkeypatch.setattr(entry, "atomic_write", enospc)
    assert cache.add_lens("c", 0, *make_turn(0, 3)[2:]) is True
    monkeypatch.undo()
    check(cache.token("c", 1), 0, 3, 1)  # served from memory with its lens
    assert "Cannot write the lens of turn 0 of conversation c" in warnings_log.text
    assert cache_at(folder).pending_lens() == [("c", 0, 3)]  # the disk still waits for it


def test_a_memory_only_turn_gets_its_lens_in_memory(folder, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", enospc)
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3)[:2])
    assert cache.pending_lens() == [("c", 0, 3)]
    assert cache.add_lens("c", 0, *make_turn(0, 3)[2:]) is True
    check(cache.token("c", 2), 0, 3, 2)
    assert cache.pending_lens() == [] and cache.turns("c")[0]["k"] == K


@pytest.mark.parametrize("bf16", [False, True])
def test_turn_nbytes_is_what_reading_the_whole_turn_holds(folder, bf16):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3, bf16=bf16)[:2])  # turn 0: no lens yet
    cache.append_turn("c", *make_turn(3, 2, bf16=bf16))  # turn 1: with its lens
    cache.append_turn("c", *make_turn(5, 4, bf16=bf16)[:2])
    cache.add_lens("c", 5, *make_turn(5, 4)[2:], stats=np.zeros((4, L, len(STATS)), np.float32))  # turn 2: and stats
    doc = read_entry(folder / "c" / "conversation.json")
    for turn_no in range(3):
        arrays = read_turn(folder / "c", doc, turn_no, None)
        assert turn_nbytes(doc, turn_no) == sum(a.nbytes for a in arrays.values())
    assert turn_nbytes(doc, 1) == TURN_BYTES(2)


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 256 KiB tmpfs filled to the last byte (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount / "conversations").mkdir()
        with open(mount / "filler", "wb", buffering=0) as handle, pytest.raises(OSError, match="No space left"):
            while True:
                handle.write(b"\0" * 4096)
        yield mount / "conversations"
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_keeps_the_turn_in_memory_and_leaves_no_lock(full_tmpfs, warnings_log):
    cache = cache_at(full_tmpfs)
    assert cache.append_turn("c", *make_turn(0, 3)) == (0, 3)  # the lease, then the data writes: all ENOSPC
    check(cache.token("c", 2), 0, 3, 2)
    assert "keeping it in memory only" in warnings_log.text
    assert not list(full_tmpfs.rglob("*.lock")) and not list(full_tmpfs.rglob("*.safetensors"))
    assert cache.append_turn("c", *make_turn(3, 2)) == (3, 5)  # no stale lock stalls the next append
