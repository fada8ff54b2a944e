"""The inference fast path (gateway/api/v2/fast_path.py) answers exactly as FastAPI's routes do:
the same bodies, statuses, headers and metric labels for good requests and for every kind of
refusal, with it on and off."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import USER_KEY, serving

GOOD = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("good", "/v2/models/tiny/infer", {"json": GOOD}),
    ("version", "/v2/models/tiny/versions/1/infer", {"json": {**GOOD, "id": "a-1"}}),
    ("unknown model", "/v2/models/nope/infer", {"json": GOOD}),
    ("unknown version", "/v2/models/tiny/versions/9/infer", {"json": GOOD}),
    ("bad json", "/v2/models/tiny/infer", {"content": b"{not json"}),
    (
        "wrong shape",
        "/v2/models/tiny/infer",
        {"json": {"inputs": [{**GOOD["inputs"][0], "shape": [2, 4]}]}},
    ),
    ("no key", "/v2/models/tiny/infer", {"json": GOOD, "headers": {"X-API-Key": ""}}),
    ("wrong key", "/v2/models/tiny/infer", {"json": GOOD, "headers": {"X-API-Key": "nope"}}),
    ("too large", "/v2/models/tiny/infer", {"content": b"x" * 2048}),
    (
        "bad encoding",
        "/v2/models/tiny/infer",
        {"content": b"x", "headers": {"Content-Encoding": "br"}},
    ),
]


_COMPARED_HEADERS = ("www-authenticate", "retry-after", "connection", "content-type")


async def _answers(settings: Settings) -> dict[str, tuple[int, Any, dict[str, str]]]:
    out = {}
    async with serving(settings) as client:
        for name, path, kw in CASES:
            call = dict(kw)
            call["headers"] = {"X-API-Key": USER_KEY, **kw.get("headers", {})}
            r = await client.post(path, **call)
            kept = {k: v for k, v in r.headers.items() if k in _COMPARED_HEADERS}
            out[name] = (r.status_code, r.json(), kept)
        r = await client.get("/v2/models/tiny/infer")  # another method: FastAPI's 405 both ways
        out["get"] = (r.status_code, r.json(), {})
        metrics = (await client.get("/metrics")).text
        out["metrics"] = (
            0,
            sorted(
                line.rsplit(" ", 1)[0]
                for line in metrics.splitlines()
                if line.startswith("fides_http_requests_total{")
            ),
            {},
        )
    return out


@pytest.fixture
def small_body_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_body_bytes": 1024})


async def test_fast_path_answers_as_fastapi_does(small_body_settings: Settings) -> None:
    fast = await _answers(small_body_settings.model_copy(update={"infer_fast_path": True}))
    slow = await _answers(small_body_settings.model_copy(update={"infer_fast_path": False}))
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name] == slow[name], name
    statuses = {name: fast[name][0] for name, _, _ in CASES}
    assert statuses == {
        "good": 200,
        "version": 200,
        "unknown model": 404,
        "unknown version": 404,
        "bad json": 400,
        "wrong shape": 400,
        "no key": 401,
        "wrong key": 401,
        "too large": 413,
        "bad encoding": 400,
    }
    # labelled by the route's template, never by the path
    assert any('route="/v2/models/{name}/infer"' in m for m in fast["metrics"][1])
    assert any(
        'route="/v2/models/{name}/versions/{version}/infer"' in m for m in fast["metrics"][1]
    )


async def test_an_unexpected_error_is_a_500_both_ways(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.dataplane import DataPlane

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(DataPlane, "infer", broken)
    for fast in (True, False):
        app = create_app(settings.model_copy(update={"infer_fast_path": fast}))
        # FastAPI's path answers 500 and re-raises to the server (which logs it); the fast
        # path answers 500 through the same handler, which logs it
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=transport, base_url="http://test", headers={"X-API-Key": USER_KEY}
            ) as client,
        ):
            r = await client.post("/v2/models/tiny/infer", json=GOOD)
            assert r.status_code == 500
            assert r.json() == {"error": "internal error: RuntimeError"}
            # inside the request-context middleware, the fast path's 500 carries the request
            # id; FastAPI's comes from Starlette's outermost ServerErrorMiddleware, without it
            assert ("x-request-id" in r.headers) is fast
            # the server keeps serving
            assert (await client.get("/v2/health/live")).status_code == 200


def test_the_fast_path_is_on_by_default() -> None:
    assert Settings(dev_mode=True).infer_fast_path
