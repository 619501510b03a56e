"""Best-of-K / pass@k sweeps from one cached sample set per temperature.

`k_sweep` asks the generation cache for max(K) samples per prompt at each temperature (one entry each:
a new temperature is a new sample set), scores every sample, and reports every K from that one set.
Asking later for a larger K generates only the samples the entry lacks (sample s of a prompt keeps its
seed, so the first samples are the same ones); a second run with the same settings generates nothing
and, for a model given by path, never loads it. Under torchrun the generation is shared out across the
ranks (`ranks`), and every rank returns the same result.

What keys a sample set: the generation cache's key (model name, prompt name, temperature, max_tokens,
top_p, seed, and the prompt format: chat template on or off, the template, the system prompt), plus, for
a `ModelBackend`, a hash of its files in the model name (of the model as loaded when the files cannot be
found without the network); every row's prompt is checked (`strict=True`), so other questions are
regenerated, never scored against the wrong answers. The backend reaches the cache wrapped in
`ranks.ShardedBackend`, which forwards every attribute the key reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._core.cache_config import CacheConfig
from .._core.keys import make_key
from .._core.rows import short_name
from ..errors import ConfigError
from ..generation.backends import Backend, Sampling, TransformersBackend
from ..generation.cache import GenerationCache
from . import ranks
from .scoring import ESTIMATORS, Scorer, bootstrap_indices, interval, per_prompt, score_samples, scorer

log = logging.getLogger(__name__)


@dataclass
class ModelBackend:
    """A `TransformersBackend` for a model folder or Hub name, loaded on first use: a full hit never loads it.

    Under torchrun each rank loads its own copy, on `cuda:<LOCAL_RANK>` when CUDA is available.
    """

    model: str
    gguf_file: str | None = None
    model_dtype: str = "float32"
    batch_size: int = 8
    use_chat_template: bool = False
    system_prompt: str | None = None
    name: str = "transformers"
    loads: int = 0
    _backend: TransformersBackend | None = field(default=None, repr=False)

    def loaded(self) -> TransformersBackend:
        if self._backend is None:
            from .._models.inference import load_planned, plan_load

            # evaluate_model's load plan: this rank's GPU, the attention ladder; the dtype is the one keyed
            model, tokenizer, _ = load_planned(self.model, plan_load(dtype=self.model_dtype), gguf_file=self.gguf_file)
            self.loads += 1
            self._backend = TransformersBackend(
                model,
                tokenizer,
                batch_size=self.batch_size,
                use_chat_template=self.use_chat_template,
                system_prompt=self.system_prompt,
            )
        return self._backend

    def render(self, prompts: Sequence[str]) -> list[str]:
        return self.loaded().render(prompts)

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]:
        return self.loaded().complete(prompts, sampling)


@dataclass(frozen=True)
class KSweepResult:
    """What `k_sweep` returns: one record per (temperature, K, estimator), the settings, and the cache's work.

    `records`: {"temperature", "k", "estimator" ("best_of_k" | "pass_at_k"), "score", "ci_low", "ci_high",
    plus every setting}. `generation`: per temperature, the cache status ("hit" | "partial" | "miss"),
    samples generated and reused, and the entry's path.
    """

    records: list[dict]
    settings: dict
    generation: list[dict]

    @property
    def generated(self) -> int:
        return sum(g["generated"] for g in self.generation)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write {"settings", "generation", "records"} as indented JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"settings": self.settings, "generation": self.generation, "records": self.records}
        path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        return path

    def summary(self) -> str:
        """One line per temperature: a cache hit (no generation) or how many samples were generated."""
        lines = []
        for g in self.generation:
            what = "cache hit, no generation" if g["status"] == "hit" else f"{g['generated']} samples generated"
            lines.append(f"T={g['temperature']:g}: {what} ({g['reused']} reused)")
        return "\n".join(lines)

    def table(self) -> str:
        """The records as a text table: one row per (temperature, K), both estimators with their intervals."""
        rows: dict[tuple, dict] = {(r["temperature"], r["k"]): {} for r in self.records}
        for r in self.records:
            rows[(r["temperature"], r["k"])][r["estimator"]] = r
        lines = [f"{'T':>5} {'K':>4}  {'best-of-K':>9}  {'95% interval':<15}  {'pass@k':>7}  {'95% interval':<15}"]
        for (temperature, k), both in sorted(rows.items()):
            b, p = both["best_of_k"], both["pass_at_k"]
            lines.append(
                f"{temperature:>5} {k:>4}  {b['score']:>9.3f}  [{b['ci_low']:.3f}, {b['ci_high']:.3f}]  "
                f"{p['score']:>7.3f}  [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: score against K (log-2 axis) with the bootstrap intervals, one line per temperature."""
        from .plots import plot_k_sweep

        return plot_k_sweep(self.records, path, title=f"{self.settings['model']} · {self.settings['metric']}")


