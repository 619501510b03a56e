"""Token-by-token decoding for the completion server: sampling, stop strings, finish reasons, log-probabilities.

`decode` runs a left-padded batch one token at a time on the model's KV cache and yields after every step,
so the server can stream. It reports what the OpenAI API promises: the text without the stop string,
`finish_reason` ("stop" for an end-of-sequence token or a stop string, "length" at `max_tokens`), the
number of tokens, and for each token its log-probability under the model (before temperature and top-p)
and the top-k alternatives.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Settings:
    """One request's decoding settings (`temperature == 0` is greedy; `logprobs`: alternatives per token)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False  # also score the prompt's own tokens (echo with logprobs)


@dataclass
class TokenInfo:
    """One token: its text, its log-probability and the `logprobs` most likely alternatives."""

    text: str
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class Row:
    """One sequence being decoded; `text` is final once `finish_reason` is set."""

    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt: list[TokenInfo] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None

    def delta(self, stop: Sequence[str]) -> str:
        """The text not streamed yet that no stop string can still take back; marks it streamed."""
        end = len(self.text)
        if self.finish_reason is None:
            hold = max((k for s in stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end -= hold
            while end > self.sent and self.text[end - 1] == "\ufffd":  # half a UTF-8 character
                end -= 1
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found.update(configured if isinstance(configured, list) else [configured])
    return {i for i in found if isinstance(i, int)}


def _top(tokenizer: Any, logp: Any, k: int) -> dict[str, float]:
    """The k likeliest next tokens by text; two that decode alike (specials, byte pieces) keep their raw names."""
    values, ids = logp.topk(k)
    top: dict[str, float] = {}
    for value, token in zip(values.tolist(), ids.tolist()):
        text = tokenizer.decode([token])
        if not text or text in top:
            text = tokenizer.convert_ids_to_tokens(token) or f"<id {token}>"  # ids past the tokenizer's vocab
        top[text] = value
    return top


def _choose(logits: Any, settings: Settings, generator: Any) -> Any:
    import torch

    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)  # (rows, vocab)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _score_prompt(tokenizer: Any, logits: Any, ids: Any, mask: Any, row: Row, k: int | None) -> None:
    """Log-probabilities of the prompt's own tokens (the first has none), as `echo` with `logprobs` reports."""
    import torch

    real = ids[mask.bool()].tolist()
    logp = torch.log_softmax(logits[mask.bool()].float(), dim=-1)  # (prompt_tokens, vocab)
    text = ""
    for pos in range(len(real)):
        before, text = text, tokenizer.decode(real[: pos + 1])
        piece = text[len(before) :] if text.startswith(before) else tokenizer.decode([real[pos]])
        if pos == 0:
            row.prompt.append(TokenInfo(piece, None, None))
        else:
            row.prompt.append(
                TokenInfo(piece, float(logp[pos - 1, real[pos]]), _top(tokenizer, logp[pos - 1], k) if k else None)
            )


def decode(
    model: Any, tokenizer: Any, texts: Sequence[str], settings: Settings, add_special_tokens: bool = True
) -> Generator[list[Row], None, None]:
    """Decode every text in one batch; yields the rows after the prompt pass and after each new token.

    The last yield has every row finished. Rows that finish early are padded (their output is ignored).
    """
    import torch

    from .._models.runners import encode_batch, eval_mode, pad_id

    device = next(model.parameters()).device
    batch = encode_batch(tokenizer, texts, side="left", add_special_tokens=add_special_tokens)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    rows = [Row(prompt_tokens=int(m.sum())) for m in mask]
    eos, pad = _eos_ids(model, tokenizer), pad_id(tokenizer)
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else int(torch.seed()) % 2**63)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # newer transformers take (and return) the KV cache as `cache`; older ones as `past_key_values`
    kv_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, step_ids = None, ids
    if settings.max_tokens == 0:
        for row in rows:
            row.finish_reason = "length"
    for _ in range(max(settings.max_tokens, int(settings.prompt_logprobs))):  # max_tokens=0 may still score
        with torch.no_grad(), eval_mode(model):  # per step: the model is the caller's again between yields
            out = model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kv_name: past}
            )
        if past is None and settings.prompt_logprobs:
            for r, row in enumerate(rows):
                _score_prompt(tokenizer, out.logits[r], ids[r], mask[r], row, settings.logprobs)
        if settings.max_tokens == 0:
            break
        past = getattr(out, kv_name)
        logits = out.logits[:, -1, :].float()  # (rows, vocab)
        chosen = _choose(logits, settings, generator)
        logp = torch.log_softmax(logits, dim=-1) if settings.logprobs is not None else None
        for r, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            token = int(chosen[r])
            if token in eos:
                row.finish_reason = "stop"
                continue
            row.ids.append(token)
            before, row.text = row.text, tokenizer.decode(row.ids, skip_special_tokens=True)
            if logp is not None:  # the token's text is what it added, so the tokens add up to the text
                piece = row.text[len(before) :] if row.text.startswith(before) else tokenizer.decode([token])
                row.tokens.append(
                    TokenInfo(
                        piece,
                        float(logp[r, token]),
                        _top(tokenizer, logp[r], settings.logprobs) if settings.logprobs else None,
                    )
                )
            _apply_stop(row, settings.stop)
            if row.finish_reason is None and len(row.ids) == settings.max_tokens:
                row.finish_reason = "length"
        if all(row.finish_reason is not None for row in rows):
            break
        yield rows
        step_ids = torch.tensor([[row.ids[-1] if row.finish_reason is None else pad] for row in rows], device=device)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
        positions = positions[:, -1:] + 1
    yield rows


def _apply_stop(row: Row, stop: Sequence[str]) -> None:
    """End the row at the first stop string, cutting it (and the tokens that made it) off the text."""
    cuts = [at for s in stop if (at := row.text.find(s)) != -1]
    if not cuts:
        return
    row.text = row.text[: min(cuts)]
    row.finish_reason = "stop"
    length = 0
    for n, token in enumerate(row.tokens):  # keep the tokens that lie wholly before the cut
        length += len(token.text)
        if length > len(row.text):
            del row.tokens[n:]
            break
