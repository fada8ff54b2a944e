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
    "InputContract",
    "InputTensor",
    "OutputTensor",
    "RequestedOutput",
    "check_input",
    "check_shape",
    "unknown_inputs",
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


def check_input(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    want_datatype: str,
    want_shape: tuple[int, ...],
    max_batch: int,
) -> None:
    """An input's datatype and shape against the model's declared ones (``-1``: any size) and,
    for a batching model (``max_batch > 0``), its batch dimension within ``max_batch``. Checked
    by the data plane for every protocol, and by a parser before it decodes the input's data:
    16 MiB of a wrong datatype are seconds of decoding to throw away."""
    if datatype != want_datatype:
        raise BadRequest(
            f"input '{name}': datatype {datatype} does not match the model's {want_datatype}"
        )
    if len(shape) != len(want_shape) or any(
        want not in (-1, got) for want, got in zip(want_shape, shape, strict=True)
    ):
        raise BadRequest(
            f"input '{name}': shape {list(shape)} does not match the model's "
            f"{list(want_shape)} (-1 = any size)"
        )
    if max_batch > 0:
        if shape[0] > max_batch:
            raise BadRequest(
                f"input '{name}': batch of {shape[0]} exceeds max_batch_size {max_batch}"
            )
        if shape[0] == 0:
            raise BadRequest(f"input '{name}': empty batch")


def unknown_inputs(model: str, unknown: list[str], expected: list[str]) -> BadRequest:
    """The error for inputs the model does not declare (``expected``: its input names)."""
    return BadRequest(f"model '{model}' has no input(s) {unknown}; it expects {expected}")


@dataclass(frozen=True)
class InputContract:
    """What a model declares of its inputs, for a parser to check each input against before
    decoding its data: ``inputs`` maps a name to its (datatype, shape)."""

    model: str
    inputs: dict[str, tuple[str, tuple[int, ...]]]
    max_batch_size: int


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
        # a JSON boolean (the parsers refuse anything else): bool("false") would be True
        return self.parameters.get("binary_data_output", False) is True


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