def _model_folder_name(model: str, backend: Any, root: Path) -> str:
    """The generation cache's model name: for a `ModelBackend`, its short name plus a hash of the files
    transformers will load; where those cannot be found without the network, a hash of the model as loaded
    (so that case loads the model on every run, and is never keyed by its name alone)."""
    if isinstance(backend, ModelBackend):
        from .._models.identity import files_state, model_identity, tokenizer_identity

        state = files_state(
            backend.model,
            {"task": "k-sweep", "dtype": backend.model_dtype, "gguf_file": backend.gguf_file, "load_kwargs": {}},
            root,
        )
        if not state:
            loaded = backend.loaded()
            identity = {"model": model_identity(loaded.model), "tokenizer": tokenizer_identity(loaded.tokenizer)}
            state = make_key("k-sweep-model", identity).digest
        return f"{short_name(model)}-{state[:8]}"
    return short_name(model)


def k_sweep(
    prompts: Sequence[str],
    references: Sequence[Any],
    backend: Backend,
    *,
    model: str,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    temperatures: Sequence[float] = (1.0,),
    metric: str | Scorer = "exact_match",
    prompt_name: str = "k-sweep",
    max_tokens: int = 32,
    top_p: float | None = None,
    seed: int | None = 0,
    batch_size: int = 8,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    pass_threshold: float = 1.0,
    cache: CacheConfig | None = None,
) -> KSweepResult:
    """Best-of-K and pass@k for every K in `ks` and every temperature, from max(ks) cached samples per prompt.

    Args:
        prompts, references: the questions and, per question, an answer or a list of accepted answers.
        backend: where samples come from: a `ModelBackend` (a path, loaded only on a miss), a
            `TransformersBackend`, an `OpenAIBackend`, ... (the same object on every rank under torchrun).
        model: the model's name, as the generation cache records it.
        metric: "exact_match", "contains_answer", or a function (completion, reference) -> float.
        prompt_name: names the prompt set in the cache folder (the prompt format is keyed besides, see above).
        seed: base seed of the samples (None: unseeded, not reproducible).
        batch_size: prompts per generation batch (the unit shared out across ranks, and of seeding).
        bootstrap, confidence: resamples over prompts and the interval's coverage.
        pass_threshold: a sample passes (for pass@k) when its score is at least this.
        cache: the generation cache's settings (root, expiry, force_recompute, ...).

    Returns:
        A `KSweepResult` (the same on every rank).

    Raises:
        ConfigError: bad K values, temperatures, metric, or prompts and references of different lengths.

    Example:
        >>> result = k_sweep(questions, answers, ModelBackend("path/to/model"), model="org/name",
        ...                  ks=(1, 2, 4, 8, 16), temperatures=(0.7, 1.0), metric="contains_answer")
        >>> result.to_json("k_sweep.json"); result.plot("k_sweep.png")
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"K values must be positive integers, e.g. 1 2 4 8 16 (got {list(ks)}).")
    if not temperatures or any(t < 0 for t in temperatures):
        raise ConfigError(f"Temperatures must be >= 0, e.g. 0.7 1.0 (got {list(temperatures)}).")
    if len(prompts) != len(references) or not prompts:
        raise ConfigError(
            f"{len(prompts)} prompts and {len(references)} references: give one reference per "
            "prompt, and at least one prompt."
        )
    metric_name, score = scorer(metric)
    rank, world = ranks.rank_and_world()
    if rank != 0:
        return KSweepResult(**ranks.follow(backend, batch_size, rank, world))
    try:
        result = _sweep(
            prompts,
            references,
            backend,
            model,
            ks,
            list(dict.fromkeys(temperatures)),
            metric_name,
            score,
            prompt_name,
            max_tokens,
            top_p,
            seed,
            batch_size,
            bootstrap,
            confidence,
            pass_threshold,
            cache,
            world,
        )
    except BaseException as exc:
        ranks.abort(f"{type(exc).__name__}: {exc}", world)
        raise
    return KSweepResult(**ranks.lead(result, world))


def _sweep(
    prompts: Sequence[str],
    references: Sequence[Any],
    backend: Backend,
    model: str,
    ks: list[int],
    temperatures: list[float],
    metric_name: str,
    score: Callable[[str, Any], float],
    prompt_name: str,
    max_tokens: int,
    top_p: float | None,
    seed: int | None,
    batch_size: int,
    bootstrap: int,
    confidence: float,
    pass_threshold: float,
    cache: CacheConfig | None,
    world: int,
) -> dict:
    root = (cache or CacheConfig()).resolve_root()
    generation_cache = GenerationCache(model, _model_folder_name(model, backend, root), cache=cache)
    sharded = ranks.ShardedBackend(backend, batch_size=batch_size, rank=0, world=world)
    n = ks[-1]
    folder_prompt = prompt_name  # the cache keys the prompt format itself, read through `sharded` from `backend`
    settings = {
        "model": model,
        "model_folder": generation_cache.short,
        "prompt_name": folder_prompt,
        "metric": metric_name,
        "max_tokens": max_tokens,
        "top_p": top_p,
        "seed": seed,
        "samples_per_prompt": n,
        "n_prompts": len(prompts),
        "ks": ks,
        "temperatures": temperatures,
        "bootstrap": bootstrap,
        "confidence": confidence,
        "pass_threshold": pass_threshold,
        "processes": world,
    }
    shared = {k: v for k, v in settings.items() if k not in ("ks", "temperatures")}  # what each record repeats
    indices = bootstrap_indices(len(prompts), bootstrap, 0 if seed is None else seed)
    records, generation = [], []
    for temperature in temperatures:
        gens = generation_cache.generate(
            list(prompts),
            sharded,
            prompt_name=folder_prompt,
            num_samples=len(prompts),
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            seed=seed,
            samples_per_prompt=n,
            strict=True,
        )
        failed = sum(c is None for row in gens.completions for c in row)
        generation.append(
            {
                "temperature": temperature,
                "status": gens.status,
                "generated": gens.generated,
                "reused": gens.reused,
                "failed": failed,
                "path": gens.path,
            }
        )
        if failed:
            log.warning(
                "%d of %d samples at temperature %s failed; they score as empty answers (a rerun "
                "generates them again).",
                failed,
                n * len(prompts),
                temperature,
            )
        scores = score_samples(gens.completions, references, score)  # (prompts, samples)
        for estimator in ESTIMATORS:
            for k in ks:
                mean, low, high = interval(per_prompt(scores, k, estimator, pass_threshold), indices, confidence)
                records.append(
                    {
                        "temperature": temperature,
                        "k": k,
                        "estimator": estimator,
                        "score": mean,
                        "ci_low": low,
                        "ci_high": high,
                        **shared,
                    }
                )
    return {"records": records, "settings": settings, "generation": generation}
