"""Prometheus metrics in a registry owned by the app (no module globals), so two apps can
live in one process (tests) without clashing. Every name starts with ``fides_``;
docs/reference/metrics.md has a table of all of them (tests/test_readme.py holds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.generation.metrics import GenerationMetrics
from gateway.integrity.metrics import IntegrityMetrics

# Seconds; from 100 us (a tiny model on a warm path) to 30 s (a timed-out upstream).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ModelSeries:
    """The labelled children one model version touches per request, looked up once."""

    success: Any
    failure: Any
    duration: Any
    inflight: Any


class GatewayMetrics:
    """All serving metrics of one gateway app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        mv = ["model", "version"]
        self.requests = Counter(
            "fides_inference_requests",
            "Inference requests by outcome (success or failure).",
            [*mv, "outcome"],
            registry=r,
        )
        self.failures = Counter(
            "fides_inference_failures",
            "Failed inference requests by reason (bad_request, queue_full, timeout, ...).",
            [*mv, "reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            "fides_inference_request_duration_seconds",
            "Time from request parsed to response ready, per inference request.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "fides_inference_queue_duration_seconds",
            "Time a request waited in the batcher queue before its batch started.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "fides_inference_compute_duration_seconds",
            "Runtime execution time per batch (framework call, concat and split included).",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fides_inference_batch_size",
            "Samples per executed batch.",
            mv,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "fides_inference_inflight_requests",
            "Inference requests being served now.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "fides_inference_queue_depth",
            "Requests waiting in the batcher queue.",
            mv,
            registry=r,
        )
        self.model_ready = Gauge(
            "fides_model_ready",
            "1 when the model version is loaded and serving, else 0.",
            mv,
            registry=r,
        )
        self.model_loads = Counter(
            "fides_model_loads",
            "Model (re)load attempts by outcome (success or failure).",
            ["model", "outcome"],
            registry=r,
        )
        self.http_requests = Counter(
            "fides_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "fides_http_request_duration_seconds",
            "HTTP request duration by route template (body read and serialisation included).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_requests = Counter(
            "fides_grpc_requests",
            "gRPC calls by method and status code (CANCELLED: the client went away mid-call; "
            "DEADLINE_EXCEEDED: its deadline passed).",
            ["method", "code"],
            registry=r,
        )
        self.grpc_duration = Histogram(
            "fides_grpc_request_duration_seconds",
            "gRPC call duration by method (decoding and encoding included).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            "fides_upstream_retries",
            "Retried calls to an upstream MLaaS.",
            ["model"],
            registry=r,
        )
        self.upstream_circuit_open = Gauge(
            "fides_upstream_circuit_open",
            "1 while the circuit breaker to the model's upstream MLaaS is open, else 0.",
            ["model"],
            registry=r,
        )

        self.generation = GenerationMetrics(r)  # /v1 text generation and speculative decoding
        self.integrity = IntegrityMetrics(r)  # verdicts, detector, enclave, drills

        self._model_series: dict[tuple[str, str], ModelSeries] = {}
        self._http_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def model_series(self, model: str, version: str) -> ModelSeries:
        # labels() costs a lock and a dict lookup per call; the hot path caches the children
        key = (model, version)
        series = self._model_series.get(key)
        if series is None:
            series = ModelSeries(
                self.requests.labels(model, version, "success"),
                self.requests.labels(model, version, "failure"),
                self.request_duration.labels(model, version),
                self.inflight.labels(model),
            )
            self._model_series[key] = series
        return series

    def http_series(self, method: str, route: str, status: str) -> tuple[Any, Any]:
        key = (method, route, status)
        series = self._http_series.get(key)
        if series is None:
            series = (
                self.http_requests.labels(method, route, status),
                self.http_duration.labels(method, route),
            )
            self._http_series[key] = series
        return series
