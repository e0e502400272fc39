"""Strict JSON request bodies: one place that refuses what the JSON grammar allows but a
request must not mean ambiguously, before the (strict) pydantic model sees the body.

- duplicate keys in any object (`{"prompt": "hi", "prompt": "bye"}`): JSON parsers keep the
  last one silently, so a proxy/WAF that checks the first value and the server that uses the
  last would disagree -> 422 `invalid_request`;
- nesting deeper than the parser's recursion limit -> 422 (never a RecursionError / 500).

Everything else (syntax, types, bounds) is left to pydantic's JSON validation, so its messages
and its strict-mode semantics are unchanged. Every JSON route uses `validate_json`.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequest
from .schemas import describe_validation_error


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def check_json(body: bytes) -> None:
    """Raise InvalidRequest for duplicate keys or excessive nesting; ignore other JSON errors."""
    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        key = exc.key if len(exc.key) <= 64 else exc.key[:64] + "..."
        raise InvalidRequest(f"duplicate key {key!r} in the JSON body") from None
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply") from None
    except (ValueError, TypeError):  # malformed JSON / encoding: pydantic reports it
        return


def validate_json(model: type[BaseModel], body: bytes) -> BaseModel:
    """Strictly parse a request body into `model`; any problem is a 422 `invalid_request`."""
    check_json(body)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply") from None
