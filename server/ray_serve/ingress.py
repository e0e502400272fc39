"""The HTTP entry point of the Ray application: forwards every path to an engine replica.

Why a byte-forwarding ingress instead of a second FastAPI app: the replicas already run the
full API, so the ingress only has to (1) read the body under a cap, (2) find the adapter the
request names — `adapter` of `POST /generate`, `model` of `POST /v1/*` — and pass it as Ray
Serve's `multiplexed_model_id` so the request lands on a replica holding that adapter, and
(3) re-send a request whose replica died before answering. New routes (e.g. `/v1/*`) need no
change here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..registry import CURRENT_FILE, NAME_RE
from .config import RayServeConfig

log = logging.getLogger("peftserve.server.ray_serve.ingress")

_JSON_ROUTES = {"/generate": "adapter"}  # path -> body field naming the adapter; /v1/* -> "model"


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def routing_of(method: str, path: str, content_type: str, body: bytes) -> tuple[str | None, list[str], bool]:
    """-> (adapter to route on or None, adapter names to version-check, stream?).

    Only well-formed JSON bodies are routed; anything else goes to any replica, whose app
    answers exactly as the single-process server would (422, 415, ...)."""
    field = _JSON_ROUTES.get(path) or ("model" if path.startswith("/v1/") else None)
    media = content_type.split(";", 1)[0].strip().lower()
    if method != "POST" or field is None or not (media == "application/json" or media.endswith("+json")):
        return None, [], False
    try:
        obj = json.loads(body)
    except ValueError:
        return None, [], False
    if not isinstance(obj, dict):
        return None, [], False
    stream = obj.get("stream") is True
    spec = obj.get(field)
    if isinstance(spec, str) and NAME_RE.fullmatch(spec):
        return spec, [spec], stream
    if isinstance(spec, list):  # a weighted combination: built on whichever replica, every part checked
        names = [i["name"] for i in spec if isinstance(i, dict) and isinstance(i.get("name"), str)
                 and NAME_RE.fullmatch(i["name"])]
        return None, names, stream
    return None, [], stream


class Ingress:
    """Body of the `PeftIngress` deployment; `replicas` is the engine deployment's handle."""

    def __init__(self, replicas, config: dict):
        from ray.exceptions import ActorUnavailableError, RayActorError

        self.cfg = RayServeConfig.from_dict(config)
        self.replicas = replicas
        self.store = Path(self.cfg.resolved_store())
        self._retryable = (RayActorError, ActorUnavailableError)
        self.retried = 0

    def _handle_for(self, route: str | None, stream: bool):
        opts = {"stream": True} if stream else {}
        # Only adapters the store holds become multiplexed ids: a typo or a base-model name in
        # `model` must not evict real adapters from a replica's K slots.
        if route and self.cfg.affinity and (self.store / route / CURRENT_FILE).is_file():
            opts["multiplexed_model_id"] = route
        return self.replicas.options(**opts) if opts else self.replicas

    async def _read_body(self, request) -> bytes | None:
        path = request.url.path
        cap = self.cfg.max_upload_bytes if path.startswith("/adapters") else self.cfg.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def __call__(self, request):
        from starlette.responses import Response

        body = await self._read_body(request)
        if body is None:
            return Response(_error_body("body_too_large", "request body exceeds the server's limit"), 413,
                            media_type="application/json")
        method, path = request.method, request.url.path
        route, names, stream = routing_of(method, path, request.headers.get("content-type", ""), body)
        req = {"method": method, "path": path, "query": request.url.query.encode("latin-1"),
               "headers": list(request.headers.raw), "body": body, "route": route, "adapters": names,
               "manage": path == "/adapters" or path.startswith("/adapters/")}
        # Generation and reads are safe to send again; an upload or delete is not (it may have
        # committed before the replica died), so those report the failure instead.
        retries = self.cfg.retries if (method in ("GET", "HEAD") or path == "/generate"
                                       or path.startswith("/v1/")) else 0
        if stream:
            return await self._stream(req, route, retries)
        return await self._unary(req, route, retries)

    async def _unary(self, req: dict, route: str | None, retries: int):
        from starlette.responses import Response

        for attempt in range(retries + 1):
            try:
                out = await self._handle_for(route, False).handle.remote(req)
                break
            except self._retryable as exc:
                self._log_retry(req, attempt, retries, exc)
        else:
            return self._unavailable()
        resp = Response(out["body"], out["status"])
        resp.raw_headers = [(k, v) for k, v in out["headers"]]
        return resp

    async def _stream(self, req: dict, route: str | None, retries: int):
        from starlette.responses import StreamingResponse

        for attempt in range(retries + 1):
            gen = self._handle_for(route, True).handle_stream.remote(req)
            try:
                head = await gen.__anext__()  # nothing reached the client yet: a retry is invisible
                break
            except self._retryable as exc:
                self._log_retry(req, attempt, retries, exc)
        else:
            return self._unavailable()

        async def body():
            finished = False
            try:
                async for chunk in gen:
                    yield chunk
                finished = True
            except self._retryable as exc:  # mid-stream: the client already has tokens; say so and stop
                log.error("replica died mid-stream", extra={"path": req["path"], "error": str(exc)})
                yield b"data: " + _error_body("replica_failed", "the serving replica died mid-stream") + b"\n\n"
                finished = True
            finally:
                if not finished:
                    gen.cancel()  # the client left: cancel on the replica (frees its KV slot)

        resp = StreamingResponse(body(), head["status"])
        resp.raw_headers = [(k, v) for k, v in head["headers"] if k.lower() != b"content-length"]
        return resp

    def _log_retry(self, req: dict, attempt: int, retries: int, exc: Exception) -> None:
        self.retried += 1
        log.warning("replica failed before answering", extra={
            "path": req["path"], "adapter": req["route"], "attempt": attempt + 1, "retries": retries,
            "error": type(exc).__name__, "will_retry": attempt < retries, "ts": time.time()})

    def _unavailable(self):
        from starlette.responses import Response

        return Response(_error_body("replica_unavailable", "no engine replica could answer; retry later"), 503,
                        media_type="application/json", headers={"Retry-After": "1"})
