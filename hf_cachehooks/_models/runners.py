"""Where the model runs: batched generation and classification (`loading` turns a path into a model).

Everything here imports torch/transformers lazily, so a cache hit never pays for them. Nothing here
changes the caller's tokenizer or model: batches are padded by `encode_batch` (a tokenizer without a
pad token, like GPT-2's or Llama's, pads with its eos id), never by setting `tokenizer.pad_token`, and
every run is in eval mode (`eval_mode`), the caller's mode given back afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

# called with the number of tokens each decode step of `generate_texts` has made so far (see `on_each_token`)
_ON_TOKEN: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("on_token", default=None)


class RunSettings(Protocol):
    """How to run a batch (`EvalConfig` is one): device, chat template, generation settings."""

    @property
    def device(self) -> str | None: ...
    @property
    def use_chat_template(self) -> bool: ...
    @property
    def system_prompt(self) -> str | None: ...
    def generation_overrides(self) -> dict: ...


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Run `model` in eval mode (dropout off), then give each module back the mode it came in.

    What `Trainer.evaluate` does, so a cached answer is the deterministic one whatever mode the model
    came in (the Trainer leaves it in train mode after `train()`); the model identity says "eval".

    Example:
        >>> with eval_mode(model):  # doctest: +SKIP
        ...     logits = model(**batch).logits
    """
    modules = getattr(model, "modules", None)
    training = [m for m in modules() if m.training] if callable(modules) else []
    if not training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for module in training:  # each module as it was: `train()` would also switch the children
            module.training = True


def _device(model: Any, config: RunSettings) -> Any:
    if config.device is not None:
        model.to(config.device)
    return next(model.parameters()).device


def chat_texts(prompts: Sequence[str], tokenizer: Any, system_prompt: str | None = None) -> list[str]:
    """Wrap prompts in the tokenizer's chat template as one user turn (plus the system prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        from ..errors import ConfigError

        raise ConfigError("use_chat_template=True but this tokenizer has no chat_template; set it to False.")
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token's, else the eos token's (what generation itself falls back to)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
        if isinstance(token_id, list) and token_id:
            return int(token_id[0])
    return 0  # masked out anyway


def encode_batch(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    side: str | None = None,
    pad: int | None = None,
    add_special_tokens: bool = True,
    truncation: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Tokenize `texts` and pad them into tensors on `side` (default: the tokenizer's), without changing it.

    Gives what `tokenizer(texts, padding=True, return_tensors="pt")` gives when the tokenizer has a pad
    token; without one it pads with `pad_id` instead of requiring `tokenizer.pad_token = eos`.
    """
    import torch

    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length)
    ids = enc["input_ids"]
    width = max((len(row) for row in ids), default=0)
    fill = {
        "input_ids": pad_id(tokenizer) if pad is None else pad,
        "attention_mask": 0,
        "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0),
    }
    left = (side or tokenizer.padding_side) == "left"
    out = {}
    for name, value in fill.items():
        if name not in enc and name != "attention_mask":
            continue
        rows = enc[name] if name in enc else [[1] * len(row) for row in ids]
        out[name] = torch.tensor(
            [
                [value] * (width - len(row)) + list(row) if left else list(row) + [value] * (width - len(row))
                for row in rows
            ],
            dtype=torch.long,
        ).reshape(len(rows), width)
    return out


@contextlib.contextmanager
def on_each_token(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, each decode step of `generate_texts` calls `callback(new tokens so far in this batch)`.

    A progress bar sees generation move token by token instead of once per batch. The step is counted by a
    logits processor that returns the scores unchanged, so the completions are the same with or without it.
    """
    token = _ON_TOKEN.set(callback)
    try:
        yield
    finally:
        _ON_TOKEN.reset(token)


def _token_counter(callback: Callable[[int], None], given: Any) -> Any:
    """The logits processors `generate` gets: the caller's own (if any), then one that counts the steps."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Count(LogitsProcessor):
        steps = 0

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.steps += 1
            callback(self.steps)
            return scores  # unchanged: counting never changes a completion

    return LogitsProcessorList([*(given or []), _Count()])


def generate_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], options: dict[str, Any], add_special_tokens: bool = True
) -> list[str]:
    """Completions of already-rendered texts as one left-padded batch, decoded without the prompt.

    Left padding, because right padding would put pad tokens between prompt and completion. Shared
    by `evaluate_model` and the generation cache's local backend.
    """
    import torch

    device = next(model.parameters()).device
    batch = {
        name: t.to(device)
        for name, t in encode_batch(tokenizer, texts, side="left", add_special_tokens=add_special_tokens).items()
    }
    options = {**options, "pad_token_id": pad_id(tokenizer)}  # the tokenizer's pad (in the key), whatever is set
    callback = _ON_TOKEN.get()
    if callback is not None:
        options["logits_processor"] = _token_counter(callback, options.get("logits_processor"))
    with torch.no_grad(), eval_mode(model):
        out = model.generate(**batch, **options)
    sequences = getattr(out, "sequences", out)  # return_dict_in_generate=True gives an output object
    new_tokens = sequences[:, batch["input_ids"].shape[1] :]  # (batch, new_tokens)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], config: RunSettings) -> list[str]:
    """Greedy or sampled completions for one batch of prompts, stripped."""
    _device(model, config)
    texts = chat_texts(prompts, tokenizer, config.system_prompt) if config.use_chat_template else list(prompts)
    completions = generate_texts(
        model, tokenizer, texts, config.generation_overrides(), add_special_tokens=not config.use_chat_template
    )
    return [text.strip() for text in completions]


def classify(model: Any, tokenizer: Any, texts: Sequence[str], config: RunSettings) -> list[int]:
    """Predicted label ids for one batch.

    Padded with the model's own pad id, which its classification head looks for to find the last real
    token. A model without one cannot tell padding apart, so then each text runs alone, unpadded.
    """
    import torch

    device = _device(model, config)
    model_pad = getattr(model.config, "pad_token_id", None)
    groups = [list(texts)] if model_pad is not None else [[text] for text in texts]
    labels: list[int] = []
    for group in groups:
        batch = encode_batch(tokenizer, group, pad=model_pad, truncation=True)
        with torch.no_grad(), eval_mode(model):
            logits = model(**{name: t.to(device) for name, t in batch.items()}).logits  # (batch, num_labels)
        labels += logits.argmax(-1).tolist()
    return labels
