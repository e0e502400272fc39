"""Call an ASGI app in-process and stream what it sends.

A replica serves requests through the very FastAPI app `peftserve serve` runs, so every route,
error body and middleware behaves the same behind Ray. httpx's ASGITransport buffers the whole
response, which would turn SSE into one late blob; this bridge yields each `send` message as it
happens and tells the app the client left (`http.disconnect`) when the consumer stops reading,
so an abandoned stream cancels its engine request like a dropped TCP connection does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

_DONE = object()


async def stream_asgi(app, method: str, path: str, query_string: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes, client: tuple[str, int] = ("127.0.0.1", 0),
                      grace_s: float = 5.0) -> AsyncIterator[dict]:
    """Yield the app's `http.response.start` and `http.response.body` messages in order."""
    out: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnected.is_set():
            raise OSError("client disconnected")  # what a closed socket looks like to the app
        await out.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode("latin-1"),
             "query_string": query_string, "root_path": "", "headers": headers, "client": client,
             "server": ("peftserve-replica", 80)}

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            out.put_nowait(_DONE)

    task = asyncio.ensure_future(run())
    complete = False  # a whole response went out: an error the app raises afterwards is only logged
    try:
        while True:
            message = await out.get()
            if message is _DONE:
                break
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
                break
    finally:
        disconnected.set()
        if not task.done():
            try:  # let the app see the disconnect and cancel its engine request itself
                await asyncio.wait_for(asyncio.shield(task), grace_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:  # noqa: BLE001 - the app's own error after the client left: nobody to tell
                pass
    if task.done() and not task.cancelled():
        exc = task.exception()  # retrieved either way (asyncio warns about unretrieved ones)
        if exc is not None and not complete:
            raise exc  # the app failed before answering: the caller's error to report


async def call_asgi(app, method: str, path: str, query_string: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The whole response: (status, headers, body)."""
    status, resp_headers, chunks = 500, [], []
    async for message in stream_asgi(app, method, path, query_string, headers, body):
        if message["type"] == "http.response.start":
            status, resp_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
    return status, resp_headers, b"".join(chunks)
