"""Completions from OpenAI-compatible servers (vLLM, llama.cpp's server, `hf-cachehooks serve`, ...).

Prompts go one request each, spread over several URLs at once. Each failure is sorted by whose fault it is:
- the prompt's (HTTP 400, 413, 422: too long, bad for this model): that prompt alone fails, with the
  server's message in `errors`; it is not retried and the server stays in use;
- the server's (no connection, a timeout, 408, 429, 5xx, a reply that is not a completion): retried with
  exponential backoff, then the server is dead and its prompts move to the live ones;
- the setup's (401, 403, 404: a wrong key or model name): the server is dead at once, no retry.
When no server is left, `ServerError` names each one and carries the completions that did succeed.
Text is kept exactly as the server returned it; only a failure is `None`.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServerError
from .backends import Sampling

log = logging.getLogger(__name__)
_PROMPT_FAULT = {400, 413, 422}
_SETUP_FAULT = {401, 403, 404}


class _PromptRejected(Exception):
    """The server refused this prompt (a 4xx that is the request's fault); its message says why."""


class _ServerDown(Exception):
    """This server cannot answer for now (or, for a setup fault, at all)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


def _server_message(error: urllib.error.HTTPError) -> str:
    """`HTTP 400 context_length_exceeded: This model's maximum context length is ...` from any server's shape."""
    try:
        body = json.loads(error.read() or b"{}")
    except (OSError, ValueError):
        body = {}
    finally:
        error.close()
    detail = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(detail, dict):  # {"error": "some text"}
        detail = {"message": str(detail)}
    kind = detail.get("code") if isinstance(detail.get("code"), str) else detail.get("type")
    message = detail.get("message") or detail.get("detail") or error.reason
    return f"HTTP {error.code}" + (f" {kind}" if kind else "") + f": {message}"


@dataclass
class OpenAIBackend:
    """`/v1/completions` (or `/v1/chat/completions`) on one or more OpenAI-compatible servers, concurrently.

    Args:
        urls: server base URLs, e.g. ["http://127.0.0.1:8000", "http://127.0.0.1:8001"].
        model: the model name the servers expect.
        retries: attempts per request before a server is declared dead.
        backoff: first retry delay in seconds (doubles each retry).
        timeout: seconds per HTTP request.
        workers_per_server: concurrent requests per server.
        api_key: sent as `Authorization: Bearer ...` when set.
        use_chat_template: send each prompt as a user message to `/v1/chat/completions` (the server applies
            the model's chat template), with `system_prompt` as the system message.
        tokenizer: optional; with `use_chat_template`, `render` uses its chat template so the cached
            `full_texts` are the text the model saw (without one they start with the bare prompt).
        use_n: ask for k samples per prompt in one request with the API's `n` (vLLM, OpenAI); False for
            servers that ignore it.

    After `complete`, `errors` maps the index of each prompt that failed to the server's message.

    Example:
        >>> backend = OpenAIBackend(["http://127.0.0.1:8000"], model="HuggingFaceTB/SmolLM2-135M-Instruct")
        >>> backend.complete(["2 + 2 ="], Sampling(temperature=0, max_tokens=4))
        [' 4']
    """

    urls: Sequence[str]
    model: str
    retries: int = 3
    backoff: float = 0.5
    timeout: float = 120.0
    workers_per_server: int = 4
    api_key: str | None = None
    use_chat_template: bool = False
    system_prompt: str | None = None
    tokenizer: Any = None
    use_n: bool = True
    name: str = "openai"
    errors: dict[int, str] = field(default_factory=dict, repr=False)
    _dead: dict[str, str] = field(default_factory=dict, repr=False)

    def render(self, prompts: Sequence[str]) -> list[str]:
        """The text the cache records before each completion (see `tokenizer`)."""
        if self.use_chat_template and self.tokenizer is not None:
            from .._models.runners import chat_texts

            return chat_texts(prompts, self.tokenizer, self.system_prompt)
        return list(prompts)

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]:
        """One completion per prompt; `None` where that prompt failed (see `errors`).

        Raises:
            ServerError: every server failed; `.completions` holds the ones that succeeded first.
        """
        try:
            rows = self.complete_samples(prompts, sampling, 1)
        except ServerError as exc:
            exc.completions = [row[0] for row in exc.completions]
            raise
        return [row[0] for row in rows]

    def complete_samples(self, prompts: Sequence[str], sampling: Sampling, n: int) -> list[list[str | None]]:
        """`n` samples per prompt, one request per prompt with the API's `n` (or `n` requests without `use_n`).

        Raises:
            ServerError: every server failed; `.completions` holds what succeeded, `None` elsewhere.
        """
        self._dead.clear()
        self.errors = {}
        per_request = n if self.use_n else 1
        jobs = [(i, s) for i in range(len(prompts)) for s in range(0, n, per_request)]
        results: list[list[str | None]] = [[None] * n for _ in prompts]
        log.info("Distributing %d prompts across %d server(s)", len(prompts), len(self.urls))
        while jobs:
            live = [u for u in self.urls if u not in self._dead]
            if not live:
                detail = "; ".join(f"{u}: {why}" for u, why in self._dead.items())
                raise ServerError(
                    f"All {len(self.urls)} completion server(s) failed ({detail}). Check that "
                    f"they are running and serve model {self.model!r}.",
                    completions=results,
                )
            with ThreadPoolExecutor(max_workers=len(live) * self.workers_per_server) as pool:
                futures = {
                    job: pool.submit(
                        self._with_retries, live[k % len(live)], prompts[job[0]], sampling, job[1], per_request
                    )
                    for k, job in enumerate(jobs)
                }
            jobs = []
            for (i, s), future in futures.items():
                try:
                    results[i][s : s + per_request] = future.result()
                except _PromptRejected as exc:
                    self.errors[i] = str(exc)
                except _ServerDown:
                    jobs.append((i, s))
        if self.errors:
            shown = "; ".join(f"prompt {i}: {why}" for i, why in sorted(self.errors.items())[:3])
            log.warning(
                "%d of %d prompts were refused by the server and have no completion (%s%s).",
                len(self.errors),
                len(prompts),
                shown,
                "; ..." if len(self.errors) > 3 else "",
            )
        return results

    def _with_retries(self, url: str, prompt: str, sampling: Sampling, sample: int, n: int) -> list[str]:
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            if url in self._dead:
                raise _ServerDown(self._dead[url])
            try:
                return self._post(url, prompt, sampling, sample, n)
            except _ServerDown as exc:
                if attempt == self.retries or not exc.retry:
                    if url in self._dead:  # another request already declared it dead
                        raise
                    self._dead[url] = str(exc)
                    log.warning(
                        "Completion server %s failed %s (%s); moving its prompts to the others.",
                        url,
                        f"{attempt} times" if exc.retry else "for every request",
                        exc,
                    )
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises

    def _body(self, prompt: str, sampling: Sampling, sample: int, n: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
        }
        if self.use_chat_template:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            body["messages"] = [*messages, {"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if n != 1:
            body["n"] = n
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:  # without n, sample s of a prompt needs a seed of its own
            body["seed"] = sampling.seed + (0 if n != 1 else 1_000_003 * sample)
        return body

    def _post(self, url: str, prompt: str, sampling: Sampling, sample: int, n: int) -> list[str]:
        route = "/v1/chat/completions" if self.use_chat_template else "/v1/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            url.rstrip("/") + route,
            headers=headers,
            method="POST",
            data=json.dumps(self._body(prompt, sampling, sample, n)).encode(),
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            message = _server_message(exc)
            if exc.code in _PROMPT_FAULT:
                raise _PromptRejected(message) from None
            raise _ServerDown(message, retry=exc.code not in _SETUP_FAULT) from None
        except (OSError, ValueError) as exc:  # URLError, refused, reset, timeout; a body that is not JSON
            raise _ServerDown(f"{type(exc).__name__}: {exc}") from None
        try:
            choices = sorted(reply["choices"], key=lambda choice: choice["index"])
            texts = [(c["message"]["content"] or "") if self.use_chat_template else c["text"] for c in choices]
        except (KeyError, TypeError) as exc:
            raise _ServerDown(f"the reply is not a completion (no {exc})") from None
        if len(texts) != n or not all(isinstance(text, str) for text in texts):
            raise _ServerDown(
                f"asked for n={n} samples, the reply has {len(texts)}; use_n=False for servers that do not support n",
                retry=False,
            )
        return texts
