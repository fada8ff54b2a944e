"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): request ids,
per-route HTTP metrics and access logs."""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.logs import request_id
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.access")
_RID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# A 503 from these is the answer "not ready", not a failure: Kubernetes probes every few seconds
# while a model loads, and a WARNING per probe buried the real 5xx. It is logged at DEBUG; the
# server's readiness route logs each change once, with the models and why (gateway.api.v2.router).
_READINESS_ROUTES = frozenset(
    {
        "/v2/health/ready",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}/ready",
    }
)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # generated ids: a random per-process prefix and a counter (uuid4 per request cost
        # more than the rest of this middleware)
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                candidate = value.decode("latin-1")
                rid = candidate if _RID_OK.fullmatch(candidate) else None
                break
        rid = rid or f"{self._prefix}{next(self._counter):08x}"
        token = request_id.set(rid)
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            route = _route_template(scope)
            method = scope["method"]
            count, duration = self.metrics.http_series(method, route, str(status))
            count.inc()
            duration.observe(elapsed)
            # errors at INFO/WARNING; successful requests and readiness probes answered "not
            # ready" only at DEBUG (hot path, probe spam)
            level = (
                logging.DEBUG
                if status == 503 and route in _READINESS_ROUTES
                else logging.WARNING
                if status >= 500
                else logging.INFO
                if status >= 400
                else logging.DEBUG
            )
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "request",
                    extra={
                        "request_id": rid,
                        "method": method,
                        "path": scope["path"],
                        "status": status,
                        "duration_s": round(elapsed, 6),
                    },
                )
            request_id.reset(token)


def _route_template(scope: Scope) -> str:
    # The matched route's template keeps label cardinality bounded (no model names in paths
    # that do not exist).
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
