"""Logit lens during generation: every token's hidden state at every layer and its top-k next-token guesses.

The hidden states come from the generation's own forward passes (`output_hidden_states`), plus one
single-token pass for the last generated token, which `generate` never feeds back. The lens maps
layer L's state through the final norm and the unembedding (`architecture` knows where they are);
the last layer is already normed by transformers, so it only gets the unembedding.

The lens is (layers x vocabulary) multiply-adds per token: for SmolLM2 31 x 576 x 49,152, about 6.5 times
the model's own forward pass. So the chat server returns a reply as soon as its hidden states are stored
and computes the lens right after, from those states (`LensWorker`), never from a second model pass.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from .._models.architecture import locate, unembedding
from .._models.runners import eval_mode
from ..errors import ConfigError, KVCacheMismatchError

log = logging.getLogger(__name__)


@dataclass
class Turn:
    """One turn's new tokens, ready for `TokenCache.append_turn` (numpy arrays)."""

    token_ids: Any  # (T,) int32
    hidden: Any  # (T, L, H) float16
    topk_ids: Any  # (T, L, K) int32, or None when generated with k=None
    topk_probs: Any  # (T, L, K) float16, or None likewise
    text: str
    past_key_values: Any = None  # the model's cache over the whole conversation, for the next turn


def lens_topk(model: Any, hidden: Any, k: int = 10) -> tuple[Any, Any]:
    """Top-k next-token ids and probabilities per layer for hidden states (T, L, H) of layers 0..L-1.

    Raises:
        ConfigError: the model has no unembedding (an encoder) or no known final norm.
    """
    ids, probs, _ = lens_readout(model, hidden, k)
    return ids, probs


def lens_readout(model: Any, hidden: Any, k: int = 10, next_ids: Any = None) -> tuple[Any, Any, Any]:
    """`lens_topk` and, from the same logits, per-layer figures (T, L, 4) float32 (see `files.STATS`): entropy,
    KL(final layer || layer) in nats, and the probability and 0-based rank of `next_ids` (T,) (-1 or None:
    unknown, NaN).

    Raises:
        ConfigError: the model has no unembedding (an encoder) or no known final norm.
    """
    import numpy as np
    import torch

    _, blocks, norm = locate(model)
    head = unembedding(model)
    if head is None or norm is None:
        raise ConfigError(
            f"{type(model).__name__} has no final norm and unembedding to read a logit lens "
            "through; use a causal LM (add its layout to hf_cachehooks/_models/architecture.py)."
        )
    n = len(blocks)
    with torch.no_grad(), eval_mode(model):
        states = hidden.to(head.weight.dtype)  # (T, L, H)
        normed = torch.cat([norm(states[:, :n]), states[:, n:]], dim=1)  # layer n is normed already
        logp = torch.log_softmax(head(normed).float(), dim=-1)  # (T, L, vocab)
        probs = logp.exp()
        top = logp.topk(k, dim=-1)  # the same order as the probabilities; only k of them are exponentiated
        entropy = -(probs * logp).sum(-1)  # (T, L)
        final = probs[:, -1]  # (T, vocab)
        # KL(final || layer) = sum p_final log p_final - sum p_final log p_layer: a matrix product, no big temporary
        kl = (-entropy[:, -1:] - torch.einsum("tlv,tv->tl", logp, final)).clamp_min(0)
        nxt = torch.full(entropy.shape, float("nan")), torch.full(entropy.shape, float("nan"))
        if next_ids is not None:
            wanted = torch.as_tensor(np.asarray(next_ids, np.int64)).reshape(-1)  # (T,), -1: unknown
            unknown = wanted < 0
            if not unknown.all():
                index = wanted.clamp_min(0)[:, None, None].expand(-1, logp.shape[1], 1)
                chosen = logp.gather(-1, index)  # (T, L, 1), no copy of the (T, L, vocab) logits
                nxt = chosen[..., 0].exp(), (logp > chosen).float().sum(-1)  # a float sum: twice a bool one's speed
                nxt[0][unknown], nxt[1][unknown] = float("nan"), float("nan")
        stats = torch.stack([entropy, kl, *nxt], dim=-1)
    return top.indices.to(torch.int32), top.values.exp().to(torch.float16), stats


