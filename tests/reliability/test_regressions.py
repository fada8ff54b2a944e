"""Regression tests for the bugs the fuzzers found (docs/reliability.md lists them).

Each failed before its fix: a 500, a wrong status, or state left behind by a refused call.
(The config loader's are in test_fuzz_config.py: test_known_bad_files_are_a_config_error.)
"""

from __future__ import annotations

import httpx
import orjson
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest

from fides_core.enclave_errors import InvalidRequest as EnclaveBadRequest
from fides_core.tensors import decode_tensor
from gateway.api.v2.protocol import parse_infer_request
from gateway.errors import BadRequest, PayloadTooLarge
from tests.conftest import ADMIN_KEY, USER_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_unloading_an_unknown_model_leaves_no_trace(client: httpx.AsyncClient) -> None:
    """Was: the name was recorded as 'unloaded', and from then on the model that never existed
    answered 503 'not ready' instead of 404, and showed in the repository index."""
    r = await client.post("/v2/repository/models/nosuch/unload", headers=ADMIN)
    assert r.status_code == 404
    r = await client.get("/v2/models/nosuch")
    assert r.status_code == 404, r.text
    assert "unknown model 'nosuch'" in r.json()["error"]
    index = (await client.get("/v2/repository/index")).json()
    assert "nosuch" not in {row["name"] for row in index}


async def test_loading_an_unknown_model_keeps_the_server_ready(client: httpx.AsyncClient) -> None:
    """Was: 400, and the name joined the models the server waits for, so /v2/health/ready
    stayed 503 (out of rotation) until a restart, for an admin's typo."""
    r = await client.post("/v2/repository/models/typo/load", headers=ADMIN)
    assert r.status_code == 404, r.text
    assert "typo" in r.json()["error"]
    assert (await client.get("/v2/health/ready")).status_code == 200
    index = (await client.get("/v2/repository/index")).json()
    assert "typo" not in {row["name"] for row in index}


async def test_a_model_unloaded_then_reloaded_still_works(client: httpx.AsyncClient) -> None:
    """The fix must not stop the documented unload -> 404-free reload of a real model."""
    assert (
        await client.post("/v2/repository/models/tiny/unload", headers=ADMIN)
    ).status_code == 200
    assert (await client.get("/v2/models/tiny")).status_code == 503  # known, not loaded
    assert (await client.post("/v2/repository/models/tiny/load", headers=ADMIN)).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_an_empty_tensor_with_a_huge_dimension_is_a_413(datatype: str) -> None:
    """Was: numpy's 'array is too big' ValueError, a 500 (shape [0, 2**62] has no elements)."""
    doc = {"inputs": [{"name": "x", "shape": [0, 2**62], "datatype": datatype, "data": []}]}
    with pytest.raises(PayloadTooLarge, match="dimension"):
        parse_infer_request(orjson.dumps(doc), max_elements=1000)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2**62, 0],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    )
    with pytest.raises(PayloadTooLarge, match="dimension"):
        parse_infer_request(header, len(header), max_elements=1000)


@pytest.mark.parametrize("datatype", [["FP32"], {"a": 1}])
def test_a_datatype_that_is_not_a_string_is_a_400(datatype: object) -> None:
    """Was: TypeError (unhashable type) from the datatype lookup, a 500."""
    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": datatype, "data": [1]}]}
    with pytest.raises(BadRequest, match="unknown datatype"):
        parse_infer_request(orjson.dumps(doc), max_elements=1000)


async def test_a_non_ascii_digit_header_length_is_a_400(client: httpx.AsyncClient) -> None:
    """Was: '²'.isdigit() is True but int('²') raises: a 500 (latin-1 headers can carry it)."""
    r = await client.post(
        "/v2/models/tiny/infer",
        content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": b"\xb2"},  # "²" in latin-1
    )
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length" in r.json()["error"]


def test_an_enclave_tensor_with_a_huge_dimension_is_a_bad_request() -> None:
    """Was: ValueError inside the enclave server, answered as code 'internal'."""
    with pytest.raises(EnclaveBadRequest, match="dimension"):
        decode_tensor({"datatype": "FP32", "shape": [2**62, 0], "data": b""})


async def test_a_client_gone_mid_body_is_not_a_server_error(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: starlette's ClientDisconnect escaped the body read (then `read_body`, now the
    body guard in gateway/api/body.py): logged as 'unhandled error' with a traceback and
    counted as a 500 (found by the upstream fault test: the gateway's own upstream client
    hangs up on a slow MLaaS)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v2/models/tiny/infer",
        "raw_path": b"/v2/models/tiny/infer",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-api-key", USER_KEY.encode()), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages = iter(
        [
            {"type": "http.request", "body": b'{"inputs": [', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 499
    assert "unhandled error" not in caplog.text
    metrics = generate_latest(app.state.metrics.registry).decode()
    assert 'status="499"' in metrics
    assert 'status="500"' not in metrics
