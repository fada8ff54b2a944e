"""UpstreamRuntime against an upstream that misbehaves: a real HTTP server on 127.0.0.1.

Each test installs the fake's answer to ``POST .../infer`` (a trickled body, a compression
bomb, an answer for another model, values that do not fit the declared datatype, an error
body that quotes our credentials, ...); the runtime must turn each into a clear error (or
pass on exactly the upstream's values), never a wrong answer, a hang or a leaked secret.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import CircuitOpen, UpstreamError, UpstreamTimeout
from gateway.model_config import ModelConfig
from gateway.runtimes.upstream import UpstreamRuntime
from gateway.settings import Settings
from tests.conftest import USER_KEY, serving
from tests.model_factory import write_config
from tests.threaded_server import serve_in_thread

METADATA = {
    "name": "clf",
    "versions": ["1"],
    "platform": "fake",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
}

Handler = Callable[[dict[str, Any]], Awaitable[Response]]


def good_answer(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What an honest upstream answers: score = x, label = argmax(x)."""
    (x,) = body["inputs"]
    rows = x["shape"][0]
    data = np.asarray(x["data"], dtype=np.float32).reshape(rows, 2)
    return {
        "model_name": "clf",
        "model_version": "1",
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [rows, 2], "data": x["data"]},
            {
                "name": "label",
                "datatype": "INT64",
                "shape": [rows],
                "data": data.argmax(axis=1).tolist(),
            },
        ],
        **extra,
    }


class Upstream:
    """A fake OIP server; ``handler`` answers the next inference calls."""

    def __init__(self) -> None:
        self.url = ""
        self.handler: Handler = self._honest
        self.headers: list[dict[str, str]] = []  # of each inference call
        self.app = FastAPI()
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            self.app.add_api_route(prefix, self._metadata, methods=["GET"])
            self.app.add_api_route(prefix + "/infer", self._infer, methods=["POST"])

    async def _honest(self, body: dict[str, Any]) -> Response:
        return JSONResponse(good_answer(body))

    async def _metadata(self, name: str) -> Response:
        return JSONResponse(METADATA)

    async def _infer(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        return await self.handler(await request.json())


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Upstream]:
    fake = Upstream()
    with serve_in_thread(fake.app, "hostile-mlaas", access_log=False, lifespan="off") as (url, _):
        fake.url = url
        yield fake


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    upstream_server.handler = upstream_server._honest
    upstream_server.headers = []
    return upstream_server


@pytest.fixture
def make_runtime(upstream: Upstream, tmp_path: Path) -> Iterator[Callable[..., UpstreamRuntime]]:
    made: list[UpstreamRuntime] = []

    def make(url: str | None = None, **options: Any) -> UpstreamRuntime:
        raw = {
            "platform": "upstream",
            "max_batch_size": 8,
            "upstream": {
                "url": url or upstream.url,
                "model_name": "clf",
                "timeout_s": 1.0,
                "retries": 0,
                "backoff_s": 0.01,
                **options,
            },
        }
        runtime = UpstreamRuntime("clf", 1, tmp_path, ModelConfig.model_validate(raw))
        made.append(runtime)
        runtime.load()
        return runtime

    yield make
    for runtime in made:
        runtime.unload()


X = {"x": np.array([[0.25, 0.75], [2.0, -1.0]], dtype=np.float32)}


def test_an_honest_upstream_round_trips(make_runtime: Callable[..., UpstreamRuntime]) -> None:
    out = make_runtime().predict(X)
    np.testing.assert_array_equal(out["score"], X["x"])
    assert out["label"].tolist() == [1, 0]


# -- time and size ------------------------------------------------------------------------


