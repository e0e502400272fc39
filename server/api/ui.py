"""`/ui`: the playground page — one prompt through many adapters side by side, in one batch.

The page is static (server/api/ui_static/: plain HTML/CSS/JS, no build step, no CDN) and talks
to the public API only (`/generate` streaming, `/adapters`, `/metrics`, `/ready`), so it can do
nothing a client with the same key could not. One request per column, all in flight together:
the engine batches them like any other concurrent requests.

Auth: with `--api-key` set, the page itself is behind the key. A browser cannot add an
`Authorization` header to a navigation, so `/ui/login` takes the key in a form and sets a
`peftserve_key` cookie (SameSite=Strict, path /ui); `/ui` accepts that cookie or a Bearer header.
The page's script reads the cookie and sends the key as a Bearer header to the API, which stays
header-only (a cookie never authorises an API call, so there is no CSRF surface on the API).
"""

from __future__ import annotations

from importlib import resources
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..errors import NotFound
from ..state import get_state
from .auth import _bearer, _matches

router = APIRouter(include_in_schema=False)

COOKIE = "peftserve_key"
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; "
                                       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"}


def _asset(name: str) -> bytes:
    return resources.files("peftserve.server.api").joinpath("ui_static", name).read_bytes()


def _keys(request: Request) -> list[str]:
    settings = get_state(request).settings
    return [k for k in (settings.api_key, settings.admin_key) if k]


def _authorised(request: Request) -> bool:
    keys = _keys(request)
    if not keys:
        return True
    token = _bearer(request) or request.cookies.get(COOKIE)
    return bool(token) and _matches(token, keys)


def _login_page(message: str, status: int) -> HTMLResponse:
    html = _asset("login.html").decode().replace("{{message}}", message)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


@router.get("/ui")
async def page(request: Request) -> Response:
    if not _authorised(request):
        return _login_page("This server needs its API key to open the playground.", 401)
    return HTMLResponse(_asset("index.html"), headers=_HEADERS)


@router.get("/ui/static/{name}")
async def asset(name: str, request: Request) -> Response:
    if name not in _ASSETS:  # a fixed allow-list: no path ever reaches the filesystem
        raise NotFound(f"no UI asset {name!r}")
    if name == "app.js" and not _authorised(request):
        return Response(status_code=401, headers=_HEADERS)
    return Response(_asset(name), media_type=_ASSETS[name], headers=_HEADERS)


@router.post("/ui/login")
async def login(request: Request) -> Response:
    body = (await request.body())[:4096].decode("utf-8", "replace")
    key = (parse_qs(body).get("key") or [""])[0].strip()
    if not key or not _keys(request) or not _matches(key, _keys(request)):
        return _login_page("That key is not valid for this server.", 403)
    resp = RedirectResponse("/ui", status_code=303)
    resp.set_cookie(COOKIE, key, path="/ui", samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.get("/ui/logout")
async def logout() -> Response:
    resp = RedirectResponse("/ui", status_code=303)
    resp.delete_cookie(COOKIE, path="/ui")
    return resp
