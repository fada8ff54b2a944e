"""Property tests of the tensor codec (gateway/api/v2/protocol.py over fides_core/oip.py):
JSON bodies, Triton's binary tensor
extension and request decompression.

Properties: hostile bytes or documents raise only the gateway's 4xx errors (400/413, with a
message), never anything else; what parses has exactly the declared shape and datatype; valid
tensors survive a JSON and a binary round trip unchanged.
"""

from __future__ import annotations

import gzip
import math
import zlib
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fides_core.oip import DATATYPES, TensorError, deserialize_bytes, serialize_bytes
from gateway.api.v2.protocol import parse_infer_request
from gateway.api.v2.serving import decompress
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge
from tests.reliability.conftest import fuzz_settings, record

MAX_ELEMENTS = 4096
NUMERIC = [d for d in DATATYPES if d not in ("BYTES", "BF16")]


def parse(body: bytes, header_length: int | None = None) -> Any:
    """parse_infer_request, asserting the only way out besides success is a 4xx error."""
    try:
        return parse_infer_request(body, header_length, max_elements=MAX_ELEMENTS)
    except (BadRequest, PayloadTooLarge) as exc:
        rejected: GatewayError = exc
    assert_clear_rejection(rejected)
    return None


def assert_clear_rejection(exc: GatewayError) -> None:
    assert exc.status in (400, 413)
    assert exc.message.strip(), "a rejection must say why"


def check_parsed(req: Any, doc: Any) -> None:
    """What parsed is what the document declared."""
    if req is None:
        return
    for t in req.inputs:
        assert t.data.shape == t.shape
        if t.datatype != "BF16":
            assert t.data.dtype == DATATYPES[t.datatype]
        assert math.prod(t.shape) <= MAX_ELEMENTS


# -- raw bytes ------------------------------------------------------------------------------


@fuzz_settings(400)
@given(body=st.binary(max_size=512), header=st.none() | st.integers(-10, 600))
def test_arbitrary_bytes_are_rejected_cleanly(body: bytes, header: int | None) -> None:
    record("codec: arbitrary bytes")
    parse(body, header)


# -- structured documents -----------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what JSON numbers orjson reads as integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)
dims = st.integers(-2, 8) | st.sampled_from([0, 2**31, 2**62, 2**63 - 1]) | st.booleans()
shapes = st.lists(dims, max_size=5) | json_values
datatypes = st.sampled_from([*DATATYPES, "FP8", "fp32", "", "STRING"]) | json_values


def nested(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(st.lists(leaf, max_size=8), lambda inner: st.lists(inner, max_size=4))


tensor_data = (
    nested(st.integers(-(2**63), 2**64 - 1))
    | nested(st.floats(width=64))
    | nested(st.booleans())
    | nested(st.text(max_size=4))
    | json_values
)


@st.composite
def input_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": draw(st.sampled_from(["input", "x", ""]) | json_values),
        "datatype": draw(datatypes),
    }
    if draw(st.integers(0, 9)) > 0:
        doc["shape"] = draw(shapes)
    if draw(st.integers(0, 9)) > 0:
        doc["data"] = draw(tensor_data)
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values, max_size=2)
            | json_values
        )
    if draw(st.integers(0, 19)) == 0:
        doc[draw(st.text(max_size=5))] = draw(json_values)
    return doc


@st.composite
def request_docs(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    doc: dict[str, Any] = {"inputs": draw(st.lists(input_docs(), max_size=3) | json_values)}
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=10) | json_values)
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(["binary_data_output", "timeout", "x"]), json_values, max_size=3
            )
            | json_values
        )
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["output", "y"]) | json_values},
                    optional={"parameters": st.dictionaries(st.just("binary_data"), json_values)},
                ),
                max_size=3,
            )
            | json_values
        )
    return doc


@fuzz_settings(600)
@given(doc=request_docs())
def test_json_documents_parse_to_what_they_declare_or_a_4xx(doc: Any) -> None:
    record("codec: JSON request documents")
    check_parsed(parse(orjson.dumps(doc)), doc)


# -- binary tensors -------------------------------------------------------------------------


def binary_chunk(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def binary_request(tensors: list[tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": f"in{i}",
                    "datatype": dt,
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": len(binary_chunk(arr, dt))},
                }
                for i, (dt, arr) in enumerate(tensors)
            ]
        }
    )
    return header + b"".join(binary_chunk(a, dt) for dt, a in tensors), len(header)


small_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(small_shapes)
    if datatype == "BYTES":
        items = draw(
            st.lists(st.binary(max_size=6), min_size=math.prod(shape), max_size=math.prod(shape))
        )
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return datatype, arr.reshape(shape)
    return datatype, draw(hnp.arrays(DATATYPES[datatype], shape))


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype.kind == "f":
        np.testing.assert_array_equal(got, want)  # NaN == NaN here
    else:
        assert got.tolist() == want.tolist()


