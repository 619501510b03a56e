"""Where the model is hooked: capture hidden states at chosen layers and pool them per token position.

Hooks sit on the base model (no unembedding ever runs), and the forward pass stops right after the
deepest requested layer, so caching layer 10 of a 30-layer model costs a third of a forward pass.
See `architecture` for exactly what "layer L" means.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .architecture import locate, num_layers
from .runners import eval_mode

log = logging.getLogger(__name__)

POSITIONS = ("last", "first", "mean", "all")


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer to skip the rest of the model."""


def check_layers(model: Any, layers: Sequence[int]) -> list[int]:
    """Sorted unique layers, each in 0..num_layers; a bad one raises naming the valid range."""
    n = num_layers(model)
    bad = [layer for layer in layers if not 0 <= layer <= n]
    if bad or not layers:
        raise ConfigError(
            f"Layers {bad or list(layers)} are not valid for {type(model).__name__}: use 0..{n} "
            f"(0 = embeddings, {n} = last block after the final norm)."
        )
    return sorted(set(int(layer) for layer in layers))


def capture(model: Any, batch: dict, layers: Sequence[int]) -> dict[int, Any]:
    """Run the base model on `batch` and return {layer: hidden states (batch, seq, hidden)}.

    Equals `model(**batch, output_hidden_states=True).hidden_states[layer]` for every layer.
    """
    base, blocks, norm = locate(model)
    layers = check_layers(model, layers)
    n, deepest = len(blocks), max(layers)
    captured: dict[int, Any] = {}
    handles = []

    def keep(layer: int, hidden: Any) -> None:
        captured[layer] = hidden.detach()
        if layer == deepest and deepest < n:
            raise _StopForward

    for layer in layers:
        if layer < n:  # the input of block L is hidden_states[L]

            def pre_hook(module, args, kwargs, layer=layer):
                keep(layer, args[0] if args else kwargs["hidden_states"])

            handles.append(blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:  # the last entry: after the final norm, or the last block's output for encoders

            def post_hook(module, args, output, layer=layer):
                keep(layer, output[0] if isinstance(output, tuple) else output)

            handles.append((norm if norm is not None else blocks[n - 1]).register_forward_hook(post_hook))
    try:
        with eval_mode(model):  # dropout off, the caller's mode given back
            base(**batch, use_cache=False) if _accepts_use_cache(base) else base(**batch)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _accepts_use_cache(base: Any) -> bool:
    return getattr(base.config, "is_decoder", True) or "use_cache" in base.config.to_dict()


@dataclass
class Pooled:
    """One batch of extracted rows: per-layer (rows, hidden) tensors plus where each row came from."""

    layers: dict[int, Any]
    example: Any  # (rows,) index of the example within the batch
    position: Any | None = None  # (rows,) token position, for positions="all"
    token_id: Any | None = None  # (rows,) token id, for positions="all"


def pool(hidden: dict[int, Any], mask: Any, input_ids: Any, positions: str) -> Pooled:
    """Reduce (batch, seq, hidden) states to rows by `positions`, ignoring padding on either side."""
    import torch

    if positions not in POSITIONS:
        raise ConfigError(f"positions={positions!r} is not supported. Use one of: {', '.join(POSITIONS)}.")
    batch, seq = mask.shape
    index = torch.arange(seq, device=mask.device)
    if positions == "all":
        rows = mask.bool()
        example, pos = rows.nonzero(as_tuple=True)
        # position counts real tokens only, so left and right padding give the same numbers
        real_pos = (mask.cumsum(1) - 1)[example, pos]
        return Pooled({L: h[rows] for L, h in hidden.items()}, example, real_pos, input_ids[rows])
    if positions == "mean":
        weights = mask.unsqueeze(-1).float()  # (batch, seq, 1)
        return Pooled(
            {L: ((h.float() * weights).sum(1) / weights.sum(1)).to(h.dtype) for L, h in hidden.items()},
            torch.arange(batch),
        )
    if positions == "last":
        where = (mask * index).argmax(1)  # the last real token
    else:
        where = (mask * (seq - index)).argmax(1)  # the first real token
    rows = torch.arange(batch)
    return Pooled({L: h[rows, where] for L, h in hidden.items()}, rows)


def batches(
    texts: Sequence[str],
    tokenizer: Any,
    batch_size: int,
    max_length: int | None = None,
    add_special_tokens: bool = True,
) -> Iterator[tuple[int, dict]]:
    """(start index, tokenized batch) over `texts`, padded on the tokenizer's side (never changing it)."""
    from .runners import encode_batch

    for start in range(0, len(texts), batch_size):
        enc = encode_batch(
            tokenizer,
            texts[start : start + batch_size],
            truncation=max_length is not None,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
        )
        yield start, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
