"""The entry contract itself (hf_cachehooks/_core/entry.py): commit, open, checks, removal."""

from __future__ import annotations

import logging
import os
import time

import pytest

from hf_cachehooks._core import entry, heads
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import seal, unseal
from hf_cachehooks.errors import CorruptEntryError

KEY = make_key("test", {"a": 1})
BIG = entry.HASH_ALWAYS_BELOW + 4096


def _make(folder, big: bytes = b"x" * BIG, small: bytes = b"small", **fields):
    files = {
        "big.bin": entry.write_file(folder, "big.bin", big),
        "small.txt": entry.write_file(folder, "small.txt", small),
    }
    assert entry.commit(folder / "m.json", "test", KEY, files, fields)
    return folder / "m.json"


def test_manifest_schema_starts_with_the_mark_and_lists_every_file(tmp_path):
    path = _make(tmp_path, extra=5)
    raw = path.read_bytes()
    assert raw.startswith(entry.MARK) and entry.is_entry_file(path)
    doc = unseal(raw)
    assert list(doc)[:7] == ["hf_cachehooks_entry", "kind", "summary", "key", "created_at", "writer", "files"]
    assert doc["summary"] == {
        "model": "-",
        "items": 0,
        "bytes": BIG + 5,
        "created": doc["created_at"],
        "last_used": doc["created_at"],
    }  # a kind without a summary function: reserved fields
    assert doc["key"] == {"kind": "test", "digest": KEY.digest, "inputs": {"a": 1}}
    assert doc["writer"]["pid"] == os.getpid() and doc["extra"] == 5
    assert doc["files"]["big.bin"]["bytes"] == BIG and doc["files"]["small.txt"]["bytes"] == 5
    assert doc["files"]["big.bin"]["stamp"] and "stamp" not in doc["files"]["small.txt"]  # small: always hashed


def test_open_checks_kind_digest_and_expiry(tmp_path, caplog):
    path = _make(tmp_path)
    assert entry.open_entry(path, kind="test", digest=KEY.digest).doc["files"]
    assert entry.open_entry(path, kind="other") is None
    assert entry.open_entry(path, digest="0" * 32) is None
    later = time.time() + 3 * 86400
    assert entry.open_entry(path, max_age_days=2, now=later) is None
    assert entry.open_entry(path, max_age_days=4, now=later) is not None
    assert path.exists()  # another kind, key or an expired entry is left alone


@pytest.mark.parametrize("target", ["big.bin", "small.txt"])
def test_a_flipped_byte_with_mtime_restored_is_noticed(tmp_path, caplog, target):
    path = _make(tmp_path)
    data = tmp_path / target
    st = os.stat(data)
    with open(data, "r+b") as handle:
        handle.seek(st.st_size // 2)
        handle.write(b"Y")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    assert entry.open_entry(path) is None
    assert "content does not match" in caplog.text
    assert not path.exists()  # the entry is gone ...
    assert data.exists()  # ... but a file that no longer holds what was recorded is kept: it may be the user's


def test_a_copied_entry_is_hashed_once_then_trusted(tmp_path, monkeypatch):
    path = _make(tmp_path)
    big = tmp_path / "big.bin"
    big.write_bytes(big.read_bytes())  # same bytes, new stamp (a copy from another machine)
    calls = []
    real = entry.hash_file
    monkeypatch.setattr(entry, "hash_file", lambda p: calls.append(p.name) or real(p))
    time.sleep(0.03)  # past the file-time tick, so the new stamp may be remembered
    assert entry.open_entry(path) is not None
    assert entry.open_entry(path) is not None
    assert calls.count("big.bin") == 1 and calls.count("small.txt") == 2


def test_size_and_hash_checks(tmp_path):
    path = _make(tmp_path)
    with open(tmp_path / "big.bin", "ab") as handle:
        handle.write(b"!")
    assert "bytes, the manifest says" in entry.inspect(path, check="size")[1]
    path = _make(tmp_path / "b")
    assert entry.inspect(path, check="hash")[0] is not None
    with pytest.raises(ValueError):
        entry.inspect(path, check="fast")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", ".hidden", "..", "", "a\\b", "a\0b", 7, None])
def test_only_plain_names_are_allowed(name):
    with pytest.raises(CorruptEntryError):
        entry.check_name(name)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(key=None),
        lambda d: d.update(files=[]),
        lambda d: d.update(created_at="x"),
        lambda d: d.update(kind=3),
        lambda d: d.pop("hf_cachehooks_entry"),
        lambda d: d["files"].update(x=[1]),
        lambda d: d["files"].update({"../../victim.txt": {"bytes": 3, "xxh3": "0" * 32}}),
    ],
)
def test_a_resealed_manifest_of_the_wrong_shape_is_corrupt(tmp_path, change, caplog):
    victim = tmp_path / "victim.txt"
    victim.write_text("abc")
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    path = _make(folder)
    doc = unseal(path.read_bytes())
    change(doc)
    path.write_bytes(seal(doc))
    found, problem = entry.inspect(path)
    assert found is None and problem
    assert entry.open_entry(path) is None  # a warning and a miss, never an exception
    assert victim.read_text() == "abc"


