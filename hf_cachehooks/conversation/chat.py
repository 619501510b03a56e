"""The chat server's replies: one generation at a time, the model's KV cache of recent conversations kept, and
a history that diverges from the stored one started as a new branch (never mixed into the stored one).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from typing import Any

from .bodies import BadRequest, ChatRequest, Limits
from .cache import TokenCache
from .turns import TemplateMismatchError, chat_turn, template_ids

log = logging.getLogger(__name__)


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

    def reply(self, request: ChatRequest) -> dict:
        """Generate and store the reply; return the response body.

        Raises:
            BadRequest: 409 when the stored conversation cannot be continued, 413 for a message over the cap,
                503 when a stored turn can no longer be read.
        """
        if self.model is None:
            raise BadRequest("This server has no model; start it with one to chat.", 503)
        with self.lock:
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
                )
            except TemplateMismatchError as exc:
                raise BadRequest(str(exc), 409) from None
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


def _diverges_at(a: list[dict], b: list[dict]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
