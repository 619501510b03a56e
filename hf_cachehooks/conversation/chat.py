"""The chat server's replies: one generation at a time, the model's KV cache of recent conversations kept, and
a history that diverges from the stored one started as a new branch (never mixed into the stored one).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .bodies import BadRequest, ChatRequest, Limits
from .cache import TokenCache
from .turns import TemplateMismatchError, chat_turn, template_ids

log = logging.getLogger(__name__)

_GONE = "The client closed the connection before the reply was ready; nothing was stored."


class ChatService:
    """Replies to chat requests and stores each turn in the token cache.

    Args:
        keep_kv: conversations whose model KV cache stays in memory between turns (0: rerun the history).
    """

    def __init__(self, model: Any, tokenizer: Any, cache: TokenCache, limits: Limits, keep_kv: int = 2) -> None:
        self.model, self.tokenizer, self.cache, self.limits, self.keep_kv = model, tokenizer, cache, limits, keep_kv
        self.lock = threading.Lock()  # one model: one generation at a time
        self._kv: OrderedDict[str, tuple[int, Any]] = OrderedDict()  # conv_id -> (tokens it holds, the KV cache)

    def forget(self, conv_id: str) -> None:
        """Drop a conversation's kept KV cache (it is being deleted)."""
        with self.lock:
            self._kv.pop(conv_id, None)

    def reply(self, request: ChatRequest, stopped: Callable[[], bool] = bool) -> dict:
        """Generate and store the reply; return the response body.

        Args:
            stopped: true once the client has left: generation ends at the next token and nothing is stored.

        Raises:
            BadRequest: 409 when the stored conversation cannot be continued, 413 for a message over the cap,
                503 when a stored turn can no longer be read, 499 when the client left (nothing was stored).
        """
        if self.model is None:
            raise BadRequest("This server has no model; start it with one to chat.", 503)
        if request.conversation_id and (refused := self.cache.refusal(request.conversation_id)):
            raise BadRequest(refused, 409)  # another model wrote it: never continued here, nothing generated
        with self.lock:
            if stopped():
                raise BadRequest(_GONE, 499)
            conv_id, branched_from, stored = self._target(request)
            messages = (stored if request.history is None else request.history) + [
                {"role": "user", "content": request.message}
            ]
            history = self.cache.token_ids(conv_id).tolist() if stored else []
            if len(history) != self.cache.length(conv_id):
                raise BadRequest(
                    f"Conversation {conv_id!r} has turns that can no longer be read (evicted from "
                    "memory after a failed disk write); start a new one.",
                    503,
                )
            try:
                added = len(template_ids(self.tokenizer, messages, add_generation_prompt=True)) - len(history)
                if added > self.limits.max_message_tokens:
                    raise BadRequest(
                        f"The new message is {added} tokens in the chat template, over this server's "
                        f"cap of {self.limits.max_message_tokens} (--max-message-tokens).",
                        413,
                    )
                held, past = self._kv.pop(conv_id, (0, None))
                turn = chat_turn(
                    self.model,
                    self.tokenizer,
                    messages,
                    history,
                    past if held == len(history) else None,
                    request.max_new_tokens,
                    do_sample=False,
                    stopping_criteria=_stop_when(stopped),
                )
            except TemplateMismatchError as exc:
                raise BadRequest(str(exc), 409) from None
            if stopped():  # cut short for a client that left: a partial reply is never stored
                raise BadRequest(_GONE, 499)
            messages = [*messages, {"role": "assistant", "content": turn.text}]
            meta: dict[str, Any] = {"messages": messages}
            if branched_from:
                meta["branched_from"] = branched_from
            start, end = self.cache.append_turn(conv_id, turn.token_ids, turn.hidden, meta=meta)
            if self.keep_kv > 0:
                self._kv[conv_id] = (end, turn.past_key_values)
                while len(self._kv) > self.keep_kv:
                    self._kv.popitem(last=False)
        body = {
            "conversation_id": conv_id,
            "response": turn.text,
            "cached": True,
            "turn": [start, end],
            "token_ids": turn.token_ids.tolist(),
        }
        if branched_from:
            body["branched_from"] = branched_from
        return body

    def _target(self, request: ChatRequest) -> tuple[str, str | None, list[dict]]:
        """(conversation id to append to, the id it branched from or None, its stored messages)."""
        conv_id = request.conversation_id
        meta = self.cache.meta(conv_id) if conv_id else None
        stored = list((meta or {}).get("messages", []))
        if conv_id is None:
            return uuid.uuid4().hex[:16], None, []
        if meta is None:
            return conv_id, None, []
        if request.history is None or request.history == stored:
            return conv_id, None, stored
        branch = uuid.uuid4().hex[:16]
        log.info(
            "Conversation %s: the request's history diverges from the stored one after message %d; starting branch %s.",
            conv_id,
            _diverges_at(stored, request.history),
            branch,
        )
        return branch, conv_id, []


def _stop_when(stopped: Callable[[], bool]) -> Any:
    """Stopping criteria for `generate` that end it at the next token once `stopped()` is true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ClientLeft(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stopped(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ClientLeft()])


def _diverges_at(a: list[dict], b: list[dict]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