def test_a_linked_file_is_never_followed(tmp_path):
    path = _make(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_bytes(b"small")
    (tmp_path / "small.txt").unlink()
    (tmp_path / "small.txt").symlink_to(outside)
    assert "not a regular file" in entry.inspect(path)[1]
    entry.remove_entry(path)
    assert outside.read_bytes() == b"small"


def test_remove_deletes_only_listed_files_and_own_bookkeeping(tmp_path):
    path = _make(tmp_path)
    (tmp_path / "user-notes.txt").write_text("mine")
    (tmp_path / ".last_access").write_bytes(b"")
    freed = entry.remove_entry(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user-notes.txt"]
    assert freed >= BIG + 5


def test_remove_of_an_emptied_folder_removes_the_folder(tmp_path):
    path = _make(tmp_path / "entry")
    entry.remove_entry(path)
    assert not (tmp_path / "entry").exists()


def test_commit_to_an_unwritable_place_is_false(tmp_path, caplog):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert entry.commit(afile / "m.json", "test", KEY) is False
    assert "continuing without caching" in caplog.text


def test_stamps_are_taken_after_the_file_time_tick(tmp_path):
    started = time.time_ns()
    path = _make(tmp_path)
    doc = unseal(path.read_bytes())
    ctime = doc["files"]["big.bin"]["stamp"][2]
    waited = time.time_ns() - ctime  # commit returns only once the data file's time tick has passed
    assert ctime >= started - entry._RACY_NS and waited >= entry._RACY_NS  # the stamp is of the file just made
    assert path.stat().st_mtime_ns - ctime >= entry._RACY_NS - 5_000_000


def test_read_head_gives_kind_and_key_without_the_body(tmp_path):
    key = make_key("predictions", {"model": {"name": "m", "weights": "w" * 32}, "gen": {"n": 1}, "nested": {}})
    path = tmp_path / "run.json"
    big = ["prediction " * 40] * 2000  # the body is far past the head that is read
    assert entry.commit(path, "predictions", key, fields={"predictions": big})
    expected = ("predictions", {"kind": key.kind, "digest": key.digest, "inputs": key.inputs})
    assert heads.read_head(path) == expected
    huge = make_key("predictions", {"model": {"name": "x" * 20_000}})  # a key larger than the head
    assert entry.commit(path, "predictions", huge, fields={"predictions": big})
    assert heads.read_head(path)[1]["inputs"] == huge.inputs
    # another layout (compact JSON, still sealed) is parsed whole; a file that is no entry is None
    doc = entry.manifest_doc("last-miss", key, {}, {"reason": "r"}, 1.0)
    path.write_bytes(seal(doc).replace(b'\n  "key": ', b'\n  "key":'))
    assert heads.read_head(path) is None  # the seal no longer matches: not readable as an entry
    (tmp_path / "other.json").write_bytes(b'{"a": 1}')
    assert heads.read_head(tmp_path / "other.json") is None
    assert heads.read_head(tmp_path / "missing.json") is None


def test_reuse_parses_an_unchanged_manifest_once_and_sees_any_rewrite(tmp_path, monkeypatch, caplog):
    from tests.conftest import rewrite_in_place

    key = make_key("identity", {"files": "f"})
    path = tmp_path / "memo.json"
    assert entry.commit(path, "identity", key, fields={"identity": {"model": {"name": "a"}}})
    monkeypatch.setattr(entry, "_RACY_NS", 0)  # the file-time tick has passed (tests do not sleep)
    once = entry.open_entry(path, kind="identity", reuse=True)  # a first read only notes the stamp
    first = entry.open_entry(path, kind="identity", reuse=True)  # the second is remembered, and shared
    assert not once.shared and first.shared and first.doc is not once.doc
    parsed = []
    monkeypatch.setattr(entry, "unseal", lambda raw: parsed.append(raw) or unseal(raw))
    again = entry.open_entry(path, kind="identity", reuse=True)
    assert again.doc is first.doc and again.shared and parsed == []  # unchanged: not read again
    raw = path.read_bytes()
    rewrite_in_place(path, raw.replace(b'"a"', b'"b"'))  # same size, same mtime: only ctime moves
    with caplog.at_level(logging.WARNING):
        assert entry.open_entry(path, kind="identity", reuse=True) is None  # re-read: the seal no longer fits
    assert parsed and "Corrupt cache entry" in caplog.text
    assert entry.commit(path, "identity", key, fields={"identity": {"model": {"name": "c"}}})
    assert entry.open_entry(path, kind="identity", reuse=True).doc["identity"]["model"]["name"] == "c"
