"""Logit lens during generation: every token's hidden state at every layer and its top-k next-token guesses.

The hidden states come from the generation's own forward passes (`output_hidden_states`), plus one
single-token pass for the last generated token, which `generate` never feeds back. The lens maps
layer L's state through the final norm and the unembedding (`architecture` knows where they are);
the last layer is already normed by transformers, so it only gets the unembedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .architecture import locate, unembedding
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Turn:
    """One turn's new tokens, ready for `TokenCache.append_turn` (numpy arrays)."""

    token_ids: Any  # (T,) int32
    hidden: Any  # (T, L, H) float16
    topk_ids: Any  # (T, L, K) int32
    topk_probs: Any  # (T, L, K) float16
    text: str


def lens_topk(model: Any, hidden: Any, k: int = 10) -> tuple[Any, Any]:
    """Top-k next-token ids and probabilities per layer for hidden states (T, L, H) of layers 0..L-1.

    Raises:
        ConfigError: the model has no unembedding (an encoder) or no known final norm.
    """
    import torch

    _, blocks, norm = locate(model)
    head = unembedding(model)
    if head is None or norm is None:
        raise ConfigError(f"{type(model).__name__} has no final norm and unembedding to read a logit lens "
                          "through; use a causal LM (add its layout to hf_cachehooks/architecture.py).")
    n = len(blocks)
    with torch.no_grad():
        states = hidden.to(head.weight.dtype)  # (T, L, H)
        normed = torch.cat([norm(states[:, :n]), states[:, n:]], dim=1)  # layer n is normed already
        probs = torch.softmax(head(normed).float(), dim=-1)  # (T, L, vocab)
        top = probs.topk(k, dim=-1)
    return top.indices.to(torch.int32), top.values.to(torch.float16)


def generate_turn(model: Any, tokenizer: Any, input_ids: Any, cached_tokens: int, max_new_tokens: int = 32,
                  k: int = 10, **generate_kwargs: Any) -> Turn:
    """Generate a reply to `input_ids` (1, S) and return every token from `cached_tokens` on with its lens.

    Args:
        input_ids: the whole conversation so far, tokenized (1, S).
        cached_tokens: how many of its tokens the cache already holds (their records are not recomputed).
    """
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, output_hidden_states=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **generate_kwargs)
        steps = [torch.stack(step, dim=2)[0] for step in out.hidden_states]  # each (tokens, L, H)
        sequence = out.sequences[0]
        if len(sequence) > input_ids.shape[1]:  # generate never feeds back its last token: one more pass
            last = model(input_ids=sequence[None, -1:], past_key_values=out.past_key_values,
                         output_hidden_states=True, use_cache=True)
            steps.append(torch.stack(last.hidden_states, dim=2)[0])
    hidden = torch.cat(steps)[cached_tokens:]  # (T, L, H) for the new tokens
    topk_ids, topk_probs = lens_topk(model, hidden, k)
    new_ids = sequence[cached_tokens:]
    reply = tokenizer.decode(sequence[input_ids.shape[1]:], skip_special_tokens=True)
    return Turn(new_ids.to(torch.int32).numpy(), hidden.to(torch.float16).numpy(), topk_ids.numpy(),
                topk_probs.numpy(), reply)
