"""UpstreamRuntime against a real HTTP server: a fake third-party MLaaS on 127.0.0.1.

The fake speaks the Open Inference Protocol REST API and its behaviour is switched per test
(healthy, 500 N times, always 500, slow, 400, invalid JSON, ...). It runs under uvicorn in a
background thread, once per module; every test starts from a reset behaviour.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import gateway.runtimes.upstream as upstream_mod
from gateway.errors import (
    BadRequest,
    CircuitOpen,
    ModelLoadError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.model_config import ModelConfig
from gateway.runtimes.base import TensorSpec
from gateway.runtimes.upstream import UpstreamRuntime
from tests.threaded_server import serve_in_thread

# -- the fake MLaaS ------------------------------------------------------------------------

ECHO_TYPES = ["BOOL", "INT8", "INT32", "INT64", "UINT8", "UINT64", "FP16", "FP32", "FP64"]

MODELS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "classifier": {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [
            {"name": "probs", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    },
    "texts": {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "upper", "datatype": "BYTES", "shape": [-1]},
            {"name": "length", "datatype": "INT32", "shape": [-1]},
        ],
    },
    "echo": {
        "inputs": [{"name": dt, "datatype": dt, "shape": [-1, -1]} for dt in ECHO_TYPES],
        "outputs": [{"name": f"{dt}_out", "datatype": dt, "shape": [-1, -1]} for dt in ECHO_TYPES],
    },
}


@dataclass
class Behaviour:
    """What the fake does next; tests set it, handlers read it."""

    mode: str = "ok"
    failures: int = 0  # for fail_then_ok / rate_limited: how many bad answers first
    delay_s: float = 0.0  # for slow
    retry_after: str = "0"  # for rate_limited
    infer_hits: int = 0
    metadata_hits: int = 0
    paths: list[str] = field(default_factory=list)
    last_body: dict[str, Any] | None = None
    last_headers: dict[str, str] = field(default_factory=dict)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _infer(model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    tensors = {t["name"]: t for t in body["inputs"]}
    if model == "classifier":
        t = tensors["x"]
        x = np.asarray(t["data"], dtype=np.float64).reshape(t["shape"])
        p = _softmax(x)
        outs = [
            {
                "name": "probs",
                "datatype": "FP32",
                "shape": list(p.shape),
                "data": p.ravel().tolist(),
            },
            {
                "name": "label",
                "datatype": "INT64",
                "shape": [p.shape[0]],
                "data": p.argmax(axis=1).tolist(),
            },
        ]
    elif model == "texts":
        t = tensors["text"]
        outs = [
            {
                "name": "upper",
                "datatype": "BYTES",
                "shape": t["shape"],
                "data": [s.upper() for s in t["data"]],
            },
            {
                "name": "length",
                "datatype": "INT32",
                "shape": t["shape"],
                "data": [len(s) for s in t["data"]],
            },
        ]
    else:  # echo
        outs = [{**t, "name": f"{t['name']}_out"} for t in body["inputs"]]
    wanted = [o["name"] for o in body.get("outputs", [])]
    return [o for o in outs if not wanted or o["name"] in wanted]


class FakeMLaaS:
    def __init__(self) -> None:
        self.url = ""
        self.state = Behaviour()
        self.app = self._build()

    def reset(self) -> None:
        self.state = Behaviour()

    def _build(self) -> FastAPI:
        app = FastAPI()

        def metadata(name: str, request: Request) -> Response:
            st = self.state
            st.metadata_hits += 1
            st.paths.append(request.url.path)
            if st.mode == "metadata_down":
                return JSONResponse({"error": "maintenance"}, status_code=503)
            if st.mode == "metadata_invalid":
                return JSONResponse({"name": name, "inputs": "nope"})
            if name not in MODELS:
                return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)
            return JSONResponse(
                {"name": name, "versions": ["1", "3"], "platform": "fake", **MODELS[name]}
            )

        async def infer(name: str, request: Request, version: str = "1") -> Response:
            st = self.state
            st.infer_hits += 1
            st.paths.append(request.url.path)
            st.last_headers = dict(request.headers)
            body = await request.json()
            st.last_body = body
            mode = st.mode
            if mode == "fail_then_ok" and st.infer_hits <= st.failures:
                return JSONResponse({"error": "transient failure"}, status_code=500)
            if mode == "always_500":
                return JSONResponse({"error": "model crashed"}, status_code=500)
            if mode == "rate_limited" and st.infer_hits <= st.failures:
                return JSONResponse(
                    {"error": "slow down"}, status_code=429, headers={"Retry-After": st.retry_after}
                )
            if mode == "slow":
                await asyncio.sleep(st.delay_s)
            if mode == "bad_request":
                return JSONResponse({"error": "input 'x': expected 3 columns"}, status_code=400)
            if mode == "invalid_json":
                return Response("<html>gateway error</html>", media_type="text/html")
            if name not in MODELS:
                return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)
            outputs = _infer(name, body)
            if mode == "missing_output":
                outputs = outputs[:1]
            if mode == "bad_shape":
                outputs[0]["shape"] = [outputs[0]["shape"][0] + 1, *outputs[0]["shape"][1:]]
            if mode == "wrong_rows":
                for o in outputs:
                    rows = o["shape"][0]
                    o["shape"][0] = 1
                    o["data"] = o["data"][: len(o["data"]) // rows]
            return JSONResponse({"model_name": name, "model_version": version, "outputs": outputs})

        async def ready(name: str) -> Response:
            code = 200 if name in MODELS and self.state.mode != "metadata_down" else 503
            return Response(status_code=code)

        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.add_api_route(prefix, metadata, methods=["GET"])
            app.add_api_route(prefix + "/ready", ready, methods=["GET"])
            app.add_api_route(prefix + "/infer", infer, methods=["POST"])
        return app


@pytest.fixture(scope="module")
def mlaas_server() -> Iterator[FakeMLaaS]:
    fake = FakeMLaaS()
    with serve_in_thread(fake.app, "fake-mlaas", access_log=False, lifespan="off") as (url, _):
        fake.url = url
        yield fake


@pytest.fixture
def mlaas(mlaas_server: FakeMLaaS) -> FakeMLaaS:
    mlaas_server.reset()
    return mlaas_server


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port with nothing listening: connections are refused. The socket stays
    bound (not listening) for the test, so no other process can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        yield f"http://127.0.0.1:{port}"


MakeRuntime = Callable[..., UpstreamRuntime]


@pytest.fixture
def make_runtime(mlaas: FakeMLaaS, tmp_path: Path) -> Iterator[MakeRuntime]:
    """Build (and by default load) an UpstreamRuntime; unloaded at teardown."""
    made: list[UpstreamRuntime] = []

    def make(
        name: str = "classifier",
        *,
        load: bool = True,
        url: str | None = None,
        max_batch_size: int = 8,
        inputs: list[dict[str, Any]] | None = None,
        outputs: list[dict[str, Any]] | None = None,
        threshold: int = 5,
        reset_timeout_s: float = 10.0,
        **upstream: Any,
    ) -> UpstreamRuntime:
        options: dict[str, Any] = {
            "url": url or mlaas.url,
            # generous: one stall of the in-process fake on a loaded machine must not turn
            # into a retry (the tests count the calls); the timeout tests set their own
            "timeout_s": 5.0,
            "retries": 2,
            "backoff_s": 0.01,
            "circuit_breaker": {"failure_threshold": threshold, "reset_timeout_s": reset_timeout_s},
            **upstream,
        }
        raw: dict[str, Any] = {
            "platform": "upstream",
            "max_batch_size": max_batch_size,
            "upstream": options,
        }
        if inputs is not None:
            raw["inputs"] = inputs
        if outputs is not None:
            raw["outputs"] = outputs
        runtime = UpstreamRuntime(name, 1, tmp_path, ModelConfig.model_validate(raw))
        made.append(runtime)
        if load:
            runtime.load()
        return runtime

    yield make
    for runtime in made:
        runtime.unload()


def x_batch(rows: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(rows, 3)).astype(np.float32)}


CLASSIFIER_SPECS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
    "outputs": [
        {"name": "probs", "datatype": "FP32", "shape": [3]},
        {"name": "label", "datatype": "INT64", "shape": []},
    ],
}


# -- load ----------------------------------------------------------------------------------


def test_load_reads_remote_metadata(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime()
    assert rt.platform == "upstream"
    assert rt.inputs == [TensorSpec("x", "FP32", (-1, 3))]
    assert rt.outputs == [
        TensorSpec("probs", "FP32", (-1, 3)),
        TensorSpec("label", "INT64", (-1,)),
    ]
    assert mlaas.state.paths == ["/v2/models/classifier"]


def test_remote_name_and_version_are_used(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime("my-clf", model_name="classifier", model_version="3")
    rt.predict(x_batch(2))
    assert mlaas.state.paths == [
        "/v2/models/classifier/versions/3",
        "/v2/models/classifier/versions/3/infer",
    ]


def test_config_specs_override_remote_metadata(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(outputs=[{"name": "label", "datatype": "INT64", "shape": []}])
    assert rt.inputs == [TensorSpec("x", "FP32", (-1, 3))]  # from the upstream
    assert rt.outputs == [TensorSpec("label", "INT64", (-1,))]  # from config.yaml
    assert set(rt.predict(x_batch(2))) == {"label"}
    assert mlaas.state.last_body is not None
    assert mlaas.state.last_body["outputs"] == [{"name": "label"}]  # only those are asked for


def test_load_fails_clearly_when_unreachable(make_runtime: MakeRuntime, dead_url: str) -> None:
    rt = make_runtime(url=dead_url, load=False, retries=0)
    with pytest.raises(ModelLoadError) as info:
        rt.load()
    msg = info.value.message
    assert dead_url in msg
    assert "classifier" in msg
    assert "'inputs' and 'outputs'" in msg


def test_load_succeeds_with_config_specs_when_unreachable(
    make_runtime: MakeRuntime, dead_url: str
) -> None:
    rt = make_runtime(url=dead_url, retries=0, **CLASSIFIER_SPECS)
    assert rt.inputs == [TensorSpec("x", "FP32", (-1, 3))]
    assert rt.outputs == [TensorSpec("probs", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1,))]
    with pytest.raises(UpstreamError) as info:  # the MLaaS is still down at predict time
        rt.predict(x_batch())
    assert info.value.status == 502
    assert dead_url in info.value.message


def test_load_falls_back_to_config_specs_on_5xx(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS
) -> None:
    mlaas.state.mode = "metadata_down"
    rt = make_runtime(**CLASSIFIER_SPECS)
    assert mlaas.state.metadata_hits == 3  # retried like any call
    assert [s.name for s in rt.outputs] == ["probs", "label"]


def test_load_unknown_remote_model_fails_even_with_specs(make_runtime: MakeRuntime) -> None:
    rt = make_runtime("nope", load=False, **CLASSIFIER_SPECS)
    with pytest.raises(ModelLoadError, match=r"HTTP 404.*model 'nope' not found"):
        rt.load()


def test_load_rejects_invalid_metadata(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    mlaas.state.mode = "metadata_invalid"
    rt = make_runtime(load=False)
    with pytest.raises(ModelLoadError, match="invalid model metadata"):
        rt.load()


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_values(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime()
    inputs = x_batch(4)
    out = rt.predict(inputs)
    assert set(out) == {"probs", "label"}
    expected = _softmax(inputs["x"].astype(np.float64))
    assert out["probs"].dtype == np.float32
    assert out["probs"].shape == (4, 3)
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-6)
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], expected.argmax(axis=1))
    # what went over the wire: flat row-major data
    body = mlaas.state.last_body
    assert body is not None
    (sent,) = body["inputs"]
    assert sent["name"] == "x"
    assert sent["datatype"] == "FP32"
    assert sent["shape"] == [4, 3]
    np.testing.assert_array_equal(np.asarray(sent["data"], np.float32), inputs["x"].ravel())
    assert "outputs" not in body
    assert mlaas.state.last_headers["content-type"] == "application/json"


def test_requested_outputs_only(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime()
    out = rt.predict(x_batch(2), ["label"])
    assert list(out) == ["label"]
    assert mlaas.state.last_body is not None
    assert mlaas.state.last_body["outputs"] == [{"name": "label"}]


def test_non_contiguous_input_is_sent_row_major(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    x = np.arange(12, dtype=np.float32).reshape(3, 4).T[:, :3]  # (4, 3), not C-contiguous
    out = rt.predict({"x": x})
    np.testing.assert_allclose(out["probs"], _softmax(x.astype(np.float64)), rtol=1e-6)


def test_bytes_round_trip(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime("texts")
    text = np.array([b"hello", "w\u00f6rld".encode(), b""], dtype=np.object_)
    out = rt.predict({"text": text})
    assert out["upper"].dtype == np.object_
    assert out["upper"].tolist() == [b"HELLO", "W\u00d6RLD".encode(), b""]
    assert out["length"].dtype == np.int32
    assert out["length"].tolist() == [5, 5, 0]
    assert mlaas.state.last_body is not None
    assert mlaas.state.last_body["inputs"][0]["data"] == ["hello", "w\u00f6rld", ""]
    assert mlaas.state.last_body["inputs"][0]["datatype"] == "BYTES"


def test_bytes_that_are_not_utf8_are_a_bad_request(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS
) -> None:
    rt = make_runtime("texts")
    with pytest.raises(BadRequest, match="UTF-8"):
        rt.predict({"text": np.array([b"\xff\xfe"], dtype=np.object_)})
    assert mlaas.state.infer_hits == 0
    assert rt.breaker.consecutive_failures == 0


@pytest.mark.parametrize("datatype", ECHO_TYPES)
def test_datatypes_round_trip(make_runtime: MakeRuntime, datatype: str) -> None:
    rt = make_runtime("echo", max_batch_size=0)
    dtype = {
        "BOOL": np.bool_,
        "INT8": np.int8,
        "INT32": np.int32,
        "INT64": np.int64,
        "UINT8": np.uint8,
        "UINT64": np.uint64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }[datatype]
    values = {
        "BOOL": [[True, False, True], [False, False, True]],
        "INT8": [[-128, 0, 127], [1, 2, 3]],
        "INT32": [[-(2**31), 0, 2**31 - 1], [4, 5, 6]],
        "INT64": [[-(2**63), 0, 2**63 - 1], [7, 8, 9]],
        "UINT8": [[0, 1, 255], [2, 3, 4]],
        "UINT64": [[0, 1, 2**64 - 1], [2, 3, 4]],
        "FP16": [[0.5, -1.25, 65504.0], [1e-3, 2.0, 3.0]],
        "FP32": [[0.1, -1.5, 3.4e38], [1e-30, 2.0, 3.0]],
        "FP64": [[0.1, -1.5, 1.7e308], [5e-324, 2.0, 3.0]],
    }[datatype]
    array: np.ndarray = np.array(values, dtype=dtype)
    out = rt.predict({datatype: array}, [f"{datatype}_out"])
    result = out[f"{datatype}_out"]
    assert result.dtype == array.dtype
    assert result.shape == (2, 3)
    np.testing.assert_array_equal(result, array)


def test_configured_headers_are_sent(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(headers={"Authorization": "Bearer s3cret", "X-Tenant": "fides"})
    rt.predict(x_batch(1))
    assert mlaas.state.last_headers["authorization"] == "Bearer s3cret"
    assert mlaas.state.last_headers["x-tenant"] == "fides"


def test_ready(make_runtime: MakeRuntime, mlaas: FakeMLaaS, dead_url: str) -> None:
    rt = make_runtime()
    assert rt.ready() is True
    mlaas.state.mode = "metadata_down"
    assert rt.ready() is False
    down = make_runtime(url=dead_url, retries=0, **CLASSIFIER_SPECS)
    assert down.ready() is False


def test_unload_closes_the_client(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    client = rt.client
    rt.unload()
    assert client.is_closed
    rt.unload()  # idempotent


# -- invalid responses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "detail"),
    [
        ("invalid_json", "not JSON"),
        ("missing_output", "missing output(s) ['label']"),
        ("bad_shape", "data has 12 elements but shape [5, 3] needs 15"),
        ("wrong_rows", "but the batch has 4 row(s)"),
    ],
)
def test_invalid_responses_are_upstream_errors(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS, mode: str, detail: str
) -> None:
    rt = make_runtime()
    mlaas.state.mode = mode
    with pytest.raises(UpstreamError) as info:
        rt.predict(x_batch(4))
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert info.value.message.startswith("upstream returned an invalid response: ")
    assert detail in info.value.message
    assert mlaas.state.infer_hits == 1  # not retried
    assert rt.breaker.consecutive_failures == 1  # but a breaker failure


# -- retries -------------------------------------------------------------------------------


def test_5xx_is_retried_then_succeeds(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(retries=2)
    mlaas.state.mode, mlaas.state.failures = "fail_then_ok", 2
    out = rt.predict(x_batch(2))
    assert out["probs"].shape == (2, 3)
    assert mlaas.state.infer_hits == 3
    assert rt.breaker.state == "closed"
    assert rt.breaker.consecutive_failures == 0


def test_exhausted_retries_are_a_502_naming_the_url(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS
) -> None:
    rt = make_runtime(retries=2)
    mlaas.state.mode = "always_500"
    with pytest.raises(UpstreamError) as info:
        rt.predict(x_batch(2))
    exc = info.value
    assert type(exc) is UpstreamError
    assert exc.status == 502
    assert mlaas.url in exc.message
    assert "after 3 attempts" in exc.message
    assert "HTTP 500: model crashed" in exc.message
    assert mlaas.state.infer_hits == 3


def test_backoff_doubles_with_small_jitter(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(upstream_mod, "time", SimpleNamespace(sleep=delays.append))
    rt = make_runtime(retries=3, backoff_s=0.1)
    mlaas.state.mode = "always_500"
    with pytest.raises(UpstreamError):
        rt.predict(x_batch(1))
    assert len(delays) == 3
    for delay, base in zip(delays, [0.1, 0.2, 0.4], strict=True):
        assert base <= delay <= base * (1 + upstream_mod.JITTER)


def test_429_honours_retry_after_up_to_a_cap(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(upstream_mod, "time", SimpleNamespace(sleep=delays.append))
    rt = make_runtime(retries=2)
    mlaas.state.mode, mlaas.state.failures = "rate_limited", 2
    mlaas.state.retry_after = "3600"
    out = rt.predict(x_batch(1))
    assert "label" in out
    assert mlaas.state.infer_hits == 3
    assert delays == [5.0] * 2  # upstream.max_retry_after_s's default
    delays.clear()
    rt = make_runtime(retries=1, max_retry_after_s=60.0)  # a batch client waits longer
    mlaas.state.mode, mlaas.state.failures = "rate_limited", 4  # hits 1-4 refused: one more
    mlaas.state.retry_after = "30"
    assert "label" in rt.predict(x_batch(1))
    assert delays == [30.0]


def test_429_exhausted_passes_retry_after_on(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(retries=1)
    mlaas.state.mode, mlaas.state.failures = "rate_limited", 99
    mlaas.state.retry_after = "0.01"
    with pytest.raises(UpstreamError, match="HTTP 429: slow down") as info:
        rt.predict(x_batch(1))
    assert info.value.headers == {"Retry-After": "1"}
    assert mlaas.state.infer_hits == 2


def test_slow_upstream_is_a_504(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(timeout_s=0.2, retries=1)
    mlaas.state.mode, mlaas.state.delay_s = "slow", 0.6
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        rt.predict(x_batch(1))
    elapsed = time.monotonic() - started
    assert info.value.status == 504
    assert f"upstream {mlaas.url}" in info.value.message
    assert "timed out after 0.2s" in info.value.message
    assert mlaas.state.infer_hits == 2
    assert elapsed < 0.6 * 2


def test_connection_refused_is_retried_then_a_502(make_runtime: MakeRuntime, dead_url: str) -> None:
    rt = make_runtime(url=dead_url, retries=1, **CLASSIFIER_SPECS)
    with pytest.raises(UpstreamError) as info:
        rt.predict(x_batch(1))
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert dead_url in info.value.message
    assert "ConnectError" in info.value.message


def test_4xx_is_not_retried(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(retries=3)
    mlaas.state.mode = "bad_request"
    with pytest.raises(UpstreamError) as info:
        rt.predict(x_batch(1))
    assert info.value.status == 502
    assert "HTTP 400" in info.value.message
    assert "input 'x': expected 3 columns" in info.value.message
    assert mlaas.url in info.value.message
    assert mlaas.state.infer_hits == 1


# -- circuit breaker -----------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_rejects_fast(
    make_runtime: MakeRuntime, mlaas: FakeMLaaS
) -> None:
    rt = make_runtime(retries=1, threshold=3)
    mlaas.state.mode = "always_500"
    for _ in range(3):
        with pytest.raises(UpstreamError) as info:
            rt.predict(x_batch(1))
        assert type(info.value) is UpstreamError
    assert rt.breaker.state == "open"
    assert mlaas.state.infer_hits == 6  # one logical call = one breaker failure
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as refused:
        rt.predict(x_batch(1))
    assert time.monotonic() - started < 0.2
    assert refused.value.status == 503
    assert mlaas.url in refused.value.message
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert mlaas.state.infer_hits == 6  # the upstream was not called


def test_breaker_half_open_trial_then_closes(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    # a reset of 1 s: the refusals below must come before it ends, on a loaded machine too
    rt = make_runtime(retries=0, threshold=2, reset_timeout_s=1.0)
    mlaas.state.mode = "always_500"
    for _ in range(2):
        with pytest.raises(UpstreamError):
            rt.predict(x_batch(1))
    with pytest.raises(CircuitOpen):
        rt.predict(x_batch(1))

    # a failed trial re-opens at once
    time.sleep(1.05)
    assert rt.breaker.state == "half_open"
    with pytest.raises(UpstreamError) as info:
        rt.predict(x_batch(1))
    assert type(info.value) is UpstreamError
    assert rt.breaker.state == "open"
    with pytest.raises(CircuitOpen):
        rt.predict(x_batch(1))
    assert mlaas.state.infer_hits == 3

    # a slow successful trial: concurrent callers are refused meanwhile, then it closes (the
    # trial is held 1 s, time enough for the refusal below on a loaded machine)
    time.sleep(1.05)
    mlaas.state.mode, mlaas.state.delay_s = "slow", 1.0
    results: dict[str, Any] = {}
    trial = threading.Thread(target=lambda: results.update(rt.predict(x_batch(2))))
    trial.start()
    deadline = time.monotonic() + 2
    while mlaas.state.infer_hits < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(CircuitOpen):
        rt.predict(x_batch(1))
    trial.join(5)
    assert results["probs"].shape == (2, 3)
    assert rt.breaker.state == "closed"
    assert rt.predict(x_batch(1))["label"].shape == (1,)
    assert mlaas.state.infer_hits == 5


def test_4xx_does_not_trip_the_breaker(make_runtime: MakeRuntime, mlaas: FakeMLaaS) -> None:
    rt = make_runtime(threshold=2)
    mlaas.state.mode = "bad_request"
    for _ in range(4):
        with pytest.raises(UpstreamError) as info:
            rt.predict(x_batch(1))
        assert not isinstance(info.value, CircuitOpen)
    assert rt.breaker.state == "closed"
    assert rt.breaker.consecutive_failures == 0


def test_concurrent_predicts_share_one_client(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    errors: list[BaseException] = []

    def worker(rows: int) -> None:
        try:
            for _ in range(5):
                out = rt.predict(x_batch(rows))
                assert out["probs"].shape == (rows, 3)
                assert math.isclose(float(out["probs"].sum()), rows, rel_tol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
