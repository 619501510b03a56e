"""Token-by-token decoding for the completion server: sampling, stop strings, finish reasons, log-probabilities.

`decode` runs a left-padded batch one token at a time on the model's KV cache and yields after every step,
so the server can stream. It samples as vLLM does (repetition, frequency and presence penalties on the logits,
then temperature, top-k, top-p) and reports what vLLM's OpenAI API gives: the text without the stop string
(and without a half UTF-8 character at the end), `finish_reason` ("stop" for an end-of-sequence token, a stop
token or a stop string, "length" at `max_tokens`), `stop_reason` (the stop string or stop token id), the
number of tokens (an end-of-sequence or stop token counts), and for each token, the end-of-sequence or stop
token included, its log-probability under the model (before penalties, temperature and top-p) with the top-k
alternatives and the token itself.
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
    top_k: int = 0  # 0 or -1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


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
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the row
    ended_by_token: bool = False  # an end-of-sequence or stop token ended it: generated, counted, not in `ids`

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, as vLLM counts them: the end-of-sequence or stop token too."""
        return len(self.ids) + int(self.ended_by_token)

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


def _top(tokenizer: Any, logp: Any, k: int, chosen: int, chosen_text: str) -> dict[str, float]:
    """The k likeliest next tokens by text, and the `chosen` one under `chosen_text` (the text the token list
    gives it), as vLLM gives them: up to k + 1. Two that decode alike (specials, byte pieces) keep raw names."""
    values, ids = logp.topk(k) if k else (logp[:0], logp[:0].long())
    pairs = [(float(logp[chosen]), chosen)] + [(v, i) for v, i in zip(values.tolist(), ids.tolist()) if i != chosen]
    top: dict[str, float] = {}
    for value, token in pairs:
        text = chosen_text if token == chosen else tokenizer.decode([token])
        if not text or text in top:
            text = tokenizer.convert_ids_to_tokens(token) or f"<id {token}>"  # ids past the tokenizer's vocab
        top[text] = value
    return top


def _penalise(logits: Any, settings: Settings, prompts: Any, outputs: list[list[int]]) -> Any:
    """vLLM's penalties: repetition over prompt and output tokens, frequency and presence over output tokens."""
    import torch

    if settings.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)  # (rows, vocab)
        for r, (prompt, out) in enumerate(zip(prompts, outputs)):
            seen[r, torch.tensor(prompt + out, dtype=torch.long, device=logits.device)] = True
        scaled = torch.where(logits > 0, logits / settings.repetition_penalty, logits * settings.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if settings.frequency_penalty or settings.presence_penalty:
        counts = torch.zeros_like(logits)  # (rows, vocab)
        for r, out in enumerate(outputs):
            if out:
                counts[r].index_add_(0, torch.tensor(out, device=logits.device), torch.ones(len(out)).to(counts))
        logits = logits - settings.frequency_penalty * counts - settings.presence_penalty * (counts > 0).to(counts)
    return logits


def _choose(logits: Any, settings: Settings, generator: Any) -> Any:
    import torch

    if settings.temperature < 1e-5:  # vLLM's greedy threshold
        return logits.argmax(-1)
    logits = logits / settings.temperature
    if settings.top_k > 0 and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[:, -1:]  # (rows, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (rows, vocab)
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
            top = _top(tokenizer, logp[pos - 1], k, real[pos], piece) if k is not None else None
            row.prompt.append(TokenInfo(piece, float(logp[pos - 1, real[pos]]), top))


def _left_padded(tokenizer: Any, prompts: Sequence[str | Sequence[int]], special: bool, pad: int) -> tuple:
    """(ids, mask, token ids per prompt): texts tokenized, token ids as given, left-padded into one batch."""
    import torch

    lists = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts
    ]
    width = max(len(ids) for ids in lists)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in lists], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in lists], dtype=torch.long)
    return ids, mask, lists


def decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    settings: Settings,
    add_special_tokens: bool = True,
    max_model_len: int | None = None,
) -> Generator[list[Row], None, None]:
    """Decode every prompt (a text, or token ids used as they are) in one batch; yields the rows after the
    prompt pass and after each new token.

    With `max_model_len`, each row stops ("length") where prompt and completion fill the context, as vLLM trims
    `max_tokens`. The last yield has every row finished. Rows that finish early are padded (output ignored).
    """
    import torch

    from .._models.runners import eval_mode, pad_id

    device = next(model.parameters()).device
    eos, pad = _eos_ids(model, tokenizer), pad_id(tokenizer)
    ids, mask, prompt_ids = _left_padded(tokenizer, prompts, add_special_tokens, pad)
    ids, mask = ids.to(device), mask.to(device)
    rows = [Row(prompt_tokens=len(p)) for p in prompt_ids]
    room = max_model_len if max_model_len is not None else settings.max_tokens + max(len(p) for p in prompt_ids)
    limits = [max(0, min(settings.max_tokens, room - row.prompt_tokens)) for row in rows]
    if settings.ignore_eos:
        eos = set()
    stop_ids = set(settings.stop_token_ids)
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else int(torch.seed()) % 2**63)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # newer transformers take (and return) the KV cache as `cache`; older ones as `past_key_values`
    kv_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, step_ids = None, ids
    for row, limit in zip(rows, limits):
        if limit == 0:
            row.finish_reason = "length"
    for _ in range(max(*limits, int(settings.prompt_logprobs))):  # max_tokens=0 may still score
        with torch.no_grad(), eval_mode(model):  # per step: the model is the caller's again between yields
            out = model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kv_name: past}
            )
        if past is None and settings.prompt_logprobs:
            for r, row in enumerate(rows):
                _score_prompt(tokenizer, out.logits[r], ids[r], mask[r], row, settings.logprobs)
        if all(row.finish_reason is not None for row in rows):
            break
        past = getattr(out, kv_name)
        logits = out.logits[:, -1, :].float()  # (rows, vocab)
        chosen = _choose(_penalise(logits, settings, prompt_ids, [row.ids for row in rows]), settings, generator)
        logp = torch.log_softmax(logits, dim=-1) if settings.logprobs is not None else None
        for r, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            token = int(chosen[r])
            if token in eos or token in stop_ids:
                row.finish_reason, row.ended_by_token = "stop", True
                if logp is not None:  # listed as vLLM lists it (its text is not in the completion's)
                    ended = tokenizer.decode([token])
                    row.tokens.append(
                        TokenInfo(
                            ended, float(logp[r, token]), _top(tokenizer, logp[r], settings.logprobs or 0, token, ended)
                        )
                    )
                row.stop_reason = token if token in stop_ids and token not in eos else None
                row.text = _whole_characters(row.text)
                continue
            row.ids.append(token)
            before, row.text = row.text, tokenizer.decode(row.ids, skip_special_tokens=True)
            if logp is not None:  # the token's text is what it added, so the tokens add up to the text
                piece = row.text[len(before) :] if row.text.startswith(before) else tokenizer.decode([token])
                row.tokens.append(
                    TokenInfo(
                        piece,
                        float(logp[r, token]),
                        _top(tokenizer, logp[r], settings.logprobs or 0, token, piece),
                    )
                )
            _apply_stop(row, settings.stop)
            if row.finish_reason is None and len(row.ids) == limits[r]:
                row.finish_reason = "length"
                row.text = _whole_characters(row.text)
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
    first = min(cuts)
    row.stop_reason = next(s for s in stop if row.text.find(s) == first)
    row.text = row.text[:first]
    row.finish_reason = "stop"
    length = 0
    for n, token in enumerate(row.tokens):  # keep the tokens that lie wholly before the cut
        length += len(token.text)
        if length > len(row.text):
            del row.tokens[n:]
            break


def _whole_characters(text: str) -> str:
    """`text` without the half UTF-8 character a completion cut mid-character ends in (vLLM never shows it)."""
    return text.rstrip("\ufffd")
