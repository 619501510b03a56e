"""Where completions come from: local `transformers` generation here, OpenAI-compatible servers in remote.py.

A backend maps (prompts, settings) to one completion per prompt, the text exactly as the model produced it
(an empty string is a valid completion); `None` marks a failure, which the generation cache never stores.
A backend may also offer `complete_samples(prompts, sampling, n)` (k samples per prompt in one go).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    """Generation settings shared by all backends (`temperature == 0` means greedy).

    `stop`: strings that end a completion; the first one found is cut off with all after it (as vLLM does).
    """

    temperature: float = 1.0
    max_tokens: int = 512
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest of the `stop` strings (without it); all of `text` when none occurs."""
    cuts = [at for s in stop if s and (at := text.find(s)) != -1]
    return text[: min(cuts)] if cuts else text


class Backend(Protocol):
    name: str

    def render(self, prompts: Sequence[str]) -> list[str]: ...

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]: ...


@dataclass
class TransformersBackend:
    """Batched local generation with left padding and, optionally, the tokenizer's chat template."""

    model: Any
    tokenizer: Any
    batch_size: int = 8
    use_chat_template: bool = False
    system_prompt: str | None = None
    name: str = "transformers"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str | None = None,
        compile_decode: bool = False,
        gguf_file: str | None = None,
        **options: Any,
    ) -> TransformersBackend:
        """Load a model folder or Hub name with the inference load plan (`_models/inference.py`: this rank's
        GPU, bf16 where supported, flash_attention_2 -> sdpa -> eager; on CPU as before), then wrap it."""
        from .._models.inference import load_planned, plan_load

        model, tokenizer, _ = load_planned(
            name_or_path, plan_load(dtype=dtype, compile_decode=compile_decode), gguf_file=gguf_file
        )
        return cls(model, tokenizer, **options)

    def render(self, prompts: Sequence[str]) -> list[str]:
        """The exact text the model sees (the `full_texts` start with it)."""
        if not self.use_chat_template:
            return list(prompts)
        from .._models.runners import chat_texts

        return chat_texts(prompts, self.tokenizer, self.system_prompt)

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]:
        import torch

        from .._models.runners import generate_texts

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            options["temperature"] = sampling.temperature
            if sampling.top_p is not None:
                options["top_p"] = sampling.top_p
        texts = self.render(prompts)
        out: list[str | None] = []
        for start in range(0, len(texts), self.batch_size):
            batch = generate_texts(
                self.model,
                self.tokenizer,
                texts[start : start + self.batch_size],
                options,
                add_special_tokens=not self.use_chat_template,
            )
            out += [cut_at_stop(text, sampling.stop) for text in batch]  # greedy or seeded: as if stopped there
        return out
