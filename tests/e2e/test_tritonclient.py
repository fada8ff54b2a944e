"""NVIDIA's own client (tritonclient.http) against the real gateway process, plus raw httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import USER_KEY
from tests.e2e.conftest import ALL_DATATYPES, GatewayProcess
from tests.model_factory import TINY_B, TINY_W, tiny_expected

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient's infer() writes into the dict it is given
    (Inference-Header-Content-Length, Content-Encoding), which would leak into later calls."""
    return {"Authorization": f"Bearer {USER_KEY}"}


X = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]], dtype=np.float32)

# Values at the edges of each datatype's range, so that a narrowing or a sign slip shows.
ROUNDTRIP_VALUES: dict[str, np.ndarray] = {
    "BOOL": np.array([True, False, True], dtype=np.bool_),
    "UINT8": np.array([0, 1, 255], dtype=np.uint8),
    "UINT16": np.array([0, 1, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 1, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 1, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 0, 2**15 - 1], dtype=np.int16),
    "INT32": np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([-1.5, 0.0, 65504.0, 0.0999755859375], dtype=np.float16),
    "FP32": np.array([-1.5, 0.1, 3.4028235e38, 1e-38], dtype=np.float32),
    "FP64": np.array([-1.5, 0.1, 1.7976931348623157e308, 5e-324], dtype=np.float64),
    "BYTES": np.array([b"hello", b"", "h\u00e9llo \u2603".encode()], dtype=np.object_),
}
assert set(ROUNDTRIP_VALUES) == set(ALL_DATATYPES)


@pytest.fixture(scope="module")
def triton(gateway: GatewayProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(
        url=gateway.address, connection_timeout=10.0, network_timeout=30.0
    )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, headers=auth(), timeout=10.0) as client:
        yield client


