"""`evaluate_model`: predict once, reuse everywhere, and say why when it cannot.

Flow: resolve identity (without loading weights when the model is a remembered path) -> run key ->
whole-run hit? -> else, under a single-flight lease, reuse per-example predictions, predict only the
rest in batches (each batch saved as it finishes), compute metrics, save the run entry.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._core.extras import requires_extras
from .._core.fingerprint import example_hashes, fingerprint_data
from .._core.freshness import describe_age, iso
from .._core.keys import Key, dumps, extend_key, make_key, remember
from .._core.launch import World, world_from_env
from .._core.locking import single_flight
from .._core.rows import load_rows
from .._models.identity import (
    computed,
    effective_generation,
    files_state,
    generation_defaults,
    model_identity,
    remember_identity,
    remembered_identity,
    tokenizer_identity,
)
from .._models.inference import LoadPlan, load_planned, plan_load
from .._version import __version__
from ..errors import ConfigError
from .config import EvalConfig
from .distributed import Collective, predict_sharded
from .metrics import compute_metrics, metric_versions
from .predictions import PredictionCache

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "partial", "miss", "recomputed", "disabled"]
"""Where an `EvalResult` came from: see `EvalResult`."""


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate_model` returns.

    `cache_status` is "hit" (served from the run entry), "partial" (some examples reused),
    "miss" (all predicted), "recomputed" (force_recompute) or "disabled". `miss_reason` says why the
    run entry was not served (e.g. "closest entry ... differs in data.n 40→60"); None on a hit.
    """

    predictions: list
    references: list
    metrics: dict
    metadata: dict
    cache_status: CacheStatus
    key: str | None = None
    path: str | None = None
    miss_reason: str | None = None
    reused: int = 0

    @property
    def from_cache(self) -> bool:
        return self.cache_status == "hit"


def render_prompts(rows: list[dict], config: EvalConfig) -> list[str]:
    """The text fed to the model for each row (before any chat template)."""
    try:
        if config.prompt_template is not None:
            return [config.prompt_template.format(**row) for row in rows]
        return [str(row[config.input_field]) for row in rows]
    except KeyError as exc:
        fields = ", ".join(sorted(rows[0])) if rows else "none"
        raise ConfigError(f"Rows have no field {exc} (fields: {fields}). Fix input_field or prompt_template.") from None


def _references(rows: list[dict], config: EvalConfig) -> list:
    try:
        refs = [row[config.reference_field] for row in rows]
    except KeyError:
        fields = ", ".join(sorted(rows[0])) if rows else "none"
        raise ConfigError(
            f"Rows have no reference field {config.reference_field!r} (fields: {fields}). Set reference_field."
        ) from None
    if config.task == "classification" and not all(isinstance(r, int) for r in refs):
        raise ConfigError(
            "Classification references must be int label ids; map label names with model.config.label2id first."
        )
    return refs