@fuzz_settings(300)
@given(ts=st.lists(tensors(), min_size=1, max_size=3))
def test_binary_tensors_round_trip(ts: list[tuple[str, np.ndarray]]) -> None:
    record("codec: binary round trips")
    body, header = binary_request(ts)
    req = parse_infer_request(body, header, max_elements=MAX_ELEMENTS)
    for t, (dt, arr) in zip(req.inputs, ts, strict=True):
        assert t.datatype == dt
        assert_same(t.data, arr)


@fuzz_settings(300)
@given(
    ts=st.lists(tensors(), min_size=1, max_size=2),
    cut=st.integers(0, 10_000),
    extra=st.binary(max_size=16),
    header_delta=st.integers(-8, 8),
)
def test_mangled_binary_requests_are_a_4xx(
    ts: list[tuple[str, np.ndarray]], cut: int, extra: bytes, header_delta: int
) -> None:
    record("codec: mangled binary requests")
    body, header = binary_request(ts)
    mangled = body[: cut % (len(body) + 1)] + extra
    check_parsed(parse(mangled, header + header_delta), None)


@fuzz_settings(300)
@given(ts=st.lists(tensors(), min_size=1, max_size=2))
def test_json_tensors_round_trip(ts: list[tuple[str, np.ndarray]]) -> None:
    record("codec: JSON round trips")
    inputs = []
    for i, (dt, arr) in enumerate(ts):
        if dt == "BYTES" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
            continue  # JSON carries neither raw bytes nor NaN/Inf
        inputs.append(
            {"name": f"in{i}", "datatype": dt, "shape": list(arr.shape), "data": arr.tolist()}
        )
    if not inputs:
        return
    req = parse_infer_request(orjson.dumps({"inputs": inputs}), max_elements=MAX_ELEMENTS)
    wanted = [
        a
        for dt, a in ts
        if not (dt == "BYTES" or (a.dtype.kind == "f" and not np.isfinite(a).all()))
    ]
    for t, arr in zip(req.inputs, wanted, strict=True):
        assert_same(t.data, arr)


@fuzz_settings(200)
@given(words=hnp.arrays(np.uint16, hnp.array_shapes(max_dims=2, max_side=6)))
def test_bf16_widens_exactly(words: np.ndarray) -> None:
    record("codec: BF16 words")
    chunk = words.astype("<u2").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "BF16",
                    "shape": list(words.shape),
                    "parameters": {"binary_data_size": len(chunk)},
                }
            ]
        }
    )
    (t,) = parse_infer_request(header + chunk, len(header), max_elements=MAX_ELEMENTS).inputs
    assert t.data.dtype == np.float32
    assert ((t.data.view(np.uint32) >> 16).astype(np.uint16) == words).all()


@fuzz_settings(300)
@given(chunk=st.binary(max_size=64))
def test_bytes_elements_never_escape_their_chunk(chunk: bytes) -> None:
    record("codec: BYTES element framing")
    try:
        items = deserialize_bytes(memoryview(chunk), "input 'x'")
    except TensorError as exc:
        rejected = str(exc)
        assert rejected.startswith("input 'x': "), rejected  # names the tensor and says why
        return
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    assert serialize_bytes(arr) == chunk  # a chunk that parses is exactly its elements


# -- Content-Encoding ----------------------------------------------------------------------


@fuzz_settings(300)
@given(body=st.binary(max_size=256), enc=st.sampled_from(["gzip", "deflate", "GZIP", "br", "x"]))
def test_arbitrary_compressed_bodies_are_a_4xx(body: bytes, enc: str) -> None:
    record("codec: compressed bodies")
    try:
        out = decompress(body, enc, limit=1024)
    except GatewayError as exc:
        rejected = exc
        assert_clear_rejection(rejected)
        return
    assert len(out) <= 1024


@fuzz_settings(200)
@given(raw=st.binary(max_size=2048), enc=st.sampled_from(["gzip", "deflate"]))
def test_compression_round_trips_within_the_limit(raw: bytes, enc: str) -> None:
    record("codec: compression round trips")
    packed = gzip.compress(raw) if enc == "gzip" else zlib.compress(raw)
    if len(raw) <= 1024:
        assert decompress(packed, enc, limit=1024) == raw
    else:
        with pytest.raises(PayloadTooLarge):
            decompress(packed, enc, limit=1024)


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KB
    with pytest.raises(PayloadTooLarge, match="decompressed body exceeds"):
        decompress(bomb, "gzip", limit=1024 * 1024)


def test_binary_header_length_is_checked_against_the_body() -> None:
    body, header = binary_request([("FP32", np.zeros(4, np.float32))])
    for bad in (-1, len(body) + 1, 2**40):
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
            parse_infer_request(body, bad, max_elements=MAX_ELEMENTS)
