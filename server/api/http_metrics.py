"""The HTTP side of the metrics: the middleware counting `peftserve_requests_total{endpoint,status}`.

The registry, the engine observer and the scrape-time collectors are `peftserve.server.metrics`
(no web framework there); the `/metrics` route (app.py) only renders that registry.
"""

from __future__ import annotations

import asyncio

from ..metrics import Metrics  # the registry it counts into


class HttpMetricsMiddleware:
    """Pure ASGI middleware counting `peftserve_requests_total{endpoint,status}`.

    `endpoint` is the matched route's path template (bounded cardinality); unmatched paths are
    counted as "other". A client that went away before the response started counts as 499.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if not status["code"]:
                status["code"] = 499 if isinstance(exc, asyncio.CancelledError) else 500
            raise
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe_http(endpoint, status["code"] or 499)
