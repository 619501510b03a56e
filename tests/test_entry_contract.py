"""The one entry contract, over all four caches built through their public API (hf_cachehooks/_core/entry.py).

Each kind is built for real (predictions through `evaluate_model`, generations through `GenerationCache`,
an activation store through `cache_activations`, a conversation through `TokenCache`), then: `ls` size
equals the bytes on disk, `verify` finds 0 problems, a flipped byte or a swapped file in any data file is
never served, a traversal name is refused, and `prune` / `clear` leave nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hf_cachehooks import cli, management
from hf_cachehooks._core.entry import inspect
from hf_cachehooks._core.store import seal, unseal
from tests.conftest import make_llama, make_tokenizer

ROWS = [
    {"question": q, "answer": a}
    for q, a in [
        ("what is the capital of france ?", "paris"),
        ("what is two plus two ?", "four"),
        ("what color is the sky ?", "blue"),
        ("is the sky green ?", "no"),
    ]
]
TEXTS = [{"text": "what is the sky", "label": i % 2} for i in range(6)]
LEFTOVER_OK = {"CACHEDIR.TAG"}  # the only file a cleared cache keeps


class Fixed:
    """A generation backend that answers from a table and counts its calls (deterministic, fast)."""

    name = "fixed"

    def __init__(self) -> None:
        self.asked = 0

    def render(self, prompts):
        return [f"Q: {p}\nA:" for p in prompts]

    def complete(self, prompts, sampling):
        self.asked += len(prompts)
        return [f" answer to {p}" for p in prompts]


def _equal(served, good) -> bool:
    return served == good


def _equal_or_missing(served, good) -> bool:
    """A conversation cannot be recomputed: a damaged token (or its lens) may be missing, never wrong."""
    return len(served) == len(good) and all(
        s is None or all(a is None or a == b for a, b in zip(s, g)) for s, g in zip(served, good)
    )


@dataclass
class Kind:
    """How to build one cache kind, read it back through its public API, and where it lives."""

    name: str
    folder: str  # top folder under the cache root
    build: Any  # (root, tiny) -> None
    read: Any  # (root, tiny) -> the served data, comparable with ==; must never be corrupt data
    main_manifest: Any  # root -> the manifest whose files a test breaks
    ok: Any = _equal  # (served after damage, served before) -> True when nothing wrong was served


def _tiny():
    return make_llama(), make_tokenizer()


def _eval(root, tiny):
    from hf_cachehooks import EvalConfig, evaluate_model

    model, tok = tiny
    result = evaluate_model(model, ROWS, EvalConfig(max_new_tokens=3, batch_size=2), tokenizer=tok)
    return result.predictions


def _generate(root, tiny):
    from hf_cachehooks import GenerationCache

    gens = GenerationCache("org/Tiny", chunk_size=2).generate(
        [r["question"] for r in ROWS], Fixed(), prompt_name="p", temperature=0.0, max_tokens=3
    )
    return gens.completions, gens.full_texts


def _activations(root, tiny):
    from hf_cachehooks import cache_activations

    model, tok = tiny
    store = cache_activations(model, tok, TEXTS, root / "activations" / "run1", [1, 2], progress=False, shard_size=2)
    return [store.numpy(1).tolist(), store.numpy(2).tolist(), store.column("label")]


def _turn(n: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int32) + seed
    hidden = rng.standard_normal((n, 3, 16)).astype(np.float16)
    topk = rng.integers(0, 64, (n, 3, 4)).astype(np.int32)
    probs = rng.random((n, 3, 4)).astype(np.float16)
    return ids, hidden, topk, probs


def _conversation_build(root, tiny):
    from hf_cachehooks import TokenCache, TokenCacheConfig

    cache = TokenCache(TokenCacheConfig())
    cache.append_turn("conv1", *_turn(5, 1))
    cache.append_turn("conv1", *_turn(4, 2))
    cache.append_turn("conv2", *_turn(5, 3))


def _conversation_read(root, tiny):
    from hf_cachehooks import TokenCache, TokenCacheConfig

    cache = TokenCache(TokenCacheConfig())  # a fresh instance: every turn is read from disk
    served = []
    for conv, n in (("conv1", 9), ("conv2", 5)):
        for i in range(n):
            record = cache.token(conv, i)
            served.append(
                None
                if record is None
                else (
                    record.token_id,
                    record.hidden.tolist(),
                    None if record.topk_ids is None else record.topk_ids.tolist(),
                    None if record.topk_probs is None else record.topk_probs.tolist(),
                )
            )
    return served


def _newest(pattern: str):
    def find(root: Path) -> Path:
        found = sorted(root.glob(pattern), key=lambda p: len(inspect(p)[0].files) if inspect(p)[0] else -1)
        return found[-1]

    return find


KINDS = [
    Kind("predictions", "predictions", _eval, _eval, _newest("predictions/*_*.json")),
    Kind("generations", "experiments", _generate, _generate, _newest("experiments/**/*_metadata.json")),
    Kind(
        "activations", "activations", _activations, _activations, lambda root: root / "activations/run1/manifest.json"
    ),
    Kind(
        "conversation",
        "conversations",
        _conversation_build,
        _conversation_read,
        lambda root: root / "conversations/conv1/conversation.json",
        _equal_or_missing,
    ),
]


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _files_under(folder: Path) -> dict[Path, int]:
    """Every file a user would see there, minus the tag, lock folders and the last-access stamp."""
    return {
        p: p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.name not in LEFTOVER_OK and ".locks" not in p.parts and p.name != ".last_access"
    }


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_ls_size_is_the_bytes_on_disk_and_verify_is_clean(kind, root, tiny, capsys):
    kind.build(root, tiny)
    infos = management.list_entries(root, kind.folder, bookkeeping=True)
    assert infos, "the cache wrote no entry"
    assert sum(e.size for e in infos) == sum(_files_under(root / kind.folder).values())
    checked, problems = management.verify(root)
    assert problems == [] and checked >= len(infos)
    assert cli.main(["verify"]) == 0
    assert "0 corrupt" in capsys.readouterr().out


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_prune_and_clear_leave_nothing_behind(kind, root, tiny):
    kind.build(root, tiny)
    plan = management.plan_prune(root, -1.0, kind=kind.folder)  # everything is older than -1 s
    assert plan.entries
    plan.execute()
    assert _files_under(root / kind.folder) == {}
    kind.build(root, tiny)
    management.plan_clear(root, kind.folder).execute()
    assert _files_under(root / kind.folder) == {}


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at % len(raw)] ^= 0x20
    with open(path, "r+b") as handle:  # in place, as bit rot or a stray write would
        handle.write(bytes(raw))


def _fresh(kind: Kind, root: Path, tiny) -> tuple[Any, Path, list[str]]:
    """Clear the kind, build it again, and return what it serves, its main manifest and that manifest's files."""
    if (root / kind.folder).exists():
        management.plan_clear(root, kind.folder).execute()
    kind.build(root, tiny)
    manifest = kind.main_manifest(root)
    return kind.read(root, tiny), manifest, [manifest.name, *inspect(manifest)[0].files]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_a_flipped_byte_in_any_file_is_never_served(kind, root, tiny):
    _, _, names = _fresh(kind, root, tiny)
    for name in names:
        good, manifest, _ = _fresh(kind, root, tiny)
        path = manifest.parent / name
        stat = os.stat(path)
        _flip(path, stat.st_size // 2)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `cp -p` / `rsync -t` restore the mtime
        assert kind.ok(kind.read(root, tiny), good), f"served corrupt data after flipping a byte of {name}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_a_swapped_file_is_never_served(kind, root, tiny):
    good, manifest, names = _fresh(kind, root, tiny)
    paths = sorted((manifest.parent / n for n in names[1:]), key=lambda p: p.stat().st_size)
    if len(paths) < 2:  # an entry without data files (a prediction run): swap it with another entry's manifest
        paths = [manifest, next(p for p in (root / kind.folder).rglob("*.json") if p != manifest)]
    a, b = paths[0], paths[-1]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    assert kind.ok(kind.read(root, tiny), good)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_a_traversal_name_is_refused_and_nothing_outside_is_touched(kind, root, tiny, tmp_path):
    good, manifest, _ = _fresh(kind, root, tiny)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    doc = unseal(manifest.read_bytes())
    doc["files"][os.path.relpath(victim, manifest.parent)] = {"bytes": victim.stat().st_size, "xxh3": "0" * 32}
    manifest.write_bytes(seal(doc))  # resealed: the seal is an unkeyed hash, anyone can remake it
    assert "not a plain name" in inspect(manifest)[1]
    assert kind.ok(kind.read(root, tiny), good)
    management.plan_prune(root, -1.0).execute()
    management.plan_clear(root).execute()
    assert victim.read_text() == "do not touch"
