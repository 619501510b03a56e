"""Sealed entries, atomic writes and cache-root resolution (hf_cachehooks/_core/store.py)."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from hf_cachehooks._core import store
from hf_cachehooks._core.store import cache_root, read_entry, seal, tag_folder, unseal, write_entry
from hf_cachehooks.errors import CorruptEntryError

DOC = {
    "metadata": {"model_name": "org/tiny", "dataset_size": 3, "created_at": 1_700_000_000.5},
    "predictions": ["paris", "4", "blue ü ✓"],
    "references": [["paris"], ["four", "4"], ["blue"]],
    "metrics": {"exact_match": 0.6666666666666666},
    "nested": {"a": [1, 2.5, None, True], "b": {}},
}


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    return caplog


# Seal / unseal -----------------------------------------------------------------------------------


def test_seal_unseal_round_trip():
    raw = seal(DOC)
    assert unseal(raw) == DOC
    # Still human-readable JSON whose last field is the checksum.
    parsed = orjson.loads(raw)
    assert list(parsed)[-1] == "checksum"
    assert len(parsed["checksum"]) == 32
    assert raw.startswith(b"{\n  ") and raw.endswith(b"\n}\n")


def test_seal_is_deterministic_and_content_sensitive():
    assert seal(DOC) == seal(dict(DOC))
    other = {**DOC, "metrics": {"exact_match": 0.5}}
    assert orjson.loads(seal(other))["checksum"] != orjson.loads(seal(DOC))["checksum"]


@pytest.mark.parametrize("mask", [0x01, 0x20, 0x80])
def test_flipping_any_single_byte_is_detected(mask):
    raw = seal(DOC)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= mask
        with pytest.raises(CorruptEntryError):
            unseal(bytes(bad))


def test_flipping_a_value_byte_reports_checksum_mismatch():
    raw = seal(DOC)
    i = raw.index(b"paris")
    bad = raw[:i] + b"P" + raw[i + 1 :]
    with pytest.raises(CorruptEntryError, match="checksum mismatch"):
        unseal(bad)


def test_every_truncation_is_detected():
    raw = seal(DOC)
    # Every cut that loses content; dropping only the final newline leaves identical JSON.
    for cut in range(len(raw) - 1):
        with pytest.raises(CorruptEntryError):
            unseal(raw[:cut])


@pytest.mark.parametrize("tail", [b"x", b"}", b'{"a": 1}', b"\x00", seal({"other": 1})])
def test_appending_bytes_is_detected(tail):
    with pytest.raises(CorruptEntryError):
        unseal(seal(DOC) + tail)


def test_field_inserted_after_checksum_is_detected():
    raw = seal(DOC)
    assert raw.endswith(b'"\n}\n')
    edited = raw[:-3] + b',\n  "metrics": {"exact_match": 1.0}\n}\n'
    with pytest.raises(CorruptEntryError):
        unseal(edited)


def test_empty_doc_round_trips():
    assert unseal(seal({})) == {}


def test_unseal_rejects_plain_json_without_checksum():
    with pytest.raises(CorruptEntryError, match="no checksum"):
        unseal(orjson.dumps(DOC, option=orjson.OPT_INDENT_2))


# read_entry / write_entry ------------------------------------------------------------------------


def test_write_then_read_entry(tmp_path):
    path = tmp_path / "deep" / "er" / "entry.json"
    assert write_entry(path, DOC) is True
    assert read_entry(path) == DOC
    assert path.read_bytes() == seal(DOC)
    # No temp file is left next to the entry.
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json"]


def test_write_entry_replaces_existing(tmp_path):
    path = tmp_path / "entry.json"
    assert write_entry(path, {"v": 1})
    assert write_entry(path, {"v": 2})
    assert read_entry(path) == {"v": 2}


def test_read_entry_missing_file_is_none(tmp_path, warnings_log):
    assert read_entry(tmp_path / "nope.json") is None
    assert not warnings_log.records


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "garbage"])
def test_read_entry_on_corrupt_file_warns_removes_and_misses(tmp_path, warnings_log, damage):
    path = tmp_path / "entry.json"
    assert write_entry(path, DOC)
    raw = path.read_bytes()
    if damage == "flip":
        i = raw.index(b"blue")
        raw = raw[:i] + b"B" + raw[i + 1 :]
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "append":
        raw = raw + b"trailing junk"
    else:
        raw = b"\x00\xff not json at all"
    path.write_bytes(raw)

    assert read_entry(path) is None
    assert not path.exists()
    warnings = [r for r in warnings_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Corrupt cache entry" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()


def test_read_entry_on_unreadable_path_warns_and_misses(tmp_path, warnings_log):
    folder = tmp_path / "is_a_dir.json"
    folder.mkdir()
    assert read_entry(folder) is None
    assert folder.is_dir()  # not removed: it was unreadable, not corrupt
    assert any("Cannot read cache entry" in r.getMessage() for r in warnings_log.records)


def test_write_entry_under_a_regular_file_returns_false(tmp_path, warnings_log):
    afile = tmp_path / "afile"
    afile.write_text("I am a file, not a folder")
    assert write_entry(afile / "x.json", DOC) is False
    assert afile.read_text() == "I am a file, not a folder"
    assert any(
        "Cannot write cache entry" in r.getMessage() and "x.json" in r.getMessage() for r in warnings_log.records
    )


def test_write_entry_under_proc_returns_false(warnings_log):
    target = Path("/proc/hf_cachehooks_ro/x.json")
    assert write_entry(target, DOC) is False
    assert not target.exists()
    assert any("Cannot write cache entry" in r.getMessage() for r in warnings_log.records)


def test_write_entry_failure_leaves_no_temp_file(tmp_path, monkeypatch, warnings_log):
    path = tmp_path / "entry.json"
    assert write_entry(path, {"v": 1})

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "replace", boom)
    assert write_entry(path, {"v": 2}) is False
    assert read_entry(path) == {"v": 1}  # old entry intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.json"]


# cache_root --------------------------------------------------------------------------------------


def test_cache_root_explicit_argument_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "from_env"))
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert cache_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_cache_root_env_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "one"))
    assert cache_root() == tmp_path / "one"
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "two"))
    assert cache_root() == tmp_path / "two"
    assert cache_root(None) == tmp_path / "two"


def test_cache_root_default_when_env_unset_or_empty(monkeypatch):
    monkeypatch.delenv("HF_CACHEHOOKS_HOME", raising=False)
    assert cache_root() == Path("outputs/cache")
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", "")
    assert cache_root() == Path("outputs/cache")


# tag_folder --------------------------------------------------------------------------------------


def test_tag_folder_writes_cachedir_tag(tmp_path):
    folder = tmp_path / "new" / "cache"
    tag_folder(folder)
    tag = folder / "CACHEDIR.TAG"
    # https://bford.info/cachedir/: the file must start with this exact signature.
    assert tag.read_bytes().startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    tag.write_bytes(tag.read_bytes() + b"# kept\n")
    tag_folder(folder)  # idempotent: an existing tag is left alone
    assert tag.read_bytes().endswith(b"# kept\n")


def test_tag_folder_unwritable_is_a_warning(tmp_path, warnings_log):
    afile = tmp_path / "afile"
    afile.write_text("x")
    tag_folder(afile / "cache")  # must not raise
    assert any("not writable" in r.getMessage() for r in warnings_log.records)


# Crash safety ------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from hf_cachehooks._core.store import write_entry

    path, n_items = Path(sys.argv[1]), int(sys.argv[2])
    pad = "x" * 80
    counter = int(sys.argv[3])
    print("ready", flush=True)
    while True:
        counter += 1
        write_entry(path, {"counter": counter, "items": [{"n": counter, "pad": pad} for _ in range(n_items)]})
    """
)


