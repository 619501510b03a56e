"""An OpenAI-compatible completion server around a `transformers` model (FastAPI, extra `server`).

    hf-cachehooks serve --model PATH [--gguf-file F] --port 8000

`POST /v1/completions` and `POST /v1/chat/completions` with `n`, `stop`, `max_tokens`, `temperature`,
`top_p`, `seed`, vLLM's `top_k`, penalties, `stop_token_ids` and `ignore_eos`, `logprobs` (top-k per token and
the token itself), `echo`, prompts as text or token ids and lists of either (one choice per prompt x n, with
`index`), `finish_reason`, `stop_reason`, `usage` and streaming (server-sent events, a chunk per token);
`GET /v1/models`. Requests are taken as vLLM 0.32 takes them (`intake.py`: unknown fields ignored, a
completion trimmed to the context). Every malformed request gets a 4xx JSON error in OpenAI's shape with the
status as its integer `code`, as vLLM gives it; a body over 4 MiB a 413 however it is sent.
One request runs on the model at a time, on one worker thread; a client that disconnects stops its request at
the next token, and the worker never keeps the server from stopping.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

from .._core.asgi import BodyCap
from . import intake
from .backends import TransformersBackend
from .decoding import Row, Settings, TokenInfo, decode
from .intake import Refused
from .model_worker import END, ClientGone, Job, ModelWorker, Produce
from .openai_schema import ChatRequest, CompletionRequest

try:  # at module level, where FastAPI resolves the endpoints' annotations; `create_app` needs the extra `server`
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]

MAX_BODY_BYTES = 4 * 1024 * 1024


def _error(status: int, message: str, param: str | None = None) -> Any:
    from starlette.responses import Response

    # vLLM's error types (`BadRequestError`, `NotFoundError`, `InternalServerError`) and its integer code
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "InternalServerError"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    # ASCII JSON: a message quoting the client's text can never fail to encode (a lone surrogate is escaped)
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _completion_logprobs(rows: list[TokenInfo], start: int) -> dict[str, Any]:
    offsets, at = [], start
    for token in rows:
        offsets.append(at)
        at += len(token.text)
    return {
        "tokens": [t.text for t in rows],
        "token_logprobs": [t.logprob for t in rows],
        "top_logprobs": [t.top for t in rows],
        "text_offset": offsets,
    }


def _chat_logprobs(rows: list[TokenInfo], k: int) -> dict[str, Any]:
    """Chat's logprobs as vLLM gives them: `top_logprobs` is the first k of (the token itself, then the likeliest
    others), so exactly k where the completions API gives up to k + 1."""

    def one(text: str, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**one(t.text, t.logprob), "top_logprobs": [one(a, v) for a, v in list((t.top or {}).items())[:k]]}
            for t in rows
        ]
    }


class _Engine:
    """The model, its tokenizer and the worker thread that runs them (`model_worker`); the request -> rows step
    of both endpoints."""

    def __init__(self, backend: TransformersBackend, model_name: str, max_model_len: int | None) -> None:
        self.backend, self.model_name = backend, model_name
        config = getattr(backend.model, "config", None)
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        self.served = 0
        self.worker = ModelWorker()  # every use of the model and tokenizer runs there

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise Refused(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.", "model")

    def run(
        self, prompts: list[list[int]], n: int, settings: Settings, stopped: Callable[[], bool] = bool
    ) -> Iterator[tuple[int, list[Row]]]:
        """(index of the batch's first row, its rows) after every decoding step; rows are prompts x n.

        Runs on the worker (inside a job). Raises `ClientGone` at the first step after `stopped()` turns true.
        """
        expanded = [ids for ids in prompts for _ in range(n)]
        size = max(1, self.backend.batch_size)
        self.served += len(prompts)
        for start in range(0, len(expanded), size):
            batch_settings = settings
            if settings.seed is not None:  # each batch its own reproducible stream
                batch_settings = Settings(**{**settings.__dict__, "seed": settings.seed + start})
            steps = decode(
                self.backend.model,
                self.backend.tokenizer,
                expanded[start : start + size],
                batch_settings,
                max_model_len=self.max_model_len,
            )
            try:
                for rows in steps:
                    if stopped():
                        raise ClientGone
                    yield start, rows
            finally:
                getattr(steps, "close", bool)()  # a generator: its model state is freed now, not at collection


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _usage(rows: list[Row], n: int) -> dict[str, int]:
    """Token counts; a prompt's tokens count once, not once per sample (each prompt has n rows)."""
    prompt = sum(row.prompt_tokens for row in rows) // n
    completion = sum(row.completion_tokens for row in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(backend: TransformersBackend, model_name: str, max_model_len: int | None = None) -> Any:
    """The FastAPI app serving `backend.model` as `model_name` (`backend.use_chat_template` wraps
    `/v1/completions` prompts in the chat template; `/v1/chat/completions` always uses it)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    engine = _Engine(backend, model_name, max_model_len)
    app = FastAPI(title="hf-cachehooks completion server")
    app.state.engine = engine
    app.add_middleware(BodyCap, max_bytes=MAX_BODY_BYTES, refuse=_error)

    class EventStream(StreamingResponse):
        """Server-sent events read from a job; the job is cancelled however the response ends (finished, the
        client gone, the server stopping), so the model is free at the next token."""

        def __init__(self, job: Job, first: bytes) -> None:
            self.job = job

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    yield first
                    while (item := await job.next()) is not END:
                        yield item
                finally:
                    job.cancel()

            super().__init__(chunks(), media_type="text/event-stream")

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()

    async def answer(request: Request, produce: Produce, stream: bool) -> Any:
        """`produce`'s one item, or with `stream` a response streaming its items."""
        try:
            job, first = await engine.worker.start(request, produce)
        except ClientGone:  # nobody reads this answer; the server log shows the status
            return _error(499, "The client closed the connection before the answer was ready.")
        if stream:
            return EventStream(job, first)
        job.cancel()  # it has nothing more to give; this only frees its queue
        return first

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Any:
        errors = exc.errors()
        # text that is not Unicode is named first: in a union it hides behind the other branches' errors
        first = next((e for e in errors if e.get("type") == "string_unicode"), errors[0] if errors else {})
        loc = [part for part in first.get("loc", ()) if part != "body"]
        # a union's branch names (`constrained-str`, `list[...]`) mean nothing to a client: keep field and index
        where = ".".join(str(part) for part in loc if isinstance(part, int) or part.isidentifier())
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        if first.get("type") == "string_unicode":
            detail = first["msg"] if "char" in first.get("ctx", {}) else "not valid Unicode; send UTF-8 text"
            message = f"{where or 'body'}: {detail}"
        elif where.split(".")[0] == "prompt":
            message = (
                "prompt: must be a non-empty string, a non-empty list of non-empty strings, a non-empty list of "
                "token ids (integers >= 0) or a non-empty list of such lists"
            )
        elif not loc and first.get("type") in ("model_attributes_type", "dict_type"):
            message = "The body must be a JSON object."
        elif not loc and first.get("type") == "value_error":  # a rule over several fields: its words alone, as vLLM
            message = str(first.get("ctx", {}).get("error", first.get("msg", "invalid request")))
        if first.get("type") == "json_invalid":
            message = "The body is not valid JSON."
        return _error(400, message, where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Any:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's, on bad bytes
            return _error(400, "The body is not JSON text in UTF-8; send a JSON object encoded as UTF-8.")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> Any:
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> Any:
        return _error(500, f"The server failed on this request: {type(exc).__name__}: {exc}")

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "hf-cachehooks",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def one_model(name: str) -> dict[str, Any]:
        engine.check_model(name)
        return model_card()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        engine.check_model(body.model)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }

        def produce(stopped: Callable[[], bool]) -> Generator[Any, None, None]:  # on the model's worker
            prompts = intake.completion_prompts(backend, body)
            max_tokens = intake.budget(prompts, body.max_tokens, engine.max_model_len)
            echo = body.echo and body.logprobs is not None
            settings = intake.settings(body, max_tokens, body.logprobs, echo)
            steps = engine.run(prompts, body.n, settings, stopped)
            if body.stream:
                yield from _stream_completions(steps, head, body, settings)
                return
            rows = _last(steps, len(prompts) * body.n)
            echoed = intake.echo_texts(backend, body, prompts) if body.echo else []
            choices = []
            for index, row in enumerate(rows):
                prefix = echoed[index // body.n] if body.echo else ""
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs((row.prompt if body.echo else []) + row.tokens, 0)
                choices.append(
                    {
                        "index": index,
                        "text": prefix + row.text,
                        "logprobs": logprobs,
                        "finish_reason": row.finish_reason,
                        "stop_reason": row.stop_reason,
                    }
                )
            yield {**head, "choices": choices, "usage": _usage(rows, body.n)}

        return await answer(request, produce, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        engine.check_model(body.model)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def produce(stopped: Callable[[], bool]) -> Generator[Any, None, None]:  # on the model's worker
            prompt = intake.chat_prompt(backend, body, model_name)
            top = (body.top_logprobs or 0) if body.logprobs else None
            settings = intake.settings(
                body, intake.budget([prompt], body.token_limit, engine.max_model_len), top, False
            )
            steps = engine.run([prompt], body.n, settings, stopped)
            if body.stream:
                yield from _stream_chat(steps, head, body, settings)
                return
            rows = _last(steps, body.n)
            choices = [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": row.text},
                    "logprobs": _chat_logprobs(row.tokens, body.top_logprobs or 0) if body.logprobs else None,
                    "finish_reason": row.finish_reason,
                    "stop_reason": row.stop_reason,
                }
                for index, row in enumerate(rows)
            ]
            yield {**head, "object": "chat.completion", "choices": choices, "usage": _usage(rows, body.n)}

        return await answer(request, produce, body.stream)

    return app


def _last(steps: Iterator[tuple[int, list[Row]]], total: int) -> list[Row]:
    """Run every batch to the end; the finished rows in order."""
    done: list[Row | None] = [None] * total
    for start, rows in steps:
        done[start : start + len(rows)] = rows
    return [row for row in done if row is not None]


def _stream(
    steps: Iterator[tuple[int, list[Row]]],
    head: dict[str, Any],
    n: int,
    settings: Settings,
    include_usage: bool,
    choice: Callable[[int, str, list[TokenInfo], Row], dict[str, Any]],
) -> Iterator[bytes]:
    """Server-sent events: a chunk per row whenever it has new text (held back while a stop string may still
    match) or finishes, then the usage chunk when asked for, then `[DONE]`. `choice` shapes each chunk's choice.
    """
    sent_tokens: dict[int, int] = {}  # tokens already sent per row; -1 once the row finished
    finished: list[Row] = []
    for start, rows in steps:
        for offset, row in enumerate(rows):
            index = start + offset
            if sent_tokens.get(index, 0) < 0:
                continue
            piece = row.delta(settings.stop)
            if not piece and row.finish_reason is None:
                continue
            tokens = row.tokens[sent_tokens.get(index, 0) :]
            sent_tokens[index] = len(row.tokens)
            yield _sse({**head, "choices": [choice(index, piece, tokens, row)]})
            if row.finish_reason is not None:
                sent_tokens[index] = -1
                finished.append(row)
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(finished, n)})
    yield _sse("[DONE]")


def _stream_completions(
    steps: Iterator[tuple[int, list[Row]]], head: dict[str, Any], body: CompletionRequest, settings: Settings
) -> Iterator[bytes]:
    def choice(index: int, piece: str, tokens: list[TokenInfo], row: Row) -> dict[str, Any]:
        logprobs = _completion_logprobs(tokens, row.sent - len(piece)) if body.logprobs is not None else None
        return {
            "index": index,
            "text": piece,
            "logprobs": logprobs,
            "finish_reason": row.finish_reason,
            "stop_reason": row.stop_reason,
        }

    usage = body.stream_options is not None and body.stream_options.include_usage
    yield from _stream(steps, head, body.n, settings, usage, choice)


def _stream_chat(
    steps: Iterator[tuple[int, list[Row]]], head: dict[str, Any], body: ChatRequest, settings: Settings
) -> Iterator[bytes]:
    head = {**head, "object": "chat.completion.chunk"}
    for index in range(body.n):  # OpenAI's first chunk of each choice names the role
        role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield _sse({**head, "choices": [role]})

    def choice(index: int, piece: str, tokens: list[TokenInfo], row: Row) -> dict[str, Any]:
        logprobs = _chat_logprobs(tokens, body.top_logprobs or 0) if body.logprobs else None
        delta = {"content": piece} if piece else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": row.finish_reason}

    usage = body.stream_options is not None and body.stream_options.include_usage
    yield from _stream(steps, head, body.n, settings, usage, choice)


class BackgroundServer:
    """`create_app` under uvicorn in a daemon thread on a socket bound now (`port=0`: a free one)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.server_address = self.socket.getsockname()
        self.url = f"http://{self.server_address[0]}:{self.server_address[1]}"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def completions_served(self) -> int:
        """Prompts answered so far (a request with three prompts counts three)."""
        return self.app.state.engine.served

    def start(self) -> threading.Thread:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the completion server did not start on {self.url}")
            time.sleep(0.01)
        return self._thread

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    backend: TransformersBackend,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_model_len: int | None = None,
) -> BackgroundServer:
    """Build (not start) a server; `port=0` picks a free port (see `server.url`)."""
    return BackgroundServer(create_app(backend, model_name, max_model_len), host, port)


def serve_in_thread(server: BackgroundServer) -> threading.Thread:
    """Run `server` in a daemon thread (stop it with `server.shutdown()`)."""
    return server.start()
