"""Model cards: what a served model is, how it was made, and how good it is (JSON)."""

from __future__ import annotations

import platform
from typing import Any

import torch

from verifier.experiment import RunSpec

__all__ = ["model_card"]


def model_card(
    exp: RunSpec,
    *,
    role: str,
    dataset: dict[str, Any],
    architecture: dict[str, Any],
    metrics: dict[str, Any],
    params: int,
    flops: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A card with the data set, quality, size, cost and the exact training config + hash.

    ``cpu_latency_ms_batch1`` and ``onnx_max_abs_diff`` are added by
    :func:`verifier.export.write_entry` after export.
    """
    return {
        "format": 1,
        "role": role,  # "service" | "verifier"
        "experiment": exp.name,
        "dataset": dataset,
        "architecture": architecture,
        "metrics": metrics,
        "params": params,
        "flops_per_image": flops,
        "training_config": exp.model_dump(mode="json"),
        "training_config_sha256": exp.config_hash(),
        "seed": exp.seed,
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        **(extra or {}),
    }
