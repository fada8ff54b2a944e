"""Loads and unloads of different models run at once; those of one model one after the other
(Triton's per-model serialisation). One repository lock for every model made an unload of one
model wait behind a slow load of another (a big artefact, an enclave boot of seconds).

A model is made slow deterministically: its ONNX load (run in a thread) waits on an event the
test sets, never on a sleep."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.errors import Unavailable
from gateway.repository import ModelRepository
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, serving_app
from tests.gateway.conftest import WAIT_S, Gate
from tests.model_factory import make_repository

ADMIN = {"X-API-Key": ADMIN_KEY}


def _with_big(root: Path) -> Path:
    """The test repository and a model 'big' (a copy of 'tiny': real ONNX versions)."""
    make_repository(root, datatypes=("FP32",))
    shutil.copytree(root / "tiny", root / "big")
    return root


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[ModelRepository]:
    repository = ModelRepository(_with_big(tmp_path / "repo"))
    await repository.load_all()
    yield repository
    await repository.close()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def _state(repo: ModelRepository, name: str) -> set[str]:
    return {r["state"] for r in repo.index() if r["name"] == name}


async def test_an_unload_is_not_held_behind_another_models_slow_load(
    repo: ModelRepository, gate: Gate
) -> None:
    gate.held.add("big")
    begun = gate.begun.get("big", 0)
    load = asyncio.create_task(repo.load("big"))
    await _until(lambda: gate.begun.get("big", 0) > begun)  # big's load is under way, held

    unload = asyncio.create_task(repo.unload("tiny"))
    done, _ = await asyncio.wait({unload}, timeout=WAIT_S)
    assert unload in done, "the unload of tiny waited for the load of big"
    await unload
    assert not load.done()  # it really was under way all along
    assert "tiny" not in repo.loaded_names()
    assert _state(repo, "tiny") == {"UNAVAILABLE"}
    # big still serves its old versions while its reload is under way; readiness is told
    # by the models wanted (tiny is not any more)
    assert repo.ready() == (True, [])
    # and another model loads meanwhile too
    await asyncio.wait_for(repo.load("identity_fp32"), WAIT_S)

    gate.open()
    assert await asyncio.wait_for(load, WAIT_S) == [1, 2]
    assert repo.ready() == (True, [])
    assert repo.loaded_names() == ["big", "identity_fp32"]


async def test_loads_and_unloads_of_one_model_never_interleave(
    repo: ModelRepository, gate: Gate
) -> None:
    gate.held.add("tiny")
    begun = gate.begun.get("tiny", 0)
    first = asyncio.create_task(repo.load("tiny"))
    await _until(lambda: gate.begun.get("tiny", 0) > begun)
    second = asyncio.create_task(repo.load("tiny"))
    unload = asyncio.create_task(repo.unload("tiny"))
    third = asyncio.create_task(repo.load("tiny"))
    # the others wait their turn: none of their versions began loading
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert gate.begun["tiny"] == begun + 1
    assert not any(t.done() for t in (second, unload, third))

    gate.open()
    await asyncio.wait_for(asyncio.gather(first, second, unload, third), WAIT_S)
    assert gate.most["tiny"] == 1  # never two of tiny's loads at once
    # in the order asked: the last one is a load, so tiny serves
    assert "tiny" in repo.loaded_names()
    assert repo.ready() == (True, [])


async def test_an_unload_asked_before_the_first_load_began_runs_after_it(
    tmp_path: Path,
) -> None:
    """A model never loaded: an unload asked right after its load, before that load has
    begun, answered 'not loaded' (a 404) and the model then served; it unloads after the
    load, in the order asked."""
    repo = ModelRepository(_with_big(tmp_path / "repo"))
    try:
        load = asyncio.create_task(repo.load("big"))
        await asyncio.sleep(0)  # the load is asked for; its work has not begun
        await repo.unload("big")  # awaited here: asked at once, before the load's work
        assert await asyncio.wait_for(load, WAIT_S) == [1, 2]
        assert repo.loaded_names() == []
        assert _state(repo, "big") == {"UNAVAILABLE"}
        assert repo.ready() == (True, [])
    finally:
        await repo.close()


async def test_close_waits_for_the_loads_under_way_and_unloads_them(
    tmp_path: Path, gate: Gate
) -> None:
    repo = ModelRepository(_with_big(tmp_path / "repo"))
    gate.held.add("big")
    loads = [asyncio.create_task(repo.load(n)) for n in ("big", "tiny")]
    await _until(lambda: gate.begun.get("big", 0) > 0)
    await asyncio.wait_for(loads[1], WAIT_S)  # tiny does not wait for big

    closing = asyncio.create_task(repo.close())
    await _until(lambda: repo.slot("tiny").served is None)  # tiny does not wait for big
    later = asyncio.create_task(repo.load("identity_fp32"))
    with pytest.raises(Unavailable, match="shutting down"):
        await asyncio.wait_for(later, WAIT_S)
    assert not closing.done()  # big's load is under way: it finishes first

    gate.open()
    await asyncio.wait_for(closing, WAIT_S)
    await asyncio.wait_for(loads[0], WAIT_S)
    assert repo.loaded_names() == []  # big loaded, then closed with the others
    assert gate.active.get("big", 0) == 0


async def test_load_all_loads_models_side_by_side(tmp_path: Path, gate: Gate) -> None:
    """At start, a slow model does not hold back the others (Triton loads in parallel)."""
    repo = ModelRepository(_with_big(tmp_path / "repo"), load_concurrency=2)
    try:
        gate.held.add("big")
        start = asyncio.create_task(repo.load_all())
        await _until(lambda: {"identity_fp32", "tiny"} <= set(repo.loaded_names()))
        assert _state(repo, "big") == {"LOADING"}
        assert repo.ready() == (False, ["big"])  # not ready while a wanted model loads
        gate.open()
        await asyncio.wait_for(start, WAIT_S)
        assert repo.loaded_names() == ["big", "identity_fp32", "tiny"]
        assert repo.ready() == (True, [])
    finally:
        await repo.close()


def test_load_concurrency_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="load_concurrency must be at least 1"):
        ModelRepository(tmp_path, load_concurrency=0)


async def test_over_http_an_unload_answers_while_another_model_loads(
    tmp_path: Path, gate: Gate
) -> None:
    """The real app: POST .../tiny/unload answers 200 while POST .../big/load is held."""
    settings = Settings(
        model_repository=_with_big(tmp_path / "repo"),
        api_keys=["user-key-0123456789"],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=5,
    )
    async with serving_app(settings, timeout=WAIT_S * 2) as (_, client):
        gate.held.add("big")
        begun = gate.begun.get("big", 0)
        load = asyncio.create_task(
            client.post("/v2/repository/models/big/load", headers=ADMIN, json={})
        )
        await _until(lambda: gate.begun.get("big", 0) > begun)

        unload = asyncio.create_task(
            client.post("/v2/repository/models/tiny/unload", headers=ADMIN, json={})
        )
        done, _ = await asyncio.wait({unload}, timeout=WAIT_S)
        assert unload in done, "the unload of tiny waited for the load of big"
        assert (await unload).status_code == 200
        assert (await client.get("/v2/models/tiny/ready")).status_code != 200
        index = (await client.post("/v2/repository/index", headers=ADMIN, json={})).json()
        assert {r["state"] for r in index if r["name"] == "big"} == {"READY"}  # old versions
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert not load.done()

        gate.open()
        r = await asyncio.wait_for(load, WAIT_S)
        assert r.status_code == 200, r.text
        assert (await client.get("/v2/models/big/ready")).status_code == 200
