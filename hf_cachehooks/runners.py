"""Where the model runs: loading a model by path or name, batched generation and classification.

Everything here imports torch/transformers lazily, so a cache hit never pays for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any


def load_model(name_or_path: str, config: EvalConfig) -> Loaded:
    """Load model and tokenizer the way `config` says (dtype, gguf_file, extra kwargs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if config.task == "generation" else AutoModelForSequenceClassification
    options = dict(config.load_kwargs)
    if config.gguf_file:
        options["gguf_file"] = config.gguf_file
    log.info("Loading %s ...", name_or_path)
    model = auto.from_pretrained(name_or_path, dtype=getattr(torch, config.model_dtype), **options)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=config.gguf_file) if config.gguf_file \
        else AutoTokenizer.from_pretrained(name_or_path)
    return Loaded(model.eval(), tokenizer)


def load_options(config: EvalConfig) -> dict:
    """How a path is turned into a model: part of the files-state memo key, not of the cache key."""
    return {"task": config.task, "dtype": config.model_dtype, "gguf_file": config.gguf_file,
            "load_kwargs": dict(config.load_kwargs)}


def _device(model: Any, config: EvalConfig) -> Any:
    if config.device is not None:
        model.to(config.device)
    return next(model.parameters()).device


def chat_texts(prompts: Sequence[str], tokenizer: Any, system_prompt: str | None = None) -> list[str]:
    """Wrap prompts in the tokenizer's chat template as one user turn (plus the system prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        from .errors import ConfigError

        raise ConfigError("use_chat_template=True but this tokenizer has no chat_template; set it to False.")
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


def generate_texts(model: Any, tokenizer: Any, texts: Sequence[str], options: dict[str, Any],
                   add_special_tokens: bool = True) -> list[str]:
    """Completions of already-rendered texts as one left-padded batch, decoded without the prompt.

    Shared by `evaluate_model` and the generation cache's local backend.
    """
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # right padding would put pad tokens between prompt and completion
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True,
                          add_special_tokens=add_special_tokens).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**batch, **options, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[:, batch["input_ids"].shape[1] :]  # (batch, new_tokens)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], config: EvalConfig) -> list[str]:
    """Greedy or sampled completions for one batch of prompts, stripped."""
    _device(model, config)
    texts = chat_texts(prompts, tokenizer, config.system_prompt) if config.use_chat_template else list(prompts)
    completions = generate_texts(model, tokenizer, texts, config.generation_overrides(),
                                 add_special_tokens=not config.use_chat_template)
    return [text.strip() for text in completions]


def classify(model: Any, tokenizer: Any, texts: Sequence[str], config: EvalConfig) -> list[int]:
    """Predicted label ids for one batch."""
    import torch

    device = _device(model, config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True).to(device)
    with torch.no_grad():
        logits = model(**batch).logits  # (batch, num_labels)
    return logits.argmax(-1).tolist()