@pytest.mark.slow
def test_sigkilled_writer_never_leaves_a_partial_entry(tmp_path, caplog):
    """A writer killed at a random moment leaves the old entry, the new one, or nothing: never half."""
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    path = tmp_path / "shared" / "entry.json"
    n_items = 20_000  # ~2.5 MB sealed
    rng = random.Random(1234)
    kills, interrupted, last_counter, seen_docs = 0, 0, 0, 0
    # 20 kills; keep going (up to 100) until at least one kill landed inside a write, so the test
    # is known to have exercised the dangerous window.
    while kills < 20 or (interrupted == 0 and kills < 100):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(n_items), str(last_counter)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout.readline().strip() == "ready"
            # The first iterations wait long enough for at least one full write, later ones vary.
            delay = 0.15 if kills < 2 else rng.uniform(0.0, 0.12)
            time.sleep(delay)
            assert child.poll() is None, "writer exited on its own"
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        kills += 1

        temps = list(path.parent.glob(".entry.json.*.hfch-tmp")) if path.parent.exists() else []
        if temps:
            interrupted += 1
            for temp in temps:
                temp.unlink()

        if path.exists():
            raw = path.read_bytes()
            try:
                unseal(raw)
            except CorruptEntryError as exc:
                pytest.fail(f"kill #{kills} left a partial entry ({len(raw)} bytes): {exc}")
        doc = read_entry(path)
        if doc is None:
            assert not path.exists()
            continue
        seen_docs += 1
        assert set(doc) == {"counter", "items"}
        assert len(doc["items"]) == n_items
        assert {item["n"] for item in doc["items"]} == {doc["counter"]}
        assert doc["counter"] >= last_counter  # never goes back to an older version
        last_counter = doc["counter"]

    assert interrupted >= 1, "no kill landed inside a write; the test proved nothing"
    assert seen_docs >= kills - 2  # after the first full write the entry is always there
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a partial entry was read"
