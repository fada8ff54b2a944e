"""The gRPC messages against tritonclient's copies (same field numbers, types and shapes, so the
bytes on the wire mean the same), the request translation's refusals, and the server's start-up
(the port it binds, a taken port refused by name)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from gateway.api.oip_grpc import oip_pb2 as pb
from gateway.api.oip_grpc.protocol import (
    encode_infer_response,
    encode_parameters,
    parse_infer_request,
)
from gateway.api.oip_grpc.server import GrpcServer
from gateway.app import create_app
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge
from gateway.settings import Settings
from gateway.types import InferResponse, OutputTensor


def _fields(d: Descriptor) -> dict[str, tuple[int, int, bool, str]]:
    return {
        f.name: (
            f.number,
            f.type,
            f.label == FieldDescriptor.LABEL_REPEATED,
            (f.message_type or f.enum_type).name if (f.message_type or f.enum_type) else "",
        )
        for f in d.fields
    }


def _theirs(name: str) -> Descriptor:
    for module in (service_pb2, model_config_pb2):
        if name in module.DESCRIPTOR.message_types_by_name:
            return module.DESCRIPTOR.message_types_by_name[name]
    raise KeyError(name)


def _compare(ours: Descriptor, theirs: Descriptor) -> None:
    mine, other = _fields(ours), _fields(theirs)
    for name, spec in mine.items():
        assert name in other, f"{ours.full_name}.{name} is not in tritonclient's {theirs.name}"
        assert spec == other[name], f"{ours.full_name}.{name}: {spec} != {other[name]}"
    for nested in ours.nested_types:
        match = {n.name: n for n in theirs.nested_types}
        assert nested.name in match, f"{nested.full_name} has no counterpart"
        _compare(nested, match[nested.name])


@pytest.mark.parametrize("name", sorted(pb.DESCRIPTOR.message_types_by_name))
def test_every_message_matches_tritonclients(name: str) -> None:
    ours = pb.DESCRIPTOR.message_types_by_name[name]
    theirs = _theirs(name)
    _compare(ours, theirs)
    config_subset = {
        "DataType",
        "ModelConfig",
        "ModelDynamicBatching",
        "ModelInput",
        "ModelInstanceGroup",
        "ModelOutput",
        "ModelParameter",
        "ModelVersionPolicy",
    }
    if name not in config_subset:
        # outside the model configuration subset every field of theirs is ours too
        assert set(_fields(theirs)) - set(_fields(ours)) <= {"memory_usage", "response_stats"}


def test_enums_match() -> None:
    ours = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["DataType"].values}
    theirs = {
        v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values
    }
    assert ours == theirs


def _request(**fields: Any) -> Any:
    req = pb.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name="x", datatype=fields.pop("datatype", "FP32"))
    tensor.shape.extend(fields.pop("shape", [2]))
    for key, value in fields.items():
        if key == "raw":
            req.raw_input_contents.extend(value)
        else:
            getattr(tensor.contents, key).extend(value)
    return req


def test_raw_and_typed_decode_to_the_same_tensor() -> None:
    values = np.array([1.5, -2.0], np.float32)
    raw = parse_infer_request(_request(raw=[values.tobytes()]), max_elements=10)
    typed = parse_infer_request(_request(fp32_contents=values.tolist()), max_elements=10)
    np.testing.assert_array_equal(raw.inputs[0].data, values)
    np.testing.assert_array_equal(typed.inputs[0].data, values)
    assert typed.inputs[0].data.dtype == np.float32


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        (dict(shape=[-1]), BadRequest, "negative"),
        (dict(shape=[11], fp32_contents=[0.0] * 11), PayloadTooLarge, "limit is 10"),
        (dict(datatype="FP8"), BadRequest, "unknown datatype"),
        (dict(raw=[b"\0" * 4]), BadRequest, "needs 8"),
        (dict(raw=[b"\0" * 8], fp32_contents=[1.0, 2.0]), BadRequest, "both typed contents"),
        (dict(datatype="UINT8", uint_contents=[1, 256]), BadRequest, "out of range for UINT8"),
        (dict(datatype="BF16", fp32_contents=[1.0, 2.0]), BadRequest, "send it raw"),
    ],
)
def test_refusals_name_the_problem(fields: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        parse_infer_request(_request(**fields), max_elements=10)


def test_counts_past_the_models_are_refused_unread() -> None:
    """The model's counts (``max_inputs`` / ``max_outputs``) refuse a longer list by its
    length, before any of it is read; repeated names are found with a set."""
    req = _request(fp32_contents=[1.0, 2.0])
    for i in range(20_000):
        req.outputs.add(name=f"o{i}")
    with pytest.raises(BadRequest, match="^the request asks for 20000 outputs; the model has 2$"):
        parse_infer_request(req, max_elements=10, max_inputs=1, max_outputs=2)
    assert len(parse_infer_request(req, max_elements=10).outputs or []) == 20_000
    req.outputs.add(name="o19999")
    with pytest.raises(BadRequest, match="output 'o19999' is requested more than once"):
        parse_infer_request(req, max_elements=10)
    req = _request(fp32_contents=[1.0, 2.0])
    req.inputs.add(name="y", datatype="FP32", shape=[0])
    with pytest.raises(BadRequest, match="^the request has 2 inputs; the model takes 1$"):
        parse_infer_request(req, max_elements=10, max_inputs=1)


def test_no_inputs_and_unset_parameters_are_refused() -> None:
    with pytest.raises(BadRequest, match="non-empty"):
        parse_infer_request(pb.ModelInferRequest(model_name="m"), max_elements=10)
    req = _request(fp32_contents=[1.0, 2.0])
    req.parameters["integrity_nonce"].Clear()
    with pytest.raises(BadRequest, match="'integrity_nonce' has no value"):
        parse_infer_request(req, max_elements=10)


def test_parameters_keep_their_types_both_ways() -> None:
    req = _request(fp32_contents=[1.0, 2.0])
    req.parameters["integrity_nonce"].string_param = "abc"
    req.parameters["timeout"].double_param = 1.5
    req.parameters["flag"].bool_param = True
    parsed = parse_infer_request(req, max_elements=10)
    assert parsed.parameters == {"integrity_nonce": "abc", "timeout": 1.5, "flag": True}
    params = {"integrity_verdict": "verified", "integrity_score": 0.25, "integrity_alarm": False}
    params |= {"integrity_reclassified": 3, "nested": {"a": [1, 2]}, "big": 2**64 - 1}
    resp = InferResponse("m", "1", [OutputTensor("y", np.arange(3, dtype=np.int64))], "r", params)
    msg = pb.ModelInferResponse.FromString(encode_infer_response(resp))
    got = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in msg.parameters.items()}
    assert got == {**params, "nested": '{"a":[1,2]}'}
    np.testing.assert_array_equal(np.frombuffer(msg.raw_output_contents[0], "<i8"), [0, 1, 2])
    target = pb.ModelInferResponse().parameters
    encode_parameters({"x": np.float32(0.5)}, target)
    assert target["x"].double_param == 0.5


async def test_server_binds_and_a_taken_port_is_refused_by_name(repo_path: Path) -> None:
    settings = Settings(model_repository=repo_path, dev_mode=True, grpc_enabled=True, grpc_port=0)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        port = app.state.grpc_port
        assert port > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerLive",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ServerLiveResponse.FromString,
            )
            assert (await live(pb.ServerLiveRequest(), timeout=10)).live
        second = GrpcServer(
            app.state.dataplane,
            app.state.keys,
            app.state.metrics,
            settings.model_copy(update={"grpc_port": port}),
        )
        with pytest.raises(RuntimeError, match=f"cannot serve gRPC on 127.0.0.1:{port}"):
            await second.start()


def test_grpc_is_on_by_default_on_8001(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIDES_GRPC_ENABLED", raising=False)
    monkeypatch.delenv("FIDES_GRPC_PORT", raising=False)
    settings = Settings(dev_mode=True)
    assert settings.grpc_enabled
    assert settings.grpc_port == 8001


def test_raw_outputs_of_every_layout_read_back_whole() -> None:
    """The hand-placed raw output fields parse as protobuf's own, for contiguous arrays (taken
    without a copy), transposed ones, FP16, BYTES and a tensor above the 1-byte varint."""
    from fides_core.oip import decode_binary_data

    outputs = {
        "ints": np.arange(6, dtype=np.int64).reshape(2, 3),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "half": np.array([0.5, -2.0], np.float16),
        "words": np.array([b"ab", b"", b"\xff"], dtype=object),
        "big": np.random.default_rng(0).standard_normal(70_000).astype(np.float32),
    }
    resp = InferResponse("m", "1", [OutputTensor(k, v) for k, v in outputs.items()], "r")
    msg = pb.ModelInferResponse.FromString(encode_infer_response(resp))
    assert [o.name for o in msg.outputs] == list(outputs)
    for out, raw in zip(msg.outputs, msg.raw_output_contents, strict=True):
        got = decode_binary_data(memoryview(raw), out.datatype, tuple(out.shape), out.name)
        want = outputs[out.name]
        assert got.shape == want.shape
        assert got.tolist() == want.tolist()


async def test_grpc_health_follows_readiness_and_shutdown(repo_path: Path) -> None:
    """grpc.health.v1 (what Kubernetes' gRPC probes call), without a key: SERVING for the
    server and the inference service while ready; NOT_FOUND for another service; a model that
    fails to load makes it NOT_SERVING, and a Watch stream sees the change; shutting down
    answers NOT_SERVING from the start of the drain."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gateway.api.oip_grpc import server as grpc_server

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    settings = Settings(model_repository=repo_path, dev_mode=True, grpc_enabled=True, grpc_port=0)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            got = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert got.status == serving
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert (await watch.read()).status == serving
        # a model the gateway must serve but cannot load: not ready
        broken = repo_path / "broken"
        (broken / "1").mkdir(parents=True)
        (broken / "config.yaml").write_text("platform: onnx\n", encoding="utf-8")
        with pytest.raises(GatewayError, match="broken"):
            await app.state.dataplane.repository.load("broken")
        assert not app.state.dataplane.ready()[0]
        got = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert got.status == not_serving
        assert (await watch.read()).status == not_serving  # within HEALTH_REFRESH_S
        watch.cancel()

    # a stopping server answers NOT_SERVING before it stops taking calls
    app = create_app(settings)
    (repo_path / "broken" / "config.yaml").unlink()
    async with app.router.lifespan_context(app):
        server = grpc_server.GrpcServer(
            app.state.dataplane, app.state.keys, app.state.metrics, settings
        )
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(request, timeout=10)).status == serving
            watch = health.Watch(request, timeout=30)
            assert (await watch.read()).status == serving
            stopping = asyncio.ensure_future(server.stop(grace_s=2))
            assert (await watch.read()).status == not_serving
            await stopping
