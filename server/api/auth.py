"""Bearer-token dependencies: `require_api_key` (generation) and `require_admin_key` (adapters).

- no key configured -> open;
- header missing / not `Bearer <token>` -> 401 `unauthorized` (with `WWW-Authenticate: Bearer`);
- wrong token -> 403 `forbidden`.
Tokens are compared with `hmac.compare_digest` on UTF-8 bytes (constant time). The admin key also
opens the generation routes; when no admin key is configured the adapter-management routes fall
back to the API key, so setting only `--api-key` never leaves adapter uploads open.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import Forbidden, Unauthorized


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, keys: list[str]) -> bool:
    given = token.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:  # check every key: no early exit that would reveal which one matched
        ok |= hmac.compare_digest(given, key.encode("utf-8", "surrogateescape"))
    return ok


def check_token(request: Request, keys: list[str]) -> None:
    keys = [k for k in keys if k]
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing or malformed bearer token (Authorization: Bearer <key>)")
    if not _matches(token, keys):
        raise Forbidden("invalid API key")


async def require_api_key(request: Request) -> None:
    settings = request.app.state.peft.settings
    if settings.api_key:
        check_token(request, [settings.api_key, settings.admin_key])


async def require_admin_key(request: Request) -> None:
    settings = request.app.state.peft.settings
    check_token(request, [settings.admin_key or settings.api_key])
