"""The caller's deadline reaches the upstream call: a real HTTP upstream on 127.0.0.1.

Before, ``Runtime.predict`` got no deadline: an upstream model's retries, backoffs and waits
for ``Retry-After`` ran on long after every caller of the batch had been answered 504 at its
deadline, holding the model's worker thread (one instance: the whole model) for up to
``(retries + 1) * timeout_s`` plus the backoffs. Now no attempt starts after the batch's
latest deadline, no backoff waits past it, and an attempt is cut at it; a cut attempt is a
timeout of ours, not counted by the circuit breaker as the remote's failure.

Timings are generous on purpose (a loaded machine): each test's "before" took seconds to tens
of seconds longer than its bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gateway.batcher import BatchPolicy, DynamicBatcher
from gateway.errors import UpstreamTimeout
from gateway.model_config import ModelConfig
from gateway.runtimes.base import Runtime, Tensors
from gateway.settings import Settings
from tests.conftest import USER_KEY, serving_app
from tests.gateway import test_upstream_hostile as hostile
from tests.model_factory import write_config

# the fake OIP server of the hostile-upstream tests (a real uvicorn server in a thread)
upstream_server = hostile.upstream_server
upstream = hostile.upstream
make_runtime = hostile.make_runtime
X = hostile.X

BODY = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


class Calls:
    """Arrival times (``time.monotonic()``, the gateway's clock too) of inference calls."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.release = threading.Event()  # ends the answers being held back

    def failing(self, status: int = 500, headers: dict[str, str] | None = None) -> hostile.Handler:
        async def handler(body: dict[str, Any]) -> Response:
            self.at.append(time.monotonic())
            return Response(b"upstream down", status_code=status, headers=headers)

        return handler

    def hanging(self) -> hostile.Handler:
        """Answers only once released (a remote that is answering very slowly)."""

        async def handler(body: dict[str, Any]) -> Response:
            self.at.append(time.monotonic())
            while not self.release.is_set():
                await asyncio.sleep(0.05)
            return JSONResponse(hostile.good_answer(body))

        return handler


@pytest.fixture
def calls() -> Iterator[Calls]:
    made = Calls()
    yield made
    made.release.set()  # no answer left held in the fake server


@asynccontextmanager
async def gateway(
    tmp_path: Path, upstream_options: dict[str, Any], **config: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway serving model ``remote`` (one instance) from the fake upstream."""
    repo = tmp_path / "proxy"
    write_config(
        repo / "remote",
        {
            "platform": "upstream",
            "max_batch_size": 8,
            "instance_group": {"count": 1},
            "upstream": {"model_name": "clf", **upstream_options},
            **config,
        },
    )
    settings = Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False)
    async with serving_app(settings, timeout=60) as (_, client):
        yield client


def _body(timeout_us: int | None = None) -> dict[str, Any]:
    if timeout_us is None:
        return BODY
    return {**BODY, "parameters": {"timeout": timeout_us}}


async def test_no_retry_is_sent_after_the_callers_deadline_and_the_worker_is_freed(
    upstream: hostile.Upstream, calls: Calls, tmp_path: Path
) -> None:
    """Upstream answering 500, 5 retries from 1 s of backoff, the caller's timeout 0.5 s:
    the caller gets its 504 and the upstream sees no call started after the deadline; once
    the upstream recovers, the next request is served at once. Before, the one worker went
    on retrying for about 31 s (1 + 2 + 4 + 8 + 16 s of backoff), sending 5 more calls long
    after the caller had gone, and the next request timed out behind it."""
    upstream.handler = calls.failing()
    options = {
        "url": upstream.url,
        "retries": 5,
        "backoff_s": 1.0,
        "circuit_breaker": {"failure_threshold": 100},
    }
    async with gateway(tmp_path, options) as client:
        sent = time.monotonic()
        r = await client.post("/v2/models/remote/infer", json=_body(timeout_us=500_000))
        assert r.status_code == 504, r.text
        deadline = sent + 0.5
        # still down for longer than the first backoff (1 to 1.1 s after the first call)
        await asyncio.sleep(2.0)
        assert len(calls.at) <= 1, f"{len(calls.at)} calls for a caller that waited 0.5s"
        late = [round(t - deadline, 3) for t in calls.at if t > deadline + 0.25]
        assert not late, f"calls started after the caller's deadline (s after it): {late}"

        # the remote recovers; the model's only worker must be free for the next request
        upstream.handler = upstream._honest
        t0 = time.monotonic()
        r = await client.post("/v2/models/remote/infer", json=_body(timeout_us=10_000_000))
        elapsed = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert elapsed < 5.0, f"the next request waited {elapsed:.1f}s for the worker"


async def test_an_attempt_is_cut_at_the_models_default_timeout(
    upstream: hostile.Upstream, calls: Calls, tmp_path: Path
) -> None:
    """A remote that holds its answer, ``timeout_s`` 30 and the model's
    ``default_timeout_microseconds`` 0.5 s: the attempt is cut at the caller's deadline, the
    worker freed for the next request. Before, the worker waited on the remote for the whole
    30 s ``timeout_s`` (and the next request timed out behind it)."""
    upstream.handler = calls.hanging()
    options = {"url": upstream.url, "retries": 0, "timeout_s": 30.0}
    batching = {"dynamic_batching": {"default_timeout_microseconds": 500_000}}
    async with gateway(tmp_path, options, **batching) as client:
        r = await client.post("/v2/models/remote/infer", json=_body())
        assert r.status_code == 504, r.text

        upstream.handler = upstream._honest
        t0 = time.monotonic()
        r = await client.post("/v2/models/remote/infer", json=_body(timeout_us=10_000_000))
        elapsed = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert elapsed < 5.0, f"the next request waited {elapsed:.1f}s for the worker"
    assert len(calls.at) == 1


def test_a_cut_attempt_is_a_504_saying_so_and_not_an_upstream_failure(
    upstream: hostile.Upstream,
    calls: Calls,
    make_runtime: Callable[..., hostile.UpstreamRuntime],
) -> None:
    """The runtime itself: an attempt cut at the caller's deadline ends the call at once,
    as an UpstreamTimeout (504) that names the caller's deadline; no retry follows, and the
    circuit breaker does not count it (the remote did not fail, it was slower than this
    caller would wait): with ``failure_threshold`` 1 the next call still goes through."""
    upstream.handler = calls.hanging()
    rt = make_runtime(
        timeout_s=30.0, retries=3, backoff_s=0.01, circuit_breaker={"failure_threshold": 1}
    )
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="caller's deadline") as info:
        rt.predict(X, deadline=t0 + 0.5)
    elapsed = time.monotonic() - t0
    assert info.value.status == 504
    assert elapsed < 5.0, f"the call ran {elapsed:.1f}s past a 0.5s deadline"
    assert len(calls.at) == 1  # no retry after the deadline
    assert rt.breaker.consecutive_failures == 0
    assert rt.breaker.state == "closed"

    upstream.handler = upstream._honest
    assert rt.predict(X)["label"].tolist() == [1, 0]  # not refused by an open circuit


def test_a_retry_after_longer_than_the_deadline_is_not_waited(
    upstream: hostile.Upstream,
    calls: Calls,
    make_runtime: Callable[..., hostile.UpstreamRuntime],
) -> None:
    """503 with ``Retry-After: 30`` (honoured up to 60 s) and 1 s left: the call ends at once
    without a retry, as a 504 naming the caller's deadline and the failure it followed; the
    remote did fail, and the breaker counts it."""
    upstream.handler = calls.failing(503, headers={"Retry-After": "30"})
    rt = make_runtime(retries=2, max_retry_after_s=60.0)
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"HTTP 503.*caller's deadline"):
        rt.predict(X, deadline=t0 + 1.0)
    assert time.monotonic() - t0 < 5.0
    assert len(calls.at) == 1
    assert rt.breaker.consecutive_failures == 1


def test_retries_still_run_while_the_caller_waits(
    upstream: hostile.Upstream,
    calls: Calls,
    make_runtime: Callable[..., hostile.UpstreamRuntime],
) -> None:
    """A deadline far off changes nothing: a failed attempt is retried as before."""
    failing = calls.failing()
    state = {"n": 0}

    async def flaky(body: dict[str, Any]) -> Response:
        state["n"] += 1
        if state["n"] == 1:
            return await failing(body)
        return JSONResponse(hostile.good_answer(body))

    upstream.handler = flaky
    rt = make_runtime(retries=2, backoff_s=0.01)
    assert rt.predict(X, deadline=time.monotonic() + 30)["label"].tolist() == [1, 0]
    assert state["n"] == 2


def test_an_expired_deadline_calls_nothing(
    upstream: hostile.Upstream,
    calls: Calls,
    make_runtime: Callable[..., hostile.UpstreamRuntime],
) -> None:
    upstream.handler = calls.failing()
    rt = make_runtime()
    with pytest.raises(UpstreamTimeout, match="not called: the caller's deadline"):
        rt.predict(X, deadline=time.monotonic() - 1)
    assert calls.at == []
    assert rt.breaker.consecutive_failures == 0


def test_the_answer_size_limit_is_configurable(
    upstream: hostile.Upstream, make_runtime: Callable[..., hostile.UpstreamRuntime]
) -> None:
    """``upstream.max_response_bytes`` bounds the answer read (a larger one is a 502)."""
    rt = make_runtime(max_response_bytes=1024)
    assert rt.max_response_bytes == 1024
    big = {"x": np.zeros((200, 2), dtype=np.float32)}  # its answer: several kB of JSON
    with pytest.raises(hostile.UpstreamError, match="larger than 1024 bytes"):
        rt.predict(big)
    assert make_runtime().max_response_bytes == 256 * 1024 * 1024  # the default


@pytest.mark.parametrize("value", [0, 1023, 2**30 + 1, True])
def test_an_unreasonable_size_limit_is_refused(value: object) -> None:
    raw = {"platform": "upstream", "upstream": {"url": "http://x", "max_response_bytes": value}}
    with pytest.raises(ValidationError, match="max_response_bytes"):
        ModelConfig.model_validate(raw)


# -- the batcher passes the deadline on ------------------------------------------------------


class _DeadlineRecorder(Runtime):
    """y = 2x; records the deadline each batch was given."""

    platform = "test"

    def __init__(self) -> None:
        super().__init__("rec", 1, Path("."), ModelConfig(platform="onnx", max_batch_size=8))
        self.deadlines: list[float | None] = []

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        self.deadlines.append(deadline)
        return {"y": inputs["x"] * 2}


def _batching(max_batch_size: int = 8) -> BatchPolicy:
    return BatchPolicy(max_batch_size=max_batch_size, max_queue_delay_s=0.2, instances=1)


async def test_a_batch_runs_with_the_latest_deadline_of_its_requests() -> None:
    rt = _DeadlineRecorder()
    b = DynamicBatcher(rt, _batching())
    b.start()
    now = time.monotonic()
    x = {"x": np.ones((1, 2), dtype=np.float32)}
    deadlines = [now + 20, now + 40, now + 30]
    outs = await asyncio.gather(*(b.submit(x, d) for d in deadlines))
    await b.close()
    assert all(o["y"].tolist() == [[2.0, 2.0]] for o in outs)
    assert rt.deadlines == [now + 40]  # one batch: a caller waits until the latest deadline
