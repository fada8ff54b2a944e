from __future__ import annotations

import gzip
from typing import Any

import numpy as np
import orjson
import pytest

from fides_core.oip import (
    DATATYPES,
    TensorError,
    decode_binary_data,
    deserialize_bytes,
    serialize_bytes,
)
from gateway.api.v2.protocol import encode_infer_response, parse_infer_request
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.types import InferResponse, OutputTensor

LIMIT = 1_000_000


def _req(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def _parse(body: bytes, header: int | None = None) -> Any:
    return parse_infer_request(body, header, max_elements=LIMIT)


def test_nested_and_flat_data_agree() -> None:
    flat = _parse(_req([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]))
    nested = _parse(
        _req([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}])
    )
    np.testing.assert_array_equal(flat.inputs[0].data, nested.inputs[0].data)
    assert flat.inputs[0].data.dtype == np.float32
    assert flat.inputs[0].data.shape == (2, 2)


@pytest.mark.parametrize("datatype", sorted(set(DATATYPES) - {"BYTES", "BF16"}))
def test_json_datatypes(datatype: str) -> None:
    data = [True, False] if datatype == "BOOL" else [1, 2]
    req = _parse(_req([{"name": "x", "shape": [2], "datatype": datatype, "data": data}]))
    assert req.inputs[0].data.dtype == DATATYPES[datatype]
    assert req.inputs[0].data.tolist() == data


def test_bytes_json_and_binary_roundtrip() -> None:
    req = _parse(_req([{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["héllo", ""]}]))
    assert req.inputs[0].data.tolist() == ["héllo".encode(), b""]
    raw = serialize_bytes(req.inputs[0].data)
    assert deserialize_bytes(memoryview(raw), "input 's'") == ["héllo".encode(), b""]


