"""A small OpenAI-compatible completion server around a `transformers` model, for tests and laptops.

    hf-cachehooks serve --model PATH [--gguf-file F] --port 8000

It answers `POST /v1/completions` (prompt, max_tokens, temperature, top_p, seed) and `GET /v1/models`,
one request at a time per model; point `OpenAIBackend` (or any OpenAI client) at it. Loopback only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .backends import Sampling, TransformersBackend

log = logging.getLogger(__name__)


def make_server(backend: TransformersBackend, model_name: str, host: str = "127.0.0.1",
                port: int = 0) -> ThreadingHTTPServer:
    """Build (not start) a server; `port=0` picks a free port (see `server.server_address`)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = request["prompt"]
                sampling = Sampling(temperature=float(request.get("temperature", 1.0)),
                                    max_tokens=int(request.get("max_tokens", 16)),
                                    top_p=request.get("top_p"), seed=request.get("seed"))
            except (ValueError, KeyError) as exc:
                self._send(400, {"error": {"message": f"bad request: {exc}"}})
                return
            with lock:
                self.server.completions_served += 1  # type: ignore[attr-defined]
                text = backend.complete([prompt], sampling)[0] or ""
            self._send(200, {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                             "model": model_name, "choices": [{"index": 0, "text": text, "finish_reason": "length"}]})

    server = ThreadingHTTPServer((host, port), Handler)
    server.completions_served = 0  # type: ignore[attr-defined]
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run `server` in a daemon thread (stop it with `server.shutdown()`)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
