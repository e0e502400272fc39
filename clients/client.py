"""Sync and async Python clients for the peftserve HTTP API. Needs only httpx (no torch, no transformers).

    from peftserve.clients import PeftServeClient, QueueFullError
    with PeftServeClient("http://127.0.0.1:8000", api_key=KEY, admin_key=ADMIN) as c:
        c.upload_adapter("my-lora", "out/")             # PEFT dir: adapter_config.json + .safetensors
        print(c.generate(prompt="Hello", adapter="my-lora")["text"])
        for event in c.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(event.get("text", ""), end="")

`AsyncPeftServeClient` has the same methods as coroutines (`stream` is an async iterator).
For the OpenAI-compatible `/v1` routes use the `openai` package itself (README).

Retries: a 429 (`queue_full`) or 503 (`draining`, `engine_unavailable`) means the server did not
accept the request, so every route is retried on them, up to `max_retries` times, waiting what
`Retry-After` says (seconds or an HTTP date; capped by `max_retry_wait`) or else an exponential
backoff with jitter. Connection failures are retried only for GET and DELETE (idempotent).
Errors raise a `PeftServeError` subclass per status, carrying the server's `code`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
RETRY_STATUSES = (429, 503)


# -- errors ------------------------------------------------------------------------------------------------
class PeftServeError(RuntimeError):
    """An error answer: HTTP `status`, the server's machine-readable `code`, its `message`."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.param, self.retry_after = status, code, message, param, retry_after


