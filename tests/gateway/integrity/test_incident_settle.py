"""A model's incident bundle under concurrent load at a tamper drill (issue 21): requests signed
before the alarm fired but still being judged then are waited for (bounded, in the background:
the request that tripped the alarm answers at once), so the bundle holds every request of its
signed batches; one still not judged when the bound passes stays a gap the check reports."""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.integrity import incident as incident_module
from gateway.integrity.pipeline import IntegrityPipeline
from tests.gateway.integrity.conftest import ADMIN, infer_body, integrity_gateway
from tests.gateway.integrity.test_incident_identity import _batched, _check, _wave
from tests.gateway.integrity.test_pipeline import URL
from tests.integrity_factory import Digits

INCIDENTS = "/v2/admin/models/digits/integrity/incidents"
SLOW = "slow-request"
_slow = contextvars.ContextVar("slow", default=False)


@pytest.fixture
def held_back(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The request with id SLOW is signed with the others of its wave, and its judging (the
    detector) waits until the returned event is set."""
    release = asyncio.Event()
    run, judge = IntegrityPipeline.run, IntegrityPipeline._judge

    async def tagged_run(self: IntegrityPipeline, service: Any, tensors: Any, ctx: Any) -> Any:
        token = _slow.set(ctx.request_id == SLOW)
        try:
            return await run(self, service, tensors, ctx)
        finally:
            _slow.reset(token)

    async def slow_judge(self: IntegrityPipeline, pair: Any, tensors: Any, deadline: float) -> Any:
        if _slow.get():
            await release.wait()
        return await judge(self, pair, tensors, deadline)

    monkeypatch.setattr(IntegrityPipeline, "run", tagged_run)
    monkeypatch.setattr(IntegrityPipeline, "_judge", slow_judge)
    return release


async def _model_incidents(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    listed = (await client.get(INCIDENTS, headers=ADMIN)).json()["incidents"]
    return [i for i in listed if i["scope"] == "model"]


async def _alarm_with_one_request_held_back(
    client: httpx.AsyncClient, digits: Digits
) -> tuple[asyncio.Task[httpx.Response], list[dict[str, Any]]]:
    """Waves of three concurrent requests (one signed batch each); the second wave carries
    SLOW too, held back in judging; then a switch drill until the alarm fires. Returns the
    SLOW request (still out) and the tripping wave's answers."""
    for wave in range(3):
        bodies = [infer_body(digits.take(2, seed=10 * wave + j)) for j in range(3)]
        if wave == 1:
            slow = asyncio.create_task(
                client.post(URL, json={"id": SLOW, **infer_body(digits.take(2, seed=999))})
            )
        await _wave(client, bodies)
    r = await client.put(
        "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
    )
    assert r.status_code == 200
    for wave in range(3, 20):
        bodies = [infer_body(digits.take(2, seed=10 * wave + j)) for j in range(3)]
        params = await _wave(client, bodies)
        if any(p["integrity_alarm"] for p in params):
            assert not slow.done()  # the alarm's answers did not wait for it
            return slow, params
    raise AssertionError("the switched answers did not raise the alarm")


async def _bundle_when_kept(client: httpx.AsyncClient) -> dict[str, Any]:
    for _ in range(400):
        model = await _model_incidents(client)
        if model:
            bundle: dict[str, Any] = (
                await client.get(f"{INCIDENTS}/{model[0]['id']}", headers=ADMIN)
            ).json()
            return bundle
        await asyncio.sleep(0.02)
    raise AssertionError("no model incident kept")


def _request_gaps(check: Any) -> list[str]:
    return [g for g in check.gaps() if "kept out of the alarm" not in g]


async def test_requests_judged_within_the_bound_are_in_the_bundle(
    integrity_repo: Path,
    digits: Digits,
    held_back: asyncio.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _batched(integrity_repo)
    monkeypatch.setattr(incident_module, "SETTLE_S", 5.0)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        slow, _ = await _alarm_with_one_request_held_back(client, digits)
        await asyncio.sleep(0.3)
        assert await _model_incidents(client) == []  # sealing waits for the request held back
        held_back.set()
        assert (await slow).status_code == 200
        bundle = await _bundle_when_kept(client)
    assert SLOW in {a["request_id"] for a in bundle["answers"]}
    assert bundle["settle"]["missing"] == 0
    assert 0.3 <= bundle["settle"]["waited_s"] < 5.0
    check = _check(bundle, fakes, integrity_repo)
    assert check.requests == check.batch_requests
    assert check.signed_batches == check.batch_span
    assert _request_gaps(check) == []
    assert check.peak >= check.threshold


async def test_a_request_not_judged_within_the_bound_is_reported_as_a_gap(
    integrity_repo: Path,
    digits: Digits,
    held_back: asyncio.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _batched(integrity_repo)
    monkeypatch.setattr(incident_module, "SETTLE_S", 0.5)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        slow, _ = await _alarm_with_one_request_held_back(client, digits)
        bundle = await _bundle_when_kept(client)
        held_back.set()
        assert (await slow).status_code == 200
    assert SLOW not in {a["request_id"] for a in bundle["answers"]}
    assert bundle["settle"]["missing"] >= 1
    assert bundle["settle"]["waited_s"] >= 0.5
    check = _check(bundle, fakes, integrity_repo)
    gaps = _request_gaps(check)
    assert gaps  # never hidden
    assert any(
        "requests of the signed batches held" in g or "signed batches within the span" in g
        for g in gaps
    )
    assert check.peak >= check.threshold
