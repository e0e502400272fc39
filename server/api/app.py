"""`create_app(state)`: the FastAPI application around one AsyncEngine.

Routes: `POST /generate` (generate.py), the OpenAI-compatible `/v1/*` (openai_routes.py), `GET /health`, `GET /ready`, `GET /metrics`; more routers
(adapter management) are added with `create_app(state, routers=[...])` or `app.include_router`
afterwards — they reach the state through `peftserve.server.state.get_state` and guard
themselves with `peftserve.server.api.auth.require_admin_key`.

Middleware (outermost first): request counter (`peftserve_requests_total`) -> body-size limit
(per-path cap table from the settings) -> FastAPI. Every error, FastAPI's own validation errors
and 404/405 included, is rendered as `{"error": {"code": ..., "message": ...}}` — on `/v1/*` in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the same status and code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftserve.adapters.errors import AdapterError

from ..errors import ApiError, Draining, http_error
from ..state import ServerState, get_state
from . import generate, openai_routes, ui
from .auth import require_api_key
from .http_metrics import HttpMetricsMiddleware
from .limits import BodySizeLimitMiddleware
from .openai_errors import is_openai_path, openai_error_body
from .schemas import describe_validation_error

log = logging.getLogger("peftserve.server.api")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "body_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
               500: "internal_error", 503: "unavailable"}


def error_response(code: str, message: str, status: int, headers: dict | None = None,
                   request: Request | None = None, param: str | None = None) -> JSONResponse:
    """Our error body; on `/v1/*` OpenAI's shape instead (openai_errors.py), same status and code."""
    if request is not None and is_openai_path(request.url.path):
        return JSONResponse(openai_error_body(code, message, status, param), status_code=status, headers=headers)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.code, exc.message, exc.status, exc.headers, request, getattr(exc, "param", None))

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError):
        status, code = http_error(exc)  # the one table (server/errors.py)
        return error_response(code, exc.message, status, request=request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response("invalid_request", describe_validation_error(exc.errors()), 422, request=request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405 and exc.detail == "Method Not Allowed":
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(code, message, exc.status_code, getattr(exc, "headers", None), request)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):  # logged by the server as well
        log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
        return error_response("internal_error", "internal server error", 500, request=request)


ops = APIRouter()


@ops.get("/health", summary="Liveness: process and engine loop alive")
async def health(request: Request):
    engine = get_state(request).engine
    if not engine.running:
        raise generate.unavailable(engine)  # 503 engine_restarting while the supervisor rebuilds it
    return {"status": "ok"}


@ops.get("/ready", summary="Readiness: model loaded, engine running, not draining")
async def ready(request: Request):
    state = get_state(request)
    if state.draining:
        raise Draining("server is draining for shutdown")
    if not state.engine.running:
        raise generate.unavailable(state.engine)
    return {"status": "ready", "model": state.model_name}


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request):
    body, content_type = get_state(request).metrics.render()
    return Response(body, media_type=content_type)


def docs_router(app: FastAPI) -> APIRouter:
    """/openapi.json, /docs and /redoc behind the API key (open when no key is configured):
    the schema lists every route and parameter, which is reconnaissance for an attacker."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    router = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi_json(request: Request):
        return JSONResponse(generate.with_server_limits(app.openapi(), get_state(request)))

    @router.get("/docs")
    async def swagger():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @router.get("/redoc")
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return router


def stop_engine(state: ServerState) -> None:
    if state.engine.running:
        state.engine.abort_all()
    state.engine.stop()


def create_app(state: ServerState, routers: Iterable[APIRouter] = ()) -> FastAPI:
    settings = state.settings
    if state.metrics is None:  # server/build.py makes them and hands them to the engine as its observer
        raise ValueError("create_app needs state.metrics (build the server with server/build.py)")
    state.metrics.bind(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.manage_engine and not state.engine.running and state.engine.dead_reason is None:
            state.engine.start()
        log.info("server ready", extra={"model": state.model_name})
        try:
            yield
        finally:
            if settings.manage_engine:
                await run_in_threadpool(stop_engine, state)
            log.info("server stopped")

    app = FastAPI(title="peftserve", version=settings.version or "0", lifespan=lifespan,
                  summary="Multi-adapter LLM inference server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.peft = state
    install_exception_handlers(app)
    app.include_router(generate.router)
    app.include_router(openai_routes.router)
    app.include_router(ops)
    if settings.ui:
        app.include_router(ui.router)
    for router in routers:
        app.include_router(router)
    if settings.docs:
        app.include_router(docs_router(app))
    app.add_middleware(BodySizeLimitMiddleware, limits=settings.body_limit_table,
                       drain_bytes=settings.body_drain_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=state.metrics)  # added last = outermost
    return app
