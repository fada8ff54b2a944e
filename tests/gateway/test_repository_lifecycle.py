"""Loads and unloads whose caller leaves half way (a gRPC client's deadline passes, its task is
cancelled): the work runs to the end, so the model is not left LOADING for good (the server
not ready) and no version it loaded or replaced is left in memory, never unloaded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from gateway.api.oip_grpc import oip_pb2 as pb
from gateway.errors import ModelLoadError, Unavailable
from gateway.repository import ModelRepository
from gateway.runtimes.onnx import OnnxRuntime
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.gateway.test_grpc_server import grpc_gateway, unary
from tests.model_factory import make_repository, tiny_classifier

LOAD_S = 0.3  # how long each version takes to load here; callers leave before that


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[ModelRepository]:
    repository = ModelRepository(make_repository(tmp_path / "repo", datatypes=()))
    await repository.load_all()
    yield repository
    await repository.close()


@pytest.fixture
def slow_loads(monkeypatch: pytest.MonkeyPatch) -> list[OnnxRuntime]:
    """Every ONNX version takes LOAD_S to load; yields the runtimes loaded and not unloaded."""
    live: list[OnnxRuntime] = []
    lock = threading.Lock()
    load, unload = OnnxRuntime.load, OnnxRuntime.unload

    def slow_load(self: OnnxRuntime) -> None:
        time.sleep(LOAD_S)
        load(self)
        with lock:
            live.append(self)

    def tracked_unload(self: OnnxRuntime) -> None:
        unload(self)
        with lock:
            if self in live:
                live.remove(self)

    monkeypatch.setattr(OnnxRuntime, "load", slow_load)
    monkeypatch.setattr(OnnxRuntime, "unload", tracked_unload)
    return live


async def _leave_after(seconds: float, work: asyncio.Task[object]) -> None:
    await asyncio.sleep(seconds)
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_a_load_whose_caller_left_still_serves_the_model(
    repo: ModelRepository, slow_loads: list[OnnxRuntime]
) -> None:
    await repo.unload("tiny")
    await _leave_after(LOAD_S / 3, asyncio.create_task(repo.load("tiny")))
    await _until(lambda: "tiny" in repo.loaded_names())
    assert [r["state"] for r in repo.index() if r["name"] == "tiny"] == ["READY", "READY"]
    assert repo.ready() == (True, [])
    assert sorted(repo.served("tiny").versions) == [1, 2]
    assert {(rt.name, rt.version) for rt in slow_loads} == {("tiny", 1), ("tiny", 2)}


async def test_a_reload_whose_caller_left_swaps_and_unloads_the_old_versions(
    repo: ModelRepository, slow_loads: list[OnnxRuntime]
) -> None:
    old = repo.get("tiny")
    tiny_classifier(repo.root / "tiny" / "3" / "model.onnx")
    await _leave_after(LOAD_S / 3, asyncio.create_task(repo.load("tiny")))
    await _until(lambda: old.closed and repo.get("tiny").version == 3)
    assert repo.get("tiny").version == 3
    assert old.closed  # drained and unloaded, not left in memory beside the new versions
    # each version loaded once, by the one reload: nothing loaded that does not serve
    assert sorted(rt.version for rt in slow_loads) == [1, 2, 3]
    assert all(not row["reason"] for row in repo.index() if row["name"] == "tiny")


async def test_an_unload_whose_caller_left_still_unloads(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtimes = [repo.get("tiny", str(v)).tensors.runtime for v in repo.served("tiny").versions]
    assert all("_session" in rt.__dict__ for rt in runtimes)
    unload = OnnxRuntime.unload

    def slow_unload(self: OnnxRuntime) -> None:
        time.sleep(LOAD_S)
        unload(self)

    monkeypatch.setattr(OnnxRuntime, "unload", slow_unload)
    # the caller leaves while the first version unloads: the second must unload all the same
    await _leave_after(LOAD_S / 3, asyncio.create_task(repo.unload("tiny")))
    await _until(lambda: all("_session" not in rt.__dict__ for rt in runtimes))
    assert all("_session" not in rt.__dict__ for rt in runtimes)  # the sessions were freed
    assert "tiny" not in repo.loaded_names()
    assert repo.ready() == (True, [])


async def test_a_load_after_close_is_refused_not_left_behind(repo: ModelRepository) -> None:
    await repo.close()
    with pytest.raises(Exception, match="shutting down"):
        await repo.load("tiny")
    assert repo.loaded_names() == []
    await repo.load_all()  # the app started again (a second lifespan): it serves again
    assert repo.loaded_names() == ["tiny"]


async def test_a_version_named_twice_is_loaded_once(
    repo: ModelRepository, slow_loads: list[OnnxRuntime]
) -> None:
    text = (repo.root / "tiny" / "config.yaml").read_text()
    text = text.replace("all: {}", "specific: {versions: [2, 2]}")
    (repo.root / "tiny" / "config.yaml").write_text(text)
    assert await repo.load("tiny") == [2]
    # one runtime for version 2, the one that serves: a second copy was loaded and never freed
    assert [(rt.version, rt) for rt in slow_loads] == [(2, repo.get("tiny").tensors.runtime)]


async def test_a_zero_padded_version_directory_is_named(repo: ModelRepository) -> None:
    tiny_classifier(repo.root / "tiny" / "007" / "model.onnx")
    with pytest.raises(ModelLoadError, match=r"version directories \['007'\] .* name them \['7'\]"):
        await repo.load("tiny")
    assert sorted(repo.served("tiny").versions) == [1, 2]  # the serving versions stay


async def test_a_model_being_loaded_says_so(
    repo: ModelRepository, slow_loads: list[OnnxRuntime]
) -> None:
    await repo.unload("tiny")
    loading = asyncio.create_task(repo.load("tiny"))
    await asyncio.sleep(LOAD_S / 3)
    with pytest.raises(Unavailable, match="model 'tiny' is not ready: loading"):
        repo.get("tiny")  # was "not loaded", as if nobody had asked for it
    assert await loading == [1, 2]
    assert repo.get("tiny").version == 2


async def test_a_grpc_load_whose_deadline_passes_still_serves_the_model(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the way it was found: tritonclient.grpc's load_model(client_timeout=...) on a model that
    # takes longer to load left it LOADING, the server not ready, until someone loaded it again
    async with grpc_gateway(settings) as (_, channel, app):
        repo: ModelRepository = app.state.dataplane.repository
        await repo.unload("tiny")
        load = OnnxRuntime.load

        def slow_load(self: OnnxRuntime) -> None:
            time.sleep(LOAD_S)
            load(self)

        monkeypatch.setattr(OnnxRuntime, "load", slow_load)
        call = unary(channel, "RepositoryModelLoad", pb.RepositoryModelLoadResponse)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(
                pb.RepositoryModelLoadRequest(model_name="tiny"),
                metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
                timeout=LOAD_S / 3,
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: "tiny" in repo.loaded_names())
        assert sorted(repo.served("tiny").versions) == [1, 2]
        assert app.state.dataplane.ready() == (True, [])
