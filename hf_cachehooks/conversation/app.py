"""HTTP API over the conversation token cache (FastAPI, optional extra `server`); binds to 127.0.0.1.

    POST   /api/chat/cached                          {"conversation_id"?, "message", "max_new_tokens"?}
    GET    /api/cache/token/{conv_id}/{token_idx}?context_size=15[&compute=false]
    GET    /api/cache/status
    GET    /                                         the web page (web/chat.html beside this module, no build step)
    GET    /api/conversations
    GET    /api/conversations/{conv_id}                 every token (position, text), the turns and the messages
    POST   /api/conversations/{conv_id}/pin          {"pinned": true}
    DELETE /api/conversations/{conv_id}

A malformed conversation id is a 400 before any file is touched; an index out of range is a 404.
A chat reply is generated with `lens.generate_turn`, which keeps every token's hidden states from the
generation's own forward passes; the reply returns once they are stored, and a `LensWorker` thread then
computes and stores the turn's lens from them. A click that comes first gets its token's lens computed on
the spot (`"lens": "computed"`, tens of ms on a CPU) instead of waiting. The model's KV cache of the most
recent conversations stays in memory, so a new turn does not run the history again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import ConfigError, MissingDependencyError
from .cache import TokenCache
from .files import validate_conv_id
from .lens import LensWorker, generate_turn

log = logging.getLogger(__name__)


def _record_json(record: Any, text: Callable[[int], str], topk_ids: Any, topk_probs: Any) -> dict:
    return {
        "position": record.index,
        "token_id": record.token_id,
        "token": text(record.token_id),
        "layers": [{"layer": layer,
                    "top_k": [{"token": text(i), "token_id": i, "prob": p}
                              for i, p in zip(ids.tolist(), probs.astype(np.float32).tolist())]}
                   for layer, (ids, probs) in enumerate(zip(topk_ids, topk_probs))],
    }


def create_app(model: Any, tokenizer: Any, cache: TokenCache, k: int = 10, max_new_tokens: int = 64,
               keep_kv: int = 2) -> Any:
    """The FastAPI app serving one model and its token cache.

    Args:
        k: lens predictions kept per layer.
        keep_kv: conversations whose model KV cache stays in memory between turns (0: rerun the history).
    """
    try:
        import torch
        from fastapi import Body, FastAPI, HTTPException
        from fastapi.responses import HTMLResponse, Response
    except ImportError as exc:
        raise MissingDependencyError("The chat server needs FastAPI: pip install 'hf_cachehooks[server]'.") from exc

    app = FastAPI(title="hf_cachehooks conversation cache")
    text = functools.lru_cache(maxsize=1 << 17)(lambda token_id: tokenizer.decode([token_id]))  # at most the vocab
    generating = threading.Lock()  # one model: one generation at a time
    kv: OrderedDict[str, tuple[int, Any]] = OrderedDict()  # conv_id -> (tokens it holds, the model's cache)
    lens = LensWorker(model, cache, k) if model is not None else None
    app.state.lens_worker = lens
    if lens is not None:
        for conv_id, start, _ in cache.pending_lens():  # turns a stopped server left without a lens
            lens.submit(conv_id, start)

    def checked(conv_id: str) -> str:
        try:
            return validate_conv_id(conv_id)
        except ConfigError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/api/chat/cached")
    def chat(body: dict = Body(...)) -> dict:  # noqa: B008 (FastAPI's way to take a JSON body)
        conv_id = checked(body.get("conversation_id") or uuid.uuid4().hex[:16])
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise HTTPException(400, "Send {'message': '<text>'} with a non-empty message.")
        limit = int(body.get("max_new_tokens", max_new_tokens))
        with generating:
            messages = (cache.meta(conv_id) or {}).get("messages", [])
            before = tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""
            after = tokenizer.apply_chat_template(messages + [{"role": "user", "content": message}],
                                                  add_generation_prompt=True, tokenize=False)
            if not after.startswith(before):
                raise HTTPException(500, "The chat template does not render earlier turns identically.")
            history = cache.token_ids(conv_id).tolist()
            if len(history) != cache.length(conv_id):
                raise HTTPException(503, f"Conversation {conv_id!r} has turns that can no longer be read "
                                         "(evicted from memory after a failed disk write); start a new one.")
            new = tokenizer(after[len(before):], add_special_tokens=not messages)["input_ids"]
            input_ids = torch.tensor([history + list(new)])
            held, past = kv.pop(conv_id, (0, None))
            turn = generate_turn(model, tokenizer, input_ids, len(history), max_new_tokens=limit, k=None,
                                 past_key_values=past if held == len(history) and history else None, do_sample=False)
            messages = messages + [{"role": "user", "content": message},
                                   {"role": "assistant", "content": turn.text.strip()}]
            start, end = cache.append_turn(conv_id, turn.token_ids, turn.hidden, meta={"messages": messages})
            if keep_kv > 0:
                kv[conv_id] = (end, turn.past_key_values)
                while len(kv) > keep_kv:
                    kv.popitem(last=False)
        if lens is not None:
            lens.submit(conv_id, start)
        tokens = [{"position": start + i, "token": text(t)} for i, t in enumerate(turn.token_ids.tolist())]
        return {"conversation_id": conv_id, "response": turn.text.strip(), "cached": True, "turn": [start, end],
                "tokens": tokens}

    @app.get("/api/cache/token/{conv_id}/{token_idx}")
    def token(conv_id: str, token_idx: int, context_size: int = 15, compute: bool = True) -> Response:
        began = time.perf_counter()
        conv_id = checked(conv_id)
        record = cache.token(conv_id, token_idx)
        if record is None and 0 <= token_idx < cache.length(conv_id):
            raise HTTPException(503, f"Token {token_idx} of conversation {conv_id!r} is stored but cannot be read "
                                     "now (its turn file is damaged, or a memory-only turn was evicted after a "
                                     "failed disk write); the server log names the cause.")
        if record is None:
            raise HTTPException(404, f"No token {token_idx} in conversation {conv_id!r} "
                                     f"(it has {cache.length(conv_id)} tokens).")
        looked_up = time.perf_counter()
        topk_ids, topk_probs, source = record.topk_ids, record.topk_probs, "cached"
        if topk_ids is None and not compute:  # a prefetch: don't compete with the lens worker
            return Response(orjson.dumps({"token_position": token_idx, "lens": "pending"}), status_code=202,
                            media_type="application/json")
        if topk_ids is None:
            if lens is None:
                raise HTTPException(503, "This token's lens is not computed yet and the server has no model; "
                                         "start it with the model that wrote the conversation.")
            topk_ids, topk_probs = lens.for_token(record.hidden)
            source = "computed"
        context = cache.tokens(conv_id, max(0, token_idx - max(0, min(context_size, 256))), token_idx)
        body = orjson.dumps({
            "token_position": token_idx, "lens": source,
            "activations": _record_json(record, text, topk_ids, topk_probs),
            "context": [{"position": r.index, "token": text(r.token_id),
                         "prediction": None if r.topk_ids is None else text(int(r.topk_ids[-1][0]))} for r in context]})
        done = time.perf_counter()
        timing = f"lookup;dur={(looked_up - began) * 1e3:.3f}, handler;dur={(done - began) * 1e3:.3f}"
        return Response(body, media_type="application/json", headers={"Server-Timing": timing})

    @app.get("/api/cache/status")
    def status() -> dict:
        return {**cache.status(), "prefetch_range": cache.config.prefetch_range}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).parent / "web" / "chat.html").read_text(encoding="utf-8")

    @app.get("/api/conversations/{conv_id}")
    def conversation(conv_id: str) -> dict:
        conv_id = checked(conv_id)
        meta = cache.meta(conv_id)
        if meta is None:
            raise HTTPException(404, f"No conversation {conv_id!r}.")
        row = cache.conversation(conv_id) or {}
        return {"conversation_id": conv_id, "pinned": bool(row.get("pinned")), "messages": meta.get("messages", []),
                "turns": [[t["start"], t["start"] + t["count"]] for t in cache.turns(conv_id)],
                "tokens": [{"position": i, "token": text(t)} for i, t in enumerate(cache.token_ids(conv_id).tolist())]}

    @app.get("/api/conversations")
    def conversations() -> list:
        return cache.conversations()

    @app.post("/api/conversations/{conv_id}/pin")
    def pin(conv_id: str, body: dict = Body(default={"pinned": True})) -> dict:  # noqa: B008
        conv_id = checked(conv_id)
        if not cache.pin(conv_id, bool(body.get("pinned", True))):
            raise HTTPException(404, f"No conversation {conv_id!r}.")
        return {"conversation_id": conv_id, "pinned": bool(body.get("pinned", True))}

    @app.delete("/api/conversations/{conv_id}")
    def delete(conv_id: str) -> dict:
        conv_id = checked(conv_id)
        with generating:
            kv.pop(conv_id, None)
        if not cache.delete(conv_id):
            raise HTTPException(404, f"No conversation {conv_id!r}.")
        return {"conversation_id": conv_id, "deleted": True}

    return app
