"""Open Inference Protocol tensor codec: JSON bodies and Triton's binary tensor extension.

Parsing is done by hand on the raw body rather than through pydantic models: a 1 MB tensor as
a JSON list would otherwise be validated element by element, and hand-written checks give
error messages that name the tensor and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from fides_core.oip import DATATYPES, element_size, oip_datatype
from gateway.errors import BadRequest, PayloadTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT_KINDS = frozenset("iu")


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


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _params(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    return _obj(value, f"{what} 'parameters'")


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise BadRequest(f"input '{name}': 'shape' must be a list of integers")
    if any(d < 0 for d in value):
        raise BadRequest(f"input '{name}': 'shape' must not contain negative dimensions")
    return tuple(value)


def parse_infer_request(
    body: bytes, header_length: int | None = None, *, max_elements: int
) -> InferRequest:
    """Decode an inference request body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        json_part, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        json_part, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    doc = _obj(doc, "request body")
    unknown = set(doc) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise BadRequest(f"unknown field(s) in request: {sorted(unknown)}")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequest("'id' must be a string")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")

    offset = 0
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_inputs):
        raw = _obj(raw, f"inputs[{i}]")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"inputs[{i}]: 'name' must be a non-empty string")
        if name in seen:
            raise BadRequest(f"input '{name}' appears more than once")
        seen.add(name)
        extra = set(raw) - {"name", "shape", "datatype", "parameters", "data"}
        if extra:
            raise BadRequest(f"input '{name}': unknown field(s) {sorted(extra)}")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise BadRequest(
                f"input '{name}': unknown datatype {datatype!r}; one of {sorted(DATATYPES)}"
            )
        if "shape" not in raw:
            raise BadRequest(f"input '{name}': missing 'shape'")
        shape = _shape(raw["shape"], name)
        count = math.prod(shape)
        if count > max_elements:
            raise PayloadTooLarge(
                f"input '{name}' has {count} elements; the limit is {max_elements}"
            )
        # an empty tensor may still name a dimension numpy cannot allocate ([0, 2**62])
        if any(d > max_elements for d in shape):
            raise PayloadTooLarge(
                f"input '{name}': dimension {max(shape)} exceeds the limit of {max_elements}"
            )
        params = _params(raw.get("parameters"), f"input '{name}'")
        size = params.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise BadRequest(
                    f"input '{name}' sets binary_data_size but the request has no "
                    f"{HEADER_LENGTH} header"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative int")
            if "data" in raw:
                raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise BadRequest(
                    f"input '{name}': binary_data_size {size} runs past the end of the body"
                )
            chunk = binary[offset : offset + size]
            offset += size
            data = _decode_binary(chunk, datatype, shape, name)
        else:
            if "data" not in raw:
                raise BadRequest(f"input '{name}': missing 'data'")
            data = _decode_json(raw["data"], datatype, shape, name)
        inputs.append(InputTensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise BadRequest(
            f"body has {len(binary) - offset} binary bytes that no input's binary_data_size claims"
        )

    outputs: list[RequestedOutput] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for i, raw in enumerate(raw_outputs):
            raw = _obj(raw, f"outputs[{i}]")
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"outputs[{i}]: 'name' must be a non-empty string")
            params = _params(raw.get("parameters"), f"output '{name}'")
            binary_flag = params.get("binary_data")
            if binary_flag is not None and not isinstance(binary_flag, bool):
                raise BadRequest(f"output '{name}': binary_data must be a boolean")
            if any(o.name == name for o in outputs):
                raise BadRequest(f"output '{name}' is requested more than once")
            outputs.append(RequestedOutput(name, binary_flag, params))
    return InferRequest(
        inputs=inputs,
        id=req_id,
        parameters=_params(doc.get("parameters"), "request"),
        outputs=outputs,
    )


def _decode_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"input '{name}': BYTES data must be strings")
        if len(flat) != count:
            raise _count_error(name, len(flat), shape)
        arr = np.empty(count, dtype=object)
        arr[:] = [x.encode("utf-8") for x in flat]
        return arr.reshape(shape)
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise BadRequest(f"input '{name}': data is ragged or not numeric") from None
    if arr.size != count:
        raise _count_error(name, arr.size, shape)
    target = DATATYPES[datatype]
    kind = arr.dtype.kind
    if count == 0:
        return np.zeros(shape, dtype=target)
    if datatype == "BOOL":
        if kind != "b":
            raise BadRequest(f"input '{name}': BOOL data must be true/false")
    elif target.kind in _INT_KINDS:
        return _decode_ints(data, arr, datatype, shape, name)
    elif kind not in "iufb":
        raise BadRequest(f"input '{name}': {datatype} data must be numbers, got {_kind(kind)}")
    with np.errstate(over="ignore"):
        out = arr.astype(target, copy=False).reshape(shape)
    narrowed = target.kind == "f" and target.itemsize < arr.dtype.itemsize
    # a finite value too large for the narrower float (NaN/Inf sent as such are the model's call)
    if narrowed and np.isinf(out).any() and np.isfinite(arr).all():
        raise BadRequest(f"input '{name}': values out of range for {datatype}")
    return out