def cache_argument(model: Any) -> str:
    """The name the model's `forward` and `generate` take the KV cache under: `cache` in newer transformers,
    `past_key_values` before (still accepted there, with a FutureWarning); outputs carry it under the same name."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the name every version accepts
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def generate_turn(
    model: Any,
    tokenizer: Any,
    input_ids: Any,
    cached_tokens: int,
    max_new_tokens: int = 32,
    k: int | None = 10,
    past_key_values: Any = None,
    **generate_kwargs: Any,
) -> Turn:
    """Generate a reply to `input_ids` (1, S) and return every token from `cached_tokens` on with its states.

    Args:
        input_ids: the whole conversation so far, tokenized (1, S).
        cached_tokens: how many of its tokens the cache already holds (their records are not recomputed).
        k: top-k of the lens computed here; None leaves the lens to the caller (`lens_topk`, `LensWorker`).
        past_key_values: the previous turn's `Turn.past_key_values`, holding exactly the first
            `cached_tokens` tokens; the history is then not run again. It is updated in place.
    """
    import torch

    name = cache_argument(model)
    with torch.no_grad(), eval_mode(model):  # dropout off, as every cached answer is computed
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **{name: past_key_values},
            max_new_tokens=max_new_tokens,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **generate_kwargs,
        )
        steps = [torch.stack(step, dim=2)[0] for step in out.hidden_states]  # each (tokens, L, H)
        sequence, cache = out.sequences[0], getattr(out, name)
        if len(sequence) > input_ids.shape[1]:  # generate never feeds back its last token: one more pass
            last = model(input_ids=sequence[None, -1:], **{name: cache}, output_hidden_states=True, use_cache=True)
            steps.append(torch.stack(last.hidden_states, dim=2)[0])
            cache = getattr(last, name)
    hidden = torch.cat(steps)
    hidden = hidden if past_key_values is not None else hidden[cached_tokens:]  # (T, L, H) for the new tokens
    new_ids = sequence[cached_tokens:]
    if hidden.shape[0] != len(new_ids):
        raise KVCacheMismatchError(
            f"Got hidden states for {hidden.shape[0]} tokens, expected {len(new_ids)}: "
            f"past_key_values must hold exactly the first cached_tokens={cached_tokens} tokens."
        )
    topk_ids, topk_probs = lens_topk(model, hidden, k) if k is not None else (None, None)
    reply = tokenizer.decode(sequence[input_ids.shape[1] :], skip_special_tokens=True)
    return Turn(
        new_ids.to(torch.int32).numpy(),
        hidden.to(torch.float16).numpy(),
        None if topk_ids is None else topk_ids.numpy(),
        None if topk_probs is None else topk_probs.numpy(),
        reply,
        cache,
    )


class LensWorker:
    """A background thread that computes the lens of stored turns from their cached hidden states.

    Turns are done in the order submitted, except that `prioritize` moves one to the front (a click on a
    turn whose lens is pending). `progress` tells which turn is being computed and how far it got.

    Args:
        model: the causal LM whose final norm and unembedding read the states.
        cache: a `TokenCache`; turns are taken with `turn_arrays` and completed with `add_lens`.
        k: predictions kept per layer.
        chunk: tokens per matrix product (bounds the (chunk x layers x vocab) logits in memory).
    """

    def __init__(self, model: Any, cache: Any, k: int = 10, chunk: int = 8) -> None:
        self.model, self.cache, self.k, self.chunk = model, cache, k, chunk
        self._queue: deque[tuple[str, int]] = deque()
        self._current: tuple[str, int, int, int] | None = None  # conv_id, start, tokens done, tokens
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="hf_cachehooks-lens", daemon=True)
        self._thread.start()

    def submit(self, conv_id: str, start: int) -> None:
        """Queue the turn of `conv_id` that begins at token `start`."""
        with self._done:
            self._queue.append((conv_id, start))
            self._done.notify_all()

    def prioritize(self, conv_id: str, start: int) -> bool:
        """Move a queued turn to the front of the queue; False when it is not queued (done or being done)."""
        with self._done:
            if (conv_id, start) not in self._queue:
                return False
            self._queue.remove((conv_id, start))
            self._queue.appendleft((conv_id, start))
            return True

    def progress(self) -> list[dict]:
        """The turn being computed (with tokens done of its tokens), then the queued ones in order."""
        with self._done:
            rows = [] if self._current is None else [dict(zip(("conv_id", "start", "done", "tokens"), self._current))]
            return rows + [{"conv_id": c, "start": s, "done": 0, "tokens": None} for c, s in self._queue]

    def wait_turn(self, conv_id: str, start: int, timeout: float | None = None) -> bool:
        """If the worker is computing this very turn, wait until it is done; False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self._current is None or self._current[:2] != (conv_id, start), timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued turn is done; False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: not self._queue and self._current is None, timeout)

    def for_token(self, hidden: Any, next_id: int | None = None) -> tuple[Any, Any, Any]:
        """Lens and stats of one token's (layers, hidden) states now, for a click that comes before its turn is
        done (or whose next token came in a later turn)."""
        ids, probs, stats = lens_readout(
            self.model, as_tensor(hidden)[None], self.k, None if next_id is None else [next_id]
        )
        return ids[0].numpy(), probs[0].numpy(), stats[0].numpy()

    def readout(self, hidden: Any, next_ids: Any, progress: Any = None) -> tuple[Any, Any, Any]:
        """Lens and stats of a turn's (T, layers, hidden) states, `chunk` tokens at a time."""
        import torch

        states, parts = as_tensor(hidden), []
        for i in range(0, len(states), self.chunk):
            parts.append(lens_readout(self.model, states[i : i + self.chunk], self.k, next_ids[i : i + self.chunk]))
            if progress is not None:
                progress(min(len(states), i + self.chunk))
        return tuple(torch.cat([p[j] for p in parts]).numpy() for j in range(3))  # type: ignore[return-value]

    def _run(self) -> None:
        while True:
            with self._done:
                self._done.wait_for(lambda: bool(self._queue))
                conv_id, start = self._queue.popleft()
                self._current = (conv_id, start, 0, 0)
            try:
                self._complete(conv_id, start)
            except Exception:  # a worker that dies silently would leave every later turn without a lens
                log.exception(
                    "Lens of conversation %s from token %d failed; its tokens get the lens on click.", conv_id, start
                )
            with self._done:
                self._current = None
                self._done.notify_all()

    def _complete(self, conv_id: str, start: int) -> None:
        arrays = self.cache.turn_arrays(conv_id, start)
        if arrays is None or "topk_ids" in arrays:
            return  # deleted, evicted or done meanwhile
        count = len(arrays["token_ids"])

        def step(done: int) -> None:
            with self._done:
                self._current = (conv_id, start, done, count)

        step(0)
        ids, probs, stats = self.readout(arrays["hidden"], next_token_ids(self.cache, conv_id, start, arrays), step)
        self.cache.add_lens(conv_id, start, ids, probs, stats)


def next_token_ids(cache: Any, conv_id: str, start: int, arrays: dict) -> Any:
    """The id of the token after each of a turn's tokens (-1 for the last when no later turn is stored)."""
    import numpy as np

    ids = np.asarray(arrays["token_ids"], np.int64)
    following = cache.tokens(conv_id, start + len(ids), start + len(ids) + 1)
    return np.append(ids[1:], following[0].token_id if following else -1)


def as_tensor(hidden: Any) -> Any:
    """A cached hidden array as a torch tensor: float16 stays float16, uint16 (the token cache's stored
    bfloat16 bits) becomes bfloat16."""
    import numpy as np
    import torch

    tensor = torch.from_numpy(np.array(hidden))  # a writable copy: cached arrays are read-only views
    return tensor.view(torch.bfloat16) if tensor.dtype == torch.uint16 else tensor
