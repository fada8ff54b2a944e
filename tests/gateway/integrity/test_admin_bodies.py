"""The integrity admin routes' body parsing: a body nested past Python's recursion limit is a
400 naming the problem, not a 500 (no trained model needed: the routes get a stand-in)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.requests import Request

from gateway.api.integrity import reset_alarm, start_drill
from gateway.errors import BadRequest

DEEP = b"[" * 100_000 + b"]" * 100_000


class _Pipeline:
    def set_drill(self, drill: Any) -> None:
        raise AssertionError("not reached")

    def reset_alarm(self, scope: str, key: str | None) -> dict[str, Any]:
        raise AssertionError("not reached")


class _Service:
    def require(self, name: str) -> _Pipeline:
        return _Pipeline()


def _request(body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    return Request(scope, receive)


Route = Callable[[str, Request, Any], Awaitable[dict[str, Any]]]


@pytest.mark.parametrize(
    ("route", "shape"),
    [(start_drill, "{attack, rate, substitute?}"), (reset_alarm, "{scope, key?}")],
)
async def test_a_deeply_nested_body_is_a_400(route: Route, shape: str) -> None:
    with pytest.raises(BadRequest) as info:
        await route("digits", _request(DEEP), _Service())
    assert info.value.message == (f"the body nests too deeply; it must be a JSON object: {shape}")
