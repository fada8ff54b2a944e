"""NVIDIA's gRPC client (tritonclient.grpc) and raw grpc calls against the real gateway process:
health, metadata, inference with raw and typed contents, statistics, model configuration, the
repository extension, and the bad input the issue names (oversized messages, unknown models,
bad keys, a client that cancels mid-call)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import ADMIN_KEY, USER_KEY
from tests.e2e.conftest import ALL_DATATYPES, GatewayProcess, running_gateway
from tests.e2e.test_tritonclient import ROUNDTRIP_VALUES, X
from tests.model_factory import (
    TINY_B,
    TINY_CONFIG,
    TINY_W,
    make_repository,
    tiny_expected,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

USER = {"authorization": f"Bearer {USER_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
SERVICE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def triton(gateway: GatewayProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(url=gateway.grpc_address)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_address) as ch:
        yield ch


def call(channel: grpc.Channel, method: str, request: Any, response_type: Any, **kw: Any) -> Any:
    """A raw unary call with tritonclient's own message classes (another client's copy of the
    protocol, to show the wire matches)."""
    stub = channel.unary_unary(
        SERVICE + method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    return stub(request, timeout=20, **kw)


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_health_and_metadata(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny", headers=USER)
    meta = triton.get_server_metadata(headers=USER, as_json=True)
    assert meta["name"] == "fides-gateway"
    assert "model_repository" in meta["extensions"]
    model = triton.get_model_metadata("tiny", headers=USER, as_json=True)
    assert model["name"] == "tiny"
    assert model["versions"] == ["1", "2"]
    assert model["inputs"][0]["datatype"] == "FP32"
    assert model["inputs"][0]["shape"] == ["-1", "4"]  # int64 in proto3 JSON


def test_infer_raw_matches_the_model(triton: grpcclient.InferenceServerClient) -> None:
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    result = triton.infer("tiny", [inp], model_version="1", headers=USER, request_id="r-7")
    logits, probs = tiny_expected(X)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6)
    response = result.get_response()
    assert response.id == "r-7"
    assert response.model_version == "1"
    # no version: the latest (2, whose weights are doubled)
    latest = triton.infer("tiny", [inp], headers=USER)
    assert latest.get_response().model_version == "2"
    np.testing.assert_allclose(
        latest.as_numpy("logits"), X @ (2 * TINY_W) + TINY_B, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_every_datatype_round_trips_raw(
    triton: grpcclient.InferenceServerClient, datatype: str
) -> None:
    values = ROUNDTRIP_VALUES[datatype]
    inp = grpcclient.InferInput("input", list(values.shape), datatype)
    inp.set_data_from_numpy(values)
    result = triton.infer(f"identity_{datatype.lower()}", [inp], headers=USER)
    out = result.as_numpy("output")
    if datatype == "BYTES":
        assert out.tolist() == values.tolist()
    else:
        assert out.dtype == values.dtype
        np.testing.assert_array_equal(out, values)


TYPED = {  # datatype -> (contents field, values)
    "BOOL": ("bool_contents", [True, False, True]),
    "INT8": ("int_contents", [-128, 0, 127]),
    "INT32": ("int_contents", [-(2**31), 0, 2**31 - 1]),
    "INT64": ("int64_contents", [-(2**63), 0, 2**63 - 1]),
    "UINT16": ("uint_contents", [0, 1, 65535]),
    "UINT64": ("uint64_contents", [0, 1, 2**64 - 1]),
    "FP32": ("fp32_contents", [-1.5, 0.25, 3.0]),
    "FP64": ("fp64_contents", [-1.5, 0.1, 5e-324]),
    "BYTES": ("bytes_contents", [b"hello", b"", "h\u00e9llo".encode()]),
}


def _typed_request(datatype: str, field: str, values: list[Any]) -> Any:
    req = service_pb2.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    tensor = req.inputs.add(name="input", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, field).extend(values)
    return req


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_typed_contents(channel: grpc.Channel, datatype: str) -> None:
    field, values = TYPED[datatype]
    reply = call(
        channel,
        "ModelInfer",
        _typed_request(datatype, field, values),
        service_pb2.ModelInferResponse,
        metadata=tuple(USER.items()),
    )
    # the answer comes back raw, as Triton answers
    assert reply.outputs[0].datatype == datatype
    assert list(reply.outputs[0].shape) == [len(values)]
    assert len(reply.raw_output_contents) == 1


@pytest.mark.parametrize(
    ("datatype", "field", "values", "message"),
    [
        ("INT8", "int_contents", [200, 0, 1], "out of range for INT8"),
        ("INT32", "int_contents", [1, 2], "needs 3"),
        ("FP32", "fp64_contents", [1.0, 2.0, 3.0], "goes in contents.fp32_contents"),
        ("FP16", "fp32_contents", [1.0, 2.0, 3.0], "no typed contents field"),
    ],
)
def test_bad_typed_contents_are_named(
    channel: grpc.Channel, datatype: str, field: str, values: list[Any], message: str
) -> None:
    req = _typed_request(datatype, field, values)
    req.inputs[0].shape[:] = [3]
    with pytest.raises(grpc.RpcError) as info:
        call(channel, "ModelInfer", req, service_pb2.ModelInferResponse, metadata=(*USER.items(),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_refusals(triton: grpcclient.InferenceServerClient, channel: grpc.Channel) -> None:
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    cases = [
        (dict(model_name="nope", inputs=[inp], headers=USER), "NOT_FOUND", "nope"),
        (dict(model_name="tiny", inputs=[inp]), "UNAUTHENTICATED", "missing API key"),
        (
            dict(model_name="tiny", inputs=[inp], headers={"authorization": "Bearer wrong"}),
            "UNAUTHENTICATED",
            "invalid API key",
        ),
    ]
    for kwargs, code, words in cases:
        with pytest.raises(InferenceServerException) as info:
            triton.infer(**kwargs)
        assert code in status_of(info.value), info.value
        assert words in info.value.message()
    # a wrong shape and a raw count that does not match the inputs
    bad = grpcclient.InferInput("input", [2, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 5), np.float32))
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", [bad], headers=USER)
    assert "INVALID_ARGUMENT" in status_of(info.value)
    req = service_pb2.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.extend([X.tobytes(), X.tobytes()])
    with pytest.raises(grpc.RpcError) as raw_info:
        call(channel, "ModelInfer", req, service_pb2.ModelInferResponse, metadata=(*USER.items(),))
    assert "raw_input_contents has 2 entries for 1 inputs" in raw_info.value.details()
    # a user key cannot unload; statistics of an unknown version are NOT_FOUND
    with pytest.raises(InferenceServerException) as info:
        triton.unload_model("tiny", headers=USER)
    assert "PERMISSION_DENIED" in status_of(info.value)
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("tiny", model_version="9", headers=USER)
    assert "NOT_FOUND" in status_of(info.value)
    assert triton.is_model_ready("tiny", headers=USER)  # still serving


def test_what_the_gateway_does_not_implement_is_refused_by_name(
    triton: grpcclient.InferenceServerClient,
) -> None:
    """tritonclient's class_count (the ``classification`` output parameter) is refused, not
    answered with the whole tensor; a version too long to be one is INVALID_ARGUMENT."""
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    top3 = grpcclient.InferRequestedOutput("logits", class_count=3)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", [inp], outputs=[top3], headers=USER)
    assert "INVALID_ARGUMENT" in status_of(info.value)
    assert "output 'logits': parameter(s) ['classification'] not supported" in str(
        info.value.message()
    )
    whole = triton.infer(
        "tiny", [inp], outputs=[grpcclient.InferRequestedOutput("logits")], headers=USER
    )
    assert whole.as_numpy("logits").shape == (len(X), 3)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", [inp], model_version="9" * 5000, headers=USER)
    assert "INVALID_ARGUMENT" in status_of(info.value)
    assert "invalid model version" in str(info.value.message())


def test_undecodable_bytes_and_plain_http_are_refused(
    channel: grpc.Channel, gateway: GatewayProcess
) -> None:
    raw = channel.unary_unary(SERVICE + "ModelInfer")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff", metadata=(*USER.items(),), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest message" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # the key is checked before anything else
        raw(b"\xff\xff\xff", timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # HTTP/1.1 with a JSON body on the gRPC port: the connection is refused, nothing else
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(
            f"http://{gateway.grpc_address}{SERVICE}ModelInfer",
            content=b"{}",
            headers={"content-type": "application/json"},
        )
    live = call(
        channel, "ServerLive", service_pb2.ServerLiveRequest(), service_pb2.ServerLiveResponse
    )
    assert live.live


def test_oversized_message_is_refused(gateway: GatewayProcess, tmp_path: Any) -> None:
    """gRPC's own limit (max_body_bytes; 64 MiB by default) refuses a larger message with
    RESOURCE_EXHAUSTED, and the server keeps serving."""
    big = np.zeros(17 * 1024 * 1024, np.float32)  # 68 MiB
    with grpc.insecure_channel(
        gateway.grpc_address, options=[("grpc.max_send_message_length", -1)]
    ) as ch:
        req = service_pb2.ModelInferRequest(model_name="identity_fp32")
        req.inputs.add(name="input", datatype="FP32", shape=list(big.shape))
        req.raw_input_contents.append(big.tobytes())
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "ModelInfer", req, service_pb2.ModelInferResponse, metadata=(*USER.items(),))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        live = call(
            ch, "ServerLive", service_pb2.ServerLiveRequest(), service_pb2.ServerLiveResponse
        )
        assert live.live


def test_statistics_and_config(triton: grpcclient.InferenceServerClient) -> None:
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    before = triton.get_inference_statistics("tiny", "2", headers=USER, as_json=True)
    for _ in range(3):
        triton.infer("tiny", [inp], headers=USER)
    after = triton.get_inference_statistics("tiny", "2", headers=USER, as_json=True)
    (b,), (a,) = before["model_stats"], after["model_stats"]
    assert a["name"] == "tiny"
    assert a["version"] == "2"
    done = int(a["inference_stats"]["success"]["count"]) - int(
        b["inference_stats"].get("success", {}).get("count", 0)
    )
    assert done == 3
    assert int(a["inference_stats"]["compute_infer"]["ns"]) > 0
    assert a["batch_stats"]
    everything = triton.get_inference_statistics(headers=USER, as_json=True)
    assert {m["name"] for m in everything["model_stats"]} >= {"tiny", "identity_fp32"}

    config = triton.get_model_config("tiny", headers=USER, as_json=True)["config"]
    assert config["name"] == "tiny"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == ["4"]  # the batch dimension is max_batch_size's
    assert config["max_batch_size"] > 0
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_statistics_and_config_agree_with_rest(
    triton: grpcclient.InferenceServerClient, gateway: GatewayProcess
) -> None:
    rest = httpx.get(f"{gateway.base_url}/v2/models/tiny/config", headers=USER).json()
    config = triton.get_model_config("tiny", headers=USER, as_json=True)["config"]
    assert config["name"] == rest["name"]
    assert [i["name"] for i in config["input"]] == [i["name"] for i in rest["input"]]
    assert int(config["max_batch_size"]) == rest["max_batch_size"]


def test_repository_index_load_unload(
    triton: grpcclient.InferenceServerClient, gateway: GatewayProcess
) -> None:
    index = triton.get_model_repository_index(headers=USER, as_json=True)["models"]
    assert {"name": "tiny", "version": "2", "state": "READY"}.items() <= next(
        m for m in index if m["name"] == "tiny" and m.get("version") == "2"
    ).items()
    triton.unload_model("identity_int8", headers=ADMIN)
    assert not triton.is_model_ready("identity_int8", headers=USER)
    ready = triton.get_model_repository_index(headers=USER, as_json=True)["models"]
    assert "identity_int8" in {m["name"] for m in ready}
    triton.load_model("identity_int8", headers=ADMIN)
    assert triton.is_model_ready("identity_int8", headers=USER)
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("identity_int8", headers=ADMIN, config='{"max_batch_size": 1}')
    assert "not supported" in info.value.message()


def test_a_cancelled_call_is_counted_and_leaks_nothing(
    channel: grpc.Channel, gateway: GatewayProcess
) -> None:
    req = service_pb2.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    req.raw_input_contents.append(X.tobytes())
    stub = channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    for _ in range(20):
        future = stub.future(req, metadata=(*USER.items(),))
        future.cancel()
    # the server keeps answering, and nothing is left in flight
    assert stub(req, metadata=(*USER.items(),), timeout=20).outputs
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{gateway.base_url}/metrics").text
        inflight = [
            line
            for line in metrics.splitlines()
            if line.startswith("fides_inference_inflight_requests{") and 'model="tiny"' in line
        ]
        if all(line.endswith(" 0.0") for line in inflight) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(line.endswith(" 0.0") for line in inflight), inflight
    assert 'fides_grpc_requests_total{code="OK",method="ModelInfer"}' in metrics


def _metric(gw: GatewayProcess, prefix: str, having: str = "") -> float:
    """The summed value of every sample whose line starts with ``prefix`` (and holds
    ``having``)."""
    text = httpx.get(f"{gw.base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and having in line
    )


def test_cancel_mid_call_and_sigterm_drain(tmp_path: Path) -> None:
    """Calls wait 1.5 s in the batcher (no dispatch while idle): one cancelled there is counted
    CANCELLED and leaves nothing in flight; on SIGTERM those in flight still get their answer."""
    repo = make_repository(tmp_path / "repo", datatypes=())
    write_config(
        repo / "tiny",
        {
            **TINY_CONFIG,
            "dynamic_batching": {
                "max_queue_delay_microseconds": 1_500_000,
                "preferred_batch_size": [16],
                "dispatch_when_idle": False,
            },
        },
    )
    req = service_pb2.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(X[:1].tobytes())
    with (
        running_gateway(repo, tmp_path / "logs") as gw,
        grpc.insecure_channel(gw.grpc_address) as ch,
    ):
        infer = ch.unary_unary(
            SERVICE + "ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        inflight = 'fides_inference_inflight_requests{model="tiny"}'
        future = infer.future(req, metadata=(*USER.items(),), timeout=20)
        deadline = time.monotonic() + 10
        while _metric(gw, inflight) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(gw, inflight) == 1
        future.cancel()
        while _metric(gw, inflight) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(gw, inflight) == 0
        cancelled = 'fides_grpc_requests_total{code="CANCELLED",method="ModelInfer"}'
        while _metric(gw, cancelled) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(gw, cancelled) == 1
        # the cancelled item leaves the batcher's queue when its batch would have run (within
        # the 1.5 s delay), without being computed
        depth = 'fides_inference_queue_depth{model="tiny"'
        while _metric(gw, depth) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(gw, depth) == 0

        calls = [infer.future(req, metadata=(*USER.items(),), timeout=20) for _ in range(2)]
        # both reached the server (in flight, or answered should a loaded machine have delayed
        # one past the batching window) before the signal: a fixed sleep let a late one be
        # refused
        served = 'fides_inference_requests_total{model="tiny"'
        deadline = time.monotonic() + 30
        while _metric(gw, inflight) + _metric(gw, served, 'outcome="success"') < 2:
            assert time.monotonic() < deadline, "the 2 calls never reached the server"
            time.sleep(0.02)
        os.kill(gw.pid, signal.SIGTERM)
        answers = [c.result(timeout=15) for c in calls]
        assert [len(a.raw_output_contents) for a in answers] == [2, 2]
        gw.process.wait(timeout=15)
