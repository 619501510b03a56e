"""The lens over a range of positions (positions x layers: the classic logit-lens picture) and each turn's lens
state, as the chat server returns them.

A range is read turn by turn from the cache. A turn whose lens the worker has not reached is computed on the
spot from its stored hidden states and stored (so the worker skips it); a turn's last token, whose next token
came with a later turn, gets its next-token figures computed on the spot (one token).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .bodies import BadRequest
from .cache import TokenCache
from .files import STATS
from .lens import LensWorker, next_token_ids

MAX_RANGE = 4096  # positions one request may ask for
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text as the page shows it: its decoded text, or for a byte of a longer character (which decodes
    to U+FFFD alone) the byte as `<0xNN>` (byte-level BPE, as in GPT-2 and SmolLM2, and SentencePiece byte tokens)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return str(text)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and _BYTE.fullmatch(piece):
        return f"<0x{piece[3:5].upper()}>"
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(c in table for c in piece):
        raw = bytes(table[c] for c in piece)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in raw)
    return str(text)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE vocabulary writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def lens_range(
    cache: TokenCache, lens: LensWorker | None, conv_id: str, start: int, end: int | None, text: Callable[[int], str]
) -> dict[str, Any]:
    """Top-1 guess, its probability, the actual next token's probability and rank, entropy and KL to the final
    layer, for every position in [start, end) (default: the turn holding `start`) and every layer.

    Returns:
        Columns of shape (positions, layers) under top1 (ids), top1_prob and each name in `files.STATS`, the
        texts of the top-1 ids under vocab, the positions' tokens and next tokens, and `computed`: the
        positions whose figures were computed for this request.

    Raises:
        BadRequest: 404 for an unknown conversation, 400 for a bad range, 503 when a turn cannot be read or its
            lens cannot be computed (no model).
    """
    length, turns = cache.length(conv_id), cache.turns(conv_id)
    if not turns:
        raise BadRequest(f"No conversation {conv_id!r}.", 404)
    if not 0 <= start < length:
        raise BadRequest(f"start={start}: give a position from 0 to {length - 1}.")
    if end is None:
        end = next(t["start"] + t["count"] for t in turns if t["start"] <= start < t["start"] + t["count"])
    if not start < end <= length or end - start > MAX_RANGE:
        raise BadRequest(
            f"end={end}: give a position after start={start}, at most {length} (the conversation's "
            f"length) and at most {MAX_RANGE} positions on."
        )
    columns: dict[str, list[np.ndarray]] = {n: [] for n in ("token_ids", "top1", "top1_prob", *STATS)}
    computed: list[int] = []
    for turn in turns:
        first, stop = max(start, turn["start"]), min(end, turn["start"] + turn["count"])
        if first >= stop:
            continue
        arrays = _turn_with_lens(cache, lens, conv_id, turn["start"], computed)
        rows = slice(first - turn["start"], stop - turn["start"])
        stats = arrays["stats"][rows].copy()
        last = turn["start"] + turn["count"] - 1
        if first <= last < stop and np.isnan(stats[-1, 0, 2]) and last + 1 < length:
            follow = cache.tokens(conv_id, last + 1, last + 2)
            if lens is not None and follow:  # the next token came with a later turn: one token on the spot
                stats[-1] = lens.for_token(arrays["hidden"][-1], follow[0].token_id)[2]
                computed.append(last)
        columns["token_ids"].append(np.asarray(arrays["token_ids"][rows]))
        columns["top1"].append(np.asarray(arrays["topk_ids"][rows, :, 0]))
        columns["top1_prob"].append(np.asarray(arrays["topk_probs"][rows, :, 0], np.float32))
        for i, name in enumerate(STATS):
            columns[name].append(stats[:, :, i])
    out = {name: np.concatenate(parts) for name, parts in columns.items()}
    token_ids = out.pop("token_ids").tolist()
    following = cache.tokens(conv_id, end, end + 1)
    next_ids = token_ids[1:] + ([following[0].token_id] if following else [None])
    top1 = out["top1"]
    return {
        "conversation_id": conv_id,
        "start": start,
        "end": end,
        "layers": int(top1.shape[1]),
        "tokens": [text(t) for t in token_ids],
        "token_ids": token_ids,
        "next_tokens": [None if t is None else text(t) for t in next_ids],
        "vocab": {str(i): text(i) for i in np.unique(top1).tolist()},
        **{name: np.round(column, 5) if column.dtype.kind == "f" else column for name, column in out.items()},
        "computed": computed,
    }


def _turn_with_lens(
    cache: TokenCache, lens: LensWorker | None, conv_id: str, start: int, computed: list[int]
) -> dict[str, np.ndarray]:
    arrays = cache.turn_arrays(conv_id, start)
    if arrays is None:
        raise BadRequest(
            f"The turn of conversation {conv_id!r} from token {start} cannot be read now (damaged, "
            "or evicted after a failed disk write); the server log names the cause.",
            503,
        )
    if "topk_ids" in arrays and "stats" in arrays:
        return arrays
    if lens is None:
        raise BadRequest(
            "This turn's lens is not computed yet and the server has no model; start it with the "
            "model that wrote the conversation.",
            503,
        )
    if lens.wait_turn(conv_id, start, timeout=120):  # being computed now: its result, not a second computation
        arrays = cache.turn_arrays(conv_id, start) or arrays
        if "topk_ids" in arrays and "stats" in arrays:
            return arrays
    lens.prioritize(conv_id, start)  # whatever this request leaves undone comes next
    ids, probs, stats = lens.readout(arrays["hidden"], next_token_ids(cache, conv_id, start, arrays))
    if "topk_ids" in arrays:  # a lens stored without its figures keeps its top-k; the figures join it
        ids, probs = arrays["topk_ids"], arrays["topk_probs"]
    cache.add_lens(conv_id, start, ids, probs, stats)
    computed.extend(range(start, start + len(ids)))
    return {**arrays, "topk_ids": ids, "topk_probs": probs, "stats": stats}


def turn_states(cache: TokenCache, lens: LensWorker | None, conv_id: str) -> list[dict[str, Any]]:
    """Per turn: its range, and whether its lens is "done", "computing" (with tokens done) or "pending" (with
    its place in the worker's queue)."""
    queue = [] if lens is None else lens.progress()
    ours = [row for row in queue if row["conv_id"] == conv_id]
    states = []
    for t in cache.turns(conv_id):
        state: dict[str, Any] = {"start": t["start"], "end": t["start"] + t["count"], "lens": "done"}
        if t["k"] is None:
            place = next(
                (i for i, row in enumerate(queue) if row["conv_id"] == conv_id and row["start"] == t["start"]), None
            )
            row = next((r for r in ours if r["start"] == t["start"]), None)
            computing = place == 0 and row is not None and row["tokens"] is not None
            state.update(
                lens="computing" if computing else "pending",
                done=row["done"] if computing and row else 0,
                queue_position=place,
            )
        states.append(state)
    return states