class BadRequestError(PeftServeError): ...
class AuthenticationError(PeftServeError): ...  # 401
class PermissionDeniedError(PeftServeError): ...  # 403
class NotFoundError(PeftServeError): ...  # 404 (adapter_not_found, model_not_found, ...)
class ConflictError(PeftServeError): ...  # 409 (adapter_exists)
class PayloadTooLargeError(PeftServeError): ...  # 413
class UnsupportedMediaTypeError(PeftServeError): ...  # 415 (also pickles)
class InvalidRequestError(PeftServeError): ...  # 422 (invalid_request, context_length_exceeded, ...)
class QueueFullError(PeftServeError): ...  # 429
class ServerError(PeftServeError): ...  # 500
class ServiceUnavailableError(PeftServeError): ...  # 503 (draining, engine_unavailable)
class ConnectionFailed(PeftServeError): ...  # no HTTP answer at all (status 0)


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              409: ConflictError, 413: PayloadTooLargeError, 415: UnsupportedMediaTypeError,
              422: InvalidRequestError, 429: QueueFullError, 500: ServerError, 503: ServiceUnavailableError}


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After`: delta-seconds or an HTTP date -> seconds from now (None when absent/unparseable)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from(resp: httpx.Response) -> PeftServeError:
    cls = _BY_STATUS.get(resp.status_code, ServerError if resp.status_code >= 500 else PeftServeError)
    retry = retry_after_seconds(resp.headers.get("retry-after"))
    try:
        err = resp.json()["error"]
        return cls(resp.status_code, str(err.get("code", "error")), str(err.get("message", "")), err.get("param"),
                   retry)
    except (ValueError, KeyError, TypeError, AttributeError):
        return cls(resp.status_code, "http_error", resp.text[:200], None, retry)


class RetryPolicy:
    def __init__(self, max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 max_retry_wait: float = 60.0):
        self.max_retries, self.backoff, self.max_backoff, self.max_retry_wait = (max_retries, backoff, max_backoff,
                                                                                 max_retry_wait)

    def delay(self, attempt: int, err: PeftServeError | None) -> float:
        if err is not None and err.retry_after is not None:
            return min(err.retry_after, self.max_retry_wait)
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)

    def should_retry(self, attempt: int, method: str, err: PeftServeError) -> bool:
        if attempt >= self.max_retries:
            return False
        if isinstance(err, ConnectionFailed):
            return method in ("GET", "DELETE")
        return err.status in RETRY_STATUSES


# -- what every route sends (shared by both clients, and by `train-adapter --upload`) ------------------------
def upload_parts(name: str, adapter_dir: str | Path, replace: bool = False) -> tuple[dict, dict]:
    """(form data, files) of `POST /adapters` for a PEFT dir (the files are read into memory)."""
    d = Path(adapter_dir)
    files = {"adapter_config": (CONFIG_FILE, (d / CONFIG_FILE).read_bytes(), "application/json"),
             "adapter_model": (WEIGHTS_FILE, (d / WEIGHTS_FILE).read_bytes(), "application/octet-stream")}
    return {"name": name, "replace": "true" if replace else "false"}, files


def _sse_data(line: str):
    """One SSE line -> its JSON payload, "[DONE]", or None for other lines."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    return data if data == "[DONE]" else json.loads(data)


def _stream_event(line: str):
    """One SSE line of a /generate stream -> its event dict, "[DONE]", or None for other lines.
    A failure after the stream started arrives as an event `{"error": {...}}`: raised here, so the
    sync and async streams share one reading of the protocol."""
    data = _sse_data(line)
    if isinstance(data, dict) and "error" in data:
        e = data["error"]
        raise ServerError(500, e.get("code", "error"), e.get("message", ""))
    return data


class _Base:
    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None, retry: RetryPolicy | None):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key
        self.retry = retry or RetryPolicy()

    def _headers(self, admin: bool) -> dict[str, str]:
        key = (self.admin_key or self.api_key) if admin else (self.api_key or self.admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}


# -- sync --------------------------------------------------------------------------------------------------
class PeftServeClient(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 300.0, retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key, admin_key, retry)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, method: str, path: str, admin: bool = False, stream: bool = False, **kw) -> httpx.Response:
        attempt = 0
        while True:
            try:
                req = self._http.build_request(method, path, headers=self._headers(admin), **kw)
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as exc:
                err: PeftServeError = ConnectionFailed(0, "connection_failed", str(exc) or type(exc).__name__)
            else:
                if resp.status_code < 400:
                    return resp
                if stream:
                    resp.read()
                    resp.close()
                err = error_from(resp)
            if not self.retry.should_retry(attempt, method, err):
                raise err
            time.sleep(self.retry.delay(attempt, err))
            attempt += 1

    def _json(self, method: str, path: str, admin: bool = False, **kw) -> Any:
        return self._send(method, path, admin, **kw).json()

    # generation
    def generate(self, **body: Any) -> dict:
        """POST /generate; keyword arguments are the request fields (prompt, adapter, ...)."""
        return self._json("POST", "/generate", json={**body, "stream": False})

    def stream(self, **body: Any) -> Iterator[dict]:
        """POST /generate with stream=true; yields each event's JSON (the last has finish_reason).
        A failure after the stream started arrives as an event `{"error": {...}}`; it is raised."""
        resp = self._send("POST", "/generate", stream=True, json={**body, "stream": True})
        try:
            for line in resp.iter_lines():
                data = _stream_event(line)
                if data == "[DONE]":
                    return
                if data is not None:
                    yield data
        finally:
            resp.close()

    # adapters (admin key)
    def upload_adapter(self, name: str, adapter_dir: str | Path, replace: bool = False) -> dict:
        data, files = upload_parts(name, adapter_dir, replace)
        return self._json("POST", "/adapters", admin=True, data=data, files=files)

    def replace_adapter(self, name: str, adapter_dir: str | Path) -> dict:
        return self.upload_adapter(name, adapter_dir, replace=True)

    def list_adapters(self) -> list[dict]:
        return self._json("GET", "/adapters", admin=True)["adapters"]

    def get_adapter(self, name: str) -> dict:
        return self._json("GET", f"/adapters/{name}", admin=True)

    def delete_adapter(self, name: str) -> dict:
        return self._json("DELETE", f"/adapters/{name}", admin=True)

    # operations
    def health(self) -> dict:
        return self._json("GET", "/health")

    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> str:
        return self._send("GET", "/metrics").text


# -- async -------------------------------------------------------------------------------------------------
class AsyncPeftServeClient(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 300.0, retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key, admin_key, retry)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def _send(self, method: str, path: str, admin: bool = False, stream: bool = False,
                    **kw) -> httpx.Response:
        attempt = 0
        while True:
            try:
                req = self._http.build_request(method, path, headers=self._headers(admin), **kw)
                resp = await self._http.send(req, stream=stream)
            except httpx.TransportError as exc:
                err: PeftServeError = ConnectionFailed(0, "connection_failed", str(exc) or type(exc).__name__)
            else:
                if resp.status_code < 400:
                    return resp
                if stream:
                    await resp.aread()
                    await resp.aclose()
                err = error_from(resp)
            if not self.retry.should_retry(attempt, method, err):
                raise err
            await asyncio.sleep(self.retry.delay(attempt, err))
            attempt += 1

    async def _json(self, method: str, path: str, admin: bool = False, **kw) -> Any:
        return (await self._send(method, path, admin, **kw)).json()

    async def generate(self, **body: Any) -> dict:
        return await self._json("POST", "/generate", json={**body, "stream": False})

    async def stream(self, **body: Any) -> AsyncIterator[dict]:
        resp = await self._send("POST", "/generate", stream=True, json={**body, "stream": True})
        try:
            async for line in resp.aiter_lines():
                data = _stream_event(line)
                if data == "[DONE]":
                    return
                if data is not None:
                    yield data
        finally:
            await resp.aclose()

    async def upload_adapter(self, name: str, adapter_dir: str | Path, replace: bool = False) -> dict:
        data, files = upload_parts(name, adapter_dir, replace)
        return await self._json("POST", "/adapters", admin=True, data=data, files=files)

    async def replace_adapter(self, name: str, adapter_dir: str | Path) -> dict:
        return await self.upload_adapter(name, adapter_dir, replace=True)

    async def list_adapters(self) -> list[dict]:
        return (await self._json("GET", "/adapters", admin=True))["adapters"]

    async def get_adapter(self, name: str) -> dict:
        return await self._json("GET", f"/adapters/{name}", admin=True)

    async def delete_adapter(self, name: str) -> dict:
        return await self._json("DELETE", f"/adapters/{name}", admin=True)

    async def health(self) -> dict:
        return await self._json("GET", "/health")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    async def metrics(self) -> str:
        return (await self._send("GET", "/metrics")).text
