"""Inference requests and responses as the data plane sees them, whatever the protocol
(OIP REST today; gRPC later) they arrived by. Each protocol's ``protocol`` module translates its
wire format to and from these."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import BadRequest, PayloadTooLarge

__all__ = [
    "InferRequest",
    "InferResponse",
    "InputTensor",
    "OutputTensor",
    "RequestedOutput",
    "check_shape",
]


def check_shape(name: str, shape: tuple[int, ...], max_elements: int) -> None:
    """An input's shape within the gateway's limits, whatever the protocol: no negative
    dimension (400), at most ``max_elements`` elements and no dimension above it (413; an empty
    tensor may still name a dimension numpy cannot allocate, ``[0, 2**62]``)."""
    if any(d < 0 for d in shape):
        raise BadRequest(f"input '{name}': 'shape' must not contain negative dimensions")
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(f"input '{name}' has {count} elements; the limit is {max_elements}")
    if any(d > max_elements for d in shape):
        raise PayloadTooLarge(
            f"input '{name}': dimension {max(shape)} exceeds the limit of {max_elements}"
        )


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # already shaped
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request-level binary_data_output
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None

    @property
    def binary_output_default(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


@dataclass
class OutputTensor:
    name: str
    data: np.ndarray
    datatype: str | None = None  # defaults to the numpy dtype's OIP name


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
