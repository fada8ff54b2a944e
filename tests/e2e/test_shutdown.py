"""SIGTERM drains: requests in flight finish, new connections are refused, the process exits."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import USER_KEY
from tests.e2e.conftest import GatewayProcess, running_gateway
from tests.model_factory import TINY_CONFIG, make_repository, write_config

pytestmark = pytest.mark.e2e


def _reached(gw: GatewayProcess) -> float:
    """Requests of ``tiny`` the server has taken: in flight now, or answered successfully."""
    text = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('fides_inference_inflight_requests{model="tiny"}')
        or (
            line.startswith('fides_inference_requests_total{model="tiny"')
            and 'outcome="success"' in line
        )
    )


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", datatypes=())
    # Requests wait up to 1.5 s in the batcher for a batch to fill (even the first, on an idle
    # model): they are in flight when the signal arrives.
    write_config(
        repo / "tiny",
        {
            **TINY_CONFIG,
            "version_policy": {"all": {}},
            "dynamic_batching": {
                "max_queue_delay_microseconds": 1_500_000,
                "preferred_batch_size": [16],
                "dispatch_when_idle": False,
            },
        },
    )
    body = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
    }
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    with running_gateway(repo, tmp_path / "logs") as gw:

        def call() -> int:
            r = httpx.post(
                f"{gw.base_url}/v2/models/tiny/infer", json=body, headers=headers, timeout=10
            )
            return r.status_code

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call) for _ in range(4)]
            # all four reached the server (in flight, or already answered should a loaded
            # machine have delayed one past the batching window) before the signal: a fixed
            # sleep here let a late one meet a closed port
            deadline = time.monotonic() + 30
            while _reached(gw) < 4:
                assert time.monotonic() < deadline, "the 4 requests never reached the server"
                time.sleep(0.02)
            t0 = time.monotonic()
            os.kill(gw.pid, signal.SIGTERM)
            statuses = [f.result() for f in futures]
        assert statuses == [200, 200, 200, 200]
        gw.process.wait(timeout=10)
        assert time.monotonic() - t0 < 8  # well within FIDES_SHUTDOWN_GRACE_S + drain
        # uvicorn re-raises the signal after its graceful shutdown, as a well-behaved process does
        assert gw.process.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{gw.base_url}/v2/health/live", timeout=1)
        assert "shutting down" in gw.log()
