"""In-process tests of every endpoint and every bad input, through the ASGI app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY, serving
from tests.model_factory import TINY_CONFIG, tiny_classifier, tiny_expected, write_config

X = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]]


def _infer_body(data: Any = X, **extra: Any) -> dict[str, Any]:
    shape = list(np.asarray(data).shape)
    return {
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
        **extra,
    }


async def _assert_still_serving(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/models/tiny/infer", json=_infer_body())
    assert r.status_code == 200


# -- health and metadata ----------------------------------------------------------------------


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).status_code == 200
    r = await client.get("/v2/health/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True}


async def test_health_needs_no_key(app: FastAPI) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as anon:
        assert (await anon.get("/v2/health/live")).status_code == 200
        assert (await anon.get("/v2/health/ready")).status_code == 200
        assert (await anon.get("/v2")).status_code == 401


async def test_server_metadata(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/v2")).json()
    assert doc["name"] == "fides-gateway"
    assert "binary_tensor_data" in doc["extensions"]


async def test_model_metadata(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/v2/models/tiny")).json()
    assert doc["name"] == "tiny"
    assert doc["versions"] == ["1", "2"]
    assert doc["platform"] == "onnx"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in doc["outputs"]} == {"logits", "probabilities"}
    v1 = (await client.get("/v2/models/tiny/versions/1")).json()
    assert v1["inputs"] == doc["inputs"]


async def test_model_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/models/tiny/ready")).json()["ready"] is True
    assert (await client.get("/v2/models/tiny/versions/1/ready")).status_code == 200
    assert (await client.get("/v2/models/tiny/versions/9/ready")).status_code == 404
    assert (await client.get("/v2/models/nope/ready")).status_code == 404


# -- inference --------------------------------------------------------------------------------


async def test_infer_latest_and_specific_versions(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/models/tiny/versions/1/infer", json=_infer_body(id="req-1"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "tiny"
    assert doc["model_version"] == "1"
    assert doc["id"] == "req-1"
    out = {o["name"]: o for o in doc["outputs"]}
    logits, probs = tiny_expected(np.asarray(X, dtype=np.float32))
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (2, 3)), probs, rtol=1e-5)
    np.testing.assert_allclose(np.reshape(out["logits"]["data"], (2, 3)), logits, rtol=1e-5)
    latest = (await client.post("/v2/models/tiny/infer", json=_infer_body())).json()
    assert latest["model_version"] == "2"
    assert "id" not in latest


async def test_outputs_filter(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v2/models/tiny/infer", json=_infer_body(outputs=[{"name": "probabilities"}])
    )
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]


async def test_binary_request_and_response(client: httpx.AsyncClient) -> None:
    x = np.asarray(X, dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    )
    r = await client.post(
        "/v2/models/tiny/versions/1/infer",
        content=header + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    doc = orjson.loads(r.content[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 24
    probs = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(probs, tiny_expected(x)[1], rtol=1e-5)


async def test_bytes_model(client: httpx.AsyncClient) -> None:
    body = {
        "inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": ["héllo", "wörld"]}]
    }
    r = await client.post("/v2/models/identity_bytes/infer", json=body)
    assert r.json()["outputs"][0]["data"] == ["héllo", "wörld"]


async def test_request_id_header(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = {(await client.get("/v2")).headers["x-request-id"] for _ in range(5)}
    assert len(generated) == 5  # unique
    assert all(len(g) == 24 for g in generated)
    r = await client.get("/v2", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"


# -- bad input: each a clear 4xx with {"error": ...}, and the server keeps serving -----------


BAD_BODIES: list[tuple[str, bytes | dict[str, Any], int, str]] = [
    ("non-json", b"{not json", 400, "not valid JSON"),
    ("missing inputs", {"id": "x"}, 400, "'inputs'"),
    (
        "missing data",
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]},
        400,
        "missing 'data'",
    ),
    (
        "wrong datatype",
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]},
        400,
        "does not match the model's FP32",
    ),
    (
        "length vs shape",
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
        400,
        "needs 4",
    ),
    (
        "shape vs model",
        {
            "inputs": [
                {"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}
            ]
        },
        400,
        "does not match the model's",
    ),
    (
        "rank vs model",
        {"inputs": [{"name": "input", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        400,
        "does not match the model's",
    ),
    (
        "batch too big",
        {"inputs": [{"name": "input", "shape": [17, 4], "datatype": "FP32", "data": [0.0] * 68}]},
        400,
        "exceeds max_batch_size 16",
    ),
    (
        "unknown input",
        {"inputs": [{"name": "inp", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        400,
        "has no input",
    ),
    ("unknown output", _infer_body(outputs=[{"name": "nope"}]), 400, "has no output"),
    ("bad timeout", _infer_body(parameters={"timeout": -1}), 400, "timeout"),
    (
        "infinite timeout",  # orjson refuses 1e999 (NaN and inf reach the data plane over gRPC)
        orjson.dumps(_infer_body(parameters={"timeout": 1})).replace(b":1}", b":1e999}"),
        400,
        "number is infinity",
    ),
    (
        "20,000 unknown outputs",  # refused by count before they are read
        _infer_body(outputs=[{"name": f"o{i}"} for i in range(20_000)]),
        400,
        "the request asks for 20000 outputs; the model has 2",
    ),
    (
        "classification",  # tritonclient's InferRequestedOutput(class_count=3)
        _infer_body(outputs=[{"name": "logits", "parameters": {"classification": 3}}]),
        400,
        "output 'logits': parameter(s) ['classification'] not supported",
    ),
    (
        "shared memory",
        _infer_body(
            outputs=[{"name": "logits", "parameters": {"shared_memory_region": "r"}}],
        ),
        400,
        "['shared_memory_region'] not supported",
    ),
    (
        "too many elements",
        {"inputs": [{"name": "input", "shape": [100000, 4], "datatype": "FP32", "data": [0]}]},
        413,
        "elements",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_input(
    client: httpx.AsyncClient, case: str, body: bytes | dict[str, Any], status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = await client.post(
        "/v2/models/tiny/infer", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    await _assert_still_serving(client)


async def test_nan_rejected_unless_allowed(client: httpx.AsyncClient, repo_path: Path) -> None:
    x = np.array([[np.nan, 1, 2, 3]], dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 16},
                }
            ]
        }
    )
    headers = {"Inference-Header-Content-Length": str(len(header))}
    r = await client.post("/v2/models/tiny/infer", content=header + x.tobytes(), headers=headers)
    assert r.status_code == 400
    assert "NaN or Inf" in r.json()["error"]
    # JSON overflow to infinity is caught the same way
    r = await client.post(
        "/v2/models/tiny/infer",
        content=orjson.dumps(_infer_body()).replace(b"4.0", b"1e999"),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    # a model may allow them
    cfg = {**TINY_CONFIG, "allow_non_finite": True}
    write_config(repo_path / "tiny_nan", cfg)
    tiny_classifier(repo_path / "tiny_nan" / "1" / "model.onnx")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (
        await client.post("/v2/repository/models/tiny_nan/load", headers=admin)
    ).status_code == 200
    r = await client.post(
        "/v2/models/tiny_nan/infer", content=header + x.tobytes(), headers=headers
    )
    # its NaN outputs travel as binary only (JSON would turn them into null)
    assert r.status_code == 500
    assert "output 'logits' holds NaN or Inf" in r.json()["error"]
    binary = orjson.dumps({**orjson.loads(header), "parameters": {"binary_data_output": True}})
    r = await client.post(
        "/v2/models/tiny_nan/infer",
        content=binary + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(binary))},
    )
    assert r.status_code == 200
    start = int(r.headers["Inference-Header-Content-Length"])
    assert np.isnan(np.frombuffer(r.content[start:], dtype="<f4")).all()


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v2/models/unknown/infer", 404, "unknown model 'unknown'"),
        ("/v2/models/tiny/versions/7/infer", 404, "no loaded version 7"),
        ("/v2/models/tiny/versions/abc/infer", 400, "invalid model version"),
        # past int()'s 4,300 digits (a 500 once), and past the 18 a version may have
        ("/v2/models/tiny/versions/" + "9" * 5000 + "/infer", 400, "(5000 chars)"),
        ("/v2/models/tiny/versions/" + "1" * 19 + "/infer", 400, "at most 18 digits"),
        ("/v2/models/..%2f..%2fetc/infer", 404, ""),
        ("/v2/models/..secret/infer", 400, "invalid model name"),
        ("/v2/models/%E2%80%AEevil/infer", 400, "invalid model name"),
        ("/v2/models/a%00b/infer", 400, "invalid model name"),
    ],
)
async def test_unknown_and_pathlike_models(
    client: httpx.AsyncClient, path: str, status: int, message: str
) -> None:
    r = await client.post(path, json=_infer_body())
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    await _assert_still_serving(client)


async def test_oversized_body(settings: Settings) -> None:
    small = settings.model_copy(update={"max_body_bytes": 300})
    async with serving(small) as c:
        r = await c.post("/v2/models/tiny/infer", json=_infer_body([[0.0] * 4] * 16))
        assert r.status_code == 413
        assert "exceeds the limit of 300" in r.json()["error"]

        async def chunks() -> Any:  # no Content-Length: counted while streaming
            for _ in range(20):
                yield b" " * 100

        r = await c.post("/v2/models/tiny/infer", content=chunks())
        assert r.status_code == 413
        await _assert_still_serving(c)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Basic " + USER_KEY}, 401),
        ({"X-API-Key": "wrong"}, 401),
        ({"X-API-Key": USER_KEY}, 200),
        ({"Authorization": f"Bearer {USER_KEY}"}, 200),
        ({"Authorization": f"bearer {ADMIN_KEY}"}, 200),  # admin keys are user keys too
    ],
)
async def test_auth(app: FastAPI, headers: dict[str, str], status: int) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers
    ) as c:
        r = await c.post("/v2/models/tiny/infer", json=_infer_body())
        assert r.status_code == status
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]


# -- repository extension ---------------------------------------------------------------------


async def test_repository_index(client: httpx.AsyncClient) -> None:
    rows = (await client.get("/v2/repository/index")).json()
    assert {"name": "tiny", "version": "2", "state": "READY", "reason": ""} in rows
    assert rows == (await client.post("/v2/repository/index")).json()


async def test_load_unload_need_admin(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/repository/models/tiny/unload")
    assert r.status_code == 403
    assert "admin" in r.json()["error"]
    r = await client.post("/v2/repository/models/tiny/load", headers={"Authorization": ""})
    assert r.status_code == 401


async def test_unload_then_load(client: httpx.AsyncClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (
        await client.post("/v2/repository/models/tiny/unload", headers=admin)
    ).status_code == 200
    r = await client.post("/v2/models/tiny/infer", json=_infer_body())
    assert r.status_code == 503
    assert "not ready" in r.json()["error"]
    assert (await client.get("/v2/models/tiny/ready")).status_code == 503
    rows = (await client.get("/v2/repository/index")).json()
    assert {"name": "tiny", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"} in rows
    # an unloaded model is not wanted any more: the server is still ready
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.post("/v2/repository/models/tiny/load", headers=admin)).status_code == 200
    await _assert_still_serving(client)


async def test_broken_new_version_keeps_old_serving(
    client: httpx.AsyncClient, repo_path: Path
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    (repo_path / "tiny" / "3").mkdir()
    (repo_path / "tiny" / "3" / "model.onnx").write_bytes(b"not an onnx file")
    r = await client.post("/v2/repository/models/tiny/load", headers=admin)
    assert r.status_code == 400
    assert "tiny" in r.json()["error"]
    assert "model.onnx" in r.json()["error"]
    doc = (await client.post("/v2/models/tiny/infer", json=_infer_body())).json()
    assert doc["model_version"] == "2"
    rows = (await client.get("/v2/repository/index")).json()
    assert any("last load failed" in row["reason"] for row in rows if row["name"] == "tiny")
    # fixed: loading again picks the new version up
    tiny_classifier(repo_path / "tiny" / "3" / "model.onnx", scale=3.0)
    assert (await client.post("/v2/repository/models/tiny/load", headers=admin)).status_code == 200
    doc = (await client.post("/v2/models/tiny/infer", json=_infer_body())).json()
    assert doc["model_version"] == "3"


async def test_bad_config_reported_on_load(client: httpx.AsyncClient, repo_path: Path) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    write_config(repo_path / "typo", {"platform": "onnx", "max_batch_sise": 4})
    r = await client.post("/v2/repository/models/typo/load", headers=admin)
    assert r.status_code == 400
    assert "unknown key 'max_batch_sise'" in r.json()["error"]
    assert "config.yaml" in r.json()["error"]


async def test_broken_model_at_start_is_not_ready(tmp_path: Path, settings: Settings) -> None:
    repo = settings.model_repository
    write_config(repo / "broken", {"platform": "onnx"})
    (repo / "broken" / "1").mkdir()
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    async with serving(settings) as c:
        r = await c.get("/v2/health/ready")
        assert r.status_code == 503
        # which model and why: behind the key (the unauthenticated probe says only not ready)
        rows = (await c.post("/v2/repository/index")).json()
        broken = [row for row in rows if row["name"] == "broken"]
        assert broken[0]["state"] == "UNAVAILABLE"
        assert "model.onnx" in broken[0]["reason"]
        r = await c.post("/v2/models/broken/infer", json=_infer_body())
        assert r.status_code == 503
        assert "model.onnx" in r.json()["error"]
        await _assert_still_serving(c)


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v2/models/tiny/infer", json=_infer_body())
    await client.post("/v2/models/tiny/infer", content=b"{")
    text = (await client.get("/metrics")).text
    assert 'fides_inference_requests_total{model="tiny",outcome="success",version="2"} 1.0' in text
    assert 'fides_model_ready{model="tiny",version="1"} 1.0' in text
    assert "fides_inference_batch_size_bucket" in text
    assert "fides_inference_queue_duration_seconds_bucket" in text
    assert 'route="/v2/models/{name}/infer",status="400"' in text
    assert "_created" not in text
    assert 'fides_model_loads_total{model="tiny",outcome="success"} 1.0' in text


async def test_two_apps_in_one_process(settings: Settings) -> None:
    a, b = create_app(settings), create_app(settings)
    assert a.state.metrics.registry is not b.state.metrics.registry


async def test_openapi_schema(settings: Settings) -> None:
    # served in development mode only (tests/gateway/test_http_hardening.py)
    async with serving(settings.model_copy(update={"dev_mode": True})) as client:
        doc = (await client.get("/openapi.json")).json()
    assert "/v2/models/{name}/infer" in doc["paths"]


async def test_json_logs_carry_the_request_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.logs import JsonFormatter

    with caplog.at_level("INFO", logger="gateway.access"):
        await client.post(
            "/v2/models/nope/infer", json=_infer_body(), headers={"X-Request-ID": "trace-42"}
        )
    records = [r for r in caplog.records if r.name == "gateway.access"]
    assert records
    doc = orjson.loads(JsonFormatter().format(records[-1]))
    assert doc["request_id"] == "trace-42"
    assert doc["status"] == 404
    assert doc["path"] == "/v2/models/nope/infer"


async def test_symlinked_model_directory_is_served(settings: Settings, tmp_path: Path) -> None:
    # Kubernetes volumes present directories as symlinks; they must load like any other.
    elsewhere = tmp_path / "elsewhere" / "linked"
    write_config(elsewhere, TINY_CONFIG)
    tiny_classifier(elsewhere / "1" / "model.onnx")
    (settings.model_repository / "linked").symlink_to(elsewhere, target_is_directory=True)
    async with serving(settings) as c:
        assert (await c.get("/v2/health/ready")).status_code == 200
        r = await c.post("/v2/models/linked/infer", json=_infer_body())
        assert r.status_code == 200


async def test_request_timeout_parameter(client: httpx.AsyncClient, repo_path: Path) -> None:
    # A model whose batcher waits 2 s for company, even when idle: a 50 ms request timeout
    # expires first.
    write_config(
        repo_path / "slow",
        {
            **TINY_CONFIG,
            "dynamic_batching": {
                "max_queue_delay_microseconds": 2_000_000,
                "max_queue_size": 4,
                "dispatch_when_idle": False,
            },
        },
    )
    tiny_classifier(repo_path / "slow" / "1" / "model.onnx")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.post("/v2/repository/models/slow/load", headers=admin)).status_code == 200
    r = await client.post("/v2/models/slow/infer", json=_infer_body(parameters={"timeout": 50_000}))
    assert r.status_code == 504
    assert "did not answer within 0.050s" in r.json()["error"]
    text = (await client.get("/metrics")).text
    assert 'fides_inference_failures_total{model="slow",reason="timeout",version="1"} 1.0' in text


async def test_queue_full_sheds_with_503(client: httpx.AsyncClient, repo_path: Path) -> None:
    write_config(
        repo_path / "small_queue",
        {
            **TINY_CONFIG,
            "dynamic_batching": {
                # long enough that a loaded machine gets every request queued within it
                "max_queue_delay_microseconds": 1_000_000,
                "max_queue_size": 2,
                "preferred_batch_size": [16],
                "dispatch_when_idle": False,  # requests wait, so the queue fills
            },
        },
    )
    tiny_classifier(repo_path / "small_queue" / "1" / "model.onnx")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = await client.post("/v2/repository/models/small_queue/load", headers=admin)
    assert r.status_code == 200
    results = await asyncio.gather(
        *(client.post("/v2/models/small_queue/infer", json=_infer_body()) for _ in range(5))
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 503, 503, 503]
    shed = next(r for r in results if r.status_code == 503)
    assert shed.headers["retry-after"] == "1"
    assert "queue is full" in shed.json()["error"]

    # with the queue full, a request is refused before its body is read (the body here
    # never completes: without the early refusal this would wait for it)
    async def stalled_body() -> AsyncIterator[bytes]:
        yield b'{"inputs": ['
        await asyncio.sleep(30)

    waiting = [
        asyncio.create_task(client.post("/v2/models/small_queue/infer", json=_infer_body()))
        for _ in range(2)
    ]
    # both queued (waiting out the 1 s batching delay) before the next one comes
    depth = 'fides_inference_queue_depth{model="small_queue",version="1"} 2.0'
    deadline = time.monotonic() + 10
    while depth not in (await client.get("/metrics")).text:
        assert time.monotonic() < deadline, "the two requests never filled the queue"
        await asyncio.sleep(0.01)
    r = await asyncio.wait_for(
        client.post("/v2/models/small_queue/infer", content=stalled_body()), timeout=5
    )
    assert r.status_code == 503
    assert "queue is full" in r.json()["error"]
    assert [t.status_code for t in await asyncio.gather(*waiting)] == [200, 200]
    text = (await client.get("/metrics")).text
    assert (
        'fides_inference_failures_total{model="small_queue",reason="queue_full",version="1"} 4.0'
        in text
    )


async def test_bytes_elements_past_the_shape_are_refused(client: httpx.AsyncClient) -> None:
    """1 MiB of zero lengths is 262,144 empty BYTES elements: for shape [1] the split stops at
    the second and the request is refused naming the count."""
    raw = b"\0" * (1 << 20)
    tensor = {"name": "input", "shape": [1], "datatype": "BYTES"}
    header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]})
    r = await client.post(
        "/v2/models/identity_bytes/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400
    assert r.json()["error"] == (
        "input 'input': data has more than 1 elements but shape [1] needs 1"
    )


async def test_binary_data_is_an_output_parameter_taken(client: httpx.AsyncClient) -> None:
    outputs = [{"name": "probabilities", "parameters": {"binary_data": False}}]
    r = await client.post("/v2/models/tiny/infer", json=_infer_body(outputs=outputs))
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]
