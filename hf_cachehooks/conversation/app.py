"""HTTP API over the conversation token cache (FastAPI, optional extra `server`); binds to 127.0.0.1.

    POST   /api/chat/cached                  {"conversation_id"?, "message" | "messages", "max_new_tokens"?}
    GET    /api/cache/token/{conv_id}/{token_idx}?context_size=15[&compute=false]
    GET    /api/cache/lens/{conv_id}?start=&end=    positions x layers: top-1, actual next token, entropy, KL
    GET    /api/cache/status
    GET    /                                 the web page (web/chat.html beside this module, no build step)
    GET    /api/conversations
    GET    /api/conversations/{conv_id}      every token (position, text), the turns with their lens state, messages
    POST   /api/conversations/{conv_id}/pin  {"pinned": true | false}
    DELETE /api/conversations/{conv_id}

Every request must name an allowed host (loopback names, plus `allow_hosts`): a page on another site that
resolves its name to 127.0.0.1 (DNS rebinding) gets a 400, never a conversation. Bodies are validated
(`bodies`): 400 naming the field (a body that is not JSON, text that is not valid Unicode included), 413 over a
cap; the byte cap is counted as the body arrives, so it holds for chunked bodies too. A malformed conversation
id is a 400 before any file is touched; an index out of range is a 404. A reply is stored with its hidden states
and returned; a `LensWorker` thread then computes the turn's lens; a click that comes first gets its token's lens
computed on the spot and moves its turn to the front of the worker's queue. A reply whose client disconnects (or
that is still running when the server stops) ends at its next token and is not stored.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .._core.asgi import BodyCap
from ..errors import ConfigError, MissingDependencyError
from .bodies import BadRequest, Limits, parse_chat, parse_pinned
from .cache import TokenCache
from .chat import ChatService
from .files import validate_conv_id
from .lens import LensWorker
from .views import lens_range, token_text, turn_states

try:  # at module level, where FastAPI resolves the endpoints' annotations; `create_app` says when it is missing
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _record_json(record: Any, text: Callable[[int], str], topk_ids: Any, topk_probs: Any, stats: Any) -> dict:
    names = ("entropy", "kl_to_final", "next_prob", "next_rank")
    return {
        "position": record.index,
        "token_id": record.token_id,
        "token": text(record.token_id),
        "layers": [
            {
                "layer": layer,
                "top_k": [
                    {"token": text(i), "token_id": i, "prob": p}
                    for i, p in zip(ids.tolist(), probs.astype(np.float32).tolist())
                ],
                **({} if stats is None else {n: _finite(v) for n, v in zip(names, stats[layer].tolist())}),
            }
            for layer, (ids, probs) in enumerate(zip(topk_ids, topk_probs))
        ],
    }


def _finite(value: float) -> float | None:
    return None if value != value else value  # NaN (unknown: the last token's next one) travels as null


def _refusal(status: int, message: str) -> Any:
    """A `{"detail": message}` error in ASCII JSON (a message quoting the client's text always encodes)."""
    from fastapi.responses import Response

    return Response(json.dumps({"detail": message}), status_code=status, media_type="application/json")


class _HostGuard:
    """ASGI middleware: a request whose Host header is not one of `hosts` gets a 400 (no DNS rebinding)."""

    def __init__(self, app: Any, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"host"), "")
            if not host_allowed(host, self.hosts):
                message = (
                    f"Host {host[:80]!r} is not served here (allowed: {', '.join(self.hosts)}); "
                    "start the server with --allow-host NAME to serve it."
                )
                await _refusal(400, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether a Host header (with or without its port) names one of the allowed hosts."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":")[0]
    return name in {a.lower().strip("[]") for a in allowed}


def create_app(
    model: Any,
    tokenizer: Any,
    cache: TokenCache,
    k: int = 10,
    max_new_tokens: int = 64,
    keep_kv: int = 2,
    limits: Limits | None = None,
    allow_hosts: Iterable[str] = (),
) -> Any:
    """The FastAPI app serving one model and its token cache.

    Args:
        k: lens predictions kept per layer.
        max_new_tokens: reply length when a request does not say (ignored when `limits` is given).
        keep_kv: conversations whose model KV cache stays in memory between turns (0: rerun the history).
        limits: caps on reply length, message tokens and body bytes (default: `Limits(max_new_tokens)`).
        allow_hosts: Host names served besides the loopback ones (localhost, 127.0.0.1, ::1).
    """
    try:
        from fastapi import Body, FastAPI, HTTPException
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, Response
        from starlette.exceptions import HTTPException as AnyHTTPException  # FastAPI's own and Starlette's
    except ImportError as exc:
        raise MissingDependencyError("The chat server needs FastAPI: pip install 'hf_cachehooks[server]'.") from exc

    limits = limits or Limits(max_new_tokens=max_new_tokens, max_new_tokens_cap=max(1024, max_new_tokens))
    hosts = (*LOOPBACK, *allow_hosts)
    app = FastAPI(title="hf_cachehooks conversation cache")
    text = functools.lru_cache(maxsize=1 << 17)(lambda token_id: token_text(tokenizer, token_id))  # at most the vocab
    chat = ChatService(model, tokenizer, cache, limits, keep_kv)
    lens = LensWorker(model, cache, k) if model is not None else None
    app.state.lens_worker, app.state.chat = lens, chat
    if lens is not None:
        for conv_id, start, _ in cache.pending_lens():  # turns a stopped server left without a lens
            lens.submit(conv_id, start)

    # pure ASGI, so a client's disconnect reaches the endpoint; the host guard, added last, runs first
    app.add_middleware(BodyCap, max_bytes=limits.max_body_bytes, refuse=_refusal)
    app.add_middleware(_HostGuard, hosts=hosts)

    @app.exception_handler(AnyHTTPException)
    async def http_error(_: Request, exc: AnyHTTPException) -> Any:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's, on bad bytes
            return _refusal(400, "The body is not JSON text in UTF-8; send a JSON object encoded as UTF-8.")
        return _refusal(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            where = f" ({first['ctx']['error']} at character {first['loc'][-1]})" if "ctx" in first else ""
            return _refusal(400, f"The body is not valid JSON{where}; send a JSON object.")
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return _refusal(400, f"{field}: {first.get('msg', 'invalid')}.")

    def checked(conv_id: str) -> str:
        try:
            return validate_conv_id(conv_id)
        except ConfigError as exc:
            raise HTTPException(400, str(exc)) from None

    def served(conv_id: str) -> str:
        """`conv_id` checked, and written by this server's model (another model's tokens are never served)."""
        conv_id = checked(conv_id)
        why = cache.refusal(conv_id)
        if why:
            raise HTTPException(409, why)
        return conv_id

    def refused(exc: BadRequest) -> HTTPException:
        return HTTPException(exc.status, str(exc))

    @app.post("/api/chat/cached")
    async def chat_cached(request: Request, body: Any = Body(None)) -> dict:  # noqa: B008 (FastAPI's JSON body)
        try:
            parsed = parse_chat(body, limits)
        except BadRequest as exc:
            raise refused(exc) from None
        # set when the client disconnects or the server stops: the reply ends at its next token, nothing is stored
        left = threading.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(request, left))
        try:
            answer = await asyncio.get_running_loop().run_in_executor(None, chat.reply, parsed, left.is_set)
        except BadRequest as exc:
            raise refused(exc) from None
        finally:  # also when this request is cancelled (SIGTERM's grace period is over): the thread stops too
            left.set()
            watcher.cancel()
        if lens is not None:
            lens.submit(answer["conversation_id"], answer["turn"][0])
        start = answer["turn"][0]
        answer["tokens"] = [{"position": start + i, "token": text(t)} for i, t in enumerate(answer.pop("token_ids"))]
        return answer

    @app.get("/api/cache/token/{conv_id}/{token_idx}")
    def token(conv_id: str, token_idx: int, context_size: int = 15, compute: bool = True) -> Response:
        began = time.perf_counter()
        conv_id = served(conv_id)
        record = cache.token(conv_id, token_idx)
        if record is None and 0 <= token_idx < cache.length(conv_id):
            raise HTTPException(
                503,
                f"Token {token_idx} of conversation {conv_id!r} is stored but cannot be read "
                "now (its turn file is damaged, or a memory-only turn was evicted after a "
                "failed disk write); the server log names the cause.",
            )
        if record is None:
            raise HTTPException(
                404, f"No token {token_idx} in conversation {conv_id!r} (it has {cache.length(conv_id)} tokens)."
            )
        looked_up = time.perf_counter()
        topk_ids, topk_probs, stats, source = record.topk_ids, record.topk_probs, record.stats, "cached"
        if topk_ids is None and not compute:  # a prefetch: don't compete with the lens worker
            return Response(
                orjson.dumps({"token_position": token_idx, "lens": "pending"}),
                status_code=202,
                media_type="application/json",
            )
        following = cache.tokens(conv_id, token_idx + 1, token_idx + 2)
        next_id = following[0].token_id if following else None
        if topk_ids is None or (stats is not None and next_id is not None and stats[0, 3] != stats[0, 3]):
            if lens is None:
                raise HTTPException(
                    503,
                    "This token's lens is not computed yet and the server has no model; "
                    "start it with the model that wrote the conversation.",
                )
            if topk_ids is None:
                lens.prioritize(conv_id, _turn_start(cache, conv_id, token_idx))
            topk_ids, topk_probs, stats = lens.for_token(record.hidden, next_id)
            source = "computed"
        context = cache.tokens(conv_id, max(0, token_idx - max(0, min(context_size, 256))), token_idx)
        body = orjson.dumps(
            {
                "token_position": token_idx,
                "lens": source,
                "activations": _record_json(record, text, topk_ids, topk_probs, stats),
                "next_token": None if next_id is None else {"token_id": next_id, "token": text(next_id)},
                "context": [
                    {
                        "position": r.index,
                        "token": text(r.token_id),
                        "prediction": None if r.topk_ids is None else text(int(r.topk_ids[-1][0])),
                    }
                    for r in context
                ],
            }
        )
        done = time.perf_counter()
        timing = f"lookup;dur={(looked_up - began) * 1e3:.3f}, handler;dur={(done - began) * 1e3:.3f}"
        return Response(body, media_type="application/json", headers={"Server-Timing": timing})

    @app.get("/api/cache/lens/{conv_id}")
    def lens_view(conv_id: str, start: int = 0, end: int | None = None) -> Response:
        conv_id = served(conv_id)
        try:
            view = lens_range(cache, lens, conv_id, start, end, text)
        except BadRequest as exc:
            raise refused(exc) from None
        return Response(orjson.dumps(view, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @app.get("/api/cache/status")
    def status() -> dict:
        return {
            **cache.status(),
            "prefetch_range": cache.config.prefetch_range,
            "top_k": k,
            "lens_queue": [] if lens is None else lens.progress(),
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).parent / "web" / "chat.html").read_text(encoding="utf-8")

    @app.get("/api/conversations/{conv_id}")
    def conversation(conv_id: str) -> dict:
        conv_id = served(conv_id)
        meta = cache.meta(conv_id)
        if meta is None:
            raise HTTPException(404, f"No conversation {conv_id!r}.")
        row = cache.conversation(conv_id) or {}
        return {
            "conversation_id": conv_id,
            "pinned": bool(row.get("pinned")),
            "messages": meta.get("messages", []),
            "branched_from": meta.get("branched_from"),
            "turns": [[t["start"], t["start"] + t["count"]] for t in cache.turns(conv_id)],
            "lens": turn_states(cache, lens, conv_id),
            "tokens": [{"position": i, "token": text(t)} for i, t in enumerate(cache.token_ids(conv_id).tolist())],
        }

    @app.get("/api/conversations")
    def conversations() -> list:
        return cache.conversations()

    @app.post("/api/conversations/{conv_id}/pin")
    def pin(conv_id: str, body: Any = Body(None)) -> dict:  # noqa: B008
        conv_id = checked(conv_id)
        try:
            pinned = parse_pinned(body)
        except BadRequest as exc:
            raise refused(exc) from None
        if not cache.pin(conv_id, pinned):
            raise HTTPException(404, f"No conversation {conv_id!r}.")
        return {"conversation_id": conv_id, "pinned": pinned}

    @app.delete("/api/conversations/{conv_id}")
    def delete(conv_id: str) -> dict:
        conv_id = checked(conv_id)
        chat.forget(conv_id)
        if not cache.delete(conv_id):
            raise HTTPException(404, f"No conversation {conv_id!r}.")
        return {"conversation_id": conv_id, "deleted": True}

    return app


async def _watch_disconnect(request: Any, left: threading.Event, every: float = 0.1) -> None:
    """Set `left` once the client has disconnected (polled until this task is cancelled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    left.set()


def _turn_start(cache: TokenCache, conv_id: str, index: int) -> int:
    starts = [t["start"] for t in cache.turns(conv_id) if t["start"] <= index]
    return starts[-1] if starts else 0
