"""Python clients for the peftserve HTTP API (httpx only: installable without torch, see clients/pyproject.toml)."""

from .client import (AsyncPeftServeClient, AuthenticationError, BadRequestError, ConflictError, ConnectionFailed,
                     InvalidRequestError, NotFoundError, PayloadTooLargeError, PeftServeClient, PeftServeError,
                     PermissionDeniedError, QueueFullError, RetryPolicy, ServerError, ServiceUnavailableError,
                     UnsupportedMediaTypeError, upload_parts)

__all__ = ["AsyncPeftServeClient", "AuthenticationError", "BadRequestError", "ConflictError", "ConnectionFailed",
           "InvalidRequestError", "NotFoundError", "PayloadTooLargeError", "PeftServeClient", "PeftServeError",
           "PermissionDeniedError", "QueueFullError", "RetryPolicy", "ServerError", "ServiceUnavailableError",
           "UnsupportedMediaTypeError", "upload_parts"]
