"""Chat turns whose stored token ids are exactly what the chat template gives for the conversation's messages.

A reply is generated from `apply_chat_template(messages + [user], add_generation_prompt=True)`. What the
model produced is not yet what the template gives for the finished turn: the template closes the turn
(ChatML's `<|im_end|>\\n`, Llama-3's `<|eot_id|>`), and the reply's text may tokenize differently from the
tokens sampled (stripped whitespace, special tokens dropped from the text). So after generating, the turn's
ids are taken from the template of the messages with the reply, and the tokens after the first difference
are run through the model once more (from the KV cache cut back to the common prefix), so every stored
hidden state comes from the prompt the template really produces, turn after turn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._models.runners import eval_mode
from ..errors import HFCacheHooksError
from .lens import Turn, cache_argument, generate_turn

log = logging.getLogger(__name__)


class TemplateMismatchError(HFCacheHooksError, ValueError):
    """The chat template renders the stored turns differently once more messages follow them."""


def template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """`apply_chat_template(messages)` as a list of token ids, whatever type this transformers returns."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def chat_turn(
    model: Any,
    tokenizer: Any,
    messages: list[dict],
    history: list[int],
    past_key_values: Any = None,
    max_new_tokens: int = 64,
    **generate_kwargs: Any,
) -> Turn:
    """Reply to `messages` (the last one the user's) and return the new tokens with their hidden states.

    Args:
        messages: the whole conversation, ending with the new user message.
        history: the token ids already stored (the template of `messages[:-1]`).
        past_key_values: a KV cache holding exactly `history` (None: run the history again).

    Returns:
        A `Turn` whose `token_ids` are `template_ids(messages + [reply])[len(history):]`, whose `text` is the
        reply as stored in the messages (stripped), and whose `past_key_values` hold every stored token.

    Raises:
        TemplateMismatchError: the template's rendering of the new messages does not start with `history`.
    """
    import torch

    n = len(history)
    prompt = template_ids(tokenizer, messages, add_generation_prompt=True)
    if prompt[:n] != history:
        raise TemplateMismatchError(
            f"The chat template renders the earlier turns differently once a new message follows (first "
            f"difference at token {common_prefix(prompt, history)} of {n}); continue in a new conversation."
        )
    turn = generate_turn(
        model,
        tokenizer,
        torch.tensor([prompt]),
        n,
        max_new_tokens=max_new_tokens,
        k=None,
        past_key_values=past_key_values if n else None,
        **generate_kwargs,
    )
    reply = turn.text.strip()
    produced = prompt + turn.token_ids[len(prompt) - n :].tolist()
    final = template_ids(tokenizer, [*messages, {"role": "assistant", "content": reply}])
    same = common_prefix(final, produced)
    if same < len(prompt):
        raise TemplateMismatchError(
            f"The chat template renders the prompt differently once the reply follows "
            f"(first difference at token {same} of {len(prompt)})."
        )
    if same == len(produced) == len(final):
        return Turn(turn.token_ids, turn.hidden, None, None, reply, turn.past_key_values)
    log.debug(
        "Reply tokens %d-%d re-run to match the chat template (%d produced, %d in the template).",
        same,
        len(final),
        len(produced),
        len(final),
    )
    cache = _cut(turn.past_key_values, len(produced), same)
    if cache is None:  # no cache to cut back: run the whole conversation once
        same, kept = 0, np.zeros((0, *turn.hidden.shape[1:]), turn.hidden.dtype)
    else:
        kept = turn.hidden[: same - n]
    if same < len(final):
        hidden, cache = _forward(model, final[same:], cache)
        kept = np.concatenate([kept, hidden[max(0, n - same) :]])
    hidden = kept
    return Turn(np.asarray(final[n:], np.int32), hidden, None, None, reply, cache)


def _cut(cache: Any, length: int, keep: int) -> Any:
    """The KV cache cut back to its first `keep` tokens (in place); None when it cannot be cut."""
    crop = getattr(cache, "crop", None)
    if crop is None:
        return None
    if keep < length:
        crop(keep - length)  # a negative count removes that many tokens, in transformers 4 and 5 alike
    return cache


def _forward(model: Any, ids: list[int], cache: Any) -> tuple[np.ndarray, Any]:
    """Hidden states (T, L, H) float16 of `ids` run after `cache`, and the cache holding them too."""
    import torch

    name = cache_argument(model)
    with torch.no_grad(), eval_mode(model):
        out = model(input_ids=torch.tensor([ids]), **{name: cache}, output_hidden_states=True, use_cache=True)
    hidden = torch.stack(out.hidden_states, dim=2)[0]  # (T, L, H)
    return hidden.to(torch.float16).numpy(), getattr(out, name)
