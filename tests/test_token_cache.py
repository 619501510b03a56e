"""Conversation token cache: two tiers, eviction, TTLs, concurrency, corruption (hf_cachehooks/token_cache.py)."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import sys
import threading
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

from hf_cachehooks import memory_tier, token_cache
from hf_cachehooks.errors import ConfigError, MissingDependencyError
from hf_cachehooks.store import read_entry
from hf_cachehooks.token_cache import TokenCache, TokenCacheConfig, validate_conv_id

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
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    return caplog


def cache_at(folder: Path, clock=None, **options) -> TokenCache:
    config = TokenCacheConfig(directory=str(folder), **options)
    return TokenCache(config) if clock is None else TokenCache(config, clock=clock)


# Round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_multi_turn_round_trip_keeps_global_indices_and_each_tokens_own_arrays(folder, bf16):
    cache = cache_at(folder)
    turns = [(0, 4), (4, 1), (5, 6)]
    for start, count in turns:
        assert cache.append_turn("chat-1", *make_turn(start, count, bf16=bf16), meta={"model": "tiny"}) == (
            start, start + count)
    assert cache.length("chat-1") == 11
    for index in range(11):
        start, count = next(t for t in turns if t[0] <= index < t[0] + t[1])
        record = cache.token("chat-1", index)
        check(record, start, count, index, bf16=bf16)
        assert record.hidden_dtype == ("bfloat16" if bf16 else "float16")
    manifest = read_entry(folder / "chat-1" / "conversation.json")
    assert [(t["start"], t["count"], t["file"]) for t in manifest["turns"]] == [
        (0, 4, "turn-00000.safetensors"), (4, 1, "turn-00001.safetensors"), (5, 6, "turn-00002.safetensors")]
    assert (manifest["layers"], manifest["hidden"], manifest["k"]) == (L, H, K)
    assert manifest["meta"] == {"model": "tiny", "hidden_dtype": "bfloat16" if bf16 else "float16"}


def test_turn_files_are_plain_safetensors(folder):
    from safetensors.numpy import load_file

    cache_at(folder).append_turn("c", *make_turn(0, 3))
    loaded = load_file(folder / "c" / "turn-00000.safetensors") | load_file(folder / "c" / "lens-00000.safetensors")
    assert {k: v.shape for k, v in loaded.items()} == {
        "token_ids": (3,), "hidden": (3, L, H), "topk_ids": (3, L, K), "topk_probs": (3, L, K)}


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


def test_a_lens_file_from_another_turn_is_a_miss_not_a_wrong_answer(folder, warnings_log):
    cache = cache_at(folder)
    cache.append_turn("c", *make_turn(0, 3))
    cache.append_turn("c", *make_turn(3, 3))
    lens0, lens1 = folder / "c" / "lens-00000.safetensors", folder / "c" / "lens-00001.safetensors"
    lens1.write_bytes(lens0.read_bytes())  # same size, the other turn's predictions
    assert cache_at(folder).token("c", 4) is None
    assert "another conversation or turn" in warnings_log.text


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
    calls = [lambda: cache.append_turn(bad, *make_turn(0, 1)), lambda: cache.token(bad, 0),
             lambda: cache.tokens(bad, 0, 2), lambda: cache.length(bad), lambda: cache.pin(bad),
             lambda: cache.delete(bad)]
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
    for n in range(3, 12):
        cache.append_turn("c", *make_turn(n * 10, 10))
        assert cache.status()["memory_bytes"] <= cache.status()["memory_limit"]


def test_memory_tier_holds_a_bounded_number_of_turns(folder, monkeypatch):
    monkeypatch.setattr(memory_tier, "_MAX_TURNS", 3)  # mapped turns hold file descriptors
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
    real = token_cache._read_turn
    monkeypatch.setattr(token_cache, "_read_turn", lambda *a: reads.append(a[2:]) or real(*a))
    records = cache.tokens("c", 2, 11)
    assert [r.index for r in records] == list(range(2, 11)) and reads == [(0, slice(2, 4)), (1, slice(0, 4)),
                                                                           (2, slice(0, 3))]
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
    cache = cache_at(folder, clock, memory_ttl_seconds=60, disk_ttl_seconds=3600)
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
    cache = TokenCache(TokenCacheConfig(directory=directory))
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
    assert "Cannot read cached turn" in warnings_log.text and "another conversation or turn" in warnings_log.text
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


SEED_YAML = {"cache": {
    "memory": {"max_size_mb": 1024, "eviction_policy": "lru"},
    "disk": {"max_size_gb": 10, "directory": "./cache", "compression": "lz4"},
    "prefetch": {"enabled": True, "range": 5},
    "ttl": {"memory_minutes": 60, "disk_days": 7},
}}


def test_from_yaml_dict_reads_the_seed_block():
    config = TokenCacheConfig.from_yaml_dict(SEED_YAML)
    assert config == TokenCacheConfig(memory_max_bytes=2**30, disk_max_bytes=10 * 2**30, directory="./cache",
                                      compression="lz4", prefetch_range=5, memory_ttl_seconds=3600,
                                      disk_ttl_seconds=7 * 86400)
    off = TokenCacheConfig.from_yaml_dict({"prefetch": {"enabled": False}, "ttl": {"disk_days": None}})
    assert off.prefetch_range == 0 and off.disk_ttl_seconds is None and off.directory is None
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
