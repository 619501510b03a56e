"""Settings for `evaluate_model` (frozen; the cache root and $HF_CACHEHOOKS_HOME are read at call time)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import Any, Protocol

from .._core.cache_config import DEFAULT_MAX_AGE, CacheConfig, days, duration, settle, warn_deprecated
from .._core.freshness import SYSTEM_CLOCK, Clock
from ..errors import ConfigError

TASKS = ("generation", "classification")
# the keyword spellings of the cache settings, mapped onto `cache` by `settle`
CACHE_KEYWORDS = (
    "use_prediction_cache",
    "force_recompute",
    "cache_max_age_days",
    "predictions_cache_dir",
    "cache_dir",
    "lock_stale_after",
    "clock",
)
GENERATION_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p")  # and generation_kwargs


class HasToDict(Protocol):
    """Anything with `to_dict()`, such as `transformers.GenerationConfig` (not imported: the root stays light)."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how to cache it.

    Args:
        task: "generation" (prompt -> completion) or "classification" (text -> label id).
        input_field: the row field fed to the model (`prompt_template` may use any field instead).
        reference_field: the row field holding the expected answer or label.
        prompt_template: a `str.format` template over the row's fields, e.g. "Q: {question}\\nA:".
        use_chat_template: wrap the prompt as a user message with the tokenizer's chat template.
        system_prompt: optional system message (chat template only).
        metrics: metric names (see `hf_cachehooks.evaluation.metrics.METRICS`), computed through `evaluate`.
        max_new_tokens, do_sample, temperature, top_p, generation_kwargs: generation settings; merged
            over the model's own generation_config to form the effective config in the key. Every setting
            is in the key but the output flags (`output_scores`, ...); `max_time` is refused on a cached run,
            since what it produces depends on the clock (bound the length with `max_new_tokens`).
        batch_size, device: how to run; never part of the key.
        model_dtype, gguf_file, load_kwargs: how to load a model given as a path or Hub name.
            `model_dtype=None` picks bfloat16 on a CUDA GPU that supports it, float32 elsewhere (the
            dtype is always part of the key).
        speedups: for a model loaded here on a CUDA GPU, try flash_attention_2 -> sdpa -> eager (each
            failure logged); on CPU nothing changes. What took effect is in `metadata["load"]`.
        compile_decode: on a CUDA GPU, use a static KV cache so transformers compiles the decode step
            (pays on long runs; the first batches pay the compilation). Ignored, with a note, on CPU.
        distributed: under torchrun / accelerate launch (WORLD_SIZE > 1), shard the examples across the
            ranks; every rank must then call `evaluate_model`. False evaluates everything in this process
            (for a script that calls it on rank 0 only).
        use_prediction_cache, force_recompute, cache_max_age_days, predictions_cache_dir, lock_stale_after:
            the prediction cache's familiar settings as keywords; they build `cache` when it is not given.
            `cache_max_age_days` defaults to the predictions' own age (30 days, the same as `CacheConfig()`
            gives them); `lock_stale_after` is a `timedelta` (a number of seconds still works, with a
            `FutureWarning`). `predictions_cache_dir=None` means `<cache root>/predictions`, where the root
            is $HF_CACHEHOOKS_HOME, else `outputs/cache`.
        cache_dir, clock: deprecated (a `FutureWarning`, once): pass `cache=CacheConfig(root=...)` and
            `cache=CacheConfig(clock=...)`.
        generation_config: generation settings as a `transformers.GenerationConfig` (only the values it
            sets away from transformers' defaults count, as in `model.generate`) or a mapping, instead of
            the five fields above; what it leaves out stays greedy with `max_new_tokens=64`.
        cache: the prediction cache's settings as one `CacheConfig`, instead of the keywords. Read
            `resolved_cache` for the settings in effect, whichever way they were given.

    Raises:
        ConfigError: an unknown task, a bad batch size, a cache keyword that disagrees with `cache`, or a
            generation field set next to `generation_config`.

    Example:
        >>> EvalConfig(prompt_template="Q: {question}\\nA:", max_new_tokens=32).task
        'generation'
        >>> EvalConfig(cache_max_age_days=7) == EvalConfig(cache=CacheConfig(max_age=timedelta(days=7)))
        True
    """

    task: str = "generation"
    input_field: str = "question"
    reference_field: str = "answer"
    prompt_template: str | None = None
    use_chat_template: bool = False
    system_prompt: str | None = None
    metrics: tuple[str, ...] = ("exact_match", "contains_answer")
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    generation_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    device: str | None = None
    model_dtype: str | None = None
    speedups: bool = True
    compile_decode: bool = False
    distributed: bool = True
    gguf_file: str | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # the cache settings as keywords (equality compares `resolved_cache`, whichever spelling built it)
    use_prediction_cache: bool = field(default=True, compare=False)
    force_recompute: bool = field(default=False, compare=False)
    cache_max_age_days: float | None = field(default=days(DEFAULT_MAX_AGE["EvalConfig"]), compare=False)
    predictions_cache_dir: str | None = field(default=None, compare=False)
    cache_dir: str | None = field(default=None, compare=False)
    lock_stale_after: timedelta | float = field(default=timedelta(seconds=60), compare=False)
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False, repr=False)
    generation_config: Mapping[str, Any] | HasToDict | None = None
    cache: CacheConfig | None = field(default=None, compare=False)
    resolved_cache: CacheConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not supported. Use one of: {', '.join(TASKS)}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1.")
        if self.task == "classification" and self.use_chat_template:
            raise ConfigError("use_chat_template=True applies to generation only; set task='generation'.")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not isinstance(self.lock_stale_after, timedelta):
            warn_deprecated("EvalConfig", "lock_stale_after=<seconds>", "lock_stale_after=timedelta(seconds=...)")
        object.__setattr__(self, "lock_stale_after", duration(self.lock_stale_after))  # one unit: timedelta
        defaults = {f.name: f.default for f in fields(self) if f.name in CACHE_KEYWORDS}
        object.__setattr__(
            self,
            "resolved_cache",
            settle(self.cache, {name: getattr(self, name) for name in CACHE_KEYWORDS}, defaults, "EvalConfig"),
        )
        if self.generation_config is not None:
            object.__setattr__(self, "generation_config", generation_settings(self.generation_config))
            changed = [
                f.name for f in fields(self) if f.name in GENERATION_FIELDS and getattr(self, f.name) != f.default
            ]
            changed += ["generation_kwargs"] if self.generation_kwargs else []
            if changed:
                raise ConfigError(
                    f"EvalConfig got generation_config and {', '.join(changed)}; put "
                    f"{', '.join(changed)} inside generation_config (or drop generation_config)."
                )

    def generation_overrides(self) -> dict:
        """The generation settings the user set (None means: keep the model's default)."""
        wanted: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.temperature is not None:
            wanted["temperature"] = self.temperature
        if self.top_p is not None:
            wanted["top_p"] = self.top_p
        wanted.update(self.generation_kwargs)
        if self.generation_config is not None:
            wanted.update(generation_settings(self.generation_config))
        return wanted

    def prompt_spec(self) -> dict:
        """How prompts are built from rows: part of the key."""
        return {
            "task": self.task,
            "input_field": self.input_field,
            "template": self.prompt_template,
            "chat_template": self.use_chat_template,
            "system_prompt": self.system_prompt,
        }

    def with_(self, **changes: Any) -> EvalConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


def generation_settings(value: Mapping[str, Any] | HasToDict) -> dict[str, Any]:
    """Generation settings as a plain dict: a mapping as is, a `GenerationConfig` by the values it sets.

    `to_diff_dict()` is preferred to `to_dict()` where the object has it: a `GenerationConfig` lists every
    field, and its defaults would override the model's own (transformers' `generate` ignores them too).
    None values are dropped: None means "keep the model's default", as for `temperature=None`.

    Raises:
        ConfigError: `value` is neither a mapping nor has `to_dict()`.
    """
    if isinstance(value, Mapping):
        raw = dict(value)
    else:
        to_dict = getattr(value, "to_diff_dict", None) or getattr(value, "to_dict", None)
        if not callable(to_dict):
            raise ConfigError(
                f"generation_config={value!r:.80} is neither a mapping nor a transformers "
                "GenerationConfig; pass e.g. {'max_new_tokens': 32} or GenerationConfig(...)."
            )
        raw = dict(to_dict())
    return {
        k: v for k, v in raw.items() if v is not None and not str(k).startswith("_") and k != "transformers_version"
    }
