"""Inference requests and responses as the data plane sees them, whatever the protocol
(OIP REST today; gRPC later) they arrived by. Each protocol's ``protocol`` module translates its
wire format to and from these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["InferRequest", "InferResponse", "InputTensor", "OutputTensor", "RequestedOutput"]


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