def expected(x: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Reference outputs of tiny_classifier(scale=...): version 1 has 1.0, version 2 2.0."""
    if scale == 1.0:
        return tiny_expected(x)
    logits = x.astype(np.float32) @ (TINY_W * scale) + TINY_B
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, e / e.sum(axis=1, keepdims=True)


def tiny_inputs(x: np.ndarray, binary: bool) -> list[httpclient.InferInput]:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return [inp]


def infer_tiny(
    triton: httpclient.InferenceServerClient,
    binary: bool,
    x: np.ndarray = X,
    **kwargs: Any,
) -> httpclient.InferResult:
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities")
    ]
    return triton.infer("tiny", tiny_inputs(x, binary), outputs=outputs, headers=auth(), **kwargs)


# -- health and metadata ---------------------------------------------------------------------


def test_server_live_and_ready(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live(headers=auth()) is True
    assert triton.is_server_ready(headers=auth()) is True


def test_server_metadata(triton: httpclient.InferenceServerClient) -> None:
    meta = triton.get_server_metadata(headers=auth())
    assert meta["name"] == "fides-gateway"
    assert isinstance(meta["version"], str)
    assert meta["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata(triton: httpclient.InferenceServerClient) -> None:
    meta = triton.get_model_metadata("tiny", headers=auth())
    assert meta["name"] == "tiny"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert meta["parameters"]["max_batch_size"] == 16

    v1 = triton.get_model_metadata("tiny", model_version="1", headers=auth())
    assert v1["inputs"] == meta["inputs"]

    ident = triton.get_model_metadata("identity_int64", headers=auth())
    assert ident["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1]}]
    assert ident["outputs"] == [{"name": "output", "datatype": "INT64", "shape": [-1]}]


def test_model_metadata_unknown_model(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("no_such_model", headers=auth())
    assert info.value.status() == "404"
    assert "no_such_model" in info.value.message()


def test_model_ready(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_model_ready("tiny", headers=auth()) is True
    assert triton.is_model_ready("tiny", model_version="1", headers=auth()) is True
    assert triton.is_model_ready("tiny", model_version="2", headers=auth()) is True
    assert triton.is_model_ready("tiny", model_version="7", headers=auth()) is False
    assert triton.is_model_ready("no_such_model", headers=auth()) is False


def test_repository_index(triton: httpclient.InferenceServerClient) -> None:
    index = triton.get_model_repository_index(headers=auth())
    rows = {(r["name"], r["version"]): r["state"] for r in index}
    assert rows[("tiny", "1")] == "READY"
    assert rows[("tiny", "2")] == "READY"
    for dt in ALL_DATATYPES:
        assert rows[(f"identity_{dt.lower()}", "1")] == "READY"


# -- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_tiny(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    result = infer_tiny(triton, binary)
    logits, probs = expected(X, scale=2.0)  # the default is the latest version
    response = result.get_response()
    assert response["model_name"] == "tiny"
    assert response["model_version"] == "2"
    out_logits = result.as_numpy("logits")
    out_probs = result.as_numpy("probabilities")
    assert out_logits.dtype == np.float32
    assert out_logits.shape == (2, 3)
    assert out_probs.shape == (2, 3)
    np.testing.assert_allclose(out_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_probs, probs, rtol=1e-5, atol=1e-6)
    for name in ("logits", "probabilities"):
        params = result.get_output(name).get("parameters", {})
        assert ("binary_data_size" in params) is binary


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_version_1_matches_reference(
    triton: httpclient.InferenceServerClient, binary: bool
) -> None:
    result = infer_tiny(triton, binary, model_version="1")
    logits, probs = tiny_expected(X)
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-5, atol=1e-6)


def test_versions_give_different_results(triton: httpclient.InferenceServerClient) -> None:
    r1 = infer_tiny(triton, True, model_version="1")
    r2 = infer_tiny(triton, True, model_version="2")
    assert r1.get_response()["model_version"] == "1"
    assert r2.get_response()["model_version"] == "2"
    l1, l2 = r1.as_numpy("logits"), r2.as_numpy("logits")
    assert not np.allclose(l1, l2)
    np.testing.assert_allclose(l1, expected(X, 1.0)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l2, expected(X, 2.0)[0], rtol=1e-5, atol=1e-5)


def test_infer_unknown_version(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer_tiny(triton, False, model_version="9")
    assert info.value.status() == "404"
    assert "version 9" in info.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_outputs_filter(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    result = triton.infer(
        "tiny",
        tiny_inputs(X, binary),
        model_version="1",
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)],
        headers=auth(),
    )
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["probabilities"]
    assert result.as_numpy("logits") is None
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), tiny_expected(X)[1], rtol=1e-5, atol=1e-6
    )


def test_outputs_filter_unknown_output(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(
            "tiny",
            tiny_inputs(X, False),
            outputs=[httpclient.InferRequestedOutput("nope", binary_data=False)],
            headers=auth(),
        )
    assert info.value.status() == "400"
    assert "nope" in info.value.message()


def test_default_outputs_are_binary(triton: httpclient.InferenceServerClient) -> None:
    # With no outputs listed, tritonclient asks for binary_data_output=true.
    result = triton.infer("tiny", tiny_inputs(X, True), model_version="1", headers=auth())
    for name in ("logits", "probabilities"):
        assert "binary_data_size" in result.get_output(name)["parameters"]
    np.testing.assert_allclose(result.as_numpy("logits"), tiny_expected(X)[0], rtol=1e-5)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_request_id_echoed(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    result = infer_tiny(triton, binary, request_id=f"req-42-{binary}")
    assert result.get_response()["id"] == f"req-42-{binary}"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_identity_roundtrip(
    triton: httpclient.InferenceServerClient,
    datatype: str,
    binary: bool,
    request: pytest.FixtureRequest,
) -> None:
    values = ROUNDTRIP_VALUES[datatype]
    inp = httpclient.InferInput("input", list(values.shape), datatype)
    inp.set_data_from_numpy(values, binary_data=binary)
    result = triton.infer(
        f"identity_{datatype.lower()}",
        [inp],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
        headers=auth(),
    )
    out = result.get_output("output")
    assert out["datatype"] == datatype
    assert out["shape"] == list(values.shape)
    assert ("binary_data_size" in out.get("parameters", {})) is binary
    got = result.as_numpy("output")
    assert got.shape == values.shape
    if datatype == "BYTES":
        # JSON carries strings, the binary encoding raw bytes
        want = [v.decode("utf-8") for v in values] if not binary else list(values)
        assert list(got) == want
    else:
        assert got.dtype == values.dtype
        np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_uint64_above_int64_range(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    # all values >= 2**63: numpy keeps uint64, and the JSON answer must not go through floats
    values = np.array([2**63, 2**64 - 1, 2**63 + 1], dtype=np.uint64)
    inp = httpclient.InferInput("input", [3], "UINT64")
    inp.set_data_from_numpy(values, binary_data=binary)
    result = triton.infer(
        "identity_uint64",
        [inp],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
        headers=auth(),
    )
    got = result.as_numpy("output")
    assert got.dtype == np.uint64
    assert got.tolist() == values.tolist()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_identity_empty_tensor(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    values = np.zeros(0, dtype=np.float32)
    inp = httpclient.InferInput("input", [0], "FP32")
    inp.set_data_from_numpy(values, binary_data=binary)
    result = triton.infer(
        "identity_fp32",
        [inp],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
        headers=auth(),
    )
    got = result.as_numpy("output")
    assert got.shape == (0,)
    assert got.dtype == np.float32


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_request_compression(
    triton: httpclient.InferenceServerClient, algorithm: str, binary: bool
) -> None:
    x = np.tile(X, (8, 1))  # a body worth compressing
    result = infer_tiny(
        triton, binary, x=x, model_version="1", request_compression_algorithm=algorithm
    )
    logits, probs = tiny_expected(x)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-5, atol=1e-6)


def test_response_compression_requested(triton: httpclient.InferenceServerClient) -> None:
    # The gateway may or may not compress; either way tritonclient must decode the answer.
    result = infer_tiny(triton, True, model_version="1", response_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("logits"), tiny_expected(X)[0], rtol=1e-5)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_wrong_shape_is_named(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    x = np.ones((2, 5), dtype=np.float32)  # the model wants [-1, 4]
    with pytest.raises(InferenceServerException) as info:
        infer_tiny(triton, binary, x=x)
    assert info.value.status() == "400"
    msg = info.value.message()
    assert "input" in msg
    assert "[2, 5]" in msg
    assert "[-1, 4]" in msg


def test_wrong_datatype_is_named(triton: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("input", [1, 4], "FP64")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float64), binary_data=True)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", [inp], headers=auth())
    assert info.value.status() == "400"
    assert "FP64" in info.value.message()
    assert "FP32" in info.value.message()


def test_missing_key_is_401(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("tiny")
    assert info.value.status() == "401"
    assert "API key" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", tiny_inputs(X, True))
    assert info.value.status() == "401"


def test_wrong_key_is_401(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", tiny_inputs(X, True), headers={"Authorization": "Bearer nope"})
    assert info.value.status() == "401"
    assert "invalid API key" in info.value.message()


def test_user_key_cannot_load(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("tiny", headers=auth())
    assert info.value.status() == "403"


# -- raw HTTP against the same process ------------------------------------------------------------


def test_x_request_id_echoed(http: httpx.Client) -> None:
    r = http.get("/v2/models/tiny", headers={"X-Request-ID": "e2e-rid-123"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "e2e-rid-123"
    # without one, the gateway makes one up
    r = http.get("/v2/health/live")
    assert r.headers.get("x-request-id")
    # errors carry it too
    r = http.post("/v2/models/tiny/infer", content=b"{", headers={"X-Request-ID": "e2e-bad-1"})
    assert r.status_code == 400
    assert r.headers["x-request-id"] == "e2e-bad-1"


def test_bad_json_then_server_still_answers(http: httpx.Client) -> None:
    for body in (b"{not json", b"", b"[1, 2]", b'{"inputs": 5}'):
        r = http.post(
            "/v2/models/tiny/infer", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"].startswith("application/json")
        doc = r.json()
        assert set(doc) == {"error"}
        assert isinstance(doc["error"], str)
        assert doc["error"]
    r = http.post(
        "/v2/models/tiny/versions/1/infer",
        json={
            "inputs": [
                {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}
            ]
        },
    )
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(
        np.array(out["logits"]["data"], dtype=np.float32).reshape(2, 3),
        tiny_expected(X)[0],
        rtol=1e-5,
    )
    assert http.get("/v2/health/ready").status_code == 200


def test_bad_binary_header_length(http: httpx.Client) -> None:
    r = http.post(
        "/v2/models/tiny/infer",
        content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": "999"},
    )
    assert r.status_code == 400
    assert "Inference-Header-Content-Length" in r.json()["error"]


def test_server_log_is_json(gateway: GatewayProcess) -> None:
    records = gateway.log_records()
    assert records, gateway.log()
    assert any(r.get("msg") == "gateway started" for r in records)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


# -- statistics and model configuration extensions (issue 22) ---------------------------------


def tiny_stats(triton: httpclient.InferenceServerClient, version: str = "") -> dict[str, Any]:
    got = triton.get_inference_statistics("tiny", model_version=version, headers=auth())
    (entry,) = got["model_stats"]
    assert isinstance(entry, dict)
    return entry


def test_inference_statistics_count_what_was_served(
    triton: httpclient.InferenceServerClient,
) -> None:
    start = tiny_stats(triton, "2")
    for _ in range(5):
        infer_tiny(triton, binary=True)  # 2 rows each, the latest version (2)
    with pytest.raises(InferenceServerException):
        triton.infer("tiny", tiny_inputs(np.zeros((2, 3), np.float32), True), headers=auth())
    end = tiny_stats(triton, "2")
    assert (end["name"], end["version"]) == ("tiny", "2")

    def delta(*path: str) -> int:
        a: Any = end
        b: Any = start
        for key in path:
            a, b = a[key], b[key]
        return int(a) - int(b)

    s = ("inference_stats",)
    assert delta(*s, "success", "count") == 5
    assert delta(*s, "success", "ns") > 0
    assert delta(*s, "fail", "count") == 1  # the wrong shape, refused by name
    assert delta("inference_count") == 10
    assert 1 <= delta("execution_count") <= 5
    assert delta(*s, "queue", "count") == 5
    assert delta(*s, "compute_infer", "count") == delta("execution_count")
    assert delta(*s, "compute_infer", "ns") > 0
    assert end["last_inference"] >= start["last_inference"]
    assert end["last_inference"] > 1.6e12  # milliseconds since the epoch
    sizes = {b["batch_size"]: b for b in end["batch_stats"]}
    assert 2 in sizes  # a request of 2 rows ran alone at least once
    assert sum(b["compute_infer"]["count"] for b in end["batch_stats"]) == end["execution_count"]


def test_statistics_of_every_model_and_of_unknown_ones(
    triton: httpclient.InferenceServerClient,
) -> None:
    every = triton.get_inference_statistics(headers=auth())["model_stats"]
    assert {("tiny", "1"), ("tiny", "2")} <= {(e["name"], e["version"]) for e in every}
    assert tiny_stats(triton, "1")["version"] == "1"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton.get_inference_statistics("nope", headers=auth())
    with pytest.raises(InferenceServerException, match="no loaded version 9"):
        triton.get_inference_statistics("tiny", model_version="9", headers=auth())


def test_model_config(triton: httpclient.InferenceServerClient) -> None:
    cfg = triton.get_model_config("tiny", headers=auth())
    assert cfg["name"] == "tiny"
    assert cfg["platform"] == "onnx"
    assert cfg["max_batch_size"] == 16
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}]
    assert {o["name"]: o["data_type"] for o in cfg["output"]} == {
        "logits": "TYPE_FP32",
        "probabilities": "TYPE_FP32",
    }
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert triton.get_model_config("tiny", model_version="1", headers=auth())["name"] == "tiny"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton.get_model_config("nope", headers=auth())
    meta = triton.get_server_metadata(headers=auth())
    assert {"statistics", "model_configuration"} <= set(meta["extensions"])


def test_large_answers_are_compressed_when_the_client_accepts_gzip(http: httpx.Client) -> None:
    x = np.arange(4096, dtype=np.float32)  # about 25 KB of JSON back
    body = {"inputs": [{"name": "input", "shape": [4096], "datatype": "FP32", "data": x.tolist()}]}
    url = "/v2/models/identity_fp32/infer"
    for accept, compressed in [
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("*", False),  # any encoding: identity is one
        ("gzip;q=0", False),  # explicitly refused
        ("gzip;q=abc", False),  # a malformed weight: identity is always acceptable
        ("identity", False),
        ("br", False),
    ]:
        got = http.post(url, json=body, headers={"Accept-Encoding": accept})
        assert got.status_code == 200, got.text
        assert (got.headers.get("content-encoding") == "gzip") is compressed, accept
        out = got.json()["outputs"][0]  # httpx decodes gzip itself
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32), x.ravel())
    small = http.post(  # under the 1 KiB threshold: sent as it is
        "/v2/models/tiny/infer",
        json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]},
        headers={"Accept-Encoding": "gzip"},
    )
    assert small.status_code == 200
    assert "content-encoding" not in small.headers
    # binary tensors are sent as they are: float32 shrinks by under 10% for ten times the
    # round trip (fides bench payload)
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [4096],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary = http.post(
        url,
        content=header + raw,
        headers={
            "Accept-Encoding": "gzip",
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert binary.status_code == 200, binary.text
    assert "content-encoding" not in binary.headers
    n = int(binary.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(binary.content[n:], "<f4"), x)
