"""How the generation metrics count requests that an unload or reload ends, and requests
refused for a full queue: every request that reaches a model's admission is counted once in
``fides_generation_requests_total``, an unload's under ``finish_reason="abort"``, never as an
error (an operator's action) and never lost (the 503s of queued requests were not counted).

In process, the model's steps slowed down by a sleep so that a long generation outlasts the
drain on any machine (:mod:`tests.gateway.generation.test_unload_and_queue`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.generation.factory import events, make_lm_repository
from tests.gateway.generation.test_unload_and_queue import (
    ADMIN,
    BOUND_S,
    M,
    metric,
    served,
    slow_down,
    text_model,
    until,
)

LONG = {"model": M, "prompt": "def", "max_tokens": 4000, "ignore_eos": True}
REQUESTS = "fides_generation_requests_total"


async def post(c: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await c.post("/v1/completions", json=body)


async def counts(c: httpx.AsyncClient) -> dict[str, float]:
    """``fides_generation_requests_total`` of the model by finish reason (0 where absent)."""
    text = (await c.get("/metrics")).text
    reasons = ("stop", "length", "cancelled", "timeout", "abort", "queue_full", "error")
    out = {r: metric(text, REQUESTS, model=M, finish_reason=r) for r in reasons}
    out["all"] = metric(text, REQUESTS, model=M)
    out["running"] = metric(text, "fides_generation_running", model=M)
    out["queued"] = metric(text, "fides_generation_queue_depth", model=M)
    return out


def assert_unloaded_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"  # refused before any stream began
    assert "unloaded" in r.json()["error"]["message"]


def assert_stream_ended_by_unload(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    err = evs[-2]["error"]
    assert err["type"] == "service_unavailable", err
    assert "was unloaded while generating" in err["message"]


async def test_an_unload_counts_running_and_queued_requests_as_abort(tmp_path: Path) -> None:
    """Two sequences run and two wait (one plain, one streamed of each) when the model is
    unloaded with a short drain: the running ones are stopped (503, a stream's error event),
    the queued ones refused (503); all four are counted as abort, none as error or cancelled,
    and the counts add up to the requests sent."""
    repo = make_lm_repository(
        tmp_path / "repo",
        name=M,
        context=4096,
        generation={"max_concurrent_sequences": 2, "max_queue_size": 4},
    )
    async with served(repo, drain_s=0.5) as (app, c):
        model = text_model(app)
        slow_down(model, 0.02)  # 4000 tokens: at least 80 s; the drain is 0.5 s
        running = [
            asyncio.ensure_future(post(c, LONG)),
            asyncio.ensure_future(post(c, {**LONG, "stream": True})),
        ]
        await until(lambda: len(model.active) == 2, "two sequences running")
        queued = [
            asyncio.ensure_future(post(c, LONG)),
            asyncio.ensure_future(post(c, {**LONG, "stream": True})),
        ]
        await until(lambda: model.waiting == 2, "two queued requests")
        unload = await c.post(f"/v2/repository/models/{M}/unload", headers=ADMIN)
        assert unload.status_code == 200, unload.text
        done, pending = await asyncio.wait([*running, *queued], timeout=BOUND_S)
        for task in pending:
            task.cancel()
        assert not pending, "requests hang after the unload"

        plain, streamed = (t.result() for t in running)
        assert plain.status_code == 503, plain.text
        assert "was unloaded while generating" in plain.json()["error"]["message"]
        assert_stream_ended_by_unload(streamed)
        for task in queued:
            assert_unloaded_503(task.result())

        n = await counts(c)
        assert n["abort"] == 4, n
        assert n["error"] == n["cancelled"] == 0, n
        assert n["all"] == 4, n  # nothing lost, nothing counted twice
        assert n["running"] == n["queued"] == 0, n


async def test_a_full_queue_is_counted_then_the_unload_aborts_the_rest(tmp_path: Path) -> None:
    """One slot, a queue of one: a plain and a streamed request beyond it are refused at once
    (503, counted as queue_full); the unload then ends the running and the queued one (abort).
    Five requests, five counts."""
    repo = make_lm_repository(
        tmp_path / "repo",
        name=M,
        context=4096,
        generation={"max_concurrent_sequences": 1, "max_queue_size": 1},
    )
    async with served(repo, drain_s=0.5) as (app, c):
        model = text_model(app)
        slow_down(model, 0.02)
        first = asyncio.ensure_future(post(c, {**LONG, "stream": True}))
        await until(lambda: len(model.active) == 1, "a sequence running")
        second = asyncio.ensure_future(post(c, LONG))
        await until(lambda: model.waiting == 1, "a queued request")
        for body in (LONG, {**LONG, "stream": True}):
            r = await post(c, body)
            assert r.status_code == 503, r.text
            assert "busy" in r.json()["error"]["message"]
        n = await counts(c)
        assert n["queue_full"] == 2, n
        assert n["all"] == 2, n

        unload = await c.post(f"/v2/repository/models/{M}/unload", headers=ADMIN)
        assert unload.status_code == 200, unload.text
        await asyncio.wait_for(asyncio.gather(first, second), BOUND_S)
        assert_stream_ended_by_unload(first.result())
        assert_unloaded_503(second.result())
        n = await counts(c)
        assert (n["queue_full"], n["abort"], n["error"], n["all"]) == (2, 2, 0, 4), n


async def test_a_reload_aborts_what_outlasts_the_drain_and_moves_the_queued(
    tmp_path: Path,
) -> None:
    """A reload with a short drain: the running request on the old version is stopped (abort);
    the queued one goes to the new version and is counted once, where it ends (length)."""
    repo = make_lm_repository(
        tmp_path / "repo",
        name=M,
        context=4096,
        generation={"max_concurrent_sequences": 1, "max_queue_size": 1},
    )
    async with served(repo, drain_s=0.5) as (app, c):
        old = text_model(app)
        slow_down(old, 0.02)
        running = asyncio.ensure_future(post(c, LONG))
        await until(lambda: len(old.active) == 1, "a sequence running")
        queued = asyncio.ensure_future(post(c, {**LONG, "max_tokens": 3, "stream": True}))
        await until(lambda: old.waiting == 1, "a queued request")
        reload = await c.post(f"/v2/repository/models/{M}/load", headers=ADMIN)
        assert reload.status_code == 200, reload.text
        await asyncio.wait_for(asyncio.gather(running, queued), BOUND_S)
        r = running.result()
        assert r.status_code == 503, r.text
        assert "was unloaded while generating" in r.json()["error"]["message"]
        evs = events(queued.result().text)
        assert evs[-1] == "[DONE]"
        assert evs[-2]["choices"][0]["finish_reason"] == "length"  # the API's own value
        n = await counts(c)
        assert (n["abort"], n["length"], n["error"], n["all"]) == (1, 1, 0, 2), n


async def test_a_request_that_fails_to_start_is_counted_as_error(tmp_path: Path) -> None:
    """A sequence the engine refuses to start (a 500) is counted as error, its slot given
    back."""
    from gateway.generation.params import SamplingParams

    repo = make_lm_repository(tmp_path / "repo", name=M)
    async with served(repo, drain_s=0.5) as (app, c):
        model = text_model(app)

        def broken(prompt: list[int], params: Any) -> Any:
            raise ValueError("the engine refused it")

        model.engine.start = broken
        with pytest.raises(ValueError, match="the engine refused it"):
            await app.state.generation.submit(model, [5, 6], SamplingParams(3, 0.0), [])
        n = await counts(c)
        assert (n["error"], n["all"]) == (1, 1), n
        assert not model.slots.locked()
        assert not model.active
