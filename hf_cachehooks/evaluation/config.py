"""Settings for `evaluate_model`, named as in the seed's base_config.py (frozen, env read at call time)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .._core.freshness import SYSTEM_CLOCK, Clock
from ..errors import ConfigError

TASKS = ("generation", "classification")


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
            over the model's own generation_config to form the effective config in the key.
        batch_size, device: how to run; never part of the key.
        model_dtype, gguf_file, load_kwargs: how to load a model given as a path or Hub name.
        use_prediction_cache, force_recompute, cache_max_age_days, predictions_cache_dir: the seed's
            cache settings. `predictions_cache_dir=None` means `<cache root>/predictions`, where the
            root is `cache_dir`, else $HF_CACHEHOOKS_HOME, else `outputs/cache`.
        clock: time source for expiry (tests pass a fake one).

    Example:
        >>> EvalConfig(prompt_template="Q: {question}\\nA:", max_new_tokens=32).task
        'generation'
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
    model_dtype: str = "float32"
    gguf_file: str | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    use_prediction_cache: bool = True
    force_recompute: bool = False
    cache_max_age_days: float | None = 30
    predictions_cache_dir: str | None = None
    cache_dir: str | None = None
    lock_stale_after: float = 60.0
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not supported. Use one of: {', '.join(TASKS)}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1.")
        if self.task == "classification" and self.use_chat_template:
            raise ConfigError("use_chat_template=True applies to generation only; set task='generation'.")
        object.__setattr__(self, "metrics", tuple(self.metrics))

    def generation_overrides(self) -> dict:
        """The generation settings the user set (None means: keep the model's default)."""
        wanted: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.temperature is not None:
            wanted["temperature"] = self.temperature
        if self.top_p is not None:
            wanted["top_p"] = self.top_p
        wanted.update(self.generation_kwargs)
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
