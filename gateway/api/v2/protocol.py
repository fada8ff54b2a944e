"""The Open Inference Protocol's REST wire format: an inference request body (JSON, or a JSON
header followed by Triton's binary tensors) to :class:`gateway.types.InferRequest`, and an
:class:`~gateway.types.InferResponse` back to a body. The tensor data itself goes through the one
codec in :mod:`fides_core.oip`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from fides_core.oip import (
    DATATYPES,
    TensorError,
    decode_binary_data,
    decode_json_data,
    encode_binary_data,
    encode_json_data,
    oip_datatype,
)
from gateway.api.responses import dumps
from gateway.errors import BadRequest, GatewayError
from gateway.types import (
    InferRequest,
    InferResponse,
    InputContract,
    InputTensor,
    RequestedOutput,
    check_input,
    check_shape,
    unknown_inputs,
)

HEADER_LENGTH = "Inference-Header-Content-Length"

# the OpenAPI description of an inference body (the route reads the raw body itself)
INFER_BODY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype", "data"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "parameters": {"type": "object"},
                                    "data": {},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            },
        },
    }
}


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
    return tuple(value)


def check_counts(
    inputs: int, outputs: int, max_inputs: int | None, max_outputs: int | None
) -> None:
    """Refuse more inputs or requested outputs than the model declares, before reading them
    (the data plane names unknown ones; a count past the model's is refused here unread)."""
    if max_inputs is not None and inputs > max_inputs:
        raise BadRequest(f"the request has {inputs} inputs; the model takes {max_inputs}")
    if max_outputs is not None and outputs > max_outputs:
        raise BadRequest(f"the request asks for {outputs} outputs; the model has {max_outputs}")


def parse_infer_request(
    body: bytes,
    header_length: int | None = None,
    *,
    max_elements: int,
    max_inputs: int | None = None,
    max_outputs: int | None = None,
    contract: InputContract | None = None,
) -> InferRequest:
    """Decode an inference request body (JSON, or JSON header + binary tensors);
    ``max_inputs`` and ``max_outputs`` (the model's counts) refuse a longer list unread, and
    ``contract`` (the model's declared inputs) an input of another name, datatype, shape or
    batch size before its data is decoded, with the data plane's own messages."""
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
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise BadRequest("'outputs' must be a list")
    check_counts(len(raw_inputs), len(raw_outputs or ()), max_inputs, max_outputs)
    parameters = _params(doc.get("parameters"), "request")
    flag = parameters.get("binary_data_output")
    if flag is not None and not isinstance(flag, bool):
        raise BadRequest("parameter 'binary_data_output' must be a boolean (true or false)")

    offset = 0
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_inputs):
        tensor, offset = _parse_input(i, raw, binary, offset, header_length, max_elements, contract)
        if tensor.name in seen:
            raise BadRequest(f"input '{tensor.name}' appears more than once")
        seen.add(tensor.name)
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(
            f"body has {len(binary) - offset} binary bytes that no input's binary_data_size claims"
        )

    outputs: list[RequestedOutput] | None = None
    if raw_outputs is not None:
        outputs = []
        asked: set[str] = set()
        for i, raw in enumerate(raw_outputs):
            raw = _obj(raw, f"outputs[{i}]")
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"outputs[{i}]: 'name' must be a non-empty string")
            params = _params(raw.get("parameters"), f"output '{name}'")
            binary_flag = params.get("binary_data")
            if binary_flag is not None and not isinstance(binary_flag, bool):
                raise BadRequest(f"output '{name}': binary_data must be a boolean")
            if name in asked:
                raise BadRequest(f"output '{name}' is requested more than once")
            asked.add(name)
            outputs.append(RequestedOutput(name, binary_flag, params))
    return InferRequest(
        inputs=inputs,
        id=req_id,
        parameters=parameters,
        outputs=outputs,
    )


def _parse_input(
    i: int,
    raw: Any,
    binary: memoryview,
    offset: int,
    header_length: int | None,
    max_elements: int,
    contract: InputContract | None,
) -> tuple[InputTensor, int]:
    """Input ``i`` of the request, its data from JSON or from the binary part at ``offset``;
    returns it and the offset past its binary data."""
    raw = _obj(raw, f"inputs[{i}]")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{i}]: 'name' must be a non-empty string")
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
    check_shape(name, shape, max_elements)
    if contract is not None:
        declared = contract.inputs.get(name)
        if declared is None:
            raise unknown_inputs(contract.model, [name], sorted(contract.inputs))
        check_input(name, datatype, shape, *declared, contract.max_batch_size)
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
        data = _decoded(decode_binary_data, chunk, datatype, shape, name)
    else:
        if "data" not in raw:
            raise BadRequest(f"input '{name}': missing 'data'")
        data = _decoded(decode_json_data, raw["data"], datatype, shape, name)
    return InputTensor(name, datatype, shape, data, params), offset


def _decoded(
    decode: Callable[[Any, str, tuple[int, ...], str], np.ndarray],
    data: Any,
    datatype: str,
    shape: tuple[int, ...],
    name: str,
) -> np.ndarray:
    try:
        return decode(data, datatype, shape, f"input '{name}'")
    except TensorError as exc:
        raise BadRequest(str(exc)) from None


class UnencodableOutput(GatewayError):
    """A model output that the JSON answer cannot carry (NaN or Inf: orjson would write them
    as ``null``, which a client cannot tell from a real value). 500: the request was valid and
    the server cannot return the model's result in the format asked for, so a 4xx would blame
    the client's input; the message names the output and the remedy (binary data)."""

    status, reason = 500, "unencodable_output"


def _json_output(name: str, arr: np.ndarray, datatype: str) -> object:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UnencodableOutput(
            f"output '{name}' holds NaN or Inf, which JSON cannot carry; request it as binary "
            '(output parameter "binary_data": true, or the request parameter '
            '"binary_data_output": true) to receive them'
        )
    try:
        return encode_json_data(arr, datatype)
    except TensorError as exc:
        raise BadRequest(str(exc)) from None


def encode_infer_response(
    resp: InferResponse,
    binary_default: bool,
    binary_names: dict[str, bool],
    *,
    sliced: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """Serialise a response; returns the body and extra headers (binary header length).
    ``sliced``: the same bytes, long JSON data written a slice at a time so that a worker
    thread running this gives the event loop the GIL back (:func:`gateway.api.responses.dumps`).
    """
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
            raw = encode_binary_data(out.data, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_output(out.name, out.data, datatype)
        doc_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id is not None:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    doc["outputs"] = doc_outputs
    header = dumps(doc) if sliced else orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {HEADER_LENGTH: str(len(header))}
