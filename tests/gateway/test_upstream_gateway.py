"""The verifying-proxy deployment: our gateway in front of a third-party OIP MLaaS.

The MLaaS here is a second, real Fides gateway serving the tiny classifier over HTTP on
loopback (started with uvicorn in a thread and stopped in teardown); the proxy runs in process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import USER_KEY
from tests.model_factory import TINY_CONFIG, make_repository, tiny_expected, write_config
from tests.threaded_server import serve_in_thread

X = [[1.0, 2.0, 3.0, 4.0]]


@pytest.fixture
def mlaas(tmp_path: Path) -> Iterator[tuple[str, uvicorn.Server]]:
    repo = make_repository(tmp_path / "mlaas", datatypes=())
    settings = Settings(model_repository=repo, api_keys=["mlaas-key"], log_json=False)
    with serve_in_thread(create_app(settings)) as running:
        yield running


@pytest.fixture
async def proxy(
    tmp_path: Path, mlaas: tuple[str, uvicorn.Server]
) -> AsyncIterator[httpx.AsyncClient]:
    url, _ = mlaas
    repo = tmp_path / "proxy"
    write_config(
        repo / "remote_tiny",
        {
            "platform": "upstream",
            "max_batch_size": 16,
            "dynamic_batching": TINY_CONFIG["dynamic_batching"],
            "upstream": {
                "url": url,
                "model_name": "tiny",
                "model_version": "1",
                "headers": {"Authorization": "Bearer mlaas-key"},
                "timeout_s": 2.0,
                "retries": 1,
                "backoff_s": 0.01,
                "circuit_breaker": {"failure_threshold": 2, "reset_timeout_s": 30},
            },
        },
    )
    (repo / "remote_tiny" / "1").mkdir()
    app = create_app(Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://proxy",
            headers={"Authorization": f"Bearer {USER_KEY}"},
        ) as client,
    ):
        yield client


def _body() -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]}


async def test_proxy_serves_the_upstream_model(proxy: httpx.AsyncClient) -> None:
    meta = (await proxy.get("/v2/models/remote_tiny")).json()
    assert meta["platform"] == "upstream"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    r = await proxy.post("/v2/models/remote_tiny/infer", json=_body())
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    _, probs = tiny_expected(np.asarray(X, dtype=np.float32))
    np.testing.assert_allclose(np.reshape(out["probabilities"], (1, 3)), probs, rtol=1e-5)


async def test_upstream_down_is_a_clear_502_then_the_circuit_opens(
    proxy: httpx.AsyncClient, mlaas: tuple[str, uvicorn.Server]
) -> None:
    url, server = mlaas
    assert (await proxy.post("/v2/models/remote_tiny/infer", json=_body())).status_code == 200
    server.should_exit = True
    # wait until the port is closed: a connection refused, not merely a slow answer
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/v2/health/live", timeout=5)
        except httpx.ConnectError:
            break
        except httpx.TransportError:  # e.g. dropped while shutting down: not closed yet
            pass
        assert time.monotonic() < deadline, f"the MLaaS at {url} still accepts connections"
        time.sleep(0.05)
    for _ in range(2):
        r = await proxy.post("/v2/models/remote_tiny/infer", json=_body())
        assert r.status_code == 502
        assert url in r.json()["error"]
    r = await proxy.post("/v2/models/remote_tiny/infer", json=_body())
    assert r.status_code == 503
    assert "circuit" in r.json()["error"].lower()
    assert int(r.headers["retry-after"]) >= 1
    metrics = (await proxy.get("/metrics")).text
    assert 'fides_upstream_circuit_open{model="remote_tiny"} 1.0' in metrics
    assert 'fides_upstream_retries_total{model="remote_tiny"} 2.0' in metrics
    assert 'reason="upstream_error"' in metrics
    # the gateway itself keeps answering
    assert (await proxy.get("/v2/health/live")).status_code == 200
