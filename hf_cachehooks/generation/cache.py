"""The generation cache: completions keyed by experiment parameters (not by the prompts), with partial reuse.

    experiments/
    ├── .locks/<key digest>.lock                    single-flight lease while one process generates
    └── {model_short_name}/generations/{prompt_name}/{subject_type}/
        ├── n200_t1.0_maxtok512_completions.jsonl   {"i", "s", "prompt", "prompt_hash", "completion"} per line
        ├── n200_t1.0_maxtok512_full_texts.jsonl    {"i", "s", "full_text"} per line (model input + completion)
        └── n200_t1.0_maxtok512_metadata.json       the entry's manifest (kind "generations", see `entry`):
              reserved fields (key, created_at, writer, files: the two JSONL files with bytes + xxh3),
              then the experiment's fields: model, model_short_name, prompt_name, subject_type, temperature,
              max_tokens, top_p, seed, samples_per_prompt, backend, text_as_returned, num_samples, num_rows,
              timestamp, updated_at

The key is the experiment's high-level one (model, prompt format, subject, temperature, max_tokens; top_p
and seed when set), so the same parameters with different questions still hit, with a warning (or a
regeneration under `strict=True`). Neither the number of prompts nor the samples per prompt is in the
key (sample s of a prompt has its own seed, whatever the count asked for): asking for fewer serves a
prefix; asking for more generates only the missing ones and grows the entry.
The metadata file is written last and lists the sizes and hashes of the two JSONL files, so an
interrupted write is never read as an entry, and a changed, swapped or malformed file is a warning and
a regeneration. Rows are saved after every chunk, so a killed run loses one chunk. Two processes that
miss the same key generate once: the second waits on the lease and then reads the first one's entry.
The tree may be shared with the user's own runs (`cache=CacheConfig(folder=...)`): a file no manifest of ours lists
is never removed or overwritten; a save that would replace one is skipped with a warning naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._core import entry, locking, remote
from .._core.cache_config import CacheConfig, settle
from .._core.fingerprint import example_hashes
from .._core.freshness import SYSTEM_CLOCK, iso
from .._core.keys import Key, make_key
from .._core.rows import short_name
from .._core.store import atomic_write, seal, tag_folder
from ..errors import ConfigError, ServerError
from . import files
from .backends import Backend, Sampling

log = logging.getLogger(__name__)
_RULE = "=" * 60
KIND = "generations"
# Recorded in every entry: completions are stored exactly as the backend returned them. OpenAIBackend used to
# strip them; its entries without this mark hold other text than it returns now, so they are misses.
_EXACT = {"text_as_returned": True}


@dataclass(frozen=True)
class Generations:
    """What `GenerationCache.generate` returns (one row per prompt, one column per sample).

    `prompts` are the prompts the completions were made from: on a hit with different questions they
    are the cached ones, by design of the high-level key. A failed completion is `None` (never cached); an
    empty one is "". `errors` maps a prompt's index to the reason the backend gave for its failure, if it gave one.
    """

    prompts: list[str]
    completions: list[list[str | None]]
    full_texts: list[list[str | None]]
    status: str  # "hit" | "partial" | "miss" | "disabled" (CacheConfig(enabled=False): nothing read or saved)
    path: str  # the entry's metadata file ("" when disabled)
    reused: int
    generated: int
    prompts_differ: int
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def first_samples(self) -> list[str | None]:
        """Sample 0 of every prompt: the list single-sample code expects."""
        return [row[0] for row in self.completions]


class GenerationCache:
    """Completions for one model, stored under `<cache root>/experiments/` in the layout drawn above.

    Args:
        model: the full model name (recorded in metadata), e.g. "HuggingFaceTB/SmolLM2-135M-Instruct".
        model_short_name: the folder name; defaults to the last part of `model`.
        experiments_dir, max_age_days, clock: deprecated (a `FutureWarning`, once per process): pass
            `cache=CacheConfig(folder=..., max_age=timedelta(days=...), clock=...)`.
        chunk_size: prompts generated between two saves.
        cache: the cache settings: `folder` (else `<root>/experiments`), `max_age` (left out: never
            expires), `force_recompute` (for every `generate` call), `enabled`, `lock_stale_after`, `clock`.

    Raises:
        ConfigError: a keyword disagrees with `cache`.

    Example:
        >>> cache = GenerationCache("HuggingFaceTB/SmolLM2-135M-Instruct", cache=CacheConfig(max_age=None))
        >>> gens = cache.generate(prompts, backend, prompt_name="50-50", subject_type="all",
        ...                       num_samples=200, temperature=1.0, max_tokens=512)
    """

    def __init__(
        self,
        model: str,
        model_short_name: str | None = None,
        experiments_dir: str | Path | None = None,
        max_age_days: float | None = None,
        chunk_size: int = 64,
        clock: Callable[[], float] = SYSTEM_CLOCK,
        *,
        cache: CacheConfig | None = None,
    ) -> None:
        self.model = model
        self.short = model_short_name or short_name(model)
        self.cache = settle(
            cache,
            {"experiments_dir": experiments_dir, "max_age_days": max_age_days, "clock": clock},
            {"experiments_dir": None, "max_age_days": None, "clock": SYSTEM_CLOCK},
            "GenerationCache",
        )
        self.base = self.cache.folder_for("experiments")
        self.chunk_size = chunk_size
        self._warned: set[str] = set()  # paths in the way already named in a warning

    def folder(self, prompt_name: str, subject_type: str) -> Path:
        for label, value in (("prompt_name", prompt_name), ("subject_type", subject_type)):
            if not value or "/" in value or value.startswith("."):
                raise ConfigError(f"{label}={value!r} must be a plain folder name such as '50-50' or 'all'.")
        return self.base / self.short / "generations" / prompt_name / subject_type

    @staticmethod
    def stem_tail(sampling: Sampling, samples_per_prompt: int) -> str:
        """The file-name part after n{N}: `_t1.0_maxtok512` plus `_topp0.9`, `_seed42` when set.

        `samples_per_prompt` is not in it (nor in the key): an entry grows to more samples per prompt.
        """
        tail = f"_t{float(sampling.temperature)}_maxtok{sampling.max_tokens}"
        if sampling.top_p is not None:
            tail += f"_topp{float(sampling.top_p)}"
        if sampling.seed is not None:
            tail += f"_seed{sampling.seed}"
        if sampling.stop:
            tail += "_stop" + make_key("stop", {"stop": list(sampling.stop)}).short[:8]
        return tail

    def key_inputs(self, prompt_name: str, subject_type: str, sampling: Sampling, samples_per_prompt: int) -> dict:
        inputs: dict[str, Any] = {
            "model": self.short,
            "prompt_name": prompt_name,
            "subject_type": subject_type,
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_tokens,
        }
        for name, value in (("top_p", sampling.top_p), ("seed", sampling.seed)):
            if value is not None:
                inputs[name] = value
        if sampling.stop:
            inputs["stop"] = list(sampling.stop)
        return inputs  # samples_per_prompt changes no sample: sample s always has the same seed

    @staticmethod
    def prompt_format(backend: Backend) -> dict | None:
        """What the backend wraps around each prompt before the model sees it (chat template, system prompt).

        None for plain prompts. Otherwise it joins the key and the file name (`_chat1a2b3c4d`): a completion of
        a chat-formatted prompt is never served for the plain one, nor for another template or system prompt.
        """
        if not getattr(backend, "use_chat_template", False):
            return None  # the prompts go to the model as they are (a system prompt is used only with a template)
        template = getattr(getattr(backend, "tokenizer", None), "chat_template", None)
        return {
            "chat_template": template if isinstance(template, str) else True,
            "system_prompt": getattr(backend, "system_prompt", None),
        }

    # Reading ------------------------------------------------------------------------------------

    def _entries(self, folder: Path, tail: str) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"^n(\d+){re.escape(tail)}_metadata\.json$")
        remote.sync_folder(folder, "n*_metadata.json")  # a root on object storage: list its entries (else no-op)
        found = [(int(m.group(1)), p) for p in folder.glob("n*_metadata.json") if (m := pattern.match(p.name))]
        return sorted(found, reverse=True)

    def _load(self, meta_path: Path, digest: str) -> tuple[dict, files.Rows] | None:
        """(metadata, rows) of the entry at `meta_path` when it is whole, of this key and fresh; else None."""
        found = entry.open_entry(
            meta_path,
            kind=KIND,
            digest=digest,
            max_age_days=self.cache.max_age_days,
            now=self.cache.clock(),
            check="stamp",
        )
        if found is None:
            return None
        if found.doc.get("backend") == "openai" and not found.doc.get("text_as_returned"):
            log.warning(
                "Cached generations %s were made by an older OpenAIBackend that stripped whitespace from "
                "completions; regenerating them as the server returns them.",
                meta_path.name,
            )
            return None
        rows = files.decode(found.folder, meta_path.name.removesuffix("_metadata.json"), found.files)
        if rows is None:
            return None
        return found.doc, rows

    def _lookup(self, folder: Path, tail: str, digest: str) -> tuple[dict, files.Rows, Path | None]:
        """The largest readable entry of this key in `folder`: (metadata, rows, path), or empty."""
        for _, meta_path in self._entries(folder, tail):
            loaded = self._load(meta_path, digest)
            if loaded:
                return loaded[0], loaded[1], meta_path
        return {}, {}, None

    # Writing ------------------------------------------------------------------------------------

    def _save(self, folder: Path, tail: str, key: Key, rows: files.Rows, info: dict) -> Path | None:
        if not rows:
            return None  # nothing succeeded yet: no entry (and nothing to say which sample count it holds)
        k = info["samples_per_prompt"]
        complete = sum(1 for i in {i for i, _ in rows} if all((i, s) in rows for s in range(k)))
        info = {**info, "samples_per_prompt": max(s for _, s in rows) + 1}  # the most any prompt has
        stem = f"n{complete}{tail}"
        data = files.encode(stem, rows)
        meta_path = folder / f"{stem}_metadata.json"
        foreign = files.foreign(meta_path, list(data))
        if foreign:
            if foreign not in self._warned:
                self._warned.add(foreign)
                log.warning(
                    "Not caching these generations: %s is in the way and no cache entry of hf_cachehooks "
                    "lists it (a file of yours, or one edited by hand); it is never overwritten. Move it "
                    "out of %s, or give GenerationCache another cache=CacheConfig(folder=...), to cache here.",
                    foreign,
                    folder,
                )
            return None
        try:
            tag_folder(self.base)
            atomic_write(files.intent(meta_path), seal({"files": list(data)}))  # these names are ours from here on
            written = {name: entry.write_file(folder, name, raw) for name, raw in data.items()}
        except OSError as exc:
            log.warning("Cannot save generations under %s (%s); continuing without caching them.", folder, exc)
            return None
        now = self.cache.clock()
        fields = {**info, "num_samples": complete, "num_rows": len(rows), "timestamp": iso(now), "updated_at": now}
        created = fields.pop("created_at", None) or now  # an entry that grows keeps its creation time
        if not entry.commit(meta_path, KIND, key, written, fields, created_at=created):
            return None
        files.intent(meta_path).unlink(missing_ok=True)
        for _, older in self._entries(folder, tail):  # the grown entry replaces the smaller one
            if older != meta_path:
                entry.remove_entry(older)
        return meta_path

    # The one call users make ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        backend: Backend,
        *,
        prompt_name: str,
        subject_type: str = "all",
        num_samples: int | None = None,
        temperature: float = 1.0,
        max_tokens: int = 512,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        samples_per_prompt: int = 1,
        strict: bool = False,
        force_recompute: bool = False,
    ) -> Generations:
        """Completions for the first `num_samples` prompts, served from the cache where it can.

        `force_recompute` (or the cache's own) generates every sample again and replaces the entry. `stop`:
        strings that end each completion (cut off, as vLLM does); they are in the key.

        A prompt the backend refused is `None` in the result, with the reason in `errors` (and a warning),
        even when every prompt was refused; nothing of it is cached.

        Raises:
            ConfigError: fewer prompts than `num_samples`, a bad folder name, or greedy decoding
                (`temperature=0`) with `samples_per_prompt` > 1 (every sample would be the same; vLLM refuses it).
            ServerError: every completion server failed (its message names each one); the completions that
                succeeded before it are cached.
        """
        n = len(prompts) if num_samples is None else num_samples
        if n > len(prompts):
            raise ConfigError(f"num_samples={n} but only {len(prompts)} prompts were given.")
        if samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt={samples_per_prompt} must be at least 1.")
        if samples_per_prompt > 1 and temperature == 0:
            raise ConfigError(
                f"samples_per_prompt={samples_per_prompt} with temperature=0: greedy samples are all the same, and "
                "vLLM refuses it ('n must be 1 when using greedy sampling'). Pass samples_per_prompt=1, or a "
                "temperature > 0 to draw different samples."
            )
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        sampling = Sampling(temperature=temperature, max_tokens=max_tokens, top_p=top_p, seed=seed, stop=stops)
        folder = self.folder(prompt_name, subject_type)
        tail = self.stem_tail(sampling, samples_per_prompt)
        inputs = self.key_inputs(prompt_name, subject_type, sampling, samples_per_prompt)
        if (prompt_format := self.prompt_format(backend)) is not None:
            inputs["prompt_format"] = prompt_format
            tail += "_chat" + make_key("prompt-format", prompt_format).short[:8]
        key = make_key("generations", inputs)
        shown = folder / f"n{n}{tail}"
        log.info(
            "\n%s\nChecking for cached generations...\n  Model: %s\n  Prompt: %s\n  Subject: %s\n"
            "  Samples: %d\n  Cache path: %s\n%s",
            _RULE,
            self.short,
            prompt_name,
            subject_type,
            n,
            shown,
            _RULE,
        )

        hashes = example_hashes(prompts[:n])
        wanted = [(i, s) for i in range(n) for s in range(samples_per_prompt)]
        force_recompute = force_recompute or self.cache.force_recompute
        enabled = self.cache.enabled
        reads = enabled and not force_recompute
        meta, rows, loaded_path = self._lookup(folder, tail, key.digest) if reads else ({}, {}, None)
        with contextlib.ExitStack() as stack:
            differ = {i for (i, _), row in rows.items() if i < n and row["prompt_hash"] != hashes[i]}
            # a miss: generate once across processes
            if enabled and (any(ik not in rows for ik in wanted) or (strict and differ)):
                held = stack.enter_context(
                    locking.lease(
                        self.base / ".locks" / f"{key.digest}.lock", stale_after=self.cache.stale_after_seconds
                    )
                )
                if held and reads:  # the holder we waited for may have produced it
                    meta, rows, loaded_path = self._lookup(folder, tail, key.digest)
                    differ = {i for (i, _), row in rows.items() if i < n and row["prompt_hash"] != hashes[i]}
            if strict and differ:
                log.info("  strict=True: %d cached prompts differ from yours; regenerating them.", len(differ))
                rows = {ik: row for ik, row in rows.items() if ik[0] not in differ}
                differ = set()
            missing = [ik for ik in wanted if ik not in rows]
            reused = len(wanted) - len(missing)
            if not enabled:
                log.info("  Cache disabled - will generate without saving")
            elif force_recompute:
                log.info("  Force recompute enabled - will generate and save")
            elif not missing:
                log.info(
                    "\n✓ Found cached generations!\n  Loaded %d cached generations\n  Cached on: %s\n  Model: %s\n"
                    "  Subject: %s\n%s",
                    reused,
                    meta.get("timestamp", "?"),
                    meta.get("model", "?"),
                    meta.get("subject_type", subject_type),
                    _RULE,
                )
            elif reused:
                log.info(
                    "\n✓ Found %d cached generations (cached on %s); generating the other %d\n%s",
                    reused,
                    meta.get("timestamp", "?"),
                    len(missing),
                    _RULE,
                )
            else:
                log.info("  No cache found - will generate and save\n")
            if differ:
                log.warning(
                    "%d of the %d cached generations served were made from different prompts (the key "
                    "names the experiment, not the prompts); pass strict=True to regenerate them.",
                    len(differ),
                    n,
                )

            info = {
                "model": self.model,
                "model_short_name": self.short,
                "prompt_name": prompt_name,
                "subject_type": subject_type,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "top_p": top_p,
                "seed": seed,
                **({"stop": list(stops)} if stops else {}),
                "samples_per_prompt": samples_per_prompt,
                "backend": getattr(backend, "name", "?"),
                "created_at": meta.get("created_at"),
                **_EXACT,
            }
            errors: dict[int, str] = {}
            path = (
                self._generate_missing(
                    missing,
                    prompts,
                    hashes,
                    backend,
                    sampling,
                    folder,
                    tail,
                    key,
                    rows,
                    info,
                    save=enabled,
                    errors=errors,
                )
                or loaded_path
            )
        completions = [
            [rows[(i, s)]["completion"] if (i, s) in rows else None for s in range(samples_per_prompt)]
            for i in range(n)
        ]
        full_texts = [
            [rows[(i, s)]["full_text"] if (i, s) in rows else None for s in range(samples_per_prompt)] for i in range(n)
        ]
        served = [rows[(i, 0)]["prompt"] if (i, 0) in rows else prompts[i] for i in range(n)]
        status = "disabled" if not enabled else "hit" if not missing else ("partial" if reused else "miss")
        return Generations(
            served,
            completions,
            full_texts,
            status,
            str(path or shown) if enabled else "",
            reused,
            len(missing),
            len(differ),
            errors,
        )

    def _generate_missing(
        self, missing, prompts, hashes, backend, sampling, folder, tail, key, rows, info, save, errors
    ):
        path = None
        failed = 0
        for samples, chunk, this in self._requests(missing, sampling, backend):
            rendered = backend.render([prompts[i] for i in chunk])
            try:
                texts = self._complete(backend, [prompts[i] for i in chunk], this, samples)
                error = None
            except ServerError as exc:  # every server is gone: keep what did succeed, then say so
                texts, error = exc.completions or [[None] * len(samples) for _ in chunk], exc
            for j, why in getattr(backend, "errors", {}).items():  # the backend's index -> the prompt's
                errors[chunk[j]] = why
            for i, row_texts, shown in zip(chunk, texts, rendered):
                for s, text in zip(samples, row_texts):
                    if text is None:  # failed: never cached (an empty string is a real completion)
                        failed += 1
                        continue
                    rows[(i, s)] = {
                        "i": i,
                        "s": s,
                        "prompt": prompts[i],
                        "prompt_hash": hashes[i],
                        "completion": text,
                        "full_text": shown + text,
                    }
            if save:
                path = self._save(folder, tail, key, rows, info) or path
            if error is not None:
                raise error
        if failed:
            log.warning(
                "  %s generations failed; they were not cached (re-run to retry).%s",
                f"All {failed}" if failed == len(missing) else failed,
                "".join(f"\n    prompt {i}: {why}" for i, why in sorted(errors.items())[:5]),
            )
        if missing and path is not None:
            log.info("  💾 Saving generations to cache: %s\n  ✓ Cached %d generations", path, len(rows))
        return path

    def _requests(self, missing, sampling, backend):
        """(sample indices, prompt chunk, settings) per backend call, each with a distinct reproducible seed.

        A backend with `complete_samples` gets a prompt's missing samples in one call (a server's `n`);
        otherwise one call per sample index, so k samples never collapse into one.
        """
        by_samples: dict[tuple[int, ...], list[int]] = {}
        if hasattr(backend, "complete_samples"):
            wanted: dict[int, list[int]] = {}
            for i, s in missing:
                wanted.setdefault(i, []).append(s)
            for i, samples in wanted.items():
                by_samples.setdefault(tuple(samples), []).append(i)
        else:
            for i, s in missing:
                by_samples.setdefault((s,), []).append(i)
        for samples, indices in sorted(by_samples.items()):
            for start in range(0, len(indices), self.chunk_size):
                chunk = indices[start : start + self.chunk_size]
                seed = None if sampling.seed is None else sampling.seed + 1_000_003 * samples[0] + chunk[0]
                yield list(samples), chunk, dataclasses.replace(sampling, seed=seed)

    @staticmethod
    def _complete(backend, prompts, sampling, samples) -> list[list[str | None]]:
        if len(samples) > 1:
            return backend.complete_samples(prompts, sampling, len(samples))
        try:
            return [[text] for text in backend.complete(prompts, sampling)]
        except ServerError as exc:
            exc.completions = [[text] for text in exc.completions]
            raise
