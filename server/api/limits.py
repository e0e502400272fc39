"""Request-body size limits as pure ASGI middleware (streams; never buffers beyond the cap).

The cap is chosen per path prefix (longest match wins, on path-segment boundaries), e.g.
`{"": 1 MiB, "/adapters": 256 MiB}`. A declared `Content-Length` over the cap is refused before
any byte is read; a chunked body (no Content-Length) is counted as it arrives and refused with
413 the moment the running total crosses the cap. The application then sees
`http.disconnect` from `receive()`, so whatever it was doing with the body stops, and any
response it still tries to send is dropped (ours already went out).

After the 413 went out, up to `drain_bytes` more of the body (for at most `drain_seconds`) are
read and discarded: clients write the whole request before reading the response, and closing a
socket with unread data makes the kernel send a reset that destroys the 413 in flight. Bodies
beyond that are cut off (the connection is closed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping

from .openai_errors import is_openai_path, openai_error_body

Limits = Mapping[str, int] | Callable[[], Mapping[str, int]]


def cap_for(path: str, table: Mapping[str, int]) -> int | None:
    """Longest matching prefix's cap; "" is the default. None = no limit."""
    best, best_len = table.get(""), -1
    for prefix, cap in table.items():
        if not prefix:
            continue
        p = prefix.rstrip("/")
        if (path == p or path.startswith(p + "/")) and len(p) > best_len:
            best, best_len = cap, len(p)
    return best


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


MiB = 1024 * 1024


class BodySizeLimitMiddleware:
    def __init__(self, app, limits: Limits, drain_bytes: int = 8 * MiB, drain_seconds: float = 5.0):
        self.app = app
        self._limits = limits
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds

    def table(self) -> Mapping[str, int]:
        return self._limits() if callable(self._limits) else self._limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = cap_for(scope.get("path", ""), self.table())
        if cap is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            body = await self._reject_start(send, cap, scope.get("path", ""))
            if declared - cap <= self.drain_bytes:
                await self._drain(receive)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return

        received = 0
        started = False  # the app began its response
        responded = False  # we sent the 413's status line and headers
        reply = b""
        body_done = False  # the client sent its last body chunk (or went away)

        async def limited_receive():
            nonlocal received, responded, body_done, reply
            if responded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    if not started:
                        responded = True
                        reply = await self._reject_start(send, cap, scope.get("path", ""))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if responded:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not responded:
                raise
        if responded:
            if not body_done:
                await self._drain(receive)
            await send({"type": "http.response.body", "body": reply, "more_body": False})

    async def _drain(self, receive) -> None:
        """Read and discard what is left of the body (bounded in bytes and time)."""
        discarded = 0
        try:
            async with asyncio.timeout(self.drain_seconds):
                while discarded <= self.drain_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    discarded += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            pass

    @staticmethod
    async def _reject_start(send, cap: int, path: str = "") -> bytes:
        """Send the 413's status and headers now; returns the body to send once draining is done
        (the server reports `http.disconnect` from `receive()` as soon as a response is complete).
        On `/v1/*` the body has OpenAI's error shape, like every other error there."""
        message = f"request body exceeds the limit of {cap} bytes"
        error = (openai_error_body("body_too_large", message, 413) if is_openai_path(path)
                 else {"error": {"code": "body_too_large", "message": message}})
        body = json.dumps(error).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        return body