@pytest.mark.parametrize(
    ("inp", "message"),
    [
        ({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}, "needs 3"),
        ({"name": "x", "shape": [2], "datatype": "FLOAT", "data": [1, 2]}, "unknown datatype"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}, "must be numbers"),
        ({"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}, "must be integers"),
        ({"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}, "out of range"),
        ({"name": "x", "shape": [1], "datatype": "INT8", "data": [-129]}, "out of range"),
        ({"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}, "true/false"),
        ({"name": "x", "shape": [2], "datatype": "UINT64", "data": [2**63, -1]}, "out of range"),
        ({"name": "x", "shape": [2], "datatype": "UINT64", "data": [1, 2.5]}, "integers"),
        ({"name": "x", "shape": [1], "datatype": "FP32", "data": [1e39]}, "out of range"),
        ({"name": "x", "shape": [1], "datatype": "FP16", "data": [70000]}, "out of range"),
        ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}, "ragged"),
        ({"name": "x", "shape": [2], "datatype": "FP32"}, "missing 'data'"),
        ({"name": "x", "datatype": "FP32", "data": [1]}, "missing 'shape'"),
        ({"name": "x", "shape": "2", "datatype": "FP32", "data": [1]}, "list of integers"),
        ({"name": "x", "shape": [-2], "datatype": "FP32", "data": [1]}, "negative"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, "'name'"),
        ({"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}, "must be strings"),
        ({"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "junk": 1}, "unknown field"),
    ],
)
def test_bad_inputs_are_named(inp: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        _parse(_req([inp]))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "'inputs' must be a non-empty list"),
        (b'{"inputs": []}', "non-empty list"),
        (b'{"inputs": [1]}', r"inputs\[0\] must be a JSON object"),
        (
            b'{"inputs": [{"name":"x","shape":[1],"datatype":"FP32","data":[1]}], "id": 5}',
            "'id' must be a string",
        ),
        (
            b'{"inputs": [{"name":"x","shape":[1],"datatype":"FP32","data":[1]}], "outputs": {}}',
            "'outputs' must be a list",
        ),
        (
            b'{"inputs": [{"name":"x","shape":[1],"datatype":"FP32","data":[1]},'
            b'{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}',
            "more than once",
        ),
        (
            b'{"inputs": [{"name":"x","shape":[1],"datatype":"FP32","data":[1]}], "extra": 1}',
            "unknown field",
        ),
    ],
)
def test_bad_bodies(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        _parse(body)


def test_element_limit() -> None:
    body = _req([{"name": "x", "shape": [LIMIT + 1], "datatype": "FP32", "data": [0]}])
    with pytest.raises(PayloadTooLarge, match="elements"):
        _parse(body)


def _binary_body(arrays: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    inputs, chunks = [], []
    for name, (dt, arr) in arrays.items():
        raw = (
            serialize_bytes(arr)
            if dt == "BYTES"
            else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        )
        inputs.append(
            {
                "name": name,
                "shape": list(arr.shape),
                "datatype": dt,
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        chunks.append(raw)
    header = orjson.dumps({"inputs": inputs})
    return header + b"".join(chunks), len(header)


def test_binary_inputs() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([b"x", b"yz"], dtype=object)
    c = np.array([1, -2], dtype=np.int64)
    body, n = _binary_body({"a": ("FP32", a), "b": ("BYTES", b), "c": ("INT64", c)})
    req = _parse(body, n)
    np.testing.assert_array_equal(req.inputs[0].data, a)
    assert req.inputs[1].data.tolist() == [b"x", b"yz"]
    np.testing.assert_array_equal(req.inputs[2].data, c)


def test_binary_size_mismatch_and_leftovers() -> None:
    a = np.arange(6, dtype=np.float32)
    body, n = _binary_body({"a": ("FP32", a)})
    with pytest.raises(BadRequest, match="is 24 bytes but shape \\[5\\] of FP32 needs 20"):
        _parse(body.replace(b'"shape":[6]', b'"shape":[5]'), n)
    with pytest.raises(BadRequest, match="no input's binary_data_size claims"):
        _parse(body + b"xx", n)
    with pytest.raises(BadRequest, match="runs past the end"):
        _parse(body[:-4], n)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        _parse(body, len(body) + 10)
    with pytest.raises(BadRequest, match="no Inference-Header-Content-Length"):
        _parse(body[:n])


def test_bf16_binary_is_widened_exactly() -> None:
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)  # exact in bfloat16
    words = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [3],
                    "datatype": "BF16",
                    "parameters": {"binary_data_size": 6},
                }
            ]
        }
    )
    req = _parse(header + words, len(header))
    np.testing.assert_array_equal(req.inputs[0].data, values)


def test_encode_json_and_binary_outputs() -> None:
    resp = InferResponse(
        "m",
        "1",
        [
            OutputTensor("p", np.array([[0.5, 0.25]], dtype=np.float32)),
            OutputTensor("h", np.array([1.5], dtype=np.float16)),
            OutputTensor("s", np.array(["ok"], dtype=object)),
        ],
        id="r1",
    )
    body, headers = encode_infer_response(resp, False, {})
    assert headers == {}
    doc = orjson.loads(body)
    assert doc["id"] == "r1"
    assert doc["outputs"][0] == {
        "name": "p",
        "datatype": "FP32",
        "shape": [1, 2],
        "data": [0.5, 0.25],
    }
    assert doc["outputs"][1]["data"] == [1.5]
    assert doc["outputs"][2] == {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["ok"]}

    body, headers = encode_infer_response(resp, False, {"p": True})
    n = int(headers["Inference-Header-Content-Length"])
    doc = orjson.loads(body[:n])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[n:], dtype="<f4"), [0.5, 0.25])


def test_gzip_is_not_json() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        _parse(gzip.compress(b"{}"))


def test_uint64_beyond_int64_mixed_with_small_values() -> None:
    data = [1, 2**64 - 1, 2**63]
    req = _parse(_req([{"name": "x", "shape": [3], "datatype": "UINT64", "data": data}]))
    assert req.inputs[0].data.dtype == np.uint64
    assert req.inputs[0].data.tolist() == data


def test_duplicate_outputs_rejected() -> None:
    body = _req(
        [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        outputs=[{"name": "y"}, {"name": "y"}],
    )
    with pytest.raises(BadRequest, match="requested more than once"):
        _parse(body)


def test_counts_past_the_models_are_refused_unread() -> None:
    """``max_inputs`` / ``max_outputs`` (the model's counts, from the data plane's admit) refuse
    a longer list by its length, before any name or tensor in it is read."""
    x = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    outputs = [{"name": f"o{i}"} for i in range(20_000)]
    body = _req([x], outputs=outputs)
    with pytest.raises(BadRequest, match="^the request asks for 20000 outputs; the model has 2$"):
        parse_infer_request(body, max_elements=LIMIT, max_inputs=1, max_outputs=2)
    # without the caps, 20,000 distinct names are each checked once against a set
    assert len(_parse(body).outputs or []) == 20_000
    body = _req([{**x, "name": f"i{i}"} for i in range(3)])
    with pytest.raises(BadRequest, match="^the request has 3 inputs; the model takes 1$"):
        parse_infer_request(body, max_elements=LIMIT, max_inputs=1, max_outputs=2)


def test_bytes_elements_past_the_shape_stop_the_split() -> None:
    """The split stops at the first element past the shape's count: the byte after the second
    element is a truncated length, which a parser reading on would have refused instead."""
    empty = (0).to_bytes(4, "little")
    chunk = memoryview(empty * 2 + b"\xff")
    with pytest.raises(TensorError, match="^input 'x': data has more than 1 elements$"):
        deserialize_bytes(chunk, "input 'x'", max_count=1)
    with pytest.raises(TensorError, match="truncated BYTES element length"):
        deserialize_bytes(chunk, "input 'x'")  # no bound: read to the end
    with pytest.raises(
        TensorError, match=r"^input 'x': data has more than 1 elements but shape \[1\] needs 1$"
    ):
        decode_binary_data(chunk, "BYTES", (1,), "input 'x'")
    # 1 MiB of zero lengths (262,144 empty elements) for shape [1]: refused after the second
    with pytest.raises(TensorError, match="more than 1 elements"):
        decode_binary_data(memoryview(b"\0" * (1 << 20)), "BYTES", (1,), "input 'x'")
    # fewer elements than the shape: the count named as before
    with pytest.raises(TensorError, match=r"data has 2 elements but shape \[3\] needs 3"):
        decode_binary_data(memoryview(empty * 2), "BYTES", (3,), "input 'x'")
    assert decode_binary_data(memoryview(empty * 2), "BYTES", (2,), "x").tolist() == [b"", b""]
