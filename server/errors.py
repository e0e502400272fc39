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


# -- failures reported by the engine (TokenEvent.code) -------------------------------------------
# One generic, stable message per code: the engine's detail (exception, row, step) is logged with
# the request id and never sent to the client. numerical_error is a 500: the model or adapter
# produced NaN/inf, which the client's request cannot cause (sampling parameters are validated so
# that no accepted value yields non-finite probabilities) — the same class vLLM reports as 5xx.
_ENGINE_FAILURES: dict[str, tuple[int, str, str]] = {
    # code from the engine: (status, code sent to the client, message)
    "numerical_error": (500, "numerical_error",
                        "the model produced non-finite values (NaN/inf) for this request; it was stopped"),
    "sampling_error": (500, "sampling_error", "the next token could not be sampled for this request"),
    "generation_failed": (500, "generation_failed", "generation failed for this request"),
    "adapter_unavailable": (503, "adapter_unavailable", "the request's adapter could not be loaded; retry later"),
    "engine_restarted": (503, "engine_restarted",
                         "the engine restarted while this request was in flight; retry the request"),
    "engine_stopped": (503, "engine_unavailable", "the engine is not running"),
    "invalid_request": (422, "invalid_request", "the prompt is empty or longer than max_model_len"),
    "internal_error": (500, "internal_error", "internal server error"),
}
_RETRYABLE = {"adapter_unavailable", "engine_restarted"}


def engine_failure(code: str | None) -> ApiError:
    """The API error for a request the engine ended with FinishReason.ERROR and `code`."""
    key = str(getattr(code, "value", code) or "")  # an ErrorCode (str enum) or its value
    status, public, message = _ENGINE_FAILURES.get(key, _ENGINE_FAILURES["internal_error"])
    headers = {"Retry-After": "1"} if public in _RETRYABLE else None
    return ApiError(public, message, status, headers)


class EngineRestarting(_Fixed):
    """The engine loop died and is being rebuilt (seconds): retry shortly."""

    code, status = "engine_restarting", 503

    def __init__(self, message: str = "the engine is restarting, retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": "1"})
