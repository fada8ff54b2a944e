"""Runtimes by platform name; an unknown platform is an error, never a silent fallback."""

from __future__ import annotations

from gateway.errors import ModelLoadError
from gateway.runtimes.base import Runtime, Tensors, TensorSpec


def runtime_class(platform: str) -> type[Runtime]:
    """The class for ``platform``, imported lazily (torch is slow to import)."""
    if platform == "onnx":
        from gateway.runtimes.onnx import OnnxRuntime

        return OnnxRuntime
    if platform == "torch":
        from gateway.runtimes.torch_runtime import TorchRuntime

        return TorchRuntime
    if platform == "upstream":
        from gateway.runtimes.upstream import UpstreamRuntime

        return UpstreamRuntime
    raise ModelLoadError(f"unknown platform {platform!r}; one of onnx, torch, upstream")


__all__ = ["Runtime", "TensorSpec", "Tensors", "runtime_class"]
