"""A verified model over gRPC: the integrity result travels in the response's parameters with
the types the REST answer has, the evidence checks against the enclave's attestation, and a drill
is flagged and re-classified."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import numpy as np

from fides_core.attestation import check_verification, verify_attestation
from gateway.api.oip_grpc import oip_pb2 as pb
from tests.conftest import USER_KEY
from tests.gateway.integrity.conftest import ADMIN, integrity_gateway
from tests.integrity_factory import Digits


def _grpc_port(client: httpx.AsyncClient) -> int:
    """The port the gateway's gRPC server bound (``grpc_port`` 0: the system's pick)."""
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    return int(cast(Any, transport.app).state.grpc_port)


def _request(x: np.ndarray, rid: str, nonce: bytes | None = None) -> Any:
    req = pb.ModelInferRequest(model_name="digits", id=rid)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    if nonce is not None:
        req.parameters["integrity_nonce"].string_param = base64.b64encode(nonce).decode()
    return req


def _params(reply: Any) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()}


def _top1(reply: Any) -> int:
    (out,) = [i for i, o in enumerate(reply.outputs) if o.name == "probabilities"]
    return int(np.argmax(np.frombuffer(reply.raw_output_contents[out], "<f4")))


async def test_verified_answers_and_a_drill_over_grpc(integrity_repo: Path, digits: Digits) -> None:
    async with integrity_gateway(integrity_repo, grpc_enabled=True, grpc_port=0) as (
        client,
        fakes,
    ):
        port = _grpc_port(client)  # bound by the server: nothing freed and reused
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            key = (("x-api-key", USER_KEY),)
            nonce = b"grpc-client-nonce"
            x = digits.images[0:1]
            reply = await infer(_request(x, "g-0", nonce), metadata=key, timeout=30)
            params = _params(reply)
            assert params["integrity_verdict"] == "verified"
            assert isinstance(params["integrity_score"], float)
            assert params["integrity_score"] <= params["integrity_threshold"]
            assert _top1(reply) == digits.labels[0]
            fake = fakes.by_model["digits"]
            attested = verify_attestation(
                await fake.attest(b"grpc-handshake"),
                root=fake.root_pem,
                policy=fake.policy(),
                nonce=b"grpc-handshake",
            )
            evidence = base64.b64decode(params["integrity_evidence"])
            checked = check_verification(
                evidence, attested=attested, inputs={"input": x}, nonce=nonce, request_id="g-0"
            )
            assert checked is not None

            r = await client.put(
                "/v2/admin/models/digits/drill",
                json={"attack": "switch", "rate": 1.0},
                headers=ADMIN,
            )
            assert r.status_code == 200, r.text
            batch = digits.take(20, seed=3)
            flagged = restored = 0
            for i in range(len(batch)):
                honest = int(
                    digits.labels[
                        np.flatnonzero((digits.images == batch[i]).all(axis=(1, 2, 3)))[0]
                    ]
                )
                reply = await infer(
                    _request(batch[i : i + 1], f"g-{i + 1}"), metadata=key, timeout=30
                )
                params = _params(reply)
                if params["integrity_verdict"] == "attack":
                    flagged += 1
                    assert isinstance(params["integrity_reclassified"], int)
                    restored += params["integrity_reclassified"] == honest
            assert flagged >= 0.9 * len(batch)
            assert restored >= 0.9 * flagged
