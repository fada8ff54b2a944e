"""The Open Inference Protocol (KServe V2) REST surface: router, protocol, serving."""

from gateway.api.v2.router import health, router

__all__ = ["health", "router"]
