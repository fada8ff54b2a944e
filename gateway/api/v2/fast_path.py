"""The inference routes without FastAPI's per-request machinery: a documented exception.

``POST /v2/models/{name}[/versions/{version}]/infer`` is the one route whose fixed cost per
request decides the gateway's throughput on small models. Profiled on the peer kit's CNN at
concurrency 1 (py-spy, 500 Hz), FastAPI's routing (matching every route in turn), dependency
solving and scope bookkeeping took about 60% of the event loop's time per request, more than
the handler, the body parse and the batcher together. This pure ASGI middleware, the innermost
of the gateway's own, answers those two routes itself with the same handler
(:func:`gateway.api.v2.serving.infer_handler`), the same key check and the same error handlers
(looked up by exception type as Starlette does), and puts the route's template in the scope
so metrics and logs are labelled as before. Request ids, HTTP metrics, body limits and response
compression stay in front of it. Everything else (other methods, other paths) goes on to
FastAPI. ``FIDES_INFER_FAST_PATH=false`` routes inference through FastAPI too (the routes stay
registered, in the OpenAPI schema as well).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.v2.serving import infer_handler
from gateway.auth import KeyChecker

__all__ = ["InferFastPath"]

ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]

# the paths Starlette's router matches for the two templates ({param} is [^/]+)
_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
TEMPLATES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


@dataclass(frozen=True)
class RouteTemplate:
    """What ``scope["route"]`` needs to say for the request-context middleware's labels."""

    path: str


_ROUTES = tuple(RouteTemplate(t) for t in TEMPLATES)


class InferFastPath:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyChecker,
        error_handlers: dict[type[Exception], ErrorHandler],
    ) -> None:
        """``error_handlers``: the app's handlers by exception type."""
        self.app = app
        self.keys = keys
        self.error_handlers = error_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # as Starlette's router: the path below root_path
            path = path[len(root) :]
        match = _INFER.match(path)
        if match is None:
            await self.app(scope, receive, send)
            return
        name, version = match.group(1), match.group(2)
        scope["route"] = _ROUTES[version is not None]
        request = Request(scope, receive)
        try:
            self.keys.check_user_key(KeyChecker.presented(request))
            response = await infer_handler(name, version, request)
        except Exception as exc:  # noqa: BLE001 - answered by the app's handler for its type
            response = await self._handler(exc)(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> ErrorHandler:
        for cls in type(exc).__mro__:
            handler = self.error_handlers.get(cls)
            if handler is not None:
                return handler
        raise exc  # not reached: the app has a handler for Exception