def test_a_trickled_answer_is_a_timeout_not_a_hang(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    """httpx's timeout bounds each read, not the answer: an upstream sending a byte every
    0.2 s never tripped a 1 s timeout (this one would take 4 s here, minutes in the wild)."""

    async def trickle(body: dict[str, Any]) -> Response:
        answer = orjson.dumps(good_answer(body)) + b" " * 20

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(len(answer)):
                yield answer[i : i + 1]
                if i >= 20:
                    await asyncio.sleep(0.2)

        return StreamingResponse(chunks(), media_type="application/json")

    upstream.handler = trickle
    rt = make_runtime(timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        rt.predict(X)
    assert time.monotonic() - started < 3.0  # the timeout, not the whole trickle
    assert info.value.status == 504
    assert "timed out after 1s" in info.value.message


def test_a_compression_bomb_is_refused_at_the_size_limit(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    """A small gzip body that inflates far past the limit is not read into memory whole."""
    limit = 1 << 20

    async def bomb(body: dict[str, Any]) -> Response:
        # valid JSON (trailing whitespace is allowed): 32 MiB inflated, ~32 KiB on the wire
        inflated = orjson.dumps(good_answer(body)) + b" " * (32 << 20)
        return Response(
            gzip.compress(inflated, compresslevel=1),
            media_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )

    upstream.handler = bomb
    rt = make_runtime()
    rt.max_response_bytes = limit
    with pytest.raises(UpstreamError) as info:
        rt.predict(X)
    assert info.value.status == 502
    assert "larger than" in info.value.message
    assert "1 MiB" in info.value.message


def test_the_default_size_limit_is_finite(make_runtime: Callable[..., UpstreamRuntime]) -> None:
    rt = make_runtime()
    assert 0 < rt.max_response_bytes <= 1 << 30
    assert rt.predict(X)["label"].tolist() == [1, 0]  # an ordinary answer is well within it


# -- answers that are not for this request -------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "options", "detail"),
    [
        ({"model_name": "other"}, {}, "answered for model 'other'"),
        ({"model_version": "7"}, {"model_version": "1"}, "answered for version '7'"),
    ],
)
def test_an_answer_for_another_model_or_version_is_refused(
    make_runtime: Callable[..., UpstreamRuntime],
    upstream: Upstream,
    extra: dict[str, Any],
    options: dict[str, Any],
    detail: str,
) -> None:
    async def misrouted(body: dict[str, Any]) -> Response:
        return JSONResponse(good_answer(body, **extra))

    upstream.handler = misrouted
    rt = make_runtime(**options)
    with pytest.raises(UpstreamError) as info:
        rt.predict(X)
    assert info.value.message.startswith("upstream returned an invalid response: ")
    assert detail in info.value.message


def test_an_answer_naming_no_model_is_accepted(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    async def anonymous(body: dict[str, Any]) -> Response:
        answer = good_answer(body)
        del answer["model_name"], answer["model_version"]
        return JSONResponse(answer)

    upstream.handler = anonymous
    assert make_runtime(model_version="1").predict(X)["label"].tolist() == [1, 0]


# -- values that do not fit the declared datatype -------------------------------------------


@pytest.mark.parametrize(
    ("label", "detail"),
    [
        ({"datatype": "FP64", "data": [0.5, 1.0]}, "cannot be INT64"),  # 0.5 truncated to 0
        ({"datatype": "UINT64", "data": [2**63, 1]}, "cannot be INT64"),  # wrapped negative
    ],
)
def test_output_values_that_do_not_fit_the_declared_datatype_are_refused(
    make_runtime: Callable[..., UpstreamRuntime],
    upstream: Upstream,
    label: dict[str, Any],
    detail: str,
) -> None:
    async def lossy(body: dict[str, Any]) -> Response:
        answer = good_answer(body)
        answer["outputs"][1].update(label)
        return JSONResponse(answer)

    upstream.handler = lossy
    with pytest.raises(UpstreamError) as info:
        make_runtime().predict(X)
    assert "output 'label'" in info.value.message
    assert detail in info.value.message


def test_fp32_values_beyond_range_are_refused(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    async def huge(body: dict[str, Any]) -> Response:
        answer = good_answer(body)
        answer["outputs"][0].update(datatype="FP64", data=[1e300, 0.0, 1.0, 2.0])
        return JSONResponse(answer)

    upstream.handler = huge
    with pytest.raises(UpstreamError, match="output 'score'.*cannot be FP32"):
        make_runtime().predict(X)


def test_exact_casts_are_still_made(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    """A server that sends labels as FP64 whole numbers, or scores as FP64, still works."""

    async def wide(body: dict[str, Any]) -> Response:
        answer = good_answer(body)
        answer["outputs"][0]["datatype"] = "FP64"
        answer["outputs"][1].update(datatype="FP64", data=[1.0, 0.0])
        return JSONResponse(answer)

    upstream.handler = wide
    out = make_runtime().predict(X)
    assert out["score"].dtype == np.float32
    np.testing.assert_array_equal(out["score"], X["x"])
    assert out["label"].dtype == np.int64
    assert out["label"].tolist() == [1, 0]


# -- secrets --------------------------------------------------------------------------------


def test_credentials_in_the_url_are_not_shown(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    async def broken(body: dict[str, Any]) -> Response:
        return JSONResponse({"error": "model crashed"}, status_code=500)

    upstream.handler = broken
    url = upstream.url.replace("http://", "http://alice:hunter2secret@")
    rt = make_runtime(url=url)
    with pytest.raises(UpstreamError) as info:
        rt.predict(X)
    assert "hunter2secret" not in info.value.message
    assert "alice" not in info.value.message
    assert upstream.url.removeprefix("http://") in info.value.message  # still says where
    assert "hunter2secret" not in rt.breaker.name


def test_credentials_in_the_url_go_as_basic_auth_and_stay_out_of_the_log(
    make_runtime: Callable[..., UpstreamRuntime],
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """httpx logs every request's URL at INFO (the gateway's level): with the user info in
    the URL it asked for, each inference call wrote the password to the log."""
    caplog.set_level(logging.DEBUG)
    url = upstream.url.replace("http://", "http://alice:hunter2secret@")
    rt = make_runtime(url=url)
    assert rt.predict(X)["label"].tolist() == [1, 0]
    sent = upstream.headers[-1]["authorization"]
    assert sent == "Basic " + base64.b64encode(b"alice:hunter2secret").decode()
    assert "HTTP Request: POST" in caplog.text  # httpx did log the call...
    assert "hunter2secret" not in caplog.text  # ...without the password


def test_an_error_body_quoting_our_credentials_is_redacted(
    make_runtime: Callable[..., UpstreamRuntime],
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many APIs quote the key they refused ("Incorrect API key provided: sk-..."); that text
    becomes our caller's error message, so the credential would reach every caller."""
    monkeypatch.setenv("HOSTILE_MLAAS_KEY", "sk-live-0123456789")

    async def refuses(body: dict[str, Any]) -> Response:
        return JSONResponse(
            {"error": "Incorrect API key provided: sk-live-0123456789 (tenant t-42)"},
            status_code=401,
        )

    upstream.handler = refuses
    rt = make_runtime(
        headers={"X-Tenant": "t-42"},
        headers_from_env={"Authorization": "HOSTILE_MLAAS_KEY"},
    )
    with pytest.raises(UpstreamError) as info:
        rt.predict(X)
    msg = info.value.message
    assert "HTTP 401" in msg
    assert "Incorrect API key provided" in msg
    assert "sk-live-0123456789" not in msg
    assert "[redacted]" in msg


def test_a_body_that_does_not_inflate_is_an_upstream_error(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    """httpx raises DecodingError (not a TransportError): it escaped as a 500 'internal'."""

    async def corrupt(body: dict[str, Any]) -> Response:
        return Response(
            b"this is not gzip",
            media_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )

    upstream.handler = corrupt
    rt = make_runtime()
    with pytest.raises(UpstreamError) as info:
        rt.predict(X)
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert "unreadable answer" in info.value.message
    assert rt.breaker.consecutive_failures == 1


def test_an_encoding_that_was_not_asked_for_is_refused(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    """brotli inflates without a bound per chunk: only gzip and deflate are asked for."""
    seen: list[str] = []

    async def brotli(body: dict[str, Any]) -> Response:
        return Response(
            b"\x0b\x02\x80{}\x03",  # brotli-framed bytes; refused before any decoding
            media_type="application/json",
            headers={"Content-Encoding": "br"},
        )

    upstream.handler = brotli
    rt = make_runtime()
    seen.append(rt.client.headers["Accept-Encoding"])
    with pytest.raises(UpstreamError, match="Content-Encoding 'br'; only gzip, deflate"):
        rt.predict(X)
    assert seen == ["gzip, deflate"]


# -- the circuit breaker --------------------------------------------------------------------


def test_a_slow_success_sent_before_the_breaker_opened_does_not_close_it(
    make_runtime: Callable[..., UpstreamRuntime], upstream: Upstream
) -> None:
    """Several worker threads (instance_group.count > 1): one slow call is in flight while
    the others fail and open the breaker; its late success must not close it again."""
    release = threading.Event()

    async def flaky(body: dict[str, Any]) -> Response:
        if body["inputs"][0]["data"][0] == 99.0:  # the slow call: answers when released
            while not release.is_set():
                await asyncio.sleep(0.01)
            return JSONResponse(good_answer(body))
        return JSONResponse({"error": "model crashed"}, status_code=500)

    upstream.handler = flaky
    rt = make_runtime(timeout_s=10.0, circuit_breaker={"failure_threshold": 2})
    slow_x = {"x": np.array([[99.0, 1.0]], dtype=np.float32)}
    answers: list[Any] = []
    slow = threading.Thread(target=lambda: answers.append(rt.predict(slow_x)))
    slow.start()
    deadline = time.monotonic() + 10
    while not upstream.headers and time.monotonic() < deadline:  # the slow call was sent
        time.sleep(0.01)
    for _ in range(2):
        with pytest.raises(UpstreamError):
            rt.predict(X)
    assert rt.breaker.state == "open"
    release.set()
    slow.join(10)
    assert answers[0]["label"].tolist() == [0]  # the slow call got its answer...
    assert rt.breaker.state == "open"  # ...and the breaker stays open
    with pytest.raises(CircuitOpen):
        rt.predict(X)


# -- what the gateway's caller sees ---------------------------------------------------------


async def test_the_caller_gets_a_502_counted_as_upstream_error(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Through the gateway: an upstream body that does not inflate was a 500 'internal'
    (httpx's DecodingError escaped the runtime); it is the upstream's fault, said as such."""

    async def corrupt(body: dict[str, Any]) -> Response:
        return Response(b"not gzip", headers={"Content-Encoding": "gzip"})

    upstream.handler = corrupt
    repo = tmp_path / "proxy"
    write_config(
        repo / "remote",
        {
            "platform": "upstream",
            "max_batch_size": 8,
            "upstream": {"url": upstream.url, "model_name": "clf", "retries": 0},
        },
    )
    settings = Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False)
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    async with serving(settings) as client:
        r = await client.post("/v2/models/remote/infer", json=body)
        assert r.status_code == 502, r.text
        assert "unreadable answer" in r.json()["error"]
        metrics = (await client.get("/metrics")).text
    assert 'reason="upstream_error"' in metrics
    assert 'reason="internal"' not in metrics


async def test_a_batch_the_remote_fails_is_not_rerun_request_by_request(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Four requests batched together while the remote answers 500: one retry sequence for
    the batch (2 calls of 4 rows), each caller a 502. Before, the batcher reran each request
    on its own after the batch failed (one request never fails another), repeating the
    remote's whole retry sequence four more times (10 calls) while the callers waited."""
    rows_sent: list[int] = []

    async def down(body: dict[str, Any]) -> Response:
        rows_sent.append(body["inputs"][0]["shape"][0])
        return Response(b"upstream down", status_code=500)

    upstream.handler = down
    repo = tmp_path / "proxy"
    write_config(
        repo / "remote",
        {
            "platform": "upstream",
            "max_batch_size": 8,
            # the four requests wait for each other (they arrive within milliseconds)
            "dynamic_batching": {
                "max_queue_delay_microseconds": 5_000_000,
                "preferred_batch_size": [4],
                "dispatch_when_idle": False,
            },
            "upstream": {
                "url": upstream.url,
                "model_name": "clf",
                "retries": 1,
                "backoff_s": 0.01,
                "circuit_breaker": {"failure_threshold": 100},
            },
        },
    )
    settings = Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False)
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    async with serving(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/v2/models/remote/infer", json=body) for _ in range(4))
        )
        assert [r.status_code for r in answers] == [502] * 4, [r.text for r in answers]
        assert all("HTTP 500" in r.json()["error"] for r in answers), answers[0].text
        metrics = (await client.get("/metrics")).text
    assert rows_sent == [4, 4]
    assert 'reason="internal"' not in metrics