def evaluate_model(
    model: Any,
    data: Any,
    config: EvalConfig | None = None,
    *,
    tokenizer: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate `model` on `data`, serving repeated work from the prediction cache.

    Args:
        model: a model object, or a local path / Hub name (then weights are loaded only on a miss).
        data: a list of dicts, a `datasets.Dataset`, or a .json/.jsonl file of rows.
        config: an `EvalConfig`; defaults to generation on the `question`/`answer` fields.
        tokenizer: the model's tokenizer, when `model` is an object (a model given by path or name loads its
            own, so passing one then is an error).
        metadata: extra fields for the run entry's metadata when this call makes it, never in the key (e.g.
            `{"step": 40}`: `CachedEvalCallback` records the training step, which `hf-cachehooks ls` shows).

    Returns:
        An `EvalResult` with predictions, references, metrics, metadata and `cache_status`.

    Raises:
        ConfigError: a field, metric or setting is invalid (the message names it and the fix), or `tokenizer`
            is given with a model path.

    Example:
        >>> result = evaluate_model("path/to/model", "qa.json", EvalConfig(max_new_tokens=32))
        >>> result.metrics, result.from_cache
    """
    config = config or EvalConfig()
    rows = load_rows(data)
    versions = metric_versions(config.metrics)
    caching = config.resolved_cache  # cache=CacheConfig(...) or the keyword spellings, settled in EvalConfig
    root = caching.resolve_root()
    folder = caching.folder_for("predictions")
    run = _Run(model, tokenizer, config, root)

    if not caching.enabled:
        prompts, references = render_prompts(rows, config), _references(rows, config)
        started = time.time()
        predictions = run.predict(prompts)
        metrics = compute_metrics(config.metrics, predictions, references)
        meta = {**(metadata or {}), **_metadata(run.name, len(rows), time.time() - started, config, caching.clock())}
        return EvalResult(predictions, references, metrics, meta, "disabled")

    identity = run.identity()
    predictor = predictor_key(identity, config)
    key = run_key(predictor, data if hasattr(data, "_fingerprint") else rows, len(rows), config)
    cache = PredictionCache(caching)
    name = identity["model"]["name"]
    evaluation = _Evaluation(config, cache, key, predictor, run, name, versions, dict(metadata or {}))

    reason = "force_recompute is set"
    if caching.force_recompute:
        log.info("🔄 Force recompute enabled: predicting %d examples with %s.", len(rows), name)
    else:
        doc = cache.load_run(key, name, references=False)
        if doc is not None:
            doc["references"] = _references(rows, config)  # the rows the entry was made from (in its key)
            return evaluation.hit(evaluation.refresh_metrics(doc))
        reason = cache.explain_miss(key)
        log.info("🔄 No valid cache found for %s (%d examples, key %s): %s.", name, len(rows), key.short, reason)
    # only a miss reads the prompts and references (a hit was made from these very rows: they are in its key)
    prompts, references = render_prompts(rows, config), _references(rows, config)

    def lookup() -> _Outcome | None:
        doc = None if caching.force_recompute else cache.load_run(key, name)
        return None if doc is None else _Outcome(doc, "hit", None, computed_here=False)

    def compute() -> _Outcome:
        started = time.time()
        hashes = example_hashes(prompts)
        known = {} if caching.force_recompute else cache.load_examples(predictor)
        todo = [i for i, h in enumerate(hashes) if h not in known]
        reused = len(rows) - len(todo)
        if reused and todo:
            log.info("♻️  Reusing %d cached predictions; predicting the other %d.", reused, len(todo))
        elif reused:
            log.info("♻️  All %d predictions found per example; recomputing metrics only.", reused)
        known.update(run.predict_cached(prompts, hashes, todo, cache, predictor))
        return evaluation.save([known[h] for h in hashes], references, started, reused)

    world = world_from_env() if config.distributed else World()
    if world.size > 1:  # under torchrun / accelerate launch: shard, gather on rank 0, same result everywhere
        return evaluation.sharded(world, prompts, references)

    lock = folder / ".locks" / f"{key.digest}.lock"
    outcome = single_flight(lock, lookup, compute, stale_after=caching.stale_after_seconds)
    if not outcome.computed_here:  # another process computed it while we waited
        return evaluation.hit(evaluation.refresh_metrics(outcome.doc))
    return evaluation.result(outcome, reason)


def run_key(predictor: Key, data: Any, n: int, config: EvalConfig) -> Key:
    """The key of one run: the predictor, the data, and the field the references come from (a new
    reference field recomputes only the metrics: the per-example predictions are keyed by the predictor)."""
    return extend_key(
        predictor,
        "predictions",
        {"data": {"fingerprint": fingerprint_data(data), "n": n}, "reference_field": config.reference_field},
    )


_predictors: dict[bytes, tuple[dict, Key]] = {}  # settings -> (the identity object it was made from, its key)


def predictor_key(identity: dict, config: EvalConfig) -> Key:
    """The key of everything but the data: model, tokenizer, effective generation settings, prompt format.

    The last few are remembered by the settings and the very identity object they were made from: a path's
    identity is its memo's parsed document, shared read-only until that memo file changes (then it is a
    new object), so a repeated hit walks neither again; any changed setting has other settings bytes.
    """
    overrides = config.generation_overrides() if config.task == "generation" else None
    settings = dumps({"overrides": overrides, "prompt": config.prompt_spec()})
    known = _predictors.get(settings)
    if known is not None and known[0] is identity:
        return known[1]
    key = make_key(
        "predictor",
        {
            "model": computed(identity["model"]),  # where it came from is shown, never keyed
            "tokenizer": identity["tokenizer"],
            "generation": effective_generation(identity["generation_defaults"], overrides)
            if overrides is not None
            else None,
            "prompt": config.prompt_spec(),
        },
    )
    remember(_predictors, settings, (identity, key), 16)
    return key


@dataclass(frozen=True)
class _Outcome:
    """A run entry as `evaluate_model` answers from it: the doc, its status, where it was saved (None when
    the folder was not writable, or for an entry read back rather than made here), and whether this process
    computed it (False: another process did, while this one waited for its lease)."""

    doc: dict
    status: CacheStatus
    path: str | None
    computed_here: bool


@dataclass(frozen=True)
class _Evaluation:
    """One evaluation's state after its key is known: the cache it reads and writes, the run and predictor
    keys, the model side (`_Run`), the model's name, the metric versions the answer must carry and the caller's
    extra metadata for a run entry it makes (`evaluate_model(metadata=...)`)."""

    config: EvalConfig
    cache: PredictionCache
    key: Key
    predictor: Key
    run: _Run
    name: str
    versions: dict
    extra: dict = field(default_factory=dict)

    def save(self, predictions: list, references: list, started: float, reused: int, **extra_meta: Any) -> _Outcome:
        """Metrics, metadata and the run entry for finished predictions; the outcome `evaluate_model` answers
        from."""
        caching = self.config.resolved_cache
        metrics = compute_metrics(self.config.metrics, predictions, references)
        meta = {
            **self.extra,
            **_metadata(self.name, len(predictions), time.time() - started, self.config, caching.clock()),
        }
        meta.update(reused_examples=reused, **extra_meta)
        if self.run.took_effect is not None:
            meta["load"] = self.run.took_effect
        doc: dict[str, Any] = {
            "metadata": meta,
            "predictions": predictions,
            "references": references,
            "metrics": metrics,
            "metric_versions": self.versions,
        }
        path = self.cache.save_run(self.key, self.name, doc)
        self.cache.compact(self.predictor)
        status: CacheStatus = "recomputed" if caching.force_recompute else ("partial" if reused else "miss")
        log.info("💾 Saved %d predictions to %s.", len(predictions), path or "(not cached: folder not writable)")
        return _Outcome(doc, status, str(path) if path else None, computed_here=True)

    def result(self, outcome: _Outcome, reason: str | None) -> EvalResult:
        """The answer for predictions made by this evaluation (here, or by the ranks of one launch)."""
        doc = outcome.doc
        return EvalResult(
            doc["predictions"],
            doc["references"],
            doc["metrics"],
            doc["metadata"],
            outcome.status,
            key=self.key.digest,
            path=outcome.path,
            miss_reason=reason,
            reused=doc["metadata"]["reused_examples"],
        )

    def refresh_metrics(self, doc: dict) -> dict:
        """`doc`, with its metrics recomputed from its predictions and the run entry rewritten, when the
        metric scripts changed since it was saved; `doc` unchanged otherwise."""
        if doc.get("metric_versions") == self.versions:
            return doc
        log.info(
            "📏 Metrics changed (%s → %s): recomputing from %d cached predictions.",
            ",".join(doc.get("metric_versions", {})),
            ",".join(self.versions),
            len(doc["predictions"]),
        )
        doc["metrics"] = compute_metrics(self.config.metrics, doc["predictions"], doc["references"])
        doc["metric_versions"] = self.versions
        self.cache.save_run(self.key, self.name, {k: v for k, v in doc.items() if k != "key"})
        return doc

    def hit(self, doc: dict) -> EvalResult:
        """The answer served from a run entry (its metrics already current: see `refresh_metrics`)."""
        meta = doc["metadata"]
        age = describe_age(self.config.resolved_cache.clock() - meta.get("created_at", 0))
        path = self.cache.run_path(self.key, self.name)
        log.info(
            "✅ Loaded predictions from cache: %s (%d examples, %s old, saved ≈%.0fs).",
            path.name,
            len(doc["predictions"]),
            age,
            meta.get("evaluation_time_seconds", 0),
        )
        return EvalResult(
            doc["predictions"], doc["references"], doc["metrics"], meta, "hit", key=self.key.digest, path=str(path)
        )

    def sharded(self, world: World, prompts: list[str], references: list) -> EvalResult:
        """`evaluate_model` on one rank of several: see `distributed.py` for who does what."""
        force = self.config.resolved_cache.force_recompute
        comm = Collective(world)
        found = None if force else self.cache.load_run(self.key, self.name)
        if comm.all_true(found is not None) and found is not None:
            return self.hit(self.refresh_metrics(found))
        reason = "force_recompute is set" if force else (self.cache.explain_miss(self.key) if world.is_main else None)
        if world.is_main:
            log.info(
                "🔄 No valid cache found for %s (%d examples, key %s): %s.",
                self.name,
                len(prompts),
                self.key.short,
                reason,
            )
        started = time.time()
        hashes = example_hashes(prompts)
        known = ({} if force else self.cache.load_examples(self.predictor)) if world.is_main else None
        self.run.progress = world.is_main

        def predict(positions: list[int]) -> dict[str, Any]:
            return self.run.predict_cached(
                prompts, hashes, positions, self.cache, self.predictor, suffix=f"-r{world.rank}"
            )

        merged, reused, timing = predict_sharded(world, comm, prompts, hashes, known, predict)
        saved = None
        if merged is not None:
            saved = self.save(
                [merged[h] for h in hashes], references, started, reused, processes={"count": world.size, **timing}
            )
        outcome, reason = comm.broadcast((saved, reason))  # rank 0's, on every rank
        comm.barrier()  # every rank has the result before any process may exit
        return self.result(outcome, reason)


def _metadata(name: str, size: int, seconds: float, config: EvalConfig, now: float) -> dict:
    return {
        "model_name": name,
        "dataset_size": size,
        "timestamp": iso(now),
        "created_at": now,
        "evaluation_time_seconds": round(seconds, 3),
        "batch_size": config.batch_size,
        "device": config.device,
        "hf_cachehooks_version": __version__,
    }


class _Run:
    """The model side of one evaluation: identity on demand, loading only when predicting."""

    def __init__(self, model: Any, tokenizer: Any, config: EvalConfig, root: Path) -> None:
        self.source = model
        self.is_path = isinstance(model, (str, os.PathLike))
        if self.is_path and tokenizer is not None:  # it would be replaced by the folder's own without a word
            raise ConfigError(
                f"evaluate_model got the model path {os.fspath(model)!r} and tokenizer={type(tokenizer).__name__}: "
                "a model given by path loads its own tokenizer. Pass the loaded model object to use yours "
                "(evaluate_model(AutoModelForCausalLM.from_pretrained(path), data, config, tokenizer=tokenizer)), "
                "or drop tokenizer= to use the folder's."
            )
        self.model = None if self.is_path else model
        self.tokenizer = tokenizer
        self.config = config
        self.root = root
        self.name = str(model) if self.is_path else type(model).__name__
        self.progress = True  # a progress bar (rank 0 only, under a launcher)
        self.took_effect: dict | None = None  # device, dtype, attention, compile: set when this run loads
        self._plan: LoadPlan | None = None

    @property
    def plan(self) -> LoadPlan:
        """How a path is loaded (device, dtype, attention, compile), decided once, before any load."""
        if self._plan is None:
            config = self.config
            self._plan = plan_load(
                device=config.device,
                dtype=config.model_dtype,
                speedups=config.speedups,
                compile_decode=config.compile_decode,
            )
        return self._plan

    def _ensure_loaded(self) -> None:
        if self.model is None:
            with requires_extras(f"Evaluating {self.name!r} on a cache miss"):
                self.model, self.tokenizer, self.took_effect = load_planned(
                    str(self.source),
                    self.plan,
                    head="causal" if self.config.task == "generation" else "classification",
                    gguf_file=self.config.gguf_file,
                    **self.config.load_kwargs,
                )
        if self.tokenizer is None:
            raise ConfigError(
                "This model needs its tokenizer: call evaluate_model(model, data, config, tokenizer=tokenizer)."
            )

    def _identity_of_objects(self) -> dict:
        self._ensure_loaded()
        return {
            "model": model_identity(self.model),
            "tokenizer": tokenizer_identity(self.tokenizer),
            "generation_defaults": generation_defaults(self.model),
        }

    def identity(self) -> dict:
        if not self.is_path:
            return self._identity_of_objects()
        from .._models.loading import load_options

        options = load_options(self.config, self.plan.dtype)  # the dtype is part of the key
        state = files_state(str(self.source), options, self.root)
        found = remembered_identity(state, self.root)
        if found is None:
            found = self._identity_of_objects()
            remember_identity(state, found, self.root)
        return found

    def predict_cached(
        self,
        prompts: list[str],
        hashes: list[str],
        positions: list[int],
        cache: PredictionCache,
        predictor: Key,
        suffix: str = "",
    ) -> dict[str, Any]:
        """Predict the examples at `positions`, saving each batch as a per-example shard as it finishes."""
        fresh = self.predict(
            [prompts[i] for i in positions],
            on_batch=lambda done: cache.save_examples(
                predictor, {hashes[positions[j]]: p for j, p in done}, f"b{time.time_ns()}-{os.getpid()}{suffix}"
            ),
        )
        return {hashes[i]: p for i, p in zip(positions, fresh)}

    def predict(self, prompts: list[str], on_batch=None) -> list:
        if not prompts:
            return []
        self._ensure_loaded()
        from tqdm.auto import tqdm

        from .._models.runners import classify, generate, on_each_token

        step = generate if self.config.task == "generation" else classify
        size = self.config.batch_size
        batches = -(-len(prompts) // size)
        log.info("Predicting %d examples in %d batch(es) of up to %d.", len(prompts), batches, size)
        out: list = []
        with (
            tqdm(
                total=len(prompts), desc=f"Predicting ({self.config.task})", unit="ex", disable=not self.progress
            ) as bar,
            requires_extras(f"Predicting with {self.name!r}"),
            on_each_token(_token_postfix(bar, size, batches, self.config.max_new_tokens)),  # seen within seconds
        ):
            for start in range(0, len(prompts), size):
                bar.set_postfix_str(f"batch {start // size + 1}/{batches}", refresh=False)
                batch = step(self.model, self.tokenizer, prompts[start : start + size], self.config)
                if on_batch is not None:
                    on_batch(list(enumerate(batch, start)))
                out.extend(batch)
                bar.update(len(batch))
        return out


def _token_postfix(bar: Any, size: int, batches: int, max_new_tokens: int | None) -> Any:
    """An `on_each_token` callback: the bar's postfix counts the running batch's new tokens (at most 5 times a
    second), so a first batch that takes minutes on a CPU is seen to move from its first token."""
    shown = [0.0]

    def show(tokens: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 0.2:
            shown[0] = now
            total = f"/{max_new_tokens}" if max_new_tokens else ""
            bar.set_postfix_str(f"batch {bar.n // size + 1}/{batches}, token {tokens}{total}")

    return show
