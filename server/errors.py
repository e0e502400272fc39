"""Typed errors raised at the API edge, and the one table that gives every error its HTTP answer.

Every error the HTTP API returns has the body `{"error": {"code": ..., "message": ...}}`; the
exception handlers in `server/api/app.py` render any `ApiError`, and any `AdapterError` from the
adapters package, that way. `HTTP_ERRORS` below is the only place an error class gets its HTTP
status and machine-readable code; `http_error(exc)` reads it (most specific class first). This
module knows nothing about HTTP frameworks, so the registry, the engine glue and the CLI can
raise these without importing FastAPI.
"""

from __future__ import annotations

from collections.abc import Mapping

from peftserve.adapters.errors import AdapterError, AdapterTooLarge, InvalidCombination, NeverLoadedFormat


class ApiError(Exception):
    """An error with an HTTP status, a stable snake_case `code` and a human `message`.

    A subclass gets its status and code from `HTTP_ERRORS`. A plain `ApiError(code, message,
    status)` is for codes that are data rather than classes: the engine's failure codes
    (`engine_failure`) and OpenAI parameter errors (`api/openai_errors.py`).
    """

    def __init__(self, code: str | None = None, message: str = "", status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        table_status, table_code = _lookup(type(self))
        self.code = code if code is not None else table_code
        self.status = status if status is not None else table_status
        self.message = message or self.code.replace("_", " ")
        self.headers = dict(headers) if headers else None
        super().__init__(f"[{self.code}] {self.message}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class _Fixed(ApiError):
    """An ApiError whose code and status are fixed by its class: `Cls(message, headers=None)`."""

    def __init__(self, message: str = "", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(None, message, None, headers)


class InvalidRequest(_Fixed):
    pass


class ContextLengthExceeded(_Fixed):
    pass


class AdapterNotFound(ApiError):
    """`AdapterNotFound("name")` -> 404 adapter_not_found ("adapter 'name' not found")."""

    def __init__(self, name: str = "", message: str | None = None) -> None:
        self.name = name
        super().__init__(None, message or (f"adapter {name!r} not found" if name else "adapter not found"))


class Unauthorized(_Fixed):
    def __init__(self, message: str = "missing bearer token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(_Fixed):
    pass


class NotFound(_Fixed):
    pass


class BadRequest(_Fixed):
    pass


class MissingFile(_Fixed):
    """A required multipart file part is absent."""


class UnsupportedMediaType(_Fixed):
    pass


class QueueFull(_Fixed):
    def __init__(self, message: str = "request queue is full, retry later", retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class EngineUnavailable(_Fixed):
    pass


class Draining(_Fixed):
    def __init__(self, message: str = "server is shutting down") -> None:
        super().__init__(message, headers={"Connection": "close"})


class RequestAborted(_Fixed):
    """The server aborted a request it had accepted (shutdown drain timeout)."""


class EngineRestarting(_Fixed):
    """The engine loop died and is being rebuilt (seconds): retry shortly."""

    def __init__(self, message: str = "the engine is restarting, retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


# -- the adapter registry's errors --------------------------------------------------------------
class AdaptersDisabled(_Fixed):
    def __init__(self, message: str = "this server runs without an adapter registry") -> None:
        super().__init__(message)


class InvalidAdapterName(_Fixed):
    def __init__(self, message: str = "adapter names match [A-Za-z0-9][A-Za-z0-9._-]{0,63}") -> None:
        super().__init__(message)


class AdapterExistsError(_Fixed):
    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} already exists (use replace=true for a new version)")


class AdapterUnavailable(_Fixed):
    """The adapter's stored files failed verification: a server-side fault, never the client's."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is unavailable: its stored files failed verification "
                         "and were quarantined (upload it again)")


class CombinationCapacity(_Fixed):
    """Live combinations (cached or held by queued/running requests) fill their budget."""

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "1"})


class AdapterStoreCorrupt(_Fixed):
    """A version read from a store shared with other processes does not match its content hash."""


class AdapterStoreBusy(_Fixed):
    """A shared store's adapter kept changing while it was read."""


class InsufficientStorage(_Fixed):
    pass


# -- the one error -> HTTP table -----------------------------------------------------------------
# class -> (HTTP status, machine-readable code). A code of None means "the exception's own
# `code`": an AdapterError names what was wrong with the artifact (adapters/errors.py codes).
HTTP_ERRORS: dict[type[Exception], tuple[int, str | None]] = {
    ApiError: (500, "internal_error"),
    InvalidRequest: (422, "invalid_request"),
    ContextLengthExceeded: (422, "context_length_exceeded"),
    BadRequest: (400, "bad_request"),
    MissingFile: (422, "missing_file"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    NotFound: (404, "not_found"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    QueueFull: (429, "queue_full"),
    EngineUnavailable: (503, "engine_unavailable"),
    Draining: (503, "draining"),
    RequestAborted: (503, "request_aborted"),
    EngineRestarting: (503, "engine_restarting"),
    # the adapter registry
    AdaptersDisabled: (404, "adapters_disabled"),
    AdapterNotFound: (404, "adapter_not_found"),
    InvalidAdapterName: (422, "invalid_adapter_name"),
    AdapterExistsError: (409, "adapter_exists"),
    CombinationCapacity: (429, "combination_capacity"),
    AdapterUnavailable: (503, "adapter_unavailable"),
    AdapterStoreCorrupt: (500, "adapter_store_corrupt"),
    AdapterStoreBusy: (503, "adapter_store_busy"),
    InsufficientStorage: (507, "insufficient_storage"),
    # untrusted adapter artifacts (peftserve.adapters.errors): the code is the exception's own
    AdapterError: (422, None),  # understood but semantically invalid
    InvalidCombination: (422, None),  # invalid_adapter_combination
    AdapterTooLarge: (413, None),  # adapter_too_large
    NeverLoadedFormat: (415, None),  # invalid_safetensors: pickle / torch zip, refused unopened
}


def _lookup(cls: type) -> tuple[int, str | None]:
    for klass in cls.__mro__:
        if klass in HTTP_ERRORS:
            return HTTP_ERRORS[klass]
    return HTTP_ERRORS[ApiError]


def http_error(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, code) of any error that reaches the API edge; 500 internal_error if unknown."""
    if isinstance(exc, ApiError):  # set from the table at construction (or given, for data codes)
        return exc.status, exc.code
    if not isinstance(exc, AdapterError):
        return HTTP_ERRORS[ApiError]
    status, code = _lookup(type(exc))
    return status, code if code is not None else exc.code


def http_status(exc: BaseException) -> int:
    return http_error(exc)[0]


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

