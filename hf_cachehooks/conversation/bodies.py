"""The chat server's request bodies, validated before any model or file is touched: each refusal names the field.

A body that is well-formed but too big (a reply longer than the server's cap, a message over its token cap, a
request over its byte cap) is a 413; anything else wrong is a 400, text that is not valid Unicode included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .files import validate_conv_id

ROLES = ("system", "user", "assistant")
CHARS_PER_TOKEN = 16  # a message longer than this many characters per allowed token is refused before tokenizing


class BadRequest(ConfigError):
    """A request body the server refuses; `status` is 400 (malformed) or 413 (over a cap)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """The chat server's caps on what one request may ask for.

    Args:
        max_new_tokens: reply length when a request does not say.
        max_new_tokens_cap: the longest reply a request may ask for.
        max_message_tokens: the most new tokens one turn's prompt may add (the new message in its template).
        max_body_bytes: the largest request body.
    """

    max_new_tokens: int = 64
    max_new_tokens_cap: int = 1024
    max_message_tokens: int = 2048
    max_body_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_new_tokens_cap", "max_message_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name}={value!r}: give a positive integer.")
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ConfigError(
                f"max_new_tokens={self.max_new_tokens} is over max_new_tokens_cap="
                f"{self.max_new_tokens_cap}; raise the cap or lower the default."
            )


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request: `history` is None for the `message` shape (continue the stored conversation),
    else the messages before the new one (the `messages` shape: the whole history, OpenAI style)."""

    conversation_id: str | None
    message: str
    history: list[dict] | None
    max_new_tokens: int


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    """Validate a `POST /api/chat/cached` body: {"conversation_id"?, "message" | "messages", "max_new_tokens"?}.

    Raises:
        BadRequest: naming the field and what it must be (status 400, or 413 over a cap).
    """
    if not isinstance(body, dict):
        raise BadRequest(f"The body must be a JSON object, not {type(body).__name__}.")
    unknown = sorted(set(body) - {"conversation_id", "message", "messages", "max_new_tokens"})
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0]!r}: send conversation_id, message or messages, max_new_tokens.")
    conv_id = body.get("conversation_id")
    if conv_id is not None:
        try:
            validate_conv_id(conv_id)
        except ConfigError as exc:
            raise BadRequest(f"conversation_id: {exc}") from None
    if ("message" in body) == ("messages" in body):
        raise BadRequest(
            "Send either 'message' (a string: the next user message) or 'messages' (the whole "
            "history as [{'role', 'content'}], the last one the user's), not both and not neither."
        )
    history: list[dict] | None = None
    if "message" in body:
        message = body["message"]
        if not isinstance(message, str) or not message.strip():
            raise BadRequest("message: give a non-empty string.")
        unicode_text(message, "message")
    else:
        messages = _messages(body["messages"])
        history, message = messages[:-1], messages[-1]["content"]
    if len(message) > CHARS_PER_TOKEN * limits.max_message_tokens:
        raise BadRequest(
            f"message: {len(message)} characters is over this server's cap of "
            f"{limits.max_message_tokens} tokens per message (--max-message-tokens).",
            413,
        )
    limit = body.get("max_new_tokens", limits.max_new_tokens)
    if type(limit) is not int or limit < 1:
        raise BadRequest(
            f"max_new_tokens: give an integer from 1 to {limits.max_new_tokens_cap} (or leave it "
            f"out for {limits.max_new_tokens}); got {limit!r:.40}."
        )
    if limit > limits.max_new_tokens_cap:
        raise BadRequest(
            f"max_new_tokens={limit} is over this server's cap of {limits.max_new_tokens_cap} (--max-new-tokens-cap).",
            413,
        )
    return ChatRequest(conv_id, message, history, limit)


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages: give a non-empty list of {'role', 'content'} objects.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise BadRequest(f"messages[{i}]: give exactly {{'role', 'content'}}; got {str(m)[:80]}.")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise BadRequest(
                f"messages[{i}]: role must be one of {', '.join(ROLES)} and content a string; "
                f"got role {str(m['role'])[:20]!r}."
            )
        out.append({"role": m["role"], "content": unicode_text(m["content"], f"messages[{i}].content")})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise BadRequest("messages: the last message must be the user's, non-empty (the one to reply to).")
    return out


def unicode_text(text: str, field: str) -> str:
    """`text` when it can be encoded as UTF-8 (what a tokenizer takes).

    Raises:
        BadRequest: 400 naming the field, for a lone surrogate (the JSON escape "\\ud800", or its bytes).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"{field}: not valid Unicode (a lone surrogate {ascii(text[exc.start])} at character {exc.start}); "
            "send UTF-8 text."
        ) from None
    return text


def parse_pinned(body: Any) -> bool:
    """Validate a `POST .../pin` body: {"pinned": true | false} (JSON booleans only; an empty body pins)."""
    if body is None or body == {}:
        return True
    if not isinstance(body, dict) or set(body) != {"pinned"} or type(body["pinned"]) is not bool:
        raise BadRequest(f"Send {{'pinned': true}} or {{'pinned': false}} (JSON booleans); got {str(body)[:80]}.")
    return bool(body["pinned"])
