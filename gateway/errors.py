"""Errors that carry their HTTP status; routes turn them into ``{"error": message}``."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class: ``status`` is the HTTP status, ``reason`` a short label for metrics."""

    status: int = 500
    reason: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GatewayError):
    status, reason = 400, "bad_request"


class Unauthorized(GatewayError):
    status, reason = 401, "unauthorized"


class Forbidden(GatewayError):
    status, reason = 403, "forbidden"


class NotFound(GatewayError):
    status, reason = 404, "not_found"


class PayloadTooLarge(GatewayError):
    status, reason = 413, "payload_too_large"


class Unavailable(GatewayError):
    """Not ready, or shedding load; carries Retry-After."""

    status, reason = 503, "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class QueueFull(Unavailable):
    reason = "queue_full"


class RequestTimeout(GatewayError):
    """The request's deadline passed before its inference finished."""

    status, reason = 504, "timeout"


class UpstreamError(GatewayError):
    """The remote MLaaS answered with an error or could not be reached."""

    status, reason = 502, "upstream_error"


class UpstreamTimeout(GatewayError):
    status, reason = 504, "upstream_timeout"


class CircuitOpen(UpstreamError):
    """Too many recent upstream failures; calls are refused until the reset timeout."""

    status, reason = 503, "circuit_open"


class ModelLoadError(GatewayError):
    """A model version could not be loaded (bad artefact, bad config)."""

    status, reason = 400, "load_failed"
