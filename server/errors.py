"""Typed errors raised at the API edge, each with a stable machine-readable `code`.

Every error the HTTP API returns has the body `{"error": {"code": ..., "message": ...}}`; the
exception handlers in `server/api/app.py` render any `ApiError` (and `AdapterError` from the
adapters package) that way. This module knows nothing about HTTP frameworks, so the registry,
the engine glue and the CLI can raise these without importing FastAPI.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error with an HTTP status, a stable snake_case `code` and a human `message`."""

    code = "internal_error"
    status = 500

    def __init__(self, code: str | None = None, message: str = "", status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.message = message or self.code.replace("_", " ")
        self.headers = dict(headers) if headers else None
        super().__init__(f"[{self.code}] {self.message}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class _Fixed(ApiError):
    """An ApiError whose code and status are fixed by the class: `Cls(message, headers=None)`."""

    def __init__(self, message: str = "", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(None, message, None, headers)


class InvalidRequest(_Fixed):
    code, status = "invalid_request", 422


class ContextLengthExceeded(_Fixed):
    code, status = "context_length_exceeded", 422


class AdapterNotFound(ApiError):
    """`AdapterNotFound("name")` -> 404 adapter_not_found ("adapter 'name' not found")."""

    code, status = "adapter_not_found", 404

    def __init__(self, name: str = "", message: str | None = None) -> None:
        self.name = name
        super().__init__(None, message or (f"adapter {name!r} not found" if name else "adapter not found"))


class Unauthorized(_Fixed):
    code, status = "unauthorized", 401

    def __init__(self, message: str = "missing bearer token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(_Fixed):
    code, status = "forbidden", 403


class NotFound(_Fixed):
    code, status = "not_found", 404


class MethodNotAllowed(_Fixed):
    code, status = "method_not_allowed", 405


class BodyTooLarge(_Fixed):
    code, status = "body_too_large", 413


class UnsupportedMediaType(_Fixed):
    code, status = "unsupported_media_type", 415


class QueueFull(_Fixed):
    code, status = "queue_full", 429

    def __init__(self, message: str = "request queue is full, retry later", retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class GenerationFailed(_Fixed):
    """The engine failed while generating (never used for bad client input)."""

    code, status = "generation_failed", 500


class EngineUnavailable(_Fixed):
    code, status = "engine_unavailable", 503


class Draining(_Fixed):
    code, status = "draining", 503

    def __init__(self, message: str = "server is shutting down") -> None:
        super().__init__(message, headers={"Connection": "close"})


class RequestAborted(_Fixed):
    """The server aborted a request it had accepted (shutdown drain timeout)."""

    code, status = "request_aborted", 503


def from_adapter_error(exc) -> ApiError:
    """Map `peftserve.adapters.errors.AdapterError` (code, message, status) to an ApiError."""
    return ApiError(exc.code, exc.message, getattr(exc, "status", 422))
