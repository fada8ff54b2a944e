"""The verification call's request and answer, as both sides of the enclave boundary see them.

One call carries several client requests (each its id, nonce and input tensors); the enclave
answers each in order with its outputs and evidence (:class:`VerifiedItem`) or, when it refuses
that request alone, with an error in its place (:class:`RejectedItem`). :func:`check_request`
is the one definition of what the enclave accepts: the enclave runs it on every request, and
the gateway runs it before a request joins a shared call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fides_core.enclave_errors import BatchTooLarge, BootError, InvalidRequest
from fides_core.evidence import MAX_NONCE, MIN_NONCE
from fides_core.tensors import Array, datatype_of, decode_tensors, encode_tensor

__all__ = [
    "MAX_REQUEST_ID",
    "InputSpec",
    "RejectedItem",
    "VerifiedItem",
    "VerifyRequest",
    "check_request",
    "encode_requests",
    "input_specs",
    "parse_requests",
]

MAX_REQUEST_ID = 256


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the first axis is the batch axis)


@dataclass(frozen=True)
class VerifyRequest:
    """One client request inside a batch: its id, its nonce and its input tensors."""

    id: str
    nonce: bytes
    inputs: Mapping[str, Array]


@dataclass(frozen=True)
class VerifiedItem:
    id: str
    outputs: dict[str, Array]  # name -> [rows of this request, ...]
    evidence: bytes  # per-request evidence (see fides_core.evidence)


@dataclass(frozen=True)
class RejectedItem:
    """One request of a batch that the enclave refused (a bad id, nonce or input); the other
    requests of the batch are verified and signed as if it had not been there."""

    id: str | None  # None when the request did not even carry a string id
    code: str  # the enclave error code, e.g. "bad_request"
    message: str


def check_request(r: VerifyRequest, specs: Sequence[InputSpec]) -> int:
    """The rows of one request, or :class:`InvalidRequest` naming what the enclave refuses in it.

    The gateway runs this very check before a request joins a shared enclave call, so a bad
    request is refused alone there (400) and never reaches the batch."""
    if not isinstance(r.id, str) or not 0 < len(r.id) <= MAX_REQUEST_ID:
        raise InvalidRequest(f"request ids must be strings of 1..{MAX_REQUEST_ID} characters")
    if not isinstance(r.nonce, bytes) or not MIN_NONCE <= len(r.nonce) <= MAX_NONCE:
        raise InvalidRequest(f"request {r.id}: nonce must be {MIN_NONCE}..{MAX_NONCE} bytes")
    names = {s.name for s in specs}
    if set(r.inputs) != names:
        raise InvalidRequest(
            f"request {r.id}: inputs {sorted(r.inputs)} do not match the verifier's {sorted(names)}"
        )
    n = None
    for spec in specs:
        x = r.inputs[spec.name]
        if datatype_of(x) != spec.datatype:
            raise InvalidRequest(
                f"request {r.id}: input {spec.name} is {datatype_of(x)}, "
                f"the verifier takes {spec.datatype}"
            )
        if x.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape[1:], x.shape[1:], strict=True)
        ):
            raise InvalidRequest(
                f"request {r.id}: input {spec.name} has shape {list(x.shape)}, "
                f"the verifier takes {list(spec.shape)}"
            )
        if x.shape[0] < 1 or (n is not None and x.shape[0] != n):
            raise InvalidRequest(f"request {r.id}: inputs need the same number (>0) of rows")
        n = x.shape[0]
    return n or 0


def input_specs(model: bytes) -> list[InputSpec]:
    """The inputs of an ONNX verifier as the enclave sees them, read from the graph without
    loading it into onnxruntime (what the gateway checks requests against)."""
    import onnx

    by_proto = {
        getattr(onnx.TensorProto, name): oip
        for name, oip in (
            ("BOOL", "BOOL"),
            ("UINT8", "UINT8"),
            ("UINT16", "UINT16"),
            ("UINT32", "UINT32"),
            ("UINT64", "UINT64"),
            ("INT8", "INT8"),
            ("INT16", "INT16"),
            ("INT32", "INT32"),
            ("INT64", "INT64"),
            ("FLOAT16", "FP16"),
            ("FLOAT", "FP32"),
            ("DOUBLE", "FP64"),
        )
    }
    try:
        graph = onnx.load_model_from_string(model).graph
    except Exception as exc:  # protobuf's DecodeError, and whatever else a bad file raises
        raise BootError(f"the verifier is not an ONNX model: {type(exc).__name__}: {exc}") from None
    initialized = {t.name for t in graph.initializer}
    specs = []
    for arg in graph.input:
        if arg.name in initialized:
            continue
        t = arg.type.tensor_type
        datatype = by_proto.get(t.elem_type)
        if datatype is None:
            raise BootError(f"verifier input {arg.name} has unsupported element type {t.elem_type}")
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim
        )
        if not dims:
            raise BootError(f"verifier input {arg.name} must have a batch axis")
        specs.append(InputSpec(arg.name, datatype, dims))
    return specs


def parse_requests(raw: Any, max_requests: int) -> list[VerifyRequest | RejectedItem]:
    """Wire ``requests`` -> one VerifyRequest per item, every field checked; an item that
    cannot be read becomes a RejectedItem in its place (the others are still verified).

    More than ``max_requests`` items (the enclave passes its ``max_batch_size``: every request
    carries at least one row) is :class:`BatchTooLarge` for the whole call, before any item is
    read: each refused item costs an answer entry, and a 1 MB list of one-byte items made
    650 MB of them."""
    if not isinstance(raw, list):
        raise InvalidRequest("requests must be a list")
    if len(raw) > max_requests:
        raise BatchTooLarge(
            f"{len(raw)} requests in one call; the verifier takes at most {max_requests} rows"
            " (each request carries at least one)"
        )
    out: list[VerifyRequest | RejectedItem] = []
    for i, item in enumerate(raw):
        rid = item.get("id") if isinstance(item, dict) else None
        try:
            if not isinstance(item, dict):
                raise InvalidRequest(f"requests[{i}] must be a map")
            nonce = item.get("nonce")
            if not isinstance(rid, str) or not isinstance(nonce, bytes):
                raise InvalidRequest(f"requests[{i}] needs a string id and a byte-string nonce")
            out.append(VerifyRequest(rid, nonce, decode_tensors(item.get("inputs"), what=rid)))
        except InvalidRequest as exc:
            out.append(RejectedItem(rid if isinstance(rid, str) else None, exc.code, str(exc)))
    return out


def encode_requests(requests: Sequence[VerifyRequest]) -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "nonce": r.nonce,
            "inputs": {name: encode_tensor(np.asarray(x)) for name, x in r.inputs.items()},
        }
        for r in requests
    ]
