"""A validated request as the model takes it: token ids per prompt, the completion budget, decoding settings.

What vLLM 0.32 does, so a client sees the same answers: text prompts are rendered and tokenized, token-id
prompts are used as they are after a vocabulary check; a prompt longer than the context is a 400, and a
`max_tokens` that does not fit after the prompt is trimmed to the room left (each prompt its own), not refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import HFCacheHooksError
from .decoding import Settings
from .openai_schema import ChatRequest, CompletionRequest


class Refused(HFCacheHooksError):
    """A request the server answers with an HTTP error (`status`, the field at fault in `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def vocabulary_size(backend: Any) -> int:
    """Token ids below this are in the vocabulary (vLLM: the tokenizer's or the model's, the larger)."""
    config = getattr(backend.model, "config", None)
    return max(len(backend.tokenizer), getattr(config, "vocab_size", 0) or 0)


def completion_prompts(backend: Any, body: CompletionRequest) -> list[list[int]]:
    """Token ids per prompt: texts rendered (chat template when the backend uses one) and tokenized, ids as
    they came after a vocabulary check.

    Raises:
        Refused: a token id outside the vocabulary.
    """
    size = vocabulary_size(backend)
    out = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            text = backend.render([prompt])[0]
            out.append(backend.tokenizer(text, add_special_tokens=not backend.use_chat_template)["input_ids"])
            continue
        if (worst := max(prompt)) >= size:
            raise Refused(
                400,
                f"Token id {worst} is out of vocabulary (this model's ids run from 0 to {size - 1}).",
                "prompt",
            )
        out.append(list(prompt))
    return out


def echo_texts(backend: Any, body: CompletionRequest, prompts: Sequence[list[int]]) -> list[str]:
    """The prompt text `echo` puts before each completion: a text prompt as sent, token ids decoded."""
    return [p if isinstance(p, str) else backend.tokenizer.decode(ids) for p, ids in zip(body.prompts, prompts)]


def chat_prompt(backend: Any, body: ChatRequest, model_name: str) -> list[int]:
    """The conversation in the model's chat template, as token ids.

    Raises:
        Refused: the model has no chat template.
    """
    tokenizer = backend.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise Refused(400, f"The model `{model_name}` has no chat template; use /v1/completions.", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def budget(prompts: Sequence[Sequence[int]], wanted: int | None, max_model_len: int) -> int:
    """The `max_tokens` to decode with (decoding trims each prompt's to the room it leaves, as vLLM does).

    Raises:
        Refused: `wanted` alone exceeds the context, or a prompt leaves no room (vLLM's checks and words).
    """
    if wanted is not None and wanted > max_model_len:
        raise Refused(
            400,
            f"max_tokens={wanted} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
        )
    longest = max(len(p) for p in prompts)
    if longest > max_model_len:
        raise Refused(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{longest} input tokens, which exceeds this limit even without any output tokens. Please reduce the "
            "length of the input prompt.",
            "input_tokens",
        )
    if longest == max_model_len and wanted != 0:
        raise Refused(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{longest} input tokens, which leaves no room for output tokens. Please reduce the length of the "
            "input prompt.",
            "input_tokens",
        )
    return max_model_len if wanted is None else wanted


def settings(body: CompletionRequest | ChatRequest, max_tokens: int, logprobs: int | None, echo: bool) -> Settings:
    """The decoding settings of `body` (vLLM's defaults for what it leaves out)."""
    return Settings(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=echo, **body.sampling_fields())