def _decode_ints(
    data: Any, arr: np.ndarray, datatype: str, shape: tuple[int, ...], name: str
) -> np.ndarray:
    target = DATATYPES[datatype]
    info = np.iinfo(target)  # type: ignore[type-var]
    kind = arr.dtype.kind
    if kind in _INT_KINDS or kind == "b":
        if kind != "b" and (arr.min() < info.min or arr.max() > info.max):
            raise BadRequest(f"input '{name}': values out of range for {datatype}")
        return arr.astype(target, copy=False).reshape(shape)
    # numpy turns a mix of ints beyond int64 (large UINT64 values) into floats or objects:
    # check the Python values themselves
    flat = _flatten(data)
    if not all(isinstance(v, int) for v in flat):
        raise BadRequest(f"input '{name}': {datatype} data must be integers, got {_kind(kind)}")
    if min(flat) < info.min or max(flat) > info.max:
        raise BadRequest(f"input '{name}': values out of range for {datatype}")
    return np.array(flat, dtype=target).reshape(shape)


def _kind(kind: str) -> str:
    return {"f": "floats", "U": "strings", "O": "mixed values", "b": "booleans"}.get(kind, kind)


def _count_error(name: str, got: int, shape: tuple[int, ...]) -> BadRequest:
    return BadRequest(
        f"input '{name}': data has {got} elements but shape {list(shape)} needs {math.prod(shape)}"
    )


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _decode_binary(
    chunk: memoryview, datatype: str, shape: tuple[int, ...], name: str
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = deserialize_bytes(chunk, name)
        if len(items) != count:
            raise _count_error(name, len(items), shape)
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    size = element_size(datatype)
    if len(chunk) != count * size:
        raise BadRequest(
            f"input '{name}': binary_data_size is {len(chunk)} bytes but shape {list(shape)} "
            f"of {datatype} needs {count * size}"
        )
    if datatype == "BF16":
        words = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    dtype = DATATYPES[datatype].newbyteorder("<")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def deserialize_bytes(chunk: memoryview, name: str) -> list[bytes]:
    """Triton's BYTES encoding: each element is a 4-byte little-endian length then the bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise BadRequest(f"input '{name}': truncated BYTES element length")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(chunk):
            raise BadRequest(f"input '{name}': BYTES element runs past binary_data_size")
        items.append(bytes(chunk[pos : pos + n]))
        pos += n
    return items


def serialize_bytes(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(len(b).to_bytes(4, "little"))
        parts.append(b)
    return b"".join(parts)


def _to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(arr)
    if datatype == "BF16":
        words = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16
        return words.astype("<u2").tobytes()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _to_json_data(arr: np.ndarray, datatype: str) -> Any:
    flat = arr.ravel()
    if datatype == "BYTES":
        out = []
        for item in flat:
            if isinstance(item, bytes):
                try:
                    out.append(item.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BadRequest(
                        "output holds bytes that are not UTF-8; ask for it with binary_data"
                    ) from None
            else:
                out.append(str(item))
        return out
    if datatype == "FP16":
        return flat.astype(np.float32)
    return np.ascontiguousarray(flat)


def encode_infer_response(
    resp: InferResponse, binary_default: bool, binary_names: dict[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """Serialise a response; returns the body and extra headers (binary header length)."""
    doc_outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in resp.outputs:
        datatype = out.datatype or oip_datatype(out.data.dtype)
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": datatype,
            "shape": list(out.data.shape),
        }
        if binary_names.get(out.name, binary_default):
            raw = _to_binary(out.data, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json_data(out.data, datatype)
        doc_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id is not None:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    doc["outputs"] = doc_outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {HEADER_LENGTH: str(len(header))}
