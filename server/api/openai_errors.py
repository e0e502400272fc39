"""OpenAI's error shape for `/v1/*`: `{"error": {"message", "type", "param", "code"}}`.

The status codes and the machine-readable `code` are the ones the rest of the API uses (so a
client can switch between `/generate` and `/v1` and keep its error handling); `type` is the
OpenAI category derived from the status, which is what OpenAI SDKs and routers look at.
"""

from __future__ import annotations

from ..errors import ApiError

V1_PREFIX = "/v1/"

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    return path.startswith(V1_PREFIX) or path == "/v1"


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error_body(code: str, message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


class ParamError(ApiError):
    """An error about one request parameter; `param` names it (OpenAI's `error.param`)."""

    def __init__(self, code: str, message: str, status: int, param: str | None):
        super().__init__(code, message, status)
        self.param = param


def unsupported(param: str, why: str = "") -> ParamError:
    """400 for an OpenAI/vLLM parameter peftserve does not serve (never silently ignored)."""
    return ParamError("unsupported_parameter", f"{param}: not supported by this server" + (f" ({why})" if why else ""),
                      400, param)


def unknown(param: str) -> ParamError:
    return ParamError("unknown_parameter", f"{param}: unknown parameter", 400, param)


def invalid(param: str | None, message: str, status: int = 422) -> ParamError:
    return ParamError("invalid_request", message, status, param)


def model_not_found(model: str) -> ParamError:
    return ParamError("model_not_found", f"the model {model!r} does not exist", 404, "model")
