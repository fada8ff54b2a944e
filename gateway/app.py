"""The application factory: ``create_app(settings) -> FastAPI``. Nothing happens at import."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__
from gateway.api import integrity as integrity_routes
from gateway.api import openai, v2
from gateway.api import repository as repository_routes
from gateway.api.body import BodyLimitMiddleware
from gateway.api.compression import ResponseCompression
from gateway.api.middleware import RequestContextMiddleware
from gateway.api.oip_grpc.server import GrpcServer
from gateway.api.openai import openai_error_response
from gateway.api.responses import error_response
from gateway.api.v2.fast_path import InferFastPath
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
from gateway.statistics import Statistics

log = logging.getLogger(__name__)


class MetricsObserver(BatchObserver):
    """Feeds batcher events into the model's metrics."""

    def __init__(
        self, metrics: GatewayMetrics, model: str, version: int, statistics: Statistics
    ) -> None:
        v = str(version)
        self._stats = statistics.model(model, v)
        self._depth = metrics.queue_depth.labels(model, v)
        self._queue = metrics.queue_duration.labels(model, v)
        self._compute = metrics.compute_duration.labels(model, v)
        self._batch = metrics.batch_size.labels(model, v)

    def queued(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_started(self, size: int, waits_s: list[float]) -> None:
        for w in waits_s:
            self._queue.observe(w)
        self._stats.queued(waits_s)

    def batch_finished(self, size: int, compute_s: float) -> None:
        self._batch.observe(size)
        self._compute.observe(compute_s)

    def batch_stages(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        self._stats.executed(size, input_s, infer_s, output_s)


@dataclass
class Components:
    """What one gateway is made of; the lifespan starts and stops them in order."""

    settings: Settings
    metrics: GatewayMetrics
    repository: ModelRepository
    dataplane: DataPlane
    integrity: IntegrityService
    generation: GenerationService


def create_app(
    settings: Settings | None = None, *, enclave_factory: EnclaveFactory | None = None
) -> FastAPI:
    """The gateway. ``enclave_factory`` replaces how integrity-enabled models get their
    enclave (tests pass an in-process one); by default each gets its own enclave process."""
    settings = settings or Settings()
    settings.check_secure()
    parts = build_components(settings, enclave_factory)
    app = FastAPI(
        title="Fides Gateway",
        version=__version__,
        description="Open Inference Protocol gateway with integrity verification.",
        lifespan=_lifespan(parts),
        # the schema and its viewers answer without a key: development only (docs/reliability.md)
        openapi_url="/openapi.json" if settings.dev_mode else None,
        docs_url="/docs" if settings.dev_mode else None,
        redoc_url="/redoc" if settings.dev_mode else None,
    )
    _put_state(app, parts)
    _add_error_handlers(app)
    _add_routes(app, parts)
    _add_middleware(app, parts)
    return app


def build_components(
    settings: Settings, enclave_factory: EnclaveFactory | None = None
) -> Components:
    """The repository (every model, one registry), the data plane, the integrity service
    that wraps verified models, and the generation service, wired to one metrics registry."""
    # `_created` series double the output and no dashboard uses them
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = GatewayMetrics()
    statistics = Statistics()  # the OIP statistics extension's counters
    repository = ModelRepository(
        settings.model_repository,
        observer_factory=lambda m, v: MetricsObserver(metrics, m, v, statistics),
        on_state=lambda m, v, ok: metrics.model_ready.labels(m, str(v)).set(1 if ok else 0),
        on_runtime=lambda runtime: _watch_upstream(metrics, runtime),
        on_load=lambda m, ok: metrics.model_loads.labels(m, "success" if ok else "failure").inc(),
        drain_timeout_s=settings.shutdown_grace_s,
        serve_verifiers=settings.serve_verifiers,
    )
    integrity = IntegrityService(repository, settings, metrics.integrity, enclave_factory)
    repository.wrap = integrity.wrap  # a model with an integrity block is served verified
    return Components(
        settings=settings,
        metrics=metrics,
        repository=repository,
        dataplane=DataPlane(repository, settings, metrics, statistics),
        integrity=integrity,
        generation=GenerationService(repository, metrics.generation),
    )


def _watch_upstream(metrics: GatewayMetrics, runtime: Runtime) -> None:
    """Upstream runtimes: count retries, expose the circuit breaker's state at scrape time."""
    breaker = getattr(runtime, "breaker", None)
    if breaker is None:
        return
    runtime.on_retry = metrics.upstream_retries.labels(runtime.name).inc  # type: ignore[attr-defined]
    metrics.upstream_circuit_open.labels(runtime.name).set_function(
        lambda: 1.0 if breaker.state == "open" else 0.0
    )


def _lifespan(parts: Components) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not parts.settings.api_keys:
            log.warning("running WITHOUT API keys (FIDES_DEV_MODE): development only")
        grpc_server = None
        try:
            await parts.repository.load_all()
            await parts.integrity.start()
            # Loaded models (torch especially) leave millions of long-lived objects: without
            # freezing them every full collection walks them all (150 ms pauses measured).
            gc.collect()
            gc.freeze()
            if parts.settings.grpc_enabled:
                grpc_server = GrpcServer(
                    parts.dataplane, app.state.keys, parts.metrics, parts.settings
                )
                await grpc_server.start()
                app.state.grpc_port = grpc_server.port
        except BaseException:
            # a start that failed, or was cut short (`fides serve` cancels it on SIGTERM or
            # SIGINT): what did start stops. The model being loaded finishes (a load thread
            # cannot be interrupted) and is unloaded with the others, the models not reached
            # are never loaded, an enclave being started is stopped, the started ones stop
            # with their model.
            await parts.repository.close()
            raise
        ok, missing = parts.dataplane.ready()
        models = parts.repository.loaded_names()
        log.log(
            logging.INFO if ok else logging.WARNING,  # not ready: the operator has to look
            "gateway started",
            extra={"ready": ok, "not_ready": missing, "models": models},
        )
        if not models and not missing:  # a wrong or empty volume reads as an empty repository
            log.warning(
                "model repository %s (FIDES_MODEL_REPOSITORY) holds no model: nothing is "
                "served until one is added and loaded",
                parts.settings.model_repository,
            )
        yield
        log.info("shutting down: draining in-flight requests")
        if grpc_server is not None:  # uvicorn has drained HTTP by now; gRPC drains here
            await grpc_server.stop(parts.settings.shutdown_grace_s)
        await parts.repository.close()  # a verified model's enclave stops with its last version

    return lifespan


def _put_state(app: FastAPI, parts: Components) -> None:
    app.state.settings = parts.settings
    app.state.metrics = parts.metrics
    app.state.dataplane = parts.dataplane
    app.state.generation = parts.generation
    app.state.integrity = parts.integrity
    app.state.keys = KeyChecker(parts.settings.api_keys, parts.settings.admin_api_keys)


# -- errors: one handler per error type; /v1 answers in OpenAI's body, the rest in {"error"} --


def _error(
    request: Request,
    message: str,
    status: int,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    if request.url.path.startswith("/v1/"):
        return openai_error_response(message, status, headers, param, code)
    return error_response(message, status, headers)


async def _on_invalid_generation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidGeneration)
    return _error(request, exc.message, exc.status, exc.headers, exc.param, exc.code)


async def _on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error(request, exc.message, exc.status, exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
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


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return _error(request, str(exc.detail), exc.status_code, dict(exc.headers or {}))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _error(request, f"internal error: {type(exc).__name__}", 500)


ERROR_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    InvalidGeneration: _on_invalid_generation,
    GatewayError: _on_gateway_error,
    RequestValidationError: _on_validation_error,
    StarletteHTTPException: _on_http_error,
    Exception: _on_unexpected,
}


def _add_error_handlers(app: FastAPI) -> None:
    for exc_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)


def _add_routes(app: FastAPI, parts: Components) -> None:
    @app.get("/metrics", include_in_schema=True, tags=["monitoring"])
    async def prometheus_metrics(request: Request) -> Response:
        if parts.settings.metrics_require_auth:
            app.state.keys.check_user(request)
        return Response(generate_latest(parts.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for router in (
        v2.health,
        v2.router,
        repository_routes.router,
        integrity_routes.router,
        integrity_routes.admin,
        openai.router,
    ):
        app.include_router(router)


def _add_middleware(app: FastAPI, parts: Components) -> None:
    # the last added is the outermost: request ids and metrics see the body limits' answers
    settings = parts.settings
    if settings.infer_fast_path:  # innermost: inference without FastAPI's routing
        app.add_middleware(InferFastPath, keys=app.state.keys, error_handlers=ERROR_HANDLERS)
    if settings.response_compression_min_bytes > 0:  # sizes are the app's bodies
        app.add_middleware(
            ResponseCompression, minimum_size=settings.response_compression_min_bytes
        )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(RequestContextMiddleware, metrics=parts.metrics)
