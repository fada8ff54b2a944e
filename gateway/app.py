"""The application factory: ``create_app(settings) -> FastAPI``. Nothing happens at import."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__
from gateway.api import integrity as integrity_routes
from gateway.api import openai as openai_routes
from gateway.api import repository as repository_routes
from gateway.api import v2
from gateway.api.body import BodyLimitMiddleware
from gateway.api.middleware import RequestContextMiddleware
from gateway.api.responses import error_response
from gateway.auth import KeyChecker
from gateway.batcher import BatchObserver
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError
from gateway.generation.service import GenerationService, InvalidGeneration
from gateway.integrity.service import EnclaveFactory, IntegrityService
from gateway.metrics import GatewayMetrics
from gateway.repository import ModelRepository
from gateway.runtimes import Runtime
from gateway.settings import Settings

log = logging.getLogger(__name__)


class MetricsObserver(BatchObserver):
    """Feeds batcher events into the model's metrics."""

    def __init__(self, metrics: GatewayMetrics, model: str, version: int) -> None:
        v = str(version)
        self._depth = metrics.queue_depth.labels(model, v)
        self._queue = metrics.queue_duration.labels(model, v)
        self._compute = metrics.compute_duration.labels(model, v)
        self._batch = metrics.batch_size.labels(model, v)

    def queued(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_started(self, size: int, waits_s: list[float]) -> None:
        for w in waits_s:
            self._queue.observe(w)

    def batch_finished(self, size: int, compute_s: float) -> None:
        self._batch.observe(size)
        self._compute.observe(compute_s)


def create_app(
    settings: Settings | None = None, *, enclave_factory: EnclaveFactory | None = None
) -> FastAPI:
    """The gateway. ``enclave_factory`` replaces how integrity-enabled models get their
    enclave (tests pass an in-process one); by default each gets its own enclave process."""
    settings = settings or Settings()
    settings.check_secure()
    # `_created` series double the output and no dashboard uses them
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = GatewayMetrics()

    def on_state(model: str, version: int, ready: bool) -> None:
        metrics.model_ready.labels(model, str(version)).set(1 if ready else 0)

    def on_runtime(runtime: Runtime) -> None:
        # upstream runtimes: count retries, expose the circuit breaker's state at scrape time
        breaker = getattr(runtime, "breaker", None)
        if breaker is not None:
            retries = metrics.upstream_retries.labels(runtime.name)
            runtime.on_retry = retries.inc  # type: ignore[attr-defined]
            metrics.upstream_circuit_open.labels(runtime.name).set_function(
                lambda: 1.0 if breaker.state == "open" else 0.0
            )

    repository = ModelRepository(
        settings.model_repository,
        observer_factory=lambda m, v: MetricsObserver(metrics, m, v),
        on_state=on_state,
        on_runtime=on_runtime,
        on_load=lambda m, ok: metrics.model_loads.labels(m, "success" if ok else "failure").inc(),
        drain_timeout_s=settings.shutdown_grace_s,
        serve_verifiers=settings.serve_verifiers,
    )
    dataplane = DataPlane(repository, settings, metrics)
    integrity = IntegrityService(repository, settings, metrics.integrity, enclave_factory)
    repository.wrap = integrity.wrap  # a model with an integrity block is served verified
    generation = GenerationService(repository, metrics.generation)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_keys:
            log.warning("running WITHOUT API keys (FIDES_DEV_MODE): development only")
        await repository.load_all()
        await integrity.start()
        # Loaded models (torch especially) leave millions of long-lived objects: without
        # freezing them every full collection walks them all (150 ms pauses measured).
        gc.collect()
        gc.freeze()
        ok, missing = dataplane.ready()
        log.info(
            "gateway started",
            extra={"ready": ok, "not_ready": missing, "models": repository.loaded_names()},
        )
        yield
        log.info("shutting down: draining in-flight requests")
        await repository.close()
        await integrity.close()

    app = FastAPI(
        title="Fides Gateway",
        version=__version__,
        description="Open Inference Protocol gateway with integrity verification.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.dataplane = dataplane
    app.state.generation = generation
    app.state.integrity = integrity
    app.state.keys = KeyChecker(settings.api_keys, settings.admin_api_keys)

    def _error(
        request: Request,
        message: str,
        status: int,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> Response:
        # /v1 speaks OpenAI's error body; everything else the gateway's {"error": message}
        if request.url.path.startswith("/v1/"):
            return openai_routes.openai_error_response(message, status, headers, param, code)
        return error_response(message, status, headers)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        if isinstance(exc, InvalidGeneration):
            return _error(request, exc.message, exc.status, exc.headers, exc.param, exc.code)
        return _error(request, exc.message, exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":  # not "body.0: JSON decode error"
            ctx = errors[0].get("ctx") or {}
            where = errors[0]["loc"][1] if len(errors[0]["loc"]) > 1 else None
            detail = ctx.get("error", "")
            at = f" at character {where}" if isinstance(where, int) else ""
            message = f"the request body is not valid JSON{at}" + (f": {detail}" if detail else "")
            return _error(request, message, 400)
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors]
        loc = [str(p) for p in errors[0]["loc"][1:]] if errors else []
        param = ".".join(loc) or None
        return _error(request, "invalid request: " + "; ".join(parts), 400, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(request, str(exc.detail), exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return _error(request, f"internal error: {type(exc).__name__}", 500)

    @app.get("/metrics", include_in_schema=True, tags=["monitoring"])
    async def prometheus_metrics(request: Request) -> Response:
        if settings.metrics_require_auth:
            app.state.keys.check_user(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(v2.health)
    app.include_router(v2.router)
    app.include_router(repository_routes.router)
    app.include_router(integrity_routes.router)
    app.include_router(integrity_routes.admin)
    app.include_router(openai_routes.router)
    # the last added is the outermost: request ids and metrics see the body limits' answers
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
