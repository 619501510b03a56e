"""The servers' cap on request bodies, as ASGI middleware: it holds for every transfer encoding.

A `Content-Length` over the cap is refused before any byte is read; a body without one (chunked) is counted as it
arrives and refused the moment it passes the cap, so no more than the cap is ever held in memory. The app then
reads the body as usual. Pure ASGI (no web framework imported): each server passes the function that shapes
its own error replies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyCap:
    """Refuse request bodies over `max_bytes` (413), whatever their transfer encoding, before the app sees them.

    Args:
        app: the ASGI app to guard.
        max_bytes: the largest body served.
        refuse: `(status, message) -> ASGI app` answering a refusal in the server's own error shape.
    """

    def __init__(self, app: App, max_bytes: int, refuse: Callable[[int, str], App]) -> None:
        self.app, self.max_bytes, self.refuse = app, max_bytes, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None
        )
        if declared is not None and not declared.isdigit():
            await self.refuse(
                400,
                f"Content-Length {declared[:20]!r} is not a byte count; send the body's size "
                "in bytes, or send it chunked.",
            )(scope, receive, send)
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self.refuse(413, self._over(f"{declared} bytes"))(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body ended: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.refuse(413, self._over(f"more than {self.max_bytes} bytes"))(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _Replay(b"".join(chunks), receive), send)

    def _over(self, size: str) -> str:
        return (
            f"The request body ({size}) is over this server's cap of {self.max_bytes} bytes "
            f"({self.max_bytes / 2**20:g} MiB); send a smaller request."
        )


class _Replay:
    """`receive` for the app: the body read by `BodyCap` in one message, then the client's own messages
    (a disconnect)."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self.body: bytes | None = body
        self.receive = receive

    async def __call__(self) -> Message:
        if self.body is None:
            return await self.receive()
        body, self.body = self.body, None
        return {"type": "http.request", "body": body, "more_body": False}
