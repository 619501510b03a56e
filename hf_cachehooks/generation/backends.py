"""Where completions come from: local `transformers` generation or OpenAI-compatible servers (vLLM, ...).

A backend maps (prompts, settings) to one completion per prompt; `None` marks a failed or empty one,
which the generation cache never stores. The server backend spreads prompts over several URLs at
once, retries with exponential backoff, moves a dead server's prompts to the live ones, and names
every server that failed when none is left.
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
from typing import Any, Protocol

from ..errors import ServerError as ServerError  # re-exported: it used to live here

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Generation settings shared by all backends (`temperature == 0` means greedy)."""

    temperature: float = 1.0
    max_tokens: int = 512
    top_p: float | None = None
    seed: int | None = None


class Backend(Protocol):
    name: str

    def render(self, prompts: Sequence[str]) -> list[str]: ...

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]: ...


@dataclass
class TransformersBackend:
    """Batched local generation with left padding and, optionally, the tokenizer's chat template."""

    model: Any
    tokenizer: Any
    batch_size: int = 8
    use_chat_template: bool = False
    system_prompt: str | None = None
    name: str = "transformers"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str | None = None, compile_decode: bool = False,
                        gguf_file: str | None = None, **options: Any) -> TransformersBackend:
        """Load a model folder or Hub name with the inference load plan (`_models/inference.py`: this rank's
        GPU, bf16 where supported, flash_attention_2 -> sdpa -> eager; on CPU as before), then wrap it."""
        from .._models.inference import load_planned, plan_load

        model, tokenizer, _ = load_planned(name_or_path, plan_load(dtype=dtype, compile_decode=compile_decode),
                                           gguf_file=gguf_file)
        return cls(model, tokenizer, **options)

    def render(self, prompts: Sequence[str]) -> list[str]:
        """The exact text the model sees (the `full_texts` start with it)."""
        if not self.use_chat_template:
            return list(prompts)
        from .._models.runners import chat_texts

        return chat_texts(prompts, self.tokenizer, self.system_prompt)

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]:
        import torch

        from .._models.runners import generate_texts

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            options["temperature"] = sampling.temperature
            if sampling.top_p is not None:
                options["top_p"] = sampling.top_p
        texts = self.render(prompts)
        out: list[str | None] = []
        for start in range(0, len(texts), self.batch_size):
            batch = generate_texts(self.model, self.tokenizer, texts[start : start + self.batch_size], options,
                                   add_special_tokens=not self.use_chat_template)
            out += [text or None for text in batch]
        return out


@dataclass
class OpenAIBackend:
    """`/v1/completions` on one or more OpenAI-compatible servers, queried concurrently.

    Args:
        urls: server base URLs, e.g. ["http://127.0.0.1:8000", "http://127.0.0.1:8001"].
        model: the model name the servers expect.
        retries: attempts per request before a server is declared dead.
        backoff: first retry delay in seconds (doubles each retry).
        timeout: seconds per HTTP request.
        workers_per_server: concurrent requests per server.
    """

    urls: Sequence[str]
    model: str
    retries: int = 3
    backoff: float = 0.5
    timeout: float = 120.0
    workers_per_server: int = 4
    api_key: str | None = None
    name: str = "openai"
    _dead: dict[str, str] = field(default_factory=dict, repr=False)

    def render(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts)

    def _post(self, url: str, prompt: str, sampling: Sampling) -> str | None:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": sampling.max_tokens,
                                "temperature": sampling.temperature}
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            text = json.loads(response.read())["choices"][0]["text"]
        return text.strip() or None

    def _with_retries(self, url: str, prompt: str, sampling: Sampling) -> str | None:
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            if url in self._dead:
                raise ConnectionError(self._dead[url])
            try:
                return self._post(url, prompt, sampling)
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                if attempt == self.retries:
                    self._dead[url] = f"{type(exc).__name__}: {exc}"
                    log.warning("Completion server %s failed %d times (%s); moving its prompts to the others.",
                                url, attempt, exc)
                    raise ConnectionError(self._dead[url]) from exc
                time.sleep(delay)
                delay *= 2
        return None

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]:
        self._dead.clear()
        results: list[str | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        log.info("Distributing %d prompts across %d server(s)", len(prompts), len(self.urls))
        while pending:
            live = [u for u in self.urls if u not in self._dead]
            if not live:
                detail = "; ".join(f"{u}: {why}" for u, why in self._dead.items())
                raise ServerError(f"All {len(self.urls)} completion server(s) failed ({detail}). "
                                  "Check that they are running and serve model " + repr(self.model) + ".")
            with ThreadPoolExecutor(max_workers=len(live) * self.workers_per_server) as pool:
                futures = {i: pool.submit(self._with_retries, live[n % len(live)], prompts[i], sampling)
                           for n, i in enumerate(pending)}
            failed = []
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except ConnectionError:
                    failed.append(i)
            pending = failed
        return results
